"""Bytes fetched from a remote archive: opening it, one tensor of one task, one whole task, verify.

A synthetic family (12 blocks of 3 tensors, 4 fine-tunes, about 40 MB of bf16 checkpoints), in
bf16 and in fp32, each packed plain and with the exact tier (``--exact``), is served by a plain
HTTP server on loopback that honours Range requests (``tests/rangeserver.py``), and read through
fsspec's HTTP file system. The server counts the requests and body bytes it sends; "waits" are the
times a read waited on the server (``source.rounds``: its requests run side by side), the round
trips a read costs at a server far away.

    python benchmarks/remote_bytes.py [--json out.json] [--only bf16]
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
    ap.add_argument("--only", choices=["bf16", "fp32"], help="one dtype's family (both: the default)")
    args = ap.parse_args()
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        if args.only not in (None, tag):
            continue
        base, tasks = family()
        if dtype != torch.bfloat16:
            base = {k: v.to(dtype) for k, v in base.items()}
            tasks = {t: {k: v.to(dtype) for k, v in sd.items()} for t, sd in tasks.items()}
        for exact in (False, True):
            label = f"{tag}{', exact tier' if exact else ''}"
            out[label] = measure(base, tasks, exact)
            size, rows, need_tensor, need_task = out[label]
            print(f"\n{label}: archive {size} bytes ({size / 1e6:.1f} MB), 4 tasks, chunks of 65,536 elements")
            print("| read | requests | waits | bytes fetched | share of the archive | seconds |\n"
                  "|---|---:|---:|---:|---:|---:|")
            for what, (n, w, b, t) in rows.items():
                print(f"| {what} | {n} | {w} | {b:,} | {b / size:.2%} | {t:.2f} |")
            print(f"stored bytes the tensor needs: {need_tensor:,}; the task: {need_task:,}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def measure(base, tasks, exact: bool):
    """Pack the family (``exact``: with the exact tier) and read it over HTTP: (archive bytes,
    {read: (requests, waits, bytes, seconds)}, bytes one tensor needs, bytes one task needs)."""
    with tempfile.TemporaryDirectory() as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        local = Path(tmp) / "fam.tallpack"
        tallpack.pack(base, tasks, local, chunk_elements=1 << 16, exact=exact)
        shutil.copy(local, www / "fam.tallpack")
        size = local.stat().st_size
        server = RangeServer(www).start()
        rows = {}
        try:
            t0 = time.perf_counter()
            fam = tallpack.open(f"{server.url}/fam.tallpack")
            rows["open (header, footer, manifest)"] = (server.gets(), fam.source.rounds, server.served(),
                                                       time.perf_counter() - t0)
            name = "model.layers.5.mlp.up.weight"
            reads = [(f"one tensor ({name}, 262,144 elements, task1)", lambda: fam.get_tensor("task1", name)),
                     ("one task (task2, 36 tensors)", lambda: fam.state_dict("task2"))]
            if exact:
                reads.append(("one task's originals (task3, exact=True)", lambda: fam.state_dict("task3", exact=True)))
            reads.append(("verify", fam.verify))
            for label, fn in reads:
                server.reset()
                waits = fam.source.rounds
                t0 = time.perf_counter()
                fn()
                rows[label] = (server.gets(), fam.source.rounds - waits, server.served(), time.perf_counter() - t0)
            with tallpack.open(local) as ref:
                need_tensor = sum(r.stored_nbytes for r in _arrays(ref, "task1", [name]))
                need_task = sum(r.stored_nbytes for r in _arrays(ref, "task2", ref.keys("task2")))
            fam.close()
        finally:
            server.stop()
    return size, rows, need_tensor, need_task


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
