"""The README's first command, on the tiny demo family: build, pack, inspect, unpack, score."""

import torch
from safetensors.torch import load_file

import tallpack
from tallpack.demo import build_family, evaluate
from tallpack.demo.run import DIAL_TARGET, run_demo
from test_cli import run
from conftest import demo_copy, written_str


# Both start from a copy of the session's tiny family (conftest.demo_tiny), which the demo reuses
# as it would its own from an earlier run: building it is test_demo_family's part.

def test_demo_command_runs_the_whole_path(tmp_path, demo_tiny):
    demo_copy(demo_tiny, tmp_path / "family")
    out = run("demo", "--size", "tiny", "--dir", tmp_path).output
    assert f"tallpack format {written_str(12)}" in out  # 1.4: the folders' config.json files are kept; 1.12: groups
    assert (tmp_path / "unpacked" / "hflip" / "config.json").exists()
    assert "rebuilt" in out and "\nmean " in out
    assert (tmp_path / "family.tallpack").exists()
    assert (tmp_path / "unpacked" / "hflip" / "model.safetensors").exists()
    assert "--fidelity 0.97" in out and "(worst task " in out  # the dial, beyond the paper


def test_tiny_family_reconstructions_score_close_to_the_originals(tmp_path, demo_tiny):
    demo_copy(demo_tiny, tmp_path / "family")
    r = run_demo(tmp_path, size="tiny", task="invert")
    fam = build_family(tmp_path / "family", size="tiny")
    with tallpack.open(r.archive) as arc:
        assert arc.tasks == tuple(fam.tasks)
        assert all(t["lambda"] in tallpack.LAMBDA_GRID for t in r.summary["tasks"])
        rebuilt = load_file(r.unpacked)
        assert all(torch.equal(rebuilt[k], v) for k, v in arc.state_dict("invert").items())
        # the merged body with each task's own head is a complete model for that task
        for task in arc.tasks:
            assert 0 <= evaluate(fam.root, task, arc.merged("consensus-ta", task=task)) <= 1
    for task, (orig, rec) in r.scores.items():
        assert orig > 0.5 and rec > 0.8 * orig, (task, orig, rec)
    # the same family through the fidelity dial: its target met on every task, in the manifest
    with tallpack.open(r.dial_archive) as arc:
        assert all(i.fidelity["weight"] >= DIAL_TARGET for i in arc.manifest.tasks)
    assert set(r.dial_scores) == set(r.scores)
