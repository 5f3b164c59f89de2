"""Round 35, helper G: what one tensor-parallel rank reads from a tallpack archive, against what it
needs, as a downstream loader shards a Llama-style model (Megatron's split: q/k/v, gate/up,
embeddings and head by rows; o_proj and down_proj by columns; norms replicated).

Real processes: W ranks forked from this one, ``torch.distributed`` (gloo, ``file://`` init),
each opening the archive with ``cache_bytes=0`` and loading its shard of every tensor of one task
with ``get_slice(task, name)[index]``; bytes are counted by wrapping
``tallpack.storage.LocalFile.read`` (every stored chunk a read fetches: a view of the mapped file)
and compared with the checkpoint bytes of the rank's shard (what safetensors' slice copies out).
Each rank's wall time is the median of ``--repeats`` loads, after a barrier.

    python benchmarks/rounds/r35/G_tp_ranks.py [--world 4] [--hidden 256] [--out G_tp_ranks.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tallpack
from tallpack import storage

BY_COLUMNS = ("o_proj.weight", "down_proj.weight")


def family(root: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(("chat", "code")):
        g = torch.Generator().manual_seed(10 + i)
        model.load_state_dict({k: v + (torch.rand(v.shape, generator=g) < 0.3) * 0.02 * torch.randn(v.shape, generator=g)
                               for k, v in base.items()})
        model.save_pretrained(root / task)


def pack(root: Path, out: Path, *flags: str) -> None:
    from click.testing import CliRunner
    from tallpack_cli.main import main

    r = CliRunner().invoke(main, ["-q", "pack", "--base", str(root / "base"), "--task", f"chat={root / 'chat'}",
                                  "--task", f"code={root / 'code'}", "-o", str(out), *flags])
    assert r.exit_code == 0, r.output


def shard(shape: list[int], name: str, rank: int, world: int) -> tuple[str, tuple]:
    if len(shape) < 2:
        return "replicated", (Ellipsis,)
    dim = 1 if name.endswith(BY_COLUMNS) else 0
    n = shape[dim] // world
    part = slice(rank * n, (rank + 1) * n)
    return ("columns", (slice(None), part)) if dim else ("rows", (part,))


def load(mode: str, path: str, member: str, exact: bool, rank: int, world: int, log: list) -> dict:
    """One rank's load: ``slices`` (its shard of every tensor, ``get_slice``), ``whole`` (the
    task's ``state_dict``, every tensor whole) or ``safetensors`` (its shard, ``safe_open`` of the
    member's own file); the chunks read (bytes of every read, and of distinct chunks) by kind."""
    sizes: dict = {k: {"read": 0, "distinct": set(), "needed": 0} for k in ("rows", "columns", "replicated")}
    cache = 1 << 30 if mode.endswith("cached") else 0
    if mode == "safetensors":
        from safetensors import safe_open

        with safe_open(member, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                kind, index = shard(piece.get_shape(), name, rank, world)
                piece[index]
        return {}
    with tallpack.open(path, cache_bytes=cache) as fam:
        log.clear()
        if mode == "whole":
            fam.state_dict("chat", exact=exact)
            return {"whole": {"read": sum(n for _, n in log), "distinct": sum(n for _, n in set(log))}}
        for name in fam.keys("chat"):
            piece = fam.get_slice("chat", name, exact=exact)
            kind, index = shard(piece.get_shape(), name, rank, world)
            before = len(log)
            t = piece[index]
            sizes[kind]["read"] += sum(n for _, n in log[before:])
            sizes[kind]["distinct"] |= set(log[before:])
            sizes[kind]["needed"] += t.numel() * t.element_size()
    out = {k: {"read": v["read"], "distinct": sum(n for _, n in v["distinct"]), "needed": v["needed"]}
           for k, v in sizes.items()}
    out["all"] = {"read": sum(v["read"] for v in out.values()), "needed": sum(v["needed"] for v in out.values()),
                  "distinct": sum(n for _, n in set().union(*(v["distinct"] for v in sizes.values())))}
    return out


def rank_main(rank: int, world: int, init: str, path: str, member: str, exact: bool, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    log: list[tuple[int, int]] = []
    read = storage.LocalFile.read

    def counted(source, offset: int, nbytes: int):
        log.append((offset, nbytes))
        return read(source, offset, nbytes)

    storage.LocalFile.read = counted  # type: ignore[method-assign,assignment]
    res: dict = {}
    for _ in range(repeats):  # the modes alternated, each round
        for mode in ("slices", "slices cached", "whole", "safetensors"):
            dist.barrier()
            t0 = time.perf_counter()
            got = load(mode, path, member, exact, rank, world, log)
            res.setdefault(mode, {"seconds": [], "bytes": got})["seconds"].append(time.perf_counter() - t0)
    storage.LocalFile.read = read  # type: ignore[method-assign]
    for v in res.values():
        v["seconds"] = statistics.median(v["seconds"])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run(path: Path, member: Path, world: int, exact: bool, repeats: int, tmp: Path) -> list[dict]:
    out = tmp / "r.json"
    init = tmp / f"init-{time.monotonic_ns()}"
    mp.start_processes(rank_main, args=(world, f"file://{init}", str(path), str(member), exact, repeats, str(out)),
                       nprocs=world, start_method="fork", join=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    a = ap.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        family(root, a.hidden, a.layers, a.vocab)
        member = (root / "chat" / "model.safetensors").stat().st_size
        kinds = [("default", []), ("chunks 512K", ["--chunk-elements", "524288"]),
                 ("chunks 64K", ["--chunk-elements", "65536"]), ("raw, chunks 64K", ["--codec", "raw", "--chunk-elements", "65536"]),
                 ("exact, chunks 64K", ["--exact", "--chunk-elements", "65536"])]
        for label, flags in kinds:
            arch = root / f"{len(rows)}.tallpack"
            pack(root, arch, *flags)
            for exact in ([False, True] if "--exact" in flags else [False]):
                res = run(arch, root / "chat" / "model.safetensors", a.world, exact, a.repeats, root)
                slices = [r["slices"]["bytes"]["all"]["distinct"] for r in res]
                reads = [r["slices"]["bytes"]["all"]["read"] for r in res]
                need = res[0]["slices"]["bytes"]["all"]["needed"]
                row = {"archive": label + (" (exact read)" if exact else ""), "archive_bytes": arch.stat().st_size,
                       "member_bytes": member, "world": a.world, "ranks": res, "shard_bytes_rank0": need}
                rows.append(row)
                sec = {m: [round(r[m]["seconds"], 3) for r in res] for m in res[0]}
                print(f"{row['archive']:30s} W={a.world} a rank's chunks {[round(x / 1e6, 1) for x in slices]} MB "
                      f"(read {[round(x / 1e6, 1) for x in reads]} MB with repeats; whole task "
                      f"{res[0]['whole']['bytes']['whole']['distinct'] / 1e6:.1f} MB); shard {need / 1e6:.2f} MB of "
                      f"{member / 1e6:.1f}; s/rank: " + "; ".join(f"{m} {statistics.median(v):.3f}" for m, v in sec.items()),
                      flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
