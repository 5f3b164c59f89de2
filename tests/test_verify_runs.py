"""``verify`` of an exact archive whose tensor's originals, every task's together, pass
``originals.WAITING_BYTES``: they are not held for the derived masks; each task's mask is checked
at the end a run at a time (``derived.rebuild_in_runs``), with the problems a whole check finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import tallpack
from tallpack import originals
from tallpack.container import FOOTER
from tallpack.encodings import exact

from test_integrity import with_manifest

CHUNK = 1 << 14
N = 5 * CHUNK + 512


def _pack(d: Path, monkeypatch) -> Path:
    """A bfloat16 family (its tensors ``tall-derived-merged``: masks and merged vector derived)."""
    monkeypatch.setattr(exact, "MASK_POLICY", "derive")
    g = torch.Generator().manual_seed(5)
    base = {"big.weight": (torch.randn(N // 8, 8, generator=g) * 0.02).bfloat16(),
            "small.weight": torch.randn(16, 8, generator=g).bfloat16()}
    save_file(base, d / "base.safetensors")
    tasks = {}
    for i in range(3):
        tasks[f"t{i}"] = d / f"t{i}.safetensors"
        save_file({k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()},
                  tasks[f"t{i}"])
    out = d / "a.tallpack"
    tallpack.pack(d / "base.safetensors", tasks, out, exact=True, chunk_elements=CHUNK)
    with tallpack.open(out) as a:
        entry = next(e for e in a.manifest.tensors if e.name == "big.weight")
        assert {tt.encoding for tt in entry.tasks.values()} == {"tall-derived-merged"}
    return out


def _damage_ones(path: Path, task: str) -> None:
    raw = path.read_bytes()
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))
    next(e for e in manifest["tensors"] if e["name"] == "big.weight")["tasks"][task]["ones"] += 1
    path.write_bytes(with_manifest(raw, manifest))


def _verify(path: Path, monkeypatch, *, large: bool) -> tuple[list[str], int]:
    """verify's problems; with ``large``, the tensor's originals pass WAITING_BYTES and it is read in
    runs; how many runs of originals were rebuilt."""
    count = [0]
    with monkeypatch.context() as m:
        m.setattr(originals, "WAITING_BYTES", N if large else 1 << 40)
        m.setattr(exact, "RUNS_FROM", CHUNK if large else 1 << 60)
        m.setattr(exact, "RUN_ELEMENTS", 2 * CHUNK)
        run = exact.Original.run

        def counted(original, *a, **k):
            count[0] += 1
            return run(original, *a, **k)
        m.setattr(exact.Original, "run", counted)
        with tallpack.open(path, cache_bytes=0) as a:
            return a.verify(), count[0]


@pytest.mark.parametrize("damaged", [None, "t1"])
def test_a_large_tensors_masks_are_checked_in_runs_with_the_same_verdict(tmp_path, monkeypatch, damaged):
    path = _pack(tmp_path, monkeypatch)
    if damaged:
        _damage_ones(path, damaged)
    held, held_runs = _verify(path, monkeypatch, large=False)
    in_runs, runs = _verify(path, monkeypatch, large=True)
    assert held_runs == 0 and runs > 0
    assert in_runs == held
    if damaged:
        assert len(held) == 1 and "tensor 'big.weight'" in held[0] and "task 't1'" in held[0], held
    else:
        assert held == []


def test_originals_past_the_bound_are_not_held(tmp_path, monkeypatch):
    """The waiting originals of a tensor whose tasks' copies pass WAITING_BYTES stay empty."""
    path = _pack(tmp_path, monkeypatch)
    most = [0]
    saw = originals._Masks.saw

    def watched(self, task, name, theta):
        saw(self, task, name, theta)
        most[0] = max(most[0], sum(x.numel() * x.element_size() for g in self.waiting.values() for x in g.values()))
    monkeypatch.setattr(originals._Masks, "saw", watched)
    monkeypatch.setattr(originals, "WAITING_BYTES", N)
    with tallpack.open(path) as a:
        assert a.verify() == []
    assert 0 < most[0] < N  # the small tensor's originals waited for the third task's; no big one did


def test_verify_of_an_archive_opened_with_one_thread_starts_none(tmp_path, monkeypatch):
    """``threads=1``: no read-ahead thread (under a memory limit a thread's start may abort the
    process in glibc, which no library can turn into an error)."""
    import threading

    path = _pack(tmp_path, monkeypatch)
    started: list[str] = []
    start = threading.Thread.start

    def counted(self):
        started.append(self.name)
        return start(self)
    monkeypatch.setattr(threading.Thread, "start", counted)
    with tallpack.open(path, threads=1) as a:
        assert a.verify() == []
    assert not [n for n in started if n.startswith("tallpack")], started
    with tallpack.open(path, threads=2) as a:  # (the test can fail: with two, the read-ahead starts)
        assert a.verify() == []
    assert [n for n in started if n.startswith("tallpack-ahead")], started
