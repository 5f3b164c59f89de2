"""Review of the twenty-ninth round (exact originals and derived reads a run at a time, the dial
and the exact tier's writing a run of chunks at a time, compiled bitsplit joins): corner cases
found by trying to break it, each pinned here with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tallpack
from tallpack.encodings import exact

CHUNK = 1 << 12
N = 5 * CHUNK + 40  # rows of 8: a 2-d tensor


def _family(d: Path, dtype: torch.dtype) -> dict[str, Path]:
    g = torch.Generator().manual_seed(5)
    base = {"big.weight": (torch.randn(N // 8, 8, generator=g) * 0.02).to(dtype)}
    save_file(base, d / "base.safetensors")
    paths = {}
    for i in range(3):
        paths[f"t{i}"] = d / f"t{i}.safetensors"
        save_file({k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()},
                  paths[f"t{i}"])
    return paths


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("merged", ["derive", "store"])
def test_a_large_derived_tensor_in_one_run_reads_as_rebuilt_whole(tmp_path, monkeypatch, merged):
    """A tensor over RUNS_FROM in a single chunk (``--chunk-elements`` above its size: one run of
    all its elements): the run's reads came back in the tensor's shape, not flat, and the plain
    read (``derived.rebuild_in_runs``) and the merged vector's derivation (``_derived_in_runs``)
    failed with torch's RuntimeError (expand ... the number of sizes provided)."""
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    monkeypatch.setattr(exact, "MERGED_POLICY", merged)
    monkeypatch.setattr(exact, "CANDIDATES", ("base", "zero"))
    tasks = _family(tmp_path, torch.bfloat16)
    out = tmp_path / "a.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, out, exact=True, chunk_elements=8 * CHUNK)
    got = {}
    for start in (1 << 60, CHUNK):  # whole, then in runs (one run: the tensor's one chunk)
        monkeypatch.setattr(exact, "RUNS_FROM", start)
        with tallpack.open(out, cache_bytes=0) as a:
            assert {tt.encoding for tt in a.manifest.tensors[0].tasks.values()} == {
                "tall-derived-merged" if merged == "derive" else "tall-derived"}
            got[start] = ({t: _bits(a.get_tensor(t, "big.weight")) for t in tasks},
                          {t: _bits(a.get_tensor(t, "big.weight", exact=True)) for t in tasks},
                          {k: _bits(v) for k, v in a.merged("consensus-ta", alpha=0.5).items()}, a.verify())
    assert got[CHUNK] == got[1 << 60]
    assert got[CHUNK][1] == {t: _bits(load_file(p)["big.weight"]) for t, p in tasks.items()}


def test_a_remote_derived_plain_read_against_zero_fetches_its_base_with_the_runs(tmp_path, monkeypatch):
    """A ``tall-derived`` entry coded against zero: ``derived.rebuild_in_runs`` read the base a run
    at a time, but fetched only the residual's runs ahead (``exact.runs``: the original's arrays),
    so each run's base was a request of its own: 7 requests for 6 runs, 1 whole (a 1 GB embedding
    from S3: one request per 1M elements)."""
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    monkeypatch.setattr(exact, "MERGED_POLICY", "store")
    monkeypatch.setattr(exact, "CANDIDATES", ("zero",))
    tasks = _family(tmp_path, torch.bfloat16)
    path = tmp_path / "a.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, path, exact=True, chunk_elements=CHUNK)
    url = "memory://r29/a.tallpack"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    got = {}
    for start in (1 << 60, CHUNK):
        monkeypatch.setattr(exact, "RUNS_FROM", start)
        monkeypatch.setattr(exact, "RUN_ELEMENTS", CHUNK)  # six runs
        with tallpack.open(url, cache_bytes=1 << 30) as a:
            assert {tt.encoding for tt in a.manifest.tensors[0].tasks.values()} == {"tall-derived"}
            a.get_tensor("t0", "big.weight")  # the merged vector in the cache
            before = a.source.requests
            got[start] = _bits(a.get_tensor("t1", "big.weight")), a.source.requests - before
    assert got[CHUNK][0] == got[1 << 60][0]
    assert got[CHUNK][1] <= 2, got  # the base's and the residual's runs in one window (1 whole)


_SHORT_OF_MEMORY = r"""
import json, os, resource, sys
import torch, tallpack
from tallpack.encodings import exact
torch.set_num_threads(1)
got = []
for mb, runs, mode in json.loads(sys.argv[2]):  # each case in a child forked after torch's import
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            exact.RUNS_FROM = runs
            a = tallpack.open(sys.argv[1], cache_bytes=0, threads=1)
            held = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (held + (mb << 20), resource.RLIM_INFINITY))
            try:
                a.get_tensor("t1", "big.weight", exact=mode == "exact")
                said = "ok"
            except tallpack.TallpackError as e:
                said = f"{type(e).__name__} {e}"
        except BaseException as e:
            said = f"not a TallpackError: {type(e).__name__}: {e}"
        os.write(w, said.encode())
        os._exit(0)
    os.close(w)
    said = b""
    while part := os.read(r, 1 << 16):
        said += part
    os.close(r)
    got.append([[mb, runs, mode], said.decode(), os.waitpid(pid, 0)[1]])
print(json.dumps(got))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="RLIMIT_AS and /proc/self/statm: Linux")
def test_a_large_tensor_read_short_of_memory_is_an_out_of_memory_error(tmp_path, monkeypatch):
    """``derived.rebuild_in_runs`` ran outside the reader's rebuild that names running out of
    memory: a margin that let the merged vector be read but not the output allocated raised
    torch's RuntimeError (DefaultCPUAllocator: can't allocate memory), not OutOfMemoryError; an
    exact read (``exact.rebuild_exact``, whole or in runs) raised numpy's MemoryError or torch's."""
    import json
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 22, generator=g) * 0.02  # 16 MB: the output and the merged vector
    save_file({"big.weight": base}, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(2):
        tasks[f"t{i}"] = tmp_path / f"t{i}.safetensors"
        save_file({"big.weight": base + 1e-3 * torch.randn(base.shape, generator=g)}, tasks[f"t{i}"])
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    monkeypatch.setattr(exact, "MERGED_POLICY", "store")
    monkeypatch.setattr(exact, "CANDIDATES", ("zero",))
    path = tmp_path / "a.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, path, exact=True, chunk_elements=1 << 18)
    root = Path(tallpack.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]))
    # MB over what the child holds: from nothing spare to the merged vector read and the output not
    cases = [(mb, 1 << 16, "plain") for mb in (14, 18, 22, 26, 30)] + [
        (mb, runs, "exact") for runs in (1 << 16, 1 << 60) for mb in (0, 8)]
    r = subprocess.run([sys.executable, "-c", _SHORT_OF_MEMORY, str(path), json.dumps(cases)], env=env, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {tuple(case): (out, status) for case, out, status in json.loads(r.stdout)}
    for case, (out, status) in got.items():
        assert status == 0 and out.startswith(("ok", "OutOfMemoryError")), (case, out, status, r.stderr[-2000:])
    for mode in ("plain", "exact"):  # (the margins reach it)
        assert any(out.startswith("OutOfMemoryError") for case, (out, _) in got.items() if case[2] == mode), got
