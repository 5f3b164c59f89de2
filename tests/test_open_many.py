"""Opening an archive of many task entries: what the open archive holds per entry, the refs'
shared headers, and the layout check (every chunk in the data area, no two overlapping)."""

from __future__ import annotations

import json
import pickle
from dataclasses import FrozenInstanceError

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.arrays import ArrayRef, Chunk
from tallpack.container import HEADER, ContainerReader
from tallpack.errors import FormatError
from tallpack.storage import open_bytes
from test_fuzz import manifest_of, with_manifest

TASKS, TENSORS = 4, 150


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """4 tasks x 150 ungrouped tensors of 16 elements: 600 task entries, each a mask array."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(16, generator=g) for i in range(TENSORS)}
    tasks = {f"t{k}": {n: v + 0.01 * torch.randn(16, generator=g) for n, v in base.items()} for k in range(TASKS)}
    out = tmp_path_factory.mktemp("many") / "many.tallpack"
    tallpack.pack(base, tasks, out, group=False, progress=False, threads=1)
    return out


def masks(fam) -> list[ArrayRef]:
    return [tt.arrays["mask"] for e in fam.manifest.tensors for tt in e.tasks.values() if "mask" in tt.arrays]


def test_refs_of_one_header_share_it(many):
    """The masks' refs share their dtype, shape, codecs and chain, and hold no dict of their own:
    an archive of 64,000 task entries held 2.4 KB of Python objects per entry, a copy of each
    mask's codec configs among them."""
    with tallpack.open(many) as fam:
        refs = masks(fam)
        assert len(refs) == TASKS * TENSORS
        first = refs[0]
        for ref in refs:
            assert not hasattr(ref, "__dict__")
            assert ref.shape is first.shape and ref.codecs is first.codecs and ref.chain is first.chain
            assert ref.dtype == "bool" and ref.numel == 16 and ref.nbytes == 16 and len(ref.chunks) == 1
        shapes = {id(tt.shape) for e in fam.manifest.tensors for tt in e.tasks.values()}
        assert len(shapes) == 1  # the task entries' shapes too (check_shape)


def test_refs_read_as_before(many):
    """Shared headers change no bits: every task reads what it read, and a ref is still an
    immutable value that compares, pickles and writes back as it was parsed."""
    raw = many.read_bytes()
    manifest = manifest_of(raw)
    with tallpack.open(many) as fam:
        for e, d in zip(fam.manifest.tensors, manifest["tensors"]):
            for task, tt in e.tasks.items():
                ref = tt.arrays["mask"]
                assert ref.to_dict() == d["tasks"][task]["mask"]
                assert ArrayRef.from_dict(ref.to_dict(), "x") == ref
                assert pickle.loads(pickle.dumps(ref)) == ref
        ref = masks(fam)[0]
        made = ArrayRef(ref.dtype, ref.shape, ref.codecs, ref.chunk_elements, ref.chunks)
        assert made == ref and made.chain.ids() == ref.chain.ids() == ["bitpack", "zstd"]
        assert ref != ArrayRef(ref.dtype, ref.shape, ref.codecs, ref.chunk_elements, (Chunk(0, 1, 2),))
        with pytest.raises(FrozenInstanceError):
            ref.chunks = ()  # type: ignore[misc]
        sd = fam.state_dict("t1")
        assert sorted(sd) == sorted(f"layer.{i}.weight" for i in range(TENSORS))
        with tallpack.open(many) as again:
            for name in list(sd)[:20]:
                assert torch.equal(again.get_tensor("t1", name), sd[name])


@pytest.mark.parametrize("field,value", [("level", 3.0), ("level", True), ("level", "3"), ("level", [3]),
                                         ("shape", [16.0]), ("shape", [True] * 16), ("chunk_elements", 8.0),
                                         ("chunk_elements", True), ("dtype", ["bool"])])
def test_a_shared_header_tells_json_types_apart(field, value):
    """A header checked once is not taken for one that only compares equal to it (``3`` and
    ``3.0``, ``1`` and ``true``): each is checked, and refused."""
    def entry(**change):
        d = {"dtype": "bool", "shape": [16], "codecs": [{"id": "bitpack"}, {"id": "zstd", "level": 3}],
             "chunk_elements": 8, "chunks": [[64, 1, 0], [128, 1, 0]]}
        if "level" in change:
            d["codecs"][1]["level"] = change.pop("level")
        return d | change

    ArrayRef.from_dict(entry(), "x")
    ArrayRef.from_dict(entry(), "x")  # checked once, then found
    with pytest.raises(FormatError, match="^y: "):
        ArrayRef.from_dict(entry(**{field: value}), "y")


def _rule(spans: list[tuple[int, int, int, str]], data_end: int) -> str | None:
    """The rule, chunk by chunk: the chunks sorted by (offset, size), stably in the order their
    arrays were registered; each starts at or after the one before it ends, and ends by the
    manifest. The first chunk that breaks it, named by its array (of two arrays declaring one
    chunk, the later: the one a tampered manifest changed), or None."""
    end = HEADER.size
    for off, n, _, w in sorted(spans, key=lambda s: s[:2]):
        if off < end or off + n > data_end:
            return f"{w}: chunk at {off}"
        end = off + n
    return None


@given(st.lists(st.lists(st.tuples(st.one_of(st.integers(0, 400), st.integers(0, 2**63 - 1)),
                                   st.one_of(st.integers(0, 64), st.integers(0, 2**63 - 1)),
                                   st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))), min_size=1, max_size=3),
                min_size=0, max_size=12))
@settings(max_examples=300, deadline=None)
def test_layout_check_says_what_the_chunk_by_chunk_rule_says(archive_file, arrays):
    """Random chunk spans (offsets and sizes near 2**63 too, checksums past it): the check refuses
    exactly what the rule refuses, naming the same array and chunk offset."""
    c = ContainerReader(open_bytes(str(archive_file)), "a.tallpack")
    try:
        spans = []
        for i, chunks in enumerate(arrays):
            ref = ArrayRef("uint8", (8 * len(chunks),), (), 8, tuple(Chunk(*x) for x in chunks))
            c.register(ref, ("t", f"k{i}") if i % 2 else f"array {i}")
            spans += [(*x, f"tensor 't' (k{i})" if i % 2 else f"array {i}") for x in chunks]
        expected = _rule(spans, c.data_end)
        if expected is None:
            c.check_layout()
        else:
            with pytest.raises(FormatError) as e:
                c.check_layout()
            assert str(e.value) == f"a.tallpack: {expected} overlaps another or the manifest"
    finally:
        c.close()


@pytest.fixture(scope="module")
def archive_file(tmp_path_factory):
    """A small archive: the layout check sees only the chunks registered on it, and opening
    ``many`` (its manifest) once per example was most of the property's time."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, generator=g)}
    out = tmp_path_factory.mktemp("small") / "small.tallpack"
    tallpack.pack(base, {t: {"w": base["w"] + 0.01 * torch.randn(16, generator=g)} for t in "ab"}, out,
                  progress=False, threads=1)
    return out


@pytest.mark.parametrize("change", ["past the end", "overlap", "before the data"])
def test_a_bad_span_in_a_large_manifest_is_refused_at_open(many, tmp_path, change):
    """A span out of the data area or over another one, among 600, is refused when the archive
    opens, naming the tensor and task array; offsets near 2**63 do not wrap around."""
    raw = many.read_bytes()
    manifest = manifest_of(raw)
    entry = manifest["tensors"][100]
    chunk = entry["tasks"]["t2"]["mask"]["chunks"][0]
    chunk[0] = {"past the end": 2**63 - 1, "overlap": manifest["tensors"][3]["tasks"]["t0"]["mask"]["chunks"][0][0],
                "before the data": 8}[change]
    p = tmp_path / "bad.tallpack"
    p.write_bytes(with_manifest(raw, manifest))
    with pytest.raises(FormatError, match="overlaps another or the manifest"):
        tallpack.open(p)
    if change != "overlap":  # an overlap names whichever of the two sorts second
        with pytest.raises(FormatError, match=f"tensor {json.dumps(entry['name'])[1:-1]!r} \\(t2/mask\\)"):
            tallpack.open(p)


@pytest.mark.parametrize("change", ["the whole chunk", "the offset"])
def test_a_chunk_copied_over_another_names_the_entry_changed(tmp_path, change):
    """Task t1's mask chunk set to t0's: the error names t1's mask, the entry a user has to fix,
    not t0's, whatever the checksums' order (it named the first array holding that chunk)."""
    base = {"w": torch.linspace(-1, 1, 64 * 33).reshape(64, 33)}
    tasks = {f"t{i}": {"w": base["w"] + 0.01 * torch.sin(torch.arange(64 * 33.0) * (i + 1)).reshape(64, 33)}
             for i in range(3)}
    src = tmp_path / "a.tallpack"
    tallpack.pack(base, tasks, src, merge={"method": "ties", "top_k": 0.2}, record_paths=False)
    raw = src.read_bytes()
    manifest = manifest_of(raw)
    entry = next(e for e in manifest["tensors"] if e["tasks"])
    t0, t1 = entry["tasks"]["t0"]["mask"], entry["tasks"]["t1"]["mask"]
    if change == "the whole chunk":
        t1["chunks"] = json.loads(json.dumps(t0["chunks"]))
    else:
        t1["chunks"][0][0] = t0["chunks"][0][0]
    p = tmp_path / "bad.tallpack"
    p.write_bytes(with_manifest(raw, manifest))
    # a whole chunk copied: the later entry's (t1's); an offset alone: whichever sorts second by size
    with pytest.raises(FormatError, match=r"\(t1/mask\): chunk at" if change == "the whole chunk"
                       else r"\(t[01]/mask\): chunk at"):
        tallpack.open(p)


def test_refs_hash_as_the_dataclass_did_and_old_pickles_load():
    """A ref without codec dicts (every array of a raw archive) hashes, equal refs alike; one with
    codec dicts is unhashable, as the frozen dataclass was. A ref pickled as that dataclass (its
    fields as the state) loads as a ref with a shared header."""
    raw_ref = ArrayRef("float32", (4,), (), 8, (Chunk(16, 16, 1),))
    assert hash(raw_ref) == hash(ArrayRef("float32", (4,), (), 8, (Chunk(16, 16, 1),)))
    assert len({raw_ref, ArrayRef("float32", (4,), (), 8, (Chunk(16, 16, 1),))}) == 1
    zref = ArrayRef("float32", (4,), ({"id": "zstd", "level": 3},), 8, (Chunk(16, 12, 1),))
    with pytest.raises(TypeError):
        hash(zref)
    old = ArrayRef.__new__(ArrayRef)
    old.__setstate__({"dtype": "float32", "shape": [4], "codecs": ({"id": "zstd", "level": 3},),
                      "chunk_elements": 8, "chunks": (Chunk(16, 12, 1),)})
    assert old == zref
    assert pickle.loads(pickle.dumps(old)) == zref
