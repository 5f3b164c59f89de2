"""The fidelity dial's peak memory on a family: a tensor held whole whose measurement would work in
more than ``dial.RUNS_FROM`` bytes is measured and corrected a run at a time, as a streamed one is
(``Dial._by_runs``); the run-wise work widens the base a run at a time (``_Parts.widened``), not
into a float32 copy of the whole; and a tensor whose corrections are all exact makes no TALL parts
for them. The same archive bytes as the whole path's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tallpack
from tallpack import dial, inputs, memory

from conftest import anon_growth, dial_family

CHUNK = 1000  # runs of 8 chunks
N = 23 * CHUNK + 37


def _pack(d: Path, base: Path, tasks: dict[str, Path], name: str, **kw) -> bytes:
    tallpack.pack(base, tasks, d / name, chunk_elements=CHUNK, overwrite=True, **kw)
    return (d / name).read_bytes()


class _Calls:
    """Which tensors the dial measured whole (``_measure``) and a run at a time, and how many times a
    whole float32 base was made (``_Parts.base32``)."""

    def __init__(self, monkeypatch):
        self.whole: list[str] = []
        self.runs: list[str] = []
        self.widened = 0
        measure, streamed = dial.Dial._measure, dial.Dial._measure_streamed
        base32 = dial._Parts.base32.func

        def whole(this, ctx, item, *a, **k):
            self.whole.append(item.name)
            return measure(this, ctx, item, *a, **k)

        def runs(this, ctx, item, *a, **k):
            self.runs.append(item.name)
            return streamed(this, ctx, item, *a, **k)

        def widened(this):
            self.widened += 1
            return base32(this)

        monkeypatch.setattr(dial.Dial, "_measure", whole)
        monkeypatch.setattr(dial.Dial, "_measure_streamed", runs)
        monkeypatch.setattr(dial._Parts, "base32", property(widened))  # (counted on every ask)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("dial_opts", [{"fidelity": 0.999}, {"budget": 3.0}, {"fidelity": 0.9, "corrections": ("qtau",)}])
def test_held_tensor_by_runs_is_the_same_bytes(tmp_path, monkeypatch, threads, dtype, merge, dial_opts):
    """A held tensor past ``RUNS_FROM`` measured and corrected a run at a time: the same archive as
    measured whole (``RUNS_FROM`` out of reach: the path before), every task of it run-wise."""
    base, tasks = dial_family(tmp_path, dtype, N, seed=3, spikes=100)
    kw = dict(merge=merge, threads=threads, **dial_opts)
    calls = _Calls(monkeypatch)
    monkeypatch.setattr(dial, "RUNS_FROM", 1 << 60)
    whole = _pack(tmp_path, base, tasks, "whole.tallpack", **kw)
    assert calls.whole.count("big.weight") == len(tasks) and not calls.runs
    calls.whole.clear()
    monkeypatch.setattr(dial, "RUNS_FROM", 0)
    runs = _pack(tmp_path, base, tasks, "runs.tallpack", **kw)
    assert calls.runs.count("big.weight") >= len(tasks) and "big.weight" not in calls.whole
    assert "other.weight" in calls.whole  # (a tensor of one run: measured whole all the same)
    assert runs == whole
    with tallpack.open(tmp_path / "runs.tallpack") as a:
        stored = {k for rec in a.manifest.stats["dial"]["tasks"].values() for k in rec["stored"]}
    assert stored - {"tall"}, stored
    if "corrections" in dial_opts and merge == "ta":  # (every task qtau: the merged vector dropped, a run at a time)
        assert a.manifest.stats["dial"]["merged_dropped"] == 2


@pytest.mark.parametrize("opts", [{"fidelity": 0.999}, {"fidelity": 0.9, "corrections": ("qtau",)},
                                  {"fidelity": 0.9995, "corrections": ("sparse", "quant8")}])
def test_streamed_tensor_holds_no_float32_base(tmp_path, monkeypatch, opts):
    """A streamed bfloat16 tensor's measurement, masks, qtau codes and corrections widen its base a
    run at a time: no whole float32 copy is made (a tensor held whole, measured whole, makes one)."""
    base, tasks = dial_family(tmp_path, torch.bfloat16, N, seed=3, spikes=100)
    calls = _Calls(monkeypatch)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    _pack(tmp_path, base, tasks, "a.tallpack", **opts)
    assert calls.runs and calls.widened == 0
    if "corrections" in opts and opts["corrections"] == ("qtau",):
        with tallpack.open(tmp_path / "a.tallpack") as a:
            assert a.manifest.stats["dial"]["merged_dropped"] == 2  # (big.weight's too)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 1 << 60)
    _pack(tmp_path, base, tasks, "b.tallpack", **opts)
    assert calls.widened > 0
    assert (tmp_path / "a.tallpack").read_bytes() == (tmp_path / "b.tallpack").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{"fidelity": 0.999, "merge": "ties", "threads": 2},
                                  {"fidelity": 0.9, "corrections": ("qtau",)}, {"budget": 3.0, "threads": 2}])
def test_runs_within_a_chunk_are_the_same(tmp_path, monkeypatch, dtype, opts):
    """Runs shorter than a chunk (``RUN_ELEMENTS`` 640, chunks of 1000: each chunk's pieces held
    until it is whole, for its stored bytes and the exact residual's permutation): every figure of
    every task's measurement the same as measured whole, and the same archive."""
    base, tasks = dial_family(tmp_path, dtype, N, seed=3, spikes=100)
    monkeypatch.setattr(dial, "RUN_ELEMENTS", 640)
    got: dict[str, dict] = {"whole": {}, "runs": {}}
    measure, streamed = dial.Dial._measure, dial.Dial._measure_streamed

    def whole(self, ctx, item, i, *a, **k):
        got["whole"][item.name, i] = m = measure(self, ctx, item, i, *a, **k)
        return m

    def runs(self, ctx, item, i, *a, **k):
        assert dial._run_elements(ctx.chunk_elements) == 640
        got["runs"][item.name, i] = m = streamed(self, ctx, item, i, *a, **k)
        return m

    monkeypatch.setattr(dial.Dial, "_measure", whole)
    monkeypatch.setattr(dial.Dial, "_measure_streamed", runs)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 1 << 60)
    a = _pack(tmp_path, base, tasks, "whole.tallpack", **opts)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    b = _pack(tmp_path, base, tasks, "runs.tallpack", **opts)
    assert a == b
    assert sorted(got["whole"]) == sorted(got["runs"]) and got["runs"]
    for key, w in got["whole"].items():
        r = got["runs"][key]
        assert (w.sq, w.sq_plain, w.scale, w.tall, w.qtaus, w.sizes, w.ladder) == (
            r.sq, r.sq_plain, r.scale, r.tall, r.qtaus, r.sizes, r.ladder), key
    if "corrections" not in opts:  # (the exact residual's bytes weighed, a chunk of pieces at a time)
        assert any(o.kind == "exact" for m in got["runs"].values() for o in m.ladder)


def test_exact_corrections_make_no_tall_parts(tmp_path, monkeypatch):
    """Where every correction of a tensor is exact, its TALL parts are not made for them (for a
    streamed tensor, every task's copy read once more)."""
    base, tasks = dial_family(tmp_path, torch.bfloat16, N, seed=3, spikes=100)
    made: list[str] = []
    whole_parts = dial._whole_parts

    def counted(ctx, item, *a, **k):
        made.append(item.name)
        return whole_parts(ctx, item, *a, **k)

    monkeypatch.setattr(dial, "_whole_parts", counted)
    monkeypatch.setattr(inputs, "HOLD_BYTES", 0)
    _pack(tmp_path, base, tasks, "a.tallpack", fidelity=0.99999, corrections=("exact",))
    with tallpack.open(tmp_path / "a.tallpack") as a:
        stored = a.manifest.stats["dial"]["tasks"]
    assert all(rec["stored"].get("exact") for rec in stored.values()), stored
    assert made.count("big.weight") == 1  # (observed; written by Tall.write and add_exact)


def test_held_tensor_by_runs_memory(tmp_path):
    """A 4 MB bfloat16 tensor held whole (2M elements), base and 3 tasks, fidelity 0.999, two
    threads, ``RUNS_FROM`` 16 MB: measured a run at a time, its two tasks at once no longer work in
    some 35 bytes an element each (the whole path's float64 errors, rebuilds, residuals, candidates)."""
    base, tasks = dial_family(tmp_path, torch.bfloat16, 2 << 20, seed=3, spikes=100)
    setup = f"""
        from pathlib import Path
        from tallpack import dial
        d = Path({str(tmp_path)!r})
        tasks = {{t: d / f"m{{i + 1}}.safetensors" for i, t in enumerate({sorted(tasks)!r})}}
    """
    work = """
        dial.RUNS_FROM = 16 << 20
        tallpack.pack(d / "m0.safetensors", tasks, d / "a.tallpack", chunk_elements=1 << 16, fidelity=0.999,
                      threads=2)
    """
    growth = anon_growth(setup, work)
    # measured whole (``RUNS_FROM`` out of reach, the path before): 264 MB; a run at a time: 120 MB
    assert growth < 190 << 20, growth >> 20


def test_free_pages_given_back_after_large_tensors(tmp_path, monkeypatch):
    """The allocator's free pages are handed back (``memory.give_back``: glibc's ``malloc_trim``) after
    a large tensor's parts, each of its tasks' measurement, and its writing; not after a small one."""
    base, tasks = dial_family(tmp_path, torch.float32, N, seed=3, spikes=100)
    trimmed: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", trimmed.append)
    monkeypatch.setattr(memory, "GIVE_BACK_FROM", N)
    _pack(tmp_path, base, tasks, "a.tallpack", fidelity=0.999)
    assert len(trimmed) == 1 + len(tasks) + 2  # (big.weight's: parts, each task, observed, written)
