"""The dial's ``qtau`` candidate (format 1.7): a task's own quantized task vector instead of its
mask, the merged vector dropped where no task needs it; readers, consumers of masks and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_fidelity import TALL_CORRECTIONS, checkpoint_bytes, family, weight_fidelity
from test_fuzz import edit, json_values, manifest_of, paths, read_mutated

import tallpack
from conftest import read_everything, written
from tallpack.encodings.qtau import BITS, dequantize, quantize, quantize_widths
from tallpack.tall import tall_mask


def spec_deq(codes: np.ndarray, scales: np.ndarray, bits: int, block: int, n: int) -> np.ndarray:
    """deQ as spec §6.1.8 words it, one element at a time: up to 4 bits, bit j of the stream is bit
    (j mod 8) of byte j div 8 and u_i is bits [i*bits, (i+1)*bits), least significant first; from
    5 bits, u_i is byte i."""
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        if bits > 4:
            u = int(codes[i])
        else:
            u = sum(((int(codes[(i * bits + j) // 8]) >> ((i * bits + j) % 8)) & 1) << j for j in range(bits))
        out[i] = np.float32(u - (1 << (bits - 1))) * np.float32(scales[i // block])
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), bits=st.sampled_from(BITS), half=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 1e4, 1e30]), block=st.sampled_from([1, 7, 64]))
def test_quantize_round_trip_matches_the_spec(n, bits, half, seed, scale, block):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=g) * scale
    tau[torch.rand(n, generator=g) < 0.1] = 0.0
    codes, scales = quantize(tau, bits, block, half=half)
    assert codes.dtype == np.uint8 and codes.shape == ((-(-n * bits // 8),) if bits <= 4 else (n,))
    assert scales.dtype in (np.float16, np.float32) and scales.shape == (-(-n // block),)
    if not half:
        assert scales.dtype == np.float32
    deq = dequantize(codes, scales, bits, block, n)
    assert deq.dtype == torch.float32 and deq.shape == (n,)
    want = spec_deq(codes, scales, bits, block, n)
    assert np.array_equal(deq.numpy().view(np.uint32), want.view(np.uint32))  # bit for bit
    # within half a step of the stored scale: no code clamps (float16 scales are rounded up)
    s = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(block)[:n]
    assert bool(((deq - tau).abs() <= s * 0.5000001 + 1e-45).all())
    assert bool((deq[tau == 0] == 0).all())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), widths=st.lists(st.sampled_from(BITS), min_size=1, max_size=4),
       half=st.booleans(), seed=st.integers(0, 2**31 - 1), block=st.sampled_from([1, 7, 64]))
def test_quantizing_at_several_widths_gives_each_and_its_deq_bit_for_bit(n, widths, half, seed, block):
    """The dial quantizes each task vector at six widths with the blocks' maxima found once, and
    takes each deQ without unpacking the codes: the arrays are ``quantize``'s and the deQ is
    ``dequantize``'s, bit for bit (0.0, not -0.0, where a small negative rounds to code 0)."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=g) * 1e-3
    tau[torch.rand(n, generator=g) < 0.3] *= 1e-4  # rounds to 0 from either side
    tau[torch.rand(n, generator=g) < 0.1] = 0.0
    got = list(quantize_widths(tau, widths, block, half=half))
    assert len(got) == len(widths)
    for bits, (codes, scales, deq) in zip(widths, got):
        want_codes, want_scales = quantize(tau, bits, block, half=half)
        assert np.array_equal(codes, want_codes) and np.array_equal(scales, want_scales)
        assert scales.dtype == want_scales.dtype
        want = dequantize(codes, scales, bits, block, n)
        assert deq is not None and deq.shape == (n,)
        assert np.array_equal(deq.numpy().view(np.uint32), want.numpy().view(np.uint32))


def test_bit_streams_are_packed_in_pieces(monkeypatch):
    """The (un)packers work a piece of codes at a time; the stream is the same as in one go."""
    import tallpack.encodings.qtau as qtau

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4):
        for n in (0, 1, 15, 16, 17, 100):
            u = rng.integers(0, 1 << bits, n).astype(np.uint8)
            whole = qtau.pack_codes(u, bits)
            monkeypatch.setattr(qtau, "_PIECE", 16)
            pieces = qtau.pack_codes(u, bits)
            assert np.array_equal(whole, pieces) and np.array_equal(qtau.unpack_codes(pieces, bits, n), u)
            monkeypatch.undo()


def _a_qtau_tensor(fam):
    """The first tensor of an open archive that has a ``qtau`` entry."""
    return next(e for e in fam.manifest.tensors if any(tt.encoding == "qtau" for tt in e.tasks.values()))


def _need_qtau(tasks: int = 4):
    """Overlapping dense updates: TALL loses much, every task's own vector is worth storing."""
    return family("dense", tasks=tasks)


def test_target_met_and_smaller_than_corrections(tmp_path):
    base, fts = _need_qtau()
    for target in (0.9, 0.97):
        a, b = tmp_path / f"q{target}.tallpack", tmp_path / f"c{target}.tallpack"
        m = tallpack.pack(base, fts, a, fidelity=target)
        tallpack.pack(base, fts, b, fidelity=target, corrections=TALL_CORRECTIONS)
        assert m.format_version == written(7) and m.stats["dial"]["met"]
        assert a.stat().st_size < 0.8 * b.stat().st_size
        with tallpack.open(a) as fam:
            assert fam.format_version == written(7)
            for t in fts:
                got = weight_fidelity(fam, t, fts[t])
                assert got >= target and got == pytest.approx(fam.task_info(t).fidelity["weight"], abs=1e-9)
                assert any(k.startswith("qtau") for k in fam.summary()["tasks"][fam.tasks.index(t)]["stored"])
                assert all(torch.equal(fam.get_tensor(t, k, device="cpu"), v) for k, v in fam.state_dict(t).items())
            dropped = [e for e in fam.manifest.tensors if e.kind == "merged" and "merged" not in e.arrays]
            assert len(dropped) == m.stats["dial"]["merged_dropped"] > 0
            assert all(tt.encoding == "qtau" and "mask" not in tt.arrays for e in dropped for tt in e.tasks.values())
            assert fam.summary()["stored_bytes"]["qtau"] > 0
            assert fam.verify() == []


def test_a_task_equal_to_the_base_lets_the_merged_vectors_go(tmp_path):
    """A task equal to the base has a zero task vector: TALL rebuilds it exactly, and its qtau (all
    zeros) is exact too and nearly free, so the merged vectors the other tasks let go still go
    (before: it had no qtau candidate, kept every merged vector, and the archive was 58% larger)."""
    base, fts = _need_qtau()
    same = {k: v.clone() for k, v in base.items()}
    a, b = tmp_path / "a.tallpack", tmp_path / "b.tallpack"
    without = tallpack.pack(base, fts, a, fidelity=0.97).stats["dial"]
    m = tallpack.pack(base, fts | {"same": same}, b, fidelity=0.97)
    assert m.stats["dial"]["met"] and m.stats["dial"]["merged_dropped"] == without["merged_dropped"] > 0
    assert b.stat().st_size <= 1.04 * a.stat().st_size
    with tallpack.open(b) as fam:
        for t in fts:
            assert weight_fidelity(fam, t, fts[t]) >= 0.97
        assert all(torch.equal(fam.get_tensor("same", k), v) for k, v in same.items())
        assert fam.task_info("same").fidelity["weight"] == 1.0
        assert fam.verify() == []


def test_a_task_equal_to_a_base_with_negative_zeros_is_bit_exact_at_fidelity_1(tmp_path):
    """A base's -0.0 comes back as 0.0 from TALL and from a qtau of the task equal to it (0.0 added),
    with no squared error: at fidelity 1 that task takes the exact correction, not either of them."""
    base, fts = _need_qtau(tasks=2)
    base["a.weight"][0, :8] = -0.0
    same = {k: v.clone() for k, v in base.items()}
    path = tmp_path / "z.tallpack"
    m = tallpack.pack(base, fts | {"same": same}, path, fidelity=1.0)
    assert m.stats["dial"]["met"] and m.stats["dial"]["tasks"]["same"]["stored"].get("exact") == 1
    with tallpack.open(path) as fam:
        got = fam.get_tensor("same", "a.weight")
        assert torch.equal(got.view(torch.int32), same["a.weight"].view(torch.int32))
        assert all(fam.task_info(t).fidelity["weight"] == 1.0 for t in fam.tasks)
        assert fam.verify() == []


def test_no_qtau_with_ties_keeps_merged(tmp_path):
    base, fts = _need_qtau()
    m = tallpack.pack(base, fts, tmp_path / "t.tallpack", fidelity=0.95, merge="ties")
    assert m.stats["dial"]["met"] and m.stats["dial"]["merged_dropped"] == 0
    with tallpack.open(tmp_path / "t.tallpack") as fam:
        assert all("merged" in e.arrays and "counts" in e.arrays for e in fam.manifest.tensors if e.kind == "merged")
        assert any(tt.encoding == "qtau" for e in fam.manifest.tensors for tt in e.tasks.values())
        for t in fts:
            assert weight_fidelity(fam, t, fts[t]) >= 0.95
        from tallpack.merged import MergeParts

        for model in ("ties", "consensus-ties"):
            sd = MergeParts(fam, model).state_dict(task="t0")
            assert set(sd) == set(fts["t0"]) and all(bool(torch.isfinite(v).all()) for v in sd.values())


def test_derived_masks_and_merges(tmp_path):
    """Consumers of masks read, for a qtau task, |deQ| > lambda |tau_MTL' - deQ| with tau_MTL' the
    sum of the deQ where the merged vector is gone (spec §6.1.8), computed here by hand."""
    base, fts = _need_qtau()
    path = tmp_path / "q.tallpack"
    tallpack.pack(base, fts, path, fidelity=0.9)
    from tallpack.merged import MergeParts
    from tallpack.stats import compute

    with tallpack.open(path) as fam:
        e = next(e for e in fam.manifest.tensors if e.kind == "merged" and "merged" not in e.arrays)
        deq = {}
        for t, tt in e.tasks.items():
            codes = fam.read_array(tt.arrays["codes"], "codes").numpy()
            scales = fam.read_array(tt.arrays["scales"], "scales").numpy()
            deq[t] = torch.from_numpy(spec_deq(codes, scales, tt.params["bits"], tt.params["block"],
                                               int(np.prod(tt.shape))))
        total = torch.zeros_like(deq["t0"])
        for t in fam.tasks:
            total = total + deq[t]
        masks = {t: tall_mask(deq[t], total, fam.task_info(t).lam) for t in fam.tasks}
        assert all(int(masks[t].sum()) == e.tasks[t].params["ones"] for t in fam.tasks)
        ta = MergeParts(fam, "ta").parts[e.name]
        assert torch.equal(ta[1].reshape(-1), total)
        cons = MergeParts(fam, "consensus-ta", 2).parts[e.name]
        count = sum(m.to(torch.int32) for m in masks.values())
        assert torch.equal(cons[1].reshape(-1), (count >= 2).to(torch.float32) * total)
        s = compute(fam)
        merged = [x for x in fam.manifest.tensors if x.kind == "merged"]
        assert s.weights == sum(int(np.prod(x.arrays["base"].shape)) for x in merged)


def test_cli_end_to_end(tmp_path):
    from tallpack_cli.main import main

    base, fts = _need_qtau(3)
    save_file(base, str(tmp_path / "base.safetensors"))
    arc = str(tmp_path / "f.tallpack")
    args = ["pack", "--base", str(tmp_path / "base.safetensors"), "-o", arc, "--fidelity", "0.95"]
    for t, ft in fts.items():
        save_file(ft, str(tmp_path / f"{t}.safetensors"))
        args += ["--task", f"{t}={tmp_path / f'{t}.safetensors'}"]
    run = lambda *a: CliRunner().invoke(main, list(a))  # noqa: E731
    r = run(*args)
    assert r.exit_code == 0, r.output
    r = run("inspect", arc)
    assert r.exit_code == 0 and "qtau" in r.output, r.output
    j = json.loads(run("inspect", "--json", arc).output)
    assert j["format_version"] == "%d.%d" % written(7) and all(t["fidelity"]["weight"] >= 0.95 for t in j["tasks"])
    assert run("verify", arc).exit_code == 0
    r = run("unpack", arc, "--task", "t1", "-o", str(tmp_path / "t1"))
    assert r.exit_code == 0, r.output
    with tallpack.open(arc) as fam:
        want = fam.state_dict("t1")
    got = load_file(str(next((tmp_path / "t1").glob("*.safetensors"))))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for method in ("consensus-ta", "ta"):
        r = run("merge", arc, "--method", method, "--task", "t0", "-o", str(tmp_path / method))
        assert r.exit_code == 0, r.output
    r = run("stats", "--json", arc)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["weights"] > 0


def test_corrupted_codes_raise_integrity_error(tmp_path):
    base, fts = _need_qtau(3)
    path = tmp_path / "q.tallpack"
    tallpack.pack(base, fts, path, fidelity=0.9)
    with tallpack.open(path) as fam:
        e = _a_qtau_tensor(fam)
        t, tt = next((t, tt) for t, tt in e.tasks.items() if tt.encoding == "qtau")
        for key in ("codes", "scales"):
            chunk = tt.arrays[key].chunks[0]
            bad_path = tmp_path / f"bad-{key}.tallpack"
            data = bytearray(path.read_bytes())
            data[chunk.offset + chunk.nbytes // 2] ^= 0x10
            bad_path.write_bytes(bytes(data))
            with tallpack.open(bad_path) as bad:
                with pytest.raises(tallpack.IntegrityError):
                    bad.get_tensor(t, e.name)
                assert bad.verify() != []


def test_malformed_qtau_entries_are_refused(tmp_path):
    base, fts = _need_qtau(2)
    path = tmp_path / "q.tallpack"
    tallpack.pack(base, fts, path, fidelity=0.9)
    from tallpack.encodings import TensorEntry

    with tallpack.open(path) as fam:
        e = _a_qtau_tensor(fam)
        d = e.to_dict()
    t = next(t for t, v in d["tasks"].items() if v["encoding"] == "qtau")
    for key, value in (("bits", 9), ("bits", 1), ("bits", True), ("block", 0), ("ones", -1), ("ones", 10**9)):
        bad = json.loads(json.dumps(d))
        bad["tasks"][t][key] = value
        with pytest.raises(tallpack.FormatError, match=repr(e.name)):
            TensorEntry.from_dict(bad, set(d["tasks"]))
    bad = json.loads(json.dumps(d))
    bad["tasks"][t]["codes"]["shape"] = [bad["tasks"][t]["codes"]["shape"][0] + 1]
    with pytest.raises(tallpack.FormatError):
        TensorEntry.from_dict(bad, set(d["tasks"]))


def test_version_is_the_lowest_covering_what_was_stored(tmp_path):
    """The writer bumps to 1.7 only when a qtau entry is written (the header is rewritten)."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(64, 64, generator=g)}
    owner = torch.randint(0, 3, (64, 64), generator=g)  # the paper's regime: small disjoint updates
    disjoint = {f"t{i}": {"w": base["w"] + (owner == i) * torch.randn(64, 64, generator=g) * 1e-3} for i in range(3)}
    for kind, (b, fts) in (("disjoint", (base, disjoint)), ("dense", family("dense"))):
        path = tmp_path / f"{kind}.tallpack"
        m = tallpack.pack(b, fts, path, fidelity=0.9, codec="zstd")  # zstd: the version is the features' alone
        with tallpack.open(path) as fam:
            used = any(tt.encoding == "qtau" for e in fam.manifest.tensors for tt in e.tasks.values())
            assert fam.format_version == m.format_version == ((1, 7) if used else (1, 5))
        assert path.read_bytes()[8:12] == bytes([1, 0, 7 if used else 5, 0])
        assert used == (kind == "dense")


def test_an_earlier_reader_fails_only_on_qtau_tensors(tmp_path, monkeypatch):
    from tallpack.encodings import REGISTRY

    base, fts = _need_qtau(3)
    path = tmp_path / "q.tallpack"
    tallpack.pack(base, fts, path, fidelity=0.9)
    monkeypatch.delitem(REGISTRY, "qtau")  # a reader of 1.5
    with tallpack.open(path) as fam:
        for e in fam.manifest.tensors:
            for t, tt in e.tasks.items():
                if tt.encoding == "qtau":
                    with pytest.raises(tallpack.TallpackError, match=repr(e.name)):
                        fam.get_tensor(t, e.name)
                else:
                    assert torch.equal(fam.get_tensor(t, e.name), fam.get_tensor(t, e.name))


@pytest.fixture(scope="module")
def qtau_bytes(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(20, 9, generator=g), "v": torch.randn(40, generator=g).bfloat16()}
    tasks = {t: {k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
             for t in "abc"}
    out = tmp_path_factory.mktemp("fuzz") / "q.tallpack"
    tallpack.pack(base, tasks, out, chunk_elements=64, fidelity=0.9)
    with tallpack.open(out) as fam:
        assert any(tt.encoding == "qtau" for e in fam.manifest.tensors for tt in e.tasks.values())
    return out.read_bytes()


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_qtau_manifests_raise_only_tallpack_errors(qtau_bytes, tmp_path, data):
    """As tests/test_fuzz.py, on an archive with qtau entries and no merged vectors."""
    manifest = manifest_of(qtau_bytes)
    edit(data, manifest["tensors"], [p for p in paths(manifest["tensors"]) if p], json_values | st.integers(0, 9))
    read_mutated(tmp_path, qtau_bytes, manifest, "ta")


def test_the_fuzz_archive_reads(qtau_bytes, tmp_path):
    (tmp_path / "q.tallpack").write_bytes(qtau_bytes)
    read_everything(tmp_path / "q.tallpack", "ta")


def test_score_ratio_bounds_what_validation_data_can_show():
    from tallpack.dial import score_ratio

    assert score_ratio(0.9, 1.0) == 0.9 and score_ratio(1.2, 1.0) == 1.0  # capped at 1
    orig = np.ones(250)
    orig[:6] = 0
    same = score_ratio(orig, orig)
    assert 0.985 < same < 0.99  # 250 examples cannot certify 0.99, even for the original
    rec = orig.copy()
    rec[10:13] = 0  # three lost
    rec[:2] = 1  # two gained
    assert score_ratio(rec, orig) < 0.98 < rec.mean() / orig.mean()  # the plain ratio would pass 0.98
    big = np.ones(25000)
    assert score_ratio(big, big) > 0.9998  # more data, a tighter bound
    graded = np.linspace(0, 1, 100)
    assert score_ratio(graded * 0.99, graded) < 0.99 * 1.0  # non-0/1 scores: the paired sd bound
    with pytest.raises(tallpack.TallpackError):
        score_ratio(np.ones(3), np.ones(4))


def test_evaluator_with_per_example_scores(tmp_path, caplog):
    """With per-example scores the dial meets, per task, the target or the bound the original
    itself reaches, whichever is lower, as recomputed here from the archive."""
    from tallpack.dial import score_ratio

    base, fts = _need_qtau(3)
    x = torch.randn(400, 48, generator=torch.Generator().manual_seed(9))

    def examples(task, sd):  # correctness against the fine-tune's own predictions
        want = (x @ fts[task]["a.weight"].float().T).argmax(1)
        return ((x @ sd["a.weight"].float().T).argmax(1) == want).double().numpy()

    with caplog.at_level("WARNING", logger="tallpack.dial"):
        m = tallpack.pack(base, fts, tmp_path / "e.tallpack", fidelity=0.995, evaluate=examples, lambda_grid=[0.4])
    assert caplog.text.count("lowered for 3 task(s)") == 1
    with tallpack.open(tmp_path / "e.tallpack") as fam:
        for t in fts:
            f = fam.task_info(t).fidelity
            got = score_ratio(examples(t, fam.state_dict(t)), examples(t, fts[t]), m.stats["dial"]["score_z"])
            assert got == pytest.approx(f["score"]) and got >= min(0.995, f["score_ceiling"]) - 1e-12
            assert f["score_ceiling"] < 0.995  # 400 examples certify less than 0.995
    # the bound is for the configuration chosen among all those scored: stricter than one's
    assert m.stats["dial"]["score_z"] > 1.645 + 0.5
    assert m.stats["dial"]["met"]


def test_budget_below_plain_tall_when_qtau_reaches_it(tmp_path):
    base, fts = _need_qtau()
    one = checkpoint_bytes(fts)
    tallpack.pack(base, fts, tmp_path / "plain.tallpack")
    plain = (tmp_path / "plain.tallpack").stat().st_size
    out = tmp_path / "b.tallpack"
    m = tallpack.pack(base, fts, out, budget=0.9 * plain / one)
    assert out.stat().st_size <= 0.9 * plain
    assert min(i.fidelity["weight"] for i in m.tasks) > min(i.fidelity["weight_tall"] for i in m.tasks)


def test_float16_scales_past_the_range_fall_back_without_a_numpy_warning() -> None:
    """A scale just past float16's range printed numpy's "overflow encountered in nextafter" (two
    source lines, even under -q); it falls back to float32 scales quietly."""
    import warnings

    import numpy as np

    from tallpack.encodings.qtau import _half_up

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _half_up(np.array([65519.0], np.float32)) is None
