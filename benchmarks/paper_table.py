"""Reproduce the TALL-masks paper's main findings (Wang, Dimitriadis et al., ICML 2024,
arXiv 2405.07813) on tallpack's demo family (10 sklearn-digits variants of one small MLP).

    python benchmarks/paper_table.py [--root DIR] [--seed 0] [--out benchmarks/out]
                                     [--figure benchmarks/paper_table.png]
                                     [--benchmarks-md BENCHMARKS.md]

What it does (deterministic; a few minutes on 2 CPU cores):

1. builds (or reuses) the full demo family;
2. packs it four times with real files: merge "ta" and "ties", each once with the data-free
   default lambda and once with per-task lambdas selected on the VALIDATION split;
3. evaluates on the TEST split, per task and on average, absolute and normalized (divided by the
   fine-tuned model's accuracy): fine-tuned, base (base body + the task's own head), Task
   Arithmetic, TIES, Consensus TA (k=2), Consensus TIES (k=2) -- each merged model with its
   alpha chosen on VALIDATION over 0.1..1.0 -- and the TALL reconstructions of all four archives;
4. sweeps fixed lambdas (and a few weight-only per-task rules) for the TALL reconstruction, to
   look for a data-free lambda that does as well as selection;
5. decodes the masks of the TA archive with selected lambdas for mask statistics (density,
   catastrophic / selfish / consensus weights, histogram of tasks per weight, stored mask bits
   per parameter vs the entropy bound);
6. checks the targets (plus diagnostics: lambdas outside the paper's grid, a finer alpha grid,
   the library's data-free alpha, and consistency checks between archive, selection and formula);
   writes ``OUT/paper_table.json``, ``OUT/paper_table.md``, the figure, and
   (with ``--benchmarks-md``) replaces its section of BENCHMARKS.md.

Numbers are deterministic; times (and the date) are not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import tallpack
from tallpack.codecs import MASK_KEEP_BELOW
from tallpack.demo import family
from tallpack.merging import default_alpha
from tallpack.tall import reconstruct, tall_mask, task_vector

SECTION = "## The paper's findings on the demo family"
K = 2  # consensus: weights used by at least K tasks
#: Lambdas outside the paper's grid, evaluated as a diagnostic only (1.0 is the per-element L2 optimum).
OFF_GRID_LAMBDAS = (0.8, 1.0)
#: Each pack is timed this many times (the best time is reported; the archive is identical).
PACK_REPEATS = 3
#: A finer alpha grid, as a diagnostic of the paper's grid (0.1..1.0) when a choice sits at its edge.
FINE_ALPHA_GRID = tuple(round(0.02 * i, 2) for i in range(1, 16))
METHODS = ("ta", "ties", "consensus-ta", "consensus-ties")
METHOD_LABEL = {
    "finetuned": "Fine-tuned (individual)",
    "base": "Base (pretrained body + task's fine-tuned head)",
    "ta": "Task Arithmetic",
    "ties": "TIES",
    "consensus-ta": f"Consensus TA (k={K})",
    "consensus-ties": f"Consensus TIES (k={K})",
    "tall-ta-default": "TALL reconstruction, TA, default lambda",
    "tall-ta-selected": "TALL reconstruction, TA, selected lambda",
    "tall-ties-default": "TALL reconstruction, TIES, default lambda",
    "tall-ties-selected": "TALL reconstruction, TIES, selected lambda",
}
SHORT = {
    "finetuned": "FT", "base": "base", "ta": "TA", "ties": "TIES", "consensus-ta": "Cons-TA",
    "consensus-ties": "Cons-TIES", "tall-ta-default": "TALL-TA λ0", "tall-ta-selected": "TALL-TA λ*",
    "tall-ties-default": "TALL-TIES λ0", "tall-ties-selected": "TALL-TIES λ*",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


class Evaluator:
    """Accuracy on one split, counting calls."""

    def __init__(self, root: Path, split: str):
        self.root, self.split, self.calls = root, split, 0

    def __call__(self, task: str, sd) -> float:
        self.calls += 1
        return family.evaluate(self.root, task, sd, split=self.split)


# --------------------------------------------------------------------------------------------
# 1-2. family and archives
# --------------------------------------------------------------------------------------------


def pack_all(paths: family.FamilyPaths, out: Path, val: Evaluator) -> dict:
    tasks = {t: str(p) for t, p in paths.tasks.items()}
    ckpt_files = [paths.base / "model.safetensors"] + [p / "model.safetensors" for p in paths.tasks.values()]
    ckpt_bytes = sum(os.path.getsize(f) for f in ckpt_files)
    cfg_bytes = sum(os.path.getsize(f.parent / "config.json") for f in ckpt_files)
    archives = {}
    for merge in ("ta", "ties"):
        for mode in ("default", "selected"):
            name = f"{merge}-{mode}"
            path = out / f"demo-{name}.tallpack"
            if path.exists():
                path.unlink()
            calls0 = val.calls
            times = []
            for _ in range(PACK_REPEATS):  # best of a few: the machine is shared, times are noisy
                t0 = time.perf_counter()
                if mode == "default":
                    tallpack.pack(str(paths.base), tasks, path, merge=merge, lambdas=tallpack.DEFAULT_LAMBDA,
                                  overwrite=True)
                else:
                    tallpack.pack(str(paths.base), tasks, path, merge=merge, evaluate=val,
                                  lambda_grid=tallpack.LAMBDA_GRID, overwrite=True)
                times.append(time.perf_counter() - t0)
            seconds = min(times)
            with tallpack.open(path) as ar:
                summ = ar.summary()
                sel = ar.manifest.stats.get("selection")
                merge_params = dict(ar.manifest.merge)
            archive_bytes = os.path.getsize(path)
            archives[name] = {
                "path": str(path),
                "merge": merge,
                "lambda_mode": mode,
                "merge_params": merge_params,
                "seconds": seconds,
                "seconds_all_repeats": times,
                "evaluator_calls": (val.calls - calls0) // PACK_REPEATS,
                "archive_bytes": archive_bytes,
                "checkpoint_file_bytes": ckpt_bytes,
                "checkpoint_config_bytes": cfg_bytes,
                "source_tensor_bytes": summ["source_bytes"],
                "ratio_vs_checkpoint_files": ckpt_bytes / archive_bytes,
                "ratio_vs_source_tensors": summ["source_bytes"] / archive_bytes,
                "stored_bytes": summ["stored_bytes"],
                "kinds": summ["kinds"],
                "lambdas": {t["name"]: t["lambda"] for t in summ["tasks"]},
                "lambda_val_scores": (sel or {}).get("lambda", {}).get("scores"),
                "tasks": summ["tasks"],
            }
            log(f"packed {name}: {archive_bytes:,} B (checkpoints {ckpt_bytes:,} B, "
                f"x{ckpt_bytes / archive_bytes:.2f}) in {seconds:.2f}s; lambdas {archives[name]['lambdas']}")
    return archives


# --------------------------------------------------------------------------------------------
# 3. accuracies
# --------------------------------------------------------------------------------------------


CHECKS: dict[str, bool] = {}


def check(name: str, ok: bool) -> None:
    """Record a consistency check (the library should make all of them true)."""
    CHECKS[name] = CHECKS.get(name, True) and bool(ok)
    if not ok:
        log(f"CHECK FAILED: {name}")


def reference_models(paths: family.FamilyPaths, val: Evaluator, test: Evaluator) -> dict:
    """Fine-tuned models, and the base body with each task's fine-tuned head (also warms the
    evaluator's data cache, so that pack times below do not include building the splits)."""
    base_sd = family.load_state_dict(paths.base)
    ft = {t: family.load_state_dict(p) for t, p in paths.tasks.items()}
    acc = {"val": {}, "test": {}}
    for split, ev in (("val", val), ("test", test)):
        acc[split]["finetuned"] = {t: ev(t, ft[t]) for t in ft}
        acc[split]["base"] = {t: ev(t, {k: (ft[t][k] if k.startswith("head.") else v)
                                        for k, v in base_sd.items()}) for t in ft}
    return acc


def evaluate_archives(names: list[str], archives: dict, acc: dict, val: Evaluator, test: Evaluator) -> dict:
    ref_val = acc["val"]["finetuned"]
    alphas, fine, default = {}, {}, {}
    for method in METHODS:
        merge = "ties" if method.endswith("ties") else "ta"
        for lam_mode in ("selected", "default"):
            # TA and TIES do not depend on the masks (nor on lambda): evaluate them once.
            if lam_mode == "default" and not method.startswith("consensus"):
                continue
            key = method if lam_mode == "selected" else f"{method}@default-lambda"
            with tallpack.open(archives[f"{merge}-{lam_mode}"]["path"]) as ar:
                kk = K if method.startswith("consensus") else None  # k only for consensus
                sel = tallpack.select_alpha(ar, method, val, k=kk, reference=ref_val)
                parts = ar.merge_parts(method, k=kk)
                scores = {}
                for t in names:
                    sd = parts.state_dict(sel.alpha, task=t)
                    if t == names[0]:  # the public one-shot API gives the same model
                        sd2 = ar.merged(method, k=kk, alpha=sel.alpha, task=t)
                        check("merged() equals merge_parts().state_dict()",
                              sd.keys() == sd2.keys() and all(torch.equal(sd[n], sd2[n]) for n in sd))
                    scores[t] = test(t, sd)
                acc["test"][key] = scores
                acc["val"][key] = sel.scores[sel.alpha]
                alphas[key] = {"alpha": sel.alpha, "val_normalized": sel.normalized[sel.alpha],
                               "val_normalized_by_alpha": {str(a): v for a, v in sel.normalized.items()},
                               "archive": f"{merge}-{lam_mode}",
                               "at_grid_edge": sel.alpha in (min(tallpack.ALPHA_GRID), max(tallpack.ALPHA_GRID))}
                log(f"{key}: alpha {sel.alpha} (val norm {sel.normalized[sel.alpha]:.4f}), "
                    f"test avg {mean(scores.values()):.4f}")
                if lam_mode == "selected":
                    # diagnostic: a finer alpha grid (below and around the paper's smallest values)
                    fs = tallpack.select_alpha(ar, method, val, k=kk, reference=ref_val, grid=FINE_ALPHA_GRID)
                    ft_test = acc["test"]["finetuned"]
                    fine[method] = {"alpha": fs.alpha, "val_normalized": fs.normalized[fs.alpha],
                                    "test_norm_avg": mean(test(t, parts.state_dict(fs.alpha, task=t)) / ft_test[t]
                                                          for t in names)}
                    # the library's data-free alpha (parts.state_dict(None) uses it)
                    da = default_alpha(method, len(names))
                    default[method] = {"alpha": da, "val_normalized": sel.normalized.get(da),
                                       "test_norm_avg": mean(test(t, parts.state_dict(None, task=t)) / ft_test[t]
                                                             for t in names)}

    for name, info in archives.items():
        key = f"tall-{name}"
        with tallpack.open(info["path"]) as ar:
            for split, ev in (("val", val), ("test", test)):
                acc[split][key] = {t: ev(t, ar.state_dict(t)) for t in names}
        if info["lambda_val_scores"]:
            # the archive's reconstruction scores what selection measured for the chosen lambda
            check("archive reconstruction scores = selection score at the chosen lambda",
                  all(acc["val"][key][t] == info["lambda_val_scores"][t][str(float(info["lambdas"][t]))]
                      for t in names))
        log(f"{key}: test avg {mean(acc['test'][key].values()):.4f}")
    return {"accuracy": acc, "alphas": alphas, "fine_alpha_diagnostic": fine, "default_alpha": default}


def normalized(acc: dict[str, dict[str, float]], ref: dict[str, float]) -> dict[str, dict[str, float]]:
    return {k: {t: v / ref[t] for t, v in s.items()} for k, s in acc.items()}


# --------------------------------------------------------------------------------------------
# 4. fixed lambdas and data-free rules
# --------------------------------------------------------------------------------------------


def merged_arrays(ar) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each merged tensor's stored base and tau_MTL (float32), by tensor name; a group's
    (format 1.12) split into its members' runs."""
    out = {}
    for e in ar.manifest.tensors:
        if e.kind != "merged":
            continue
        b = ar.read_array(e.arrays["base"], f"tensor {e.name!r} (base)")
        mtl = ar.read_array(e.arrays["merged"], f"tensor {e.name!r} (merged)")
        if not e.members:
            out[e.name] = (b, mtl)
            continue
        b, mtl = b.reshape(-1), mtl.reshape(-1)
        for m in e.members:
            run = slice(m.offset, m.offset + m.numel)
            out[m.name] = (b[run].view(m.shape), mtl[run].view(m.shape))
    return out


def lambda_sweep(paths: family.FamilyPaths, archives: dict, val: Evaluator, test: Evaluator) -> dict:
    """TALL reconstructions for every lambda of the grid, built from the archive's own base and
    tau_MTL (float32, exactly what the packer used) and the original task vectors, with the
    library's ``tall_mask``/``reconstruct``. Checked bit-exact against the default archive."""
    grid = [float(x) for x in tallpack.LAMBDA_GRID] + [lam for lam in OFF_GRID_LAMBDAS
                                                        if lam not in tallpack.LAMBDA_GRID]
    out = {}
    for merge in ("ta", "ties"):
        with tallpack.open(archives[f"{merge}-default"]["path"]) as ar:
            names = list(ar.tasks)
            merged = merged_arrays(ar)
            by_lam = {lam: {"val": {}, "test": {}, "rel_l2": {}, "cosine": {}, "norm_ratio": {},
                            "density": {}} for lam in grid}
            for t in names:
                src = family.load_state_dict(paths.tasks[t])
                taus = {n: task_vector(src[n], b) for n, (b, _) in merged.items()}
                tau_sq = sum(float(x.double().square().sum()) for x in taus.values())
                for lam in grid:
                    sd, err_sq, rec_sq, dot, ones, numel = {}, 0.0, 0.0, 0.0, 0, 0
                    for n in ar.keys(t):
                        if n not in merged:
                            sd[n] = src[n]
                            continue
                        b, mtl = merged[n]
                        m = tall_mask(taus[n], mtl, lam)
                        sd[n] = reconstruct(b, m, mtl, src[n].dtype)
                        rec = (m.to(torch.float32) * mtl).double()
                        tau = taus[n].double()
                        err_sq += float((rec - tau).square().sum())
                        rec_sq += float(rec.square().sum())
                        dot += float((rec * tau).sum())
                        ones += int(m.sum())
                        numel += m.numel()
                    if lam == tallpack.DEFAULT_LAMBDA:
                        archived = ar.state_dict(t)
                        check("sweep at the default lambda is bit-exact with the default archive",
                              sd.keys() == archived.keys() and all(torch.equal(sd[n], archived[n]) for n in sd))
                    r = by_lam[lam]
                    r["val"][t] = val(t, sd)
                    stored = archives[f"{merge}-selected"]["lambda_val_scores"]
                    if lam in tallpack.LAMBDA_GRID:
                        check("sweep val scores = the pack-time selection's scores",
                              stored[t][str(float(lam))] == r["val"][t])
                    r["test"][t] = test(t, sd)
                    r["rel_l2"][t] = math.sqrt(err_sq / tau_sq)
                    r["cosine"][t] = dot / math.sqrt(tau_sq * rec_sq) if rec_sq > 0 else 0.0
                    r["norm_ratio"][t] = math.sqrt(rec_sq / tau_sq)
                    r["density"][t] = ones / numel
        out[merge] = {str(lam): r for lam, r in by_lam.items()}
    return out


def data_free_rules(sweep: dict, ft_test: dict[str, float]) -> dict:
    """Fixed lambdas and per-task weight-space rules, scored on test (and val-selection for
    comparison, recomputed from the same sweep)."""
    res = {}
    for merge, by_lam in sweep.items():
        lams = [str(float(x)) for x in tallpack.LAMBDA_GRID]
        names = list(ft_test)
        rules = {}
        for lam in lams:
            rules[f"fixed {lam}"] = {t: float(lam) for t in names}

        def argbest(metric: str, sign: float) -> dict[str, float]:
            # ties go to the smallest lambda (the densest mask), like the library's selection
            return {t: float(max(lams, key=lambda l: (sign * by_lam[l][metric][t], -float(l)))) for t in names}

        rules["per-task min rel. L2 error"] = argbest("rel_l2", -1.0)
        rules["per-task max cosine"] = argbest("cosine", 1.0)
        rules["per-task norm ratio closest to 1"] = {
            t: float(min(lams, key=lambda l: (abs(by_lam[l]["norm_ratio"][t] - 1.0), float(l)))) for t in names}
        rules["per-task val selection (reference)"] = argbest("val", 1.0)
        table = {}
        for rule, choice in rules.items():
            test_acc = {t: by_lam[str(choice[t])]["test"][t] for t in names}
            table[rule] = {
                "lambdas": choice,
                "test": test_acc,
                "test_avg": mean(test_acc.values()),
                "test_norm_avg": mean(test_acc[t] / ft_test[t] for t in names),
                "data_free": "val" not in rule,
            }
        fixed = {r: v for r, v in table.items() if r.startswith("fixed")}
        best_fixed = max(fixed, key=lambda r: (fixed[r]["test_norm_avg"], -float(r.split()[1])))
        free = {r: v for r, v in table.items() if v["data_free"]}
        best_free = max(free, key=lambda r: free[r]["test_norm_avg"])
        sel = table["per-task val selection (reference)"]
        off_grid = {}
        for lam in by_lam:
            if lam not in lams:
                test_acc = by_lam[lam]["test"]
                off_grid[lam] = {"test_avg": mean(test_acc.values()),
                                 "test_norm_avg": mean(test_acc[t] / ft_test[t] for t in names),
                                 "density_avg": mean(by_lam[lam]["density"].values()),
                                 "rel_l2_avg": mean(by_lam[lam]["rel_l2"].values())}
        res[merge] = {
            "rules": table,
            "off_grid_diagnostic": off_grid,
            "best_fixed": best_fixed,
            "best_data_free": best_free,
            "best_fixed_matches_selection": fixed[best_fixed]["test_norm_avg"] >= sel["test_norm_avg"] - 1e-12,
            "best_fixed_minus_selection_norm": fixed[best_fixed]["test_norm_avg"] - sel["test_norm_avg"],
        }
    return res


# --------------------------------------------------------------------------------------------
# 5. masks
# --------------------------------------------------------------------------------------------


def mask_stats(archive_info: dict) -> dict:
    with tallpack.open(archive_info["path"]) as ar:
        names = list(ar.tasks)
        T = len(names)
        hist = np.zeros(T + 1, np.int64)
        ones = dict.fromkeys(names, 0)
        numel = 0
        for e in ar.manifest.tensors:
            if e.kind != "merged":
                continue
            count = None
            for t, tt in e.tasks.items():
                m = ar.read_array(tt.arrays["mask"], f"task {t!r}, tensor {e.name!r} (mask)")
                check("decoded mask ones = manifest ones", int(m.sum()) == tt.params["ones"])
                ones[t] += int(m.sum())
                count = m.to(torch.int32) if count is None else count + m.to(torch.int32)
            hist += np.bincount(count.reshape(-1).numpy(), minlength=T + 1)
            numel += count.numel()
        summ = ar.summary()
    for t in summ["tasks"]:
        check("decoded density = manifest density", abs(ones[t["name"]] / numel - t["density"]) < 1e-12)
    per_task = {t["name"]: {"lambda": t["lambda"], "density": ones[t["name"]] / numel,
                            "manifest_density": t["density"],
                            "mask_bytes": t["mask_bytes"],
                            "mask_bits_per_param": t["mask_bits_per_param"],
                            "mask_entropy_bits_per_param": t["mask_entropy_bits_per_param"],
                            "fidelity": t["fidelity"]}
                for t in summ["tasks"]}
    share = hist / numel
    return {
        "archive": archive_info["path"],
        "masked_params": numel,
        "per_task": per_task,
        "histogram_counts": hist.tolist(),
        "histogram_share": share.tolist(),
        "catastrophic_share": float(share[0]),
        "selfish_share": float(share[1]),
        "consensus_share": float(share[2:].sum()),
        "mean_density": mean(v["density"] for v in per_task.values()),
        "mean_mask_bits_per_param": mean(v["mask_bits_per_param"] for v in per_task.values()),
        "mean_entropy_bits_per_param": mean(v["mask_entropy_bits_per_param"] for v in per_task.values()),
    }


# --------------------------------------------------------------------------------------------
# 6-7. targets, report
# --------------------------------------------------------------------------------------------


def targets(avg_norm: dict[str, float]) -> list[dict]:
    rows = [
        ("TALL reconstruction (TA, selected lambda) keeps >= 99% normalized test accuracy",
         avg_norm["tall-ta-selected"], ">= 0.99", avg_norm["tall-ta-selected"] >= 0.99),
        ("Consensus TA > Task Arithmetic (avg test accuracy)",
         avg_norm["consensus-ta"] - avg_norm["ta"], "> 0 (normalized diff.)",
         avg_norm["consensus-ta"] > avg_norm["ta"]),
        ("Consensus TIES > TIES (avg test accuracy)",
         avg_norm["consensus-ties"] - avg_norm["ties"], "> 0 (normalized diff.)",
         avg_norm["consensus-ties"] > avg_norm["ties"]),
    ]
    return [{"target": n, "value": v, "threshold": th, "status": "PASS" if ok else "MISS"}
            for n, v, th, ok in rows]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(res: dict, command: str) -> str:
    names = res["tasks"]
    acc, norm = res["accuracy"]["test"], res["normalized"]["test"]
    keys = [k for k in METHOD_LABEL if k in acc]
    L = []
    L.append(SECTION)
    L.append("")
    L.append(f"Produced by `{command}` on {res['date']} ({res['machine']}; "
             f"2-core shared machine; sizes exact, times noisy; total runtime {res['runtime_s']:.0f}s). "
             "Everything except times is deterministic (the archives record the family folder's path, so a run "
             "over another folder, `--root`, changes their sizes by a few bytes). "
             "Raw numbers: `benchmarks/out/paper_table.json`.")
    L.append("")
    L.append("Setup: the demo family of `tallpack.demo.family` (size `full`, seed "
             f"{res['seed']}): an MLP body pretrained on plain digits and fine-tuned on 10 digit "
             "variants; heads are task-own tensors, so every model below is evaluated with the "
             "task's own fine-tuned head. Accuracies are on the TEST split "
             f"({res['test_size']} images per task); all "
             "choices (lambda per task, alpha per merged model) were made on the VALIDATION split "
             f"({res['val_size']} images per task). Normalized accuracy = accuracy / fine-tuned accuracy, per task, then "
             "averaged. Consensus uses the TALL masks of the archive packed with selected lambdas, "
             f"k={K}. TIES keeps the top {res['archives']['ties-selected']['merge_params'].get('top_k')} "
             "of each task vector.")
    L.append("")
    an = {k: mean(v.values()) for k, v in norm.items()}
    merged_best = max(METHODS, key=lambda m: an[m])
    ta_sel = res["archives"]["ta-selected"]
    n_test = res["test_size"]

    def images(a: str, b: str) -> int:
        return round(sum(acc[a][t] - acc[b][t] for t in names) * n_test)

    df = {m: res["data_free"][m] for m in ("ta", "ties")}
    other_rules = {m: max((r for r, v in df[m]["rules"].items() if v["data_free"] and not r.startswith("fixed")),
                          key=lambda r: df[m]["rules"][r]["test_norm_avg"]) for m in df}
    rules_beat_fixed = {m: df[m]["rules"][other_rules[m]]["test_norm_avg"] > df[m]["rules"][df[m]["best_fixed"]]["test_norm_avg"]
                        for m in df}
    L.append("In short:")
    L.append("")
    L.append(f"- **TALL reconstruction** keeps {pct(an['tall-ta-selected'])}% of fine-tuned accuracy "
             f"(TA archive, selected lambdas; {pct(an['tall-ta-default'])}% with the default lambda "
             f"{tallpack.DEFAULT_LAMBDA}), against {pct(an[merged_best])}% for the best single merged model "
             f"({METHOD_LABEL[merged_best]}) and {pct(an['base'])}% for the base body; the archive holding all "
             f"{len(names)} fine-tunes and the base is {ta_sel['ratio_vs_checkpoint_files']:.2f}x smaller than the "
             f"{len(names) + 1} checkpoint files it replaces.")
    L.append(f"- **Consensus merging** changes the average normalized accuracy by "
             f"{100 * (an['consensus-ta'] - an['ta']):+.2f} points over TA and "
             f"{100 * (an['consensus-ties'] - an['ties']):+.2f} points over TIES"
             + (f"; one test image is {100 / n_test:.2f} points of one task's accuracy, and in absolute "
                f"accuracy these differences amount to {images('consensus-ta', 'ta'):+d} and "
                f"{images('consensus-ties', 'ties'):+d} correctly classified test images out of the "
                f"{n_test * len(names)} evaluated: too small to call either way on this family")
             + f". Consensus removes little here: {pct(res['masks']['consensus_share'])}% of the weights are "
             "used by two or more tasks (the masks are dense, "
             f"{pct(res['masks']['mean_density'])}% on average).")
    L.append(f"- **A data-free lambda**: the best fixed lambda of the grid is "
             f"{res['data_free']['ta']['best_fixed'].split()[1]} for the TA archive "
             f"({'at least as good as' if res['data_free']['ta']['best_fixed_matches_selection'] else 'below'} "
             f"per-task selection on validation) and {res['data_free']['ties']['best_fixed'].split()[1]} for "
             f"the TIES archive ({'at least as good as' if res['data_free']['ties']['best_fixed_matches_selection'] else 'below'} "
             "selection); "
             + ("no weight-space rule beats the best fixed lambda" if not any(rules_beat_fixed.values())
                else "a weight-space rule beats the best fixed lambda for "
                + ", ".join(m.upper() for m, v in rules_beat_fixed.items() if v))
             + ". Which fixed lambda is best was read off the test split (see below).")
    L.append("")
    L.append("![normalized accuracy and tasks per weight](benchmarks/paper_table.png)")
    L.append("")
    L.append("### Average test accuracy")
    L.append("")
    L.append("| method | alpha / lambda | abs. acc. (%) | normalized (%) |")
    L.append("|---|---|---:|---:|")
    for k in keys:
        if k in res["alphas"]:
            knob = f"alpha = {res['alphas'][k]['alpha']}"
        elif k.startswith("tall-"):
            arch = res["archives"][k.removeprefix("tall-")]
            lams = sorted(set(arch["lambdas"].values()))
            knob = (f"lambda = {lams[0]}" if len(lams) == 1 else "lambda per task, selected")
        else:
            knob = "-"
        L.append(f"| {METHOD_LABEL[k]} | {knob} | {pct(mean(acc[k].values()))} | {pct(mean(norm[k].values()))} |")
    L.append("")
    for title, table in (("Per-task test accuracy (%)", acc), ("Per-task normalized test accuracy (%)", norm)):
        L.append(f"### {title}")
        L.append("")
        L.append("| task | " + " | ".join(SHORT[k] for k in keys) + " |")
        L.append("|---|" + "---:|" * len(keys))
        for t in names:
            L.append(f"| {t} | " + " | ".join(pct(table[k][t]) for k in keys) + " |")
        L.append("| **average** | " + " | ".join(f"**{pct(mean(table[k].values()))}**" for k in keys) + " |")
        L.append("")
    L.append("Legend: FT fine-tuned; TALL-X λ0 / λ* = TALL reconstruction from the archive packed "
             "with merge X, with the default lambda "
             f"{tallpack.DEFAULT_LAMBDA} / with lambdas selected on validation.")
    L.append("")
    # consensus with default-lambda masks, for completeness
    extra = [k for k in acc if k.endswith("@default-lambda")]
    if extra:
        L.append("Consensus built on the masks of the default-lambda archives instead: " + "; ".join(
            f"{METHOD_LABEL[k.split('@')[0]]}: alpha {res['alphas'][k]['alpha']}, "
            f"{pct(mean(acc[k].values()))}% abs., {pct(mean(norm[k].values()))}% normalized" for k in extra) + ".")
        L.append("")
    fine = res.get("fine_alpha_diagnostic") or {}
    if fine:
        edge = [k for k, v in res["alphas"].items() if v["at_grid_edge"]]
        L.append("Alpha grid check (diagnostic, not used above): "
                 + (f"{', '.join(edge)} chose an edge of the paper's grid 0.1..1.0. " if edge else "")
                 + "Re-selecting alpha on validation over the finer grid "
                 f"{FINE_ALPHA_GRID[0]}..{FINE_ALPHA_GRID[-1]} (step 0.02) gives: "
                 + "; ".join(f"{METHOD_LABEL[m]}: alpha {v['alpha']}, {pct(v['test_norm_avg'])}% normalized test"
                             for m, v in fine.items()) + ".")
        L.append("")
    da = res.get("default_alpha") or {}
    if da:
        L.append("With the library's data-free alpha (`tallpack.merging.default_alpha`: 1/T for sums, "
                 "1.0 for TIES' disjoint mean) instead of validation-selected alpha: "
                 + "; ".join(f"{METHOD_LABEL[m]}: alpha {v['alpha']:.2g}, {pct(v['test_norm_avg'])}% normalized test"
                             for m, v in da.items()) + ".")
        L.append("")
    L.append("### Chosen lambdas (per task, on validation)")
    L.append("")
    L.append("| task | " + " | ".join(f"λ {m.upper()} archive" for m in ("ta", "ties")) + " |")
    L.append("|---|---:|---:|")
    for t in names:
        L.append(f"| {t} | {res['archives']['ta-selected']['lambdas'][t]} | "
                 f"{res['archives']['ties-selected']['lambdas'][t]} |")
    L.append("")
    L.append("Lambda ties on validation go to the smallest lambda (the densest mask), as in "
             "`tallpack.selection`.")
    L.append("")
    L.append("### Archive sizes and packing time")
    L.append("")
    L.append("| archive | bytes | checkpoint files (bytes) | ratio vs files | source tensors (bytes) | "
             "ratio vs tensors | masks (bytes) | pack time (s, best of " + str(PACK_REPEATS) + ") | val evals per pack |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, a in res["archives"].items():
        L.append(f"| {n} | {a['archive_bytes']:,} | {a['checkpoint_file_bytes']:,} | "
                 f"{a['ratio_vs_checkpoint_files']:.2f}x | {a['source_tensor_bytes']:,} | "
                 f"{a['ratio_vs_source_tensors']:.2f}x | {a['stored_bytes']['masks']:,} | "
                 f"{a['seconds']:.2f} | {a['evaluator_calls']} |")
    L.append("")
    a = res["archives"]["ta-selected"]
    L.append("Checkpoint files = the 11 `model.safetensors` files (base + 10 fine-tunes; the "
             f"`config.json` files add {a['checkpoint_config_bytes']:,} bytes). Stored bytes of the "
             "TA archive with selected lambdas by part: " +
             ", ".join(f"{k} {v:,}" for k, v in a["stored_bytes"].items() if v) + ".")
    L.append("")
    L.append("### Looking for a data-free lambda")
    L.append("")
    for merge in ("ta", "ties"):
        d = res["data_free"][merge]
        L.append(f"TALL reconstruction from the {merge.upper()} archive, test accuracy for every "
                 "lambda rule (the last row uses validation data, for reference):")
        L.append("")
        L.append("| rule | lambdas | avg test acc. (%) | normalized (%) |")
        L.append("|---|---|---:|---:|")
        for rule, r in d["rules"].items():
            lams = sorted(set(r["lambdas"].values()))
            desc = str(lams[0]) if len(lams) == 1 else ", ".join(f"{t}:{r['lambdas'][t]}" for t in names)
            L.append(f"| {rule} | {desc} | {pct(r['test_avg'])} | {pct(r['test_norm_avg'])} |")
        L.append("")
        sel = d["rules"]["per-task val selection (reference)"]
        bf = d["rules"][d["best_fixed"]]
        L.append(f"Best fixed lambda ({merge.upper()}): **{d['best_fixed'].split()[1]}** "
                 f"({pct(bf['test_norm_avg'])}% normalized vs {pct(sel['test_norm_avg'])}% with "
                 f"validation selection: {'matches or beats' if d['best_fixed_matches_selection'] else 'below'} "
                 f"selection, difference {100 * d['best_fixed_minus_selection_norm']:+.2f} points). "
                 f"Best data-free rule overall: {d['best_data_free']}.")
        L.append("")
    og = res["data_free"]["ta"]["off_grid_diagnostic"]
    if og:
        L.append("Outside the paper's grid (diagnostic, TA archive): " + "; ".join(
            f"lambda {lam}: {pct(v['test_norm_avg'])}% normalized (density {pct(v['density_avg'])}%, "
            f"rel. L2 {v['rel_l2_avg']:.2f})" for lam, v in og.items()) + ".")
        L.append("")
    L.append("Note on weight-space rules: the squared L2 error of the reconstructed task vector "
             "always prefers the largest lambda of the grid, because per element the L2-optimal "
             "choice keeps tau_MTL exactly when |tau_t| > |tau_MTL - tau_t|, i.e. lambda = 1, and "
             "masks are nested in lambda; so L2 is no guide to accuracy here. Caveat: picking the best "
             "fixed lambda by its *test* accuracy, as this table does, is itself a (mild) use of "
             "test data; it says which fixed default would have been best on this family, nothing "
             "more.")
    L.append("")
    ms = res["masks"]
    L.append("### Masks (TA archive, selected lambdas)")
    L.append("")
    L.append(f"Over the {ms['masked_params']:,} parameters of the merged (shared-body) tensors: "
             f"**{pct(ms['catastrophic_share'])}%** used by no task (catastrophic), "
             f"**{pct(ms['selfish_share'])}%** by exactly one task (selfish), "
             f"**{pct(ms['consensus_share'])}%** by two or more (consensus, kept by k=2).")
    L.append("")
    L.append("| tasks using the weight | " + " | ".join(str(i) for i in range(len(ms["histogram_share"]))) + " |")
    L.append("|---|" + "---:|" * len(ms["histogram_share"]))
    L.append("| share of weights (%) | " + " | ".join(pct(x) for x in ms["histogram_share"]) + " |")
    L.append("")
    L.append("| task | lambda | mask density (%) | stored mask bits/param | entropy bound H(p) bits/param | "
             "stored / bound | rel. L2 | cosine |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in names:
        p = ms["per_task"][t]
        L.append(f"| {t} | {p['lambda']} | {pct(p['density'])} | {p['mask_bits_per_param']:.3f} | "
                 f"{p['mask_entropy_bits_per_param']:.3f} | "
                 f"{p['mask_bits_per_param'] / p['mask_entropy_bits_per_param']:.2f} | "
                 f"{p['fidelity']['rel_l2']:.3f} | {p['fidelity']['cosine']:.3f} |")
    L.append(f"| **mean** | | {pct(ms['mean_density'])} | {ms['mean_mask_bits_per_param']:.3f} | "
             f"{ms['mean_entropy_bits_per_param']:.3f} | | | |")
    L.append("")
    L.append("The entropy bound is computed from each task's overall density p per tensor "
             "(an i.i.d. Bernoulli model; a group of small tensors, format 1.12, counts as one); "
             "stored bits include the container's per-chunk overhead. A mask chunk that zstd "
             f"would not shrink below {MASK_KEEP_BELOW:.0%} of its bits is stored as its bits (1 bit a "
             "parameter), which decodes at memory speed (BENCHMARKS.md, issue 8's eleventh round): "
             "on these dense masks that is every chunk.")
    L.append("")
    L.append("Consistency checks run by the script (all should hold): " + "; ".join(
        f"{k}: {'ok' if v else 'FAILED'}" for k, v in res["checks"].items()) + ".")
    L.append("")
    L.append("### Targets")
    L.append("")
    L.append("| target | value | threshold | status |")
    L.append("|---|---:|---|---|")
    for r in res["targets"]:
        v = r["value"]
        val = pct(v) + "%" if "keeps" in r["target"] else f"{100 * v:+.2f} points"
        L.append(f"| {r['target']} | {val} | {r['threshold']} | **{r['status']}** |")
    L.append("")
    return "\n".join(L)


def figure(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = res["normalized"]["test"]
    keys = [k for k in METHOD_LABEL if k in norm and k != "finetuned"]
    vals = [100 * mean(norm[k].values()) for k in keys]
    colors = ["#999999" if k == "base" else "#4c72b0" if not k.startswith("tall") else "#55a868" for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    ax1.bar(range(len(keys)), vals, color=colors)
    ax1.axhline(100, color="k", lw=0.8, ls="--")
    ax1.axhline(99, color="#c44e52", lw=0.8, ls=":", label="99% target")
    for i, v in enumerate(vals):
        ax1.text(i, v + 0.4, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(keys)), [SHORT[k] for k in keys], rotation=35, ha="right", fontsize=8)
    ax1.set_ylim(min(vals) - 8, 104)
    ax1.set_ylabel("normalized test accuracy (%)")
    ax1.set_title(f"Demo family, {len(res['tasks'])} tasks: average over tasks")
    ax1.legend(loc="lower right", fontsize=8)
    ms = res["masks"]
    share = [100 * x for x in ms["histogram_share"]]
    T = len(share) - 1
    c2 = ["#c44e52"] + ["#dd8452"] + ["#55a868"] * (T - 1)
    ax2.bar(range(T + 1), share, color=c2)
    ax2.set_xticks(range(T + 1))
    ax2.set_xlabel("number of tasks whose TALL mask keeps the weight")
    ax2.set_ylabel("share of weights (%)")
    ax2.set_title("TALL masks (TA archive, selected λ)\n"
                  f"catastrophic {ms['catastrophic_share']:.1%}, selfish {ms['selfish_share']:.1%}, "
                  f"consensus {ms['consensus_share']:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None, "Creation Time": None})
    plt.close(fig)


def replace_section(md_path: Path, body: str) -> None:
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        tail = text[end:]
        text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    md_path.write_text(text)


def git_state() -> str:
    """The commit the library was run at, and whether the working tree differed from it."""
    import subprocess
    repo = Path(tallpack.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tallpack"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {rev}" + (" with uncommitted library changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".tallpack-demo/family",
                    help="demo family folder (built if missing; `tallpack demo` builds the same one there)")
    ap.add_argument("--seed", type=int, default=0, help="demo family seed")
    ap.add_argument("--out", default="benchmarks/out", help="archives, JSON and markdown go here")
    ap.add_argument("--figure", default="benchmarks/paper_table.png")
    ap.add_argument("--benchmarks-md", default=None,
                    help="replace the section of this markdown file (e.g. BENCHMARKS.md)")
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/paper_table.py", *(sys.argv[1:] if argv is None else argv)])

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    paths = family.build_family(args.root, size="full", seed=args.seed)
    t_family = time.perf_counter() - t0
    log(f"family ready in {t_family:.1f}s: {len(paths.tasks)} tasks in {paths.root}")
    root = paths.root
    val, test = Evaluator(root, "val"), Evaluator(root, "test")

    names = list(paths.tasks)
    t0 = time.perf_counter()
    acc0 = reference_models(paths, val, test)
    t_ref = time.perf_counter() - t0
    archives = pack_all(paths, out, val)
    t0 = time.perf_counter()
    ev = evaluate_archives(names, archives, acc0, val, test)
    t_eval = time.perf_counter() - t0 + t_ref
    acc = ev["accuracy"]
    norm = {s: normalized(acc[s], acc[s]["finetuned"]) for s in acc}
    avg = {k: mean(v.values()) for k, v in acc["test"].items()}
    avg_norm = {k: mean(v.values()) for k, v in norm["test"].items()}

    t0 = time.perf_counter()
    sweep = lambda_sweep(paths, archives, val, test)
    free = data_free_rules(sweep, acc["test"]["finetuned"])
    t_sweep = time.perf_counter() - t0
    masks = mask_stats(archives["ta-selected"])

    res = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, tallpack {tallpack.__version__} at {git_state()}",
        "command": command,
        "seed": args.seed,
        "root": str(root),
        "tasks": names,
        "test_size": len(family._task_arrays(family._TASK_SPECS[names[0]], "test", args.seed)[1]),
        "val_size": len(family._task_arrays(family._TASK_SPECS[names[0]], "val", args.seed)[1]),
        "k": K,
        "default_lambda": tallpack.DEFAULT_LAMBDA,
        "lambda_grid": list(tallpack.LAMBDA_GRID),
        "alpha_grid": list(tallpack.ALPHA_GRID),
        "archives": archives,
        "accuracy": acc,
        "normalized": norm,
        "average_test": avg,
        "average_test_normalized": avg_norm,
        "alphas": ev["alphas"],
        "lambda_sweep": sweep,
        "data_free": free,
        "masks": masks,
        "fine_alpha_diagnostic": ev["fine_alpha_diagnostic"],
        "default_alpha": ev["default_alpha"],
        "targets": targets(avg_norm),
        "checks": CHECKS,
        "evaluator_calls": {"val": val.calls, "test": test.calls},
    }
    res["timings_s"] = {"family": t_family, "pack": {n: a["seconds"] for n, a in archives.items()},
                        "evaluate": t_eval, "lambda_sweep": t_sweep}
    res["runtime_s"] = time.perf_counter() - t_start

    figure(res, Path(args.figure))
    md = markdown(res, command)
    (out / "paper_table.json").write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    (out / "paper_table.md").write_text(md + "\n")
    if args.benchmarks_md:
        replace_section(Path(args.benchmarks_md), md)
    print()
    print(md)
    log(f"done in {res['runtime_s']:.1f}s; wrote {out / 'paper_table.json'}, {out / 'paper_table.md'}, {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
