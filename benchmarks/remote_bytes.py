"""Bytes fetched from a remote archive: opening it, one tensor of one task, one whole task.

A synthetic bf16 family (12 blocks of 3 tensors, 4 fine-tunes, about 40 MB of checkpoints) is
packed, served by a plain HTTP server on loopback that honours Range requests
(``tests/rangeserver.py``), and read through fsspec's HTTP file system. The server counts the
requests and body bytes it sends.

    python benchmarks/remote_bytes.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tallpack  # noqa: E402
from rangeserver import RangeServer  # noqa: E402


def family(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(12):
        base[f"model.layers.{i}.attn.weight"] = torch.randn(256, 256, generator=g)
        base[f"model.layers.{i}.mlp.up.weight"] = torch.randn(1024, 256, generator=g)
        base[f"model.layers.{i}.mlp.down.weight"] = torch.randn(256, 1024, generator=g)
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    tasks = {}
    for t in range(4):
        tasks[f"task{t}"] = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)
                                 * (torch.rand(v.shape, generator=g) < 0.3)).to(v.dtype) for k, v in base.items()}
    return base, tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base, tasks = family()
    with tempfile.TemporaryDirectory() as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        local = Path(tmp) / "fam.tallpack"
        tallpack.pack(base, tasks, local, chunk_elements=1 << 16)
        shutil.copy(local, www / "fam.tallpack")
        size = local.stat().st_size
        server = RangeServer(www).start()
        rows = {}
        try:
            t0 = time.perf_counter()
            fam = tallpack.open(f"{server.url}/fam.tallpack")
            rows["open (header, footer, manifest)"] = (server.gets(), server.served(), time.perf_counter() - t0)
            name = "model.layers.5.mlp.up.weight"
            for label, fn in [(f"one tensor ({name}, 262,144 bf16, task1)", lambda: fam.get_tensor("task1", name)),
                              ("one task (task2, 36 tensors)", lambda: fam.state_dict("task2"))]:
                server.reset()
                t0 = time.perf_counter()
                fn()
                rows[label] = (server.gets(), server.served(), time.perf_counter() - t0)
            with tallpack.open(local) as ref:
                need_tensor = sum(r.stored_nbytes for r in _arrays(ref, "task1", [name]))
                need_task = sum(r.stored_nbytes for r in _arrays(ref, "task2", ref.keys("task2")))
            fam.close()
        finally:
            server.stop()
    print(f"archive: {size} bytes ({size / 1e6:.1f} MB), 4 tasks, chunks of 65,536 elements")
    print("| read | requests | bytes fetched | share of the archive | seconds |\n|---|---:|---:|---:|---:|")
    for label, (n, b, s) in rows.items():
        print(f"| {label} | {n} | {b:,} | {b / size:.2%} | {s:.2f} |")
    print(f"stored bytes the tensor needs: {need_tensor:,}; the task: {need_task:,}")
    if args.json:
        args.json.write_text(json.dumps({"archive_bytes": size, "rows": rows, "need_tensor": need_tensor,
                                         "need_task": need_task}, indent=2))


def _arrays(fam, task, names):
    """The stored arrays that reading ``names`` of ``task`` needs. A group's member (format 1.12)
    needs its group's arrays (the reader decodes the group), counted once however many members."""
    from tallpack.encodings import encoding_for

    entries = {n: e for e in fam.manifest.tensors for n in ([m.name for m in e.members] or [e.name])}
    out, seen = [], set()
    for n in names:
        entry = entries[n]
        if id(entry) in seen:
            continue
        seen.add(id(entry))
        tt = entry.tasks[task]
        out += [*tt.arrays.values(), *(entry.arrays[k] for k in encoding_for(tt.encoding).entry_arrays)]
    return out


if __name__ == "__main__":
    main()
