"""Mutation tests (issue 12): valid archives of every encoding, mutated as a damaged disk or an
attacker would, read through every read path. Each case either reads or raises a TallpackError,
within a time bound, with Python's memory peak bounded by a small multiple of the file size.

Three kinds of mutation, each starting from the fuzzing seeds (``tests/fuzz/make_corpus.py``):

- bytes changed anywhere, and the file cut short;
- the manifest edited as JSON (keys deleted, types changed, huge numbers, deep nesting, long
  strings, repeated entries) and re-encoded with a valid zstd frame and CRC, so the checks after
  the manifest's checksum see it;
- chunk bytes changed and every checksum recomputed, so the decoders see the damage.

The atheris harness (``tests/fuzz/fuzz_open.py``) runs the same targets for millions of inputs.
"""

from __future__ import annotations

import importlib.util
import json
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallpack

FUZZ = Path(__file__).resolve().parent / "fuzz"
_spec = importlib.util.spec_from_file_location("fuzz_open", FUZZ / "fuzz_open.py")
fuzz_open = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_open)

#: Bounds each case must meet (generous: the machine is shared; typical cases take 10-50 ms).
SECONDS = 2.0
MEMORY_PER_FILE_BYTE, MEMORY_CONSTANT = 16, 16 << 20
STATS = {"cases": 0, "read": 0, "refused": 0, "slowest_s": 0.0, "peak_bytes": 0, "peak_per_file_byte": 0.0}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    spec = importlib.util.spec_from_file_location("make_corpus", FUZZ / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    work = tmp_path_factory.mktemp("seeds")
    out = list(make_corpus.archives(work).values())
    (work / "warm.tallpack").write_bytes(out[0])
    fuzz_open.exercise(str(work / "warm.tallpack"), str(work / "out"))  # torch's first calls are slow
    return out


def check_case(data: bytes, workdir: Path) -> None:
    path = workdir / "case.tallpack"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fuzz_open.exercise(str(path), str(workdir / "out"))
        outcome = "read"
    except tallpack.TallpackError:
        outcome = "refused"
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    STATS["cases"] += 1
    STATS[outcome] += 1
    STATS["slowest_s"] = max(STATS["slowest_s"], elapsed)
    STATS["peak_bytes"] = max(STATS["peak_bytes"], peak)
    STATS["peak_per_file_byte"] = max(STATS["peak_per_file_byte"], round(peak / max(1, len(data)), 1))
    assert elapsed < SECONDS, f"{elapsed:.2f}s"
    assert peak < MEMORY_PER_FILE_BYTE * len(data) + MEMORY_CONSTANT, f"peak {peak} for {len(data)} bytes"


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow, HealthCheck.data_too_large])


@given(data=st.data())
@settings(max_examples=120, **SETTINGS)
def test_mutated_bytes(seeds, tmp_path, data):
    raw = bytearray(data.draw(st.sampled_from(seeds)))
    for pos, value in data.draw(st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), max_size=6)):
        raw[pos % len(raw)] = value
    cut = data.draw(st.integers(0, 64))
    check_case(bytes(raw[: len(raw) - cut]), tmp_path)


@given(data=st.data(), rng=st.randoms(use_true_random=False))
@settings(max_examples=200, **SETTINGS)
def test_edited_manifests_with_valid_checksums(seeds, tmp_path, data, rng):
    raw = data.draw(st.sampled_from(seeds))
    m = json.loads(fuzz_open.manifest_text(raw))
    for _ in range(data.draw(st.integers(1, 3))):
        m = fuzz_open.edit_json(m, rng)
    compress = data.draw(st.booleans())
    m_off = fuzz_open.FOOTER.unpack(raw[-fuzz_open.FOOTER.size:])[0]
    check_case(fuzz_open.reframe(raw[:m_off], json.dumps(m).encode(), compress), tmp_path)


@given(data=st.data())
@settings(max_examples=80, **SETTINGS)
def test_damaged_chunks_with_recomputed_checksums(seeds, tmp_path, data):
    raw = data.draw(st.sampled_from(seeds))
    m_off = fuzz_open.FOOTER.unpack(raw[-fuzz_open.FOOTER.size:])[0]
    area = bytearray(raw[:m_off])
    for pos, value in data.draw(st.lists(st.tuples(st.integers(16, 2**32), st.integers(0, 255)),
                                         min_size=1, max_size=8)):
        area[16 + pos % (len(area) - 16)] = value
    check_case(fuzz_open.resum(bytes(area) + raw[m_off:]), tmp_path)


def test_every_bit_of_the_header_and_footer_is_covered(seeds, tmp_path):
    """A flipped bit in the header (the minor version included) or the footer is refused by open
    or reported by verify."""
    raw = seeds[0]
    path = tmp_path / "h.tallpack"
    for pos in [*range(16), *range(len(raw) - 32, len(raw))]:
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            try:
                with tallpack.open(path) as fam:
                    assert fam.verify(), f"bit {bit} of byte {pos} went unnoticed"
            except tallpack.TallpackError:
                pass


def test_zz_report_figures(capsys):
    """Print the figures RELIABILITY.md quotes (run with -s to see them)."""
    with capsys.disabled():
        print(f"\nmutation cases: {STATS}")
    assert STATS["cases"] == 0 or STATS["refused"] > 0
