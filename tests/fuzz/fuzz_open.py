"""Fuzz ``tallpack.open`` and every read path with atheris (not run by pytest; see README.md here).

An input is one byte saying what the rest is, then the rest:

- ``F`` + a whole file, opened as is;
- ``R`` + a whole file whose manifest CRC and chunk checksums the harness recomputes first, as an
  attacker who edits an archive would, so the checks after the checksums (decoders, shapes) see
  the mutated bytes;
- ``M`` + a seed number (one byte) + a manifest's JSON text, framed with a valid CRC after that
  seed archive's data area (``seeds/``), so mutations reach the manifest's validation.

Every input must end normally or in a ``TallpackError``; anything else is a finding. libFuzzer's
``-timeout`` and ``-rss_limit_mb`` bound each input's time and the process's memory.

    python tests/fuzz/make_corpus.py tests/fuzz/corpus
    python tests/fuzz/fuzz_open.py tests/fuzz/corpus -runs=1000000 -timeout=2 -rss_limit_mb=2048
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

FILE, MANIFEST, RESUMMED = b"F", b"M", b"R"
FOOTER = struct.Struct("<QQII8s")
HERE = Path(__file__).resolve().parent


def manifest_text(raw: bytes, limit: int = 8 << 20) -> bytes:
    """The manifest JSON of an archive (harness side: trusting nothing, bounded)."""
    import zstandard

    m_off, m_len, _, flags, _ = FOOTER.unpack(raw[-FOOTER.size:])
    stored = raw[m_off:m_off + m_len]
    if flags & 1:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=limit)
    return stored


def reframe(data_area: bytes, text: bytes, compress: bool) -> bytes:
    import zstandard

    m_off = len(data_area)
    stored = zstandard.ZstdCompressor().compress(text) if compress else text
    return data_area + stored + FOOTER.pack(m_off, len(stored), zlib.crc32(stored), int(compress), b"TALLPEND")


def resum(raw: bytes) -> bytes:
    """Recompute every chunk checksum the manifest lists and the manifest's CRC (an attacker's edit)."""
    from tallpack.checksums import CHECKSUMS

    try:
        m_off, _, _, flags, _ = FOOTER.unpack(raw[-FOOTER.size:])
        m = json.loads(manifest_text(raw))
    except Exception:
        return raw
    fn = CHECKSUMS.get(m.get("checksum", "crc32") if isinstance(m, dict) else None, CHECKSUMS["crc32"])
    stack = [m]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            chunks = v.get("chunks")
            if isinstance(chunks, list):
                for c in chunks:
                    if (isinstance(c, list) and len(c) == 3 and all(type(x) is int for x in c)
                            and 0 <= c[0] <= c[0] + c[1] <= len(raw)):
                        c[2] = fn(raw[c[0]:c[0] + c[1]])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    if m_off > len(raw):
        return raw
    return reframe(raw[:m_off], json.dumps(m).encode(), bool(flags & 1))


_SEEDS: list[bytes] = []


def seeds() -> list[bytes]:
    if not _SEEDS:
        for p in sorted((HERE / "seeds").glob("*.tallpack"), key=lambda p: int(p.stem)):
            raw = p.read_bytes()
            _SEEDS.append(raw[:FOOTER.unpack(raw[-FOOTER.size:])[0]])
    return _SEEDS


def archive_bytes(data: bytes) -> bytes:
    kind, body = data[:1], data[1:]
    if kind == MANIFEST and body and seeds():
        return reframe(seeds()[body[0] % len(seeds())], body[1:], compress=False)
    if kind == RESUMMED:
        return resum(body)
    return body


class _Every:
    """Write outputs for one archive in ``n`` that open (writing is the slowest step)."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def tick(self) -> bool:
        self.i += 1
        return self.i % self.n == 0


_WRITE_EVERY = _Every(int(os.environ.get("TALLPACK_FUZZ_WRITE_EVERY", "8")))
#: Every other input is read with every float32 and bfloat16 tensor rebuilt from its byte planes:
#: the corpus's tensors are below ``reader.PLANAR_MIN_ELEMENTS``, so that path would go unread.
_PLANAR_EVERY = _Every(2)
#: Every third input is read through a cache of a few KB: the arrays that pass it keep only the
#: chunks that fit (reader._decode_planar), read from the plane lengths before decoding; every other
#: one of those through none (``cache_bytes=0``): with the runs below, a large derived merged vector
#: is then derived a run at a time beside the task's output (``derived_merged.task_in_runs``).
_SMALL_CACHE_EVERY = _Every(3)
_NO_CACHE_EVERY = _Every(2)
#: Every fifth archive that opens is also sent through pickle (``Archive.__reduce__``: opened again
#: from its path, and checked to be the same file), as a spawn DataLoader worker receives it.
_PICKLE_EVERY = _Every(5)
#: Every other input is read with the exact tier's originals (and derived merged vectors and masks)
#: rebuilt a run of 8 elements at a time (``exact.RUNS_FROM`` 0), the path of large tensors.
_RUNS_EVERY = _Every(3)


def exercise(path: str, outdir: str) -> None:
    """Everything a user can do with an archive, short of writing one."""
    from tallpack import reader
    from tallpack.encodings import exact

    old = reader.PLANAR_MIN_ELEMENTS
    reader.PLANAR_MIN_ELEMENTS = 0 if _PLANAR_EVERY.tick() else old
    runs = exact.RUNS_FROM, exact.RUN_ELEMENTS
    if _RUNS_EVERY.tick():
        exact.RUNS_FROM, exact.RUN_ELEMENTS = 0, 8
    try:
        _exercise(path, outdir)
    finally:
        reader.PLANAR_MIN_ELEMENTS = old
        exact.RUNS_FROM, exact.RUN_ELEMENTS = runs


def _exercise(path: str, outdir: str) -> None:
    import tallpack
    from tallpack.merging import MERGED_MODELS
    from tallpack.report import render, render_tensors, tensor_rows

    small = _SMALL_CACHE_EVERY.tick()
    with tallpack.open(path, **({"cache_bytes": 0 if _NO_CACHE_EVERY.tick() else 4096} if small else {})) as fam:
        s = fam.summary()
        render(s)
        json.dumps(s)
        render_tensors(tensor_rows(fam.manifest, fam.read_array, fam.packed_bits), list(fam.tasks))  # --tensors
        if _PICKLE_EVERY.tick():
            pickle.loads(pickle.dumps(fam)).close()
        for t in fam.tasks[:1]:  # rows, before anything fills the cache (then the first's from it)
            for k in fam.keys(t):
                part = fam.get_slice(t, k)
                rows = part.get_shape()[0] if part.get_shape() else 0
                if rows:
                    part[0 : max(1, rows // 2)], part[rows // 3 : rows]
        for t in fam.tasks:
            exact = fam.task_info(t).exact is not None
            lazy = fam.state_dict(t, lazy=True)
            [k in lazy for k in fam.keys(t)[:4]], lazy.get("\0no such tensor")
            fam.state_dict(t)
            if exact:
                fam.state_dict(t, exact=True)
                for k in fam.keys(t)[:2]:
                    part = fam.get_slice(t, k, exact=True)
                    if part.get_shape():
                        part[0:1]
        fam.verify()
        fam.chunk_count()
        for e in fam.manifest.tensors:
            fam.base_tensor(e.name)
        method = fam.manifest.merge.get("method")
        from tallpack import merged as merged_module
        for model, needs in MERGED_MODELS.items():
            if needs == method:
                fam.merged(model, **({"k": 1} if model.startswith("consensus") else {}))
                # and built a run of 8 elements at a time (``merged.CHUNKED_FROM``), as large tensors are
                was = merged_module.CHUNKED_FROM, merged_module.RUN_ELEMENTS
                merged_module.CHUNKED_FROM, merged_module.RUN_ELEMENTS = 0, 8
                try:
                    fam.merged(model, **({"k": 1} if model.startswith("consensus") else {}))
                finally:
                    merged_module.CHUNKED_FROM, merged_module.RUN_ELEMENTS = was
        if fam.tasks and _WRITE_EVERY.tick():
            try:
                tallpack.write_task(fam, fam.tasks[0], outdir)
            finally:
                shutil.rmtree(outdir, ignore_errors=True)


def one_input(data: bytes, workdir: str) -> None:
    import tallpack

    path = os.path.join(workdir, "input.tallpack")
    with open(path, "wb") as f:
        f.write(archive_bytes(data))
    try:
        exercise(path, os.path.join(workdir, "out"))
    except tallpack.TallpackError:
        pass


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """Structure-aware half of the time for manifest inputs: edit the parsed JSON as an attacker
    would (delete keys, change types, huge numbers, deep nesting, long strings, repeats)."""
    import atheris

    rng = random.Random(seed)
    if data[:1] == MANIFEST and len(data) > 2 and rng.random() < 0.5:
        try:
            m = json.loads(data[2:])
        except Exception:
            m = None
        if m is not None:
            try:
                edited = json.dumps(edit_json(m, rng), separators=(",", ":")).encode()
            except (ValueError, RecursionError):  # the edits nested too deep for the encoder
                edited = None
            out = data[:2] + edited if edited is not None else b""
            if edited is not None and len(out) <= max_size:
                return out
    kind = data[:1] if data[:1] in (FILE, MANIFEST, RESUMMED) else rng.choice([FILE, MANIFEST, RESUMMED])
    body = data[1:] if data[:1] in (FILE, MANIFEST, RESUMMED) else data
    return kind + atheris.Mutate(body, max(1, max_size - 1))


HOSTILE = [None, True, -1, 0, 1, 2**63, 2**64 - 1, -2**63, 0.5, -0.0, 1e308, "", "x" * 5000, "float32",
           "bool", "zstd", "tall", "dense", "shared", "merged", "ta", "ties", [], {}, [[64, 1, 0]],
           {"id": "zstd", "level": 3}, {"id": "bytegroup", "itemsize": 4}, {"id": "bitpack"}]


def edit_json(m, rng: random.Random):
    paths = []
    stack = [((), m)]
    while stack and len(paths) < 5000:
        p, v = stack.pop()
        paths.append(p)
        if isinstance(v, dict):
            stack.extend((p + (k,), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((p + (i,), x) for i, x in enumerate(v))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        if not path:
            continue
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            op = rng.randrange(6)
            if op == 0 and isinstance(parent, dict):
                parent.pop(key, None)
            elif op == 1 and isinstance(parent, list):
                parent.insert(key, parent[key])  # repeat an entry
            elif op == 2:
                deep = parent[key]
                for _ in range(rng.randint(1, 80)):
                    deep = [deep]
                parent[key] = deep
            elif op == 3 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
                parent[key] = rng.choice([parent[key] + rng.randint(-70, 70), parent[key] * 2**rng.randint(1, 40),
                                          -parent[key], 10**rng.randint(18, 30)])
            elif op == 4 and isinstance(parent[key], list) and parent[key]:
                parent[key] = parent[key] * rng.randint(2, 50)
            else:  # a copy: HOSTILE's lists and dicts must not be edited in place later (a cycle)
                parent[key] = copy.deepcopy(rng.choice(HOSTILE))
        except (KeyError, IndexError, TypeError):
            continue
    return m


def main() -> None:
    import atheris

    import torch  # noqa: F401  (imported uninstrumented: only tallpack is traced)
    import zstandard  # noqa: F401

    with atheris.instrument_imports(include=["tallpack"]):
        import tallpack  # noqa: F401
        import tallpack.reader  # noqa: F401
        import tallpack.outputs  # noqa: F401

    workdir = tempfile.mkdtemp(prefix="tallpack-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    for raw in seeds()[:1]:  # warm torch up before libFuzzer's timer starts
        one_input(FILE + raw, workdir)

    def test_one_input(data: bytes) -> None:
        one_input(data, workdir)

    atheris.Setup(sys.argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
