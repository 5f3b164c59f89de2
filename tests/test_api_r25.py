"""The Python API inside a program of its own (r25's downstream tester): torch's default dtype set
to another than float32, a service's first reads from several threads before torch is imported,
and the cyclic garbage collector paused while state dicts are read from several threads."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tallpack

DEFAULTS = (torch.float64, torch.bfloat16, torch.float16)


def _family(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base and three fine-tunes of ``dtype``, each touching a third of the elements (the exact
    tier then derives every mask and merged vector), with an empty tensor and an integer one."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(48, 40, generator=g).to(dtype), "b": torch.randn(40, generator=g).to(dtype),
            "empty": torch.randn(0, 8, generator=g).to(dtype), "steps": torch.arange(5)}
    tasks = {}
    for t in ("a", "b", "c"):
        sd = dict(base)
        for k in ("w", "b", "empty"):
            touch = (torch.rand(base[k].shape, generator=g) < 0.3).float()
            sd[k] = (base[k].float() + touch * 0.02 * torch.randn(base[k].shape, generator=g)).to(dtype)
        tasks[t] = sd
    return base, tasks


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _reads(path: Path) -> dict[str, torch.Tensor]:
    """Every read path of the archive at ``path``, each from a freshly opened archive (no cache
    shared between them): whole, lazy and exact state dicts, get_tensor, get_slice, merged models."""
    out: dict[str, torch.Tensor] = {}
    with tallpack.open(path) as fam:
        tasks, names, exact = fam.tasks, fam.keys(fam.tasks[0]), _has_exact(fam)
    for t in tasks:
        with tallpack.open(path) as fam:
            out |= {f"sd/{t}/{k}": v for k, v in fam.state_dict(t).items()}
        with tallpack.open(path) as fam:
            out |= {f"lazy/{t}/{k}": v for k, v in fam.state_dict(t, lazy=True).items()}
        for k in names:
            with tallpack.open(path) as fam:
                out[f"get/{t}/{k}"] = fam.get_tensor(t, k)
            with tallpack.open(path) as fam:
                out[f"slice/{t}/{k}"] = fam.get_slice(t, k)[1:3]
        with tallpack.open(path) as fam:
            if exact:
                out |= {f"exact/{t}/{k}": v for k, v in fam.state_dict(t, exact=True).items()}
                out[f"exact-get/{t}/w"] = fam.get_tensor(t, "w", exact=True)
    with tallpack.open(path) as fam:
        out |= {f"merged/{k}": v for k, v in fam.merged().items()}
    with tallpack.open(path) as fam:
        out |= {f"merged-a/{k}": v for k, v in fam.merged(task=tasks[0]).items()}
    return out


def _has_exact(fam) -> bool:
    return any("exact" in tt.extras for e in fam.manifest.tensors for tt in e.tasks.values())


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Path]:
    """Default, ``--exact`` and ``--fidelity`` archives of a float32 and a bfloat16 family."""
    root = tmp_path_factory.mktemp("r25api")
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        base, tasks = _family(dt)
        for label, kw in (("default", {}), ("exact", {"exact": True}), ("fidelity", {"fidelity": 0.999})):
            path = root / f"{label}-{str(dt)[6:]}.tallpack"
            tallpack.pack(base, tasks, path, **kw)
            out[path.stem] = path
    return out


@pytest.fixture(scope="module")
def archives(packed) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """``packed``'s archives, each with its reads under torch's own default dtype (float32)."""
    return {stem: (path, _reads(path)) for stem, path in packed.items()}


@pytest.mark.parametrize("default", DEFAULTS, ids=lambda d: str(d)[6:])
def test_reads_under_another_default_dtype_equal_those_under_float32(archives, default) -> None:
    """F1: with ``torch.set_default_dtype(float64)`` (or a 16-bit one), every read of every kind of
    archive gives the tensors it gives under float32: an ``--exact`` archive's derived merged
    vectors were made in the default dtype and its lossy reads and merged() raised ValueError or
    TypeError from the compiled loops."""
    with tallpack.open(archives["exact-float32"][0]) as fam:  # the case the finding is about
        assert any(tt.encoding == "tall-derived-merged" for e in fam.manifest.tensors for tt in e.tasks.values())
    for stem, (path, want) in archives.items():
        with _default_dtype(default):
            got = _reads(path)
        assert got.keys() == want.keys(), stem
        differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert differ == [], (stem, differ[:5])


FIRST_READS = """
import sys, threading, time
import tallpack

assert "torch" not in sys.modules
fam = tallpack.open(sys.argv[1])
reads = [lambda t: fam.get_tensor(t, "w"), lambda t: fam.state_dict(t),
         lambda t: fam.state_dict(t, lazy=True)["w"], lambda t: fam.get_slice(t, "w")[1:3]]
errors, first_done = [], threading.Event()

def first_request(i):
    # the other requests come while the first imports torch (or once it is done, should it never)
    while i and "torch" not in sys.modules and not first_done.is_set():
        time.sleep(0.0005)
    try:
        reads[i % len(reads)](fam.tasks[i % len(fam.tasks)])
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        if not i:
            first_done.set()

threads = [threading.Thread(target=first_request, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""


def test_first_reads_from_several_threads_before_torch_is_imported(packed) -> None:
    """F2: a program that imported tallpack only (not torch) and reads from 8 threads (a service's
    first requests, the 7 later ones while the first imports torch): every thread gets its tensor.
    Those that came while another thread was importing torch saw its half-made module and raised
    AttributeError ("partially initialized module 'torch' has no attribute 'device")."""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", FIRST_READS, str(packed["default-float32"])],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == "[]", r.stdout[-2000:]
