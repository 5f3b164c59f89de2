"""An exact unpack of every task decodes each shared array once (round 37): the byte reads behind it
(``originals._Bytes``) keep a base, and a stored merged vector, in the archive's cache, within its
budget, as the tensor reads keep them; the files written are the originals, byte for byte."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.arrays import ArrayRef
from tallpack.encodings import Use, exact
from tallpack.originals import _Bytes

TASKS = 3


def _family(root: Path) -> dict[str, Path]:
    """A base and three fine-tunes as safetensors folders: float32 and bfloat16 tensors, a frozen one."""
    g = torch.Generator().manual_seed(37)
    base = {"a.weight": torch.randn(64, 96, generator=g), "b.weight": torch.randn(80, 64, generator=g).bfloat16(),
            "c.bias": torch.randn(300, generator=g), "frozen": torch.randn(7, 5, generator=g)}
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    tasks = {}
    for t in range(TASKS):
        sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        sd["frozen"] = base["frozen"]
        (root / f"t{t}").mkdir()
        save_file(sd, str(root / f"t{t}" / "model.safetensors"), metadata={"format": "pt"})
        tasks[f"t{t}"] = root / f"t{t}"
    return tasks


@pytest.fixture(scope="module", params=["derived", "stored-masks"])
def packed(request, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The family packed with the exact tier in chunks of 512 elements (runs of several chunks
    below): masks and merged vectors derived (the default), or stored (``--store-masks``, whose
    residuals may be against base + mask * merged)."""
    root = tmp_path_factory.mktemp(f"r37-{request.param}")
    tasks = _family(root)
    kw = {"derive_masks": False} if request.param == "stored-masks" else {}
    tallpack.pack(root / "base", tasks, root / "fam.tallpack", exact=True, chunk_elements=512, **kw)
    return root / "fam.tallpack", tasks


def _shared(fam) -> dict[int, int]:
    """Each shared array an exact rebuild reads (a base, a stored merged vector): its first chunk's
    offset, and its elements."""
    out = {}
    for entry in fam.manifest.tensors:
        for key in ("base", "merged"):
            ref = entry.arrays.get(key)
            if isinstance(ref, ArrayRef) and ref.chunks:
                out[ref.chunks[0].offset] = ref.numel
    return out


def _unpack_counted(archive: Path, out: Path, **open_kw) -> tuple[dict[int, float], dict[int, int]]:
    """Every task unpacked exactly into ``out``; the elements of each shared array the container
    decoded, in whole arrays' worth (1.0: decoded once)."""
    decoded: Counter[int] = Counter()
    with tallpack.open(archive, **open_kw) as fam:
        shared = _shared(fam)
        read = fam._c.read_array

        def counted(ref, where, start=0, stop=None, *rest):
            if ref.chunks and ref.chunks[0].offset in shared:
                decoded[ref.chunks[0].offset] += ((ref.numel if stop is None else stop) - start) / ref.numel
            return read(ref, where, start, stop, *rest)

        fam._c.read_array = counted
        tallpack.write_tasks(fam, None, out, exact=True)
    return dict(decoded), shared


def _same_files(out: Path, tasks: dict[str, Path]) -> None:
    for t, folder in tasks.items():
        got, want = out / t / "model.safetensors", folder / "model.safetensors"
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(want.read_bytes()).digest(), t


@pytest.mark.parametrize("in_runs", [False, True], ids=["whole", "runs"])
def test_each_shared_array_decoded_once_for_all_tasks(packed, tmp_path, monkeypatch, in_runs):
    archive, tasks = packed
    if in_runs:  # every tensor rebuilt a run of two chunks at a time: the kept base read a slice at a time
        monkeypatch.setattr(exact, "RUNS_FROM", 0)
        monkeypatch.setattr(exact, "RUN_ELEMENTS", 1024)
    decoded, shared = _unpack_counted(archive, tmp_path / "out")
    _same_files(tmp_path / "out", tasks)
    assert decoded, "the rebuilds read no shared array"
    assert set(decoded) <= set(shared)
    assert all(n == pytest.approx(1.0) for n in decoded.values()), decoded


@pytest.mark.parametrize("in_runs", [False, True], ids=["whole", "runs"])
def test_without_a_cache_each_task_decodes_its_own(packed, tmp_path, monkeypatch, in_runs):
    archive, tasks = packed
    if in_runs:
        monkeypatch.setattr(exact, "RUNS_FROM", 0)
        monkeypatch.setattr(exact, "RUN_ELEMENTS", 1024)
    decoded, _ = _unpack_counted(archive, tmp_path / "out", cache_bytes=0)
    _same_files(tmp_path / "out", tasks)
    assert decoded and all(n == pytest.approx(TASKS) for n in decoded.values()), decoded


def test_a_small_cache_keeps_what_fits_and_pushes_nothing_out(packed, tmp_path):
    """A budget for some of the bases: those kept by the first task serve every later one (while a
    task is read whole nothing is pushed out, ``Archive._scanning``); the others are decoded per task."""
    archive, tasks = packed
    with tallpack.open(archive) as fam:
        sizes = sorted(r.nbytes for e in fam.manifest.tensors for k, r in e.arrays.items()
                       if k in ("base", "merged") and isinstance(r, ArrayRef) and r.chunks)
    budget = sizes[-1] + sizes[0]  # the largest and the smallest fit, never all
    assert budget < sum(sizes)
    decoded, _ = _unpack_counted(archive, tmp_path / "out", cache_bytes=budget)
    _same_files(tmp_path / "out", tasks)
    counts = sorted(round(n, 6) for n in decoded.values())
    assert counts[0] == 1 and counts[-1] == TASKS, decoded


def test_kept_bytes_are_read_only(packed):
    """A base kept for every task is a read-only array: a rebuild that wrote into it would change
    every later task's reference."""
    archive, _ = packed
    with tallpack.open(archive) as fam:
        entry = next(e for e in fam.manifest.tensors if "base" in e.arrays and e.arrays["base"].chunks)
        read = _Bytes(fam).read
        whole = read(entry.arrays["base"], "base", Use.SHARED_INPUT)
        part = read(entry.arrays["base"], "base", Use.SHARED_INPUT, start=2, stop=5)
        assert not whole.flags.writeable and not part.flags.writeable
        isz = entry.arrays["base"].itemsize
        assert part.tobytes() == whole[2 * isz : 5 * isz].tobytes()
        assert read(entry.arrays["base"], "base").flags.writeable  # a caller's own read: its own bytes


_CHILD = """
import json, sys
import tallpack
with tallpack.open(sys.argv[1]) as fam:
    tallpack.write_tasks(fam, None, sys.argv[2], exact=True)
    kept = sum(1 for k in fam._cache._items if k[0] == "bytes")
print(json.dumps({"torch": "torch" in sys.modules, "kept": kept}))
"""


def test_unpack_of_every_task_still_imports_no_torch(packed, tmp_path):
    archive, tasks = packed
    got = subprocess.run([sys.executable, "-c", _CHILD, str(archive), str(tmp_path / "out")], check=True,
                         capture_output=True, text=True)
    said = json.loads(got.stdout.strip().splitlines()[-1])
    assert said == {"torch": False, "kept": said["kept"]} and said["kept"] > 0, said
    _same_files(tmp_path / "out", tasks)
