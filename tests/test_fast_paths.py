"""The read path's shortcuts (threads, a cache of decoded arrays, views of the mapped file) give
the same bits as the plain path, never a stale or shared tensor, and bounded memory."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack
from conftest import anon_growth, expected_reconstruction
from tallpack.encodings.base import iter_arrays
from tallpack import codecs, kernels, reader
from tallpack.encodings import tall as encodings_tall
from strategies import families


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and _bits(a[k]) == _bits(b[k]) for k in a)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(family=families(), codec=st.sampled_from(["raw", "zstd", "bytegroup-zstd", "planes", "planes:19"]),
       chunk=st.sampled_from([8, 64, 1 << 22]), checksum=st.sampled_from(["crc32", "xxh3-64"]),
       planar_min=st.sampled_from([0, reader.PLANAR_MIN_ELEMENTS]))
def test_every_path_gives_the_same_bits(tmp_path_factory, monkeypatch, family, codec, chunk, checksum,
                                        planar_min) -> None:
    """Every codec and chunking; ``planes`` float32 tensors take the one-pass rebuild from byte
    planes (``planes:19``: rotations chosen per chunk), cached and not; ``planar_min`` 0 sends
    these small tensors that way too."""
    monkeypatch.setattr(reader, "PLANAR_MIN_ELEMENTS", planar_min)
    base, tasks = family
    out = tmp_path_factory.mktemp("fast") / "f.tallpack"
    codec, _, level = codec.partition(":")
    tallpack.pack(base, tasks, out, codec=codec, chunk_elements=chunk, checksum=checksum, level=int(level or 3))
    want = expected_reconstruction(base, tasks, dict.fromkeys(tasks, tallpack.DEFAULT_LAMBDA))
    with tallpack.open(out, threads=1, cache_bytes=0) as plain, tallpack.open(out, threads=3) as fast:
        for task in tasks:
            simple = plain.state_dict(task)
            assert _same(simple, fast.state_dict(task))
            assert _same(simple, fast.state_dict(task))  # again, now from the cache
            singles = {k: fast.get_tensor(task, k) for k in reversed(fast.keys(task))}  # in another order
            assert _same(simple, {k: singles[k] for k in fast.keys(task)})
            for k, v in want[task].items():
                assert _bits(simple[k]) == _bits(v), (task, k)


def _family(seed: int, n: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(64, 32, generator=g), "frozen": torch.randn(16, generator=g)}
    tasks = {f"t{i}": {"w": base["w"] + 0.1 * torch.randn(64, 32, generator=g), "frozen": base["frozen"].clone(),
                       "head": torch.randn(i + 1, 4, generator=g)} for i in range(n)}
    return {"base": base, "tasks": tasks}


def test_the_cache_keeps_only_the_planes_it_decoded(tmp_path) -> None:
    """With ``planes`` (the default), float32 base and merged vectors are cached as the planes
    zstd coded (the exponent's), not as decoded floats; verbatim planes are read again from the
    mapped file on each use. A second task from those planes gives the plain path's bits."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 100, generator=g), "h": torch.randn(1000, generator=g).to(torch.bfloat16)}
    tasks = {f"t{i}": {"w": base["w"] + 0.01 * torch.randn(300, 100, generator=g),
                       "h": (base["h"].float() + 0.01 * torch.randn(1000, generator=g)).to(torch.bfloat16)}
             for i in range(3)}
    out = tmp_path / "p.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=4096)  # 8 chunks, the last one short
    with tallpack.open(out) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        entry, _ = fam._entry("t0", "w")
        decoded = entry.arrays["base"].nbytes + entry.arrays["merged"].nbytes
        for t in ("t0", "t1", "t0", "t2"):
            assert _same(fam.state_dict(t), plain.state_dict(t))
        planar = [k for k in fam._cache._items if k[0] == "planar"]
        assert len(planar) == (2 if kernels.COMPILED else 0)
        if kernels.COMPILED:  # w's entries: the planes zstd coded (3 of 8 here), not the floats
            held = sum(fam._cache._items[k][1] for k in planar)
            assert 0 < held <= decoded // 2
        assert len(plain._cache) == 0


def test_the_cache_keeps_nearly_empty_planes_from_their_third_use(tmp_path, monkeypatch) -> None:
    """A bfloat16 family's merged vector sums bfloat16 differences: its lowest plane is nearly all
    zeros. The cache leaves such planes (``Planes.CHEAP``) out for the first uses, which decode them
    into the thread's buffers; the third use keeps them. The same bits throughout."""
    g = torch.Generator().manual_seed(12)
    base = {"w": torch.randn(96, 512, generator=g).to(torch.bfloat16)}
    tasks = {f"t{i}": {"w": (base["w"].float() + 0.01 * torch.randn(96, 512, generator=g)).to(torch.bfloat16)}
             for i in range(3)}
    out = tmp_path / "e.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=8192)  # 6 chunks

    def kept(fam):
        entry, _ = fam._entry("t0", "w")
        return fam._cache.get(("planar",) + reader._cache_key(entry.arrays["merged"], None))

    with tallpack.open(out) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        states = []
        for t in ("t1", "t0", "t2", "t1"):
            assert _same(fam.state_dict(t), plain.state_dict(t))
            states.append(kept(fam))
            assert _same({"w": fam.get_tensor(t, "w")}, {"w": plain.get_tensor(t, "w")})
            states.append(kept(fam))
        if kernels.COMPILED:  # plane 0 (each float's lowest byte) left out for two uses, kept from the third
            assert [k.partial for k in states] == [True, True] + [False] * 6
            first, again = states[0], states[-1]
            assert len(first.chunks) == 6
            assert all(planes[0] is None and planes[1] is not None for planes, _ in first.chunks)
            assert again.nbytes > first.nbytes and all(planes[0] is not None for planes, _ in again.chunks)
    monkeypatch.setattr(codecs.Planes, "CHEAP", 1 << 40)  # no plane is cheap: kept from the first use
    with tallpack.open(out) as fam:
        fam.state_dict("t0")
        if kernels.COMPILED:
            assert not kept(fam).partial and kept(fam).nbytes == again.nbytes


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off: nothing is read as planes")
def test_a_partial_entry_that_cannot_grow_stays_as_it_is(tmp_path) -> None:
    """When the whole planes would pass the cache's budget, the entry of a first use keeps what it
    has and is not decoded again on every later use."""
    g = torch.Generator().manual_seed(13)
    base = {"w": torch.randn(96, 512, generator=g).to(torch.bfloat16)}
    tasks = {f"t{i}": {"w": (base["w"].float() + 0.01 * torch.randn(96, 512, generator=g)).to(torch.bfloat16)}
             for i in range(2)}
    out = tmp_path / "e.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=8192)
    with tallpack.open(out) as fam:
        entry, _ = fam._entry("t0", "w")
        ref = entry.arrays["merged"]
        key = ("planar",) + reader._cache_key(ref, None)
        fam._read_planar(ref, "merged", reader.Use.SHARED_INPUT, "m")
        first = fam._cache.get(key)
        assert first.partial
        fam._cache.budget = first.nbytes + 1  # room for what it has, not for the whole
        decoded = []
        decode = fam._decode_planar
        fam._decode_planar = lambda *a: decoded.append(a) or decode(*a)
        for _ in range(3):
            planar = fam._read_planar(ref, "merged", reader.Use.SHARED_INPUT, "m")
            assert [p is None for p in planar.chunk(0)[0]] == [False] * 4  # nearly empty planes decoded on use
        assert len(decoded) == 1  # one try to grow the entry (at the third use)
        now = fam._cache.get(key)
        assert not now.partial and now.nbytes == first.nbytes and now.chunks is first.chunks


@pytest.mark.parametrize("level, dtype, loop", [(3, torch.bfloat16, "tall_planes_bf16"),
                                                (19, torch.bfloat16, "tall_planes_bf16"),
                                                (3, torch.float16, "tall_planes_f16")])
def test_16_bit_tensors_are_rebuilt_from_their_planes(tmp_path, monkeypatch, level, dtype, loop) -> None:
    """A bfloat16 or float16 tensor of a base of its dtype takes the one-pass rebuild from byte
    planes too (two planes of base, four of the float32 merged vector, the sum rounded to the
    dtype), cached and not, chunk by chunk (the last one short), with rotations chosen per chunk
    at level 19 (bfloat16's ``planes-exp``); it gives the spec's bits, those of the formula
    computed in torch."""
    g = torch.Generator().manual_seed(6)
    base = {"h": (0.02 * torch.randn(300, 100, generator=g)).to(dtype),
            "w": torch.randn(64, 128, generator=g)}  # float32 beside it, as in mixed checkpoints
    tasks = {f"t{i}": {"h": (base["h"].float() + 0.01 * torch.randn(300, 100, generator=g)).to(dtype),
                       "w": base["w"] + 0.01 * torch.randn(64, 128, generator=g)} for i in range(3)}
    out = tmp_path / "bf.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=4096, level=level)
    want = expected_reconstruction(base, tasks, dict.fromkeys(tasks, tallpack.DEFAULT_LAMBDA))
    calls = []
    run = getattr(kernels, loop)

    def counting(*args, **kwargs):
        calls.append(args[-1].size)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernels, loop, counting)
    with tallpack.open(out) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        for t in ("t0", "t1", "t0", "t2"):
            for sd in (fam.state_dict(t), plain.state_dict(t), {"h": fam.get_tensor(t, "h")}):
                assert sd["h"].dtype == dtype and _bits(sd["h"]) == _bits(want[t]["h"]), t
        if kernels.COMPILED:
            assert sum(calls) == 4 * 3 * 30000  # every read of h, chunk by chunk (4096 elements, 1344 last)
            assert len(calls) == 4 * 3 * 8
            assert any(k[0] == "planar" and k[1] == fam._entry("t0", "h")[0].arrays["base"].chunks[0].offset
                       for k in fam._cache._items)
        else:
            assert not calls


@pytest.mark.parametrize("base_dtype, task_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_tasks_of_another_dtype_than_the_base_are_rebuilt_by_the_formula(tmp_path, base_dtype, task_dtype) -> None:
    """A task whose dtype differs from the base's (``--allow-mismatch`` is not needed: the shapes
    match) is rebuilt in float32 and cast to the task's dtype, whole, tensor by tensor, by rows and
    in groups, with the default codec: the planar loops join a base of the output's dtype only, and
    a float32 task of a 16-bit base once failed there with an internal error."""
    g = torch.Generator().manual_seed(7)
    base = {"big": (0.02 * torch.randn(96, 128, generator=g)).to(base_dtype),
            "small": torch.randn(40, generator=g).to(base_dtype)}
    tasks = {f"t{i}": {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(task_dtype)
                       for k, v in base.items()} for i in range(3)}
    out = tmp_path / "mixed.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=4096)
    want = expected_reconstruction(base, tasks, dict.fromkeys(tasks, tallpack.DEFAULT_LAMBDA))
    with tallpack.open(out) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        for t in tasks:
            for sd in (fam.state_dict(t), plain.state_dict(t), {k: fam.get_tensor(t, k) for k in base}):
                assert _same(sd, want[t]), t
            assert _bits(fam.get_slice(t, "big")[32:64]) == _bits(want[t]["big"][32:64])


@pytest.mark.parametrize("codec", ["planes", "raw", "zstd"])
@pytest.mark.parametrize("chunk", [8, 4096, 1 << 22])
def test_masks_read_as_their_bits_give_the_bytes_paths_bits(tmp_path, monkeypatch, codec, chunk) -> None:
    """Masks go to the rebuild as their stored bits (``Encoding.bit_inputs``; the packer's chunks
    always hold whole bytes of them), for float32, bfloat16 and float16 tensors, planar or not,
    cached and not, by state_dict and get_tensor: the same bits as the masks read as bytes."""
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(100, 99, generator=g), "b": torch.randn(37, generator=g).to(torch.bfloat16),
            "h": torch.randn(70, 90, generator=g).to(torch.bfloat16), "f": torch.randn(5001, generator=g).half()}
    tasks = {t: {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
             for t in ("a", "b", "c")}
    out = tmp_path / "m.tallpack"
    tallpack.pack(base, tasks, out, codec=codec, chunk_elements=chunk)
    monkeypatch.setattr(reader, "PLANAR_MIN_ELEMENTS", 0)
    read_bits = reader.Archive._read_bits
    seen = []

    def spy(self, ref, where, slot, keep=False):
        seen.append(where)
        return read_bits(self, ref, where, slot, keep)

    monkeypatch.setattr(reader.Archive, "_read_bits", spy)
    got = {}
    for cache in (0, 1 << 30):
        with tallpack.open(out, cache_bytes=cache) as fam:
            for t in tasks:
                got[t, cache] = fam.state_dict(t), {k: fam.get_tensor(t, k) for k in fam.keys(t)}
    assert bool(seen) == kernels.COMPILED, seen[:3]
    monkeypatch.setattr(encodings_tall.Tall, "bit_inputs", classmethod(lambda cls, entry, tt: ()))
    with tallpack.open(out, cache_bytes=0, threads=1) as plain:
        for t in tasks:
            want = plain.state_dict(t)
            for (sd, singles) in (got[t, 0], got[t, 1 << 30]):
                assert _same(want, sd) and _same(want, singles), t


def _count_whole_decodes(fam) -> list[tuple[int, int]]:
    """A list that collects (array, chunk) for every read of ``fam`` that decodes all of a chunk's
    planes (none of them known from the cache)."""
    whole: list[tuple[int, int]] = []
    read_planar = fam._c.read_planar

    def counting(ref, i, where, slot=None, known=None, cheap=False):
        if known is None or all(p is None for p in known):
            whole.append((ref.chunks[0].offset, i))
        return read_planar(ref, i, where, slot, known, cheap)

    fam._c.read_planar = counting
    return whole


def test_planes_over_the_cache_budget_keep_the_chunks_that_fit(tmp_path) -> None:
    """An array whose decoded planes exceed the cache's budget keeps the chunks that fit, from
    the first (known from the plane lengths before decoding), and the rebuild decodes the others
    one at a time: no chunk is decoded twice in a read (before, the array was decoded up to the
    budget, dropped, and decoded again, for every task), to the same bits."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, 1024, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 1024, generator=g)} for t in ("a", "b", "c")}
    out = tmp_path / "b.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=8192)  # 8 chunks; each keeps at least 8 KB of planes
    budget = 3 * 8192
    with tallpack.open(out, cache_bytes=budget) as small, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        whole = _count_whole_decodes(small)
        for t in tasks:
            whole.clear()
            assert _same(small.state_dict(t), plain.state_dict(t)), t
            if not kernels.COMPILED:
                continue
            arrays = {a for a, _ in whole}
            assert len(arrays) == 2, whole  # base and merged vector
            assert len(whole) == len(set(whole)), (t, whole)  # no chunk decoded twice
        if kernels.COMPILED:
            kept = [v for k, (v, _) in small._cache._items.items() if k[0] == "planar"]
            assert kept and all(0 < v.cut < 8 and v.nbytes <= budget for v in kept), [(v.cut, v.nbytes) for v in kept]
            assert small._cache.size <= budget


def test_planes_over_the_cache_budget_take_only_the_room_there_is(tmp_path) -> None:
    """An array that will not fit the cache whole keeps only the chunks that fit in the room
    left: it does not push out the arrays the cache holds whole (a scan of a large model would
    otherwise leave the cache holding a part of its last large tensor and nothing else)."""
    g = torch.Generator().manual_seed(14)
    base = {"small": torch.randn(16, 1024, generator=g), "big": torch.randn(128, 1024, generator=g)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    out = tmp_path / "r.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=8192, group=False)  # small: 2 chunks, big: 16
    with tallpack.open(out, cache_bytes=1 << 30) as fam:
        fam.get_tensor("a", "small")
        whole = {k: v.nbytes for k, (v, _) in fam._cache._items.items() if k[0] == "planar"}
        assert len(whole) == (2 if kernels.COMPILED else 0)  # its base and merged vector, as planes
    budget = sum(whole.values()) + 5 * 8192
    with tallpack.open(out, cache_bytes=budget) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        for t in tasks:
            assert torch.equal(fam.get_tensor(t, "small"), plain.get_tensor(t, "small"))
            assert torch.equal(fam.get_tensor(t, "big"), plain.get_tensor(t, "big"))
        kept = {k: v for k, (v, _) in fam._cache._items.items() if k[0] == "planar"}
        if kernels.COMPILED:
            assert set(whole) <= set(kept)  # still there
            parts = [v for k, v in kept.items() if k not in whole]
            assert parts and all(0 < v.cut < 16 for v in parts) and fam._cache.size <= budget


def test_a_cache_smaller_than_a_task_keeps_what_it_holds_from_task_to_task(tmp_path) -> None:
    """While a task is read whole, the cache pushes nothing out: what it kept for the first task
    stays for the next ones, which decode only the rest. (Least recently used first, a cache
    smaller than the base and merged vectors pushed out each array before the next task asked
    for it again: every task decoded everything, into fresh memory.)"""
    g = torch.Generator().manual_seed(15)
    base = {f"l{i}": torch.randn(16, 1024, generator=g) for i in range(6)}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b", "c")}
    out = tmp_path / "s.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=8192, group=False)  # 6 tensors of 2 chunks
    with tallpack.open(out) as fam:
        fam.state_dict("a")
        total = fam._cache.size
    with tallpack.open(out, cache_bytes=total // 2) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        decoded = _count_whole_decodes(fam)
        held, counts = [], []
        for t in tasks:
            decoded.clear()
            assert _same(fam.state_dict(t), plain.state_dict(t)), t
            held.append(set(fam._cache._items))
            counts.append(len(decoded))
        if kernels.COMPILED:
            assert 0 < fam._cache.size <= total // 2
            assert held[0] == held[1] == held[2]  # nothing pushed out
            assert counts[1] == counts[2] < counts[0], counts  # the kept planes are not decoded again
            assert counts[1] <= counts[0] - len(held[0]), counts


def test_the_chunks_of_one_array_are_decoded_by_the_idle_threads_too(tmp_path) -> None:
    """``Archive._each`` (the cache's decoding of one large array) runs on this thread and the
    pool's idle ones together, hands an error to the caller, and never waits on work no thread
    started: with every pool thread busy, the caller does it all."""
    import threading

    g = torch.Generator().manual_seed(16)
    base = {"w": torch.randn(64, 1024, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(64, 1024, generator=g)} for t in ("a", "b")}
    out = tmp_path / "p.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=4096)  # 16 chunks
    with tallpack.open(out, threads=2) as fam, tallpack.open(out, cache_bytes=0, threads=1) as plain:
        for t in tasks:
            assert _same(fam.state_dict(t), plain.state_dict(t))
        both = threading.Barrier(2, timeout=10)
        names = fam._each(2, lambda i: (both.wait(), threading.current_thread().name)[1])
        assert len(set(names)) == 2, names  # the barrier let them through together
        with pytest.raises(ZeroDivisionError):
            fam._each(8, lambda i: 1 // (i - 5))
        busy = threading.Event()
        blocker = fam._pool.submit(busy.wait, 10)  # the pool's threads taken
        blocker2 = fam._pool.submit(busy.wait, 10)
        assert fam._each(4, lambda i: i * i) == [0, 1, 4, 9]  # done by this thread alone
        busy.set()
        blocker.result(), blocker2.result()


def test_threads_let_go_of_their_decoding_buffers_when_the_last_archive_closes(tmp_path) -> None:
    """Without a cache, inputs are decoded into buffers the reading thread keeps for its next
    read (the planes of a float32 tensor, the float mask of a bfloat16 one). The caller's own
    thread must not keep them once no archive is open: they go when the last one closes."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(256, 1024, generator=g), "h": torch.randn(256, 512, generator=g).to(torch.bfloat16)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(256, 1024, generator=g),
                 "h": (base["h"].float() + 0.01 * torch.randn(256, 512, generator=g)).to(torch.bfloat16)}
             for t in ("a", "b")}
    out = tmp_path / "m.tallpack"
    tallpack.pack(base, tasks, out)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        first, second = tallpack.open(out, cache_bytes=0, threads=1), tallpack.open(out, cache_bytes=0, threads=1)
        sd = first.state_dict("a")
        del sd
        zstd_context = codecs._decompressor()  # this thread's, kept while an archive is open
        first.close()
        kept = tracemalloc.get_traced_memory()[0] - before  # the other archive is still open
        assert codecs._decompressor() is zstd_context
        second.close()
        after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept > 512 << 10, kept  # the float mask alone is 512 KB
    assert after < 256 << 10, after
    assert codecs._decompressor() is not zstd_context  # let go too (zstd's memory is not traced)


def test_state_dict_shares_large_tensors_across_threads_and_raises_the_first_error(tmp_path, monkeypatch) -> None:
    """``state_dict`` on several threads: the large tensors on the archive's threads and the
    calling one, the small ones on the calling thread alone; every tensor in the task's order and
    bits; a damaged tensor's error raised, whichever thread met it."""
    import threading

    g = torch.Generator().manual_seed(6)
    base = {**{f"big{i}": torch.randn(256, 512, generator=g) for i in range(6)},
            **{f"small{i}": torch.randn(16, generator=g) for i in range(20)}}
    tasks = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    out = tmp_path / "s.tallpack"
    tallpack.pack(base, tasks, out, group=False)  # each tensor a job of its own (groups: test_groups.py)
    who: dict[str, int] = {}
    rebuild = reader.Archive._rebuild
    big_threads: set[int] = set()
    both = threading.Event()

    def spy(self, task, name, *args, **kwargs):
        who[name] = threading.get_ident()
        if self.threads > 1 and name.startswith("big"):
            # On a loaded machine the pool's thread can start after the calling one has rebuilt every
            # large tensor (each takes a millisecond): the first large rebuild of a task waits for a
            # second thread to come to one. If none ever comes, the assertion below fails.
            big_threads.add(threading.get_ident())
            if len(big_threads) > 1:
                both.set()
            both.wait(timeout=30)
        return rebuild(self, task, name, *args, **kwargs)

    monkeypatch.setattr(reader.Archive, "_rebuild", spy)
    with tallpack.open(out, threads=1) as one, tallpack.open(out, threads=2) as two:
        for t in tasks:
            big_threads.clear()
            both.clear()
            want, got = one.state_dict(t), two.state_dict(t)
            assert list(got) == list(want) == list(base) and _same(want, got)
    assert {who[f"small{i}"] for i in range(20)} == {threading.get_ident()}
    assert len({who[f"big{i}"] for i in range(6)}) == 2  # the calling thread and one of the pool's

    with tallpack.open(out) as fam:
        ref = fam._tensors["big4"].tasks["b"].arrays["mask"]
    raw = bytearray(out.read_bytes())
    raw[ref.chunks[0].offset] ^= 1
    out.write_bytes(bytes(raw))
    with tallpack.open(out, threads=2) as fam:
        with pytest.raises(tallpack.IntegrityError, match="task 'b', tensor 'big4'"):
            fam.state_dict("b")
        with tallpack.open(out, threads=1) as one:
            assert _same(fam.state_dict("a"), one.state_dict("a"))


def test_the_cache_never_mixes_archives_or_tasks(tmp_path) -> None:
    """Two archives of the same layout (so the same offsets) open at once, tasks interleaved."""
    fams = [_family(1), _family(2)]
    paths = []
    for i, f in enumerate(fams):
        paths.append(tmp_path / f"{i}.tallpack")
        tallpack.pack(f["base"], f["tasks"], paths[-1], chunk_elements=64)
    want = [expected_reconstruction(f["base"], f["tasks"], dict.fromkeys(f["tasks"], 0.4)) for f in fams]
    with tallpack.open(paths[0]) as a, tallpack.open(paths[1]) as b:
        for _ in range(2):
            for task in ("t0", "t2", "t1"):
                for i, arc in enumerate((a, b)):
                    sd = arc.state_dict(task)
                    assert torch.equal(sd["w"], want[i][task]["w"])
                    assert torch.equal(sd["head"], fams[i]["tasks"][task]["head"])
        assert a._cache.hits > 0 and b._cache.hits > 0


def test_plans_are_kept_per_task_and_tensor_for_whole_reads_only(tmp_path) -> None:
    """``_rebuild`` keeps what it works out from the manifest per (task, tensor): whole tensors and
    rows on the CPU reuse it; exact reads and other devices work theirs out each time, before and
    after, and still give their own bits."""
    f = _family(1)
    out = tmp_path / "p.tallpack"
    tallpack.pack(f["base"], f["tasks"], out, chunk_elements=64, exact=True)
    want = expected_reconstruction(f["base"], f["tasks"], dict.fromkeys(f["tasks"], 0.4))
    with tallpack.open(out) as fam:
        assert torch.equal(fam.get_tensor("t1", "w", exact=True), f["tasks"]["t1"]["w"])
        assert not fam._plans
        for _ in range(2):
            assert torch.equal(fam.get_tensor("t1", "w"), want["t1"]["w"])
            assert torch.equal(fam.get_tensor("t2", "w"), want["t2"]["w"])
        assert set(fam._plans) == {("t1", "w", False), ("t2", "w", False)}
        assert torch.equal(fam.get_tensor("t1", "w", exact=True), f["tasks"]["t1"]["w"])
        assert torch.equal(fam.get_slice("t1", "w")[1:3], want["t1"]["w"][1:3])
        assert torch.equal(fam.get_tensor("t1", "w", device="cpu"), want["t1"]["w"])
        assert set(fam._plans) == {("t1", "w", False), ("t2", "w", False)}
        with pytest.raises(tallpack.TensorNotFoundError):
            fam.get_tensor("t1", "nope")
        assert ("t1", "nope", False) not in fam._plans


def test_reused_decode_buffers_never_reach_the_caller(tmp_path) -> None:
    """Without a cache, a rebuild's inputs are decoded into buffers each thread reuses: every
    tensor handed out earlier keeps its bits while later reads (other tasks, another archive of
    the same layout) go through the same buffers."""
    fams = [_family(4), _family(5)]
    paths = []
    for i, f in enumerate(fams):
        paths.append(tmp_path / f"{i}.tallpack")
        tallpack.pack(f["base"], f["tasks"], paths[-1], codec="bytegroup-zstd", chunk_elements=64)
    want = [expected_reconstruction(f["base"], f["tasks"], dict.fromkeys(f["tasks"], 0.4)) for f in fams]
    for threads in (1, 2):
        with tallpack.open(paths[0], cache_bytes=0, threads=threads) as a, \
                tallpack.open(paths[1], cache_bytes=0, threads=threads) as b:
            got = [(i, task, arc.state_dict(task), arc.get_tensor(task, "w"))
                   for _ in range(2) for task in ("t0", "t2", "t1") for i, arc in enumerate((a, b))]
            for i, task, sd, w in got:
                assert torch.equal(sd["w"], want[i][task]["w"]) and torch.equal(w, want[i][task]["w"])
            assert a._slots.__dict__, "the reused buffers were not used"
            assert len(a._cache) == 0


def test_returned_tensors_are_the_callers_own(tmp_path) -> None:
    """Changing a returned tensor in place changes nothing the archive returns later, whatever
    the codec (raw chunks are views of the file inside the reader, never outside)."""
    f = _family(3)
    for codec in ("raw", "bytegroup-zstd"):
        out = tmp_path / f"{codec}.tallpack"
        tallpack.pack(f["base"], f["tasks"], out, codec=codec, chunk_elements=1 << 22)
        with tallpack.open(out) as fam:
            first = fam.state_dict("t1")
            kept = {k: v.clone() for k, v in first.items()}
            for t in first.values():
                t.add_(1.0)
            again = fam.state_dict("t1")
            assert all(torch.equal(again[k], kept[k]) for k in first)
            assert torch.equal(again["frozen"], f["tasks"]["t1"]["frozen"])


def test_cache_budget_is_respected(tmp_path) -> None:
    f = _family(4)
    out = tmp_path / "c.tallpack"
    tallpack.pack(f["base"], f["tasks"], out, chunk_elements=64)
    with tallpack.open(out, cache_bytes=64 * 32 * 4) as fam:  # room for one decoded array
        fam.state_dict("t0")
        fam.state_dict("t1")
        # the cache keeps the decoded planes of planes-exp arrays (a fraction of each), so several fit
        assert 0 < fam._cache.size <= 64 * 32 * 4 and len(fam._cache) >= 1
    with tallpack.open(out, cache_bytes=0) as fam:
        fam.state_dict("t0")
        assert len(fam._cache) == 0
    for bad in (-1, 1.5, "1GB"):
        try:
            tallpack.open(out, cache_bytes=bad)
        except tallpack.InvalidArgumentError:
            continue
        raise AssertionError(f"cache_bytes={bad!r} accepted")


def test_lazy_reading_keeps_memory_to_a_few_tensors(tmp_path) -> None:
    """A family of 24 tensors of 4 MB per member: reading one task lazily, tensor by tensor, in a
    fresh process with two threads, peaks at about a dozen tensors above the process's baseline (decode
    buffers of base, merged vector and mask, the output, and the allocator's slack), not at the
    member's 96 MB and growing."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    base = {f"w{i}": torch.randn(n, generator=g) * 0.02 for i in range(24)}
    tasks = {t: {k: v + 1e-3 * torch.randn(n, generator=g) for k, v in base.items()} for t in ("a", "b")}
    out = tmp_path / "big.tallpack"
    tallpack.pack(base, tasks, out)
    del base, tasks
    grown = anon_growth(f"fam = tallpack.open({str(out)!r}, cache_bytes=0, threads=2)",
                        "for k, v in fam.state_dict('a', lazy=True).items():\n    s = float(v[0]); del v")
    tensor_bytes = n * 4
    # 7-10 tensors alone, up to 12.4 after other tests (the allocator's and transparent huge
    # pages' rounding: RssAnon grows in 2 MB steps then); the member is 24
    assert grown <= 16 * tensor_bytes, grown / 2**20


def test_get_slice_reads_only_the_rows_asked(tmp_path) -> None:
    """Row ranges rebuild from the chunks that hold them, with the same bits as slicing the whole
    tensor; other indexes fall back to the whole tensor."""
    f = _family(5)
    out = tmp_path / "s.tallpack"
    tallpack.pack(f["base"], f["tasks"], out, chunk_elements=64)  # w: 64x32, two rows a chunk
    with tallpack.open(out) as fam:
        whole = fam.get_tensor("t1", "w")
        sl = fam.get_slice("t1", "w")
        assert sl.get_shape() == [64, 32] and sl.get_dtype() == "F32"
        for index in (slice(3, 7), slice(0, 64), slice(60, 99), 5, -1, (slice(10, 12), slice(4, 8)),
                      (7, 3), slice(8, 8), slice(0, 64, 2), ...):
            assert torch.equal(sl[index], whole[index]), index
        for bad in ("a", (slice(0, 2), 1.5)):
            with pytest.raises(TypeError, match="cannot be indexed with"):
                sl[bad]
        for index in ((slice(None), slice(4, 8)), (slice(3, 7), slice(0, 2)), (slice(None), 1)):
            got = sl[index]  # a part of the rows' columns: a tensor of its own, not a view of the whole
            assert got._base is None and got.is_contiguous() and torch.equal(got, whole[index]), index
        reads = []
        real = fam._c.read_chunk
        fam._c.read_chunk = lambda ref, i, where: reads.append(i) or real(ref, i, where)
        fam._cache.clear()
        fam.get_slice("t1", "w")[10:12]
        assert sorted(set(reads)) == [5], reads  # rows 10-11 are elements 320..383: chunk 5 alone
        head = fam.get_slice("t2", "head")
        assert torch.equal(head[1:], f["tasks"]["t2"]["head"][1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_of_byte_planes_are_rebuilt_from_their_chunks_with_the_whole_tensors_bits(tmp_path, dtype) -> None:
    """get_slice of a tensor stored as byte planes: rows starting at a multiple of 8 elements go
    through the planar loops, reading only the chunks that hold them (planes and mask bits) and
    leaving the cache as it was; others through the general path; once the cache holds the
    planes, slices use them. Every way gives the whole tensor's bits."""
    g = torch.Generator().manual_seed(11)
    shape = (96, 100)  # 9,600 elements: chunks of 2,048 (5); row r starts at element 100 r
    base = {"w": (torch.randn(shape, generator=g) * 0.02).to(dtype)}
    tasks = {f"t{i}": {"w": (base["w"].float() + torch.randn(shape, generator=g) * 2e-3
                             * (torch.rand(shape, generator=g) < 0.3)).to(dtype)} for i in range(3)}
    out = tmp_path / "r.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=2048)
    with tallpack.open(out) as ref:
        want = {t: ref.get_tensor(t, "w") for t in tasks}
    cases = [(0, 1), (2, 3), (2, 30), (20, 41), (40, 96), (1, 5), (95, 96), (8, 8), (0, 95)]
    with tallpack.open(out) as fam:
        planes, bits = [], []
        real_planar, real_bits = fam._c.read_planar, fam._c.read_bits
        fam._c.read_planar = lambda r, i, *a, **k: planes.append(i) or real_planar(r, i, *a, **k)
        fam._c.read_bits = lambda r, w, into, chunks=None: bits.append(chunks) or real_bits(r, w, into, chunks)
        for r0, r1 in cases:
            planes.clear(), bits.clear()
            assert _same({"w": fam.get_slice("t1", "w")[r0:r1]}, {"w": want["t1"][r0:r1]}), (r0, r1)
            if (r0 * 100) % 8 == 0 and r1 > r0:  # the planar loops, from the rows' chunks alone
                covering = set(range(r0 * 100 // 2048, -(-r1 * 100 // 2048)))
                assert set(planes) == covering and bits == [range(min(covering), max(covering) + 1)], (r0, r1, planes, bits)
            assert fam._cache.size == 0  # a slice does not fill the cache
        fam.get_tensor("t2", "w")  # now the cache keeps the planes
        held = fam._cache.size
        assert held > 0
        for t in tasks:
            for r0, r1 in cases:
                assert _same({"w": fam.get_slice(t, "w")[r0:r1]}, {"w": want[t][r0:r1]}), (t, r0, r1)
        assert fam._cache.size == held


def test_device_cpu_is_the_same_and_cuda_when_there(tmp_path) -> None:
    f = _family(6)
    out = tmp_path / "d.tallpack"
    tallpack.pack(f["base"], f["tasks"], out, chunk_elements=64)
    with tallpack.open(out) as fam:
        plain = fam.state_dict("t0")
        assert _same(plain, fam.state_dict("t0", device="cpu"))
        for bad in ["bogus", *([] if torch.cuda.is_available() else ["cuda", "cuda:0"])]:
            for call in (lambda: fam.state_dict("t0", device=bad), lambda: fam.get_tensor("t0", "w", device=bad)):
                with pytest.raises(tallpack.InvalidArgumentError, match=f"device '{bad}' cannot be used here") as e:
                    call()
                assert "\n" not in str(e.value)
        if torch.cuda.is_available():  # run where a GPU is; see BENCHMARKS.md
            gpu = fam.state_dict("t0", device="cuda")
            assert all(v.device.type == "cuda" for v in gpu.values())
            assert _same(plain, {k: v.cpu() for k, v in gpu.items()})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(family=families(), merge=st.sampled_from(["ta", "ties"]), chunk=st.sampled_from([16, 104, 1 << 22]),
       compute=st.sampled_from([1, 3, 64]))
def test_the_packers_sub_blocks_give_the_same_archive(tmp_path_factory, monkeypatch, family, merge, chunk,
                                                      compute) -> None:
    """The packer computes each chunk in sub-blocks of ``COMPUTE_ELEMENTS`` (bounded memory); any
    sub-block size writes the same arrays, chunk for chunk."""
    import tallpack.encodings.tall as tall_encoding

    base, tasks = family
    d = tmp_path_factory.mktemp("sub")
    tallpack.pack(base, tasks, d / "whole.tallpack", merge=merge, chunk_elements=chunk, codec="raw")
    monkeypatch.setattr(tall_encoding, "COMPUTE_ELEMENTS", compute)
    tallpack.pack(base, tasks, d / "sub.tallpack", merge=merge, chunk_elements=chunk, codec="raw")
    with tallpack.open(d / "whole.tallpack") as a, tallpack.open(d / "sub.tallpack") as b:
        for (name, key, ra), (name2, key2, rb) in zip(iter_arrays(a.manifest.tensors), iter_arrays(b.manifest.tensors)):
            assert (name, key) == (name2, key2)
            assert _bits(a.read_array(ra, key)) == _bits(b.read_array(rb, key)), (name, key)
        for t in tasks:  # the same set bits counted (fidelity figures are sums in another grouping)
            assert a.task_info(t).density == b.task_info(t).density


def _generic_only(monkeypatch) -> None:
    """The packer's generic path: task vectors in memory, the method's ``combine``, then the masks."""
    monkeypatch.setattr(encodings_tall, "compiled_kind", lambda base, thetas: None)


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(family=families(), chunk=st.sampled_from([16, 104, 1 << 22]), compute=st.sampled_from([3, 64, 1 << 20]))
def test_the_straight_loops_write_the_generic_paths_archive(tmp_path_factory, monkeypatch, family, chunk,
                                                            compute) -> None:
    """Task Arithmetic's merged vector and masks computed straight from the inputs (``_straight``:
    ``kernels.tv_sum`` and ``kernels.tall_mask_tv``) give the archive of the generic path (task
    vectors in memory, ``TaskArithmetic.combine``, ``tall_mask_with_fidelity``) byte for byte,
    fidelity figures in the manifest included."""
    base, tasks = family
    d = tmp_path_factory.mktemp("straight")
    monkeypatch.setattr(encodings_tall, "COMPUTE_ELEMENTS", compute)
    tallpack.pack(base, tasks, d / "straight.tallpack", chunk_elements=chunk)
    _generic_only(monkeypatch)
    tallpack.pack(base, tasks, d / "generic.tallpack", chunk_elements=chunk)
    assert (d / "straight.tallpack").read_bytes() == (d / "generic.tallpack").read_bytes()


@pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are turned off")
@pytest.mark.parametrize("dtype,threads", [(torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 2),
                                           (torch.float32, 4), (torch.bfloat16, 5)])
def test_the_straight_loops_write_the_generic_paths_archive_across_chunks_and_threads(tmp_path, monkeypatch,
                                                                                      dtype, threads) -> None:
    """The same for tensors of several chunks and sub-blocks large enough to be split across
    threads (``kernels.PARTS_FROM``), read back through the format; the tasks' masks in up to
    ``threads`` groups, and the generic path on one thread writes the same file."""
    g = torch.Generator().manual_seed(3)
    n = 3 * kernels.PARTS_FROM + 5
    w = torch.randn(n, generator=g) * 0.02
    base = {"w": w.to(dtype), "b": torch.randn(100, generator=g).to(dtype)}
    tasks = {f"t{i}": {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
             for i in range(5)}
    monkeypatch.setattr(encodings_tall, "COMPUTE_ELEMENTS", kernels.PARTS_FROM + 64)
    calls, straight = [], encodings_tall._straight
    monkeypatch.setattr(encodings_tall, "_straight", lambda *a: calls.append(a[-1]) or straight(*a))
    tallpack.pack(base, tasks, tmp_path / "straight.tallpack", chunk_elements=2 * kernels.PARTS_FROM, threads=threads)
    assert calls == [min(threads, 5)] * (2 + 1)  # each chunk of "w", and "b" (the straight path ran, in groups)
    _generic_only(monkeypatch)
    tallpack.pack(base, tasks, tmp_path / "generic.tallpack", chunk_elements=2 * kernels.PARTS_FROM, threads=1)
    tallpack.pack(base, tasks, tmp_path / "generic-n.tallpack", chunk_elements=2 * kernels.PARTS_FROM,
                  threads=threads)
    assert (tmp_path / "generic-n.tallpack").read_bytes() == (tmp_path / "generic.tallpack").read_bytes()
    assert (tmp_path / "straight.tallpack").read_bytes() == (tmp_path / "generic.tallpack").read_bytes()
    with tallpack.open(tmp_path / "straight.tallpack") as fam:
        want = expected_reconstruction(base, tasks, {t: fam.task_info(t).lam for t in tasks})
        for t in tasks:
            got = fam.state_dict(t)
            assert all(torch.equal(got[k], want[t][k]) for k in base), t


def test_tensors_written_while_the_last_ones_encode_give_the_same_archive(tmp_path, monkeypatch) -> None:
    """The packer goes on to the next tensor while the last one's chunks are still being encoded
    (``WriteContext.defer``: ``Tall.write`` returns a ``Later``, the writer's queue keeps the file's
    order): the archive is byte for byte the one written tensor by tensor, groups, shared and
    task-own tensors in between included."""
    import tallpack.packer as packer
    from tallpack.encodings import Later

    g = torch.Generator().manual_seed(8)
    base = {f"w{i}": torch.randn(300 * (i + 1), generator=g) for i in range(5)}
    base |= {"small": torch.randn(10, generator=g), "frozen": torch.randn(50, generator=g),
             "big": torch.randn(300_000, generator=g)}
    tasks = {f"t{j}": {k: v.clone() if k == "frozen" else v + 0.01 * torch.randn(v.shape, generator=g)
                       for k, v in base.items()} | {"head": torch.randn(j + 2, generator=g)} for j in range(3)}
    later, real_later = [], Later.__init__
    monkeypatch.setattr(Later, "__init__", lambda self, entry: later.append(1) or real_later(self, entry))
    tallpack.pack(base, tasks, tmp_path / "deferred.tallpack", chunk_elements=1 << 16, threads=2)
    assert len(later) >= 2  # the groups' entries and the large tensor's came later
    real_context = packer.WriteContext
    monkeypatch.setattr(packer, "WriteContext", lambda *a, **k: real_context(*a, **{**k, "defer": False}))
    later.clear()
    tallpack.pack(base, tasks, tmp_path / "direct.tallpack", chunk_elements=1 << 16, threads=2)
    assert later == []
    assert (tmp_path / "deferred.tallpack").read_bytes() == (tmp_path / "direct.tallpack").read_bytes()


def test_the_writers_queue_writes_in_the_order_chunks_were_queued(tmp_path) -> None:
    """Chunks queued for two arrays are written before a chunk added directly to a third, in
    the order queued; ``drain(leave)`` leaves the most recent."""
    from tallpack.codecs import Chain, Zstd
    from tallpack.container import ContainerWriter

    chain = Chain([Zstd(3)])
    with ContainerWriter(tmp_path / "q.bin", threads=2) as w:
        a, b, c = (w.begin_array("uint8", (8,), chain, 8) for _ in range(3))
        w.queue(a.queued, w.submit([(chain, memoryview(b"a" * 8))])[0])
        w.queue(b.queued, w.submit([(chain, memoryview(b"b" * 8))])[0])
        w.drain(leave=1)
        assert len(a._chunks) == 1 and not b._chunks
        c.add(chain.encode(memoryview(b"c" * 8)))  # writes b's chunk first
        offsets = [x.finish().chunks[0].offset for x in (a, b, c)]
        assert offsets == sorted(offsets)


def _pack_peak(tmp_path, n: int, tasks: int = 4) -> int:
    """Peak RssAnon growth while a fresh process packs base + ``tasks`` safetensors files of one
    tensor of ``n`` float32 elements (the files are mapped, so only working memory counts)."""
    from safetensors.torch import save_file

    d = tmp_path / f"fam{n}"
    d.mkdir()
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g) * 0.02
    save_file({"w": w}, d / "base.safetensors")
    for t in range(tasks):
        save_file({"w": w + 1e-3 * torch.randn(n, generator=g)}, d / f"t{t}.safetensors")
    del w
    return anon_growth("", f"""
tallpack.pack({str(d / "base.safetensors")!r},
              {{f"t{{t}}": {str(d)!r} + f"/t{{t}}.safetensors" for t in range({tasks})}},
              {str(d / "f.tallpack")!r}, threads=2)
""")


def test_packing_memory_does_not_grow_with_the_tensor(tmp_path) -> None:
    """The packer streams each tensor chunk by chunk (4M elements) and computes each chunk in
    sub-blocks (1M): for a tensor of 8M elements (32 MB a member, base + 4 tasks) its working
    memory is chunk buffers in flight (merged vector and masks double-buffered, encodings of the
    previous chunk), about 140 MB above a 1M-element tensor's; it was about 230 MB when the task
    vectors took a whole chunk each. Since the twenty-seventh round the inputs' tensors are read
    into memory of their own (``pread``: a file cut in place is an error, not SIGBUS), 5 x 32 MB
    more: 252-264 MB measured; computing the task vectors whole would add 4 x 32 MB again."""
    small, large = _pack_peak(tmp_path, 1 << 20), _pack_peak(tmp_path, 8 << 20)
    mb = 1 << 20
    assert large - small <= (6 + 5) * 32 * mb, (small / mb, large / mb)


def test_get_tensor_uses_threads_only_for_inputs_that_decode(tmp_path) -> None:
    """Handing views of raw chunks or cached arrays to threads costs more than reading them: a
    tensor's inputs go to the archive's threads only when two or more of them decode, 1 MiB or more."""
    from tallpack.encodings import encoding_for

    fam_ = _family(5)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(1 << 19, generator=g)
    base = {**fam_["base"], "big": big}
    tasks = {t: {**sd, "big": big + 0.01 * torch.randn(1 << 19, generator=g)} for t, sd in fam_["tasks"].items()}
    for codec, cold in (("raw", False), ("planes", True)):
        tallpack.pack(base, tasks, tmp_path / f"{codec}.tallpack", codec=codec)
        with tallpack.open(tmp_path / f"{codec}.tallpack", threads=2) as fam:
            entry, tt = fam._entry("t0", "big")
            enc = encoding_for(tt.encoding)
            needed = enc.inputs(entry, tt)
            planar = fam._planar_keys(enc, entry, tt, needed)
            assert planar == (("base", "merged") if codec == "planes" and kernels.COMPILED else ())
            assert fam._worth_threads(needed, None, True, planar) is cold
            first = fam.get_tensor("t0", "big")  # decodes base and merged vector, then keeps them
            assert fam._worth_threads(needed, None, True, planar) is False
            assert torch.equal(fam.get_tensor("t0", "big"), first)
            entry, tt = fam._entry("t0", "w")  # 8 KB: not worth a thread whatever the codec
            assert not fam._worth_threads(encoding_for(tt.encoding).inputs(entry, tt), None, True)
