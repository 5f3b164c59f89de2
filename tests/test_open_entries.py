"""Opening an archive of many task entries: what each parsed task entry holds (slotted, the shared
read-only empty mapping for absent arrays, params and fields, one string per dtype and encoding
name), and that the entries read back as they were written, every check still made."""

from __future__ import annotations

import copy
import gc
import pickle
import re
import tracemalloc
from dataclasses import FrozenInstanceError

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack.arrays import ArrayRef
from tallpack.encodings import TaskTensor, TensorEntry
from tallpack.errors import FormatError
from test_fuzz import manifest_of

TASKS, TENSORS = 4, 150


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """4 tasks x 150 ungrouped tensors of 16 elements (600 ``tall`` task entries), and 20 frozen
    tensors (80 ``shared`` task entries: no arrays, no params)."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(16, generator=g) for i in range(TENSORS)}
    frozen = {f"frozen.{i}": torch.randn(4, generator=g) for i in range(20)}
    tasks = {f"t{k}": {**{n: v + 0.01 * torch.randn(16, generator=g) for n, v in base.items()}, **frozen}
             for k in range(TASKS)}
    out = tmp_path_factory.mktemp("entries") / "many.tallpack"
    tallpack.pack({**base, **frozen}, tasks, out, group=False, progress=False, threads=1)
    return out


def _task_entries(fam) -> list[TaskTensor]:
    return [tt for e in fam.manifest.tensors for tt in e.tasks.values()]


def test_a_parsed_task_entry_holds_no_dicts_of_its_own_where_it_has_nothing(many):
    """Slotted entries; the absent arrays, params and optional fields of every entry one shared
    empty mapping; the encoding and dtype names one string each: an archive of 64,000 task
    entries held an attribute dict, three small dicts and two strings per entry."""
    with tallpack.open(many) as fam:
        entries = _task_entries(fam)
        assert len(entries) == TASKS * (TENSORS + 20)
        for e in fam.manifest.tensors:
            assert not hasattr(e, "__dict__")
        first = {}
        for tt in entries:
            assert not hasattr(tt, "__dict__")
            assert tt.extras == {} and tt.extras is entries[0].extras
            f = first.setdefault(tt.encoding, tt)
            assert tt.encoding is f.encoding and tt.dtype is f.dtype and tt.shape is f.shape
            if tt.encoding == "shared":
                assert tt.arrays is tt.params is tt.extras
        assert {tt.encoding for tt in entries} == {"tall", "shared"}
        empty = entries[0].extras
        for change in (lambda: empty.__setitem__("exact", 1), lambda: empty.update(exact=1),
                       lambda: empty.setdefault("exact", 1), lambda: empty.pop("exact", None), empty.clear):
            with pytest.raises(TypeError, match="read-only"):
                change()
        assert empty == {} and copy.deepcopy(empty) is empty and pickle.loads(pickle.dumps(empty)) is empty
        with pytest.raises(FrozenInstanceError):
            entries[0].dtype = "float16"  # type: ignore[misc]


def test_an_open_archive_holds_less_per_task_entry(many):
    """Python objects the open archive holds per task entry (this small archive's fixed costs count
    too): 3.0 KB before refs shared their headers and the layout check let go of its names, 1.45 KB
    before the entries were slotted and shared their empty mappings and names, 0.97 KB after
    (2,408, 1,242 and 816 bytes on one of 64,000 task entries)."""
    tallpack.open(many).close()  # imports and caches made
    gc.collect()
    tracemalloc.start()
    try:
        fam = tallpack.open(many)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    with fam:
        entries = len(_task_entries(fam))
    assert held / entries < 1200, f"{held / entries:.0f} bytes per task entry"


def test_entries_read_back_as_written(many):
    """Every entry of the archive parses to what the manifest says, compares equal to the same
    entry made with the public constructors (plain dicts), and pickles and copies."""
    manifest = manifest_of(many.read_bytes())
    with tallpack.open(many) as fam:
        for e, d in zip(fam.manifest.tensors, manifest["tensors"], strict=True):
            assert e.to_dict() == d
            made = TensorEntry(e.name, e.kind, {t: TaskTensor(tt.encoding, tt.dtype, tt.shape, dict(tt.arrays),
                                                               dict(tt.params), dict(tt.extras))
                                                for t, tt in e.tasks.items()}, dict(e.arrays), e.members)
            assert made == e and e == made
            assert pickle.loads(pickle.dumps(e)) == e == copy.deepcopy(e)
        sd = fam.state_dict("t2")
        assert torch.equal(sd["layer.7.weight"], fam.get_tensor("t2", "layer.7.weight"))


# -- hypothesis: tensor entries made from their parts ------------------------------------------------

def _ref(dtype: str, shape: tuple[int, ...], seed: int) -> dict:
    """An uncompressed array entry of that dtype and shape, chunked by 8 elements."""
    size = {"bool": 1, "uint8": 1, "float32": 4, "float16": 2, "bfloat16": 2, "uint16": 2, "uint32": 4}[dtype]
    n = 1
    for s in shape:
        n *= s
    chunks = [[64 + 8 * size * i + seed, min(8, n - 8 * i) * size, seed + i] for i in range(-(-n // 8))]
    return {"dtype": dtype, "shape": list(shape), "codecs": [], "chunk_elements": 8, "chunks": chunks}


@st.composite
def tensor_entries(draw):
    """A merged tensor entry in the manifest's own order of keys: a base and merged vector (TIES
    ``counts`` sometimes), and per task a ``tall`` entry (an exact residual sometimes), a
    ``tall-derived`` one, or one of an encoding this reader does not know."""
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    n = 1
    for s in shape:
        n *= s
    base_dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    tasks = {}
    for k in range(draw(st.integers(1, 6))):
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
        residual = {"float32": "uint32", "float16": "uint16", "bfloat16": "uint16"}[dtype]
        kind = draw(st.sampled_from(["tall", "tall+exact", "tall-derived", "newer"]))
        tt: dict = {"encoding": kind.split("+")[0], "dtype": dtype, "shape": list(shape)}
        if kind.startswith("tall"):
            if kind != "tall-derived":
                tt["mask"] = _ref("bool", shape, k)
            tt["ones"] = draw(st.integers(0, n))
            if kind == "tall-derived":
                tt["lambda"] = draw(st.sampled_from([0, 0.4, 1.5]))
        else:
            tt["encoding"] = "tall-newer"
            tt["codes"] = [1, 2, 3]
        if kind in ("tall+exact", "tall-derived"):
            tt["exact"] = {"reference": "base" if kind == "tall-derived" else "tall", "transform": "sub",
                           "order": "exponent", "residual": _ref(residual, shape, 100 + k), "xxh3": k}
        tasks[f"task {k}"] = tt
    d = {"name": draw(st.sampled_from(["w", "layer.0.weight", "é/ü"])), "kind": "merged", "tasks": tasks,
         "base": _ref(base_dtype, shape, 1000), "merged": _ref("float32", shape, 2000)}
    if draw(st.booleans()):
        d["counts"] = _ref("uint8", shape, 3000)
    return d


@given(tensor_entries())
@settings(max_examples=150, deadline=None)
def test_tensor_entries_read_back_equal(d):
    """A tensor entry parses and writes back as it was, equals one made from plain dicts, and
    pickles; an entry of an encoding this reader does not know keeps only its common fields."""
    e = TensorEntry.from_dict(d, set(d["tasks"]))
    assert e.to_dict()["tasks"].keys() == d["tasks"].keys()
    for t, tt in e.tasks.items():
        if tt.encoding == "tall-newer":
            assert tt.to_dict() == {k: d["tasks"][t][k] for k in ("encoding", "dtype", "shape")}
            assert tt.arrays == tt.params == tt.extras == {}
        else:
            assert tt.to_dict() == d["tasks"][t]
    known = {t: tt for t, tt in d["tasks"].items() if tt["encoding"] != "tall-newer"}
    assert TensorEntry.from_dict(e.to_dict(), set(d["tasks"])) == e
    again = TensorEntry.from_dict({**d, "tasks": known}, set(d["tasks"]))
    assert again.to_dict() == {**d, "tasks": known}
    made = TensorEntry(e.name, e.kind, {t: TaskTensor(tt.encoding, tt.dtype, tt.shape, dict(tt.arrays), dict(tt.params),
                                                      dict(tt.extras)) for t, tt in e.tasks.items()}, dict(e.arrays))
    assert made == e and pickle.loads(pickle.dumps(e)) == e


@given(tensor_entries(), st.data())
@settings(max_examples=150, deadline=None)
def test_every_task_entry_is_still_checked(d, data):
    """The tensor entry's base, merged vector and counts are checked once per shape, not once per
    task: a task of another shape, or a bad count of set bits in any task, is still refused,
    naming that task."""
    tasks = [t for t, tt in d["tasks"].items() if tt["encoding"] != "tall-newer"]
    if not tasks:
        return
    t = data.draw(st.sampled_from(tasks))
    tt = d["tasks"][t]
    n = 1
    for s in tt["shape"]:
        n *= s
    if data.draw(st.booleans()):
        tt["ones"] = data.draw(st.sampled_from([n + 1, -1, 1.0, None]))
        message = "bad count of set mask bits"
    else:  # another shape for this task alone, its arrays made to fit it
        shape = [n + 1]
        tt["shape"] = shape
        for key in ("mask",):
            if key in tt:
                tt[key] = _ref("bool", tuple(shape), 7)
        if "exact" in tt:
            tt["exact"]["residual"] = _ref(tt["exact"]["residual"]["dtype"], tuple(shape), 8)
        message = "shape differs from the base's"
    with pytest.raises(FormatError, match=re.escape(f"tensor {d['name']!r}, task {t!r}: {message}")):
        TensorEntry.from_dict(d, set(d["tasks"]))
