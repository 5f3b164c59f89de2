"""Pack a synthetic family of a few hundred MB (codecs raw, bytegroup-zstd and the default planes)
and compare, in the same run, with the alternatives:
the checkpoints as they are (safetensors), each checkpoint compressed with zstd-3, and
loading one member with safetensors' own load_file.

    python benchmarks/pack_scale.py [--params 40e6] [--tasks 4] [--dtype float32|bfloat16]

Reports ratios (sizes are exact; times are ratios measured side by side on a shared machine)
and the packer's peak memory against the largest tensor times the number of tasks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent

#: The start of a fresh process's code (merge_memory.py's and pack_memory.py's children):
#: ``measured(work)`` runs ``work()`` while a thread samples RssAnon every 2 ms (the mapped
#: archive's and inputs' pages are not counted) and prints its peak over the RssAnon before it,
#: the seconds it took and the tallpack imported (the checkout meant, not another).
SAMPLER = """
import gc, json, sys, threading, time, torch, tallpack
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
def measured(work):
    gc.collect(); before = anon(); peak = [before]; done = []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    th = threading.Thread(target=sample, daemon=True); th.start()
    t0 = time.perf_counter()
    try:
        work()
    finally:  # (a failed work ends the sampler too: the child exits with its traceback)
        dt = time.perf_counter() - t0
        done.append(1); th.join()
    print(json.dumps({"grown": peak[0] - before, "seconds": dt, "file": tallpack.__file__}))
"""


def memory_options(doc: str, params: float, *, shape: bool = False, vocab: int = 32000,
                   more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """merge_memory.py's, pack_memory.py's and commands_memory.py's options: the family's
    (``--params``, ``--tasks``, ``--dtype``; with ``shape``, ``--hidden`` and ``--vocab``),
    ``--rounds``, ``--other``, and what ``more`` adds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=params)
    if shape:
        ap.add_argument("--hidden", type=int, default=2048)
        ap.add_argument("--vocab", type=int, default=vocab)
    if more is not None:
        more(ap)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other", type=lambda s: Path(s).resolve(), help="another checkout (built in place)")
    return ap.parse_args()


@contextmanager
def made_family(a: argparse.Namespace) -> Iterator[tuple[Path, Path, dict[str, Path], int]]:
    """A temporary folder (under benchmarks/out when there is one) holding ``make_family`` of the
    options ``a``: (the folder, base, tasks, largest tensor's bytes)."""
    with tempfile.TemporaryDirectory(dir=HERE / "out" if (HERE / "out").is_dir() else None) as tmp:
        root = Path(tmp)
        (root / "fam").mkdir()
        shape = {"hidden": a.hidden, "vocab": a.vocab} if hasattr(a, "hidden") else {}
        base, tasks, largest = make_family(root / "fam", a.params, a.tasks, getattr(torch, a.dtype), **shape)
        yield root, base, tasks, largest


def run_child(checkout: Path, code: str, *args: str) -> dict:
    """``code`` (after SAMPLER) in a fresh process with ``checkout`` on PYTHONPATH, run from ``/``;
    what it printed last, as JSON."""
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "cli")])}
    r = subprocess.run([sys.executable, "-c", SAMPLER + code, *args], capture_output=True, text=True, env=env,
                       cwd="/")
    if r.returncode:  # the child's own error, not only its exit status
        raise SystemExit(f"a child of {checkout} failed ({' '.join(args)}):\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(checkout)), (got["file"], checkout)  # the checkout meant, not another
    return got


def make_family(root: Path, params: float, tasks: int, dtype: torch.dtype, hidden: int = 768,
                vocab: int = 8192) -> tuple[Path, dict[str, Path], int]:
    """A transformer-shaped base and ``tasks`` fine-tunes of it (small updates everywhere, larger on
    a task-specific 10% of the weights), as safetensors files; returns their paths and the largest
    tensor's bytes."""
    layers = max(1, round(params / (12 * hidden * hidden)))
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(layers):
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("up", (4 * hidden, hidden)), ("down", (hidden, 4 * hidden))):
            base[f"layers.{i}.{name}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        base[f"layers.{i}.norm.weight"] = torch.ones(hidden, dtype=dtype)
    base["embed.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype)
    largest = max(t.numel() * t.element_size() for t in base.values())
    save_file(base, root / "base.safetensors")
    paths = {}
    for t in range(tasks):
        sd = {}
        for k, v in base.items():
            # a fine-tune: small updates, larger on a task-specific 10% of the weights
            scale = 1e-4 + 2e-3 * (torch.rand(v.shape, generator=g) < 0.1)
            sd[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
        paths[f"task{t}"] = root / f"task{t}.safetensors"
        save_file(sd, paths[f"task{t}"])
        del sd
    return root / "base.safetensors", paths, largest


class _Counted:
    """A sink that keeps nothing: zstd's output bytes are only counted."""

    def write(self, b) -> int:
        return len(b)


def zstd_size(path: Path) -> tuple[int, float]:
    """The file as one zstd-3 stream (as ``zstd -3 -T0`` writes it), and the seconds it took."""
    t0 = time.perf_counter()
    c = zstandard.ZstdCompressor(level=3, threads=-1)
    with open(path, "rb") as f:
        _, n = c.copy_stream(f, _Counted())
    return n, time.perf_counter() - t0


def child_pack(args: list[str]) -> dict:
    """Pack in a fresh process, so its peak RSS is the packer's own."""
    # Peak *anonymous* memory, sampled: file pages that safetensors maps are page cache, not
    # memory the packer holds, but they count in ru_maxrss.
    code = (
        "import json,sys,threading,time,tallpack\n"
        "peak=[0];stop=[False]\n"
        "def anon():\n"
        "  for line in open('/proc/self/status'):\n"
        "    if line.startswith('RssAnon:'): return int(line.split()[1])*1024\n"
        "def watch():\n"
        "  while not stop[0]: peak[0]=max(peak[0],anon()); time.sleep(0.005)\n"
        "th=threading.Thread(target=watch,daemon=True);th.start()\n"
        "a=json.loads(sys.argv[1]);t=time.perf_counter()\n"
        "tallpack.pack(a['base'],a['tasks'],a['out'],codec=a['codec'])\n"
        "s=time.perf_counter()-t;stop[0]=True;th.join()\n"
        "print(json.dumps({'seconds':s,'peak_rss':peak[0]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=40e6)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=HERE / "out")
    a = ap.parse_args()
    import tallpack

    dtype = getattr(torch, a.dtype)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        root = Path(tmp)
        base, tasks, largest = make_family(root, a.params, a.tasks, dtype)
        files = [base, *tasks.values()]
        raw = sum(p.stat().st_size for p in files)
        zs = [zstd_size(p) for p in files]
        res = {"params": a.params, "tasks": a.tasks, "dtype": a.dtype, "checkpoint_bytes": raw,
               "zstd3_bytes": sum(s for s, _ in zs), "zstd3_seconds": sum(t for _, t in zs),
               "largest_tensor_bytes": largest, "codecs": {}}
        for codec in ("raw", "bytegroup-zstd", "planes"):  # planes: the default (pack's codec)
            out = root / f"{codec}.tallpack"
            r = child_pack([json.dumps({"base": str(base), "tasks": {k: str(v) for k, v in tasks.items()},
                                        "out": str(out), "codec": codec})])
            size = out.stat().st_size
            # one member: tallpack vs safetensors' load_file of the original, alternated (the order
            # swapped each time), medians of 5
            t_tp, t_st = [], []
            for i in range(5):
                for side in ("tp", "st") if i % 2 == 0 else ("st", "tp"):
                    t0 = time.perf_counter()
                    if side == "tp":
                        with tallpack.open(out) as fam:
                            fam.state_dict("task1")
                        t_tp.append(time.perf_counter() - t0)
                    else:
                        {k: v.clone() for k, v in load_file(tasks["task1"]).items()}  # into memory, as ours
                        t_st.append(time.perf_counter() - t0)
            with tallpack.open(out) as fam:
                name = "layers.0.q.weight"
                t0 = time.perf_counter()
                fam.get_tensor("task1", name)
                one = time.perf_counter() - t0
            res["codecs"][codec] = {
                "archive_bytes": size, "ratio_vs_checkpoints": raw / size,
                "ratio_vs_zstd3": res["zstd3_bytes"] / size,
                "pack_seconds": r["seconds"], "pack_vs_zstd3_time": r["seconds"] / res["zstd3_seconds"],
                "pack_peak_anon_bytes": r["peak_rss"],
                "peak_anon_over_largest_x_checkpoints": r["peak_rss"] / (largest * (a.tasks + 1)),
                "load_task_vs_safetensors_time": statistics.median(t_tp) / statistics.median(t_st),
                "one_tensor_seconds": one,
            }
    print(json.dumps(res, indent=2))
    (a.out / f"pack_scale_{a.dtype}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
