"""Round 38, a measurement prototype only: what an rANS coder would give on planes-exp's exponent
plane, against our zstd literal setting (``tallpack.codecs._NEAR_LITERAL``) and against ZipNN.

    python benchmarks/rounds/r38/ans_exponent.py [DIR] [--reps 5] [--json FILE]

DIR (default /tmp/r38/perf): a folder ``benchmarks/perf.py --out`` left; its family's base (26M
float32 parameters) is reused, or made there. Nothing in ``tallpack`` changes: the coder is
``ans_exponent.c`` next to this file (static interleaved rANS, 32-bit states, 16-bit words; see
its header), compiled at run time with the system ``cc`` into a temporary folder, twice:
``-O3 -march=native`` and ``-O2`` (portable), and called through ctypes (which lets go of the GIL).

The base's tensors are cut into chunks of 1 << 22 elements, as the container does, and each
chunk's exponent plane is planes-exp's T plane at rotation r = 1: ``(u32 >> 23) & 0xFF``. Sizes:

- zstd: our current plane, ``_NEAR_LITERAL`` (checked equal to the plane length in the chunk that
  ``dense_chain("planes", 4, 3, "float32")`` writes);
- rANS in pieces of 256 KiB with a table each (what ZipNN's pieces are), in such pieces under
  one table for the chunk, and the whole chunk as one piece; each at frequency totals 2^11 and
  2^12; every byte of the format counted (tables, piece lengths, states);
- the zero-order entropy of each chunk (and of each 256 KiB piece) as the bound.

Every coded plane is decoded by both builds and compared with the original. Decode times (medians
of ``--reps``, the variants' order alternated each repetition, 1 thread and 2 threads of a
ThreadPoolExecutor over chunks, each thread decoding into a buffer of its own): the exponent
planes alone, then the full chunk (planes-exp's decode, ``chain.decode``, against the same decode
with the exponent plane from rANS and joined by the same kernel, ``kernels.join_exponent``), and
ZipNN's decode of the whole base. Prints a JSON summary and a table.

Measured (round 38's helper, three runs on a 2-core machine shared with a test suite, load 3-3.5;
sizes are exact, times are not): exponent planes 8,506,669 bytes (zstd) against 8,319,430 (rANS,
256 KiB pieces, 2^12) and 8,318,588 (whole chunks), entropy per chunk 8,309,793; the base would be
0.99787x ZipNN's bytes instead of 1.000025x. rANS decodes the plane 2.8-4.7x slower than zstd's
Huffman (portable -O2: 4.6-5.6x); a full chunk decode 1.9-3.3x planes-exp's, still below ZipNN's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import zstandard  # noqa: E402

from tallpack.codecs import _NEAR_LITERAL, Zstd, dense_chain  # noqa: E402
from tallpack.kernels import join_exponent  # noqa: E402
from tallpack.memory import empty  # noqa: E402

CHUNK = 1 << 22
PIECE = 1 << 18  # 256 KiB of exponent bytes


def compile_lib(tmp: Path, name: str, flags: list[str]) -> ctypes.CDLL:
    so = tmp / f"{name}.so"
    cmd = ["cc", *flags, "-shared", "-fPIC", "-o", str(so), str(HERE / "ans_exponent.c"), "-lm"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    sz, vp = ctypes.c_size_t, ctypes.c_void_p
    lib.rans_bound.argtypes, lib.rans_bound.restype = [sz, sz], sz
    lib.rans_encode_chunk.argtypes = [ctypes.c_char_p, sz, sz, ctypes.c_int, ctypes.c_int, vp, sz]
    lib.rans_encode_chunk.restype = sz
    lib.rans_decode_chunk.argtypes = [ctypes.c_char_p, sz, vp, sz]
    lib.rans_decode_chunk.restype = ctypes.c_int
    lib.flags = " ".join(flags)
    return lib


def rans_encode(lib, plane: bytes, piece: int, mode: int, scale: int) -> bytes:
    cap = lib.rans_bound(len(plane), piece or len(plane))
    out = np.empty(cap, np.uint8)
    n = lib.rans_encode_chunk(plane, len(plane), piece, mode, scale, out.ctypes.data, cap)
    if not n:
        raise RuntimeError("rans: encode failed")
    return out[:n].tobytes()


def entropy_bytes(a: np.ndarray) -> float:
    c = np.bincount(a, minlength=256)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / a.size)).sum() / 8)


def load_base(out: Path) -> tuple[list[np.ndarray], str]:
    from safetensors.numpy import load_file
    found = sorted(out.glob("family-*/base.safetensors"))
    if found:
        path = found[0]
    else:
        import perf
        path = perf.make_family(out, 26e6, 8, 0)["base"]
    base = load_file(str(path))  # the order perf.py's goal 6 uses
    return [np.ascontiguousarray(a) for a in base.values()], str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", type=Path, default=Path("/tmp/r38/perf"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    t_start = time.perf_counter()
    arrays, base_path = load_base(a.dir)
    raw = sum(x.nbytes for x in arrays)
    whole = b"".join(x.tobytes() for x in arrays)

    # chunks as the container cuts them, planes-exp's encode of each, and its T plane at r = 1
    chain = dense_chain("planes", 4, 3, "float32")
    chunks = []  # (raw piece, encoded chunk, element count, exponent plane bytes)
    for arr in arrays:
        flat = arr.reshape(-1).view(np.uint8)
        for s in range(0, flat.size, CHUNK * 4):
            piece = flat[s : s + CHUNK * 4]
            u = piece.view(np.uint32)
            t = ((u >> 23) & 0xFF).astype(np.uint8).tobytes()
            enc = bytes(chain.encode(memoryview(piece)))
            chunks.append((piece, enc, u.size, t))
    ours_bytes = sum(len(c[1]) for c in chunks)

    # (a) our zstd plane, checked against the plane planes-exp stored
    cz = zstandard.ZstdCompressor(compression_params=_NEAR_LITERAL)
    zplanes = [cz.compress(c[3]) for c in chunks]
    stored_t = []
    for (_, enc, n, _), zp in zip(chunks, zplanes):
        r, *lengths = struct.unpack_from("<5I", enc, 0)
        assert r == 1, r
        stored_t.append(lengths[3])
    assert stored_t == [len(z) for z in zplanes], "our zstd plane differs from the one planes-exp stored"

    tmp = Path(tempfile.mkdtemp(prefix="r38-ans-"))
    libs = {"native": compile_lib(tmp, "native", ["-O3", "-march=native"]),
            "portable": compile_lib(tmp, "portable", ["-O2"])}
    ns = libs["native"].rans_ns()

    variants = {}  # name -> (piece, mode, scale)
    for scale in (11, 12):
        variants[f"rans {PIECE >> 10} KiB pieces, a table each, 2^{scale}"] = (PIECE, 0, scale)
        variants[f"rans {PIECE >> 10} KiB pieces, one table a chunk, 2^{scale}"] = (PIECE, 1, scale)
        variants[f"rans whole chunk, 2^{scale}"] = (0, 0, scale)
    coded: dict[str, list[bytes]] = {}
    encode_s: dict[str, float] = {}
    for name, (piece, mode, scale) in variants.items():
        t0 = time.perf_counter()
        coded[name] = [rans_encode(libs["native"], c[3], piece, mode, scale) for c in chunks]
        encode_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    [cz.compress(c[3]) for c in chunks]
    encode_s["zstd"] = time.perf_counter() - t0

    # every coded plane back, by both builds, bit-exact; and corrupt inputs refused, never read past
    roundtrip_ok = True
    for lib in libs.values():
        for name, encs in coded.items():
            for c, e in zip(chunks, encs):
                out = np.empty(c[2], np.uint8)
                rc = lib.rans_decode_chunk(e, len(e), out.ctypes.data, c[2])
                roundtrip_ok &= rc == 0 and out.tobytes() == c[3]
    assert roundtrip_ok, "rANS round trip failed"
    refused = corrupt_checks(libs["native"], coded, chunks)

    ent_chunk = sum(entropy_bytes(np.frombuffer(c[3], np.uint8)) for c in chunks)
    ent_piece = sum(entropy_bytes(np.frombuffer(c[3], np.uint8)[s : s + PIECE])
                    for c in chunks for s in range(0, c[2], PIECE))
    ent_whole = entropy_bytes(np.frombuffer(b"".join(c[3] for c in chunks), np.uint8))
    sizes = {"zstd _NEAR_LITERAL (current)": sum(map(len, zplanes))}
    sizes.update({k: sum(map(len, v)) for k, v in coded.items()})
    zstd_t = sizes["zstd _NEAR_LITERAL (current)"]

    # --- decode timing: exponent planes alone --------------------------------------------------
    local = threading.local()

    def buf(n: int) -> np.ndarray:
        b = getattr(local, "b", None)
        if b is None or b.size < n:
            b = local.b = np.empty(CHUNK, np.uint8)
        return b[:n]

    zd = Zstd()

    def dec_zstd(i: int) -> np.ndarray:
        out = buf(chunks[i][2])
        zd.decode_into(memoryview(zplanes[i]), out.data)
        return out

    def dec_rans(lib, name):
        encs = coded[name]

        def f(i: int) -> np.ndarray:
            out = buf(chunks[i][2])
            if lib.rans_decode_chunk(encs[i], len(encs[i]), out.ctypes.data, out.size):
                raise RuntimeError("rans decode")
            return out
        return f

    timed_names = {"zstd": dec_zstd}
    b_name, c_name = (f"rans {PIECE >> 10} KiB pieces, a table each, 2^12", "rans whole chunk, 2^12")
    s_name = f"rans {PIECE >> 10} KiB pieces, one table a chunk, 2^12"
    timed_names["rans pieces (b), native"] = dec_rans(libs["native"], b_name)
    timed_names["rans pieces (b), portable -O2"] = dec_rans(libs["portable"], b_name)
    timed_names["rans pieces, one table (b'), native"] = dec_rans(libs["native"], s_name)
    timed_names["rans whole chunk (c), native"] = dec_rans(libs["native"], c_name)
    timed_names["rans whole chunk (c), portable -O2"] = dec_rans(libs["portable"], c_name)
    idx = list(range(len(chunks)))
    pools = {1: None, 2: ThreadPoolExecutor(2)}

    def run_all(f, threads: int) -> None:
        if threads == 1:
            for i in idx:
                f(i)
        else:
            list(pools[2].map(f, idx))

    for f in timed_names.values():  # warm each (buffers, pages, tables)
        run_all(f, 2)
    plane_times = alternate(timed_names, a.reps, run_all)

    # --- full chunk decode: planes-exp as it is, and with the exponent plane from rANS ---------
    def full_ours(i: int) -> memoryview:
        return chain.decode(memoryview(chunks[i][1]), chunks[i][2] * 4)

    def full_with(dec_t):
        def f(i: int) -> np.ndarray:
            enc, n = chunks[i][1], chunks[i][2]
            lengths = struct.unpack_from("<4I", enc, 4)
            planes, pos = [], 20
            for j, ln in enumerate(lengths[:3]):
                if ln == n:
                    planes.append(np.frombuffer(enc, np.uint8, n, pos))
                else:  # (a norm's constant plane: zstd, as planes-exp does)
                    p = np.empty(n, np.uint8)
                    zd.decode_into(memoryview(enc)[pos : pos + ln], p.data)
                    planes.append(p)
                pos += ln
            t = dec_t(i)
            out = empty(n * 4)
            join_exponent(planes[:2], planes[2], t, 1, out.reshape(n, 4))
            return out
        return f

    full = {"planes-exp (chain.decode)": full_ours,
            "planes-exp, same path, zstd T": full_with(dec_zstd),
            "planes-exp, rANS T (b)": full_with(timed_names["rans pieces (b), native"]),
            "planes-exp, rANS T (c)": full_with(timed_names["rans whole chunk (c), native"])}
    full_ok = {}
    for k, f in full.items():
        got = b"".join(bytes(memoryview(f(i)).cast("B")) for i in idx)
        full_ok[k] = got == whole
    assert all(full_ok.values()), full_ok

    zipnn: dict = {}
    try:
        import importlib.metadata
        from zipnn import ZipNN
        zipnn["version"] = importlib.metadata.version("zipnn")
        zs = {th: ZipNN(input_format="byte", bytearray_dtype="float32", threads=th) for th in (1, 2)}
        t0 = time.perf_counter()
        zc = zs[2].compress(bytearray(whole))  # a copy: ZipNN 0.5.4 may overwrite its input
        zipnn["encode_seconds_2threads"] = time.perf_counter() - t0
        zipnn["bytes"] = len(zc)
        zipnn["roundtrip_ok"] = bytes(zs[2].decompress(zc)) == whole
        zipnn["bytes_1thread_compress"] = len(zs[1].compress(bytearray(whole)))
    except Exception as e:  # noqa: BLE001
        zipnn["error"] = f"{type(e).__name__}: {e}"

    def run_full(f, threads: int) -> None:
        if f == "zipnn":
            zs[threads].decompress(zc)
        else:
            run_all(f, threads)

    if "error" not in zipnn:
        full["zipnn (whole base, its threads)"] = "zipnn"
    for f in full.values():
        run_full(f, 2)
    full_times = alternate(full, a.reps, run_full)
    for p in pools.values():
        if p:
            p.shutdown()

    # --- summary ---------------------------------------------------------------------------------
    def base_with(t_bytes: int) -> int:
        return ours_bytes - zstd_t + t_bytes

    summary = {
        "base": base_path, "raw_bytes": raw, "chunks": len(chunks), "elements": sum(c[2] for c in chunks),
        "piece_bytes": PIECE, "interleaved_states": ns, "cc": subprocess.run(["cc", "--version"], capture_output=True,
                                                                              text=True).stdout.splitlines()[0],
        "flags": {k: v.flags for k, v in libs.items()},
        "exponent_plane_bytes": {**sizes, "entropy bound, per chunk": round(ent_chunk),
                                 f"entropy bound, per {PIECE >> 10} KiB piece": round(ent_piece),
                                 "entropy, the 50 planes as one": round(ent_whole)},
        "encode_seconds_1thread": encode_s,
        "roundtrip_ok": roundtrip_ok, "corrupt_inputs_refused": refused, "full_decode_ok": full_ok,
        "ours_base_bytes": ours_bytes,
        "base_bytes_with": {k: base_with(v) for k, v in sizes.items()},
        "zipnn": zipnn,
        "exponent_decode_seconds": plane_times, "full_decode_seconds": full_times,
        "wall_seconds": None, "loadavg_at_end": None,
    }
    if "bytes" in zipnn:
        summary["base_bytes_over_zipnn"] = {k: base_with(v) / zipnn["bytes"] for k, v in sizes.items()}
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(summary, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")

    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\nexponent planes, {len(chunks)} chunks, {summary['elements']:,d} bytes raw; {ns} rANS states")
    print(f"{'variant':52s} {'bytes':>11s} {'vs zstd':>8s} {'base/ZipNN':>11s}")
    zb = zipnn.get("bytes")
    for k, v in sizes.items():
        r = f"{base_with(v) / zb:.6f}" if zb else "-"
        print(f"{k:52s} {v:>11,d} {v / zstd_t:8.4f} {r:>11s}")
    for k in ("entropy bound, per chunk", f"entropy bound, per {PIECE >> 10} KiB piece", "entropy, the 50 planes as one"):
        v = summary["exponent_plane_bytes"][k]
        r = f"{base_with(v) / zb:.6f}" if zb else "-"
        print(f"{k:52s} {v:>11,d} {v / zstd_t:8.4f} {r:>11s}")
    print(f"ours, whole base {ours_bytes:,d}; ZipNN {zb:,d}" if zb else f"ours {ours_bytes:,d}")
    for title, times, ref in (("exponent plane decode", plane_times, "zstd"),
                              ("full chunk decode", full_times, "planes-exp (chain.decode)")):
        print(f"\n{title} (median s; ratio to {ref})")
        print(f"{'':40s} {'1 thread':>10s} {'ratio':>7s} {'2 threads':>10s} {'ratio':>7s}")
        zk = "zipnn (whole base, its threads)" if "zipnn (whole base, its threads)" in times else None
        if zk:
            print(f"{'':40s} {'':>10s} {'':>7s} {'':>10s} {'':>7s} {'/ZipNN 1t':>9s} {'/ZipNN 2t':>9s}")
        for k, v in times.items():
            m1, m2 = med(v["1"]), med(v["2"])
            z = (f" {m1 / med(times[zk]['1']):9.3f} {m2 / med(times[zk]['2']):9.3f}" if zk else "")
            print(f"{k:40s} {m1:10.4f} {m1 / med(times[ref]['1']):7.3f} {m2:10.4f} {m2 / med(times[ref]['2']):7.3f}{z}")
    print(f"\nwall {summary['wall_seconds']:.1f} s, load average at the end {summary['loadavg_at_end']}")


def alternate(funcs: dict, reps: int, run) -> dict:
    """Medians' material: for each rep, 1 thread then 2 threads, every variant, the order reversed
    on odd reps."""
    times = {k: {"1": [], "2": []} for k in funcs}
    keys = list(funcs)
    for i in range(reps):
        for threads in (1, 2):
            for k in (keys if i % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                run(funcs[k], threads)
                times[k][str(threads)].append(time.perf_counter() - t0)
    return times


def corrupt_checks(lib, coded: dict, chunks: list) -> dict:
    """Damaged inputs: every truncation point of a small piece's table and states, every
    truncation of the stream's tail, a table that does not add up, and random bytes flipped:
    each must be refused (or, for a flip in the words, decode to n symbols without reading past
    the input: it is given exactly len bytes in a fresh buffer, so ASan/valgrind would see any)."""
    rng = np.random.default_rng(0)
    name = next(k for k in coded if "a table each, 2^12" in k)
    e, n = coded[name][0], chunks[0][2]
    out = np.empty(n, np.uint8)
    res = {"truncations": 0, "truncations_refused": 0, "bad_sum_refused": False, "flips": 0, "flips_refused": 0}
    for cut in list(range(0, 200)) + list(range(len(e) - 200, len(e))):
        res["truncations"] += 1
        res["truncations_refused"] += lib.rans_decode_chunk(e[:cut], cut, out.ctypes.data, n) != 0
    bad = bytearray(e)
    bad[6 + 4 + 2] ^= 1  # the first frequency of the first piece's table
    res["bad_sum_refused"] = lib.rans_decode_chunk(bytes(bad), len(bad), out.ctypes.data, n) != 0
    for _ in range(200):
        bad = bytearray(e)
        j = int(rng.integers(0, len(bad)))
        bad[j] ^= 1 << int(rng.integers(0, 8))
        res["flips"] += 1
        res["flips_refused"] += lib.rans_decode_chunk(bytes(bad), len(bad), out.ctypes.data, n) != 0
    return res


if __name__ == "__main__":
    main()
