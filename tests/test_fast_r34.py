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


# -- rows of derived merged vectors kept from slices ------------------------------------------------

from safetensors.torch import save_file  # noqa: E402

from tallpack import reader  # noqa: E402

ROWS, COLS, CHUNK = 3000, 64, 4096  # 192,000 elements in 47 chunks


def _exact_family(root, dtype: torch.dtype, seed: int, tasks: int = 4):
    g = torch.Generator().manual_seed(seed)
    base = {"emb": torch.randn(ROWS, COLS, generator=g).to(dtype), "w": torch.randn(64, 64, generator=g).to(dtype)}
    save_file(base, root / "base.safetensors")
    paths = {}
    for t in range(tasks):
        sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.2)
                  ).to(dtype) for k, v in base.items()}
        save_file(sd, root / f"t{t}.safetensors")
        paths[f"t{t}"] = str(root / f"t{t}.safetensors")
    out = root / "x.tallpack"
    tallpack.pack(str(root / "base.safetensors"), paths, str(out), exact=True, chunk_elements=CHUNK)
    with tallpack.open(out) as fam:
        assert {tt.encoding for tt in fam._tensors["emb"].tasks.values()} == {"tall-derived-merged"}
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def exact_pair(request, tmp_path_factory):
    """Two exact archives of one dtype, the same names and shapes, other values, with every
    task's whole ``emb`` read by an archive without a cache."""
    out = []
    for seed in (0, 1):
        root = tmp_path_factory.mktemp(f"exact{seed}")
        path = _exact_family(root, getattr(torch, request.param), seed)
        with tallpack.open(path, cache_bytes=0) as fam:
            out.append((path, {t: fam.get_tensor(t, "emb") for t in fam.tasks}))
    assert not torch.equal(out[0][1]["t0"], out[1][1]["t0"])
    return out


@pytest.fixture
def derivations(monkeypatch) -> list[tuple[int, int]]:
    """The element ranges whose tau_MTL a slice derived from every task's rows (``task_rows``)."""
    calls: list[tuple[int, int]] = []
    real = reader.task_rows

    def counting(*args, **kwargs):
        calls.append((kwargs["start"], kwargs["stop"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(reader, "task_rows", counting)
    return calls


def _ranks(n: int) -> list[tuple[int, int]]:
    step = ROWS // n
    return [(r * step, ROWS if r == n - 1 else (r + 1) * step) for r in range(n)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def test_every_rank_of_every_task_derives_each_ranks_merged_rows_once(exact_pair, derivations):
    path, want = exact_pair[0]
    with tallpack.open(path) as fam:
        for r0, r1 in _ranks(8):  # rank by rank, every task
            for t in fam.tasks:
                assert _same(fam.get_slice(t, "emb")[r0:r1], want[t][r0:r1]), (t, r0, r1)
        assert len(derivations) == 8  # before: 32 (every slice derived tau_MTL's rows from every task's)
        # the runs cover the vector: slices read from them; they are not taken for the whole
        # vector, whose derivation checks every task's original against its hash (no slice did)
        held = fam._cache.peek(("derived-merged-rows", "emb"))
        assert held is not None and fam._cache.peek(("derived-merged", "emb", "merged", None)) is None
        for t in fam.tasks:
            assert _same(fam.get_slice(t, "emb")[17:2900], want[t][17:2900])
        assert len(derivations) == 8
        for t in fam.tasks:
            assert _same(fam.get_tensor(t, "emb"), want[t])
        kept = fam._cache.peek(("derived-merged", "emb", "merged", None))
        assert kept is not None and _same(kept.reshape(-1), held.flat)  # derived whole, the same bits
    with tallpack.open(path) as whole:
        whole.get_tensor("t1", "emb")  # derived whole
        assert _same(whole._cache.peek(("derived-merged", "emb", "merged", None)), kept)


def test_overlapping_and_unaligned_slices_tasks_interleaved(exact_pair, derivations):
    import random
    path, want = exact_pair[0]
    rng = random.Random(34)
    with tallpack.open(path) as fam:
        for _ in range(60):
            t = rng.choice(fam.tasks)
            r0 = rng.randrange(ROWS)
            r1 = rng.randrange(r0, min(ROWS, r0 + 700) + 1)
            got = fam.get_slice(t, "emb")[r0:r1]
            assert _same(got, want[t][r0:r1]), (t, r0, r1)
            got.add_(1)  # the caller's own: what is kept is not changed
        assert len(derivations) < 60


def test_two_exact_archives_open_at_once_keep_their_own_rows(exact_pair):
    (p0, w0), (p1, w1) = exact_pair
    with tallpack.open(p0) as one, tallpack.open(p1) as two:
        for r0, r1 in _ranks(4) + [(100, 2000), (2999, 3000)]:
            for t in one.tasks:
                assert _same(one.get_slice(t, "emb")[r0:r1], w0[t][r0:r1])
                assert _same(two.get_slice(t, "emb")[r0:r1], w1[t][r0:r1])


@pytest.mark.parametrize("cache_bytes", [0, 4 * ROWS * COLS - 1])
def test_without_room_for_the_whole_vector_nothing_is_kept(exact_pair, derivations, cache_bytes):
    path, want = exact_pair[0]
    with tallpack.open(path, cache_bytes=cache_bytes) as fam:
        for r0, r1 in _ranks(4):
            for t in fam.tasks:
                assert _same(fam.get_slice(t, "emb")[r0:r1], want[t][r0:r1])
        assert len(derivations) == 16 and len(fam._cache) == 0
