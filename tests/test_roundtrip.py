"""Pack real checkpoints, read them back, compare with the paper's formula bit for bit."""

import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file

import tallpack
from conftest import expected_reconstruction, load_folder
from strategies import families


def assert_task_matches(fam, task, original, expected):
    sd = fam.state_dict(task)
    assert list(sd) == list(original), "names and their order are the task's own"
    for name, t in original.items():
        got = sd[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        want = expected.get(name, t)  # tensors that are not masked come back exactly
        # compare bits, so NaNs and signed zeros count too
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), f"{task}/{name}"


def test_safetensors_files_round_trip(small_family, tmp_path):
    out = tmp_path / "fam.tallpack"
    lambdas = {"a": 0.2, "b": 0.4, "c": 0.6}
    m = tallpack.pack(small_family["base_path"], small_family["task_paths"], out, lambdas=lambdas,
                      chunk_elements=512)
    expected = expected_reconstruction(small_family["base"], small_family["tasks"], lambdas)
    with tallpack.open(out) as fam:
        assert fam.tasks == ("a", "b", "c")
        for t in fam.tasks:
            # the order safetensors gives when it loads the file back
            assert_task_matches(fam, t, load_file(small_family["task_paths"][t]), expected[t])
            assert fam.task_info(t).lam == lambdas[t]
            assert 0 < fam.task_info(t).density < 1
        kinds = {e.name: e.kind for e in fam.manifest.tensors}
        members = {e.name: [m.name for m in e.members] for e in fam.manifest.tensors if e.members}
    # the two small merged tensors are stored as one group (format 1.12), in the checkpoint's order
    assert kinds == {"tallpack.group.0": "merged", "frozen": "shared", "steps": "shared", "head.w": "task-own"}
    assert members == {"tallpack.group.0": ["body.b", "body.w"]}
    assert {t.name: t.lam for t in m.tasks} == lambdas


def test_sharded_bf16_hf_folders_with_tied_embeddings(hf_family, tmp_path):
    out = tmp_path / "hf.tallpack"
    tallpack.pack(hf_family["base"], hf_family["tasks"], out, lambdas=0.3)
    base = load_folder(hf_family["base"])
    tasks = {t: load_folder(p) for t, p in hf_family["tasks"].items()}
    assert "lm_head.weight" not in base  # tied: transformers stores it once
    expected = expected_reconstruction(base, tasks, {t: 0.3 for t in tasks})
    with tallpack.open(out) as fam:
        for t in fam.tasks:
            assert_task_matches(fam, t, tasks[t], expected[t])
            assert fam.task_info(t).metadata["config"]["model_type"] == "llama"
        info = fam.task_info("cars")
        assert info.fidelity["cosine"] > 0.5 and info.fidelity["rel_l2"] < 1


def test_torch_files_and_dicts_mix(small_family, tmp_path):
    torch.save(small_family["tasks"]["a"], tmp_path / "a.pt")
    tasks = {"a": tmp_path / "a.pt", "b": small_family["tasks"]["b"]}
    out = tmp_path / "mix.tallpack"
    tallpack.pack(small_family["base"], tasks, out)
    sds = {t: small_family["tasks"][t] for t in tasks}
    expected = expected_reconstruction(small_family["base"], sds, {t: tallpack.DEFAULT_LAMBDA for t in sds})
    with tallpack.open(out) as fam:
        for t in tasks:
            assert_task_matches(fam, t, sds[t], expected[t])


def test_a_list_of_paths_names_tasks_by_stem(small_family, tmp_path):
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base_path"], list(small_family["task_paths"].values()), out)
    with tallpack.open(out) as fam:
        assert fam.tasks == ("a", "b", "c")


def test_get_tensor_and_lazy_state_dict_read_single_tensors(small_family, tmp_path):
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base_path"], small_family["task_paths"], out)
    with tallpack.open(out) as fam:
        full = fam.state_dict("b")
        lazy = fam.state_dict("b", lazy=True)
        assert list(lazy) == list(full) and len(lazy) == len(full)
        assert torch.equal(lazy["body.w"], full["body.w"])
        assert torch.equal(fam.get_tensor("b", "head.w"), small_family["tasks"]["b"]["head.w"])


def test_base_only_tensors_are_dropped_unless_kept(small_family, tmp_path):
    base = dict(small_family["base"], extra=torch.ones(3))
    for keep in (False, True):
        out = tmp_path / f"k{keep}.tallpack"
        tallpack.pack(base, small_family["tasks"], out, keep_base_only=keep)
        with tallpack.open(out) as fam:
            assert ("extra" in {e.name for e in fam.manifest.tensors}) == keep
            assert "extra" not in fam.keys("a")
            if keep:
                assert torch.equal(fam.base_tensor("extra"), torch.ones(3))


@given(families())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_small_family_reads_back(tmp_path_factory, family):
    base, tasks = family
    out = tmp_path_factory.mktemp("prop") / "f.tallpack"
    lambdas = {t: 0.2 + 0.1 * (i % 5) for i, t in enumerate(tasks)}
    tallpack.pack(base, tasks, out, lambdas=lambdas, chunk_elements=8, codec="raw")
    expected = expected_reconstruction(base, tasks, lambdas)
    with tallpack.open(out) as fam:
        assert list(fam.tasks) == list(tasks)
        for t in tasks:
            assert_task_matches(fam, t, tasks[t], expected[t])
        assert fam.verify() == []


def test_inputs_are_not_modified(small_family, tmp_path):
    before = {t: {k: v.clone() for k, v in sd.items()} for t, sd in small_family["tasks"].items()}
    tallpack.pack(small_family["base"], small_family["tasks"], tmp_path / "f.tallpack")
    for t, sd in small_family["tasks"].items():
        assert all(torch.equal(sd[k], before[t][k]) for k in sd)


def test_codec_choice_changes_size_not_content(small_family, tmp_path):
    sizes = {}
    recon = {}
    for codec in ("raw", "zstd", "bytegroup-zstd"):
        out = tmp_path / f"{codec}.tallpack"
        tallpack.pack(small_family["base"], small_family["tasks"], out, codec=codec)
        sizes[codec] = out.stat().st_size
        with tallpack.open(out) as fam:
            recon[codec] = fam.state_dict("a")
    assert sizes["bytegroup-zstd"] < sizes["raw"]
    for name in recon["raw"]:
        assert torch.equal(recon["raw"][name], recon["bytegroup-zstd"][name])


@given(families(max_tasks=3, max_tensors=3))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_manifest_round_trips(tmp_path_factory, family):
    from tallpack.manifest import Manifest

    base, tasks = family
    m = tallpack.pack(base, tasks, tmp_path_factory.mktemp("m") / "f.tallpack", chunk_elements=16)
    again = Manifest.from_dict(m.to_dict())
    assert again == m and again.to_dict() == m.to_dict()


def test_task_names_must_be_file_name_safe(small_family, tmp_path):
    import pytest

    for bad in ("../evil", "a/b", ".", "x=y", " pad"):
        with pytest.raises(tallpack.TallpackError, match="bad task name"):
            tallpack.pack(small_family["base"], {bad: small_family["tasks"]["a"]}, tmp_path / "f.tallpack")


def test_sharded_pytorch_bin_folders_and_legacy_torch_files(small_family, tmp_path):
    import json

    base, tasks = small_family["base"], small_family["tasks"]
    folder = tmp_path / "a_bin"
    folder.mkdir()
    names = list(tasks["a"])
    shards = {"pytorch_model-00001-of-00002.bin": names[:2], "pytorch_model-00002-of-00002.bin": names[2:]}
    for shard, keys in shards.items():
        torch.save({k: tasks["a"][k] for k in keys}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    torch.save(tasks["b"], tmp_path / "b_legacy.pt", _use_new_zipfile_serialization=False)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, {"a": folder, "b": tmp_path / "b_legacy.pt"}, out)
    expected = expected_reconstruction(base, {t: tasks[t] for t in "ab"}, {t: tallpack.DEFAULT_LAMBDA for t in "ab"})
    with tallpack.open(out) as fam:
        assert fam.task_info("a").source["format"] == "hf-folder"
        assert set(fam.keys("a")) == set(tasks["a"])
        for t in "ab":
            sd = fam.state_dict(t)
            for k, v in tasks[t].items():
                assert torch.equal(sd[k], expected[t].get(k, v)), (t, k)


def test_density_counts_only_masked_tensors(small_family, tmp_path):
    """A frozen floating tensor (stored once, exactly) must not inflate the mask density."""
    big_frozen = dict(small_family["base"], frozen=torch.randn(100_000))
    tasks = {t: dict(sd, frozen=big_frozen["frozen"]) for t, sd in small_family["tasks"].items()}
    out_a, out_b = tmp_path / "a.tallpack", tmp_path / "b.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out_a)
    tallpack.pack(big_frozen, tasks, out_b)
    with tallpack.open(out_a) as a, tallpack.open(out_b) as b:
        for t in a.tasks:
            assert a.task_info(t).density == b.task_info(t).density
            assert a.task_info(t).fidelity == b.task_info(t).fidelity  # frozen: tau = 0


def test_task_vectors_too_large_for_float32_sums_are_stored_exactly(tmp_path, caplog):
    """A tensor whose values are finite but whose task vectors overflow float32 ([-3e38, 3e38]
    against [3e38, -3e38]: tau = inf) is stored per task, exactly; it used to be masked, and
    packing failed on the overflowed fidelity figures. The bound on task vectors is
    ``tall.TALL_RANGE / (T + 1)``: just below it, a tensor is masked; large values with small
    task vectors are masked too."""
    from tallpack.tall import TALL_RANGE
    limit = TALL_RANGE / (2 + 1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    base = {"huge": torch.tensor([-3e38, 3e38, 1.0, 2.0]), "below": torch.zeros(4), "above": torch.zeros(4),
            "large": torch.tensor([3e38, -3e38, 1.0, 2.0]), "w": w}
    tasks = {}
    for i, t in enumerate(("a", "b")):
        tasks[t] = {"huge": torch.tensor([3e38 if t == "a" else -3e38, -3e38 if t == "a" else 3e38, 1.5, 2.0]),
                    "below": torch.tensor([limit * 0.99, -1.0, 0.5, i + 1.0]),
                    "above": torch.tensor([limit * 1.01, -1.0, 0.5, i + 1.0]),
                    "large": base["large"] + torch.tensor([0.0, 0.0, 0.5, i + 1.0]),
                    "w": w + 0.01 * torch.randn(64, generator=g)}
    with caplog.at_level("WARNING", logger="tallpack"):
        tallpack.pack(base, tasks, tmp_path / "f.tallpack", group=False)  # each tensor its own entry
    assert "'huge': task 'a' differs from the base by" in caplog.text  # (not 'b': its task vector is small)
    assert "'above': tasks 'a', 'b' differ from the base by" in caplog.text
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        kinds = {e.name: e.kind for e in fam.manifest.tensors}
        assert kinds["huge"] == kinds["above"] == "task-own" and kinds["below"] == kinds["large"] == "merged"
        for t, sd in tasks.items():
            for k in ("huge", "above"):
                assert torch.equal(fam.get_tensor(t, k), sd[k]), (t, k)
            for k in ("below", "large"):
                assert torch.isfinite(fam.get_tensor(t, k)).all(), (t, k)


def test_a_task_in_another_dtype_than_the_base_is_packed_with_a_warning(tmp_path, caplog):
    """A float16 copy of a float32 fine-tune is merged all the same (its task vector in float32,
    rebuilt in float16), but the packer says that the rounding will count as fine-tuning."""
    import tallpack

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(32, 16, generator=g), "v": torch.randn(16, generator=g)}
    tasks = {"a": {k: (v + 0.01 * torch.randn(v.shape, generator=g)).half() for k, v in base.items()},
             "b": {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}}
    with caplog.at_level("WARNING", logger="tallpack.plan"):
        tallpack.pack(base, tasks, tmp_path / "d.tallpack")
    said = [r.getMessage() for r in caplog.records if "differ in dtype" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("task 'a': ") and "float16" in said[0], said
    with tallpack.open(tmp_path / "d.tallpack") as fam:
        assert fam.get_tensor("a", "w").dtype == torch.float16 and fam.get_tensor("b", "w").dtype == torch.float32


def test_header_metadata_of_sharded_files_comes_back_in_a_lossy_unpack(hf_family, tmp_path, caplog):
    """Each shard's safetensors ``__metadata__`` (a license, ...) is kept with the task and written
    into the unpacked files, beside tallpack's own keys, which it never overrides, nor "format";
    an entry too large for the bound is left out with a warning, and the archive still packs."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tallpack.sources import MAX_HEADER_METADATA

    folder = shutil.copytree(hf_family["tasks"]["cars"], tmp_path / "cars")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    save_file(load_file(shards[0]), shards[0], metadata={"format": "tf", "license": "apache-2.0",
                                                        "tallpack.task": "old", "tallpack.merge": "ties"})
    save_file(load_file(shards[1]), shards[1], metadata={"format": "pt", "license": "other", "quant": "none",
                                                        "huge": "x" * MAX_HEADER_METADATA})
    with caplog.at_level("WARNING", logger="tallpack"):
        tallpack.pack(hf_family["base"], {"cars": folder}, tmp_path / "m.tallpack")
    assert "'huge' not kept" in caplog.text
    with tallpack.open(tmp_path / "m.tallpack") as fam:
        tallpack.write_task(fam, "cars", tmp_path / "out")
    written = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert [p.name for p in written] == [p.name for p in shards]
    for p in written:
        with safe_open(p, "pt") as f:
            meta = f.metadata()
        assert meta == {"format": "pt", "license": "apache-2.0", "quant": "none", "tallpack.task": "cars",
                        "tallpack.lambda": meta["tallpack.lambda"], "tallpack.archive": "m.tallpack"}, meta


def test_the_same_files_pack_to_the_same_bytes_whatever_their_header_metadata(tmp_path):
    """safetensors hands header metadata back in hash order, which changes per process: the
    manifest records it sorted, so packing the same files twice gives the same archive. With 20
    keys two processes hand them back in the same order once in 20! (five keys: once in 120), so
    two fresh processes, run side by side, are enough."""
    import hashlib
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 8, generator=g)}
    meta = {"format": "pt", "license": "mit", "author": "x", "zeta": "1", "alpha": "2",
            **{f"key{i}": str(i) for i in range(15)}}
    save_file(base, tmp_path / "base.safetensors", metadata=meta)
    save_file({"w": base["w"] + 0.01}, tmp_path / "t.safetensors", metadata=meta)
    runs = [subprocess.Popen([sys.executable, "-m", "tallpack", "-q", "pack", "--base", "base.safetensors", "--task",
                              "t.safetensors", "--no-paths", "-o", f"o{seed}.tallpack"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONHASHSEED=seed))
            for seed in ("1", "2")]  # fresh processes: safetensors' order changes between them
    digests = set()
    for seed, r in zip(("1", "2"), runs):
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
        digests.add(hashlib.sha256((tmp_path / f"o{seed}.tallpack").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_header_metadata_key_named_config_is_not_taken_for_config_json(tmp_path, caplog):
    """A safetensors file's header key ``config`` (a string) would land where a folder's
    config.json is kept (an object), and readers write that out as config.json: it is left out,
    with a warning."""
    from safetensors.torch import save_file

    base = {"w": torch.zeros(8, 4)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + 0.01}, tmp_path / "t.safetensors",
              metadata={"format": "pt", "config": '{"model_type": "x"}', "license": "mit"})
    tallpack.pack(tmp_path / "base.safetensors", [tmp_path / "t.safetensors"], tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        meta = fam.task_info("t").metadata
        assert "config" not in meta and meta.get("license") == "mit"
        tallpack.write_task(fam, "t", tmp_path / "u")
    assert not (tmp_path / "u" / "config.json").exists() and "'config'" in caplog.text
