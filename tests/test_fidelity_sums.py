"""The fidelity figures' sums (spec §6.4) in one order: the compiled loops, their numpy twin
(``kernels.Sums.add``), any CPU, any cut of a tensor into calls, any thread count, give the same
bits, so the same family packed twice is the same file."""

from __future__ import annotations

import filecmp
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
from tallpack.tall import Fidelity, elements, tall_mask, task_vector

needs_kernels = pytest.mark.skipif(not kernels.COMPILED, reason="the compiled loops are not built")

_special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 3e-39, -1.2e-38, 1e-38, 1e30, -1e30, 1.0, -1.0, 0.5])
_lams = st.sampled_from([0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 1 / 3])


def _drawn(n: int, seed: int, specials: list[tuple[int, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """tau and merged over many magnitudes, with zeros of both signs and subnormals placed."""
    g = np.random.default_rng(seed)
    tau = (g.standard_normal(n) * 10.0 ** g.integers(-30, 12, n) * (g.random(n) < 0.8)).astype(np.float32)
    merged = (tau * g.integers(-2, 3, n) + g.standard_normal(n) * (g.random(n) < 0.4)).astype(np.float32)
    for i, t, m in specials:
        if i < n:
            tau[i], merged[i] = t, m
    return tau, merged


def _twin(tau: np.ndarray, merged: np.ndarray, lam: float, cuts: list[int]) -> tuple[kernels.Sums, np.ndarray]:
    """The numpy twin over the calls ``cuts`` makes: mask by ``tall.tall_mask``, sums by ``Sums.add``."""
    mask = tall_mask(torch.from_numpy(tau), torch.from_numpy(merged), lam).numpy()
    sums = kernels.Sums()
    for a, b in zip(cuts, cuts[1:]):
        sums.add(tau[a:b], mask[a:b].astype(np.float32) * merged[a:b], a)
    return sums, mask


def _cuts(n: int, points: list[int]) -> list[int]:
    return sorted({0, n, *(p for p in points if p < n)})  # (the packer's cuts are multiples of 8; any will do)


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(st.integers(0, 5000), _lams, st.integers(0, 2**31), st.lists(st.tuples(st.integers(0, 4999), _special, _special),
       max_size=20), st.lists(st.integers(0, 5000), max_size=4))
def test_the_compiled_sums_are_the_numpy_twins_bits(n, lam, seed, specials, points):
    tau, merged = _drawn(n, seed, specials)
    cuts = _cuts(n, points)
    want, want_mask = _twin(tau, merged, lam, [0, n])
    got, mask = kernels.Sums(), np.full(n, 9, np.uint8)
    ones = 0
    for a, b in zip(cuts, cuts[1:]):  # any cut into calls: blocks count from the tensor's start
        ones += kernels.tall_mask(tau[a:b], merged[a:b], lam, mask[a:b], got, a)
    assert np.array_equal(mask, want_mask.view(np.uint8)) and ones == int(want_mask.sum())
    assert np.array_equal(got.state, want.state)
    assert np.array_equal(got.totals(), want.totals(), equal_nan=True)  # (inf - inf: a NaN figure)
    cut, _ = _twin(tau, merged, lam, cuts)
    assert np.array_equal(cut.state, want.state)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(kernels.KINDS)), st.integers(0, 5000), st.integers(0, 2**31), _lams,
       st.lists(st.integers(0, 5000), max_size=3))
def test_the_straight_pass_sums_as_the_mask_pass(kind, n, seed, lam, points):
    """``tall_mask_tv`` (the task vector computed on the way) adds the state ``tall_mask_f32`` adds."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, kind)
    base = (torch.randn(n, generator=g) * 10.0 ** torch.randint(-4, 3, (n,), generator=g)).to(dt)
    theta = (base.float() + torch.randn(n, generator=g) * 1e-2 * (torch.rand(n, generator=g) < 0.6)).to(dt)
    merged = (task_vector(theta, base) * 1.5 + torch.randn(n, generator=g) * 1e-3).numpy()
    tau = task_vector(theta, base).numpy()
    cuts = _cuts(n, points)
    want, got = kernels.Sums(), kernels.Sums()
    m1, m2 = np.empty(n, np.uint8), np.empty(n, np.uint8)
    for a, b in zip(cuts, cuts[1:]):
        kernels.tall_mask(tau[a:b], merged[a:b], lam, m1[a:b], want, a)
        kernels.tall_mask_tv(elements(theta)[a:b], elements(base)[a:b], kind, merged[a:b], lam, m2[a:b], got, a)
    assert np.array_equal(m1, m2) and np.array_equal(got.state, want.state)


def test_the_sums_are_exact_across_blocks_and_tensors_in_any_order():
    """Blocks' sums are added exactly and rounded once: tensors in another order give the same bits."""
    from fractions import Fraction
    one = np.zeros(2048, np.float32)
    one[0] = 1e15  # a block sum of 1e30 (squares)
    small = np.full(8, 1e-15, np.float32)  # 8 squares of 1e-30
    a, b = kernels.Sums(), kernels.Sums()
    for s, order in ((a, (one, small, one)), (b, (small, one, one))):
        for x in order:
            s.add(x, x, 0)
    assert np.array_equal(a.state, b.state)
    big, tiny = float(np.float32(1e15) * np.float32(1e15)), float(np.float32(1e-15) * np.float32(1e-15))
    assert a.totals()[0] == float(2 * Fraction(big) + 8 * Fraction(tiny))


def test_a_call_must_follow_the_open_block():
    s = kernels.Sums()
    s.add(np.ones(24, np.float32), np.ones(24, np.float32), 0)
    with pytest.raises(ValueError, match="do not follow"):
        s.add(np.ones(8, np.float32), np.ones(8, np.float32), 16)
    with pytest.raises(ValueError, match="do not follow"):
        s.add(np.ones(8, np.float32), np.ones(8, np.float32), -8)
    s.add(np.ones(8, np.float32), np.ones(8, np.float32), 24)
    s.add(np.ones(8, np.float32), np.ones(8, np.float32), 0)  # the next tensor: the open block closes
    assert s.totals() == (40.0, 40.0, 40.0, 0.0)
    if kernels.COMPILED:
        with pytest.raises(ValueError, match="do not follow"):
            kernels.tall_mask(np.ones(8, np.float32), np.ones(8, np.float32), 0.4, np.empty(8, np.uint8), s, 16)
        with pytest.raises(ValueError, match="fidelity state"):
            kernels._kernels.tall_mask_f32(np.ones(8, np.float32), np.ones(8, np.float32), 0.4,
                                           np.empty(8, np.uint8), np.zeros(10, np.int64), 0)


def test_fidelity_survives_a_deep_copy():
    import copy
    f = Fidelity()
    f.add_exact(torch.ones(10))
    g = copy.deepcopy(f)
    g.add_exact(torch.ones(10))
    assert f.tau_sq == 10.0 and g.tau_sq == 20.0


# -- other builds of the compiled module: without AVX2, and for a CPU with FMA ------------------------

def _build(tmp: Path, name: str, flags: list[str]) -> object:
    """tallpack/_kernels.c compiled with setup.py's flags and ``flags``, loaded under its own name."""
    import importlib.util
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = Path(kernels.__file__).with_name("_kernels.c")
    out = tmp / name / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    out.parent.mkdir()
    cmd = [cc, "-O3", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC", *flags,
           f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out)]
    if subprocess.run(cmd, capture_output=True).returncode:
        pytest.skip(f"cannot build {' '.join(flags)}")
    spec = importlib.util.spec_from_file_location("_kernels", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_kernels
@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 builds")
def test_builds_for_other_cpus_give_the_same_sums(tmp_path):
    """The portable build (no AVX2 paths: SSE2's 4-wide vectors) and a build for a CPU with AVX2 and
    FMA (``-march=x86-64-v3``, where only -ffp-contract=off keeps products rounded) sum as the
    installed one, which takes the AVX2 paths where the CPU has them."""
    builds = [_build(tmp_path, "portable", ["-DTALLPACK_PORTABLE"])]
    with open("/proc/cpuinfo") as f:
        if " fma " in f.read() and " avx2 " in open("/proc/cpuinfo").read():
            builds.append(_build(tmp_path, "v3", ["-march=x86-64-v3"]))
    for seed, n, lam in ((0, 5000, 0.4), (1, 2048 * 3 + 5, 0.3), (2, 100_003, 0.2)):
        tau, merged = _drawn(n, seed, [])
        want = kernels.Sums()
        mask = np.empty(n, np.uint8)
        kernels.tall_mask(tau, merged, lam, mask, want, 0)
        for module in builds:
            got, m = kernels.Sums(), np.empty(n, np.uint8)
            module.tall_mask_f32(tau, merged, lam, m, got.state, 0)
            assert np.array_equal(m, mask) and np.array_equal(got.state, want.state)
            got = kernels.Sums()
            base = np.zeros(n, np.float32)
            module.tall_mask_tv(tau, base, 0, merged, lam, m, got.state, 0)
            assert np.array_equal(got.state, want.state)


# -- whole archives -----------------------------------------------------------------------------------

_PACKS = [(dtype, merge, group) for dtype in ("float32", "bfloat16", "float16") for merge in ("ta", "ties")
          for group in (True, False)]

#: One child per setting of the compiled loops (read once, at import); it packs every family on each
#: of its thread counts and chunk sizes (starting the process is most of a child's time).
_CHILD = r"""
import json, os, sys, tallpack
from tallpack import kernels
root, compiled = sys.argv[1], sys.argv[2] == "1"
assert kernels.COMPILED == compiled
for threads, chunk_elements in json.loads(sys.argv[3]):
    out = f"{root}/out-{chunk_elements}/{threads}-{int(compiled)}"
    os.makedirs(out)
    for dtype, merge, group in json.loads(sys.argv[4]):
        fam = f"{root}/{dtype}"
        tallpack.pack(f"{fam}/base.safetensors", {t: f"{fam}/{t}.safetensors" for t in ("a", "b", "c")},
                      f"{out}/{dtype}-{merge}-{int(group)}.tallpack",
                      merge=merge, group=group, threads=threads, chunk_elements=chunk_elements)
"""

_RUNS = [(1, True), (2, True), (2, False)]
_CHUNKS = (4096, 1000)


def _family(folder: Path, dtype: str) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(7)
    dt = getattr(torch, dtype)
    shapes = {"embed": (300, 70), "l0.w": (96, 81), "l0.b": (96,), "l1.w": (33, 81), "norm": (17,)}
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    folder.mkdir(parents=True)
    save_file({k: v.to(dt) for k, v in base.items()}, str(folder / "base.safetensors"))
    for t in ("a", "b", "c"):
        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.7)).to(dt)
                   for k, v in base.items()}, str(folder / f"{t}.safetensors"))


@pytest.fixture(scope="module")
def packed_by_children(tmp_path_factory) -> Path:
    """The families of ``_family`` packed (``_PACKS``) by child processes with and without the compiled
    loops, on each thread count of ``_RUNS`` and each chunk size of ``_CHUNKS``: ROOT/out-CHUNK/THREADS-COMPILED."""
    root = tmp_path_factory.mktemp("children")
    for dtype in ("float32", "bfloat16", "float16"):
        _family(root / dtype, dtype)
    env = {**os.environ}
    env.pop("TALLPACK_NO_KERNELS", None)
    for compiled in (True, False):
        e = env if compiled else {**env, "TALLPACK_NO_KERNELS": "1"}
        settings = [(threads, chunk) for chunk in _CHUNKS for threads, c in _RUNS if c == compiled]
        subprocess.run([sys.executable, "-c", _CHILD, str(root), "1" if compiled else "0", json.dumps(settings),
                        json.dumps(_PACKS)], env=e, check=True, timeout=600)
    return root


@needs_kernels
@pytest.mark.parametrize("chunk_elements", _CHUNKS)
def test_archives_are_the_same_file_with_or_without_the_compiled_loops_and_threads(packed_by_children, tmp_path,
                                                                                  chunk_elements):
    """float32, bfloat16 and float16 families, Task Arithmetic and TIES, grouped or not: packed with
    the compiled loops on 1 and 2 threads and without them, byte for byte the same archive; and a
    chunk size that cuts the fidelity blocks (1000) gives the same figures as one that does not."""
    root = packed_by_children
    runs = _RUNS
    for dtype, merge, group in _PACKS:
        name = f"{dtype}-{merge}-{int(group)}.tallpack"
        first = root / f"out-{chunk_elements}" / "1-1" / name
        for threads, compiled in runs[1:]:
            assert filecmp.cmp(first, root / f"out-{chunk_elements}" / f"{threads}-{int(compiled)}" / name,
                               shallow=False), (name, threads, compiled)
        with tallpack.open(first) as fam:
            figures = {t.name: t.fidelity for t in fam.manifest.tasks}
        if chunk_elements == 1000:
            other = tmp_path / "same-figures.tallpack"
            fam_dir = root / dtype
            tallpack.pack(f"{fam_dir}/base.safetensors", {t: f"{fam_dir}/{t}.safetensors" for t in ("a", "b", "c")},
                          other, merge=merge, group=group, threads=1, chunk_elements=4096, overwrite=True)
            with tallpack.open(other) as fam:
                assert {t.name: t.fidelity for t in fam.manifest.tasks} == figures, name


def _spec_sum(products: list[np.ndarray]) -> float:
    """Spec §6.4's order, read from its words: per tensor, blocks of 2,048 from its first element;
    eight float32 lanes (lane j: elements i with i mod 8 = j, in index order, from +0.0); the
    fixed tree of lanes; the block sums of all tensors added exactly (``math.fsum``)."""
    import math
    blocks = []
    for p in products:
        for a in range(0, p.size, 2048):
            lanes = [np.float32(0.0)] * 8
            for i, x in enumerate(p[a:a + 2048]):
                lanes[i % 8] = np.float32(lanes[i % 8] + x)
            a0, a1, a2, a3, a4, a5, a6, a7 = lanes
            blocks.append(float(np.float32(np.float32(np.float32(a0 + a4) + np.float32(a2 + a6))
                                           + np.float32(np.float32(a1 + a5) + np.float32(a3 + a7)))))
    return math.fsum(blocks)


@pytest.mark.parametrize("dtype, merge, group", [("float32", "ta", False), ("bfloat16", "ties", True),
                                                 ("float16", "ta", True)])
def test_the_figures_are_the_spec_s_sums(tmp_path, dtype, merge, group):
    """``rel_l2`` and ``cosine`` of every task, recomputed from the archive's own masks and merged
    vector and the inputs by the words of spec §6.4 (plain Python float32 lanes, not the packer's
    code), equal the manifest's to the bit: 16-bit families, TIES, groups (a group's flat tensor,
    its gaps zeros) and a tensor every task shares (rec = tau_t)."""
    import math
    from safetensors.torch import load_file, save_file
    _family(tmp_path / "fam", dtype)
    fam_dir = tmp_path / "fam"
    base = load_file(str(fam_dir / "base.safetensors"))
    shared = (base["l1.w"].float() + 0.02).to(base["l1.w"].dtype)  # the same fine-tune in every task
    origs = {}
    for t in ("a", "b", "c"):
        origs[t] = load_file(str(fam_dir / f"{t}.safetensors"))
        origs[t]["l1.w"] = shared.clone()
        save_file(origs[t], str(fam_dir / f"{t}.safetensors"))
    out = tmp_path / "f.tallpack"
    tallpack.pack(f"{fam_dir}/base.safetensors", {t: f"{fam_dir}/{t}.safetensors" for t in origs},
                  out, merge=merge, group=group, chunk_elements=4096)
    with tallpack.open(out) as fam:
        kinds = {e.kind for e in fam.manifest.tensors}
        assert {"shared", "merged"} <= kinds and (not group or any(e.members for e in fam.manifest.tensors))
        for info in fam.manifest.tasks:
            sq: dict[str, list[np.ndarray]] = {"tau": [], "rec": [], "dot": [], "err": []}
            for e in fam.manifest.tensors:
                members = e.members or ()
                names = [m.name for m in members] or [e.name]
                if e.kind == "shared":  # rec = tau_t: err 0
                    for nm in names:
                        tau = (origs[info.name][nm].float() - base[nm].float()).reshape(-1).numpy()
                        sq["tau"].append(tau * tau), sq["rec"].append(tau * tau), sq["dot"].append(tau * tau)
                        sq["err"].append(np.zeros_like(tau))
                    continue
                if e.kind != "merged":
                    continue
                tt = e.tasks[info.name]
                n = tt.shape[0] if members else math.prod(tt.shape)
                tau = np.zeros(n, np.float32)
                for m in members or [None]:
                    nm, at = (e.name, 0) if m is None else (m.name, m.offset)
                    x = (origs[info.name][nm].float() - base[nm].float()).reshape(-1).numpy()
                    tau[at:at + x.size] = x
                m_t = fam.read_array(tt.arrays["mask"], e.name).reshape(-1).numpy()  # §6.1.1's mask and τ_MTL
                rec = m_t.astype(np.float32) * fam.read_array(e.arrays["merged"], e.name).reshape(-1).numpy()
                err = (rec - tau).astype(np.float32)
                sq["tau"].append(tau * tau), sq["rec"].append(rec * rec), sq["dot"].append(rec * tau)
                sq["err"].append(err * err)
            t, r, d, e2 = (_spec_sum(sq[k]) for k in ("tau", "rec", "dot", "err"))
            assert info.fidelity["rel_l2"] == math.sqrt(e2 / t), info.name
            assert info.fidelity["cosine"] == d / math.sqrt(t * r), info.name


def test_a_large_tensor_s_sums_hold_a_bounded_scratch():
    """``Sums.add`` of a tensor of millions of elements (a shared embedding's ``add_exact``) works in
    pieces: what its thread keeps afterwards is a few MB, not 16 bytes an element; and the pieces'
    sums are those of one pass (the order is cut-independent)."""
    import threading
    import tracemalloc
    n = 3_000_000 + 17
    g = np.random.default_rng(3)
    tau = g.standard_normal(n).astype(np.float32)
    rec = (tau * (g.random(n) < 0.5)).astype(np.float32)
    whole, cut = kernels.Sums(), kernels.Sums()

    def run() -> None:
        tracemalloc.start()
        whole.add(tau, rec, 0)
        held.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
    held: list[int] = []
    t = threading.Thread(target=run)  # a fresh thread: its scratch starts empty
    t.start()
    t.join()
    assert held[0] < 8 << 20, held  # n * 16 bytes would be 48 MB
    for a, b in zip([0, 5, 2048 * 70 + 3, n // 2], [5, 2048 * 70 + 3, n // 2, n]):
        cut.add(tau[a:b], rec[a:b], a)
    assert whole.totals() == cut.totals()


_finite = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 3e-39, -1.2e-38, 1e-38, 1e15, -1e15, 1.0, -1.0, 0.5])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3 * 2048 + 300), st.integers(0, 2**31),
       st.lists(st.tuples(st.integers(0, 3 * 2048 + 299), _finite, _finite), max_size=20),
       st.lists(st.integers(0, 3 * 2048 + 300), max_size=4))
def test_the_numpy_twin_sums_as_the_spec_reads_in_any_cut(n, seed, specials, points):
    """``Sums.add`` alone (no compiled loops needed): a tensor of a few blocks cut into calls anywhere
    (an open block taken up at any element, whole blocks, a last part) gives the sums of spec §6.4
    read from its words; zeros of both signs and subnormals placed."""
    tau, merged = _drawn(n, seed, [(i, t, m) for i, t, m in specials])
    rec = (merged * (np.random.default_rng(seed).random(n) < 0.5)).astype(np.float32)
    s = kernels.Sums()
    cuts = _cuts(n, points)
    for a, b in zip(cuts, cuts[1:]):
        s.add(tau[a:b], rec[a:b], a)
    err = (rec - tau).astype(np.float32)
    assert s.totals() == tuple(_spec_sum([x * y]) for x, y in ((tau, tau), (rec, rec), (rec, tau), (err, err)))
