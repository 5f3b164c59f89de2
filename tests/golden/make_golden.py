"""Build the golden archives (formats 1.0 to 1.14) from fixed, seeded tensors.

    python tests/golden/make_golden.py [NAME ...]     # all, or only the named ones

writes, beside this script:

* ``v1_0_ta.tallpack``: merge "ta", codec "bytegroup-zstd", chunk_elements 64;
* ``v1_0_ties_raw.tallpack``: merge "ties" (top_k 0.3), codec "raw", chunk_elements 64, base-only kept;
* ``v1_1_ta_zstd.tallpack`` (format 1.1): xxh3-64 chunk checksums, merge "ta", codec "zstd";
* ``v1_3_planes.tallpack`` (format 1.3): the ``planes`` codec;
* ``v1_4_files.tallpack`` (format 1.4): packed from model folders, so it keeps their other files
  (``config.json`` per task, one ``tokenizer.json`` shared by all, stored once); the expected
  file's metadata key ``"files"`` holds ``{task: {name: text}}``;
* ``v1_5_correction.tallpack`` (format 1.5): the fidelity dial at 0.99 with sparse and quantized
  corrections of the TALL residual;
* ``v1_7_qtau.tallpack`` (format 1.7): the fidelity dial at 0.98 with ``qtau`` entries (a task's
  own quantized task vector, no mask) and tensors without a merged vector;
* ``v1_2_exact.tallpack`` (format 1.2): the exact tier, merge "ta"; with
  ``v1_2_exact.originals.safetensors``, the inputs' tensors (the originals) under ``"<task>/<tensor>"``;
* ``v1_6_derived.tallpack`` (format 1.6): the exact tier with derived masks (``tall-derived``
  entries beside ``tall`` ones), and ``v1_6_derived.originals.safetensors``;
* ``v1_8_derived_merged.tallpack`` (format 1.8): the exact tier of a TIES family whose merged
  vectors and counts are derived from the originals (``tall-derived-merged`` tensors), and
  ``v1_8_derived_merged.originals.safetensors``;
* ``v1_9_bitsplit.tallpack`` (format 1.9): the exact tier with residuals in the ``bitsplit`` codec
  (chunks of 256 elements, so blocks of heads are zstd frames; dense arrays ``bytegroup-zstd``, so
  the archive stays 1.9), and
  ``v1_9_bitsplit.originals.safetensors``; the earlier exact goldens are packed with ``planes``
  residuals only (``residual_codecs``), as they were written;
* ``v1_11_planes_exp.tallpack`` (format 1.11): the ``planes-exp`` codec for float32 and bfloat16
  arrays, ``planes`` for float16; the chunks take the rotations 1 to 7 in turn (the writer's choice
  is free: 64-element chunks are too small for its estimate to pick more than 1), so the reader is
  checked on each;
* ``v1_12_groups.tallpack`` (format 1.12): tensor groups (spec §3.7), merge "ta", codec "planes";
  the family has the small tensors of ``block.1`` and ``block.2`` too (``blocks=3``), so there is
  a group of float32, one of bfloat16 and one of float16 tensors (a 0-d member among them), each
  over several 64-element chunks with members across chunk boundaries; ``mixed.weight`` (float16
  tasks of a float32 base) stays alone;
* ``v1_12_groups_ties_raw.tallpack`` (format 1.12): the same layout with merge "ties" (top_k 0.3),
  codec "raw", crc32 and base-only kept;
* ``v1_13_shared_base.tallpack`` (format 1.13): ``shared`` entries with ``base`` (spec §6.1.3):
  the tensors of ``SHIFTED`` (float32, bfloat16, float16, and one float32 in the base and float16
  in the tasks), which every task changes to one value, so merged models build them from the base;
  merge "ta" with lambdas 0.5, 0.3 and 0.6 (masks of ``|tau| > lambda * |3 tau - tau|``: at the
  edge, all set and none set), codec "planes", grouped (the entries with ``base`` stay alone);
* ``v1_13_shared_base_ties.tallpack`` (format 1.13): the same with merge "ties" (top_k 0.3), codec
  "raw", crc32 and base-only kept;
* ``v1_14_aliases.tallpack`` (format 1.14): tied weights (spec §3.8), the base and the first task
  given as ``.pt`` files, the others as state dicts, every one tying the names of ``TIED``, so they
  are stored as aliases of targets that are a merged tensor alone (``mixed.weight``), a member of a
  merged group (``embed.weight``) and a member of a shared group (``frozen.weight``); the first
  task alone also ties ``TIED_FIRST``, which is stored as two tensors (blocks=3, merge "ta",
  codec "planes", paths left out of the manifest so that the bytes do not depend on them);
* ``v1_14_aliases_exact.tallpack`` (format 1.14): the same layout of tied weights with the exact
  tier (two tasks), and ``v1_14_aliases_exact.originals.safetensors``: an alias's original bits
  are its target's;
* ``<name>.expected.safetensors`` for each: every task's reconstructed state dict under the keys
  ``"<task>/<tensor>"``; the metadata key ``"order"`` holds, as JSON, ``{task: [tensor names]}`` in
  the order ``state_dict(task)`` returns them (safetensors itself does not keep an order); an
  alias is stored there as a copy of its target (safetensors does not share tensors).

The golden files are committed; ``tests/test_golden.py`` reads them back. Rerun this script only
when the format deliberately changes (then bump the file names with the version), and only for the
new archive: since 1.11 the ``planes`` preset writes ``planes-exp`` for float32 and bfloat16, so the
older ``planes`` archives (1.3 to 1.8) would come out as 1.11; and since 1.12 the writer groups
small tensors by default, so the goldens before 1.12 that it would group are packed with
``group=False`` (as they were written). The expected
values are checked here against an independent recomputation from the inputs wherever the spec
defines them from the inputs alone (dense and shared tensors, and TALL tensors for Task Arithmetic).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import tallpack
from tallpack.codecs import ExponentPlanes
from tallpack.encodings import exact as exact_mod

HERE = Path(__file__).resolve().parent
CHUNK = 64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype)


def _finetune(t: torch.Tensor, g: torch.Generator, scale: float) -> torch.Tensor:
    """``t`` plus a sparse-ish float32 perturbation, cast back to ``t``'s dtype."""
    noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
    keep = torch.rand(t.shape, generator=g) < 0.6
    return (t.to(torch.float32) + noise * keep).to(t.dtype)


#: The small tensors of ``block.1`` and ``block.2`` (``family(blocks=3)``): a bfloat16 weight, a
#: float16 bias and a float32 norm each, so that a grouped archive (1.12) has groups of all three,
#: and a float32 tensor no task changes, which joins ``frozen.weight`` in a group of shared tensors.
BLOCK_SHAPES = {1: {"weight": (5, 13), "bias": (30,), "norm": (45,), "frozen": (9,)},
                2: {"weight": (7, 11), "bias": (3, 11), "norm": (2, 3, 4), "frozen": (4, 5)}}
BLOCK_DTYPES = {"weight": torch.bfloat16, "bias": torch.float16, "norm": torch.float32, "frozen": torch.float32}


#: Tensors every task changes to one value (1.13): fine-tunes of one intermediate checkpoint that kept
#: these layers frozen; ``shifted.mixed`` is float32 in the base and float16 in the tasks.
SHIFTED = {"shifted.0.weight": ((6, 11), torch.float32, torch.float32),
           "shifted.1.weight": ((40,), torch.bfloat16, torch.bfloat16),
           "shifted.2.bias": ((70,), torch.float16, torch.float16),
           "shifted.mixed": ((3, 5), torch.float32, torch.float16)}

#: Tied weights (1.14): alias -> target, one tensor in the base and in every task.
TIED = {"frozen.tied": "frozen.weight", "mixed.tied": "mixed.weight", "lm_head.weight": "embed.weight"}
#: Tied in the first task only (it ties the names, the base and the other tasks do not): stored apart.
TIED_FIRST = ("block.0.bias.copy", "block.0.bias")


def family(seed: int, tasks: list[str], head_rows: dict[str, int], blocks: int = 1, shifted: bool = False,
           tied: bool = False):
    """A base and its fine-tunes covering every tensor class and the common dtypes; with
    ``blocks`` > 1, the small tensors of blocks 1 to ``blocks - 1`` follow ``block.0``'s; with
    ``shifted``, the tensors of ``SHIFTED`` follow them, at one value in every task that is not the
    base's; with ``tied``, the names of ``TIED`` (and ``TIED_FIRST``) come last, tied as they say."""
    g = _gen(seed)
    base = {
        "embed.weight": _randn((12, 10), g),                      # float32, 2 chunks
        "block.0.weight": _randn((9, 16), g, torch.bfloat16, 0.02),  # bfloat16, 3 chunks
        "block.0.bias": _randn((70,), g, torch.float16, 0.1),     # float16, 2 chunks
        "block.0.scale": torch.tensor(1.5),                       # 0-d float32
        "mixed.weight": _randn((5, 13), g),                       # base float32, tasks float16
        "position_ids": torch.arange(20, dtype=torch.int64),      # int64 buffer, equal everywhere
        "frozen.weight": _randn((16,), g),                        # equal in every task: shared
        "empty.weight": torch.zeros((0, 4)),                      # empty
        "head.weight": _randn((4, 10), g),                        # tasks change the shape: task-own
        "base_only.weight": _randn((3, 3), g),                    # in no task
    }
    base["embed.weight"][0, 0] = 0.0
    base["embed.weight"][0, 1] = -0.0
    if blocks > 1:
        more = {f"block.{i}.{k}": _randn(shape, g, BLOCK_DTYPES[k], 0.1)
                for i in range(1, blocks) for k, shape in BLOCK_SHAPES[i].items()}
        names, every = list(base), base | more
        at = names.index("block.0.scale") + 1
        base = {k: every[k] for k in names[:at] + list(more) + names[at:]}
    moved = {}
    if shifted:
        gs = _gen(seed * 1000)
        for k, (shape, dt, task_dt) in SHIFTED.items():
            base[k] = _randn(shape, gs, dt, 0.1)
            moved[k] = _finetune(base[k], gs, 0.05).to(task_dt)
        base["shifted.0.weight"][0, 0] = 0.0
        moved["shifted.0.weight"][0, 0] = -0.0  # tau = -0.0 - 0.0 = -0.0: bits differ, values equal
    fts = {}
    for i, t in enumerate(tasks):
        gt = _gen(seed * 100 + i + 1)
        ft = {}
        for name, x in base.items():
            if name == "base_only.weight":
                continue
            if name in ("position_ids", "frozen.weight", "empty.weight") or name.endswith(".frozen"):
                ft[name] = x.clone()
            elif name in moved:
                ft[name] = moved[name].clone()
            elif name == "head.weight":
                ft[name] = _randn((head_rows[t], 10), gt)
            elif name == "mixed.weight":
                ft[name] = _finetune(x, gt, 0.05).to(torch.float16)
            else:
                ft[name] = _finetune(x, gt, 0.05)
        if i == 0:
            ft["extra.bias"] = _randn((7,), gt)  # only the first task has it: task-own
        # Two pinned elements of embed.weight (base 0.0 and -0.0):
        # [0, 0]: task values 1, 2, 0 give tau_MTL = 3 and, for the first task with lambda 0.5,
        #         |tau| = 1 == 0.5 * |3 - 1|: the strict ">" leaves the mask bit unset;
        # [0, 1]: -0.0 everywhere: the mask is 0 and -0.0 + 0 * 0.0 rebuilds +0.0 (IEEE).
        ft["embed.weight"][0, 0] = float([1, 2, 0][i])
        ft["embed.weight"][0, 1] = -0.0
        fts[t] = ft
    if tied:
        copy, of = TIED_FIRST
        for i, sd in enumerate([base, *fts.values()]):
            sd.update((alias, sd[target]) for alias, target in TIED.items())
            sd[copy] = sd[of] if i == 1 else sd[of].clone()
    return base, fts


ARCHIVES = {
    "v1_0_ta": dict(seed=1, tasks=["cars", "dtd", "eurosat"],
                    head_rows={"cars": 3, "dtd": 5, "eurosat": 2},
                    pack=dict(merge="ta", codec="bytegroup-zstd", checksum="crc32",
                              lambdas={"cars": 0.5, "dtd": 0.3, "eurosat": 0.4}, group=False)),
    "v1_0_ties_raw": dict(seed=2, tasks=["mnist", "svhn", "gtsrb"],
                          head_rows={"mnist": 10, "svhn": 10, "gtsrb": 4},
                          pack=dict(merge={"method": "ties", "top_k": 0.3}, codec="raw", checksum="crc32",
                                    lambdas={"mnist": 0.3, "svhn": 0.5, "gtsrb": 0.6},
                                    keep_base_only=True, group=False)),
    "v1_1_ta_zstd": dict(seed=3, tasks=["cola", "sst2"], head_rows={"cola": 2, "sst2": 2},
                         pack=dict(merge="ta", codec="zstd", checksum="xxh3-64", lambdas=0.4, group=False)),
    "v1_2_exact": dict(seed=4, tasks=["qnli", "rte", "mrpc"], head_rows={"qnli": 2, "rte": 2, "mrpc": 3},
                       residual_codecs=("planes",),
                       pack=dict(merge="ta", codec="bytegroup-zstd", checksum="xxh3-64", lambdas=0.4, exact=True)),
    "v1_6_derived": dict(seed=7, tasks=["wnli", "stsb", "qqp"], head_rows={"wnli": 2, "stsb": 1, "qqp": 2},
                         residual_codecs=("planes",),
                         pack=dict(merge="ta", codec="planes", checksum="xxh3-64",
                                   lambdas={"wnli": 0.5, "stsb": 0.3, "qqp": 0.4}, exact=True,
                                   derive_merged=False)),
    "v1_8_derived_merged": dict(seed=8, tasks=["rte2", "cb", "wic"], head_rows={"rte2": 2, "cb": 3, "wic": 2},
                                residual_codecs=("planes",),
                                pack=dict(merge={"method": "ties", "top_k": 0.4}, codec="planes", checksum="xxh3-64",
                                          lambdas={"rte2": 0.5, "cb": 0.3, "wic": 0.4}, exact=True)),
    "v1_9_bitsplit": dict(seed=9, tasks=["boolq2", "axb", "axg"], head_rows={"boolq2": 2, "axb": 2, "axg": 3},
                          chunk=256, pack=dict(merge="ta", codec="bytegroup-zstd", checksum="xxh3-64",
                                               lambdas={"boolq2": 0.5, "axb": 0.3, "axg": 0.4}, exact=True)),
    "v1_3_planes": dict(seed=5, tasks=["boolq", "copa"], head_rows={"boolq": 2, "copa": 2},
                        pack=dict(merge="ta", codec="planes", checksum="xxh3-64", lambdas=0.4, group=False)),
    "v1_4_files": dict(seed=6, tasks=["squad", "mnli"], head_rows={"squad": 2, "mnli": 3}, folders=True,
                       pack=dict(merge="ta", codec="planes", checksum="xxh3-64", lambdas=0.4, group=False)),
    "v1_5_correction": dict(seed=7, tasks=["arc", "piqa", "hella"], head_rows={"arc": 2, "piqa": 2, "hella": 4},
                            pack=dict(merge="ta", codec="planes", checksum="xxh3-64", lambdas=0.4, fidelity=0.99,
                                      corrections=("sparse", "quant4", "quant8"))),
    "v1_7_qtau": dict(seed=7, tasks=["arc", "piqa", "hella"], head_rows={"arc": 2, "piqa": 2, "hella": 4},
                      pack=dict(merge="ta", codec="planes", checksum="xxh3-64", lambdas=0.4, fidelity=0.98)),
    "v1_11_planes_exp": dict(seed=11, tasks=["race", "swag"], head_rows={"race": 2, "swag": 3}, every_rotation=True,
                             pack=dict(merge="ta", codec="planes", checksum="xxh3-64", lambdas=0.4, level=19,
                                       group=False)),
    "v1_12_groups": dict(seed=12, tasks=["wsc", "copa2", "multirc"], head_rows={"wsc": 2, "copa2": 2, "multirc": 3},
                         blocks=3, pack=dict(merge="ta", codec="planes", checksum="xxh3-64",
                                             lambdas={"wsc": 0.5, "copa2": 0.3, "multirc": 0.4})),
    "v1_12_groups_ties_raw": dict(seed=13, tasks=["record", "anli", "boolq3"],
                                  head_rows={"record": 2, "anli": 3, "boolq3": 2}, blocks=3,
                                  pack=dict(merge={"method": "ties", "top_k": 0.3}, codec="raw", checksum="crc32",
                                            lambdas={"record": 0.3, "anli": 0.5, "boolq3": 0.6},
                                            keep_base_only=True)),
    "v1_13_shared_base": dict(seed=14, tasks=["sciq", "obqa", "arc_e"], head_rows={"sciq": 2, "obqa": 4, "arc_e": 3},
                              shifted=True, pack=dict(merge="ta", codec="planes", checksum="xxh3-64",
                                                      lambdas={"sciq": 0.5, "obqa": 0.3, "arc_e": 0.6})),
    "v1_13_shared_base_ties": dict(seed=15, tasks=["siqa", "csqa", "arc_c"],
                                   head_rows={"siqa": 3, "csqa": 5, "arc_c": 4}, shifted=True,
                                   pack=dict(merge={"method": "ties", "top_k": 0.3}, codec="raw", checksum="crc32",
                                             lambdas={"siqa": 0.3, "csqa": 0.5, "arc_c": 0.6},
                                             keep_base_only=True)),
    "v1_14_aliases": dict(seed=16, tasks=["lambada", "wikitext", "ptb"],
                          head_rows={"lambada": 2, "wikitext": 2, "ptb": 3}, blocks=3, tied=True,
                          pt=("base", "lambada"),
                          pack=dict(merge="ta", codec="planes", checksum="xxh3-64",
                                    lambdas={"lambada": 0.5, "wikitext": 0.3, "ptb": 0.4}, record_paths=False)),
    "v1_14_aliases_exact": dict(seed=17, tasks=["hellaswag", "winogrande"],
                                head_rows={"hellaswag": 2, "winogrande": 3}, blocks=3, tied=True,
                                pt=("base", "hellaswag"),
                                pack=dict(merge="ta", codec="planes", checksum="xxh3-64",
                                          lambdas={"hellaswag": 0.4, "winogrande": 0.3}, exact=True,
                                          record_paths=False)),
}


def _check_against_inputs(name: str, base, fts, got: dict[str, dict[str, torch.Tensor]], manifest) -> None:
    """Cross-check what the reader rebuilt against the inputs, independently of the reader."""
    entries = holders(manifest)
    entries |= {a: entries[t] for a, t in manifest.aliases.items()}  # 1.14: an alias is its target
    kinds = {k: e.kind for k, e in entries.items()}
    for task, sd in got.items():
        # a dict keeps its order; a safetensors file has its own (the reader keeps the file's)
        same = list(sd) == list(fts[task]) if not ARCHIVES[name].get("folders") else sorted(sd) == sorted(fts[task])
        assert same, (task, list(sd))
        for k, v in sd.items():
            orig = fts[task][k]
            assert v.dtype == orig.dtype and v.shape == orig.shape, (task, k)
            tt = entries[k].tasks[task]
            if kinds[k] != "merged":
                assert torch.equal(v, orig), (name, task, k)
            elif tt.encoding != "tall" or "correction" in tt.extras:
                continue  # the dial's choices (1.5, 1.7): the spec-only reader checks them
            elif manifest.merge["method"] == "ta":
                # tau_t in float32, tau_MTL = +0.0 + tau_1 + tau_2 + ... in task order, strict mask
                b32 = base[k].to(torch.float32)
                taus = [fts[t][k].to(torch.float32) - b32 for t in fts]
                mtl = torch.zeros_like(b32)
                for tau in taus:
                    mtl = mtl + tau
                tau_t = fts[task][k].to(torch.float32) - b32
                lam = torch.tensor(next(i.lam for i in manifest.tasks if i.name == task), dtype=torch.float32)
                m = tau_t.abs() > lam * (mtl - tau_t).abs()
                want = (b32 + m.to(torch.float32) * mtl).to(orig.dtype)
                assert torch.equal(v, want), (name, task, k)
                if k == "embed.weight" and task == "cars":
                    assert not m[0, 0] and v[0, 0] == 0.0  # strict ">": equality leaves the bit unset
                    assert str(v[0, 1].item()) == "0.0"  # +0.0 from a -0.0 base


def holders(manifest) -> dict:
    """Each tensor name's entry: its own, or (format 1.12) that of the group it is a member of."""
    out = {e.name: e for e in manifest.tensors if not e.members}
    out |= {m.name: e for e in manifest.tensors for m in e.members}
    return out


def folder_files(task: str) -> dict[str, str]:
    """The other files of a golden model folder: its own config, and a tokenizer every task shares."""
    return {"config.json": json.dumps({"model_type": "golden", "task": task}) + "\n",
            "tokenizer.json": json.dumps({"vocab": ["<pad>", "a", "b"]}) + "\n"}


def as_folders(base: dict, fts: dict, root: Path) -> tuple[Path, dict[str, Path]]:
    """Write the family as model folders (``model.safetensors`` and :func:`folder_files`)."""
    paths = {}
    for name, sd in {"base": base, **fts}.items():
        folder = root / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        for fname, text in folder_files(name).items():
            (folder / fname).write_text(text)
        paths[name] = folder
    return paths.pop("base"), paths


def as_pt(base: dict, fts: dict, which: tuple[str, ...], root: Path) -> tuple[object, dict[str, object]]:
    """The family with the checkpoints ``which`` names (``"base"`` or a task) written as ``.pt``
    files under ``root`` (``torch.save``: a storage held under several names is saved once); the
    others stay state dicts."""
    out = {}
    for name, sd in {"base": base, **fts}.items():
        if name in which:
            path = root / f"{name}.pt"
            torch.save(sd, path)
            out[name] = path
        else:
            out[name] = sd
    return out.pop("base"), out


def inputs(name: str) -> tuple[dict, dict]:
    """Golden archive ``name``'s inputs: the base and the tasks' state dicts."""
    spec = ARCHIVES[name]
    return family(spec["seed"], spec["tasks"], spec["head_rows"], spec.get("blocks", 1),
                  shifted=spec.get("shifted", False), tied=spec.get("tied", False))


def pack_inputs(name: str, out: Path, tmp: Path):
    """Pack golden archive ``name`` to ``out`` from its inputs (folders under ``tmp`` when the
    archive keeps folder files); returns the manifest and the inputs as tensors."""
    spec = ARCHIVES[name]
    base, fts = inputs(name)
    base_in, fts_in = as_folders(base, fts, tmp) if spec.get("folders") else (base, fts)
    if spec.get("pt"):  # these as .pt files, which keep tied weights tied (one storage)
        base_in, fts_in = as_pt(base, fts, spec["pt"], tmp)
    choose, saved = ExponentPlanes._choose, exact_mod.RESIDUAL_CODECS
    if spec.get("every_rotation"):
        turn = iter(range(1 << 30))
        ExponentPlanes._choose = lambda self, lo, hi: 1 + next(turn) % 7
    exact_mod.RESIDUAL_CODECS = spec.get("residual_codecs", saved)
    try:
        manifest = tallpack.pack(base_in, fts_in, out, chunk_elements=spec.get("chunk", CHUNK), threads=1,
                                 overwrite=True, metadata={"golden": name}, **spec["pack"])
    finally:
        ExponentPlanes._choose, exact_mod.RESIDUAL_CODECS = choose, saved
    return manifest, base, fts


def build(name: str, spec: dict) -> None:
    path = HERE / f"{name}.tallpack"
    with tempfile.TemporaryDirectory() as tmp:
        manifest, base, fts = pack_inputs(name, path, Path(tmp))
    expected: dict[str, torch.Tensor] = {}
    order: dict[str, list[str]] = {}
    with tallpack.open(path) as fam:
        got = {t: fam.state_dict(t) for t in fam.tasks}
    _check_against_inputs(name, base, fts, got, manifest)
    for task, sd in got.items():
        order[task] = list(sd)
        for k, v in sd.items():
            target = manifest.aliases.get(k)
            if target is not None:  # 1.14: the target's tensor itself; safetensors wants a copy
                assert v is sd[target], (task, k)
                v = v.clone()
            expected[f"{task}/{k}"] = v.contiguous()
    meta = {"order": json.dumps(order)}
    if spec.get("folders"):
        meta["files"] = json.dumps({t: folder_files(t) for t in fts})
    save_file(expected, str(HERE / f"{name}.expected.safetensors"), metadata=meta)
    if spec["pack"].get("exact"):
        # (a tied weight's names are one tensor: safetensors wants copies)
        originals = {f"{t}/{k}": v.contiguous().clone() for t, sd in fts.items() for k, v in sd.items()}
        with tallpack.open(path) as fam:
            for key, v in originals.items():
                t, k = key.split("/", 1)
                got = fam.get_tensor(t, k, exact=True)
                assert got.dtype == v.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                            v.reshape(-1).view(torch.uint8)), key
        save_file(originals, str(HERE / f"{name}.originals.safetensors"))
        (HERE / f"{name}.originals.safetensors").chmod(0o644)
    for p in (path, HERE / f"{name}.expected.safetensors"):
        p.chmod(0o644)
    print(f"{path.name}: {path.stat().st_size} bytes; "
          f"{name}.expected.safetensors: {(HERE / f'{name}.expected.safetensors').stat().st_size} bytes")


def main() -> None:
    import sys

    for name, spec in ARCHIVES.items():
        if len(sys.argv) < 2 or name in sys.argv[1:]:
            build(name, spec)


if __name__ == "__main__":
    main()
