"""The exact tier's remaining waste (the thirtieth round).

``verify`` of an exact archive rebuilds every task's original of a large ``tall-derived-merged``
tensor once, every task's together a run at a time (``originals._Together``): each run fed to its
file's hash, the merged vector derived from the runs and each mask's set bits counted from them (it
was rebuilt three times: the files' hashes, the merged vector, the masks), with the same problems
on a damaged archive.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import tallpack
from tallpack import originals, reader
from tallpack.container import FOOTER
from tallpack.encodings import derived, derived_merged, exact

from conftest import save_in_order
from test_integrity import with_manifest

CHUNK = 1 << 14
N = 5 * CHUNK + 512
BIG = "big.weight"


def _pack(d: Path, monkeypatch, reordered: str | None = None) -> Path:
    """A bfloat16 family, base + 3, its tensors ``tall-derived-merged`` (masks and merged vector
    derived); ``reordered``: that task's file lists its tensors in the other order."""
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    g = torch.Generator().manual_seed(30)
    base = {BIG: (torch.randn(N // 8, 8, generator=g) * 0.02).bfloat16(),
            "small.weight": torch.randn(16, 8, generator=g).bfloat16()}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for i in range(3):
        t = f"t{i}"
        tasks[t] = d / f"{t}.safetensors"
        sd = {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        save_in_order(sd, tasks[t], [BIG, "small.weight"][:: -1 if t == reordered else 1])
    out = d / "a.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, exact=True, chunk_elements=CHUNK)
    with tallpack.open(out) as a:
        entry = next(e for e in a.manifest.tensors if e.name == BIG)
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    return out


def _task(where: str) -> str:
    found = re.search(r"task '(\w+)'", where)
    assert found is not None, where
    return found.group(1)


def _verify(path: Path, monkeypatch, *, large: bool = True) -> tuple[list[str], Counter[str]]:
    """verify's problems, and the elements of each task's original of BIG rebuilt; with ``large``,
    BIG is rebuilt in runs and its originals pass WAITING_BYTES together (else it is read whole,
    its originals held for the masks: each rebuilt once, the code before this round's)."""
    rebuilt: Counter[str] = Counter()
    with monkeypatch.context() as m:
        m.setattr(originals, "WAITING_BYTES", N if large else 1 << 40)
        m.setattr(exact, "RUNS_FROM", CHUNK if large else 1 << 60)
        m.setattr(exact, "RUN_ELEMENTS", 2 * CHUNK)
        run, whole = exact.Original.run, exact.rebuild_exact

        def counted(original, a, b, *args, **kwargs):
            if f"tensor {BIG!r}" in original.where:
                rebuilt[_task(original.where)] += b - a
            return run(original, a, b, *args, **kwargs)

        def counted_whole(read, entry, tt, where):
            if entry.name == BIG and not exact.in_runs(read, entry, [tt]):
                rebuilt[_task(where)] += N
            return whole(read, entry, tt, where)
        m.setattr(exact.Original, "run", counted)
        for module in (exact, derived, derived_merged, reader):
            m.setattr(module, "rebuild_exact", counted_whole)
        with tallpack.open(path, cache_bytes=0) as a:
            return a.verify(), rebuilt


def test_verify_rebuilds_each_original_of_a_large_derived_merged_tensor_once(tmp_path, monkeypatch):
    """Every task's original of BIG rebuilt once (before: three times, the merged vector whole)."""
    path = _pack(tmp_path, monkeypatch)
    problems, rebuilt = _verify(path, monkeypatch)
    assert problems == []
    assert rebuilt == {"t0": N, "t1": N, "t2": N}, rebuilt
    held, rebuilt = _verify(path, monkeypatch, large=False)  # (the count sees the whole path's rebuilds too)
    assert held == [] and rebuilt == {"t0": N, "t1": N, "t2": N}, rebuilt


def _damaged(path: Path, damage: str) -> None:
    """Task t1's entry of BIG damaged: its set bits, its xxh3, or a byte of its residual."""
    raw = bytearray(path.read_bytes())
    m_off, m_len, *_ = FOOTER.unpack(bytes(raw[-FOOTER.size:]))
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(bytes(raw[m_off:m_off + m_len])))
    tt = next(e for e in manifest["tensors"] if e["name"] == BIG)["tasks"]["t1"]
    if damage == "ones":
        tt["ones"] += 1
    elif damage == "xxh3":
        tt["exact"]["xxh3"] ^= 1
    else:
        with tallpack.open(path) as a:
            chunk = next(e for e in a.manifest.tensors if e.name == BIG).tasks["t1"].extras["exact"].residual.chunks[2]
        raw[chunk.offset + chunk.nbytes // 2] ^= 0x10
        path.write_bytes(bytes(raw))
        return
    path.write_bytes(with_manifest(bytes(raw), manifest))


@pytest.mark.parametrize("damage", ["ones", "xxh3", "residual"])
@pytest.mark.parametrize("reordered", [None, "t2"])
def test_verify_of_a_damaged_large_tensor_says_what_it_said(tmp_path, monkeypatch, caplog, damage, reordered):
    """The same problems, in the same words, as a check of the tensor read whole (each task's
    original rebuilt on its own, as before); with a task's file in another order (the tasks do not
    ask for BIG together: each rebuilt on its own) too."""
    path = _pack(tmp_path, monkeypatch, reordered)
    if reordered is None:
        assert _verify(path, monkeypatch)[0] == []
    _damaged(path, damage)
    whole, _ = _verify(path, monkeypatch, large=False)
    with caplog.at_level(logging.DEBUG, logger="tallpack.originals"):
        in_runs, _ = _verify(path, monkeypatch)
    assert in_runs == whole
    # a pass that fails falls back to one task at a time, and says so at debug level (-vv)
    fell_back = [r.getMessage() for r in caplog.records if "one task at a time" in r.getMessage()]
    assert bool(fell_back) == (reordered is None and damage != "ones"), fell_back  # (ones: counted after)
    assert all(f"tensor {BIG!r}" in m for m in fell_back)
    assert len(whole) == 1 and f"tensor {BIG!r}" in whole[0] and "t1" in whole[0], whole
