"""Review of the thirtieth round: ``verify`` of an exact archive whose large ``tall-derived-merged``
tensor is checked at the end (its tasks' files list their tensors in other orders: not rebuilt
together, ``originals._Together``), in a process short of memory; and a damaged file record that
hid a derived mask's wrong set bits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import tallpack
from tallpack.container import FOOTER
from tallpack.encodings import exact

from conftest import save_in_order
from test_exact_r30 import _pack, _verify
from test_memory_errors import verify_short_of_memory
from test_integrity import with_manifest

CHUNK = 1 << 16
N = 32 * CHUNK + 512  # 2M bfloat16 elements: its float32 work (8 MB) passes the small margins
BIG = "big.weight"
MARGINS = [0, 4, 8, 13, 20, 200]


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict[str, Path]:
    """A bfloat16 family, base + 3, its large tensor ``tall-derived-merged``, packed twice: every
    task's file in one order (``together``), and t2's listing its tensors the other way (``apart``)."""
    d = tmp_path_factory.mktemp("r30")
    g = torch.Generator().manual_seed(30)
    base = {BIG: (torch.randn(N // 8, 8, generator=g) * 0.02).bfloat16(),
            "small.weight": torch.randn(16, 8, generator=g).bfloat16()}
    save_file(base, d / "base.safetensors")
    sds = {f"t{i}": {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
           for i in range(3)}
    out = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(exact, "MASK_POLICY", "derive")
        for name, reordered in (("together", None), ("apart", "t2")):
            tasks = {}
            for t, sd in sds.items():
                tasks[t] = d / name / f"{t}.safetensors"
                tasks[t].parent.mkdir(exist_ok=True)
                save_in_order(sd, tasks[t], [BIG, "small.weight"][:: -1 if t == reordered else 1])
            out[name] = d / f"{name}.tallpack"
            tallpack.pack(d / "base.safetensors", tasks, out[name], exact=True, chunk_elements=CHUNK)
            with tallpack.open(out[name]) as a:
                entry = next(e for e in a.manifest.tensors if e.name == BIG)
                assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    return out


@pytest.mark.skipif(not Path("/proc/self/statm").is_file() or sys.platform != "linux",
                    reason="RLIMIT_AS and /proc/self/statm: Linux")
@pytest.mark.parametrize("which", ["together", "apart"])
def test_verify_short_of_memory_raises_out_of_memory(large, which):
    """Short of memory, verify raises OutOfMemoryError naming the archive (never torch's or
    threading's RuntimeError: the large tensor's derived masks checked at the end, a run at a
    time, ran outside ``memory_named``), and returns no problem where it has enough."""
    verify_short_of_memory(large[which], MARGINS, {"tallpack.originals.WAITING_BYTES": N,
                                                 "tallpack.encodings.exact.RUNS_FROM": CHUNK,
                                                 "tallpack.encodings.exact.RUN_ELEMENTS": 2 * CHUNK})


def _ones_and_header(path: Path) -> None:
    """Task t0's entry of BIG says one set bit more than its mask has, and task t1's file record
    says BIG is float16 (not bfloat16: the same bytes), its header's length kept."""
    raw = path.read_bytes()
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    next(e for e in manifest["tensors"] if e["name"] == BIG)["tasks"]["t0"]["ones"] += 1
    record = next(t for t in manifest["tasks"] if t["name"] == "t1")["exact"]["files"][0]
    header = json.loads(record["header"])
    header[BIG]["dtype"] = "F16"
    record["header"] = json.dumps(header, separators=(",", ":")).ljust(len(record["header"]))
    path.write_bytes(with_manifest(raw, manifest))


@pytest.mark.parametrize("large", [False, True])
def test_a_damaged_file_record_does_not_hide_a_masks_set_bits(tmp_path, monkeypatch, large):
    """t1's file record is damaged (its header's dtype for BIG), t0's set bits of BIG too: verify says
    both. Every original of BIG rebuilds, so t0's mask can be derived and checked; it was skipped
    because a problem named the tensor (meant for an original that did not rebuild)."""
    path = _pack(tmp_path, monkeypatch)
    _ones_and_header(path)
    problems, _ = _verify(path, monkeypatch, large=large)
    assert len(problems) == 2, problems
    assert "task 't1'" in problems[0] and "is not float16" in problems[0], problems
    assert "task 't0'" in problems[1] and "set bits" in problems[1], problems


@pytest.mark.parametrize("large", [False, True])
def test_an_unknown_merge_method_is_said_once_naming_the_archive_once(tmp_path, monkeypatch, large):
    """A merge method this tallpack does not know: verify says so for the derived tensors, each line
    naming the archive once (the end's mask check passed a place already naming it, and the reader
    named it again: "a.tallpack: a.tallpack: task ...")."""
    path = _pack(tmp_path, monkeypatch)
    raw = path.read_bytes()
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    manifest["merge"]["method"] = "TA"
    path.write_bytes(with_manifest(raw, manifest))
    problems, _ = _verify(path, monkeypatch, large=large)
    said = [p for p in problems if "merge method 'TA' is unknown" in p]
    assert said, problems
    assert all(p.count(path.name) == 1 for p in said), said
