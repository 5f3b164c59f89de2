"""The compiled loops under review (round 34): a Python caller that changes what the C holds
cannot crash it, and a machine without AVX2 or F16C (``-DTALLPACK_PORTABLE``: the scalar loops
and no ``target_clones``) gives the same bits as this build and as the numpy fallbacks, on
hostile values (NaN, infinities, subnormals: random bits) and lengths around every vector step."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tallpack
from tallpack import kernels

_kernels = pytest.importorskip("tallpack._kernels", reason="built without a C compiler: the numpy loops run")


# -- a caller's objects that change the list json_pairs walks -------------------------------------

_MUTATING_KEYS = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_kernels", sys.argv[1])
k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(k)
pairs = []

class Clears:  # drops every pair (this one's tuple too) while json_pairs adds it
    def __hash__(self):
        pairs.clear()
        return 1

class Grows:
    def __hash__(self):
        pairs.append(("more", 1))
        return 2

for key, rest in ((Clears(), [("b", 2), ("c", 3)]), (Grows(), [("b", 2)])):
    pairs[:] = [(key, object()), *rest]
    try:
        k.json_pairs(pairs)
    except ValueError as e:
        print(e)
"""


def test_json_pairs_survives_keys_that_change_the_list(tmp_path):
    """A key whose ``__hash__`` empties the list (freeing the pair being added) made json_pairs read
    past the list's end: a segfault. json gives str keys; a caller's objects must still not crash
    it: the change is refused in one line."""
    script = tmp_path / "keys.py"
    script.write_text(_MUTATING_KEYS)
    got = subprocess.run([sys.executable, str(script), _kernels.__file__], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.splitlines() == ["json_pairs: the pairs changed while they were read"] * 2


def test_json_pairs_still_refuses_duplicates_and_builds_dicts():
    assert _kernels.json_pairs([("a", 1), ("b", [2])]) == {"a": 1, "b": [2]}
    with pytest.raises(ValueError, match="duplicate key"):
        _kernels.json_pairs([("a", 1), ("a", 2)])
    with pytest.raises(TypeError):
        _kernels.json_pairs([("a", 1, 2)])


# -- the portable build (no AVX2, no F16C, no target_clones) against this one and numpy -----------

@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """tallpack/_kernels.c built as for a CPU without AVX2 (setup.py's flags, ``-DTALLPACK_PORTABLE``)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("portable") / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    src = Path(kernels.__file__).with_name("_kernels.c")
    cmd = [cc, "-O3", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC", "-DTALLPACK_PORTABLE",
           f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"cannot build the portable module: {built.stderr[-500:]}")
    spec = importlib.util.spec_from_file_location("_kernels", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Lengths around the loops' steps: 8 (a mask byte, a lane row), 32 (an AVX2 step), 1024 (TV_BLOCK,
# MERGE_BLOCK), 2048 (MASK_BLOCK), 4096 (BITS_BLOCK).
_lengths = st.one_of(st.integers(0, 300), st.sampled_from([1023, 1024, 1025, 2047, 2049, 4095, 4097, 8200]))
_seeds = st.integers(0, 2**32 - 1)


def _bits(n: int, rng: np.random.Generator, width: int) -> np.ndarray:
    """n values of ``width`` bytes as unsigned ints: half random bits (NaN, infinities, subnormals),
    half small ordinary values, and runs of zeros."""
    dt = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    v = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
    ordinary = {2: np.float16, 4: np.float32, 8: np.float64}[width]
    plain = (rng.standard_normal(n) * 0.01).astype(ordinary).view(dt)
    pick = rng.random(n)
    v = np.where(pick < 0.5, plain, v)
    v[pick > 0.9] = 0
    return v


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A copy of a byte array starting one byte past an aligned address (the loops load planes
    unaligned)."""
    buf = np.empty(a.size + 1, np.uint8)
    out = buf[1:]
    out[:] = a
    return out


def _canon(a: np.ndarray, width: int, kind: str = "ieee") -> np.ndarray:
    """Bits with every NaN's payload made one; else as they are. Spec 6.1.1 leaves payloads open,
    and which of two NaN operands an addition passes on is the compiler's choice of operand order
    (test_float16_nans_narrow_alike_in_every_build checks one NaN's payload through the narrowing)."""
    u = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[width]).copy()
    if width == 4:
        u[(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = 0x7FC00000
    elif width == 8:
        u[(u & np.uint64(0x7FFFFFFFFFFFFFFF)) > np.uint64(0x7FF0000000000000)] = 0x7FF8000000000000
    elif kind == "bf16":
        u[(u & np.uint16(0x7FFF)) > np.uint16(0x7F80)] = 0x7FC0
    else:
        u[(u & np.uint16(0x7FFF)) > np.uint16(0x7C00)] = 0x7E00
    return u


def _planes_of(v: np.ndarray, r: int) -> list[np.ndarray]:
    """Elements as the writer stores them (``planes``, or ``planes-exp`` of rotation r), unaligned."""
    b = v.view(np.uint8).reshape(-1, v.itemsize)
    planes = [np.ascontiguousarray(b[:, j]) for j in range(v.itemsize)]
    if r:
        t, s = kernels.rotate(planes[-2], planes[-1], r)
        planes[-2], planes[-1] = s, t
    return [_unaligned(p) for p in planes]


def _mask(n: int, rng: np.random.Generator, bits: bool) -> np.ndarray:
    """A mask of 0/1 bytes, or its bits packed (padding bits set: the loops must not read them)."""
    m = (rng.random(n) < 0.4).astype(np.uint8)
    if not bits:
        return m
    packed = np.packbits(m, bitorder="little")
    if n % 8:
        packed[-1] |= np.uint8(0xFF << (n % 8) & 0xFF)
    return packed


@given(_lengths, st.integers(0, 7), st.integers(0, 7), st.booleans(), st.sampled_from(["f32", "bf16", "f16"]), _seeds)
@settings(max_examples=150, deadline=None)
def test_rebuilds_from_planes_without_avx2_give_the_same_bits(portable, n, rb, rm, bits, out_kind, seed):
    """tall_planes (float32), tall_planes_bf16 and tall_planes_f16, the mask as bytes or bits:
    this build (AVX2 and F16C where the CPU has them), the portable one and the numpy fallback."""
    rng = np.random.default_rng(seed)
    width = 4 if out_kind == "f32" else 2
    base, merged, mask = _bits(n, rng, width), _bits(n, rng, 4), _mask(n, rng, bits)
    name = {"f32": "tall_planes", "bf16": "tall_planes_bf16", "f16": "tall_planes_f16"}[out_kind]
    args = (_planes_of(base, rb), rb, _planes_of(merged, rm), rm, mask)
    outs = []
    dtype = np.float32 if out_kind == "f32" else np.uint16
    for module in (_kernels, portable):
        out = np.full(n, 0x5A, dtype)
        getattr(module, name)(*args, out, bits)
        outs.append(_canon(out, width, out_kind))
    assert np.array_equal(outs[0], outs[1])
    numpy_twin = getattr(kernels, f"_{name}_numpy")
    out = np.full(n, 0x5A, dtype)
    numpy_twin(*args[:4], np.unpackbits(mask, count=n, bitorder="little") if bits else mask, out)
    assert np.array_equal(_canon(outs[0], width, out_kind), _canon(out, width, out_kind))


def test_float16_nans_narrow_alike_in_every_build(portable):
    """A float32 NaN narrowed to float16 keeps its payload's top bits, quieted, in the scalar loops
    as F16C keeps them (they gave 0x7E00 for every NaN: a portable build's merged float16 NaNs then
    differed from this one's, and from torch's, which casts with F16C where the CPU has it)."""
    rng = np.random.default_rng(5)
    payload = rng.integers(1, 1 << 23, 4013, dtype=np.uint32)  # not a multiple of 32: the AVX2 loops' tails too
    payload[:23] = np.uint32(1) << np.arange(23, dtype=np.uint32)  # each payload bit alone
    signs = rng.integers(0, 2, payload.size, dtype=np.uint32) << np.uint32(31)
    nans = (payload | np.uint32(0x7F800000) | signs).view(np.float32)
    n = nans.size
    outs = []
    for module in (_kernels, portable):
        merged = np.full(n, 0x5A5A, np.uint16)
        module.merge_apply(np.zeros(n, np.uint16), 2, nans, [], 0, b"", 1.0, merged)
        rebuilt = np.full(n, 0x5A5A, np.uint16)
        module.tall_planes_f16(_planes_of(np.zeros(n, np.uint16), 0), 0, _planes_of(nans, 0), 0, np.ones(n, np.uint8),
                               rebuilt)
        outs += [merged, rebuilt]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert ((outs[0] & 0x7E00) == 0x7E00).all()  # quiet NaNs, each keeping its sign
    assert np.array_equal(outs[0] >> 15, nans.view(np.uint32) >> 31)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # torch casts with F16C here
        want = (torch.zeros(n) + torch.from_numpy(nans)).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(outs[0], want)


@given(_lengths, st.booleans(), _seeds)
@settings(max_examples=60, deadline=None)
def test_tall_f32_without_avx2_gives_the_same_bits(portable, n, bits, seed):
    rng = np.random.default_rng(seed)
    base, merged, mask = _bits(n, rng, 4).view(np.float32), _bits(n, rng, 4).view(np.float32), _mask(n, rng, bits)
    outs = []
    for module in (_kernels, portable):
        out = np.full(n, 7.0, np.float32)
        module.tall_f32(base, merged, mask, out, bits)
        outs.append(_canon(out, 4))
    m = np.unpackbits(mask, count=n, bitorder="little") if bits else mask
    with np.errstate(all="ignore"):
        want = base + m.astype(np.float32) * merged
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(_canon(outs[0], 4), _canon(want, 4))


_KIND_WIDTH = {0: 4, 1: 2, 2: 2, 3: 8}


def _widen(x: np.ndarray, kind: int) -> np.ndarray:
    if kind == 3:
        return x.view(np.float64).astype(np.float32)
    return kernels._widen(x, kernels.KINDS[kind])


@given(_lengths, st.sampled_from([0, 1, 2, 3]), st.sampled_from(["plain", "consensus", "ties"]),
       st.sampled_from([0.0, 1.0, 0.3, -0.7, 1e-30, 3e38]), _seeds)
@settings(max_examples=120, deadline=None)
def test_merge_apply_without_avx2_gives_the_same_bits(portable, n, kind, path, alpha, seed):
    """A merged model's tensor (plain, consensus masks, TIES' counts) for each kind: this build,
    the portable one and numpy's float32 operations in the loop's order; the flags alike."""
    rng = np.random.default_rng(seed)
    theta, d = _bits(n, rng, _KIND_WIDTH[kind]), _bits(n, rng, 4).view(np.float32)
    masks, k, counts = [], 0, b""
    if path == "consensus":
        masks = [(rng.random(n) < 0.5).astype(np.uint8) for _ in range(int(rng.integers(1, 5)))]
        k = int(rng.integers(0, len(masks) + 2))
    elif path == "ties":
        counts = rng.integers(0, 256, n, dtype=np.uint8)
    got = []
    for module in (_kernels, portable):
        out = np.full(n, 0x5A, theta.dtype)
        flags = module.merge_apply(theta, kind, d, masks, k, counts, alpha, out)
        got.append((_canon(out, _KIND_WIDTH[kind], "bf16" if kind == 1 else "ieee"), flags))
    assert np.array_equal(got[0][0], got[1][0]) and got[0][1] == got[1][1]
    with np.errstate(all="ignore"):
        dd = d.copy()
        if masks:
            dd = dd * (np.sum(masks, axis=0) >= k).astype(np.float32)
        if len(counts):
            dd = dd / np.maximum(counts, 1).astype(np.float32)
        s = _widen(theta, kind) + np.float32(alpha) * dd
    if kind == 0:
        want = s
    elif kind == 1:  # rounded to nearest even, as torch's .to(torch.bfloat16)
        u = s.view(np.uint32)
        want = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        want[(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = 0xFFFF
    elif kind == 2:
        want = s.astype(np.float16)
    else:
        want = s.astype(np.float64)
    canon = "bf16" if kind == 1 else "ieee"
    assert np.array_equal(_canon(got[0][0], _KIND_WIDTH[kind], canon), _canon(want, _KIND_WIDTH[kind], canon))


@given(_lengths, st.sampled_from([0, 1, 2]), st.integers(1, 4), st.booleans(), _seeds)
@settings(max_examples=100, deadline=None)
def test_packers_loops_without_avx2_give_the_same_bits(portable, n, kind, tasks, no_base, seed):
    """tv_sum, max_abs_diff and TIES' histograms, signs and disjoint sum (float16: F16C's widening
    here, the scalar one there): this build, the portable one, and numpy."""
    rng = np.random.default_rng(seed)
    width = _KIND_WIDTH[kind]
    no_base = no_base and kind == 0
    n = n if kind == 0 else max(n, 1)  # an empty base is "none", which only float32 thetas may have
    as_kind = (lambda x: x.view(np.float32)) if kind == 0 else (lambda x: x)  # float32 thetas: the task vectors
    base = as_kind(_bits(n, rng, width))
    thetas = [as_kind(_bits(n, rng, width)) for _ in range(tasks)]
    with np.errstate(all="ignore"):
        tvs = [kernels._tv_numpy(t, base, kernels.KINDS[kind]) for t in thetas]
        taus = [kernels._tv_numpy(t, None if no_base else base, kernels.KINDS[kind]) for t in thetas]
        thr = np.array([abs(float(np.nan_to_num(t[: 1 + n // 3]).mean())) if n else 0.0 for t in taus], np.float32)
        want_sum = tvs[0] + np.float32(0)
        for t in tvs[1:]:
            want_sum = want_sum + t
    results = []
    for module in (_kernels, portable):
        r = {}
        out = np.full(n, 7.0, np.float32)
        module.tv_sum(base, thetas, kind, out)
        r["sum"] = _canon(out, 4)
        r["max"] = module.max_abs_diff(thetas[0], base, kind)
        for b in (-1, 0, 0x3C23, 0x7F80):
            hist = np.zeros(1 << 16, np.int64)
            module.ties_hist(thetas[0], b"" if no_base else base, kind, b, hist)
            r[f"hist{b}"] = hist
        r["signs"] = module.ties_signs(b"" if no_base else base, thetas, kind, thr, n)
        m, c = np.full(n, 7.0, np.float32), np.full(n, 9, np.uint8)
        module.ties_merge(b"" if no_base else base, thetas, kind, thr, 1.0, m, c)
        r["merge"], r["counts"] = _canon(m, 4), c
        results.append(r)
    for key in results[0]:
        assert np.array_equal(results[0][key], results[1][key]), key
    assert np.array_equal(_canon(results[0]["sum"], 4), _canon(want_sum, 4))
    assert results[0]["max"] == (int(np.abs(tvs[0]).view(np.uint32).max()) if n else 0)
    for b in (-1, 0, 0x3C23, 0x7F80):
        hist = np.zeros(1 << 16, np.int64)
        kernels.ties_hist_numpy(thetas[0], None if no_base else base, kernels.KINDS[kind], b, hist)
        assert np.array_equal(results[0][f"hist{b}"], hist), b
    assert results[0]["signs"] == kernels.ties_signs_numpy(None if no_base else base, thetas, kernels.KINDS[kind], thr)
    m, c = np.empty(n, np.float32), np.empty(n, np.uint8)
    kernels.ties_merge_numpy(None if no_base else base, thetas, kernels.KINDS[kind], thr, 1.0, m, c)
    assert np.array_equal(_canon(results[0]["merge"], 4), _canon(m, 4)) and np.array_equal(results[0]["counts"], c)


@given(_lengths, st.sampled_from([1, 2, 4]), st.integers(0, 7), _seeds)
@settings(max_examples=60, deadline=None)
def test_codec_loops_without_avx2_give_the_same_bytes(portable, n, k, r, seed):
    """The decoders' joins, the writer's split, bitsplit/bitjoin and unpack_bits: the loops the
    compiler cloned for AVX2 (``target_clones``) against the portable build's, and numpy's."""
    rng = np.random.default_rng(seed)
    r = r if k >= 2 else 0
    src = rng.integers(0, 256, n * k, dtype=np.uint8)
    outs = []
    for module in (_kernels, portable):
        planes = np.full((k, n), 0xCD, np.uint8)
        module.split_planes(src, k, r, planes)
        back = np.full(n * k, 0xEF, np.uint8)
        if r:
            module.join_exponent([_unaligned(p) for p in planes[: k - 2]], planes[k - 2], planes[k - 1], r, back)
        else:
            module.join_planes([_unaligned(p) for p in planes], back)
        heads, low = np.empty(n, np.uint8), np.zeros(n * k + 8, np.uint8)
        got = module.bitsplit(src, k, heads, low)
        again = np.full(n * k, 0x11, np.uint8)
        status = module.bitjoin(heads, low[:got], k, again)
        unpacked = np.empty(n * k, np.uint8)
        module.unpack_bits(src[: (n * k + 7) // 8], unpacked)
        outs.append((planes, back, heads, low[:got], status, again, unpacked))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    planes, back, _, _, status, again, unpacked = outs[0]
    assert np.array_equal(back, src) and status == 0 and np.array_equal(again, src)
    assert np.array_equal(unpacked, np.unpackbits(src[: (n * k + 7) // 8], count=n * k, bitorder="little"))
    numpy_join = np.full((n, k), 0xEF, np.uint8)
    kernels._join_stored(list(planes), r, numpy_join)
    assert np.array_equal(numpy_join.reshape(-1), src)


# -- a process without the extension reads the same bits --------------------------------------------

#: Every tensor a reader gives, as sha256 of its bytes: each task's (rebuilt through the stored
#: planes too: ``PLANAR_MIN_ELEMENTS`` 0), its exact originals, the base's, and the merged models.
_DIGESTS = r"""
import hashlib, json, sys
import torch
import tallpack
from tallpack import kernels, reader
from tallpack.merging import MERGED_MODELS

def digests(path):
    out = {}
    def put(key, sd):
        for name, t in sorted(sd.items()):
            out[f"{key}/{name}"] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    for planar in (reader.PLANAR_MIN_ELEMENTS, 0):
        was, reader.PLANAR_MIN_ELEMENTS = reader.PLANAR_MIN_ELEMENTS, planar
        try:
            with tallpack.open(path, cache_bytes=0) as fam:  # no cache: each read decodes
                for t in fam.tasks:
                    put(f"{planar}/{t}", fam.state_dict(t))
                    if fam.task_info(t).exact is not None:
                        put(f"{planar}/{t}/exact", fam.state_dict(t, exact=True))
        finally:
            reader.PLANAR_MIN_ELEMENTS = was
    with tallpack.open(path) as fam:
        bases = {e.name: fam.base_tensor(e.name) for e in fam.manifest.tensors}
        put("base", {k: v for k, v in bases.items() if v is not None})
        for model, needs in MERGED_MODELS.items():
            if needs == fam.manifest.merge.get("method"):
                put(model, fam.merged(model, **({"k": 2} if model.startswith("consensus") else {})))
    return out

if __name__ == "__main__":
    print(json.dumps([kernels.COMPILED, [digests(p) for p in sys.argv[1:]]]))
"""

_E2E = {
    "f32_planes_exp_ta": dict(merge="ta"),
    "bf16_planes_exp_ties": dict(merge="ties", dtype="bfloat16"),
    "f16_planes_ta": dict(merge="ta", dtype="float16"),
    "f16_bytegroup_ties": dict(merge="ties", dtype="float16", codec="bytegroup-zstd"),
    "f32_exact_ties": dict(merge="ties", exact=True, codec="planes"),
    "bf16_exact_ta": dict(merge="ta", exact=True, dtype="bfloat16"),
    "f32_fidelity_corrections": dict(merge="ta", fidelity=0.99, corrections=("sparse", "quant4", "quant8", "exact")),
}


def test_a_process_without_the_extension_reads_the_same_bits(tmp_path):
    """Archives of each dtype, codec, merge method and tier, read here (the compiled loops) and in
    a process that turns them off (``TALLPACK_NO_KERNELS=1``, as an install without a C compiler):
    every task's tensors, through the stored planes too, exact originals, base, merged models."""
    paths = []
    for i, (name, cfg) in enumerate(_E2E.items()):
        cfg = dict(cfg)
        dtype = getattr(torch, cfg.pop("dtype", "float32"))
        g = torch.Generator().manual_seed(i)
        base = {"w": torch.randn(37, 33, generator=g).to(dtype), "b": torch.randn(300, generator=g).to(dtype),
                "ids": torch.arange(9)}
        tasks = {}
        for t in ("a", "b", "c"):
            tasks[t] = {k: v.clone() for k, v in base.items()}
            for k in ("w", "b"):
                tau = 0.05 * torch.randn(base[k].shape, generator=g) * (torch.rand(base[k].shape, generator=g) < 0.5)
                tasks[t][k] = (base[k].float() + tau).to(dtype)
        path = tmp_path / f"{name}.tallpack"
        tallpack.pack(base, tasks, path, chunk_elements=256, lambdas=0.4, **cfg)
        paths.append(str(path))
    script = tmp_path / "digests.py"
    script.write_text(_DIGESTS)
    runs = {}
    for off in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "TALLPACK_NO_KERNELS"}
        if off:
            env["TALLPACK_NO_KERNELS"] = "1"
        got = subprocess.run([sys.executable, str(script), *paths], env=env, capture_output=True, text=True,
                             timeout=600)
        assert got.returncode == 0, got.stderr[-3000:]
        compiled, runs[off] = json.loads(got.stdout.splitlines()[-1])
        assert compiled is not off
    for path, on, off in zip(paths, runs[False], runs[True]):
        assert len(on) > 20 and on.keys() == off.keys(), path
        assert [k for k in on if on[k] != off[k]] == [], path
