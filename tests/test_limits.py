"""Cost bombs and numbers that are not numbers (issue 12, classes 1 and 2): a small file never
makes ``open`` slow or large, and every number is range-checked where the manifest is read.

Each hostile archive is refused with a FormatError within a second, with Python's memory peak
under a small multiple of the file size plus a constant (spec §7 states the limits)."""

from __future__ import annotations

import json
import sys
import time
import tracemalloc
import zlib

import pytest
import zstandard
from click.testing import CliRunner

import tallpack
from tallpack import limits
from tallpack.container import FOOTER
from tallpack.errors import FormatError, TallpackError
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
