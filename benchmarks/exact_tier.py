"""The exact tier against lossless alternatives, side by side (issue 9).

    python benchmarks/exact_tier.py            # synthetic bf16 and fp32 families + the demo family
    python benchmarks/exact_tier.py --quick    # small families, under 2 minutes
    python benchmarks/exact_tier.py --sizes-only   # archives and BitX only: no ZipNN, zstd-19 or timings

For each family, as a fraction of the checkpoint files' bytes: the archive packed with --exact
(and without, for the lossy tier's own cost), ZipNN on every checkpoint, ``zstd -19 --long`` over
all files concatenated, and a BitX-style baseline (the base and each task's XOR with the base, in
byte planes, zstd-3, as ZipLLM does). Then the exact tier with every merged vector stored
(``--store-merged``, format 1.6: what derived merged vectors save), with every mask stored (format 1.3:
what derived masks save) and, masks stored, coding only against the base (what coding
against the TALL rebuild saves); exact unpack of one task against the lossy unpack, and the lossy
unpack of the exact archive, with and without stored merged vectors and masks (fresh processes,
alternated, medians of 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_family(root: Path, params: float, tasks: int, dtype: torch.dtype, hidden: int = 768):
    """``pack_scale.make_family`` with a chosen width (and an embedding of 8 x width rows), so quick
    runs stay small."""
    from pack_scale import make_family as scale_family

    return scale_family(root, params, tasks, dtype, hidden=hidden, vocab=8 * hidden)


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".json"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as raw element bytes (uint8, itemsize columns)."""
    out = {}
    for f in _files(path):
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).contiguous()
                out[k] = t.reshape(-1).view(torch.uint8).numpy().reshape(-1, t.element_size())
    return out


def _planes_zstd(a: np.ndarray, level: int = 3) -> int:
    c = zstandard.ZstdCompressor(level=level)
    return len(c.compress(np.ascontiguousarray(a.T).tobytes())) if a.size else 0


def bitx(base: Path, tasks: dict[str, Path]) -> int:
    """ZipLLM's BitX: the base, then each task XOR the base (same name, shape, dtype), byte planes, zstd-3;
    tensors without a base counterpart are coded alone the same way."""
    b = _tensors(base)
    total = sum(_planes_zstd(v) for v in b.values())
    for t in tasks.values():
        for k, v in _tensors(t).items():
            ref = b.get(k)
            total += _planes_zstd(v ^ ref if ref is not None and ref.shape == v.shape else v)
    return total


def zipnn_bytes(files: list[Path], dtype: str) -> int:
    from zipnn import ZipNN

    z = ZipNN(bytearray_dtype=dtype, threads=2)
    return sum(len(z.compress(p.read_bytes())) for p in files)


def zstd19_long(files: list[Path]) -> tuple[int, float]:
    t0 = time.perf_counter()
    cat = subprocess.Popen(["cat", *map(str, files)], stdout=subprocess.PIPE)
    out = subprocess.run(["zstd", "-19", "--long=27", "-T2", "-c", "-q"], stdin=cat.stdout, capture_output=True,
                         check=True)
    cat.wait()
    return len(out.stdout), time.perf_counter() - t0


def pack(base: Path, tasks: dict[str, Path], out: Path, exact: bool, candidates=None, level: int = 3,
         masks: str = "choose", merged: str = "derive", codecs=None) -> float:
    """Pack in a fresh process; ``masks`` and ``merged`` are the exact tier's policies
    (``exact.MASK_POLICY``, ``exact.MERGED_POLICY``: "store" is ``--store-merged``), ``codecs`` the
    residual codecs the writer may choose (``exact.RESIDUAL_CODECS``; ``["planes"]``: format 1.8's)."""
    code = ("import json,sys,time,tallpack\nfrom tallpack.encodings import exact as ex\n"
            "a=json.loads(sys.argv[1])\n"
            "if a['cand']: ex.CANDIDATES=tuple(a['cand'])\n"
            "if a['codecs']: ex.RESIDUAL_CODECS=tuple(a['codecs'])\n"
            "ex.MASK_POLICY=a['masks']\nex.MERGED_POLICY=a['merged']\n"
            "t=time.perf_counter();tallpack.pack(a['base'],a['tasks'],a['out'],exact=a['exact'],level=a['level'],overwrite=True)\n"
            "print(time.perf_counter()-t)")
    arg = json.dumps({"base": str(base), "tasks": {k: str(v) for k, v in tasks.items()}, "out": str(out),
                      "exact": exact, "cand": candidates, "level": level, "masks": masks,
                      "merged": merged, "codecs": codecs})
    r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def unpack_seconds(archive: Path, task: str, out: Path, exact: bool, original: Path | None = None) -> float:
    """One task's unpack in a fresh process; with ``original``, the file written must be its bytes."""
    code = ("import json,sys,time,tallpack\nt=time.perf_counter()\n"
            "with tallpack.open(sys.argv[1]) as f: p=tallpack.write_task(f,sys.argv[2],sys.argv[3],exact=sys.argv[4]=='1')\n"
            "print(json.dumps([time.perf_counter()-t,str(p)]))")
    r = subprocess.run([sys.executable, "-c", code, str(archive), task, str(out), "1" if exact else "0"],
                       capture_output=True, text=True, check=True)
    seconds, written = json.loads(r.stdout.strip().splitlines()[-1])
    if original is not None and Path(written).read_bytes() != original.read_bytes():
        raise SystemExit(f"exact unpack of {task} from {archive} wrote {written}, not the bytes of {original}")
    return seconds


def residual_stats(archive: Path) -> dict:
    import tallpack

    by_ref: dict[str, int] = {}
    by_tr: dict[str, int] = {}
    by_enc: dict[str, int] = {}
    by_codec: dict[str, int] = {}
    stored = masks = 0
    with tallpack.open(archive) as fam:
        for e in fam.manifest.tensors:
            for tt in e.tasks.values():
                ex = tt.extras.get("exact")
                if "mask" in tt.arrays:
                    masks += tt.arrays["mask"].stored_nbytes
                if ex is None:
                    continue
                n = ex.residual.stored_nbytes
                stored += n
                by_ref[ex.reference] = by_ref.get(ex.reference, 0) + n
                by_tr[ex.transform] = by_tr.get(ex.transform, 0) + n
                codec = "+".join(c["id"] for c in ex.residual.codecs)
                by_codec[codec] = by_codec.get(codec, 0) + n
                by_enc[tt.encoding] = by_enc.get(tt.encoding, 0) + 1
    return {"residual_bytes": stored, "mask_bytes": masks, "by_reference": by_ref, "by_transform": by_tr,
            "entries_by_encoding": by_enc, "by_codec": by_codec}


def measure(name: str, base: Path, tasks: dict[str, Path], dtype: str, root: Path, sizes_only: bool = False) -> dict:
    files = [f for p in (base, *tasks.values()) for f in _files(p)]
    raw = sum(f.stat().st_size for f in files)
    res: dict = {"family": name, "dtype": dtype, "tasks": len(tasks), "checkpoint_bytes": raw}
    ex, lossy, based = root / f"{name}.exact.tallpack", root / f"{name}.tallpack", root / f"{name}.base.tallpack"
    stored = root / f"{name}.stored.tallpack"
    stored_merged = root / f"{name}.stored-merged.tallpack"
    res["pack_exact_seconds"] = pack(base, tasks, ex, True)
    planes = root / f"{name}.planes.tallpack"
    res["pack_planes_only_seconds"] = pack(base, tasks, planes, True, codecs=["planes"])
    res["exact_planes_only_bytes"] = planes.stat().st_size
    res["planes_only_residual_bytes"] = residual_stats(planes)["residual_bytes"]
    res["pack_stored_merged_seconds"] = pack(base, tasks, stored_merged, True, merged="store")
    res["pack_lossy_seconds"] = pack(base, tasks, lossy, False)
    res["pack_stored_masks_seconds"] = pack(base, tasks, stored, True, masks="store")
    pack(base, tasks, based, True, candidates=["base", "zero"], masks="store")
    res["exact_bytes"] = ex.stat().st_size
    res["lossy_bytes"] = lossy.stat().st_size
    res["exact_stored_masks_bytes"] = stored.stat().st_size
    res["exact_stored_merged_bytes"] = stored_merged.stat().st_size
    res["stored_merged_entries_by_encoding"] = residual_stats(stored_merged)["entries_by_encoding"]
    res["exact_base_only_bytes"] = based.stat().st_size
    res |= residual_stats(ex)
    st = residual_stats(stored)
    res["stored_masks_residual_bytes"], res["stored_masks_mask_bytes"] = st["residual_bytes"], st["mask_bytes"]
    res["stored_masks_by_reference"] = st["by_reference"]
    res["base_only_residual_bytes"] = residual_stats(based)["residual_bytes"]
    res["bitx_bytes"] = bitx(base, tasks)
    if not sizes_only:
        _alternatives_and_times(res, files, dtype, tasks, root, lossy, ex, stored_merged, stored)
    res["bitsplit_saves"] = 1 - res["exact_bytes"] / res["exact_planes_only_bytes"]
    res["bitsplit_saves_residuals"] = 1 - res["residual_bytes"] / res["planes_only_residual_bytes"]
    res["planes_only_vs_bitx"] = res["exact_planes_only_bytes"] / res["bitx_bytes"]
    for k in ("exact", "lossy", "exact_stored_masks", "exact_stored_merged", "zipnn", "zstd19_long", "bitx"):
        if f"{k}_bytes" in res:
            res[f"{k}_fraction"] = res[f"{k}_bytes"] / raw
    res["exact_vs_bitx"] = res["exact_bytes"] / res["bitx_bytes"]
    res["stored_masks_vs_bitx"] = res["exact_stored_masks_bytes"] / res["bitx_bytes"]
    res["stored_merged_vs_bitx"] = res["exact_stored_merged_bytes"] / res["bitx_bytes"]
    res["derived_merged_save"] = 1 - res["exact_bytes"] / res["exact_stored_merged_bytes"]
    res["derived_masks_save"] = 1 - res["exact_bytes"] / res["exact_stored_masks_bytes"]
    # residuals against the TALL rebuild (where the writer chose it, masks stored) against the base alone
    res["tall_saves_vs_base_only"] = 1 - res["stored_masks_residual_bytes"] / res["base_only_residual_bytes"]
    print(json.dumps(res), flush=True)
    return res


def _alternatives_and_times(res: dict, files: list[Path], dtype: str, tasks: dict[str, Path], root: Path,
                            lossy: Path, ex: Path, stored_merged: Path, stored: Path) -> None:
    """ZipNN and ``zstd -19 --long`` on the same files, and the unpack timings, into ``res``."""
    res["zipnn_bytes"] = zipnn_bytes(files, dtype)
    res["zstd19_long_bytes"], res["zstd19_seconds"] = zstd19_long(files)
    task = next(iter(tasks))
    t_exact, t_lossy, t_lossy_ex, t_lossy_sm, t_lossy_st = [], [], [], [], []
    original = tasks[task] if tasks[task].is_file() else None  # (a folder's files: checked by the library)
    runs = [lambda i: t_lossy.append(unpack_seconds(lossy, task, root / f"l{i}", False)),
            lambda i: t_exact.append(unpack_seconds(ex, task, root / f"e{i}", True, original)),
            lambda i: t_lossy_ex.append(unpack_seconds(ex, task, root / f"x{i}", False)),
            lambda i: t_lossy_sm.append(unpack_seconds(stored_merged, task, root / f"m{i}", False)),
            lambda i: t_lossy_st.append(unpack_seconds(stored, task, root / f"s{i}", False))]
    for i in range(3):  # the order turned every round, so no side always runs first
        for run in runs[i % len(runs):] + runs[: i % len(runs)]:
            run(i)
    res["unpack_lossy_seconds"], res["unpack_exact_seconds"] = statistics.median(t_lossy), statistics.median(t_exact)
    res["unpack_lossy_of_exact_archive_seconds"] = statistics.median(t_lossy_ex)
    res["unpack_lossy_of_stored_merged_archive_seconds"] = statistics.median(t_lossy_sm)
    res["unpack_lossy_of_stored_masks_archive_seconds"] = statistics.median(t_lossy_st)
    res["exact_vs_zipnn"] = res["exact_bytes"] / res["zipnn_bytes"]
    res["exact_vs_zstd19"] = res["exact_bytes"] / res["zstd19_long_bytes"]
    res["exact_unpack_vs_lossy"] = res["unpack_exact_seconds"] / res["unpack_lossy_seconds"]
    res["stored_merged_vs_zipnn"] = res["exact_stored_merged_bytes"] / res["zipnn_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes-only", action="store_true", help="archives and BitX only (no ZipNN, zstd-19, timings)")
    ap.add_argument("--params", type=float, default=None)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--demo", default=".tallpack-demo/family", help="demo family folder (built when absent)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args()
    params = a.params or (1.5e6 if a.quick else 20e6)  # quick: ~2M parameters a file
    ntasks = a.tasks or (4 if a.quick else 8)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        for dtype in ("bfloat16", "float32"):
            root = Path(tmp) / dtype
            root.mkdir()
            p = params if dtype == "bfloat16" else params / 2  # the same file bytes for both
            base, tasks, _ = make_family(root, p, ntasks, getattr(torch, dtype), 256 if a.quick else 768)
            results.append(measure(f"synthetic-{dtype}", base, tasks, dtype, root, a.sizes_only))
        if not a.quick:
            from tallpack.demo.family import build_family

            fam = build_family(a.demo)
            root = Path(tmp) / "demo"
            root.mkdir()
            results.append(measure("demo", fam.base, dict(fam.tasks), "float32", root, a.sizes_only))
    (a.out / ("exact_tier.sizes.json" if a.sizes_only else "exact_tier.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
