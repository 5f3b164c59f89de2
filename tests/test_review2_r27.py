"""Review of round 27's input reads (tensors read with preadv into memory of their own) and dial threads.

Each test failed before its fix: the command or file it names is real (torch.save's zip files,
safetensors files), compared bit for bit with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from tallpack.sources import open_source


def _big_endian(src: Path, dst: Path, itemsizes: dict[str, int]) -> None:
    """``src`` (a torch.save zip) as a big-endian machine (s390x) writes it: the ``byteorder``
    record says ``big`` and each storage record's elements are byte-swapped (``itemsizes``: each
    record's element size, by its key)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            key = info.filename.rsplit("/", 1)[-1]
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and key in itemsizes and itemsizes[key] > 1:
                data = np.frombuffer(data, dtype=f"u{itemsizes[key]}").byteswap().tobytes()
            zout.writestr(info.filename, data)


def test_a_big_endian_torch_file_reads_as_torch_load_reads_it(tmp_path: Path) -> None:
    """A file saved on a big-endian machine: torch.load swaps its elements to the machine's order;
    the reads of its tensors did not (float32 1.0 came back as 4.6e-41)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 300, generator=g)  # over 256 KB: a block of the reuse pool
    sd = {"f32": big, "bf16": big[:10].to(torch.bfloat16), "i64": torch.arange(7), "bool": big[0] > 0,
          "view": big[3:40:2, 5:9]}  # a slice of f32's storage at an offset, strided
    torch.save(sd, tmp_path / "le.pt")
    _big_endian(tmp_path / "le.pt", tmp_path / "be.pt", {"0": 4, "1": 2, "2": 8, "3": 1})
    want = torch.load(tmp_path / "be.pt", weights_only=True)
    assert torch.equal(want["f32"], big)  # (the file is what torch reads as the tensors saved)
    src = open_source(tmp_path / "be.pt")
    try:
        for name, t in want.items():
            got = src.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            raw = [x.contiguous().reshape(-1).view(torch.uint8) for x in (got, t)]
            assert torch.equal(*raw), name
    finally:
        src.close()


#: Packs the sharded family in ARGV[1] (run under a limit of open files: ``_pack_limited``).
PACK_LIMITED = r"""
import sys
root = sys.argv[1]
sys.argv = ["tallpack", "pack", "--base", root + "/base", "-o", root + "/out.tallpack", root + "/t0", root + "/t1"]
from tallpack_cli import run
run()
"""


def _sharded_family(d: Path, shards: int) -> None:
    """A base and two tasks, each a folder of ``shards`` safetensors shards and their index."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(8, 8, generator=g) for i in range(shards)}
    for m in ("base", "t0", "t1"):
        (d / m).mkdir()
        sd = base if m == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        where = {}
        for i, (k, v) in enumerate(sd.items()):
            where[k] = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: v}, d / m / where[k], metadata={"format": "pt"})
        (d / m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))


def _pack_limited(d: Path, soft: int, hard: int):
    """The pack of ``PACK_LIMITED`` in a process that may open ``soft`` files (``hard`` at most),
    set before it starts (as ``ulimit -n``: no module of the process imported before)."""
    import os
    import resource
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", PACK_LIMITED, str(d)], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))


def test_a_family_of_more_files_than_the_open_files_limit_says_so_in_one_line(tmp_path: Path) -> None:
    """Every input file is held open while pack runs: 3 x 40 shards under ``ulimit -n 64`` ran out of
    file descriptors, said as 'not a readable safetensors file' (safe_open's failed open)."""
    _sharded_family(tmp_path, 40)
    r = _pack_limited(tmp_path, 64, 64)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("packing")]
    assert len(lines) == 1, r.stderr
    assert "too many open files" in lines[0] and "ulimit -n, is 64;" in lines[0], lines
    assert "not a readable" not in lines[0], lines


def test_a_soft_open_files_limit_below_the_hard_one_is_raised_for_the_inputs(tmp_path: Path) -> None:
    """Before the inputs were read into memory of their own, such a family packed under a soft limit
    of 64 (safe_open's mappings hold no descriptor); the soft limit is now raised towards the hard one."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 512:
        import pytest

        pytest.skip(f"the hard limit of open files is {hard}")
    _sharded_family(tmp_path, 40)
    r = _pack_limited(tmp_path, 64, hard)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.tallpack").is_file()


def test_inputs_read_where_os_has_no_pread(tmp_path: Path, monkeypatch) -> None:
    """os.pread and os.preadv are missing on Windows (and preadv on macOS before 11): the reads of
    safetensors and PyTorch files fall back to a seek and a read (every tensor failed 'cannot be read')."""
    import os

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {"big": torch.randn(300, 300, generator=g), "small": torch.randn(7, 3, generator=g).to(torch.bfloat16),
          "scalar": torch.tensor(2.5)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({**sd, "t": sd["big"].t()[::2]}, tmp_path / "m.pt")
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    for path in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
        want = torch.load(path, weights_only=True) if path.suffix == ".pt" else sd
        src = open_source(path)
        try:
            for name, t in want.items():
                assert torch.equal(src.get(name), t), (path, name)
        finally:
            src.close()


def test_the_blocks_kept_for_reuse_are_let_go_when_the_inputs_close(tmp_path: Path) -> None:
    """Tensors of 256 KB and up are read into blocks of tensors freed before, up to 64 MB kept: they
    stayed kept for the life of the process after the pack (a 32 MB tensor's block, 32 MB held)."""
    import gc

    from safetensors.torch import save_file

    import tallpack
    from tallpack import sources

    gc.collect()  # (sources other tests let go unclosed)
    g = torch.Generator().manual_seed(2)
    base = {"emb": torch.randn(512, 512, generator=g), "b": torch.randn(5, generator=g)}  # 1 MB
    save_file(base, tmp_path / "base.safetensors")
    for t in range(2):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, tmp_path / f"t{t}.safetensors")
    tallpack.pack(tmp_path / "base.safetensors", {f"t{t}": tmp_path / f"t{t}.safetensors" for t in range(2)},
                  tmp_path / "out.tallpack")
    gc.collect()
    assert sources._freed_bytes[0] == 0 and not any(sources._freed.values())
    src = open_source(tmp_path / "t0.safetensors")  # (reuse within an open source: still)
    try:
        a = src.get("emb")
        del a
        gc.collect()
        assert sources._freed_bytes[0] == 512 * 512 * 4
        again = src.get("emb")  # (in the block given back)
        other = open_source(tmp_path / "t0.safetensors")
        try:
            assert torch.equal(again, other.get("emb"))
        finally:
            other.close()
    finally:
        src.close()
    assert sources._freed_bytes[0] == 0 and not any(sources._freed.values())
