"""A lossy read of a large ``tall-derived-merged`` tensor where the reader's cache would not keep
its merged vector (``cache_bytes=0``, or a budget under its float32 bytes): tau_MTL derived a run
at a time beside the task's output (``derived_merged.task_in_runs``), never whole, each task's
original rebuilt once. The same bits and the same errors as the read that derives it whole (an
archive opened with the default cache, which keeps it for the next task).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import tallpack
from tallpack import reader
from tallpack.encodings import exact
from tallpack.errors import TallpackError

from test_exact_read_runs import _bits, _family, _flip

NAME = "big.weight"


def _pack(d: Path, monkeypatch, dtype: torch.dtype, tasks: int, merge: str, chunk: int) -> Path:
    """A base and ``tasks`` fine-tunes of a tensor of about five chunks (the last a short one) and a
    small one, packed exact with every mask derived: ``big.weight`` is ``tall-derived-merged``."""
    paths = _family(d, dtype, tasks, n=5 * chunk + 808, seed=tasks)
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    out = d / "a.tallpack"
    tallpack.pack(d / "base.safetensors", paths, out, exact=True, chunk_elements=chunk, merge=merge, overwrite=True,
                  threads=1)
    with tallpack.open(out) as a:
        entry = next(e for e in a.manifest.tensors if e.name == NAME)
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    return out


class _Counts:
    """Large tensors read in runs; counts of ``big.weight``'s whole merged derivations, of run-wise
    task reads and of runs of an original rebuilt."""

    def __init__(self, monkeypatch, chunk: int, run: int):
        self.whole = self.task = self.runs = 0
        monkeypatch.setattr(exact, "RUNS_FROM", chunk)
        monkeypatch.setattr(exact, "RUN_ELEMENTS", run)
        for name in ("rebuild_merged", "task_in_runs"):
            fn = getattr(reader, name)

            def counted(*args, _fn=fn, _name=name, **kw):
                if _name == "rebuild_merged":
                    self.whole += args[1].name == NAME
                else:
                    self.task += 1
                return _fn(*args, **kw)
            monkeypatch.setattr(reader, name, counted)
        original_run = exact.Original.run

        def run_counted(original, *args, **kw):
            self.runs += 1
            return original_run(original, *args, **kw)
        monkeypatch.setattr(exact.Original, "run", run_counted)


def _outcome(fn) -> tuple:
    try:
        return ("ok", _bits(fn()))
    except TallpackError as e:
        return (type(e), str(e))


@pytest.mark.parametrize("dtype,tasks,merge,chunk,run", [
    (torch.bfloat16, 3, "ta", 4096, 8192),
    (torch.float32, 2, "ties", 2048, 1),
    (torch.float16, 4, "ta", 2560, 3 * 2560),
    (torch.bfloat16, 4, "ties", 4096, 4096),
])
def test_a_read_the_cache_would_not_keep_derives_tau_mtl_a_run_at_a_time(tmp_path, monkeypatch, dtype, tasks,
                                                                         merge, chunk, run):
    path = _pack(tmp_path, monkeypatch, dtype, tasks, merge, chunk)
    counts = _Counts(monkeypatch, chunk, run)
    names = [f"t{i}" for i in range(tasks)]
    with tallpack.open(path) as a:  # the default cache keeps the merged vector: derived whole once
        want = {t: _bits(a.get_tensor(t, NAME)) for t in names}
        want_sd = {k: _bits(v) for k, v in a.state_dict(names[-1]).items()}
    assert counts.whole == 1 and counts.task == 0
    with tallpack.open(path, cache_bytes=0) as a:
        entry = next(e for e in a.manifest.tensors if e.name == NAME)
        refs = [tt.extras["exact"].residual for tt in entry.tasks.values()] + [entry.arrays["base"]]
        n_runs = len(list(exact.runs(a.read_array, refs, NAME)))
        assert n_runs >= 2
        for t in names:
            counts.runs = 0
            assert _bits(a.get_tensor(t, NAME)) == want[t], t
            assert counts.runs == tasks * n_runs  # every task's original rebuilt once, this one's too
        assert {k: _bits(v) for k, v in a.state_dict(names[-1]).items()} == want_sd
    assert counts.whole == 1 and counts.task == tasks + 1  # never derived whole
    # a budget under the merged vector's float32 bytes: the same
    with tallpack.open(path, cache_bytes=4 * len(want[names[0]]) // dtype.itemsize - 8) as a:
        assert [_bits(a.get_tensor(t, NAME)) for t in names] == list(want.values())
    assert counts.whole == 1 and counts.task == 2 * tasks + 1


@pytest.mark.parametrize("damage", ["chunk", "xxh3", "ones"])
@pytest.mark.parametrize("whose", ["t1", "t2"])
def test_a_damaged_archive_raises_the_same_error(tmp_path, monkeypatch, damage, whose):
    """A damaged residual chunk, a wrong hash or a wrong count of set bits, in the task read (t1)
    or another (t2): the same outcome (error class and message, or the bits) as the whole path."""
    chunk = 4096
    path = _pack(tmp_path, monkeypatch, torch.bfloat16, 3, "ta", chunk)
    counts = _Counts(monkeypatch, chunk, 2 * chunk)
    if damage == "chunk":
        with tallpack.open(path) as a:
            c = next(e for e in a.manifest.tensors if e.name == NAME).tasks[whose].extras["exact"].residual.chunks[2]
        _flip(path, c.offset + c.nbytes // 2)

    def read(cache: dict) -> tuple:
        with tallpack.open(path, **cache) as a:
            tt = next(e for e in a.manifest.tensors if e.name == NAME).tasks[whose]
            if damage == "xxh3":
                ex = tt.extras["exact"]
                tt.extras["exact"] = dataclasses.replace(ex, xxh3=ex.xxh3 ^ 1)
            elif damage == "ones":
                tt.params["ones"] += 1
            return _outcome(lambda: a.get_tensor("t1", NAME))

    whole, in_runs = read({}), read({"cache_bytes": 0})
    assert counts.whole == 1 and counts.task == 1
    assert in_runs == whole
    if damage == "ones" and whose == "t2":  # another task's count is not checked by a read of t1
        assert whole[0] == "ok"
    else:
        assert whole[0] != "ok" and path.name in whole[1], whole
        assert f"task {whose!r}" in whole[1], whole
