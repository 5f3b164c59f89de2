"""Round 34's read paths (issue 8): whole raw tensors rebuilt from their kept views without the
general path's lookups (``Archive._rebuild_direct``), and the rows of derived merged vectors kept
from slices (``Archive._derived_rows``). Same bits as a fresh archive's first read; never stale."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import tallpack
from tallpack.errors import ArchiveClosedError, IntegrityError


def _family(seed: int, dtype: torch.dtype = torch.float32, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(512, 256, generator=g).to(dtype), "v": torch.randn(300, 64, generator=g).to(dtype),
            "b": torch.randn(64, generator=g).to(dtype)}
    tasks = {t: {k: (v.float() + scale * torch.randn(v.shape, generator=g)
                     * (torch.rand(v.shape, generator=g) < 0.3)).to(dtype) for k, v in base.items()}
             for t in ("a", "b", "c")}
    return base, tasks


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def raw(tmp_path):
    paths = []
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        base, tasks = _family(34 + i, dtype)
        paths.append(tmp_path / f"raw{i}.tallpack")
        tallpack.pack(base, tasks, paths[-1], codec="raw", group=False)
    return paths


def _firsts(path) -> dict:
    """Every task's tensors, each read by a freshly opened archive without a cache (no kept views)."""
    out = {}
    with tallpack.open(path, cache_bytes=0) as fam:
        for t in fam.tasks:
            for k in fam.keys(t):
                with tallpack.open(path, cache_bytes=0) as fresh:
                    out[(t, k)] = _bits(fresh.get_tensor(t, k))
    return out


def test_raw_tensors_read_again_take_the_direct_path_with_the_same_bits(raw):
    for path in raw:
        want = _firsts(path)
        with tallpack.open(path) as fam:
            keys = sorted(want)
            for _ in range(3):  # tasks and tensors interleaved, each read several times
                for t, k in keys:
                    got = fam.get_tensor(t, k)
                    assert _bits(got) == want[(t, k)], (path.name, t, k)
            assert fam._direct, "a raw archive's tensors read again take the direct path"
            x, y = fam.get_tensor("a", "w"), fam.get_tensor("a", "w")
            assert x.data_ptr() != y.data_ptr()  # each the caller's own
            x.add_(1)
            assert _bits(fam.get_tensor("a", "w")) == want[("a", "w")]
            sd = fam.state_dict("b")  # state_dict's tensors take it too
            assert all(_bits(v) == want[("b", k)] for k, v in sd.items())


def test_the_direct_path_from_several_threads(raw):
    want = _firsts(raw[0])
    errors: list[str] = []
    with tallpack.open(raw[0]) as fam:
        for t, k in want:
            fam.get_tensor(t, k)

        def reader(i: int) -> None:
            keys = sorted(want)[i:] + sorted(want)[:i]
            for _ in range(20):
                for t, k in keys:
                    if _bits(fam.get_tensor(t, k)) != want[(t, k)]:
                        errors.append(f"{t} {k}")
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors


def test_the_direct_path_still_says_a_file_shrunk_or_closed(raw):
    fam = tallpack.open(raw[0])
    fam.get_tensor("a", "w")
    fam.get_tensor("a", "w")
    assert fam._direct
    os.truncate(raw[0], raw[0].stat().st_size // 2)
    with pytest.raises(IntegrityError, match="shrank"):
        fam.get_tensor("a", "w")
    fam.close()
    assert not fam._direct and not fam._views
    with pytest.raises(ArchiveClosedError):
        fam.get_tensor("a", "w")


def test_two_raw_archives_open_at_once_never_mix(raw, tmp_path):
    base, tasks = _family(35, torch.float32, scale=0.5)  # same names and shapes, other values
    other = tmp_path / "other.tallpack"
    tallpack.pack(base, tasks, other, codec="raw", group=False)
    want = {p: _firsts(p) for p in (raw[0], other)}
    assert want[raw[0]][("a", "w")] != want[other][("a", "w")]
    with tallpack.open(raw[0]) as one, tallpack.open(other) as two:
        for _ in range(3):
            for t, k in sorted(want[other]):
                assert _bits(one.get_tensor(t, k)) == want[raw[0]][(t, k)]
                assert _bits(two.get_tensor(t, k)) == want[other][(t, k)]


def test_compressed_archives_keep_no_direct_recipes(tmp_path):
    base, tasks = _family(36)
    path = tmp_path / "planes.tallpack"
    tallpack.pack(base, tasks, path, group=False)
    want = _firsts(path)
    with tallpack.open(path) as fam:
        for _ in range(2):
            for (t, k), w in want.items():
                assert _bits(fam.get_tensor(t, k)) == w
        assert not fam._direct  # decoded (or cached) inputs: the general path each time
