"""The exact tier read a run of the residual's chunks at a time (``exact.RUNS_FROM``).

A task's original of a large tensor is rebuilt run by run straight into its output, its xxh3
computed over the runs; a ``tall-derived-merged`` tensor's merged vector (and its masks) is
derived run by run from every task's run of its original. The tensors are the bits of the whole
tensor's rebuild, and a damaged residual or a wrong hash raises the same error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tallpack
from tallpack.encodings import Use, derived, exact
from tallpack.encodings.derived import merged_source
from tallpack.errors import IntegrityError, TallpackError

from conftest import anon_growth, big_family

CHUNK = 1 << 16
N = 5 * CHUNK + 1000  # six chunks, the last a short one
WHOLE = 1 << 60  # RUNS_FROM: every tensor rebuilt whole


def _family(d: Path, dtype: torch.dtype, tasks: int = 3, n: int = N, seed: int = 3) -> dict[str, Path]:
    """``base.safetensors`` and ``t0..`` in ``d``: a tensor of ``n`` elements (six chunks) and a small one."""
    g = torch.Generator().manual_seed(seed)
    base = {"big.weight": (torch.randn(n // 8, 8, generator=g) * 0.02).to(dtype),
            "other.weight": torch.randn(64, 32, generator=g).to(dtype)}
    save_file(base, d / "base.safetensors")
    paths = {}
    for i in range(tasks):
        sd = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        paths[f"t{i}"] = d / f"t{i}.safetensors"
        save_file(sd, paths[f"t{i}"])
    return paths


def _pack(d: Path, monkeypatch, dtype: torch.dtype, *, policy: str, candidates=exact.REFERENCES,
          merge: str = "ta") -> tuple[Path, dict[str, Path]]:
    monkeypatch.setattr(exact, "MASK_POLICY", policy)
    monkeypatch.setattr(exact, "CANDIDATES", candidates)
    tasks = _family(d, dtype)
    out = d / "a.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, exact=True, chunk_elements=CHUNK, merge=merge, overwrite=True)
    return out, tasks


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _big(path: Path):
    with tallpack.open(path) as a:
        return next(e for e in a.manifest.tensors if e.name == "big.weight")


class _Runs:
    """Reads in runs (RUNS_FROM under the tensor, RUN_ELEMENTS two chunks: three runs), counting them."""

    def __init__(self, monkeypatch, on: bool):
        self.count = 0
        monkeypatch.setattr(exact, "RUNS_FROM", CHUNK if on else WHOLE)
        monkeypatch.setattr(exact, "RUN_ELEMENTS", 2 * CHUNK)
        run = exact.Original.run

        def counted(original, *args, **kw):
            self.count += 1
            return run(original, *args, **kw)
        monkeypatch.setattr(exact.Original, "run", counted)


def _reads(path: Path, tasks: list[str]) -> dict:
    """Every read the run-wise path serves: exact and plain tensors, verify, a merged model."""
    with tallpack.open(path, cache_bytes=0) as a:
        got: dict = {"verify": a.verify()}
        for t in tasks:
            got[t, "exact"] = {k: _bits(v) for k, v in a.state_dict(t, exact=True).items()}
            got[t, "get"] = _bits(a.get_tensor(t, "big.weight", exact=True))
            got[t, "plain"] = {k: _bits(v) for k, v in a.state_dict(t).items()}
        got["merged"] = {k: _bits(v) for k, v in a.merged(alpha=0.5).items()}
    return got


def _both(monkeypatch, path: Path, tasks: list[str], read=_reads) -> tuple:
    """What ``read`` gives rebuilt whole, then in runs; how many runs were rebuilt."""
    with monkeypatch.context() as m:
        _Runs(m, on=False)
        whole = read(path, tasks)
    with monkeypatch.context() as m:
        runs = _Runs(m, on=True)
        in_runs = read(path, tasks)
    return whole, in_runs, runs.count


@pytest.mark.parametrize("dtype,reference", [(torch.float32, "tall"), (torch.bfloat16, "base"),
                                             (torch.float16, "zero"), (torch.bfloat16, "tall")])
def test_each_reference_rebuilt_in_runs_is_the_whole_rebuild(tmp_path, monkeypatch, dtype, reference):
    path, tasks = _pack(tmp_path, monkeypatch, dtype, policy="store", candidates=(reference,), merge="ties")
    assert {tt.extras["exact"].reference for tt in _big(path).tasks.values()} == {reference}
    whole, in_runs, count = _both(monkeypatch, path, list(tasks))
    assert count >= 3 * len(tasks) and in_runs == whole and whole["verify"] == []
    for t, p in tasks.items():
        assert whole[t, "exact"] == {k: _bits(v) for k, v in load_file(p).items()}


@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_derived_merged_vector_in_runs_is_the_whole_one(tmp_path, monkeypatch, dtype, merge):
    """Every mask derived: ``tall-derived-merged``; plain reads, exact reads, verify, merged
    models (TA's, and a consensus one: the masks of ``task_masks``) and stats."""
    path, tasks = _pack(tmp_path, monkeypatch, dtype, policy="derive", merge=merge)
    assert {tt.encoding for tt in _big(path).tasks.values()} == {"tall-derived-merged"}

    def read(p: Path, names: list[str]) -> dict:
        got = _reads(p, names)
        with tallpack.open(p, cache_bytes=0) as a:
            got["consensus"] = {k: _bits(v) for k, v in a.merged(f"consensus-{merge}", alpha=0.5).items()}
            got["stats"] = json.dumps(tallpack.stats.compute(a).to_dict(), sort_keys=True, default=str)
        return got

    whole, in_runs, count = _both(monkeypatch, path, list(tasks), read)
    assert count >= 3 * len(tasks) and whole["verify"] == []
    assert in_runs == whole
    for t, p in tasks.items():
        assert whole[t, "exact"] == {k: _bits(v) for k, v in load_file(p).items()}


@pytest.mark.parametrize("merged,dtype", [("derive", torch.bfloat16), ("store", torch.float32)])
def test_a_derived_entry_rebuilt_from_runs_of_its_base_and_residual(tmp_path, monkeypatch, merged, dtype):
    """``derived.rebuild_in_runs`` (for the reader's plain read: the merged vector alone read
    whole) gives ``get_tensor``'s bits, for ``tall-derived-merged`` and ``tall-derived`` entries."""
    monkeypatch.setattr(exact, "MERGED_POLICY", merged)
    path, tasks = _pack(tmp_path, monkeypatch, dtype, policy="derive", candidates=("base", "zero"))
    encodings = {tt.encoding for tt in _big(path).tasks.values()}
    assert encodings == {"tall-derived-merged" if merged == "derive" else "tall-derived"}
    with monkeypatch.context() as m:
        runs = _Runs(m, on=True)
        with tallpack.open(path, cache_bytes=0) as a:
            entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
            for t in tasks:
                got = derived.rebuild_in_runs(a.read_array, entry, entry.tasks[t], f"task {t!r}")
                assert got is not None and _bits(got) == _bits(a.get_tensor(t, "big.weight")), t
            other = next(e for e in a.manifest.tensors if e.name == "other.weight")
            assert derived.rebuild_in_runs(a.read_array, other, other.tasks["t0"], "t0") is None  # a small one
    assert runs.count >= 3 * len(tasks)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _error(fn) -> tuple[type, str]:
    with pytest.raises(TallpackError) as e:
        fn()
    return type(e.value), str(e.value)


@pytest.mark.parametrize("policy", ["store", "derive"])
def test_a_damaged_residual_chunk_raises_the_same_error(tmp_path, monkeypatch, policy):
    path, tasks = _pack(tmp_path, monkeypatch, torch.bfloat16, policy=policy, candidates=("base",))
    chunk = _big(path).tasks["t1"].extras["exact"].residual.chunks[3]
    _flip(path, chunk.offset + chunk.nbytes // 2)

    def read(p: Path, names: list[str]) -> dict:
        with tallpack.open(p, cache_bytes=0) as a:
            got = {"exact": _error(lambda: a.get_tensor("t1", "big.weight", exact=True)),
                   "verify": a.verify()}
            if policy == "derive":  # every task's plain read derives the merged vector from t1's original
                got["plain"] = _error(lambda: a.get_tensor("t0", "big.weight"))
        return got

    whole, in_runs, _ = _both(monkeypatch, path, list(tasks), read)
    assert in_runs == whole
    assert "chunk 3" in whole["exact"][1] and whole["verify"]


@pytest.mark.parametrize("policy", ["store", "derive"])
def test_a_wrong_hash_raises_the_same_error_after_the_last_run(tmp_path, monkeypatch, policy):
    path, tasks = _pack(tmp_path, monkeypatch, torch.float16, policy=policy, candidates=("zero",))

    def read(p: Path, names: list[str]) -> dict:
        with tallpack.open(p, cache_bytes=0) as a:
            tt = next(e for e in a.manifest.tensors if e.name == "big.weight").tasks["t2"]
            ex = tt.extras["exact"]
            tt.extras["exact"] = dataclasses.replace(ex, xxh3=ex.xxh3 ^ 1)
            got = {"exact": _error(lambda: a.get_tensor("t2", "big.weight", exact=True))}
            if policy == "derive":
                got["plain"] = _error(lambda: a.get_tensor("t0", "big.weight"))
        return got

    whole, in_runs, count = _both(monkeypatch, path, list(tasks), read)
    assert in_runs == whole and count >= 3
    assert whole["exact"][0] is IntegrityError and "task 't2'" in whole["exact"][1], whole
    assert "does not match the original's hash" in whole["exact"][1]
    if policy == "derive":
        assert whole["plain"][0] is IntegrityError and "task 't2'" in whole["plain"][1], whole


def test_reads_from_a_remote_archive_fetch_a_window_of_runs_at_once(tmp_path, monkeypatch):
    """fsspec's memory filesystem: the runs' chunks come in one coalesced fetch (a window of
    PREFETCH_BYTES), at most a request for each array read, not one for each array and run (3)."""
    fsspec = pytest.importorskip("fsspec")
    path, tasks = _pack(tmp_path, monkeypatch, torch.bfloat16, policy="derive")
    url = "memory://runs/a.tallpack"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())

    def read(p: Path, names: list[str]) -> dict:
        with tallpack.open(url, cache_bytes=0) as a:
            entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
            got: dict = {"requests": []}
            for t in names:  # the base and the task's residual
                before = a.source.requests
                got[t] = _bits(a.get_tensor(t, "big.weight", exact=True))
                got["requests"].append(a.source.requests - before)
            before = a.source.requests  # the base and every task's residual
            derived = merged_source(entry)
            assert derived is not None
            got["merged"] = _bits(a.read_array(derived, "merged", Use.SHARED_INPUT))
            got["requests"].append(a.source.requests - before)
        return got

    whole, in_runs, count = _both(monkeypatch, path, list(tasks), read)
    assert count == 3 * 2 * len(tasks)
    requests = in_runs.pop("requests")
    assert requests <= [2] * len(tasks) + [len(tasks) + 1], requests
    whole.pop("requests")
    assert in_runs == whole


def _growth(archive: Path, work: str) -> dict[str, float]:
    """The anon growth (MB) of ``work`` on ``fam`` in a fresh process, rebuilt whole and in runs."""
    grown = {}
    for start in (WHOLE, exact.RUNS_FROM):
        setup = (f"from tallpack.encodings import exact; exact.RUNS_FROM = {start}\n"
                 f"fam = tallpack.open({str(archive)!r}, cache_bytes=0, threads=1)")
        grown["whole" if start == WHOLE else "runs"] = round(anon_growth(setup, work) / (1 << 20), 1)
    return grown


def test_an_exact_read_of_a_large_tensor_holds_its_output_and_a_run(tmp_path):
    """One 32 MB float32 tensor, base + 3 tasks, chunks of 1M elements (runs of one):
    ``state_dict(t, exact=True)``."""
    tasks = big_family(tmp_path)
    archive = tmp_path / "x.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, archive, exact=True, threads=1, chunk_elements=1 << 20)
    grown = _growth(archive, "sd = fam.state_dict('t1', exact=True)")
    print(json.dumps(grown))  # {"whole": 194.2, "runs": 45.2}
    mb = 32
    assert grown["whole"] > 4 * mb, grown  # (the whole rebuild's copies: the measure sees them)
    assert grown["runs"] < grown["whole"] - 2 * mb, grown
    assert grown["runs"] < 2 * mb + 24, grown  # the output and a run's buffers (1M elements)


def test_a_plain_read_of_a_derived_merged_tensor_holds_no_task_original_whole(tmp_path, monkeypatch):
    """One 32 MB bfloat16 tensor, base + 3 tasks, chunks of 1M elements, every mask derived
    (``tall-derived-merged``):
    ``get_tensor(t, name)`` derives the merged vector from every task's original."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(16 << 20, generator=g) * 0.02
    save_file({"big.weight": big.to(torch.bfloat16)}, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(3):
        tasks[f"t{i}"] = str(tmp_path / f"t{i}.safetensors")
        save_file({"big.weight": (big + 1e-3 * torch.randn(big.shape, generator=g)).to(torch.bfloat16)}, tasks[f"t{i}"])
    archive = tmp_path / "x.tallpack"
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    tallpack.pack(tmp_path / "base.safetensors", tasks, archive, exact=True, threads=1, chunk_elements=1 << 20)
    assert {tt.encoding for tt in _big(archive).tasks.values()} == {"tall-derived-merged"}
    grown = _growth(archive, "t = fam.get_tensor('t1', 'big.weight')")
    print(json.dumps(grown))  # {"whole": 369.3, "runs": 193.3}
    mb = 32
    # whole: the three originals, the merged vector (float32: 2 x), the rebuild's copies
    assert grown["runs"] < grown["whole"] - 3 * mb, grown
