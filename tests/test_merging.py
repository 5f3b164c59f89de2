"""Merge methods against direct implementations of the official code's formulas."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tallpack
from tallpack.dtypes import narrow
from tallpack.merging import Ties, consensus_mask
from test_cli import run


def family(seed=0, tasks=4, shapes=((40, 30), (30,), (7, 5, 3))):
    g = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    fts = {}
    for t in range(tasks):
        sd = {}
        for k, v in base.items():
            sparse = (torch.rand(v.shape, generator=g) < 0.5).float()
            sd[k] = v + sparse * 0.1 * torch.randn(v.shape, generator=g)
        sd["head"] = torch.randn(t + 2, 4, generator=g)
        fts[f"t{t}"] = sd
    return base, fts


def flat_taus(base, fts):
    """(T, d): the official code's flattened task vectors over the shared parameters."""
    return torch.stack([torch.cat([(sd[k] - base[k]).reshape(-1) for k in base]) for sd in fts.values()])


def official_ties(tv: torch.Tensor, k_frac: float, merge_func: str) -> torch.Tensor:
    """ties_merging of github nik-dim/tall_masks, written out: topk_values_mask, resolve_sign
    (majority for zeros), disjoint_merge."""
    n, d = tv.shape
    k = d - int(d * k_frac)
    kth = tv.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge_func == "sum":
        return sel.sum(dim=0)
    return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)


def unflatten(vec, base):
    out, pos = {}, 0
    for k, v in base.items():
        out[k] = vec[pos:pos + v.numel()].reshape(v.shape)
        pos += v.numel()
    return out


@given(st.integers(0, 10**6), st.sampled_from([8, 64, 1024]), st.sampled_from([0.05, 0.2, 0.5, 1.0]))
@settings(max_examples=30, deadline=None)
def test_streaming_ties_threshold_is_the_exact_global_kth_value(seed, chunk, top_k):
    base, fts = family(seed, tasks=3)
    # a few exact repeats, so that ties at the threshold are exercised
    for sd in fts.values():
        sd["w0"][:5] = base["w0"][:5] + 0.05
    tv = flat_taus(base, fts)
    blocks = lambda: (  # noqa: E731
        [t[a:a + chunk] for t in tv] for a in range(0, tv.shape[1], chunk))
    m = Ties(top_k)
    m.prepare(blocks, 3)
    d = tv.shape[1]
    k = d - int(d * top_k)
    exact = [float(tv[i].abs().kthvalue(k).values) if k > 0 else 0.0 for i in range(3)]
    assert m.thresholds == exact


def ties_reference(taus, thresholds, majority):
    """TIES per element as the paper writes it, in float32 with numpy, tasks in order: trim each
    task to ``|tau| >= thr``, elect the sign of the trimmed sum (``majority`` where it is 0),
    keep the entries of that sign, sum them; counts = how many were kept."""
    x = [t.numpy() for t in taus]
    zero = np.float32(0)
    trimmed = [np.where(np.abs(v) >= np.float32(thr), v, zero) for v, thr in zip(x, thresholds)]
    total = np.zeros(x[0].shape, np.float32)
    for r in trimmed:
        total = total + r
    sign = np.sign(total)
    sign[sign == 0] = majority
    kept = [np.where(sign > 0, r > 0, r < 0) for r in trimmed]
    merged = np.zeros(x[0].shape, np.float32)
    for r, k in zip(trimmed, kept):
        merged = merged + np.where(k, r, zero)
    return merged, sum(k.astype(np.uint8) for k in kept), int(np.sign(total).sum())


@st.composite
def ties_blocks(draw):
    """Task vectors with ties at the thresholds, zeros, -0.0, exact cancellations and tiny and
    large magnitudes, and thresholds taken from them (or 0, negative, a Python float no float32 is)."""
    tasks, n = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    finite = st.floats(-2.0**100, 2.0**100, width=32)
    pool = draw(st.lists(finite, min_size=1, max_size=6)) + [0.0, -0.0, 1e-45]
    value = st.one_of(finite, st.sampled_from(pool), st.sampled_from(pool).map(lambda v: -v))
    taus = [torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.float32) for _ in range(tasks)]
    if tasks > 1 and draw(st.booleans()):
        taus[1][: n // 2] = -taus[0][: n // 2]
    thr = st.one_of(st.sampled_from([abs(v) for v in pool]), st.sampled_from([0.0, -1.0, 3e38]),
                    st.sampled_from(pool).map(lambda v: abs(v) * (1 + 1e-12)))
    return taus, [draw(thr) for _ in range(tasks)], draw(st.sampled_from([-1, 0, 1]))


@given(ties_blocks())
@settings(max_examples=300, deadline=None)
@example(([torch.tensor([1.0, -0.0, 2.0]), torch.tensor([-1.0, 0.0, -2.0])], [1.0, 0.0], -1))
def test_ties_fast_path_is_the_papers_formula(block):
    """combine, extras and combine_with_extras (one pass for both, written in place) give the
    bits of the paper's formula computed plainly; prepare's elected-sign total as well."""
    taus, thresholds, majority = block
    merged, counts, elected = ties_reference(taus, thresholds, majority)
    m = Ties()
    m.thresholds, m.majority_sign = thresholds, majority
    both, extras = m.combine_with_extras(taus)
    into = torch.full(taus[0].shape, 7.0)
    for got in (both, m.combine(taus), m.combine(taus, out=into), into):
        assert np.array_equal(got.numpy().view(np.int32), merged.view(np.int32))
    for got in (extras, m.extras(taus)):
        assert np.array_equal(got["counts"].numpy(), counts)
    for top_k in (0.2, 1.0):
        prepared = Ties(top_k)
        prepared.prepare(lambda: iter([taus]), len(taus))
        assert prepared.majority_sign == np.sign(ties_reference(taus, prepared.thresholds, 0)[2])


def test_ties_merges_a_block_in_a_few_buffers():
    """A block's tau_MTL and counts are computed once, into a few buffers: the selection was
    computed twice (combine, then extras), each making three bool and two float temporaries a task,
    25-35x the TA pack's time (fresh pages for every temporary cost as much as the arithmetic)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 16
    taus = [torch.randn(n, generator=g) for _ in range(4)]
    m = Ties()
    m.thresholds, m.majority_sign = [1.0, 0.5, 1.5, 1.0], 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        merged, extras = m.combine_with_extras(taus)
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)
    assert allocated <= 6 * 4 * n, allocated / (4 * n)  # in float32 blocks: 4.5 (42 before)
    reference = ties_reference(taus, m.thresholds, 1)
    assert np.array_equal(merged.numpy(), reference[0]) and np.array_equal(extras["counts"].numpy(), reference[1])


def test_ties_archive_matches_the_official_code(tmp_path):
    base, fts = family()
    out = tmp_path / "ties.tallpack"
    tallpack.pack(base, fts, out, merge={"method": "ties", "top_k": 0.2}, lambdas=0.4, chunk_elements=64)
    tv = flat_taus(base, fts)
    dis_sum = unflatten(official_ties(tv, 0.2, "sum"), base)
    dis_mean = unflatten(official_ties(tv, 0.2, "mean"), base)
    with tallpack.open(out) as fam:
        assert fam.manifest.merge["method"] == "ties"
        for t, sd in fts.items():
            rec = fam.state_dict(t)
            for k in base:
                tau = sd[k] - base[k]  # masks are built against the untrimmed task vector
                m = tau.abs() > torch.tensor(0.4) * (dis_sum[k] - tau).abs()
                # tallpack's task-vector form (spec §6.2), bit-exact here; the official weight form can
                # differ at boundary elements (tests/test_paper_r26.py)
                assert torch.equal(rec[k], base[k] + m.float() * dis_sum[k]), (t, k)
        ties = fam.merged("ties", alpha=0.7)
        for k in base:
            assert torch.equal(ties[k], base[k] + torch.tensor(0.7) * dis_mean[k])


def test_ta_and_consensus_against_the_formulas(tmp_path):
    base, fts = family()
    lambdas = {"t0": 0.2, "t1": 0.3, "t2": 0.5, "t3": 0.6}
    out = tmp_path / "ta.tallpack"
    tallpack.pack(base, fts, out, lambdas=lambdas)
    with tallpack.open(out) as fam:
        for k in base:
            taus = [sd[k] - base[k] for sd in fts.values()]
            mtl = torch.zeros_like(base[k])
            for tau in taus:
                mtl = mtl + tau
            masks = [tau.abs() > torch.tensor(lambdas[t]) * (mtl - tau).abs() for t, tau in zip(fts, taus)]
            cons = (torch.stack(masks).sum(0) >= 2).float()
            a = torch.tensor(0.4)
            assert torch.equal(fam.merged("ta", alpha=0.4)[k], base[k] + a * mtl)
            assert torch.equal(fam.merged("consensus-ta", k=2, alpha=0.4)[k], base[k] + a * (cons * mtl))
            assert torch.equal(fam.merged("consensus-ta", k=0, alpha=0.4)[k], fam.merged("ta", alpha=0.4)[k])
            assert torch.equal(fam.merged("consensus-ta", k=5, alpha=0.4)[k], base[k])
        with_head = fam.merged("consensus-ta", task="t1")
        assert list(with_head) == list(fts["t1"]) and torch.equal(with_head["head"], fts["t1"]["head"])
        with pytest.raises(tallpack.TallpackError, match="packed with --merge ties"):
            fam.merged("consensus-ties")


def test_consensus_ties_k0_is_ties_sum_and_k_above_t_is_base(tmp_path):
    base, fts = family(3)
    out = tmp_path / "ties.tallpack"
    tallpack.pack(base, fts, out, merge="ties")
    dis_sum = unflatten(official_ties(flat_taus(base, fts), 0.2, "sum"), base)
    with tallpack.open(out) as fam:
        k0 = fam.merged("consensus-ties", k=0, alpha=0.5)
        k9 = fam.merged("consensus-ties", k=9, alpha=0.5)
        for k in base:
            assert torch.equal(k0[k], base[k] + torch.tensor(0.5) * dis_sum[k])
            assert torch.equal(k9[k], base[k])


def test_consensus_mask_counts_tasks():
    masks = [torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 0, 0]).bool()]
    assert consensus_mask(masks, 2).tolist() == [True, False, False, False]
    assert consensus_mask(masks, 1).tolist() == [True, True, True, False]
    assert consensus_mask(masks, 0).all()


def test_lambda_selection_finds_the_answer_known_by_construction(tmp_path):
    base, fts = family(5, tasks=3)
    hidden = {"t0": 0.3, "t1": 0.5, "t2": 0.2}
    target = tmp_path / "target.tallpack"
    tallpack.pack(base, fts, target, lambdas=hidden)
    with tallpack.open(target) as fam:
        wanted = {t: fam.state_dict(t) for t in fam.tasks}

    def evaluate(task, sd):  # scores 0 exactly at the hidden lambda's reconstruction
        return -sum(float((sd[k].float() - wanted[task][k].float()).abs().sum()) for k in sd)

    m = tallpack.pack(base, fts, tmp_path / "sel.tallpack", evaluate=evaluate)
    assert {t.name: t.lam for t in m.tasks} == hidden
    assert m.stats["selection"]["lambda"]["chosen"] == hidden
    flat = tallpack.pack(base, fts, tmp_path / "flat.tallpack", evaluate=lambda t, sd: 1.0,
                         lambda_grid=[0.6, 0.4, 0.3])
    assert all(t.lam == 0.3 for t in flat.tasks), "ties go to the smallest lambda"


def test_alpha_selection_finds_the_answer_known_by_construction(tmp_path):
    base, fts = family(6, tasks=3)
    out = tmp_path / "f.tallpack"
    tallpack.pack(base, fts, out)
    with tallpack.open(out) as fam:
        goal = {t: fam.merged("consensus-ta", alpha=0.7, task=t) for t in fam.tasks}

        def evaluate(task, sd):
            return 1.0 / (1.0 + sum(float((sd[k] - goal[task][k]).abs().sum()) for k in sd))

        sel = tallpack.select_alpha(fam, "consensus-ta", evaluate)
        assert sel.alpha == 0.7 and sel.normalized[0.7] == max(sel.normalized.values())
        assert set(sel.scores) == set(tallpack.ALPHA_GRID)


finite = st.floats(-1e3, 1e3)
references = st.one_of(st.just(0.0), st.floats(-1e3, -1e-3), st.floats(1e-3, 1e3))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), tasks=st.integers(1, 4), alphas=st.integers(2, 5))
def test_normalized_scores_keep_every_tasks_order_for_any_sign(data, tasks, alphas):
    """An alpha that scores at least as well on every task is never ranked below another, whatever
    the signs of the scores and references (a ratio by a negative reference would reverse it); all
    references positive give the paper's mean of score / reference, bit for bit."""
    from tallpack.selection import normalize

    names = [f"t{i}" for i in range(tasks)]
    ref = {t: data.draw(references, label=f"ref {t}") for t in names}
    scores = {a / 10: {t: data.draw(finite) for t in names} for a in range(1, alphas + 1)}
    got, rule = normalize(scores, ref)
    for a in scores:
        for b in scores:
            if all(scores[a][t] >= scores[b][t] for t in names):
                assert got[a] >= got[b]
    if all(r > 0 for r in ref.values()):
        assert rule == "ratio"
        assert got == {a: math.fsum(s[t] / ref[t] for t in names) / len(names) for a, s in scores.items()}
    else:
        assert rule == "difference"
        best = max(sum(s.values()) for s in scores.values())
        assert sum(scores[max(got, key=got.get)].values()) == pytest.approx(best, rel=1e-9, abs=1e-6)


@pytest.fixture(scope="module")
def goal_archive(tmp_path_factory):
    """An archive and, per task, its consensus-ta merge at alpha 0.7: a score of -distance to it
    is best at 0.7."""
    base, fts = family(6, tasks=3)
    out = tmp_path_factory.mktemp("alpha") / "f.tallpack"
    tallpack.pack(base, fts, out)
    with tallpack.open(out) as fam:
        yield fam, {t: fam.merged("consensus-ta", alpha=0.7, task=t) for t in fam.tasks}


def distance(sd, goal):
    return sum(float((sd[k] - goal[k]).abs().sum()) for k in sd)


@settings(max_examples=12, deadline=None)
@given(offset=st.floats(-60, 60, allow_nan=False))
@example(offset=0.0).via("-loss: every score and reference negative")
@example(offset=42.0).via("references of both signs")
@example(offset=60.0).via("every reference positive: the paper's ratio")
def test_alpha_selection_on_negative_scores_takes_the_best_raw_score(goal_archive, offset):
    """Scores of any sign (``offset - distance``: ``-loss`` at offset 0; the reconstructions are
    about 40 from the goal) choose the alpha whose merged models score best, never the worst."""
    fam, goal = goal_archive
    sel = tallpack.select_alpha(fam, "consensus-ta", lambda t, sd: offset - distance(sd, goal[t]))
    raw = {a: sum(s.values()) for a, s in sel.scores.items()}
    assert sel.alpha == 0.7 == max(raw, key=raw.get)
    if all(r > 0 for r in sel.reference.values()):
        assert sel.normalization == "ratio"
    else:  # ranked as the raw mean is
        assert sel.normalization == "difference"
        assert sorted(sel.normalized, key=sel.normalized.get) == sorted(raw, key=raw.get)
    assert sel.to_dict()["normalization"] == sel.normalization


def test_a_zero_reference_does_not_collapse_the_selection(goal_archive, caplog):
    """A reference of 0 (a reconstruction scoring 0) ranks by score - reference, with a warning,
    instead of counting that task as 0 at every alpha; missing or infinite references are refused."""
    fam, goal = goal_archive

    def evaluate(task, sd):
        return 1.0 / (1.0 + distance(sd, goal[task]))

    with caplog.at_level("WARNING", logger="tallpack.selection"):
        sel = tallpack.select_alpha(fam, "consensus-ta", evaluate, reference={t: 0.0 for t in fam.tasks})
    assert sel.alpha == 0.7 and sel.normalization == "difference"
    assert len(set(sel.normalized.values())) == len(sel.normalized)  # before: 0 at every alpha, alpha 0.1
    assert "reference score 0 for 't0', 't1', 't2'" in caplog.text
    with pytest.raises(tallpack.InvalidArgumentError, match="reference has no score for task 't2'"):
        tallpack.select_alpha(fam, "consensus-ta", evaluate, reference={"t0": 1.0, "t1": 1.0})
    with pytest.raises(tallpack.InvalidArgumentError, match="task 't1': the reference score is inf"):
        tallpack.select_alpha(fam, "consensus-ta", evaluate, reference={"t0": 1.0, "t1": float("inf"), "t2": 1.0})


def _as_float64_tensor(x):
    return torch.tensor(x, dtype=torch.float64)


def _with_grad(x):  # a score computed from a tensor that requires grad, as a loss is
    return torch.tensor(x, dtype=torch.float64, requires_grad=True) * 1


@pytest.mark.parametrize("wrap", [_as_float64_tensor, _with_grad, lambda x: torch.tensor([x, x], dtype=torch.float64),
                                  lambda x: np.float64(x), lambda x: np.array([x, x]), lambda x: [x, x]],
                         ids=["tensor", "tensor with grad", "per-example tensor", "numpy scalar", "numpy array", "list"])
def test_alpha_selection_takes_scores_from_torch_and_numpy(goal_archive, wrap):
    """An evaluator's tensor (``(pred == y).float().mean()``, or per-example ``pred == y``) is taken
    as the number or per-example scores it holds (it crashed inside numpy's mean)."""
    fam, goal = goal_archive

    def number(task, sd):
        return 1.0 / (1.0 + distance(sd, goal[task]))

    want = tallpack.select_alpha(fam, "consensus-ta", number, grid=[0.4, 0.7, 1.0])
    got = tallpack.select_alpha(fam, "consensus-ta", lambda t, sd: wrap(number(t, sd)), grid=[0.4, 0.7, 1.0])
    assert got.alpha == want.alpha == 0.7 and got.scores == want.scores


def test_per_example_bool_tensors_score_their_mean(goal_archive):
    fam, _ = goal_archive
    sel = tallpack.select_alpha(fam, "ta", lambda t, sd: torch.tensor([True, False, True, True]), grid=[0.5])
    assert sel.scores == {0.5: {t: 0.75 for t in fam.tasks}} and sel.reference == {t: 0.75 for t in fam.tasks}


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=[]), "tasks is empty"),
    (dict(tasks="t0"), "tasks must be a list of task names, got 't0'"),
    (dict(grid=0.3), "grid must be a sequence of numbers, got 0.3"),
    (dict(grid="0.2"), "grid must be a sequence of numbers, got '0.2'"),
    (dict(grid=[]), "grid is empty"),
    (dict(reference={"t0": "x", "t1": 1.0, "t2": 1.0}), "task 't0': the reference score must be a number or per-"),
    (dict(reference=[1.0, 1.0, 1.0]), "reference must map task names to scores, got list"),
    (dict(evaluate=None), "evaluate must be a function"),
    (dict(evaluate=lambda t, sd: None), "task 't0' on its reconstruction: the evaluator's score must be a number or "
                                        r"per-example scores \(a 1-d sequence of numbers\), got None"),
    (dict(evaluate=lambda t, sd: {"acc": 0.5}), "the evaluator's score must be .*, got {'acc': 0.5}"),
    (dict(evaluate=lambda t, sd: "0.5"), "the evaluator's score must be .*, got '0.5'"),
    (dict(evaluate=lambda t, sd: [[1, 0], [1]]), r"the evaluator's score must be .*, got \[\[1, 0\], \[1\]\]"),
    (dict(evaluate=lambda t, sd: [[1, 0], [1, 1]]), "the evaluator's score must be"),
    (dict(evaluate=lambda t, sd: []), "the evaluator's score must be"),
    (dict(evaluate=lambda t, sd: 1 + 2j), r"the evaluator's score must be .*, got \(1\+2j\)"),
    (dict(evaluate=lambda t, sd: torch.ones(2, 2)), "got a Tensor of shape \\(2, 2\\)"),
    (dict(evaluate=lambda t, sd: float("nan")), "task 't0' on its reconstruction: the evaluator's score is nan"),
    (dict(evaluate=lambda t, sd: [1.0, float("inf")]), "the evaluator's score holds inf; scores must be finite"),
    (dict(evaluate=lambda t, sd: None, reference={"t0": 1.0, "t1": 1.0, "t2": 1.0}),
     "task 't0' at alpha 0.5: the evaluator's score must be"),
])
def test_bad_selection_arguments_are_one_line_errors(goal_archive, kwargs, match):
    """Each bad argument or evaluator result is an InvalidArgumentError naming it (and the task and
    alpha it came from), not a ZeroDivisionError, TypeError or ValueError from inside."""
    fam, _ = goal_archive
    kwargs = {"evaluate": lambda t, sd: 1.0, "grid": [0.5], **kwargs}
    with pytest.raises(tallpack.InvalidArgumentError, match=match) as e:
        tallpack.select_alpha(fam, "consensus-ta", **kwargs)
    assert "\n" not in str(e.value)


def test_a_tie_in_another_task_order_goes_to_the_smallest_alpha(goal_archive):
    """The same task scores in another order are a tie (0.3 + 0.2 + 0.1 != 0.1 + 0.2 + 0.3 in floats)."""
    fam, _ = goal_archive
    seq = iter([0.3, 0.2, 0.1, 0.1, 0.2, 0.3])  # alpha 0.2, then 0.4, tasks t0..t2
    sel = tallpack.select_alpha(fam, "consensus-ta", lambda t, sd: next(seq), grid=[0.2, 0.4],
                                reference={t: 1.0 for t in fam.tasks})
    assert sel.normalized[0.2] == sel.normalized[0.4] and sel.alpha == 0.2


def test_a_lambda_tie_in_another_example_order_goes_to_the_smallest_lambda(tmp_path):
    base, fts = family(5, tasks=2)
    scores = itertools.cycle([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])  # lambda 0.2, then 0.4, per task
    m = tallpack.pack(base, fts, tmp_path / "f.tallpack", evaluate=lambda t, sd: next(scores),
                      lambda_grid=[0.2, 0.4])
    assert {t.name: t.lam for t in m.tasks} == {"t0": 0.2, "t1": 0.2}

def test_merge_through_the_cli(tmp_path):
    base, fts = family(7)
    from safetensors.torch import save_file
    save_file(base, tmp_path / "base.safetensors")
    for t, sd in fts.items():
        save_file(sd, tmp_path / f"{t}.safetensors")
    args = [x for t in fts for x in ("--task", tmp_path / f"{t}.safetensors")]
    run("pack", "--base", tmp_path / "base.safetensors", *args, "--merge", "ties", "-o", tmp_path / "ties.tallpack")
    run("merge", tmp_path / "ties.tallpack", "--method", "consensus-ties", "--k", "2", "--alpha", "0.4",
        "-o", tmp_path / "merged")
    sd = load_file(tmp_path / "merged" / "model.safetensors")
    with tallpack.open(tmp_path / "ties.tallpack") as fam:
        want = fam.merged("consensus-ties", k=2, alpha=0.4)
    assert set(sd) == set(base) and all(torch.equal(sd[k], want[k]) for k in sd)
    r = run("merge", tmp_path / "ties.tallpack", "--method", "ta", "-o", tmp_path / "m2", ok=False)
    assert r.exit_code == 1 and "--merge ta" in r.output


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), n=st.integers(0, 300),
       block=st.sampled_from([8, 64, 1 << 20]), tasks=st.integers(1, 3), seed=st.integers(0, 2**16),
       workspace=st.booleans())
def test_task_vectors_by_block_are_the_widened_difference(dtype, n, block, tasks, seed, workspace):
    """``tall.blocks`` (16-bit inputs widened into the workspace, the base once a block) gives
    ``theta_t.float() - theta_0.float()`` bit for bit, infinities and NaNs included."""
    from tallpack.tall import Workspace, blocks
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 65504.0])
    def draw():
        x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 4, (n,), generator=g)
        pick = torch.rand(n, generator=g) < 0.05
        x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
        return x.to(dtype)
    base, thetas = draw(), [draw() for _ in range(tasks)]
    got = [[] for _ in thetas]
    for b, taus in blocks(base, thetas, block, Workspace() if workspace else None):
        assert b.dtype == dtype
        for i, tau in enumerate(taus):
            got[i].append(tau.clone())
    for i, t in enumerate(thetas):
        want = t.float() - base.float()
        have = torch.cat(got[i]) if got[i] else torch.empty(0)
        assert have.dtype == torch.float32
        assert torch.equal(have.view(torch.int32), want.view(torch.int32)) or torch.equal(
            torch.nan_to_num(have, nan=7.0), torch.nan_to_num(want, nan=7.0))  # NaN payloads may differ


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([0, 5, (1 << 14) + 3, 40000]), count=st.integers(1, 4), where=st.integers(-1, 39999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.uint8]), other=st.sampled_from(["", "dtype", "shape"]))
def test_all_equal_is_same_dtype_shape_and_bytes(n, count, where, dtype, other):
    """``dtypes.all_equal`` (a prefix compared first) says what comparing dtype, shape and every
    byte says, wherever the one differing element is (before, at or past the prefix)."""
    from tallpack.dtypes import all_equal
    first = torch.arange(n).to(dtype)
    tensors = [first] + [first.clone() for _ in range(count)]
    if 0 <= where < n:
        tensors[-1].view(torch.uint8).view(-1)[where % (n * first.element_size())] ^= 1
    if other == "dtype":
        tensors[-1] = tensors[-1].to(torch.float16)
    elif other == "shape" and n:
        tensors[-1] = tensors[-1][:-1]
    want = all(t.dtype == first.dtype and t.shape == first.shape
               and bytes(t.view(torch.uint8).numpy()) == bytes(first.view(torch.uint8).numpy()) for t in tensors)
    assert all_equal(tensors) is want


def test_k_is_refused_for_models_without_consensus(small_family, tmp_path):
    """k does nothing for plain TA or TIES: given there, it is an error (not ignored), in every
    entry point; left out, consensus uses the paper's k = 2."""
    out = tmp_path / "f.tallpack"
    tallpack.pack(small_family["base"], small_family["tasks"], out)
    with tallpack.open(out) as fam:
        for call in (lambda: fam.merged("ta", k=3), lambda: fam.merge_parts("ta", k=0),
                     lambda: tallpack.write_merged(fam, tmp_path / "m", "ta", k=2, alpha=0.3),
                     lambda: tallpack.select_alpha(fam, "ta", lambda t, sd: 1.0, k=2)):
            with pytest.raises(tallpack.InvalidArgumentError, match="k: only the consensus models use it"):
                call()
        assert fam.merge_parts("consensus-ta").k == 2 and fam.merge_parts("ta").k == 2
        default, two = fam.merged("consensus-ta", alpha=0.3), fam.merged("consensus-ta", k=2, alpha=0.3)
        assert all(torch.equal(default[n], two[n]) for n in two)
    assert not (tmp_path / "m").exists()


def test_an_alpha_that_overflows_float16_is_named(tmp_path, caplog):
    """A finite alpha can push a float16 model past 65504: merged() and merge say which tensors."""
    base, fts = family(tasks=2)
    base = {k: v.half() for k, v in base.items()}
    fts = {t: {k: v.half() for k, v in sd.items()} for t, sd in fts.items()}
    tallpack.pack(base, fts, tmp_path / "h.tallpack")
    with tallpack.open(tmp_path / "h.tallpack") as fam:
        caplog.clear()
        fam.merged("ta", alpha=0.5)
        assert "alpha 0.5 overflows" not in caplog.text
        sd = fam.merged("ta", alpha=1e30)
        assert not torch.isfinite(sd["w0"]).all()
        assert "alpha 1e+30 overflows 3 tensors of the ta model" in caplog.text and "'w0'" in caplog.text
    r = subprocess.run([sys.executable, "-m", "tallpack", "merge", tmp_path / "h.tallpack", "--method", "ta",
                        "--alpha", "1e30", "-o", tmp_path / "m"], capture_output=True, text=True)
    assert r.returncode == 0 and "alpha 1e+30 overflows 3 tensors" in r.stderr, r.stderr
    # -q hides the warning; the result line, which -q keeps, carries it (and write_merged returns it)
    r = subprocess.run([sys.executable, "-m", "tallpack", "-q", "merge", tmp_path / "h.tallpack", "--method", "ta",
                        "--alpha", "1e30", "-o", tmp_path / "q"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "alpha 1e+30 overflows 3 tensors (inf): 'w0'" in r.stdout, r.stdout
    with tallpack.open(tmp_path / "h.tallpack") as fam:
        path, n = written = tallpack.write_merged(fam, tmp_path / "p", "ta", alpha=1e30)
        assert "w0" in written.overflow and len(written.overflow) == 3
        import copy
        import pickle
        for again in (copy.copy(written), copy.deepcopy(written), pickle.loads(pickle.dumps(written))):
            assert again == (path, n) and again.overflow == written.overflow  # a worker's result, whole
        assert tallpack.write_merged(fam, tmp_path / "p2", "ta", alpha=0.5).overflow == ()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_models_merge(tmp_path, dtype):
    """A float8_e4m3fn merged tensor failed every merged model (torch has no isfinite for it, which
    the overflow check called); an alpha past float8_e5m2's range (inf) is named."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, generator=g)
    base = {"w": b.to(dtype)}
    fts = {f"t{i}": {"w": (b + 0.5 * torch.randn(64, generator=g)).to(dtype)} for i in range(2)}
    tallpack.pack(base, fts, tmp_path / "f8.tallpack")
    with tallpack.open(tmp_path / "f8.tallpack") as fam:
        tau = sum(sd["w"].float() - b.to(dtype).float() for sd in fts.values())
        want = (b.to(dtype).float() + torch.tensor(0.5) * tau).to(dtype)
        got = fam.merged("ta", alpha=0.5)["w"]
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        over = fam.merge_parts("ta").warn_overflow(fam.merged("ta", alpha=1e6), 1e6)
        assert over == ([] if dtype == torch.float8_e4m3fn else ["w"])  # e4m3fn saturates (spec §6.1.1)


def test_float8_e4m3fn_saturates_whatever_torchs_own_cast_does(tmp_path):
    """Spec §6.1.1: a float8_e4m3fn rebuild past +-448 saturates (PyTorch's cast since 2.13; NaN
    before), clamped first so every torch gives these bits; the exact tier still gives the original."""
    e4 = torch.float8_e4m3fn
    assert torch.equal(narrow(torch.tensor([464.0, 1e6, float("inf"), -1e6]), e4).float(),
                       torch.tensor([448.0, 448.0, 448.0, -448.0]))
    assert torch.isnan(narrow(torch.tensor([float("nan")]), e4).float()).all()
    base = {"w": torch.full((16,), 416.0).to(e4)}
    fts = {f"t{i}": {"w": torch.full((16,), 448.0).to(e4)} for i in range(2)}  # tau_MTL 64: 480 rebuilt
    tallpack.pack(base, fts, tmp_path / "e4.tallpack", lambdas=0.0, exact=True)
    with tallpack.open(tmp_path / "e4.tallpack") as fam:
        assert torch.equal(fam.get_tensor("t0", "w").float(), torch.full((16,), 448.0))
        assert torch.equal(fam.get_tensor("t0", "w", exact=True).view(torch.uint8), fts["t0"]["w"].view(torch.uint8))
        assert torch.equal(fam.merged("ta", alpha=1.0)["w"].float(), torch.full((16,), 448.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_every_task_changed_alike_merges_by_the_formulas(tmp_path, dtype):
    """Tasks that agree on a value other than the base's (fine-tunes of one intermediate checkpoint
    with a layer frozen) are stored once with the base (format 1.13): each task gets the value back
    exactly, and the merged models follow the paper's formulas for it, TIES trimming included."""
    base, fts = family(seed=3)
    g = torch.Generator().manual_seed(7)
    base["s"], base["f"] = torch.randn(6, 5, generator=g), torch.randn(9, generator=g)
    delta = torch.where(torch.arange(30).reshape(6, 5) % 2 == 0, torch.full((6, 5), 0.3), torch.full((6, 5), 1e-4))
    for sd in fts.values():
        sd["s"], sd["f"] = base["s"] + delta, base["f"].clone()
    base = {k: v.to(dtype) for k, v in base.items()}
    fts = {t: {k: v.to(dtype) for k, v in sd.items()} for t, sd in fts.items()}
    shared = [k for k in base if k != "head"]
    for merge in ("ta", "ties"):
        out = tmp_path / f"{merge}.tallpack"
        tallpack.pack(base, fts, out, merge={"method": merge, "top_k": 0.2} if merge == "ties" else merge)
        tv = flat_taus({k: base[k].float() for k in shared}, {t: {k: sd[k].float() for k in shared} for t, sd in fts.items()})
        with tallpack.open(out) as fam:
            assert fam.format_version == (1, 13)
            entries = {e.name: e for e in fam.manifest.tensors}
            assert sorted(entries["s"].arrays) == ["base", "data"] and not entries["s"].members
            assert all(fam.state_dict(t)["s"].equal(sd["s"]) for t, sd in fts.items())
            a = torch.tensor(0.3)
            if merge == "ta":
                mtl = sum(tv.unbind(0)[1:], tv[0] + 0.0)
            else:
                mtl = official_ties(tv, 0.2, "sum")
            mtl = unflatten(mtl, {k: base[k] for k in shared})
            taus = {t: {k: sd[k].float() - base[k].float() for k in shared} for t, sd in fts.items()}
            for model in (merge, f"consensus-{merge}"):
                got = fam.merged(model, alpha=0.3)
                for k in ("s", "f", "w0"):
                    if model == "ties":
                        d = unflatten(official_ties(tv, 0.2, "mean"), {k: base[k] for k in shared})[k]
                    elif model == "ta":
                        d = mtl[k]
                    else:
                        masks = [taus[t][k].abs() > torch.tensor(0.4) * (mtl[k] - taus[t][k]).abs() for t in fts]
                        d = (torch.stack(masks).sum(0) >= 2).float() * mtl[k]
                    want = (base[k].float() + a * d).to(dtype)
                    assert torch.equal(got[k], want), (merge, model, k)
            if merge == "ties":  # the small half of the change is trimmed: those elements stay at the base
                assert torch.equal(fam.merged("ties", alpha=1.0)["s"][0, 1], base["s"][0, 1])


def test_a_k_past_any_integer_type_gives_the_base(tmp_path):
    base, fts = family(tasks=2)
    tallpack.pack(base, fts, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        sd = fam.merged("consensus-ta", k=2**64, alpha=0.5)
        assert all(torch.equal(sd[k], base[k]) for k in base)
    r = run("-q", "merge", tmp_path / "f.tallpack", "--k", str(2**70), "-o", tmp_path / "m")
    assert f"k={2**70}" in r.stdout


def test_a_ties_archive_without_its_statistics_names_them_for_a_tensor_changed_alike(tmp_path):
    """The fuzzer's find: merging a tensor every task changed alike trims by TIES' thresholds; an
    archive whose manifest lacks them is a format error naming them, not an AssertionError."""
    from test_fuzz import manifest_of, with_manifest

    base = {"w": torch.zeros(64), "s": torch.zeros(4)}
    g = torch.Generator().manual_seed(0)
    tasks = {t: {"w": torch.randn(64, generator=g), "s": torch.ones(4)} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "t.tallpack", merge="ties")
    raw = (tmp_path / "t.tallpack").read_bytes()
    for key in ("thresholds", "majority_sign"):
        m = manifest_of(raw)
        del m["merge"][key]
        (tmp_path / "m.tallpack").write_bytes(with_manifest(raw, m))
        with tallpack.open(tmp_path / "m.tallpack") as fam:
            for model in ("ties", "consensus-ties"):
                with pytest.raises(tallpack.TallpackError, match=f"tensor 's': merge: ties {key} missing"):
                    fam.merged(model)


def test_write_merged_defaults_like_merged(tmp_path):
    """``write_merged(fam, out)``: the archive's consensus model at the data-free alpha, as
    ``merged()`` and ``tallpack merge`` (alpha was a required keyword)."""
    from safetensors.torch import load_file

    base, fts = family(tasks=2)
    tallpack.pack(base, fts, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        path, n = tallpack.write_merged(fam, tmp_path / "m")
        want = fam.merged()
    got = load_file(path)
    assert n == len(want) and all(torch.equal(got[k], v) for k, v in want.items())
