"""The fidelity dial: accuracy against archive size, TALL to exact, against simple baselines.

    python benchmarks/fidelity_dial.py [--quick]

Two families: the demo family (``tallpack.demo``, 10 digits variants, heads task-own) and a
family of eight *conflicting* tasks built here (the same small MLP, every task the 10 digits
under its own fixed label permutation, the whole model shared, so every task vector fights every
other). Points: plain TALL (lambda 0.4); the dial at several weight-fidelity targets; the dial
with an evaluator (validation accuracy) at 0.99; the exact tier. Baselines store the base and
every task vector compressed at matched sizes: DARE (random drop with rescale), top-k by magnitude,
uniform per-block quantization. Accuracy is on the TEST split, normalized by each fine-tune's.
Writes ``benchmarks/out/fidelity_dial.json`` and ``benchmarks/fidelity_dial.png`` (``--quick``:
``benchmarks/out/fidelity_dial_quick.json`` and ``.png``, leaving the full run's alone).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import tallpack
import tallpack.dial as dial_mod
from tallpack.codecs import dense_chain
from tallpack.demo import family as demo
from tallpack.encodings.correction import sparse_encode
from tallpack.sensitivity import input_moments

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
CONFLICT_TASKS = 8


# -- the conflicting family ------------------------------------------------------------------------

def _perm(i: int) -> np.ndarray:
    return np.random.default_rng([7, i]).permutation(10)


def build_conflict(root: Path) -> dict:
    """Base MLP 64-128-128-10 pretrained on digits; 8 fine-tunes, each on the digits relabelled by
    its own permutation (seeded; about 20 s on 2 cores). Every tensor is shared: all merged."""
    if (root / "done").exists():
        return json.loads((root / "done").read_text())
    cfg = {"input_dim": 64, "hidden": 128, "layers": 3, "features": 10}
    x, y = demo._task_arrays(demo._PRETRAIN_SPEC, "pretrain", 0)
    xt, yt = demo._task_arrays(demo._PRETRAIN_SPEC, "train", 0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 10))
    torch.manual_seed(0)
    for m in base:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    g = torch.Generator().manual_seed(0)
    demo._train(base, list(base.parameters()), x, y, epochs=40, lr=2e-3, batch_size=64, weight_decay=0.0, gen=g)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    for i in range(CONFLICT_TASKS):
        m = torch.nn.Sequential(*[type(l)(*([l.in_features, l.out_features] if isinstance(l, torch.nn.Linear) else []))
                                  for l in base])
        m.load_state_dict(base.state_dict())
        p = torch.from_numpy(_perm(i))
        demo._train(m, list(m.parameters()), xt, p[yt], epochs=20, lr=2e-3, batch_size=64, weight_decay=0.0,
                    gen=torch.Generator().manual_seed(i + 1))
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / f"perm{i}.safetensors"))
    (root / "done").write_text(json.dumps(cfg))
    return cfg


def conflict_logits(task: str, sd, split: str = "test") -> torch.Tensor:
    x, _ = demo._task_arrays(demo._PRETRAIN_SPEC, split, 0)
    h = x
    for j in range(3):
        h = torch.nn.functional.linear(h, sd[f"{2 * j}.weight"].float(), sd[f"{2 * j}.bias"].float())
        if j < 2:
            h = torch.nn.functional.gelu(h)
    return h


def conflict_eval(task: str, sd, split: str = "test", per_example: bool = False):
    _, y = demo._task_arrays(demo._PRETRAIN_SPEC, split, 0)
    y = torch.from_numpy(_perm(int(task[4:])))[y]
    right = (conflict_logits(task, sd, split).argmax(-1) == y).double()
    return right.numpy() if per_example else float(right.mean())


def demo_logits(root, task: str, sd, split: str = "test") -> torch.Tensor:
    model, data = demo._eval_entry(root, task)
    want = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        return torch.func.functional_call(model, {k: torch.as_tensor(sd[k]).to(v.dtype) for k, v in want.items()},
                                          (data[split][0],))


def kl_divergence(logits, originals, sds) -> dict[str, float]:
    """Per task, the mean over test examples of KL(original's predictions || the rebuilt one's), in
    nats: a smooth companion of accuracy, which at 99.5-100% moves by single examples."""
    out = {}
    for t in originals:
        p = torch.log_softmax(logits(t, originals[t]).double(), -1)
        q = torch.log_softmax(logits(t, sds[t]).double(), -1)
        out[t] = float((p.exp() * (p - q)).sum(-1).mean())
    return out


def conflict_model(sd) -> torch.nn.Module:
    """The conflicting family's MLP as a module, with ``sd``'s weights (the names match)."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                            torch.nn.Linear(128, 10))
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m


def conflict_moments(task: str, sd) -> dict[str, torch.Tensor]:
    """The sensitivity of a task: its original model's layer-input second moments on validation inputs."""
    x, _ = demo._task_arrays(demo._PRETRAIN_SPEC, "val", 0)
    return input_moments(conflict_model(sd), [x])


def demo_moments(root, task: str, sd) -> dict[str, torch.Tensor]:
    model, data = demo._eval_entry(root, task)
    m = copy.deepcopy(model)
    m.load_state_dict({k: torch.as_tensor(sd[k]).to(v.dtype) for k, v in m.state_dict().items()})
    return input_moments(m, [data["val"][0]])


def demo_examples(root, task: str, sd, split: str = "val"):
    """Per-example correctness (0/1) of the demo family's task model, as ``demo.evaluate`` scores it."""
    model, data = demo._eval_entry(root, task)
    want = dict(model.named_parameters()) | dict(model.named_buffers())
    tensors = {k: torch.as_tensor(sd[k]).to(v.dtype) for k, v in want.items()}
    x, y = data[split]
    with torch.no_grad():
        return (torch.func.functional_call(model, tensors, (x,)).argmax(-1) == y).double().numpy()


# -- families as (base path, tasks, evaluate) ------------------------------------------------------

def families(quick: bool) -> dict:
    out = {}
    p = demo.build_family(ROOT / ".tallpack-demo" / "family")
    out["demo"] = (str(p.base), {t: str(v) for t, v in p.tasks.items()},
                   lambda t, sd, split="test": demo.evaluate(p.root, t, sd, split=split),
                   lambda t, sd: demo_examples(p.root, t, sd, "val"), lambda t, sd: demo_logits(p.root, t, sd),
                   lambda t, sd: demo_examples(p.root, t, sd, "test"), lambda t, sd: demo_moments(p.root, t, sd))
    croot = OUT / "conflict"
    build_conflict(croot)
    out["conflict"] = (str(croot / "base.safetensors"),
                       {f"perm{i}": str(croot / f"perm{i}.safetensors") for i in range(CONFLICT_TASKS)},
                       conflict_eval, lambda t, sd: conflict_eval(t, sd, "val", per_example=True), conflict_logits,
                       lambda t, sd: conflict_eval(t, sd, "test", per_example=True), conflict_moments)
    return out


def _load(path: str) -> dict[str, torch.Tensor]:
    return load_file(path) if path.endswith(".safetensors") else demo.load_state_dict(path)


def _scores(evaluate, originals, sds) -> dict[str, float]:
    return {t: evaluate(t, sds[t]) / evaluate(t, originals[t]) for t in originals}


# -- baselines: the base plus every task vector compressed -----------------------------------------

def _enc(arr: np.ndarray) -> int:
    return len(dense_chain("planes", arr.dtype.itemsize).encode(memoryview(np.ascontiguousarray(arr).view(np.uint8))))


def baseline(kind: str, p: float, tau: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """A compressed task vector and its bytes: ``dare`` keeps a random fraction p rescaled by 1/p,
    ``topk`` the fraction p largest, ``quant`` p bits per block of 64 (float32 scale a block)."""
    flat = tau.reshape(-1)
    n = flat.numel()
    if kind in ("dare", "topk"):
        if kind == "dare":
            keep = torch.rand(n, generator=g) < p
            v = torch.where(keep, flat / p, torch.zeros(()))
        else:
            k = max(1, int(n * p))
            v = torch.zeros(n)
            idx = flat.abs().topk(k).indices
            v[idx] = flat[idx]
        gaps, vals = sparse_encode(v, int((v != 0).sum()))
        return v.reshape(tau.shape), _enc(gaps) + _enc(vals)
    bits = int(p)
    qmax = (1 << (bits - 1)) - 1
    nb = -(-n // 64)
    pad = torch.zeros(nb * 64)
    pad[:n] = flat
    b = pad.reshape(nb, 64)
    s = b.abs().amax(1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(b / s[:, None]).clamp(-qmax, qmax)
    v = (q * s[:, None]).reshape(-1)[:n]
    return v.reshape(tau.shape), len(dense_chain("zstd", 1).encode(memoryview(q.to(torch.int8).numpy().tobytes()))) \
        + _enc(s.numpy().astype(np.float32))


BASELINES = {"dare": [0.02, 0.05, 0.1, 0.2, 0.4, 0.7], "topk": [0.01, 0.03, 0.1, 0.2, 0.4, 0.7],
             "quant": [2, 3, 4, 5, 6, 8]}


def _row_scores(evaluate, logits, originals, sds, right=None) -> dict:
    """A point's scores; with ``right`` (per-example test correctness), also each task's 0/1 string
    of test examples, for the paired comparisons."""
    sc, kl = _scores(evaluate, originals, sds), kl_divergence(logits, originals, sds)
    out = {"mean": float(np.mean(list(sc.values()))), "min": float(min(sc.values())), "per_task": sc,
           "kl_mean": float(np.mean(list(kl.values()))), "kl_max": float(max(kl.values()))}
    if right is not None:
        out["right"] = {t: "".join("1" if v else "0" for v in right(t, sds[t])) for t in originals}
    return out


def discordant(a: str, b: str) -> tuple[int, int]:
    """Of two 0/1 strings over the same test examples: (only ``a`` right, only ``b`` right)."""
    return (sum(1 for x, y in zip(a, b) if x == "1" and y == "0"),
            sum(1 for x, y in zip(a, b) if x == "0" and y == "1"))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the chance, if neither model were better, of a split of the
    b + c discordant examples at least this uneven (binomial, p = 1/2)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(rows: list[dict], alpha: float = 0.05) -> list[dict]:
    """The dial at each baseline's size against that baseline, example by example on the test split:
    per task, the examples only the dial gets right (b) and only the baseline gets right (c); the
    exact McNemar test pooled over tasks (the mean) and per task with Bonferroni (the worst task).
    A verdict of "above" or "below" needs p < alpha; anything else is "level"."""
    out = []
    base = {(r["method"].removeprefix("baseline "), r["param"]): r for r in rows if r["method"].startswith("baseline ")}
    for r in rows:
        m = r["method"]
        if not m.startswith("dial, budget = ") or m.endswith(("absolute order", "input-weighted")) or "right" not in r:
            continue
        kind, param = m.removeprefix("dial, budget = ").removesuffix(" size").split()
        bl = base.get((kind, float(param) if "." in param else int(param)))
        if bl is None or "right" not in bl:
            continue
        per = {}
        for t, dr in r["right"].items():
            br = bl["right"][t]
            b, c = discordant(dr, br)
            per[t] = {"b": b, "c": c, "p": mcnemar_p(b, c)}
        B, C = sum(v["b"] for v in per.values()), sum(v["c"] for v in per.values())
        p_all = mcnemar_p(B, C)
        k = len(per)
        worst = min(per.values(), key=lambda v: (v["b"] - v["c"], -v["c"]))
        verdict = lambda b, c, p: "level" if p >= alpha or b == c else ("above" if b > c else "below")  # noqa: E731
        task_verdicts = [verdict(v["b"], v["c"], min(1.0, v["p"] * k)) for v in per.values()]
        out.append({"family": r["family"], "kind": kind, "param": bl["param"], "x_dial": r["x"], "x_baseline": bl["x"],
                    "b": B, "c": C, "p": p_all, "pooled": verdict(B, C, p_all),
                    "tasks_above": task_verdicts.count("above"), "tasks_below": task_verdicts.count("below"),
                    "worst_task_split": [worst["b"], worst["c"]], "per_task": per})
    return out


def run_family(name: str, base_path: str, tasks: dict[str, str], evaluate, examples, logits, right, moments,
               quick: bool, work: Path) -> dict:
    originals = {t: _load(p) for t, p in tasks.items()}
    base = _load(base_path)
    one = sum(v.numel() * v.element_size() for o in originals.values() for v in o.values()) / len(originals)
    rows = []

    def point(label: str, path: Path, **kw) -> dict:
        t0 = time.perf_counter()
        m = tallpack.pack(base_path, tasks, path, overwrite=True, **kw)
        with tallpack.open(path) as fam:
            sds = {t: fam.state_dict(t) for t in fam.tasks}
            s = fam.summary()
        row = {"family": name, "method": label, "bytes": path.stat().st_size, "x": path.stat().st_size / one,
               **_row_scores(evaluate, logits, originals, sds, right), "seconds": time.perf_counter() - t0,
               "stored": {t["name"]: t.get("stored") for t in s["tasks"]},
               "weight": {t.name: t.fidelity.get("weight", None) for t in m.tasks}}
        rows.append(row)
        print(f"{name:9s} {label:28s} {row['x']:6.2f}x  mean {row['mean']:.4f}  min {row['min']:.4f}  "
              f"KL {row['kl_mean']:.2e} / {row['kl_max']:.2e}", flush=True)
        return row

    tall = point("TALL (lambda 0.4)", work / f"{name}-tall.tallpack")
    targets = [0.9, 0.95, 0.99] if quick else [0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995]
    for f in targets:
        point(f"dial, weight fidelity {f}", work / f"{name}-w{f}.tallpack", fidelity=f)
    val = lambda t, sd: evaluate(t, sd, "val")  # noqa: E731
    for f in ([0.99] if quick else [0.98, 0.99, 1.0]):
        point(f"dial, val accuracy {f}", work / f"{name}-v{f}.tallpack", fidelity=f, evaluate=val, lambda_grid=[0.4])
        point(f"dial, val accuracy {f}, per-example bound", work / f"{name}-ve{f}.tallpack", fidelity=f,
              evaluate=examples, lambda_grid=[0.4])
    for b in ([] if quick else [1.5, 2.0, 2.5, 3.0, 4.0]):
        try:
            point(f"dial, budget {b}x", work / f"{name}-b{b}.tallpack", budget=b)
        except tallpack.TallpackError as e:
            print(f"{name}: budget {b}: {e}")
    point("exact tier (fidelity 1.0)", work / f"{name}-exact.tallpack", fidelity=1.0)

    # baselines: the TALL archive's base and task-own parts, plus each task's compressed vector
    with tallpack.open(work / f"{name}-tall.tallpack") as fam:
        st = fam.summary()["stored_bytes"]
    fixed = tall["bytes"] - st["merged"] - st["masks"]
    merged_names = [k for k in base if all(k in o and o[k].shape == base[k].shape for o in originals.values())
                    and base[k].is_floating_point()]
    for kind, params in BASELINES.items():
        for p in (params[1::2] if quick else params):
            g = torch.Generator().manual_seed(0)
            size, sds = fixed, {}
            for t, o in originals.items():
                sd = dict(o)
                for k in merged_names:
                    v, nb = baseline(kind, p, o[k].float() - base[k].float(), g)
                    sd[k] = (base[k].float() + v).to(o[k].dtype)
                    size += nb
                sds[t] = sd
            rows.append({"family": name, "method": f"baseline {kind}", "param": p, "bytes": size, "x": size / one,
                         **_row_scores(evaluate, logits, originals, sds, right)})
    # the dial at exactly each baseline's sizes (--budget), the fairest comparison; at the
    # quantization baseline's, also with the order of steps before (absolute error per byte)
    sens = {t: moments(t, o) for t, o in originals.items()}  # each task's layer-input second moments
    for b in [r for r in rows if r["method"].startswith("baseline ")]:
        kind = b["method"].removeprefix("baseline ")
        try:
            point(f"dial, budget = {kind} {b['param']} size, input-weighted", work / f"{name}-w{kind}{b['param']}.tallpack",
                  budget=0.999 * b["x"], sensitivity=sens)
        except tallpack.TallpackError as e:
            print(f"{name}: budget at {kind} {b['param']}, input-weighted: {e}")
        for order in ("relative", "absolute") if kind == "quant" else ("relative",):
            dial_mod.ORDER = order
            try:
                point(f"dial, budget = {kind} {b['param']} size" + (", absolute order" if order == "absolute" else ""),
                      work / f"{name}-b{kind}{b['param']}.tallpack", budget=0.999 * b["x"])
            except tallpack.TallpackError as e:
                print(f"{name}: budget at {kind} {b['param']}: {e}")
            finally:
                dial_mod.ORDER = "relative"
    return {"one_checkpoint_bytes": one, "rows": rows, "paired": paired(rows), "weighted": weighted_vs_free(rows)}


def coding(base_path: str, tasks: dict[str, str]) -> list[dict]:
    """Bytes of every task vector of the merged tensors quantized per block of 64, coded as the
    quantization baseline codes them (int8 codes then zstd, float32 scales) and as ``qtau`` stores
    them (bit-packed codes then the archive's zstd, float16 scales where they fit)."""
    from tallpack.encodings.qtau import quantize

    base = _load(base_path)
    originals = {t: _load(p) for t, p in tasks.items()}
    names = [k for k in base if base[k].is_floating_point()
             and all(k in o and o[k].shape == base[k].shape for o in originals.values())]
    rows = []
    for bits in (2, 3, 4, 5, 6, 8):
        ours = theirs = 0
        for o in originals.values():
            for k in names:
                tau = o[k].float() - base[k].float()
                theirs += baseline("quant", bits, tau, torch.Generator())[1]
                codes, scales = quantize(tau.reshape(-1), bits)
                ours += len(dense_chain("planes", 1).encode(memoryview(codes))) + _enc(scales)
        rows.append({"bits": bits, "baseline_bytes": theirs, "qtau_bytes": ours})
        print(f"coding {bits} bits: baseline {theirs} bytes, qtau {ours} bytes ({ours / theirs - 1:+.1%})")
    return rows


def ablation(name: str, base_path: str, tasks: dict[str, str], evaluate, quick: bool, work: Path) -> list[dict]:
    """What each part of the qtau candidate buys, at equal targets: the dial without qtau (format
    1.5's corrections), with qtau but the merged vector always kept, with float32 scales only, all."""
    import tallpack.encodings.qtau as qtau_mod

    originals = {t: _load(p) for t, p in tasks.items()}
    one = sum(v.numel() * v.element_size() for o in originals.values() for v in o.values()) / len(originals)
    configs = {"no qtau (1.5 corrections)": dict(corrections=("sparse", "quant4", "quant8", "exact")),
               "qtau, merged vector kept": dict(_drop=False), "qtau, float32 scales": dict(_half=False),
               "qtau, all": {}}
    rows = []
    for f in ([0.95] if quick else [0.9, 0.95, 0.99]):
        for label, kw in configs.items():
            kw = dict(kw)
            dial_mod.DROP_MERGED, qtau_mod.HALF_SCALES = kw.pop("_drop", True), kw.pop("_half", True)
            path = work / f"{name}-abl.tallpack"
            try:
                tallpack.pack(base_path, tasks, path, fidelity=f, overwrite=True, **kw)
            finally:
                dial_mod.DROP_MERGED, qtau_mod.HALF_SCALES = True, True
            with tallpack.open(path) as fam:
                sc = _scores(evaluate, originals, {t: fam.state_dict(t) for t in fam.tasks})
            rows.append({"family": name, "target": f, "config": label, "bytes": path.stat().st_size,
                         "x": path.stat().st_size / one, "mean": float(np.mean(list(sc.values()))),
                         "min": float(min(sc.values()))})
            print(f"{name:9s} ablation {f} {label:28s} {rows[-1]['x']:6.2f}x  min {rows[-1]['min']:.4f}", flush=True)
    return rows


def measure_table(base_path: str, tasks: dict[str, str], evaluate, logits, work: Path) -> list[dict]:
    """How well weight fidelity predicts normalized test accuracy (and test KL): per task, at several
    targets. Also the candidate the allocation now follows within a task, ``relative``: 1 - the
    root mean square over merged tensors of each one's relative error."""
    base = _load(base_path)
    originals = {t: _load(p) for t, p in tasks.items()}
    names = [k for k in base if base[k].is_floating_point()
             and all(k in o and o[k].shape == base[k].shape for o in originals.values())]
    rows = []
    for f in (None, 0.85, 0.9, 0.95, 0.98, 0.99):
        path = work / f"measure-{f}.tallpack"
        tallpack.pack(base_path, tasks, path, overwrite=True, **({"fidelity": f} if f else {}))
        with tallpack.open(path) as fam:
            sds = {t: fam.state_dict(t) for t in fam.tasks}
            rel_l2 = {t: fam.task_info(t).fidelity["rel_l2"] for t in fam.tasks}
        kl = kl_divergence(logits, originals, sds)
        for t, o in originals.items():
            errs = [float(((sds[t][k].double() - o[k].double()) ** 2).sum()) for k in names]
            sqs = [float((o[k].double() ** 2).sum()) for k in names]
            rows.append({"target": f, "task": t, "weight": 1 - math.sqrt(sum(errs) / sum(sqs)),
                         "relative": 1 - math.sqrt(np.mean([e / q for e, q in zip(errs, sqs) if q > 0])),
                         "rel_l2_tall": rel_l2[t], "acc": evaluate(t, sds[t]) / evaluate(t, o), "kl": kl[t]})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = list(results["families"])
    fig, axes = plt.subplots(2, len(fams), figsize=(6 * len(fams), 8), squeeze=False)
    styles = {"baseline dare": ("tab:gray", "x"), "baseline topk": ("tab:olive", "+"),
              "baseline quant": ("tab:purple", "s")}
    for j, name in enumerate(fams):
        rows = [r for r in results["families"][name]["rows"] if not r["method"].endswith(("absolute order", "input-weighted"))]
        for i, stat in enumerate(("mean", "min")):
            ax = axes[i][j]
            for kind, (c, mk) in styles.items():
                rs = sorted((r for r in rows if r["method"] == kind), key=lambda r: r["x"])
                ax.plot([r["x"] for r in rs], [100 * r[stat] for r in rs], color=c, marker=mk, ls="--", label=kind)
            kinds = ("TALL", "dial, weight", "dial, budget", "exact")
            ours = sorted((r for r in rows if r["method"].startswith(kinds)), key=lambda r: r["x"])
            front, best = [], -1.0  # tallpack's curve: the best it reaches at each size or less
            for r in ours:
                if r[stat] > best:
                    best = r[stat]
                    front.append(r)
            ax.step([r["x"] for r in front] + [max(r["x"] for r in rows)],
                    [100 * r[stat] for r in front] + [100 * front[-1][stat]], where="post", color="tab:blue",
                    label="tallpack's curve (best at <= size)")
            dial = [r for r in ours if r["method"].startswith(("dial, weight", "exact"))]
            ax.plot([r["x"] for r in dial], [100 * r[stat] for r in dial], color="tab:blue", marker="o", ls="none",
                    label="dial at weight-fidelity targets, exact")
            tall = [r for r in ours if r["method"].startswith("TALL")]
            ax.plot([r["x"] for r in tall], [100 * r[stat] for r in tall], color="k", marker="o", mfc="none", ms=9,
                    ls="none", label="plain TALL")
            for r in rows:
                if r["method"].startswith("dial, val") and "per-example" in r["method"]:
                    ax.plot(r["x"], 100 * r[stat], color="tab:orange", marker="P", ms=10, ls="none")
                elif r["method"].startswith("dial, val"):
                    ax.plot(r["x"], 100 * r[stat], color="tab:red", marker="*", ms=12, ls="none")
                if r["method"].startswith("dial, budget"):
                    ax.plot(r["x"], 100 * r[stat], color="tab:cyan", marker="D", ls="none")
            ax.plot([], [], color="tab:red", marker="*", ls="none", label="dial with evaluator (val acc.)")
            ax.plot([], [], color="tab:orange", marker="P", ls="none",
                    label="dial with evaluator, per-example lower bound")
            ax.plot([], [], color="tab:cyan", marker="D", ls="none", label="dial with --budget")
            ax.axhline(99, color="k", lw=0.5, ls=":")
            ax.set_xscale("log")
            low = min(100 * r[stat] for r in ours if not r["method"].startswith("TALL"))
            ax.set_ylim(max(0, low - 3), 100.5)  # the region where the choice is made; lower points clipped
            ax.set_xlabel("archive size / one task checkpoint")
            ax.set_ylabel(f"{stat} normalized test accuracy (%)")
            ax.set_title(f"{name} family: {stat} over tasks")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _kl(r: dict) -> str:
    return f"{r['kl_mean']:.1e} / {r['kl_max']:.1e}"


def family_md(fam: dict) -> str:
    """A family's table of points (each against the best baseline at or under its size) and its
    baselines' table, as BENCHMARKS.md shows them."""
    rows = [r for r in fam["rows"] if not r["method"].endswith(("absolute order", "input-weighted"))]
    base = [r for r in rows if r["method"].startswith("baseline ")]
    label = lambda b: f"{b['method'].removeprefix('baseline ')} {b['param']}"  # noqa: E731

    def best(r: dict) -> str:
        under = [b for b in base if b["x"] <= r["x"]]
        if not under:
            return "none this small"
        bm, bw = max(under, key=lambda b: b["mean"]), max(under, key=lambda b: b["min"])
        return f"{_pct(bm['mean'])} ({label(bm)}) / {_pct(bw['min'])} ({label(bw)})"

    out = ["| method | archive bytes | x one checkpoint | mean normalized test acc. | worst task | "
           "test KL mean / worst task | best baseline at <= this size (mean / worst) |",
           "|---|---:|---:|---:|---:|---:|---|"]
    out += [f"| {r['method']} | {r['bytes']:,} | {r['x']:.2f} | {_pct(r['mean'])} | {_pct(r['min'])} | {_kl(r)} | "
            f"{best(r)} |" for r in rows if not r["method"].startswith("baseline ")]
    out += ["", "Baselines (base + every task vector compressed; the TALL archive's base and task-own bytes included):",
            "", "| baseline | setting | x one checkpoint | mean | worst | test KL mean / worst |", "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {b['method'].removeprefix('baseline ')} | {b['param']} | {b['x']:.2f} | {_pct(b['mean'])} | "
            f"{_pct(b['min'])} | {_kl(b)} |" for b in base]
    return "\n".join(out) + "\n"


def at_quant_md(results: dict) -> str:
    """The dial at each quantization setting's size against it: "level" where the accuracies round
    to the same 0.1% or the KLs are within 5%."""
    def verdict(d: float, b: float, higher_better: bool, kl: bool) -> str:
        if (kl and abs(d - b) <= 0.05 * max(d, b)) or (not kl and round(1000 * d) == round(1000 * b)):
            return "level"
        return "above" if (d > b) == higher_better else "below"

    out = ["| family | baseline | its size (x) | baseline mean / worst | baseline KL mean / worst | dial `--budget` at "
           "that size (x) | dial mean / worst | dial KL mean / worst | verdict (acc. mean, worst; KL mean, worst) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, fam in results["families"].items():
        rows = {r["method"]: r for r in fam["rows"]}
        for b in (r for r in fam["rows"] if r["method"] == "baseline quant"):
            d = rows.get(f"dial, budget = quant {b['param']} size")
            if d is None:
                continue
            v = [verdict(d["mean"], b["mean"], True, False), verdict(d["min"], b["min"], True, False),
                 verdict(d["kl_mean"], b["kl_mean"], False, True), verdict(d["kl_max"], b["kl_max"], False, True)]
            out.append(f"| {name} | quant {b['param']} | {b['x']:.2f} | {_pct(b['mean'])} / {_pct(b['min'])} | {_kl(b)} | "
                       f"{d['x']:.2f} | {_pct(d['mean'])} / {_pct(d['min'])} | {_kl(d)} | {', '.join(v)} |")
    return "\n".join(out) + "\n"


def weighted_vs_free(rows: list[dict]) -> list[dict]:
    """The dial with input-weighted errors against the data-free dial, each at a baseline's size:
    sizes, test KL, accuracy, and the paired test examples (b: only the weighted one gets right)."""
    by = {r["method"]: r for r in rows}
    out = []
    for m, w in by.items():
        if not m.endswith(", input-weighted"):
            continue
        f = by.get(m.removesuffix(", input-weighted"))
        if f is None:
            continue
        splits = [discordant(w["right"][t], f["right"][t]) for t in w["right"]]
        b, c = sum(x for x, _ in splits), sum(y for _, y in splits)
        out.append({"family": w["family"], "at": m.removeprefix("dial, budget = ").removesuffix(" size, input-weighted"),
                    "x_weighted": w["x"], "x_free": f["x"], "kl_mean": [w["kl_mean"], f["kl_mean"]],
                    "kl_max": [w["kl_max"], f["kl_max"]], "mean": [w["mean"], f["mean"]], "min": [w["min"], f["min"]],
                    "b": b, "c": c, "p": mcnemar_p(b, c)})
    return out


def weighted_md(results: dict) -> str:
    lines = ["| family | at the size of | x: weighted / data-free | test KL mean: weighted / data-free | worst task's KL | "
             "mean / worst acc.: weighted | data-free | test examples only weighted / only data-free gets right (p) |",
             "|---|---|---|---:|---:|---|---|---|"]
    for name, fam in results["families"].items():
        for q in fam.get("weighted", []):
            lines.append(f"| {name} | {q['at']} | {q['x_weighted']:.2f} / {q['x_free']:.2f} | "
                         f"{q['kl_mean'][0]:.1e} / {q['kl_mean'][1]:.1e} ({q['kl_mean'][1] / max(q['kl_mean'][0], 1e-300):.2f}x) | "
                         f"{q['kl_max'][0]:.1e} / {q['kl_max'][1]:.1e} | {_pct(q['mean'][0])} / {_pct(q['min'][0])} | "
                         f"{_pct(q['mean'][1])} / {_pct(q['min'][1])} | {q['b']} / {q['c']} ({q['p']:.2g}) |")
    return "\n".join(lines) + "\n"


def paired_md(results: dict) -> str:
    """The paired comparisons as a markdown table (pasted into BENCHMARKS.md)."""
    lines = ["| family | baseline | x: dial / baseline | test examples only the dial / only the baseline gets right "
             "(all tasks) | exact McNemar p | all tasks | tasks significantly above / below (Bonferroni) | "
             "worst task's split |", "|---|---|---|---:|---:|---|---:|---:|"]
    for name, fam in results["families"].items():
        for q in fam.get("paired", []):
            lines.append(f"| {name} | {q['kind']} {q['param']} | {q['x_dial']:.2f} / {q['x_baseline']:.2f} | "
                         f"{q['b']} / {q['c']} | {q['p']:.2g} | {q['pooled']} | {q['tasks_above']} / {q['tasks_below']} | "
                         f"{q['worst_task_split'][0]} / {q['worst_task_split'][1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer targets and baseline settings")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the last run's JSON")
    ap.add_argument("--tables-only", action="store_true", help="print the markdown tables of the last run's JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((OUT / "fidelity_dial.json").read_text()), ROOT / "benchmarks" / "fidelity_dial.png")
        return
    if args.tables_only:
        results = json.loads((OUT / "fidelity_dial.json").read_text())
        print("".join(f"#### {n}\n\n{family_md(f)}\n" for n, f in results["families"].items()) + at_quant_md(results)
              + "\n" + paired_md(results) + "\n" + weighted_md(results))
        return
    logging.basicConfig(level=logging.WARNING)
    # a quick run writes beside the full run's files, never over them (nor over the committed plot)
    q = "_quick" if args.quick else ""
    work = OUT / "fidelity_dial"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fams = families(args.quick)
    results: dict = {"quick": args.quick, "families": {}}
    for name, (b, tasks, ev, ex, lg, rt, mo) in fams.items():
        results["families"][name] = run_family(name, b, tasks, ev, ex, lg, rt, mo, args.quick, work)
    results["ablation"] = [r for name, (b, tasks, ev, *_) in fams.items()
                           for r in ablation(name, b, tasks, ev, args.quick, work)]
    results["coding"] = coding(*fams["demo"][:2])
    b, tasks, ev, _, lg, *_ = fams["demo"]
    results["measure"] = measure_table(b, tasks, ev, lg, work)
    results["seconds"] = time.perf_counter() - t0
    (OUT / f"fidelity_dial{q}.json").write_text(json.dumps(results, indent=1))
    md = paired_md(results)
    (OUT / f"fidelity_paired{q}.md").write_text(md)
    tables = "".join(f"#### {name}\n\n{family_md(fam)}\n" for name, fam in results["families"].items())
    (OUT / f"fidelity_tables{q}.md").write_text(tables + "#### At the quantization baseline's own sizes\n\n"
                                            + at_quant_md(results) + "\n#### Paired\n\n" + md
                                            + "\n#### Input-weighted\n\n" + weighted_md(results))
    print(md)
    plot(results, OUT / "fidelity_dial_quick.png" if args.quick else ROOT / "benchmarks" / "fidelity_dial.png")
    print(f"done in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
