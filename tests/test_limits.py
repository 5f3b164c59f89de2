"""Cost bombs and numbers that are not numbers (issue 12, classes 1 and 2): a small file never
makes ``open`` slow or large, and every number is range-checked where the manifest is read.

Each hostile archive is refused with a FormatError within a second, with Python's memory peak
under a small multiple of the file size plus a constant (spec §7 states the limits)."""

from __future__ import annotations

import json
import re
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack import limits
from tallpack.container import FOOTER
from tallpack.errors import FormatError, OutputError, TallpackError
from tallpack.sharding import plan_from_layout
from tallpack_cli.main import main


def frame(raw: bytes, text: bytes, *, compress: bool = True) -> bytes:
    """``raw``'s data area with ``text`` as its manifest (a hostile writer: valid CRC and frame)."""
    m_off = FOOTER.unpack(raw[-FOOTER.size:])[0]
    stored = zstandard.ZstdCompressor(level=19).compress(text) if compress else text
    return raw[:m_off] + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), int(compress), b"TALLPEND")


def manifest_of(raw: bytes) -> dict:
    m_off, m_len, *_ = FOOTER.unpack(raw[-FOOTER.size:])
    return json.loads(zstandard.ZstdDecompressor().decompress(raw[m_off:m_off + m_len]))


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 8, generator=g), "n": torch.tensor([1, 2, 3])}
    tasks = {t: {"w": base["w"] + 0.1 * torch.randn(16, 8, generator=g), "n": base["n"]} for t in "ab"}
    out = tmp_path_factory.mktemp("limits") / "seed.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=64)
    return out.read_bytes()


def refused_quickly(tmp_path, data: bytes, match: str, *, seconds: float = 1.0) -> None:
    p = tmp_path / "bomb.tallpack"
    p.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError, match=match):
            tallpack.open(p)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f}s"
    assert peak < 16 * len(data) + (8 << 20), f"peak {peak} bytes for a {len(data)}-byte file"


def _merged_ref(m: dict) -> dict:
    return next(t for t in m["tensors"] if t["kind"] == "merged")["merged"]


# -- class 1: cost bombs ----------------------------------------------------------------------------

def test_a_manifest_that_expands_to_250_mib_is_refused_before_decompressing(seed, tmp_path):
    text = b'{"format": "tallpack", "x": "' + b"a" * (250 << 20) + b'"}'
    data = frame(seed, text)
    assert len(data) < 64 << 10
    refused_quickly(tmp_path, data, "announces .* at most")


def test_a_list_of_millions_of_entries_is_refused(seed, tmp_path):
    m = manifest_of(seed)
    m["tasks"][0]["keys"] = ["w"] * 3_000_000
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "announces")
    # stored as is it is bounded by the file's own size; the repeated key is refused
    m["tasks"][0]["keys"] = ["w"] * 20_000
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode(), compress=False), "listed twice")


def test_millions_of_zero_size_chunks_are_refused(seed, tmp_path):
    m = manifest_of(seed)
    ref = _merged_ref(m)
    n = 2_000_000
    ref.update(shape=[8 * n], chunk_elements=8, chunks=[[64, 0, 0]] * n)
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "announces")
    n = 5_000  # few enough for the manifest bound: then each chunk needs stored bytes
    ref.update(shape=[8 * n], chunk_elements=8, chunks=[[64, 0, 0]] * n)
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "cannot decode")


def test_a_codec_chain_of_a_million_steps_is_refused(seed, tmp_path):
    m = manifest_of(seed)
    _merged_ref(m)["codecs"] = [{"id": "bytegroup", "itemsize": 4}] * 1_000_000
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "announces")
    _merged_ref(m)["codecs"] = [{"id": "bytegroup", "itemsize": 4}] * (limits.MAX_CHAIN + 1)
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "at most 4 codecs")


@pytest.mark.parametrize("codecs, nbytes", [
    ([{"id": "zstd", "level": 3}], 100),      # zstd cannot expand 100 bytes to 1 GiB
    ([], 100),                                # raw: stored bytes are the element bytes
    ([{"id": "bytegroup", "itemsize": 4}], 1 << 29),
])
def test_a_1_gib_array_over_no_data_is_refused(seed, tmp_path, codecs, nbytes):
    m = manifest_of(seed)
    ref = _merged_ref(m)
    ref.update(shape=[1 << 28], chunk_elements=1 << 28, codecs=codecs, chunks=[[64, nbytes, 0]])
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "cannot decode")


def test_zstd_bound_is_the_format_maximum():
    """The ratio the reader allows is what zstd itself cannot exceed: 128 MiB of zeros, the best
    case, compresses to more than 1/32768 of its size at every level."""
    data = bytes(128 << 20)
    for level in (-5, 1, 3, 19):
        stored = zstandard.ZstdCompressor(level=level).compress(data)
        assert len(data) <= limits.ZSTD_MAX_RATIO * len(stored)


def test_deep_nesting_and_long_names_are_refused(seed, tmp_path):
    m = manifest_of(seed)
    deep: list = []
    for _ in range(limits.MAX_DEPTH):
        deep = [deep]
    m["metadata"] = {"deep": deep}
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "nest deeper")
    m = manifest_of(seed)
    m["tasks"][0]["name"] = "t" * (limits.MAX_NAME_CHARS + 1)
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "at most 4096 characters")
    m = manifest_of(seed)
    _merged_ref(m)["shape"] = [1] * (limits.MAX_DIMS + 1)
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "at most 32 dimensions")
    m = manifest_of(seed)
    e = next(t for t in m["tensors"] if t["kind"] == "merged")
    e["base"]["shape"] = e["merged"]["shape"] = [0, 1 << 40, 1 << 40]
    refused_quickly(tmp_path, frame(seed, json.dumps(m).encode()), "shape too large")


def test_the_writer_stores_a_manifest_that_compresses_too_well_as_is(tmp_path):
    import torch

    base = {"w": torch.zeros(8)}
    out = tmp_path / "meta.tallpack"
    tallpack.pack(base, {"a": {"w": torch.ones(8)}}, out, metadata={"note": "x" * (4 << 20)})
    raw = out.read_bytes()
    assert FOOTER.unpack(raw[-FOOTER.size:])[3] == 0  # flags: not compressed
    with tallpack.open(out) as fam:
        assert fam.manifest.metadata["note"] == "x" * (4 << 20)
        assert fam.verify() == []


def test_every_limit_holds_for_what_the_writer_writes(seed):
    m = manifest_of(seed)
    assert len(json.dumps(m)) <= limits.max_manifest_bytes(len(seed))


# -- class 2: numbers that are not numbers ----------------------------------------------------------

BIG = ["1e999", "-1e999", "1" + "0" * 400, "-" + "9" * 40, "1e400", "18446744073709551616"]


def _set(m: dict, where: str, token: str) -> str:
    marker = "__NUMBER__"
    if where == "format_version":
        m["format_version"] = [1, marker]
    elif where == "lambda":
        m["tasks"][0]["lambda"] = marker
    elif where == "density":
        m["tasks"][0]["density"] = marker
    elif where == "source_bytes":
        m["stats"]["source_bytes"] = marker
    elif where == "rel_l2":
        m["tasks"][0]["fidelity"]["rel_l2"] = marker
    elif where == "shape":
        _merged_ref(m)["shape"] = [marker]
    elif where == "offset":
        _merged_ref(m)["chunks"][0][0] = marker
    elif where == "level":
        _merged_ref(m)["codecs"][-1]["level"] = marker
    elif where == "ones":
        next(t for t in m["tensors"] if t["kind"] == "merged")["tasks"]["a"]["ones"] = marker
    elif where == "source.bytes":
        m["tasks"][0]["source"]["bytes"] = marker
    return json.dumps(m).replace(f'"{marker}"', token)


WHERE = ["format_version", "lambda", "density", "source_bytes", "rel_l2", "shape", "offset", "level",
         "ones", "source.bytes"]


@pytest.mark.parametrize("where", WHERE)
def test_huge_numbers_are_format_errors_everywhere(seed, tmp_path, where):
    p = tmp_path / "n.tallpack"
    for token in BIG:
        p.write_bytes(frame(seed, _set(manifest_of(seed), where, token).encode()))
        with pytest.raises(FormatError):
            tallpack.open(p)
        for cmd in ("inspect", "verify"):
            r = CliRunner().invoke(main, [cmd, str(p)])
            assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_huge_numbers_are_refused_with_pythons_digit_limit_turned_off(seed, tmp_path):
    """With ``sys.set_int_max_str_digits(0)`` the parser's hooks refuse long numbers unparsed."""
    p = tmp_path / "n.tallpack"
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        for where in ("offset", "lambda"):
            for token in BIG:
                p.write_bytes(frame(seed, _set(manifest_of(seed), where, token).encode()))
                with pytest.raises(FormatError):
                    tallpack.open(p)
            p.write_bytes(frame(seed, _set(manifest_of(seed), where, "1" * 20_000).encode()))
            with pytest.raises(FormatError, match="integer of 20000 digits"):  # refused unparsed
                tallpack.open(p)
    finally:
        sys.set_int_max_str_digits(old)


def test_an_integer_past_pythons_digit_limit_is_refused_in_the_readers_words(seed, tmp_path):
    """Python's own refusal of a 5,000-digit integer ("use sys.set_int_max_str_digits()") is advice
    for programmers: the reader says what is wrong with the archive instead."""
    p = tmp_path / "n.tallpack"
    p.write_bytes(frame(seed, _set(manifest_of(seed), "offset", "9" * 5000).encode()))
    with pytest.raises(FormatError, match=r"integer of 5000 digits \(integers lie in"):
        tallpack.open(p)
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 1 and "sys." not in r.output and "integer of 5000 digits" in r.output, r.output


@pytest.mark.parametrize("where, token", [("lambda", "-0.5"), ("density", "1.5"), ("lambda", "true"),
                                          ("source_bytes", "-1"), ("source_bytes", "1.5"),
                                          ("format_version", "65536"), ("ones", "-1")])
def test_numbers_out_of_their_range_are_refused(seed, tmp_path, where, token):
    p = tmp_path / "n.tallpack"
    p.write_bytes(frame(seed, _set(manifest_of(seed), where, token).encode()))
    with pytest.raises(TallpackError):
        tallpack.open(p)


def test_metadata_that_is_not_an_object_is_refused(seed, tmp_path):
    p = tmp_path / "n.tallpack"
    for edit in (lambda m: m["base"].__setitem__("metadata", [1, 2]),
                 lambda m: m["tasks"][0].__setitem__("fidelity", [["rel_l2", 1]]),
                 lambda m: m.__setitem__("merge", [["method", "ta"]])):
        m = manifest_of(seed)
        edit(m)
        p.write_bytes(frame(seed, json.dumps(m).encode()))
        with pytest.raises(FormatError, match="must be an object|malformed"):
            tallpack.open(p)


# -- what a task records of its folder: the shard layout and the exact tier's file records -----------

def _model_folder(path, sd: dict, shards: list[list[str]] | None = None):
    """A Hugging Face style folder: ``model.safetensors``, or ``shards`` (key lists) with an index;
    config.json and sub/notes.txt beside."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    if shards is None:
        save_file(sd, path / "model.safetensors")
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        for name, keys in zip(names, shards):
            save_file({k: sd[k] for k in keys}, path / name)
        index = {"metadata": {"total_size": 1}, "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text('{"model_type": "toy"}')
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("hello")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> bytes:
    """Task 'cars' a sharded folder (two shards, an index), 'dtd' one file; packed with the exact tier."""
    import torch

    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g), "c": torch.arange(6)}
    root = tmp_path_factory.mktemp("folders")
    tasks = {}
    for t, shards in (("cars", [["a"], ["b", "c"]]), ("dtd", None)):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        tasks[t] = _model_folder(root / t, sd, shards)
    out = root / "f.tallpack"
    tallpack.pack(_model_folder(root / "base", base), tasks, out, exact=True)
    return out.read_bytes()


def _edited(folders: bytes, tmp_path, edit) -> "tallpack.Archive":
    """The archive with ``edit(task 'cars' of the manifest)`` applied (a hostile writer), open."""
    m = manifest_of(folders)
    edit(next(t for t in m["tasks"] if t["name"] == "cars"))
    p = tmp_path / "edited.tallpack"
    p.write_bytes(frame(folders, json.dumps(m).encode(), compress=False))
    return tallpack.open(p)


def _reference_plan(keys: list[str], runs: list) -> dict | None:
    """What a recorded layout means (spec §3.6), the obvious way."""
    if len(runs) > len(keys) or sum(n for _, n in runs) != len(keys):
        return None
    plan: dict = {}
    at = 0
    for f, n in runs:
        plan.setdefault(f, []).extend(keys[at:at + n])
        at += n
    return {f: ks for f, ks in plan.items() if ks}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), runs=st.lists(st.tuples(st.sampled_from(["x.safetensors", "y.safetensors",
                                                                     "z.safetensors"]), st.integers(0, 4)),
                                          min_size=1, max_size=12))
def test_a_recorded_layout_places_the_keys_by_its_runs_or_is_ignored(n, runs):
    """Runs that add up to the keys place them, in order (a file of several runs gathers them);
    a layout that does not add up, or has more runs than keys (runs of 0 only), is ignored."""
    keys = [f"k{i}" for i in range(n)]
    assert plan_from_layout(keys, [list(r) for r in runs]) == _reference_plan(keys, runs)


def test_a_huge_recorded_run_count_is_ignored_without_allocating_it():
    """F1: a count of 10**7 (3 * 10**8 took 4.9 GB and 49 s) is compared with the keys before
    anything the layout declares is built."""
    tracemalloc.start()
    try:
        plan = plan_from_layout(["a", "b", "c"], [["x.safetensors", 10**7], ["y.safetensors", 3]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plan is None and peak < 1 << 20


def test_many_shard_names_are_planned_as_recorded():
    """F10: one file per tensor, 20,000 of them (the old list lookups were quadratic)."""
    keys = [f"k{i}" for i in range(20_000)]
    plan = plan_from_layout(keys, [[f"m{i}.safetensors", 1] for i in range(20_000)])
    assert plan == {f"m{i}.safetensors": [f"k{i}"] for i in range(20_000)}


@pytest.mark.parametrize("shards", [
    [["model-00001-of-00002.safetensors", 10**7], ["model-00002-of-00002.safetensors", 3]],  # F1
    [[f"m{i}.safetensors", 0] for i in range(2_000)] + [["model.safetensors", 3]],          # F10
    [["model-00001-of-00002.safetensors", 1], ["model-00002-of-00002.safetensors", True]],
])
def test_unpack_writes_one_file_when_the_recorded_layout_is_malformed(folders, tmp_path, shards):
    with _edited(folders, tmp_path, lambda t: t["source"].__setitem__("shards", shards)) as fam:
        path = tallpack.write_task(fam, "cars", tmp_path / "out")
        assert Path(path).name == "model.safetensors"
        assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


@pytest.mark.parametrize("meta", [[1, 2], "x", 5, None])
def test_recorded_index_metadata_that_is_not_an_object_is_ignored(folders, tmp_path, meta):
    """F8: it was a TypeError ('list' object is not a mapping); the index is written without it."""
    with _edited(folders, tmp_path, lambda t: t["source"].__setitem__("index_metadata", meta)) as fam:
        index = Path(tallpack.write_task(fam, "cars", tmp_path / "out"))
        written = json.loads(index.read_text())
        assert index.name == "model.safetensors.index.json" and list(written["metadata"]) == ["total_size"]
        assert set(written["weight_map"]) == {"a", "b", "c"}


def _record(t: dict, name: str) -> dict:
    return next(f for f in t["exact"]["files"] if f["name"] == name)


def _header(t: dict, text: str) -> None:
    _record(t, "model-00002-of-00002.safetensors")["header"] = text


_BAD_RECORDS = {
    "no size": lambda t: _record(t, "model-00001-of-00002.safetensors").pop("size"),
    "size a string": lambda t: _record(t, "model-00001-of-00002.safetensors").__setitem__("size", "99"),
    "no header": lambda t: _record(t, "model-00001-of-00002.safetensors").pop("header"),
    "no text": lambda t: _record(t, "config.json").pop("text"),
    "bad base64": lambda t: _record(t, "config.json").update(base64="abc"),
    "base64 not ascii": lambda t: _record(t, "config.json").update(base64="é" * 4),
    "no role": lambda t: _record(t, "config.json").pop("role"),
    "bad sha256": lambda t: _record(t, "config.json").update(sha256=5),
    "name with a newline": lambda t: _record(t, "config.json").update(name="con\nfig.json"),
    "infinite offset": lambda t: _header(t, re.sub(r'"data_offsets":\[0,\d+\]', '"data_offsets":[0,1e999]',
                                                   _record(t, "model-00002-of-00002.safetensors")["header"])),
    "float offset": lambda t: _header(t, _record(t, "model-00002-of-00002.safetensors")["header"]
                                      .replace('"data_offsets":[0,', '"data_offsets":[0.0,')),
    "header nested 200000 deep": lambda t: _header(t, "[" * 200_000 + "]" * 200_000),
    "header a list": lambda t: _header(t, "[]"),
    "header entry a list": lambda t: _header(t, '{"b": [1]}'),
    "header dtype a list": lambda t: _header(t, '{"b": {"dtype": [], "shape": [4], "data_offsets": [0, 16]}}'),
}


@pytest.mark.parametrize("case", sorted(_BAD_RECORDS))
def test_malformed_exact_file_records_are_format_errors(folders, tmp_path, case):
    """F4: KeyError, OverflowError, RecursionError and binascii.Error became "internal error"; now
    verify lists the problem (exit 1) and an exact unpack refuses, naming the record, writing nothing."""
    with _edited(folders, tmp_path, _BAD_RECORDS[case]) as fam:
        problems = fam.verify()
        assert len(problems) == 1 and "edited.tallpack: task 'cars': file record" in problems[0]
        with pytest.raises(FormatError, match=r"edited\.tallpack: task 'cars': file record"):
            tallpack.write_task(fam, "cars", tmp_path / "out", exact=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "edited.tallpack")])
    assert r.exit_code == 1 and "file record" in r.output and "internal error" not in r.output


def test_exact_unpack_refuses_a_link_in_the_output_that_leads_outside(folders, tmp_path):
    """F5: a file record 'sub/config.json' was written through out/sub -> ../outside, as kept
    folder files are not; refused before anything is written, and nothing lands outside."""
    def edit(t):
        _record(t, "config.json")["name"] = "sub/config.json"
        t["files"].pop("sub/notes.txt")
    (tmp_path / "out").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "out" / "sub").symlink_to("../outside")
    with _edited(folders, tmp_path, edit) as fam:
        with pytest.raises(OutputError, match="leads outside"):
            tallpack.write_task(fam, "cars", tmp_path / "out", exact=True)
    assert list((tmp_path / "outside").iterdir()) == [] and [p.name for p in (tmp_path / "out").iterdir()] == ["sub"]


def test_exact_unpack_refuses_a_record_whose_folder_is_a_kept_file(folders, tmp_path):
    """A file record 'sub/notes.txt/x' beside the kept 'sub/notes.txt': refused before anything
    is written, as such names among the kept files are."""
    with _edited(folders, tmp_path, lambda t: _record(t, "config.json").update(name="sub/notes.txt/x")) as fam:
        with pytest.raises(FormatError, match="task 'cars': files 'sub/notes.txt' and 'sub/notes.txt/x' cannot"):
            tallpack.write_task(fam, "cars", tmp_path / "out", exact=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))
