"""A float16 or float8 family whose TALL rebuild ``cast_d(f32(theta_0) + m_t * tau_MTL)`` (spec
§6.1.1) passes the dtype's range: the reader gives +-inf there, as the spec says, and the packer
says so (one warning, an ``overflow`` figure); the fidelity dial counts those elements as large
errors that its corrections mend, never writing inf into the manifest."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import tallpack

#: Per dtype: a task value near the dtype's largest, and one half of it. Tasks a and b hold the
#: first, c the second: tau_MTL = 2.5 x the first, which tasks a and b keep (their masks are set),
#: past the dtype's range (float16: 65504, float8_e5m2: 57344).
NEAR_MAX = {torch.float16: (60000.0, 30000.0), torch.float8_e5m2: (49152.0, 24576.0)}


def overflowing_family(tmp_path, dtype: torch.dtype) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    """The finding's family: base zeros; tasks a = b = [big, -big, 1, 0], c = [half, -half, 0.5, 0]
    (``w``), and a tensor ``v`` (merged too) every task rebuilds within range."""
    big, half = NEAR_MAX[dtype]
    base = {"w": torch.zeros(4), "v": torch.zeros(4)}
    tasks = {"a": [big, -big, 1.0, 0.0], "b": [big, -big, 1.0, 0.0], "c": [half, -half, 0.5, 0.0]}
    save_file({k: x.to(dtype) for k, x in base.items()}, tmp_path / "base.safetensors")
    paths, originals = {}, {}
    for i, (t, w) in enumerate(tasks.items()):
        sd = {"w": torch.tensor(w).to(dtype), "v": (torch.tensor([1.0, -1.0, 0.5, 0.25]) * (i + 1)).to(dtype)}
        save_file(sd, tmp_path / f"{t}.safetensors")
        paths[t], originals[t] = str(tmp_path / f"{t}.safetensors"), sd
    return str(tmp_path / "base.safetensors"), paths, originals


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _manifest_figures(path) -> dict[str, dict]:
    """Each task's fidelity figures as the reader parses them, after checking that the manifest is
    strict JSON (no inf or NaN)."""
    with tallpack.open(path) as fam:
        raw = fam.manifest.to_dict()
        json.dumps(raw, allow_nan=False)
        return {t.name: t.fidelity for t in fam.manifest.tasks}


@pytest.mark.parametrize("dtype", list(NEAR_MAX), ids=str)
def test_pack_warns_of_tasks_rebuilt_as_inf_naming_task_and_tensor(tmp_path, caplog, dtype) -> None:
    base, tasks, _ = overflowing_family(tmp_path, dtype)
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, out)
    [record] = [r for r in caplog.records if "rebuild as inf" in r.getMessage()]
    msg = record.getMessage()
    assert msg.startswith("2 tensor(s) rebuild as inf or NaN where the original is finite")
    assert "task 'a' tensor 'w' (2 elements)" in msg and "task 'b' tensor 'w' (2 elements)" in msg
    assert "'c'" not in msg and "'v'" not in msg and "--exact or --fidelity" in msg
    figures = _manifest_figures(out)
    assert figures["a"]["overflow"] == figures["b"]["overflow"] == 2 and "overflow" not in figures["c"]
    with tallpack.open(out) as fam:  # the reader gives what spec 6.1.1 defines: inf, as said
        assert int((~torch.isfinite(fam.get_tensor("a", "w").float())).sum()) == 2
    text = subprocess.run([sys.executable, "-m", "tallpack", "inspect", str(out)], capture_output=True,
                          text=True).stdout
    assert "rebuilt as inf or NaN where the original is finite (the dtype's range overflows): a 2 elements, " \
           "b 2 elements" in text


def test_a_member_of_a_group_is_named_not_its_group(tmp_path, caplog) -> None:
    base, tasks, _ = overflowing_family(tmp_path, torch.float16)
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, out)  # w and v: small tensors, stored as one group
    with tallpack.open(out) as fam:
        assert any(e.members for e in fam.manifest.tensors)
    [record] = [r for r in caplog.records if "rebuild as inf" in r.getMessage()]
    assert "tensor 'w' (2 elements)" in record.getMessage() and "tallpack.group" not in record.getMessage()


def test_a_family_within_range_packs_without_the_warning(tmp_path, caplog) -> None:
    base, tasks, _ = overflowing_family(tmp_path, torch.float16)
    for t in tasks:  # every task as c: tau_MTL = 3 x 30000 on w, but no mask is set there
        save_file({"w": torch.tensor([1.0, -2.0, 0.5, 0.0]).half(), "v": torch.ones(4).half()}, tasks[t])
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, tmp_path / "fam.tallpack")
    assert not [r for r in caplog.records if "rebuild as inf" in r.getMessage()]
    assert all("overflow" not in f for f in _manifest_figures(tmp_path / "fam.tallpack").values())


@pytest.mark.parametrize("dtype", list(NEAR_MAX), ids=str)
def test_fidelity_one_gives_every_task_bit_for_bit(tmp_path, caplog, dtype) -> None:
    base, tasks, originals = overflowing_family(tmp_path, dtype)
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, out, fidelity=1.0)
    assert not [r for r in caplog.records if "rebuild as inf" in r.getMessage()]
    figures = _manifest_figures(out)
    with tallpack.open(out) as fam:
        for t, sd in originals.items():
            for k, x in sd.items():
                assert torch.equal(_bits(fam.get_tensor(t, k)), _bits(x)), (t, k)
            assert figures[t]["weight"] == 1.0 and "overflow" not in figures[t]


@pytest.mark.parametrize("dtype", list(NEAR_MAX), ids=str)
def test_fidelity_target_is_met_with_the_overflow_mended(tmp_path, dtype) -> None:
    base, tasks, originals = overflowing_family(tmp_path, dtype)
    out = tmp_path / "fam.tallpack"
    tallpack.pack(base, tasks, out, fidelity=0.99)
    figures = _manifest_figures(out)
    with tallpack.open(out) as fam:
        for t, sd in originals.items():
            err = sq = 0.0
            for k, x in sd.items():
                got = fam.get_tensor(t, k).double()
                assert bool(torch.isfinite(got).all()), (t, k)
                err += float(((got - x.double()) ** 2).sum())
                sq += float((x.double() ** 2).sum())
            assert 1 - math.sqrt(err / sq) >= 0.99 - 1e-9, t
            assert figures[t]["weight"] >= 0.99 and math.isfinite(figures[t]["weight_tall"])


def test_a_budget_too_small_to_mend_every_task_writes_finite_figures(tmp_path, caplog) -> None:
    base, tasks, _ = overflowing_family(tmp_path, torch.float16)
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, out, budget=150)  # room for about one task's correction
    figures = _manifest_figures(out)
    left = {t for t, f in figures.items() if f.get("overflow")}
    assert all(math.isfinite(v) for f in figures.values() for v in f.values() if v is not None)
    warned = [r.getMessage() for r in caplog.records if "rebuild as inf" in r.getMessage()]
    assert bool(warned) == bool(left) and all(f"task {t!r} tensor 'w'" in warned[0] for t in left)
    assert all(figures[t]["weight"] < 0.5 for t in left)  # not read as fine


def test_with_the_exact_tier_the_warning_says_how_to_read_the_originals(tmp_path, caplog) -> None:
    base, tasks, originals = overflowing_family(tmp_path, torch.float16)
    out = tmp_path / "fam.tallpack"
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, out, exact=True)
    [record] = [r for r in caplog.records if "rebuild as inf" in r.getMessage()]
    assert "task 'a' tensor 'w' (2 elements)" in record.getMessage() and "exact=True" in record.getMessage()
    with tallpack.open(out) as fam:
        assert torch.equal(_bits(fam.get_tensor("a", "w", exact=True)), _bits(originals["a"]["w"]))
