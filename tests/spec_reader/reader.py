"""A clean-room tallpack reader: spec/FORMAT.md (version 1.14) and spec/manifest.schema.json only.

Section numbers in comments are FORMAT.md's. Tensors are kept as numpy arrays of their *storage*
type (bfloat16 as uint16, float8 as uint8); :meth:`SpecArchive.tensor` hands bfloat16 and float8
back as torch views of those bits, everything else as numpy arrays.

Example:
    >>> arc = open_archive("tests/golden/v1_0_ta.tallpack")  # doctest: +SKIP
    >>> arc.tensor("cars", "embed.weight").shape  # doctest: +SKIP
    (12, 10)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
import zstandard

MAGIC = b"TALLPACK"
END_MAGIC = b"TALLPEND"
MIB = 1 << 20
MAX_MANIFEST = 256 * MIB
MAX_DEPTH = 64
MAX_NAME = 4096
MAX_TASKS = 65536
MAX_DIMS = 32
MAX_CHAIN = 4
MAX_CHUNK = 1 << 30
ZSTD_RATIO = 32768
KNOWN_REQUIRES = {"groups", "aliases"}


class SpecError(Exception):
    """Any refusal of this reader (format, integrity or version)."""


class FormatError(SpecError):
    """The file breaks a rule of the format."""


class IntegrityError(SpecError):
    """A checksum or hash does not match."""


class VersionError(SpecError):
    """The archive needs a newer reader."""


# §4: name -> (storage numpy dtype, itemsize, floating)
DTYPES: dict[str, tuple[np.dtype, int, bool]] = {
    "float64": (np.dtype("<f8"), 8, True),
    "float32": (np.dtype("<f4"), 4, True),
    "float16": (np.dtype("<f2"), 2, True),
    "bfloat16": (np.dtype("<u2"), 2, True),
    "float8_e4m3fn": (np.dtype("u1"), 1, True),
    "float8_e5m2": (np.dtype("u1"), 1, True),
    "int64": (np.dtype("<i8"), 8, False),
    "int32": (np.dtype("<i4"), 4, False),
    "int16": (np.dtype("<i2"), 2, False),
    "int8": (np.dtype("i1"), 1, False),
    "uint64": (np.dtype("<u8"), 8, False),
    "uint32": (np.dtype("<u4"), 4, False),
    "uint16": (np.dtype("<u2"), 2, False),
    "uint8": (np.dtype("u1"), 1, False),
    "bool": (np.dtype("u1"), 1, False),
}
UINT_OF_SIZE = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
# §6.1.5 step 2: (exponent bits, mantissa bits)
EXP_MANT = {
    "float64": (11, 52), "float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7),
    "float8_e4m3fn": (4, 3), "float8_e5m2": (5, 2),
}


# ---------------------------------------------------------------------------------------------
# §4 element types: float32 <-> storage bits


def _f8_table(name: str) -> np.ndarray:
    """The 256 float8 values as float32 (OCP E4M3FN / E5M2)."""
    exp_bits, mant_bits = EXP_MANT[name]
    bias = (1 << (exp_bits - 1)) - 1
    out = np.empty(256, np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> mant_bits) & ((1 << exp_bits) - 1)
        m = b & ((1 << mant_bits) - 1)
        if name == "float8_e4m3fn" and e == 15 and m == 7:
            v = math.nan
        elif name == "float8_e5m2" and e == 31:
            v = math.inf if m == 0 else math.nan
        elif e == 0:
            v = m / (1 << mant_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << mant_bits)) * 2.0 ** (e - bias)
        out[b] = sign * v
    return out


F8_TABLES = {name: _f8_table(name) for name in ("float8_e4m3fn", "float8_e5m2")}


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """f32(x) of §6.1.1: exact from 16- and 8-bit floats, round to nearest even from float64."""
    if dtype == "float32":
        return arr
    if dtype in ("float64", "float16"):
        return arr.astype(np.float32)
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in F8_TABLES:
        return F8_TABLES[dtype][arr]
    raise FormatError(f"dtype {dtype} is not floating")


def _cast_f8(x: np.ndarray, name: str) -> np.ndarray:
    exp_bits, mant_bits = EXP_MANT[name]
    bias = (1 << (exp_bits - 1)) - 1
    table = F8_TABLES[name]
    pos = np.arange(128)
    finite = pos[np.isfinite(table[:128])]
    values = table[finite].astype(np.float64)  # increasing with the bit pattern
    top = float(values[-1])
    x64 = x.astype(np.float64)
    sign = np.signbit(x64)
    a = np.abs(x64)
    nan = np.isnan(a)
    _, e = np.frexp(np.where(nan | (a == 0) | np.isinf(a), 1.0, a))
    quantum = np.ldexp(1.0, np.maximum(e - 1, 1 - bias) - mant_bits)
    q = np.rint(a / quantum) * quantum
    q = np.where(np.isinf(a), np.inf, q)
    if name == "float8_e4m3fn":
        q = np.minimum(q, top)  # saturates, infinities included (§6.1.1)
    bits = np.searchsorted(values, np.minimum(q, top)).astype(np.uint8)
    bits = finite[bits].astype(np.uint8)
    if name == "float8_e5m2":
        bits = np.where(q > top, np.uint8(0x7C), bits)
    bits = np.where(nan, np.uint8(0x7F), bits)
    return (bits | (sign.astype(np.uint8) << 7)).astype(np.uint8)


def cast_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """cast_d of §6.1.1 from float32 to the storage bits of ``dtype``."""
    if dtype == "float32":
        return x
    if dtype == "float64":
        return x.astype(np.float64)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    if dtype == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    if dtype in F8_TABLES:
        return _cast_f8(x, dtype)
    raise FormatError(f"dtype {dtype} is not floating")


# ---------------------------------------------------------------------------------------------
# §5 codecs


def _zstd(data: bytes | memoryview, size: int, what: str) -> bytes:
    data = bytes(data)
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: not a zstd frame ({exc})") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN or params.content_size != size:
        raise FormatError(f"{what}: zstd frame announces {params.content_size} bytes, expected {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: zstd: {exc}") from None
    if len(out) != size:
        raise FormatError(f"{what}: zstd gave {len(out)} bytes, expected {size}")
    return out


def _check_params(cfg: dict, allowed: set[str], what: str) -> None:
    extra = set(cfg) - allowed - {"id"}
    missing = allowed - set(cfg)
    if extra or missing:
        raise FormatError(f"{what}: codec {cfg.get('id')} with parameters {sorted(cfg)}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def check_codec(cfg: Any, itemsize: int, dtype: str, what: str) -> None:
    """The closed configs of §5 (unknown id: a newer reader is needed)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("id"), str):
        raise FormatError(f"{what}: codec config {cfg!r}")
    cid = cfg["id"]
    if cid == "zstd":
        _check_params(cfg, {"level"}, what)
        ok = _is_int(cfg["level"])
    elif cid == "bytegroup":
        _check_params(cfg, {"itemsize"}, what)
        ok = cfg["itemsize"] == itemsize and _is_int(cfg["itemsize"])
    elif cid == "bitpack":
        _check_params(cfg, set(), what)
        ok = dtype == "bool"
    elif cid == "planes":
        _check_params(cfg, {"itemsize", "level"}, what)
        ok = _is_int(cfg["itemsize"]) and 1 <= cfg["itemsize"] <= 16 and _is_int(cfg["level"])
    elif cid == "planes-exp":
        _check_params(cfg, {"itemsize", "level"}, what)
        ok = cfg["itemsize"] in (2, 4) and _is_int(cfg["itemsize"]) and _is_int(cfg["level"])
    elif cid == "bitsplit":
        _check_params(cfg, {"itemsize", "block"}, what)
        b = cfg["block"]
        ok = (cfg["itemsize"] in (1, 2, 4) and _is_int(cfg["itemsize"]) and _is_int(b)
              and b % 8 == 0 and 64 <= b <= 1 << 20)
    else:
        raise VersionError(f"{what}: unknown codec {cid!r}: a newer reader is needed")
    if not ok:
        raise FormatError(f"{what}: bad codec config {cfg!r}")


SIZE_DEPENDENT = {"zstd", "planes", "planes-exp", "bitsplit"}


def encoded_size(cfg: dict, size: int) -> int:
    if cfg["id"] == "bytegroup":
        return size
    if cfg["id"] == "bitpack":
        return -(-size // 8)
    raise FormatError(f"codec {cfg['id']} has a data-dependent size and must be last")


def _planes_body(data: bytes, k: int, n: int, what: str) -> list[np.ndarray]:
    if len(data) < 4 * k:
        raise FormatError(f"{what}: planes header overruns the chunk")
    lengths = struct.unpack_from(f"<{k}I", data, 0)
    if 4 * k + sum(lengths) != len(data):
        raise FormatError(f"{what}: planes lengths {lengths} do not add up to {len(data)}")
    planes, pos = [], 4 * k
    for length in lengths:
        body = data[pos:pos + length]
        pos += length
        if length == n:
            planes.append(np.frombuffer(body, np.uint8))
        elif length < n:
            planes.append(np.frombuffer(_zstd(body, n, what), np.uint8))
        else:
            raise FormatError(f"{what}: plane of {length} bytes for {n} elements")
    return planes


def _decode_bitsplit(data: bytes, k: int, block: int, n: int, what: str) -> bytes:
    nb = -(-n // block)
    if len(data) < 4 * nb:
        raise FormatError(f"{what}: bitsplit lengths overrun the chunk")
    lengths = struct.unpack_from(f"<{nb}I", data, 0)
    pos = 4 * nb
    heads = []
    for j, length in enumerate(lengths):
        nj = min((j + 1) * block, n) - j * block
        if length > nj or pos + length > len(data):
            raise FormatError(f"{what}: bitsplit block {j} of {length} bytes for {nj} heads")
        body = data[pos:pos + length]
        pos += length
        heads.append(np.frombuffer(body if length == nj else _zstd(body, nj, what), np.uint8))
    h = np.concatenate(heads) if heads else np.zeros(0, np.uint8)
    L = (h >> 2).astype(np.int64)
    t = (h & 3).astype(np.uint64)
    if (L > 8 * k).any() or ((L <= 1) & (t != 0)).any() or ((L == 2) & (t > 1)).any():
        raise FormatError(f"{what}: bitsplit head out of range")
    w = np.maximum(L - 3, 0)
    W = np.concatenate([[0], np.cumsum(w)]).astype(np.int64)
    stream = np.frombuffer(data[pos:], np.uint8)
    if len(stream) != -(-int(W[-1]) // 8):
        raise FormatError(f"{what}: bitsplit low-bit stream of {len(stream)} bytes")
    if W[-1] % 8 and stream[-1] >> (W[-1] % 8):
        raise FormatError(f"{what}: bitsplit nonzero padding bits")
    padded = np.concatenate([stream, np.zeros(8, np.uint8)]).astype(np.uint64)
    start = W[:-1]
    byte = start >> 3
    word = np.zeros(n, np.uint64)
    for b in range(5):  # w <= 29 bits, plus 7 bits of offset: 36 bits, 5 bytes
        word |= padded[byte + b] << np.uint64(8 * b)
    low = (word >> (start & 7).astype(np.uint64)) & ((np.uint64(1) << w.astype(np.uint64)) - np.uint64(1))
    Lu = L.astype(np.uint64)
    small = (np.uint64(1) << np.maximum(Lu, 1) - np.uint64(1)) + t
    big = ((np.uint64(4) + t) << w.astype(np.uint64)) | low
    v = np.where(L == 0, np.uint64(0), np.where(L <= 2, small, big))
    return v.astype(UINT_OF_SIZE[k]).tobytes()


def decode_step(cfg: dict, data: bytes, size: int, what: str) -> bytes:
    """Decode one codec, expecting ``size`` output bytes (§5)."""
    cid = cfg["id"]
    if cid == "zstd":
        out = _zstd(data, size, what)
    elif cid == "bytegroup":
        k = cfg["itemsize"]
        if len(data) != size or size % k:
            raise FormatError(f"{what}: bytegroup of {len(data)} bytes")
        out = np.frombuffer(data, np.uint8).reshape(k, size // k).T.tobytes()
    elif cid == "bitpack":
        if len(data) != -(-size // 8):
            raise FormatError(f"{what}: bitpack of {len(data)} bytes for {size}")
        out = np.unpackbits(np.frombuffer(data, np.uint8), count=size, bitorder="little").tobytes()
    elif cid == "planes":
        k = cfg["itemsize"]
        if size % k:
            raise FormatError(f"{what}: planes of {size} bytes, itemsize {k}")
        planes = _planes_body(data, k, size // k, what)
        out = np.stack(planes, axis=1).tobytes() if planes else b""
    elif cid == "planes-exp":
        k = cfg["itemsize"]
        if size % k or len(data) < 4:
            raise FormatError(f"{what}: planes-exp of {size} bytes, itemsize {k}")
        (r,) = struct.unpack_from("<I", data, 0)
        if not 1 <= r <= 7:
            raise FormatError(f"{what}: planes-exp rotation {r}")
        planes = _planes_body(data[4:], k, size // k, what)
        keep = 0xFF >> r
        T, S = planes[k - 1], planes[k - 2]
        hi = (S & (~keep & 0xFF)) | (T >> r)
        lo = ((T.astype(np.uint16) << (8 - r)) & 0xFF).astype(np.uint8) | (S & keep)
        planes[k - 1], planes[k - 2] = hi.astype(np.uint8), lo.astype(np.uint8)
        out = np.stack(planes, axis=1).tobytes()
    elif cid == "bitsplit":
        k = cfg["itemsize"]
        if size % k:
            raise FormatError(f"{what}: bitsplit of {size} bytes, itemsize {k}")
        out = _decode_bitsplit(data, k, cfg["block"], size // k, what)
    else:
        raise VersionError(f"{what}: unknown codec {cid!r}")
    if len(out) != size:
        raise FormatError(f"{what}: codec {cid} gave {len(out)} bytes, expected {size}")
    return out


# ---------------------------------------------------------------------------------------------
# §2, §3 JSON rules


def _reject_constant(token: str) -> Any:
    raise FormatError(f"manifest holds {token}")


def _parse_int(token: str) -> int:
    if len(token) > 32:
        raise FormatError("manifest number token too long")
    value = int(token)
    if not -(1 << 63) <= value < (1 << 64):
        raise FormatError(f"manifest integer {token} out of range")
    return value


def _parse_float(token: str) -> float:
    if len(token) > 32:
        raise FormatError("manifest number token too long")
    value = float(token)
    if not math.isfinite(value):
        raise FormatError(f"manifest number {token} is not finite")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise FormatError("manifest object with a duplicate key")
    return out


def _walk_json(value: Any, depth: int) -> None:
    """Nesting at most 64 deep; strings valid Unicode (no lone surrogate)."""
    if isinstance(value, (dict, list)):
        if depth + 1 > MAX_DEPTH:
            raise FormatError("manifest nested deeper than 64")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(k, str):
                _check_text(k)
            _walk_json(v, depth + 1)
    elif isinstance(value, str):
        _check_text(value)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("manifest string holds a lone surrogate") from None


def parse_json(text: bytes) -> Any:
    """§3 strict JSON."""
    try:
        s = text.decode("utf-8")
        value = json.loads(s, object_pairs_hook=_pairs, parse_constant=_reject_constant,
                           parse_int=_parse_int, parse_float=_parse_float)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"manifest is not JSON: {exc}") from None
    _walk_json(value, 0)
    return value


# ---------------------------------------------------------------------------------------------
# arrays


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shape_ok(shape: Any) -> bool:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        return False
    if not all(_is_int(d) and 0 <= d < (1 << 63) for d in shape):
        return False
    return _numel([d for d in shape if d]) <= (1 << 63) - 1


@dataclass
class ArrayRef:
    """A checked array reference (§3.5)."""

    dtype: str
    shape: tuple[int, ...]
    codecs: list[dict]
    chunk_elements: int
    chunks: list[tuple[int, int, int]]

    @property
    def numel(self) -> int:
        return _numel(list(self.shape))

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


def parse_array(ref: Any, what: str) -> ArrayRef:
    """§3.5 and §7: everything checkable from the manifest alone."""
    if not isinstance(ref, dict):
        raise FormatError(f"{what}: array ref is not an object")
    dtype = ref.get("dtype")
    if dtype not in DTYPES:
        raise FormatError(f"{what}: unknown dtype {dtype!r}")
    shape = ref.get("shape")
    if not _shape_ok(shape):
        raise FormatError(f"{what}: bad shape {shape!r}")
    ce = ref.get("chunk_elements")
    if not _is_int(ce) or ce <= 0 or ce % 8 or ce >= (1 << 63):
        raise FormatError(f"{what}: chunk_elements {ce!r}")
    codecs = ref.get("codecs")
    if not isinstance(codecs, list) or len(codecs) > MAX_CHAIN:
        raise FormatError(f"{what}: codec chain {codecs!r}")
    itemsize = DTYPES[dtype][1]
    for j, cfg in enumerate(codecs):
        check_codec(cfg, itemsize, dtype, what)
        if cfg["id"] in SIZE_DEPENDENT and j != len(codecs) - 1:
            raise FormatError(f"{what}: codec {cfg['id']} must be last")
    n = _numel(shape)
    if min(ce, n) * itemsize > MAX_CHUNK:
        raise FormatError(f"{what}: chunk decodes past 1 GiB")
    chunks = ref.get("chunks")
    count = -(-n // ce)
    if not isinstance(chunks, list) or len(chunks) != count:
        raise FormatError(f"{what}: {len(chunks) if isinstance(chunks, list) else chunks!r} chunks, expected {count}")
    out = []
    for c in chunks:
        if (not isinstance(c, list) or len(c) != 3 or not all(_is_int(v) and v >= 0 for v in c)
                or c[0] >= 1 << 63 or c[1] >= 1 << 63 or c[2] >= 1 << 64):
            raise FormatError(f"{what}: chunk {c!r}")
        out.append((c[0], c[1], c[2]))
    arr = ArrayRef(dtype, tuple(shape), codecs, ce, out)
    for i, (_, nbytes, _) in enumerate(out):
        _check_stored_size(arr, i, nbytes, what)
    return arr


def _chain_sizes(arr: ArrayRef, i: int) -> list[int]:
    n_i = min(arr.numel, (i + 1) * arr.chunk_elements) - i * arr.chunk_elements
    sizes = [n_i * arr.itemsize]
    for cfg in arr.codecs[:-1]:
        sizes.append(encoded_size(cfg, sizes[-1]))
    return sizes


def _check_stored_size(arr: ArrayRef, i: int, nbytes: int, what: str) -> None:
    """§7 "Declared sizes are backed by stored bytes"."""
    sizes = _chain_sizes(arr, i)
    s = sizes[-1]
    if not arr.codecs:
        ok = nbytes == s
    else:
        last = arr.codecs[-1]
        cid = last["id"]
        if cid in ("bytegroup", "bitpack"):
            ok = nbytes == encoded_size(last, s)
        elif cid == "zstd":
            ok = 1 <= nbytes and s <= ZSTD_RATIO * nbytes
        elif cid in ("planes", "planes-exp", "bitsplit") and s % last["itemsize"]:
            ok = False  # §5: the decoded size is a multiple of k (the reference reader checks at open)
        elif cid in ("planes", "planes-exp"):
            q = last["itemsize"]
            h = 4 * q + (4 if cid == "planes-exp" else 0)
            ok = h <= nbytes <= h + s and s <= ZSTD_RATIO * q * max(1, nbytes - h)
        else:  # bitsplit
            q, b = last["itemsize"], last["block"]
            n = s // q
            h = 4 * (-(-n // b))
            ok = h <= nbytes <= h + n + -(-(n * (8 * q - 3)) // 8) and n <= ZSTD_RATIO * max(1, nbytes - h)
    if not ok:
        raise FormatError(f"{what}: chunk {i} of {nbytes} stored bytes cannot hold its data")


def _iter_arrays(manifest: dict):
    """Every (array ref, description) of the manifest that this reader knows of."""
    for entry in manifest["tensors"]:
        name = entry["name"]
        for key in ("base", "merged", "counts", "data"):
            if key in entry:
                yield entry[key], f"tensor {name!r} {key}"
        for task, te in entry["tasks"].items():
            for key in ("mask", "data", "codes", "scales"):
                if key in te:
                    yield te[key], f"tensor {name!r} task {task!r} {key}"
            if isinstance(te.get("exact"), dict) and "residual" in te["exact"]:
                yield te["exact"]["residual"], f"tensor {name!r} task {task!r} residual"
            corr = te.get("correction")
            if isinstance(corr, dict):
                for key in ("indices", "values", "scales", "codes"):
                    if key in corr:
                        yield corr[key], f"tensor {name!r} task {task!r} correction {key}"
    for sha, ref in (manifest.get("files") or {}).items():
        yield ref, f"file {sha}"


# ---------------------------------------------------------------------------------------------
# the archive


@dataclass
class _Where:
    """Where a task's tensor name lives: a tensor entry, maybe a run of a group (§3.7)."""

    entry: dict
    offset: int | None = None
    shape: tuple[int, ...] | None = None


class SpecArchive:
    """An opened archive: ``tasks``, ``tensor_names(task)``, ``tensor(task, name, exact=...)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError(f"{self.path}: not a regular file")  # §9
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
        finally:
            os.close(fd)
        self.size = size
        self.manifest = self._open()
        self._arrays: dict[int, ArrayRef] = {}
        self._validate()

    # §1, §2 ----------------------------------------------------------------------------------
    def _open(self) -> dict:
        buf, size = self._map, self.size
        if size < 48 or buf[:8] != MAGIC:
            raise FormatError(f"{self.path}: not a tallpack archive")
        major, minor, reserved = struct.unpack_from("<HHI", buf, 8)
        if major != 1:
            raise VersionError(f"{self.path}: format {major}.{minor} needs a newer reader")
        if reserved != 0:
            raise FormatError(f"{self.path}: reserved header field {reserved}")
        self.version = (major, minor)
        moff, mlen, crc, flags = struct.unpack_from("<QQII", buf, size - 32)
        if buf[size - 8:size] != END_MAGIC:
            raise FormatError(f"{self.path}: no footer (truncated?)")
        if moff < 16 or moff + mlen > size - 32:
            raise FormatError(f"{self.path}: manifest [{moff}, +{mlen}) outside the file")
        if mlen > MAX_MANIFEST:
            raise FormatError(f"{self.path}: manifest of {mlen} bytes")
        if flags & ~1:
            raise FormatError(f"{self.path}: unknown footer flags {flags:#x}")
        stored = bytes(buf[moff:moff + mlen])
        if zlib.crc32(stored) & 0xFFFFFFFF != crc:
            raise IntegrityError(f"{self.path}: manifest CRC-32 mismatch")
        self.manifest_offset = moff
        if flags & 1:
            try:
                announced = zstandard.get_frame_parameters(stored).content_size
            except zstandard.ZstdError:
                raise FormatError(f"{self.path}: manifest is not a zstd frame") from None
            limit = min(MAX_MANIFEST, 64 * 1024 + 4 * size)
            if announced == zstandard.CONTENTSIZE_UNKNOWN or announced > limit:
                raise FormatError(f"{self.path}: manifest frame announces {announced} bytes")
            text = _zstd(stored, announced, f"{self.path}: manifest")
        else:
            text = stored
        manifest = parse_json(text)
        if not isinstance(manifest, dict):
            raise FormatError(f"{self.path}: manifest is not an object")
        return manifest

    # §3, §7 -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        m, p = self.manifest, self.path
        if m.get("format") != "tallpack":
            raise FormatError(f"{p}: format {m.get('format')!r}")
        if m.get("format_version") != list(self.version):
            raise FormatError(f"{p}: format_version {m.get('format_version')} != header {self.version}")
        requires = m.get("requires", [])
        if (not isinstance(requires, list) or not all(isinstance(r, str) and len(r) <= MAX_NAME for r in requires)
                or len(set(requires)) != len(requires)):
            raise FormatError(f"{p}: bad requires {requires!r}")
        unknown = set(requires) - KNOWN_REQUIRES
        if unknown:
            raise VersionError(f"{p}: requires {sorted(unknown)}: a newer reader is needed, upgrade it")
        self.checksum = m.get("checksum", "crc32")
        if self.checksum not in ("crc32", "xxh3-64"):
            raise VersionError(f"{p}: unknown checksum {self.checksum!r}")
        for key in ("merge", "tasks", "tensors"):
            if key not in m:
                raise FormatError(f"{p}: manifest lacks {key!r}")
        for key in ("base", "stats", "merge", "metadata"):
            if key in m and not isinstance(m[key], dict):
                raise FormatError(f"{p}: {key} is not an object")
        tasks = m["tasks"]
        if not isinstance(tasks, list) or len(tasks) > MAX_TASKS:
            raise FormatError(f"{p}: tasks")
        self.tasks = [t.get("name") for t in tasks]
        if len(set(self.tasks)) != len(self.tasks) or not all(
                isinstance(n, str) and len(n) <= MAX_NAME for n in self.tasks):
            raise FormatError(f"{p}: task names {self.tasks!r}")
        self._task_info = {t["name"]: t for t in tasks}
        for t in tasks:
            lam, density = t.get("lambda"), t.get("density")
            if lam is not None and not _is_number(lam, 0.0, math.inf):
                raise FormatError(f"{p}: task {t['name']!r} lambda {lam!r}")
            if density is not None and not _is_number(density, 0.0, 1.0):
                raise FormatError(f"{p}: task {t['name']!r} density {density!r}")
            for key in ("fidelity", "source", "metadata"):
                if key in t and not isinstance(t[key], dict):
                    raise FormatError(f"{p}: task {t['name']!r} {key} is not an object")
        merge = m["merge"]
        if merge.get("method") == "ties" and "majority_sign" in merge:
            s0 = merge["majority_sign"]
            if isinstance(s0, bool) or s0 not in (-1, 0, 1):
                raise FormatError(f"{p}: majority_sign {s0!r}")
        # tensor entries, groups (§3.7)
        self._entries: dict[str, dict] = {}
        self._members: dict[str, _Where] = {}
        groups = "groups" in requires
        for entry in m["tensors"]:
            name = entry.get("name")
            if not isinstance(name, str) or name in self._entries or len(name) > MAX_NAME:
                raise FormatError(f"{p}: tensor entry name {name!r}")
            if not isinstance(entry.get("tasks"), dict):
                raise FormatError(f"{p}: tensor {name!r} tasks")
            for tname in entry["tasks"]:
                if tname not in self._task_info:
                    raise FormatError(f"{p}: tensor {name!r} names undeclared task {tname!r}")
            if not entry["tasks"] and "base" not in entry:
                raise FormatError(f"{p}: tensor {name!r} holds nothing")
            self._entries[name] = entry
            if "members" in entry:
                if not groups:
                    raise FormatError(f"{p}: group {name!r} without requires 'groups'")
                self._check_group(entry)
        for member in self._members:
            if member in self._entries:
                raise FormatError(f"{p}: member {member!r} is also a tensor entry")
        # aliases (§3.8)
        aliases = m.get("aliases", {})
        if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_NAME and len(v) <= MAX_NAME
                for k, v in aliases.items()):
            raise FormatError(f"{p}: aliases is not an object of strings")
        if aliases and "aliases" not in requires:
            raise FormatError(f"{p}: aliases without requires 'aliases'")
        for alias, target in aliases.items():
            if alias == target or alias in self._entries or alias in self._members or target in aliases:
                raise FormatError(f"{p}: alias {alias!r} -> {target!r}")
            stored = (target in self._entries and "members" not in self._entries[target]) or target in self._members
            if not stored:
                raise FormatError(f"{p}: alias {alias!r}: target {target!r} is not stored")
        self.aliases = aliases
        # keys (§3.2)
        for t in tasks:
            keys = t.get("keys")
            if not isinstance(keys, list) or len(set(keys)) != len(keys):
                raise FormatError(f"{p}: task {t['name']!r} keys")
            keyset = set(keys)
            for key in keys:
                target = aliases.get(key, key)
                if key in aliases and target not in keyset:
                    raise FormatError(f"{p}: task {t['name']!r} lists alias {key!r} but not {target!r}")
                where = self._where(target)
                if where is None or t["name"] not in where.entry["tasks"]:
                    raise FormatError(f"{p}: task {t['name']!r} tensor {key!r} listed but not stored")
        # arrays (§3.5, §7): refs, then chunk bounds and overlaps
        spans = []
        for ref, what in _iter_arrays(m):
            arr = parse_array(ref, f"{p}: {what}")
            self._arrays[id(ref)] = arr
            for off, nbytes, _ in arr.chunks:
                if off < 16 or off + nbytes > self.manifest_offset:
                    raise FormatError(f"{p}: {what}: chunk [{off}, +{nbytes}) outside the data area")
                spans.append((off, off + nbytes))
        spans.sort()
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            if b0 < a1:
                raise FormatError(f"{p}: chunks overlap at {b0}")
        self._check_entries()

    def _check_group(self, entry: dict) -> None:
        p, name = self.path, entry["name"]
        members = entry["members"]
        if not isinstance(members, list) or not members or not entry["tasks"]:
            raise FormatError(f"{p}: group {name!r} members")
        shapes = {tuple(te.get("shape", ())) for te in entry["tasks"].values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise FormatError(f"{p}: group {name!r} is not one flat shape")
        (n_total,) = next(iter(shapes))
        end = 0
        for mem in members:
            if not isinstance(mem, list) or len(mem) != 3:
                raise FormatError(f"{p}: group {name!r} member {mem!r}")
            mname, off, shape = mem
            if (not isinstance(mname, str) or len(mname) > MAX_NAME or not _is_int(off) or off % 8
                    or off < end or not _shape_ok(shape)):
                raise FormatError(f"{p}: group {name!r} member {mem!r}")
            if mname in self._members or mname == name:
                raise FormatError(f"{p}: member name {mname!r} repeated")
            end = off + _numel(shape)
            self._members[mname] = _Where(entry, off, tuple(shape))
        if end > n_total:
            raise FormatError(f"{p}: group {name!r} members past its {n_total} elements")
        for key in ("base", "merged", "counts", "data"):
            if key in entry and entry[key].get("shape") != [n_total]:
                raise FormatError(f"{p}: group {name!r} {key} shape")
        if entry.get("kind") == "shared" and "base" in entry:
            raise FormatError(f"{p}: shared group {name!r} with base")

    def _check_entries(self) -> None:
        """The agreements of §3.3, §3.4 and §6.1 that this reader relies on."""
        p = self.path
        for name, entry in self._entries.items():
            encs = {te.get("encoding") for te in entry["tasks"].values()}
            for tname, te in entry["tasks"].items():
                what = f"{p}: tensor {name!r} task {tname!r}"
                dtype, shape = te.get("dtype"), te.get("shape")
                if dtype not in DTYPES or not _shape_ok(shape):
                    raise FormatError(f"{what}: dtype {dtype!r} shape {shape!r}")
                enc = te.get("encoding")
                floating = DTYPES[dtype][2]
                if "exact" in te and enc not in ("tall", "tall-derived", "tall-derived-merged"):
                    raise FormatError(f"{what}: exact on a {enc} entry")
                if "correction" in te and enc != "tall":
                    raise FormatError(f"{what}: correction on a {enc} entry")
                if enc in ("tall", "tall-derived", "tall-derived-merged", "qtau") and not floating:
                    raise FormatError(f"{what}: {enc} of dtype {dtype}")
                if enc in ("tall", "tall-derived") and not ("base" in entry and "merged" in entry):
                    raise FormatError(f"{what}: {enc} without base and merged")
                if enc == "tall-derived-merged" and (encs != {enc} or "merged" in entry
                                                     or "counts" in entry or "base" not in entry):
                    raise FormatError(f"{what}: tall-derived-merged rules")
                if enc == "shared" and "data" not in entry:
                    raise FormatError(f"{what}: shared without data")
                if enc == "qtau" and "base" not in entry:
                    raise FormatError(f"{what}: qtau without base")
                if enc == "tall":
                    self._expect(te.get("mask"), "bool", shape, f"{what} mask")
                if enc in ("tall", "tall-derived", "tall-derived-merged", "qtau"):
                    self._expect(entry.get("base"), None, shape, f"{what} base", floating=True)
                    if "merged" in entry:
                        self._expect(entry["merged"], "float32", shape, f"{what} merged")
                if enc == "dense":
                    self._expect(te.get("data"), dtype, shape, f"{what} data")
                if enc == "shared":
                    self._expect(entry.get("data"), dtype, shape, f"{what} data")
                if enc in ("tall-derived", "tall-derived-merged"):
                    lam = te.get("lambda")
                    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
                        raise FormatError(f"{what}: lambda {lam!r}")
                    if not _is_int(te.get("ones")):
                        raise FormatError(f"{what}: ones {te.get('ones')!r}")
                    if not isinstance(te.get("exact"), dict) or te["exact"].get("reference") not in ("base", "zero"):
                        raise FormatError(f"{what}: exact field")
                n = _numel(shape)
                if enc in ("tall", "tall-derived", "tall-derived-merged", "qtau"):
                    ones = te.get("ones")
                    if ones is not None and not (_is_int(ones) and 0 <= ones <= n):
                        raise FormatError(f"{what}: ones {ones!r}")
                if enc == "qtau":
                    bits, block = te.get("bits"), te.get("block")
                    if not (_is_int(bits) and 2 <= bits <= 8 and _is_int(block) and 1 <= block <= 1 << 20):
                        raise FormatError(f"{what}: qtau bits {bits!r} block {block!r}")
                    codes = -(-n * bits // 8) if bits <= 4 else n
                    self._expect(te.get("codes"), "uint8", [codes], f"{what} codes")
                    self._expect(te.get("scales"), None, [-(-n // block)], f"{what} scales")
                    if self._arrays[id(te["scales"])].dtype not in ("float16", "float32"):
                        raise FormatError(f"{what}: qtau scales dtype")
                if "correction" in te:
                    self._check_correction(te, n, what)
                if "exact" in te:
                    ex = te["exact"]
                    if (ex.get("reference") not in ("tall", "base", "zero") or ex.get("transform") not in ("sub", "xor")
                            or ex.get("order") not in ("exponent", "none") or not _is_int(ex.get("xxh3"))):
                        raise FormatError(f"{what}: exact field {ex!r}")
                    self._expect(ex.get("residual"), UINT_NAME[DTYPES[dtype][1]], shape, f"{what} residual")

    def _check_correction(self, te: dict, n: int, what: str) -> None:
        """§6.1.6, at open."""
        corr = te["correction"]
        kind = corr.get("kind") if isinstance(corr, dict) else None
        if kind == "exact":
            if "exact" not in te:
                raise FormatError(f"{what}: exact correction without the exact field")
        elif kind == "sparse":
            k = self._arrays[id(corr["indices"])].shape if id(corr.get("indices")) in self._arrays else None
            if k is None or len(k) != 1:
                raise FormatError(f"{what}: sparse correction indices")
            self._expect(corr.get("indices"), None, list(k), f"{what} correction indices")
            self._expect(corr.get("values"), None, list(k), f"{what} correction values")
            if (self._arrays[id(corr["indices"])].dtype not in ("uint32", "uint64")
                    or self._arrays[id(corr["values"])].dtype not in ("float16", "float32")):
                raise FormatError(f"{what}: sparse correction dtypes")
        elif kind == "quant":
            bits, block = corr.get("bits"), corr.get("block")
            if bits not in (4, 8) or not _is_int(bits) or not (_is_int(block) and 1 <= block <= 1 << 20):
                raise FormatError(f"{what}: quant correction bits {bits!r} block {block!r}")
            self._expect(corr.get("scales"), "float32", [-(-n // block)], f"{what} correction scales")
            if bits == 8:
                self._expect(corr.get("codes"), "int8", [n], f"{what} correction codes")
            else:
                self._expect(corr.get("codes"), "uint8", [-(-n // 2)], f"{what} correction codes")
        else:
            raise FormatError(f"{what}: correction kind {kind!r}")

    def _expect(self, ref: Any, dtype: str | None, shape: list, what: str, floating: bool = False) -> None:
        if not isinstance(ref, dict) or id(ref) not in self._arrays:
            raise FormatError(f"{what}: missing")
        arr = self._arrays[id(ref)]
        if (dtype is not None and arr.dtype != dtype) or list(arr.shape) != list(shape):
            raise FormatError(f"{what}: {arr.dtype}{list(arr.shape)}, expected {dtype}{shape}")
        if floating and not DTYPES[arr.dtype][2]:
            raise FormatError(f"{what}: not floating")

    def _where(self, name: str) -> _Where | None:
        if name in self._members:
            return self._members[name]
        entry = self._entries.get(name)
        if entry is None or "members" in entry:
            return None
        return _Where(entry)

    # reading ----------------------------------------------------------------------------------
    def read_array(self, ref: dict, what: str = "array") -> np.ndarray:
        """Decode a whole array ref into its storage dtype and shape (§3.5, §5, §7)."""
        arr = self._arrays[id(ref)]
        parts = []
        for i, (off, nbytes, checksum) in enumerate(arr.chunks):
            stored = self._map[off:off + nbytes]
            got = (zlib.crc32(stored) & 0xFFFFFFFF if self.checksum == "crc32"
                   else xxhash.xxh3_64_intdigest(stored))
            if got != checksum:
                raise IntegrityError(f"{self.path}: {what}: chunk {i} checksum mismatch")
            sizes = _chain_sizes(arr, i)
            data = bytes(stored)
            for j in range(len(arr.codecs) - 1, -1, -1):
                data = decode_step(arr.codecs[j], data, sizes[j], f"{self.path}: {what}: chunk {i}")
            if len(data) != sizes[0]:
                raise FormatError(f"{self.path}: {what}: chunk {i} of {len(data)} bytes, expected {sizes[0]}")
            parts.append(data)
        flat = np.frombuffer(b"".join(parts), DTYPES[arr.dtype][0]).copy()
        if arr.dtype == "bool":
            if (flat > 1).any():
                raise FormatError(f"{self.path}: {what}: bool byte other than 0 or 1")
            flat = flat.astype(bool)
        return flat  # flat: callers reshape (0-d arrays turn into numpy scalars under arithmetic)

    def tensor_names(self, task: str) -> list[str]:
        return list(self._info(task)["keys"])

    def _info(self, task: str) -> dict:
        if task not in self._task_info:
            raise KeyError(f"{self.path}: no task {task!r}")
        return self._task_info[task]

    def tensor_bits(self, task: str, name: str, *, exact: bool = False) -> tuple[str, np.ndarray]:
        """(dtype name, array in its storage dtype) of one tensor of one task (§6.1, §3.7, §3.8)."""
        if name not in self._info(task)["keys"]:
            raise KeyError(f"{self.path}: task {task!r} has no tensor {name!r}")
        target = self.aliases.get(name, name)
        where = self._where(target)
        te = where.entry["tasks"][task]
        flat = np.asarray(self._rebuild(where.entry, task, exact)).reshape(-1)
        if where.offset is not None:
            n = _numel(list(where.shape))
            return te["dtype"], flat[where.offset:where.offset + n].reshape(where.shape)
        return te["dtype"], flat.reshape(te["shape"])

    def tensor(self, task: str, name: str, *, exact: bool = False) -> Any:
        """numpy array, or a torch tensor for bfloat16 and float8 (numpy has neither)."""
        dtype, bits = self.tensor_bits(task, name, exact=exact)
        if dtype == "bool":
            return bits
        if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            import torch

            raw = np.array(bits, copy=True).view(np.int16 if dtype == "bfloat16" else np.uint8)  # (torch 2.1: no uint16)
            return torch.from_numpy(raw).view(getattr(torch, dtype))
        return bits

    def state_dict(self, task: str, *, exact: bool = False) -> dict[str, Any]:
        return {k: self.tensor(task, k, exact=exact) for k in self.tensor_names(task)}

    # §3.6, §6.5 -----------------------------------------------------------------------------------
    def file(self, name: str, task: str | None = None) -> bytes:
        """A kept folder file of a task (or of the base), its SHA-256 checked (§3.6)."""
        owner = self.manifest.get("base", {}) if task is None else self._info(task)
        key = (owner.get("files") or {})[name]
        data = self.read_array(self.manifest["files"][key], f"file {name!r}").tobytes()
        if hashlib.sha256(data).hexdigest() != key:
            raise IntegrityError(f"{self.path}: file {name!r}: SHA-256 mismatch")
        return data

    def original_file(self, task: str, name: str) -> bytes:
        """A recorded input file rebuilt byte for byte (§6.5: roles "safetensors" and "file")."""
        record = next(f for f in self._info(task)["exact"]["files"] if f["name"] == name)
        if record["role"] == "file":
            data = (record["text"].encode("utf-8") if "text" in record
                    else base64.b64decode(record["base64"], validate=True))
        elif record["role"] == "safetensors":
            header = record["header"].encode("utf-8")
            parse_json(header)
            meta = json.loads(header)
            prefix = record.get("prefix", "")
            parts = [struct.pack("<Q", len(header)), header]
            tensors = sorted((v["data_offsets"], k) for k, v in meta.items() if k != "__metadata__")
            for _, tname in tensors:
                parts.append(np.ascontiguousarray(self.tensor_bits(task, prefix + tname, exact=True)[1]).tobytes())
            data = b"".join(parts)
        else:
            raise FormatError(f"{self.path}: task {task!r} file {name!r}: role {record['role']!r} is not rebuilt")
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise IntegrityError(f"{self.path}: task {task!r} file {name!r}: rebuilt bytes do not match the record")
        return data

    # §6.1 ---------------------------------------------------------------------------------------
    def _rebuild(self, entry: dict, task: str, exact: bool) -> np.ndarray:
        te = entry["tasks"][task]
        enc, dtype, name = te["encoding"], te["dtype"], entry["name"]
        what = f"tensor {name!r} task {task!r}"
        if enc == "dense":
            return self.read_array(te["data"], what)
        if enc == "shared":
            return self.read_array(entry["data"], f"tensor {name!r}")
        if enc == "tall":
            if exact or (isinstance(te.get("correction"), dict) and te["correction"].get("kind") == "exact"):
                if "exact" not in te:
                    raise FormatError(f"{self.path}: {what} has no exact tier")
                return self._exact(entry, task)
            out32 = self._tall32(entry, task)
            corr = te.get("correction")
            if isinstance(corr, dict):
                out32 = out32 + self._correction(corr, te, what)
            return cast_f32(out32, dtype)
        if enc in ("tall-derived", "tall-derived-merged"):
            x = self._exact(entry, task)
            if exact:
                return x
            base32 = to_f32(self.read_array(entry["base"], f"tensor {name!r} base"), self._arrays[id(entry["base"])].dtype)
            if enc == "tall-derived":
                merged = self.read_array(entry["merged"], f"tensor {name!r} merged")
            else:
                merged = self._derive_merged(entry)
            tau = to_f32(x, dtype) - base32
            mask = np.abs(tau) > np.float32(te["lambda"]) * np.abs(merged - tau)
            if int(mask.sum()) != te["ones"]:
                raise IntegrityError(f"{self.path}: {what}: derived mask has {int(mask.sum())} bits, not {te['ones']}")
            return cast_f32(base32 + mask.astype(np.float32) * merged, dtype)
        if enc == "qtau":
            if exact:
                raise FormatError(f"{self.path}: {what} has no exact tier")
            return self._qtau(entry, te, what)
        raise FormatError(f"{self.path}: {what}: unknown encoding {enc!r}")

    def _tall32(self, entry: dict, task: str) -> np.ndarray:
        """§6.1.1 before the cast: f32(B) + f32(K) * M in binary32."""
        te, name = entry["tasks"][task], entry["name"]
        base = self.read_array(entry["base"], f"tensor {name!r} base")
        merged = self.read_array(entry["merged"], f"tensor {name!r} merged")
        mask = self.read_array(te["mask"], f"tensor {name!r} task {task!r} mask")
        with np.errstate(invalid="ignore"):
            return to_f32(base, self._arrays[id(entry["base"])].dtype) + mask.astype(np.float32) * merged

    def _correction(self, corr: dict, te: dict, what: str) -> np.ndarray:
        """§6.1.6 C, as float32 of the task entry's shape."""
        n = _numel(te["shape"])
        kind = corr.get("kind")
        c = np.zeros(n, np.float32)
        if kind == "sparse":
            gaps = self.read_array(corr["indices"], f"{what} correction indices").astype(np.uint64)
            values = self.read_array(corr["values"], f"{what} correction values")
            if len(gaps) > 1 and (gaps[1:] == 0).any():
                raise FormatError(f"{self.path}: {what}: correction indices do not increase")
            idx = np.cumsum(gaps, dtype=np.uint64)
            if len(idx) and int(idx[-1]) >= n:
                raise FormatError(f"{self.path}: {what}: correction index past the tensor")
            c[idx.astype(np.int64)] = values.astype(np.float32)
        elif kind == "quant":
            scales = self.read_array(corr["scales"], f"{what} correction scales")
            codes = self.read_array(corr["codes"], f"{what} correction codes")
            if corr["bits"] == 8:
                q = codes.astype(np.float32)
            else:
                pairs = np.stack([codes & 0x0F, codes >> 4], axis=1).reshape(-1)[:n]
                q = pairs.astype(np.int16).astype(np.float32) - np.float32(8)
            c = q * scales[np.arange(n) // corr["block"]]
        else:
            raise FormatError(f"{self.path}: {what}: correction kind {kind!r}")
        return c

    def _qtau(self, entry: dict, te: dict, what: str) -> np.ndarray:
        """§6.1.8."""
        n, bits, block = _numel(te["shape"]), te["bits"], te["block"]
        codes = self.read_array(te["codes"], f"{what} codes")
        scales = self.read_array(te["scales"], f"{what} scales").astype(np.float32)
        if bits >= 5:
            u = codes.astype(np.int64)[:n]
        else:
            padded = np.concatenate([codes, np.zeros(2, np.uint8)]).astype(np.int64)
            start = np.arange(n, dtype=np.int64) * bits
            word = padded[start >> 3] | (padded[(start >> 3) + 1] << 8)
            u = (word >> (start & 7)) & ((1 << bits) - 1)
        q = (u - (1 << (bits - 1))).astype(np.float32)
        d = q * scales[np.arange(n) // block]
        base = self.read_array(entry["base"], f"tensor {entry['name']!r} base")
        base32 = to_f32(base, self._arrays[id(entry["base"])].dtype).reshape(-1)
        return cast_f32(base32 + d, te["dtype"])

    def _exact(self, entry: dict, task: str) -> np.ndarray:
        """tensor_exact of §6.1.5, its xxh3 checked."""
        te, name = entry["tasks"][task], entry["name"]
        dtype = te["dtype"]
        what = f"tensor {name!r} task {task!r}"
        ex = te["exact"]
        itemsize = DTYPES[dtype][1]
        udt = UINT_OF_SIZE[itemsize]
        nbits = 8 * itemsize
        if ex["reference"] == "tall":
            ref = cast_f32(self._tall32(entry, task), dtype)
        elif ex["reference"] == "base":
            base_arr = self._arrays[id(entry["base"])]
            base = self.read_array(entry["base"], f"tensor {name!r} base")
            # cast_d(f32(B)): through float32 even for a float64 base and task (found by
            # experiment: §6.1.5's "B's own bits when B has dtype d" is not so for float64)
            ref = cast_f32(to_f32(base, base_arr.dtype), dtype)
        else:
            ref = np.zeros(_numel(te["shape"]), DTYPES[dtype][0])
        r = np.ascontiguousarray(ref).reshape(-1).view(udt)
        res_ref = ex["residual"]
        s = self.read_array(res_ref, f"{what} residual").reshape(-1).astype(udt)
        if ex["order"] == "exponent":
            e_bits, m_bits = EXP_MANT[dtype]
            key = (r >> udt.type(m_bits)) & udt.type((1 << e_bits) - 1)
            z = np.empty_like(s)
            ce = self._arrays[id(res_ref)].chunk_elements
            for c0 in range(0, len(s), ce):
                perm = np.argsort(key[c0:c0 + ce], kind="stable")
                z[c0 + perm] = s[c0:c0 + ce]
        else:
            z = s
        one = udt.type(1)
        if ex["transform"] == "xor":
            x = z ^ r
        else:
            low = udt.type((1 << (nbits - 1)) - 1)

            def ordered(u: np.ndarray) -> np.ndarray:
                return u ^ ((u >> udt.type(nbits - 1)) * low)

            with np.errstate(over="ignore"):
                d = (z >> one) ^ (udt.type(0) - (z & one))
                x = ordered(ordered(r) + d)
        x = x.astype(udt)
        if xxhash.xxh3_64_intdigest(x.tobytes()) != ex["xxh3"]:
            raise IntegrityError(f"{self.path}: {what}: exact xxh3 mismatch")
        return x.view(DTYPES[dtype][0])

    def _derive_merged(self, entry: dict) -> np.ndarray:
        """§6.1.9: τ_MTL from every task's original, in the manifest's task order."""
        name = entry["name"]
        base_arr = self._arrays[id(entry["base"])]
        base32 = to_f32(self.read_array(entry["base"], f"tensor {name!r} base"), base_arr.dtype)
        order = [t for t in self.tasks if t in entry["tasks"]]
        taus = [to_f32(self._exact(entry, t), entry["tasks"][t]["dtype"]) - base32 for t in order]
        merge = self.manifest["merge"]
        method = merge.get("method")

        def total(vs: list[np.ndarray]) -> np.ndarray:
            acc = np.zeros(base32.shape, np.float32)
            for v in vs:
                acc = acc + v
            return acc

        if method == "ta":
            return total(taus)
        if method == "ties":
            thresholds, s0 = merge.get("thresholds"), merge.get("majority_sign")
            if not isinstance(thresholds, list) or len(thresholds) != len(self.tasks) or s0 is None:
                raise FormatError(f"{self.path}: ties merge without thresholds or majority_sign")
            if isinstance(s0, bool) or s0 not in (-1, 0, 1):
                raise FormatError(f"{self.path}: majority_sign {s0!r}")
            thr = {t: np.float32(thresholds[self.tasks.index(t)]) for t in order}
            r = [tau * (np.abs(tau) >= thr[t]).astype(np.float32) for t, tau in zip(order, taus)]
            s = np.sign(total(r))
            s = np.where(s == 0, np.float32(s0), s)
            k = [rj * np.where(s > 0, rj > 0, rj < 0).astype(np.float32) for rj in r]
            return total(k)
        raise FormatError(f"{self.path}: tensor {name!r}: merge method {method!r} cannot be derived")


def _is_number(v: Any, low: float, high: float) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and low <= v <= high


UINT_NAME = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def open_archive(path: str | os.PathLike) -> SpecArchive:
    """Open and validate an archive (§2, §3, §7)."""
    return SpecArchive(path)
