"""The performance issue's measuring stick: every goal, measured side by side in one run.

    python benchmarks/perf.py                    # full size: 26M params per member, base + 8 tasks
    python benchmarks/perf.py --quick            # a small family, under 2 minutes (smoke test)
    python benchmarks/perf.py --scaling          # pack/load/memory for 2..16 tasks, two model sizes
    python benchmarks/perf.py --benchmarks-md BENCHMARKS.md   # also replace its section there

Each goal compares tallpack (public API only: ``tallpack.pack``, ``tallpack.open``, the archive's
``state_dict``/``get_tensor``, the ``tallpack unpack`` command; plus ``tallpack.codecs.dense_chain``
for the codec goal) with an alternative measured in the same run:

1. ``state_dict(task)``, default codec, vs ``safetensors.torch.load_file`` + clone (goal <= 3.0x);
   also on a family of 480 small tensors (``make_many_family``), where per-tensor costs show,
   and on the family cast to bfloat16 and to float16 (``make_cast_family``: base + 4), as fine-tunes
   are released
2. the same, ``codec="raw"`` (goal <= 1.5x)
3. a second task from the same open archive vs load_file + clone (goal <= 1.5x); also 16-bit
4. ``get_tensor`` of one 4 MiB tensor vs ``safe_open().get_tensor()`` + clone, for archives of
   2, 4, 8 tasks (goal <= 2x raw, <= 4x default)
5. pack time vs ``zstd -3 -T2`` of the same files (goal <= 1.0x); archive size vs zstd's (<= 1/4);
   also the bfloat16 and float16 families of goal 1
6. the dense codec on the base's bytes vs ZipNN: ratio (>= 1.0x ZipNN's) and decode speed (>=)
7. pack peak anonymous memory vs (T + 4) x largest fp32 tensor + 300 MB
8. unpack of one task (CLI) peak anonymous memory vs 3 x largest tensor + 300 MB

Loads run in fresh processes (``--child``), each child timing only the load itself; the two sides
alternate; the page cache is warmed first, and the originals the alternative loads are copies
written in the same run, as the archives are (a file just written loads faster here than one
written long ago); medians are reported. Peak memory is the child's
RssAnon (``/proc/<pid>/status``) sampled by this process every 20 ms: mapped input files are page
cache, not memory the process holds. Children run the library of this checkout (PYTHONPATH).

Every timed load's values are checked after its timer stops (``check_values``): tallpack's side
(``state_dict``, a second task, ``get_tensor``'s first and last call, ``get_slice``, the profiled
load, the files ``tallpack unpack`` wrote) against the paper's formula theta_0 + m_t * tau_MTL
computed by this process from the original files, one tensor at a time, before the loads
(``reference``: dtype, shape and a SHA-256 of each tensor's bytes), the alternative's side against
the original file it copied (``original_reference``). A difference ends the run with exit 1,
naming the load and the tensor: a fast path that returned wrong data cannot win.

The synthetic family (cached in benchmarks/out/family-*/, keyed by its shape and seed): float32,
hidden 512, an 8000x512 embedding (the largest tensor), transformer layers with q, k, v, o
(512x512), up (2048x512), down (512x2048) and a norm; fine-tunes add 1e-4 noise everywhere and
2e-3 noise on a task-specific random 10% of the weights (as pack_scale.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HIDDEN = 512
VOCAB = 8000
GEN_VERSION = 1  # bump when make_member changes, so cached families are rebuilt
MB = 1e6
SECTION_BASELINE = "## Performance (issue 8): baseline"
SECTION_SCALING = "## Performance (issue 8): scaling"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# the synthetic family


def n_layers(params: float) -> int:
    return max(1, round((params - VOCAB * HIDDEN) / (12 * HIDDEN * HIDDEN)))


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"embed.weight": (VOCAB, HIDDEN)}
    h = HIDDEN
    for i in range(layers):
        for name, shape in (("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("o", (h, h)),
                            ("up", (4 * h, h)), ("down", (h, 4 * h)), ("norm", (h,))):
            out[f"layers.{i}.{name}.weight"] = shape
    return out


#: The family of many small tensors (``make_many_family``): BERT-like widths, 10 tensors a
#: layer (four 256 x 256 matrices, six 256-element vectors), so 60% of the tensors are a few KB.
MANY_LAYERS, MANY_WIDTH, MANY_TASKS = 48, 256, 4


def make_many_family(out: Path, seed: int = 0) -> dict:
    """A base and MANY_TASKS fine-tunes of 480 tensors (12.7M parameters), generated once: the
    shape of real checkpoints, where the per-tensor cost of a load shows (the main family has
    50 tensors, most of them megabytes)."""
    import torch
    from safetensors.torch import save_file

    root = out / f"many-L{MANY_LAYERS}-w{MANY_WIDTH}-t{MANY_TASKS}-s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    paths = {"base": root / "base.safetensors", **{f"t{t}": root / f"t{t}.safetensors" for t in range(MANY_TASKS)}}
    if not all(p.exists() for p in paths.values()):
        log(f"generating the many-tensor family in {root.name}")
        g = torch.Generator().manual_seed(seed)
        w = MANY_WIDTH
        shp = {f"l{i}.{k}": s for i in range(MANY_LAYERS)
               for k, s in (("q", (w, w)), ("k", (w, w)), ("v", (w, w)), ("o", (w, w)), ("ln1.w", (w,)),
                            ("ln1.b", (w,)), ("ln2.w", (w,)), ("ln2.b", (w,)), ("q.b", (w,)), ("o.b", (w,)))}
        base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shp.items()}
        save_file(base, paths["base"])
        for t in range(MANY_TASKS):
            save_file({k: v + 1e-3 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.2)
                       for k, v in base.items()}, paths[f"t{t}"])
    return {"root": root, "base": paths["base"], "tasks": {k: v for k, v in paths.items() if k != "base"}}


#: Members of the 16-bit families (``make_cast_family``): the main family's base and first tasks.
CAST_TASKS = 4


def make_cast_family(fam: dict, dtype: str) -> dict:
    """The main family's base and first CAST_TASKS tasks cast to ``dtype`` (bfloat16, float16),
    as fine-tunes are usually released (written once, beside the float32 files): half the bytes
    per member, and a base of that dtype, so the rebuild rounds each sum to it."""
    import torch
    from safetensors.torch import load_file, save_file

    short = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    root = fam["root"] / f"{short}-t{CAST_TASKS}"
    root.mkdir(parents=True, exist_ok=True)
    names = list(fam["tasks"])[:CAST_TASKS]
    src = {"base": fam["base"], **{t: fam["tasks"][t] for t in names}}
    paths = {k: root / Path(v).name for k, v in src.items()}
    for k, dst in paths.items():
        if not dst.exists():
            log(f"writing the {dtype} copy of {Path(src[k]).name}")
            tmp = dst.with_suffix(".partial")
            save_file({n: v.to(getattr(torch, dtype)) for n, v in load_file(src[k]).items()}, tmp)
            os.replace(tmp, dst)
    return {"root": root, "base": paths["base"], "tasks": {t: paths[t] for t in names}, "short": short}


def family_dir(out: Path, layers: int, seed: int) -> Path:
    return out / f"family-h{HIDDEN}-v{VOCAB}-L{layers}-s{seed}-g{GEN_VERSION}"


def make_family(out: Path, params: float, tasks: int, seed: int = 0) -> dict:
    """base.safetensors and task0..task{tasks-1}.safetensors, each generated once and cached.

    Task t depends only on (seed, t), so a family of 16 tasks contains the one of 8."""
    import torch
    from safetensors.torch import save_file

    layers = n_layers(params)
    root = family_dir(out, layers, seed)
    root.mkdir(parents=True, exist_ok=True)
    shp = shapes(layers)

    def base_sd():
        g = torch.Generator().manual_seed(seed)
        return {k: torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
                for k, s in shp.items()}

    def write(path: Path, sd) -> None:
        tmp = path.with_suffix(".partial")
        save_file(sd, tmp)
        os.replace(tmp, path)

    base_path = root / "base.safetensors"
    paths = {f"task{t}": root / f"task{t}.safetensors" for t in range(tasks)}
    missing = [p for p in [base_path, *paths.values()] if not p.exists()]
    if missing:
        log(f"generating {len(missing)} checkpoint file(s) in {root.name}")
        base = base_sd()
        if not base_path.exists():
            write(base_path, base)
        for t, (name, p) in enumerate(paths.items()):
            if p.exists():
                continue
            g = torch.Generator().manual_seed(seed * 100_003 + 1 + t)
            sd = {}
            for k, v in base.items():
                # a fine-tune: small updates everywhere, larger on a task-specific 10% of the weights
                scale = 1e-4 + 2e-3 * (torch.rand(v.shape, generator=g) < 0.1)
                sd[k] = v + scale * torch.randn(v.shape, generator=g)
            write(p, sd)
            del sd
    numel = sum(_prod(s) for s in shp.values())
    return {"root": root, "base": base_path, "tasks": paths, "layers": layers, "params": numel,
            "n_tensors": len(shp), "largest_bytes": max(_prod(s) for s in shp.values()) * 4,
            "member_bytes": base_path.stat().st_size,
            "tensor_4mb": f"layers.{layers // 2}.up.weight"}


def _prod(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def warm(paths) -> None:
    """Read files once so they sit in the page cache (both sides are timed warm)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


# ---------------------------------------------------------------------------------------------
# the values a timed load returned, checked after its timer stopped


class ValueMismatch(RuntimeError):
    """A timed load returned values that differ from its reference: the run is void."""


#: What a child prints on stderr before it exits 1 when a load's values differ from the reference.
MISMATCH = "VALUE MISMATCH"


def digest(t) -> str:
    """A tensor's dtype, shape and the SHA-256 of its bytes (row-major)."""
    import hashlib
    import torch
    flat = t.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{hashlib.sha256(data).hexdigest()}"


def _rows(t, div: int):
    """The first rows // div rows (at least one) of ``t``: one rank's slice (the ``slices`` child's)."""
    return t[0 : max(1, t.shape[0] // div)]


def reference(base: Path, tasks: dict, task: str, out: Path, *, rows_div: int = 0, only: str = "") -> str:
    """The digests of ``task``'s tensors as the paper's formula gives them, computed here from the
    original files (not through the library), one tensor at a time: tau_t = theta_t - theta_0 in
    float32, tau_MTL = sum of the tau_t in the archive's task order, m_t = |tau_t| >
    lambda |tau_MTL - tau_t| (lambda = tallpack.DEFAULT_LAMBDA, as pack uses), theta_t' = theta_0
    + m_t * tau_MTL cast to the task's dtype (as tests/conftest.py's expected_reconstruction).
    ``rows_div``: the digests of one rank's rows instead; ``only``: that tensor alone. Written
    to ``out`` (JSON, ``{name: digest}``); returns its path."""
    import torch
    from safetensors import safe_open
    from tallpack import DEFAULT_LAMBDA
    lam = torch.tensor(DEFAULT_LAMBDA, dtype=torch.float32)
    with contextlib.ExitStack() as stack:
        fb = stack.enter_context(safe_open(str(base), "pt"))
        handles = {t: stack.enter_context(safe_open(str(p), "pt")) for t, p in tasks.items()}
        ref = {}
        for name in ([only] if only else fb.keys()):
            b = fb.get_tensor(name)
            ts = {t: h.get_tensor(name) for t, h in handles.items()}
            if not b.is_floating_point() or any(v.shape != b.shape for v in ts.values()):
                raise ValueError(f"{base}: tensor {name!r} is not one the formula covers")
            if all(torch.equal(v, ts[task]) for v in ts.values()) and len(ts) > 1:
                want = ts[task]  # stored once, exactly
            else:
                b32 = b.float()
                mtl = torch.zeros_like(b32)
                for v in ts.values():
                    mtl = mtl + (v.float() - b32)
                tau = ts[task].float() - b32
                want = (b32 + (tau.abs() > lam * (mtl - tau).abs()).float() * mtl).to(ts[task].dtype)
            ref[name] = digest(_rows(want, rows_div) if rows_div else want)
    out.write_text(json.dumps(ref))
    return str(out)


def original_reference(path: Path, out: Path, *, rows_div: int = 0, only: str = "") -> str:
    """The digests of a safetensors file's tensors as they are (``rows_div``, ``only``: as
    ``reference``), for the alternative's loads; written to ``out``; returns its path."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        ref = {k: digest(_rows(f.get_tensor(k), rows_div) if rows_div else f.get_tensor(k))
               for k in ([only] if only else f.keys())}
    out.write_text(json.dumps(ref))
    return str(out)


def mismatch(got: dict, ref_path: str, what: str) -> str | None:
    """What differs between the tensors ``got`` holds (a mapping) and the reference (dtype, shape,
    bytes; a name missing or extra), naming the first tensor that does; None when nothing does."""
    ref = json.loads(Path(ref_path).read_text())
    if set(got.keys()) != set(ref):
        extra, missing = sorted(set(got.keys()) - set(ref)), sorted(set(ref) - set(got.keys()))
        return f"{MISMATCH}: {what}: tensors {extra[:3]} not in the reference, {missing[:3]} missing"
    for k in ref:
        d = digest(got[k])
        if d != ref[k]:
            return f"{MISMATCH}: {what}: tensor {k!r} is {d}, the reference {ref[k]}"
    return None


def check_values(got: dict, ref_path: str | None, what: str) -> None:
    """In a child, after its timer stopped: ``mismatch``, and on one exit 1 saying it (the parent
    raises ValueMismatch). A child given no reference checks nothing (``ref_path`` None)."""
    if ref_path is not None and (msg := mismatch(got, ref_path, what)):
        print(msg, file=sys.stderr)
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# children: fresh processes that time one thing and print one JSON line


def _anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _open_kwargs(tallpack, a: dict) -> dict:
    import inspect
    params = inspect.signature(tallpack.open).parameters
    if a.get("cache_bytes") is not None and "cache_bytes" in params:
        return {"cache_bytes": a["cache_bytes"]}
    return {}


def _settle() -> None:
    """A full collection right before a timed load, on both sides: a process that imported torch
    holds about 170,000 objects, and a full pass over them (80 ms here) that earlier imports made
    due can otherwise land inside either side's 30-100 ms load (seen: load_file + clone of 480
    tensors took 104-133 ms in one child, 28-31 ms with the collection made first). Collections
    that a side's own allocations cause during the load still count against it."""
    gc.collect()


def _checkout_cli():
    """This checkout's command line (``cli/``), whichever ``tallpack_cli`` is installed."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "tallpack_cli", REPO / "cli" / "__init__.py", submodule_search_locations=[str(REPO / "cli")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tallpack_cli"] = mod
    spec.loader.exec_module(mod)
    from tallpack_cli.main import main as cli_main
    return cli_main


def pack_command(fam: dict, tasks: list[str], out: Path, threads: int) -> dict:
    """The whole ``tallpack pack`` command as a user runs it, timed from outside its process:
    the interpreter's start and the imports of torch and tallpack count, as zstd's start does."""
    if out.exists():
        out.unlink()
    args = ["-q", "pack", "--base", str(fam["base"]), *(x for t in tasks for x in ("--task", f"{t}={fam['tasks'][t]}")),
            "-o", str(out), "--codec", "planes", "--level", "3", "-j", str(threads)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "pack_cli", json.dumps({"args": args})]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env(), stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - t0, "archive_bytes": out.stat().st_size}


def child(kind: str, a: dict) -> dict:
    if kind == "pack_cli":  # nothing imported first: the parent times this whole process
        _checkout_cli()(args=a["args"], prog_name="tallpack", standalone_mode=False)
        import tallpack
        return {"tallpack_file": tallpack.__file__}
    import torch  # noqa: F401  (imported before any timing, by both sides)
    import tallpack
    from safetensors import safe_open
    from safetensors.torch import load_file

    res: dict = {"tallpack_file": tallpack.__file__}
    if kind == "load_tp":
        kw = _open_kwargs(tallpack, a)
        res["open_kwargs"] = kw
        if a.get("warm_task"):
            with tallpack.open(a["archive"], **kw) as fam:  # the archive is opened before timing
                fam.state_dict(a["warm_task"])
                _settle()
                t0 = time.perf_counter()
                sd = fam.state_dict(a["task"])
                res["seconds"] = time.perf_counter() - t0
                check_values(sd, a.get("ref"), f"state_dict({a['task']!r}) after {a['warm_task']!r}, {a['archive']}")
        else:
            _settle()
            t0 = time.perf_counter()
            with tallpack.open(a["archive"], **kw) as fam:
                t1 = time.perf_counter()
                sd = fam.state_dict(a["task"])
                res["cache_held"] = fam._cache.size  # what the load kept for a next task (bytes)
            res["seconds"] = time.perf_counter() - t0
            res["open_seconds"] = t1 - t0
            check_values(sd, a.get("ref"), f"state_dict({a['task']!r}), {a['archive']}")
        res["n"] = len(sd)
    elif kind == "slices":
        # one rank of n-way tensor parallelism: the first rows // n rows of every tensor
        n = a["n"]
        _settle()
        t0 = time.perf_counter()
        if a.get("archive"):
            with tallpack.open(a["archive"], **_open_kwargs(tallpack, a)) as fam:
                sd = {}
                for k in fam.keys(a["task"]):
                    part = fam.get_slice(a["task"], k)
                    sd[k] = part[0 : max(1, part.get_shape()[0] // n)]
        else:
            with safe_open(a["path"], "pt") as f:
                sd = {k: f.get_slice(k)[0 : max(1, f.get_slice(k).get_shape()[0] // n)].clone() for k in f.keys()}
        res["seconds"] = time.perf_counter() - t0
        check_values(sd, a.get("ref"), f"rows // {n} of every tensor, {a.get('archive') or a['path']}")
        res["n"] = len(sd)
    elif kind == "load_st":
        _settle()
        t0 = time.perf_counter()
        sd = {k: v.clone() for k, v in load_file(a["path"]).items()}
        res["seconds"] = time.perf_counter() - t0
        check_values(sd, a.get("ref"), f"load_file + clone, {a['path']}")
        res["n"] = len(sd)
    elif kind == "get_tensor":
        kw = _open_kwargs(tallpack, a)
        res["open_kwargs"] = kw
        name, task = a["name"], a["task"]
        with tallpack.open(a["archive"], **kw) as fam, safe_open(a["path"], "pt") as f:
            x = fam.get_tensor(task, name)  # warm-up, both sides
            y = f.get_tensor(name).clone()
            res["nbytes"] = x.numel() * x.element_size()
            assert x.shape == y.shape
            check_values({name: x}, a.get("ref"), f"get_tensor({task!r}, {name!r}), first call, {a['archive']}")
            check_values({name: y}, a.get("ref_st"), f"safe_open get_tensor + clone, {a['path']}")
            tp, st = [], []
            for i in range(a["reps"]):
                for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    if side == 0:
                        x = fam.get_tensor(task, name)
                        tp.append(time.perf_counter() - t0)
                    else:
                        y = f.get_tensor(name).clone()
                        st.append(time.perf_counter() - t0)
            # the last call of each side (the first checked above): after the timed loop
            check_values({name: x}, a.get("ref"), f"get_tensor({task!r}, {name!r}), last call, {a['archive']}")
            check_values({name: y}, a.get("ref_st"), f"safe_open get_tensor + clone, last call, {a['path']}")
            if a.get("floors"):
                _tensor_floors(fam, f, task, name, a["reps"], res)
        res["tallpack"] = tp
        res["safetensors"] = st
    elif kind == "pack":
        res["anon_after_imports"] = _anon()
        t0 = time.perf_counter()
        tallpack.pack(a["base"], a["tasks"], a["out"], codec=a["codec"], level=3, threads=a["threads"])
        res["seconds"] = time.perf_counter() - t0
    elif kind == "unpack_cli":
        # `tallpack unpack ARCHIVE --task NAME -o DIR`, with this checkout's CLI
        cli_main = _checkout_cli()
        res["anon_after_imports"] = _anon()
        t0 = time.perf_counter()
        cli_main(args=["unpack", a["archive"], "--task", a["task"], "-o", a["dir"]], standalone_mode=False)
        res["seconds"] = time.perf_counter() - t0
    elif kind == "fill":
        # the pages a load must write, and nothing else: fresh tensors of the member's shapes, filled
        t0 = time.perf_counter()
        dt = getattr(torch, a.get("dtype", "float32"))  # the output's; what a cache keeps: "held" bytes more
        kept = [torch.empty(n, dtype=dt).fill_(0.5) for n in a["numels"] for _ in range(a["copies"])]
        kept += [torch.empty(n, dtype=torch.uint8).fill_(1) for n in a.get("held", [])]
        res["seconds"] = time.perf_counter() - t0
        res["n"] = len(kept)
    elif kind == "decode_planes":
        # a first task's decoding alone: every coded plane of every base and merged vector stored
        # as byte planes, on 2 threads, into each thread's reused buffers (one untimed pass first
        # faults them in and checks the chunks), so no fresh memory is counted: the fill is a row
        # of its own
        from concurrent.futures import ThreadPoolExecutor
        with tallpack.open(a["archive"], cache_bytes=0) as fam:
            refs = [r for e in fam.manifest.tensors for k, r in e.arrays.items()
                    if k in ("base", "merged") and r.chunks and r.chain.planar_itemsize]
            jobs = [(r, i) for r in refs for i in range(len(r.chunks))]
            jobs.sort(key=lambda j: -j[0].chunk_numel(j[1]))  # the large ones first, as the reader's pool
            dec = lambda j: fam._c.read_planar(j[0], j[1], "floor", "floor")  # noqa: E731
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(dec, jobs))
                _settle()
                t0 = time.perf_counter()
                list(pool.map(dec, jobs))
                res["seconds"] = time.perf_counter() - t0
        res["n"] = len(jobs)
        res["decoded_bytes"] = sum(j[0].chunk_numel(j[1]) * j[0].itemsize for j in jobs)
    elif kind == "arith_fresh":
        # raw's arithmetic over the member: two file-backed inputs (mapped as the raw archive's
        # chunks are), a mask that is already decoded (one reused float buffer), fresh outputs
        import mmap
        t0 = time.perf_counter()
        maps, views = [], []
        for path in (a["base"], a["other"]):
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            head = int.from_bytes(mm[:8], "little")
            meta = json.loads(mm[8 : 8 + head])
            maps.append(mm)
            views.append({k: torch.frombuffer(mm, dtype=torch.float32, count=_prod(v["shape"]),
                                              offset=8 + head + v["data_offsets"][0]).view(v["shape"])
                          for k, v in meta.items() if k != "__metadata__"})
        scratch = torch.zeros(max(v.numel() for v in views[0].values()))
        scratch[::3] = 1.0
        out = {k: torch.addcmul(b, scratch[: b.numel()].view(b.shape), views[1][k]) for k, b in views[0].items()}
        res["seconds"] = time.perf_counter() - t0
        res["n"] = len(out)
    elif kind == "raw_checked":
        # raw's unavoidable work, as one straight loop over the raw archive itself: map it, check
        # each chunk of every base and merged vector with the archive's checksum (spec §1), then
        # addcmul the chunk with the task's mask into fresh outputs; unmap. With "masks", each
        # mask chunk is checked and decoded as the format stores it (zstd, bits unpacked, cast
        # to float32 in a reused buffer); without, the mask is one float buffer decoded before
        # timing. Offsets and checksums are taken from the manifest before timing (no manifest
        # parse, no thread pool: a floor leaves out what it may)
        import mmap
        import warnings

        import zstandard
        with tallpack.open(a["archive"]) as fam:
            check = fam._c.checksum
            jobs = [(e.arrays["base"], e.arrays["merged"], e.tasks[a["task"]].arrays["mask"])
                    for e in fam.manifest.tensors
                    if a["task"] in e.tasks and "base" in e.arrays and "merged" in e.arrays
                    and e.arrays["base"].dtype == "float32"]
        assert all(k.chain.ids() == ["bitpack", "zstd"] for _, _, k in jobs)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        scratch = torch.zeros(max(min(b.chunk_elements, b.numel) for b, _, _ in jobs))
        if not a.get("masks"):
            scratch[::3] = 1.0
        dctx = zstandard.ZstdDecompressor()
        t0 = time.perf_counter()
        with open(a["archive"], "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        outs = []
        for b, m, mask in jobs:
            out = torch.empty(b.numel)
            for i, (cb, cm, ck) in enumerate(zip(b.chunks, m.chunks, mask.chunks)):
                views = []
                for c in (cb, cm, ck):
                    v = memoryview(mm)[c.offset : c.offset + c.nbytes]
                    if check(v) != c.checksum:
                        raise SystemExit(f"checksum mismatch at {c.offset}")
                    views.append(v)
                lo = i * b.chunk_elements
                k = b.chunk_numel(i)
                if a.get("masks"):
                    _mask_into(dctx, views[2], scratch[:k])
                torch.addcmul(torch.frombuffer(views[0], dtype=torch.float32), scratch[:k],
                              torch.frombuffer(views[1], dtype=torch.float32), out=out[lo : lo + k])
                del views, v
            outs.append(out)
        mm.close()
        res["seconds"] = time.perf_counter() - t0
        res["n"] = len(outs)
    elif kind == "second_floor":
        # goal 3's work in one straight loop: after an untimed first task on the open archive (its
        # base and merged vectors decoded and cached), each of the task's mask chunks checked and
        # decoded as the format stores it (zstd, bits unpacked, cast to float32 in a reused
        # buffer), then addcmul into fresh outputs; no threads, no per-tensor dispatch
        import zstandard
        from tallpack.reader import Use
        with tallpack.open(a["archive"], **_open_kwargs(tallpack, a)) as fam:
            fam.state_dict(a["warm_task"])
            jobs = [(fam.read_array(e.arrays["base"], "base", Use.SHARED_INPUT),
                     fam.read_array(e.arrays["merged"], "merged", Use.SHARED_INPUT), e.tasks[a["task"]].arrays["mask"])
                    for e in fam.manifest.tensors if a["task"] in e.tasks and "base" in e.arrays
                    and "merged" in e.arrays and e.arrays["base"].dtype == "float32"]
            assert all(k.chain.ids() == ["bitpack", "zstd"] for _, _, k in jobs)
            src, check = fam._c.source, fam._c.checksum
            dctx = zstandard.ZstdDecompressor()
            scratch = torch.empty(max(min(k.chunk_elements, k.numel) for _, _, k in jobs))
            t0 = time.perf_counter()
            outs = []
            for b, m, mask in jobs:
                out = torch.empty(b.numel())
                for i, c in enumerate(mask.chunks):
                    v = src.read(c.offset, c.nbytes)
                    if check(v) != c.checksum:
                        raise SystemExit(f"checksum mismatch at {c.offset}")
                    lo, k = i * mask.chunk_elements, mask.chunk_numel(i)
                    _mask_into(dctx, v, scratch[:k])
                    torch.addcmul(b.reshape(-1)[lo : lo + k], scratch[:k], m.reshape(-1)[lo : lo + k],
                                  out=out[lo : lo + k])
                outs.append(out.view(b.shape))
            res["seconds"] = time.perf_counter() - t0
            res["n"] = len(outs)
    elif kind == "idle":
        res["anon"] = _anon()
    elif kind == "profile":
        import cProfile
        import pstats
        kw = _open_kwargs(tallpack, a)
        with tallpack.open(a["archive"], **kw) as fam:
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            sd = fam.state_dict(a["task"])
            prof.disable()
            res["seconds"] = time.perf_counter() - t0
            check_values(sd, a.get("ref"), f"state_dict({a['task']!r}) under cProfile, {a['archive']}")
        st = pstats.Stats(prof)
        rows = []
        lib = str(REPO / "tallpack")
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
            is_lib = file.startswith(lib)
            where = (f"tallpack/{Path(file).relative_to(lib)}:{line}({fn})" if is_lib
                     else fn if file == "~" else f"{Path(file).name}:{line}({fn})")
            rows.append({"function": where, "library": is_lib, "ncalls": nc,
                         "tottime": tt, "cumtime": ct})
        res["total_tt"] = sum(r["tottime"] for r in rows)
        res["lib_by_cumtime"] = sorted([r for r in rows if r["library"]], key=lambda r: -r["cumtime"])[:10]
        res["all_by_tottime"] = sorted(rows, key=lambda r: -r["tottime"])[:10]
    else:
        raise SystemExit(f"unknown child {kind!r}")
    return res


def _mask_into(dctx, stored, out) -> None:
    """One stored mask chunk (bit-packed, zstd) decoded as the format stores it: the bits unpacked
    and cast to float32 into ``out`` (a reused buffer of the chunk's elements)."""
    import numpy as np
    import torch
    bits = np.frombuffer(dctx.decompress(stored), np.uint8)
    out.copy_(torch.from_numpy(np.unpackbits(bits, count=out.numel(), bitorder="little")))


def _tensor_floors(fam, f, task: str, name: str, reps: int, res: dict) -> None:
    """Goal 4's floors, on the open archive (library internals: a floor, not a goal): reading the
    task's mask alone, and the reconstruction's arithmetic alone (``addcmul`` of hot inputs into a
    fresh output), alternated with ``get_tensor(name).clone()``."""
    import torch
    from tallpack.reader import Use
    e = fam._tensors[name]
    mref = e.tasks[task].arrays["mask"]
    base = fam.read_array(e.arrays["base"], "base", Use.SHARED_INPUT)
    merged = fam.read_array(e.arrays["merged"], "merged", Use.SHARED_INPUT)
    maskf = fam.read_array(mref, "mask", Use.INPUT).to(torch.float32)
    times: dict = {"mask": [], "arith": [], "safetensors": []}
    for i in range(reps):
        for k in (("mask", "arith", "safetensors") if i % 2 == 0 else ("safetensors", "arith", "mask")):
            t0 = time.perf_counter()
            if k == "mask":
                x = fam.read_array(mref, "mask", Use.INPUT)
            elif k == "arith":
                x = torch.addcmul(base, maskf, merged)
            else:
                x = f.get_tensor(name).clone()
            times[k].append(time.perf_counter() - t0)
            del x
    res["floors"] = times


#: OpenMP's wait in every child, both sides, unless the environment sets one: with its default
#: (spin, then sleep) on busy cores, the alternative's ``clone`` (torch's OpenMP threads) took
#: 57-60 ms against 16-26 ms passive in fresh processes (a 29 MB member, load 4-7; level on a
#: quiet machine), a cost tallpack's own threads do not pay: busy runs flattered tallpack.
OMP_WAIT = "PASSIVE"


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT)
    return env


def run_child(kind: str, a: dict, *, sample_memory: bool = False, interval: float = 0.02) -> dict:
    """Run a child; with ``sample_memory`` its peak RssAnon, sampled every ``interval`` s, is
    added as ``peak_anon``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(a)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(), text=True)
        peak = samples = 0
        if sample_memory:
            status = f"/proc/{p.pid}/status"
            while p.poll() is None:
                try:
                    with open(status) as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                peak = max(peak, int(line.split()[1]) * 1024)
                                samples += 1
                                break
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(interval)
        rc = p.wait()
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    if rc != 0:
        if MISMATCH in etext:
            raise ValueMismatch(etext[etext.index(MISMATCH):].strip().splitlines()[0])
        raise RuntimeError(f"child {kind} failed (rc {rc}):\n{etext[-4000:]}")
    res = json.loads(text.strip().splitlines()[-1])
    if not res["tallpack_file"].startswith(str(REPO)):
        raise RuntimeError(f"child imported tallpack from {res['tallpack_file']}, not {REPO}")
    if sample_memory:
        res["peak_anon"] = peak
        res["samples"] = samples
    return res


# ---------------------------------------------------------------------------------------------
# the goals


class LoadMonitor:
    """Samples the machine's runnable threads (``procs_running`` of /proc/stat, the sampler itself
    excluded) every 0.25 s: the machine is shared, and a row measured while others ran is noisier."""

    def __init__(self) -> None:
        import threading
        self.samples: list[int] = []
        self.start = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("procs_running"):
                        self.samples.append(int(line.split()[1]) - 1)
                        break

    def mark(self) -> None:
        self.start = len(self.samples)

    def since_mark(self) -> float | None:
        xs = self.samples[self.start:]
        return sum(xs) / len(xs) if xs else None

    def stop(self) -> None:
        self._stop.set()


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.floors: list[dict] = []
        self.load = LoadMonitor()

    def add(self, goal: str, what: str, ours: float, alt: float, unit: str, goal_op: str, goal_x: float,
            *, alt_label: str = "", ratio: float | None = None, note: str = "", **extra) -> dict:
        """One table row. ``ratio`` is ours / alternative unless given; ``goal_op`` is '<=' or '>='."""
        r = ratio if ratio is not None else ours / alt
        met = r <= goal_x if goal_op == "<=" else r >= goal_x
        row = {"goal": goal, "what": what, "ours": ours, "alternative": alt, "unit": unit,
               "alt_label": alt_label, "ratio": r, "goal_op": goal_op, "goal_x": goal_x,
               "met": bool(met), "note": note, "runnable": self.load.since_mark(), **extra}
        self.rows.append(row)
        log(f"  {what}: ours {fmt(ours, unit)} | {alt_label} {fmt(alt, unit)} | {r:.2f}x "
            f"(goal {goal_op} {goal_x:g}x: {'met' if met else 'NOT met'})")
        return row


    def floor(self, goal: str, what: str, seconds: float, alt: float, alt_label: str, **extra) -> None:
        """A floor: the least time some part of a goal's work takes, measured in this run, as a
        multiple of the goal's alternative (not a goal; it says how far down the ratio can go)."""
        self.floors.append({"goal": goal, "what": what, "seconds": seconds, "alternative": alt,
                            "alt_label": alt_label, "ratio": seconds / alt, "runnable": self.load.since_mark(), **extra})
        log(f"  floor {goal}: {what}: {fmt(seconds, 's')} | {alt_label} {fmt(alt, 's')} | {seconds / alt:.2f}x")


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "B":
        return f"{v / MB:,.1f} MB"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    if unit == "x":
        return f"{v:.3f}x"
    return f"{v:g} {unit}"


def pack_args(fam: dict, tasks: list[str], out: Path, codec: str, threads: int) -> dict:
    return {"base": str(fam["base"]), "tasks": {t: str(fam["tasks"][t]) for t in tasks},
            "out": str(out), "codec": codec, "threads": threads}


def do_pack(fam: dict, tasks: list[str], out: Path, codec: str, threads: int) -> dict:
    if out.exists():
        out.unlink()
    r = run_child("pack", pack_args(fam, tasks, out, codec, threads), sample_memory=True)
    r["archive_bytes"] = out.stat().st_size
    return r


def zstd_files(files: list[Path], outdir: Path, threads: int) -> dict:
    """``zstd -3 -T2`` over the files (one invocation, one .zst per file); python zstandard with
    ``threads`` when the CLI is missing."""
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    exe = shutil.which("zstd")
    if exe:
        cmd = [exe, "-3", f"-T{threads}", "-q", "-f", "--output-dir-flat", str(outdir), *map(str, files)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        sec = time.perf_counter() - t0
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        tool = "zstd CLI " + (m.group(0) if (m := re.search(r"v\d+\.\d+\.\d+", ver)) else ver.strip())
    else:
        import zstandard
        t0 = time.perf_counter()
        for p in files:
            c = zstandard.ZstdCompressor(level=3, threads=threads)
            with open(p, "rb") as f, open(outdir / (p.name + ".zst"), "wb") as o:
                c.copy_stream(f, o)
        sec = time.perf_counter() - t0
        tool = f"python zstandard {zstandard.__version__} (threads={threads})"
    size = sum(p.stat().st_size for p in outdir.iterdir())
    return {"seconds": sec, "bytes": size, "tool": tool}


def best(ours: list[dict], theirs: list[dict]) -> float:
    """The ratio of the fastest runs: less sensitive to other work on a shared machine."""
    return min(r["seconds"] for r in ours) / min(r["seconds"] for r in theirs)


def alternate(n: int, ours, theirs) -> tuple[list, list]:
    """``n`` results of each of two calls, alternated (ours first in even rounds)."""
    a, b = [], []
    for i in range(n):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            (a if side == 0 else b).append(ours() if side == 0 else theirs())
    return a, b


def alternate_loads(n: int, ours: dict, theirs: dict) -> tuple[list[dict], list[dict]]:
    # Both files read just before the rounds: on this VM the kernel's DAMON pages out page-cache
    # pages left untouched for about a minute (BENCHMARKS.md, twelfth round), and a row measured
    # minutes after the run's first warm-up would start with one side's file partly on disk.
    warm([p for p in (ours.get("archive"), theirs.get("path")) if p])
    return alternate(n, lambda: run_child("load_tp", ours), lambda: run_child("load_st", theirs))


def goal_codec(fam: dict, reps: int, rep: Report, details: dict) -> None:
    """Goal 6: the default dense codec (``planes-exp`` for float32, format 1.9; and at level 19)
    and format 1.3's ``planes`` against ZipNN, on the same bytes: the base's tensors and the merged vector (the sum
    of the task vectors, in float32, as the packer computes it)."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as pt_load

    base = np_load(str(fam["base"]))
    merged = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in base.items()}
    for path in fam["tasks"].values():
        for k, v in pt_load(str(path)).items():
            merged[k] += v.float() - torch.from_numpy(base[k]).float()
    details["codec"] = {}
    for what, arrays in (("base", list(base.values())), ("merged vector", [v.numpy() for v in merged.values()])):
        _codec_rows(what, [np.ascontiguousarray(a) for a in arrays], reps, rep, details)


def _codec_rows(what: str, arrays: list, reps: int, rep: Report, details: dict) -> None:
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    from tallpack.codecs import dense_chain
    try:
        from tallpack.container import DEFAULT_CHUNK_ELEMENTS as chunk_elements
    except ImportError:
        chunk_elements = 1 << 22

    raw = sum(a.nbytes for a in arrays)
    whole = b"".join(a.tobytes() for a in arrays)
    chains = {"default": dense_chain("planes", 4, 3, "float32"), "level 19": dense_chain("planes", 4, 19, "float32"),
              "planes 1.3": dense_chain("planes", 4, 3)}
    how_of = {"default": "planes-exp, the default", "level 19": "planes-exp --level 19",
              "planes 1.3": "planes, format 1.3's default"}
    sides: dict = {}  # label -> (chain, [(encoded bytes, decoded size)], encode seconds)
    for label, chain in chains.items():
        chunks = []
        t0 = time.perf_counter()
        for arr in arrays:
            flat = arr.reshape(-1).view(np.uint8)
            step = chunk_elements * 4
            for s in range(0, flat.size, step):
                piece = flat[s : s + step]
                chunks.append((bytes(chain.encode(memoryview(piece))), piece.size))
        sides[label] = (chain, chunks, time.perf_counter() - t0)
    pool = ThreadPoolExecutor(2)

    def ours_decode(label):
        chain, chunks, _ = sides[label]
        return list(pool.map(lambda cs: chain.decode(memoryview(cs[0]), cs[1]), chunks))

    ok = all(b"".join(bytes(d) for d in ours_decode(label)) == whole for label in sides)
    zipnn_info: dict = {}
    try:
        from zipnn import ZipNN
        import importlib.metadata
        zipnn_info["version"] = importlib.metadata.version("zipnn")
        z = ZipNN(input_format="byte", bytearray_dtype="float32", threads=2)
        t0 = time.perf_counter()
        zc = z.compress(bytearray(whole))  # a copy: ZipNN 0.5.4 may overwrite its input
        zipnn_info["encode_seconds"] = time.perf_counter() - t0
        zipnn_info["roundtrip_ok"] = bytes(z.decompress(zc)) == whole
        zipnn_info["bytes"] = len(zc)
    except Exception as e:  # noqa: BLE001  (not installed, or failed: say so in the output)
        zipnn_info["error"] = f"{type(e).__name__}: {e}"
        log(f"ZipNN unavailable: {zipnn_info['error']}")
    order = [*sides, "zipnn"] if "error" not in zipnn_info else list(sides)
    times: dict = {k: [] for k in order}
    for i in range(reps):
        for k in (order if i % 2 == 0 else order[::-1]):  # alternated
            t0 = time.perf_counter()
            if k == "zipnn":
                z.decompress(zc)
            else:
                ours_decode(k)
            times[k].append(time.perf_counter() - t0)
    pool.shutdown()
    d = {"raw_bytes": raw, "chunk_elements": chunk_elements, "ours_roundtrip_ok": ok, "zipnn": zipnn_info,
         "zipnn_decode_seconds": times.get("zipnn", [])}
    for label, (chain, chunks, enc_s) in sides.items():
        d[label] = {"chain": chain.configs(), "chunks": len(chunks), "bytes": sum(len(c) for c, _ in chunks),
                    "ratio": raw / sum(len(c) for c, _ in chunks), "encode_seconds_1thread": enc_s,
                    "decode_seconds": times[label]}
    details["codec"][what] = d
    if "error" in zipnn_info:
        rep.rows.append({"goal": "6", "what": f"dense codec vs ZipNN, {what}", "note": "ZipNN: " + zipnn_info["error"],
                         "ours": d["default"]["ratio"], "unit": "x", "alternative": None, "ratio": None,
                         "met": None, "runnable": rep.load.since_mark()})
        return
    z_ratio = raw / zipnn_info["bytes"]
    z_gbs = raw / median(times["zipnn"]) / 1e9
    for label in sides:
        how = how_of[label]
        rep.add("6", f"dense codec ratio, {what} ({how})", d[label]["ratio"], z_ratio, "x",
                ">=", 1.0, alt_label=f"ZipNN {zipnn_info['version']}")
        rep.add("6", f"dense codec decode speed, 2 threads, {what} ({how})", raw / median(times[label]) / 1e9, z_gbs,
                "GB/s", ">=", 1.0, alt_label=f"ZipNN {zipnn_info['version']}")


def run_goals(a, rep: Report, details: dict) -> None:
    out: Path = a.out
    T = a.tasks
    fam = make_family(out, a.params, T, a.seed)
    details["family"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in fam.items() if k != "tasks"}
    log(f"family: {fam['params'] / 1e6:.1f}M params per member, {fam['n_tensors']} tensors, "
        f"largest {fam['largest_bytes'] / MB:.1f} MB, base + {T} tasks, {fam['member_bytes'] / MB:.1f} MB per file")
    names = list(fam["tasks"])
    files = [fam["base"], *fam["tasks"].values()]
    work = out / "perf-work"
    work.mkdir(parents=True, exist_ok=True)
    arch = {c: work / f"{c}-{T}.tallpack" for c in ("planes", "raw")}
    cb = {"cache_bytes": a.cache_bytes} if a.cache_bytes else {}
    n = a.repeats
    warm(files)
    details["idle_child_anon"] = run_child("idle", {})["anon"]

    # 5 + 7: pack (default codec, all T tasks) alternated with zstd -3 -T2; memory sampled
    rep.load.mark()
    log(f"goal 5/7: pack (planes, {T} tasks, threads={a.threads}) vs zstd -3 -T{a.threads}, {n} each")
    packs, zs = alternate(n, lambda: do_pack(fam, names, arch["planes"], "planes", a.threads),
                          lambda: zstd_files(files, work / "zstd", a.threads))
    details["pack"] = packs
    details["zstd"] = zs
    rep.add("5", f"pack time, base + {T} tasks ({sum(f.stat().st_size for f in files) / MB:.0f} MB)",
            median(p["seconds"] for p in packs), median(z["seconds"] for z in zs), "s", "<=", 1.0,
            alt_label="zstd -3 -T2", note=zs[0]["tool"], ratio_best=best(packs, zs))
    rep.add("5", "archive size", packs[0]["archive_bytes"], zs[0]["bytes"], "B", "<=", 0.25,
            alt_label="zstd -3 output")
    budget7 = (T + 4) * fam["largest_bytes"] + 300 * MB
    rep.add("7", f"pack peak RssAnon (max of {n})", max(p["peak_anon"] for p in packs), budget7, "B", "<=", 1.0,
            alt_label="budget (T+4) x largest + 300 MB")

    log(f"goal 5, for comparison: the whole `tallpack pack` command vs zstd -3 -T{a.threads}, {n} each")
    rep.load.mark()
    cli_out = work / f"planes-{T}-command.tallpack"
    cli_packs, zs2 = alternate(n, lambda: pack_command(fam, names, cli_out, a.threads),
                               lambda: zstd_files(files, work / "zstd", a.threads))
    cli_out.unlink()
    details["pack_command"] = {"tallpack": cli_packs, "zstd": zs2}
    rep.floor("5", "for comparison, not a floor: the whole `tallpack pack` command (the interpreter's start and "
              "the imports of torch and tallpack included), against the zstd command alternated with it",
              median(p["seconds"] for p in cli_packs), median(z["seconds"] for z in zs2), "zstd -3 -T2 (alternated)")

    log("packing the other archives (raw, and 2/4-task subsets for get_tensor)")
    extra = {}
    extra[("raw", T)] = do_pack(fam, names, arch["raw"], "raw", a.threads)
    sub = {}
    for k in a.get_tensor_tasks:
        for codec in ("raw", "planes"):
            if k == T:
                sub[(codec, k)] = arch[codec]
                continue
            p = work / f"{codec}-{k}.tallpack"
            extra[(codec, k)] = do_pack(fam, names[:k], p, codec, a.threads)
            sub[(codec, k)] = p
    if not a.quick:  # the family of many small tensors (goal 1's second row)
        many = make_many_family(a.out, a.seed)
        many_arch, alt_many = work / "many-planes.tallpack", work / "alt-many-t1.safetensors"
        extra[("many-planes", MANY_TASKS)] = do_pack(many, list(many["tasks"]), many_arch, "planes", a.threads)
        shutil.copyfile(many["tasks"]["t1"], alt_many)
        many_refs = {"ref": reference(many["base"], many["tasks"], "t1", work / "ref-many-t1.json")}, \
            {"ref": original_reference(many["tasks"]["t1"], work / "ref-many-t1-original.json")}
        casts, cast_refs = {}, {}  # goal 1's and 3's 16-bit rows: dtype -> (archive, the alternative's copy of task 1)
        for dtype in ("bfloat16", "float16"):
            cf = make_cast_family(fam, dtype)
            casts[dtype] = (work / f"{cf['short']}-planes.tallpack", work / f"alt-{cf['short']}-t1.safetensors")
            extra[(f"{cf['short']}-planes", CAST_TASKS)] = do_pack(cf, list(cf["tasks"]), casts[dtype][0], "planes",
                                                                   a.threads)
            shutil.copyfile(cf["tasks"][names[1]], casts[dtype][1])
            cast_refs[dtype] = (
                {"ref": reference(cf["base"], cf["tasks"], names[1], work / f"ref-{cf['short']}-{names[1]}.json")},
                {"ref": original_reference(cf["tasks"][names[1]], work / f"ref-{cf['short']}-{names[1]}-original.json")})
            # goal 5 on the 16-bit family too (the goal's family is float32): zstd has half the
            # bytes a parameter to code there, the packer the same float32 work
            rep.load.mark()
            cfiles = [Path(cf["base"]), *map(Path, cf["tasks"].values())]
            warm(cfiles)
            log(f"goal 5, {dtype}: pack of the {dtype} family vs zstd -3 -T{a.threads}, {n} each")
            p16, z16 = alternate(n, lambda: do_pack(cf, list(cf["tasks"]), casts[dtype][0], "planes", a.threads),
                                 lambda: zstd_files(cfiles, work / f"zstd-{cf['short']}", a.threads))
            details[f"pack_{dtype}"] = {"tallpack": p16, "zstd": z16}
            rep.add("5", f"pack time, {dtype} family (base + {CAST_TASKS}, "
                    f"{sum(f.stat().st_size for f in cfiles) / MB:.0f} MB)",
                    median(x["seconds"] for x in p16), median(z["seconds"] for z in z16), "s", "<=", 1.0,
                    alt_label="zstd -3 -T2", note=z16[0]["tool"], ratio_best=best(p16, z16))
            rep.add("5", f"archive size, {dtype} family", p16[0]["archive_bytes"], z16[0]["bytes"], "B", "<=", 0.25,
                    alt_label="zstd -3 output")
    details["other_packs"] = {f"{c}-{k}": v for (c, k), v in extra.items()}
    # the alternative reads copies written now, as the archives were: a file written long ago and
    # one just written can sit differently in the page cache (here a fresh copy of a member loads
    # about 15% faster, 34 against 39 ms), and both sides should sit alike
    t1, t2 = names[1], names[0]
    alt = {"base": work / "alt-base.safetensors", t1: work / f"alt-{t1}.safetensors"}
    for key, dst in alt.items():
        shutil.copyfile(fam["base"] if key == "base" else fam["tasks"][key], dst)
    fam["alt"] = {k: str(v) for k, v in alt.items()}
    # what every timed load must return, computed here and not timed: the paper's formula over
    # the original files for tallpack's side, the original file for the alternative's (which
    # reads a copy); each child checks its result after its timer stops (check_values)
    log(f"computing the reference values of {t1!r} (the paper's formula over the original files)")
    ref = {"ref": reference(fam["base"], fam["tasks"], t1, work / f"ref-{T}-{t1}.json")}
    ref_st = {"ref": original_reference(fam["tasks"][t1], work / f"ref-{t1}-original.json")}
    warm([*files, *sub.values(), *alt.values(),
          *([] if a.quick else [many_arch, alt_many, *(p for pair in casts.values() for p in pair)])])

    # 1, 2: one member, fresh process
    for goal, codec, gx in (("1", "planes", 3.0), ("2", "raw", 1.5)):
        rep.load.mark()
        log(f"goal {goal}: state_dict({t1!r}) from the {codec} archive vs load_file + clone, {n} each")
        ours, theirs = alternate_loads(n, {"archive": str(arch[codec]), "task": t1, **cb, **ref},
                                       {"path": fam["alt"][t1], **ref_st})
        details[f"load_{codec}"] = {"tallpack": ours, "safetensors": theirs}
        rep.add(goal, f"state_dict, fresh process, {codec}", median(r["seconds"] for r in ours),
                median(r["seconds"] for r in theirs), "s", "<=", gx, alt_label="load_file + clone",
                open_seconds=median(r["open_seconds"] for r in ours), ratio_best=best(ours, theirs))

    # 1, on a family of many small tensors (the shape of real checkpoints)
    if not a.quick:
        rep.load.mark()
        log(f"goal 1, many small tensors: state_dict('t1') of the 480-tensor family vs load_file + clone, {n} each")
        ours, theirs = alternate_loads(n, {"archive": str(many_arch), "task": "t1", **cb, **many_refs[0]},
                                       {"path": str(alt_many), **many_refs[1]})
        details["load_many"] = {"tallpack": ours, "safetensors": theirs}
        rep.add("1", "state_dict, fresh process, planes, 480 small tensors (12.7M parameters)",
                median(r["seconds"] for r in ours), median(r["seconds"] for r in theirs), "s", "<=", 3.0,
                alt_label="load_file + clone", open_seconds=median(r["open_seconds"] for r in ours),
                ratio_best=best(ours, theirs))

    # 1 and 3, on the 16-bit families (the main one cast, base + CAST_TASKS)
    if not a.quick:
        for dtype, (c_arch, c_alt) in casts.items():
            for goal, warm_task, gx, what in (("1", "", 3.0, "state_dict, fresh process"),
                                              ("3", t2, 1.5, "second task, same open archive")):
                rep.load.mark()
                log(f"goal {goal}, {dtype}: {what} of the {dtype} family vs load_file + clone, {n} each")
                ours, theirs = alternate_loads(n, {"archive": str(c_arch), "task": t1, "warm_task": warm_task, **cb,
                                                   **cast_refs[dtype][0]}, {"path": str(c_alt), **cast_refs[dtype][1]})
                details[f"load_{dtype}_goal{goal}"] = {"tallpack": ours, "safetensors": theirs}
                extra_open = {"open_seconds": median(r["open_seconds"] for r in ours)} if not warm_task else {}
                rep.add(goal, f"{what}, planes, {dtype} (base + {CAST_TASKS}, {c_alt.stat().st_size / 1e6:.0f} MB a member)",
                        median(r["seconds"] for r in ours), median(r["seconds"] for r in theirs), "s", "<=", gx,
                        alt_label="load_file + clone", ratio_best=best(ours, theirs), **extra_open)

    # 1, for comparison: a load that keeps nothing for a next task (cache_bytes=0)
    if not a.quick:
        rep.load.mark()
        log(f"goal 1, for comparison: state_dict({t1!r}) from the planes archive opened with cache_bytes=0, {n} each")
        ours, theirs = alternate_loads(n, {"archive": str(arch["planes"]), "task": t1, "cache_bytes": 0, **ref},
                                       {"path": fam["alt"][t1], **ref_st})
        details["load_planes_no_cache"] = {"tallpack": ours, "safetensors": theirs}
        rep.floor("1", "for comparison, not a floor: the same load from an archive opened with cache_bytes=0 "
                  "(nothing kept for a next task)", median(r["seconds"] for r in ours),
                  median(r["seconds"] for r in theirs), "load_file + clone (alternated)")

    # 3: a second task from the same open archive
    for codec in (("planes",) if a.quick else ("planes", "raw")):
        rep.load.mark()
        log(f"goal 3: state_dict({t1!r}) after state_dict({t2!r}) in one open {codec} archive, {n} each")
        ours, theirs = alternate_loads(n, {"archive": str(arch[codec]), "task": t1, "warm_task": t2, **cb, **ref},
                                       {"path": fam["alt"][t1], **ref_st})
        details[f"second_task_{codec}"] = {"tallpack": ours, "safetensors": theirs}
        rep.add("3", f"second task, same open archive, {codec}", median(r["seconds"] for r in ours),
                median(r["seconds"] for r in theirs), "s", "<=", 1.5, alt_label="load_file + clone",
                ratio_best=best(ours, theirs))

    # 4: one 4 MB tensor
    name = fam["tensor_4mb"]
    log(f"goal 4: get_tensor({t1!r}, {name!r}) vs safe_open().get_tensor() + clone, "
        f"{n} processes of {a.tensor_reps} alternated calls each, archives of {a.get_tensor_tasks} tasks")
    details["get_tensor"] = {}
    tensor_refs = {"ref_st": original_reference(fam["tasks"][t1], work / f"ref-{t1}-{name}-original.json", only=name),
                   **{k: reference(fam["base"], {t: fam["tasks"][t] for t in names[:k]}, t1,
                                   work / f"ref-{k}-{t1}-{name}.json", only=name) for k in a.get_tensor_tasks}}
    for codec, gx in (("raw", 2.0), ("planes", 4.0)):
        for k in a.get_tensor_tasks:
            rep.load.mark()
            warm([sub[(codec, k)], fam["alt"][t1]])
            # several processes: one process's calls move together (where its buffers landed)
            runs = [run_child("get_tensor", {"archive": str(sub[(codec, k)]), "task": t1, "name": name,
                                             "path": fam["alt"][t1], "reps": a.tensor_reps,
                                             "ref": tensor_refs[k], "ref_st": tensor_refs["ref_st"],
                                             "floors": k == T and i == 0, **cb}) for i in range(n)]
            details["get_tensor"][f"{codec}-{k}"] = runs
            rep.add("4", f"get_tensor {runs[0]['nbytes'] / MB:.1f} MB, {codec}, {k} tasks",
                    median(median(r["tallpack"]) for r in runs), median(median(r["safetensors"]) for r in runs),
                    "s", "<=", gx, alt_label="safe_open get_tensor + clone",
                    ratio_best=min(min(r["tallpack"]) / min(r["safetensors"]) for r in runs))

    # 4, for comparison: one rank of 8-way tensor parallelism (get_slice of every tensor)
    slice_refs = (reference(fam["base"], fam["tasks"], t1, work / f"ref-{T}-{t1}-rows8.json", rows_div=8),
                  original_reference(fam["tasks"][t1], work / f"ref-{t1}-rows8-original.json", rows_div=8))
    for codec in ("planes", "raw"):
        rep.load.mark()
        log(f"goal 4, for comparison: get_slice of 1/8 of every tensor's rows, {codec}, fresh process, {n} each")
        ours, theirs = alternate(n, lambda: run_child("slices", {"archive": str(arch[codec]), "task": t1, "n": 8, **cb,
                                                                 "ref": slice_refs[0]}),
                                 lambda: run_child("slices", {"path": fam["alt"][t1], "n": 8, "ref": slice_refs[1]}))
        details[f"slices_{codec}"] = {"tallpack": ours, "safetensors": theirs}
        rep.floor("4", f"for comparison, not a floor: one rank of 8-way tensor parallelism, fresh process (open, then "
                  f"`get_slice(task, name)[0:rows // 8]` of every tensor), {codec}", median(r["seconds"] for r in ours),
                  median(r["seconds"] for r in theirs), "safe_open + the same get_slice + clone (alternated)")

    # 6: the dense codec
    rep.load.mark()
    log(f"goal 6: planes vs ZipNN on the base's bytes, decode {n} each, 2 threads")
    goal_codec(fam, n, rep, details)

    floors(fam, arch, t1, t2, T, n, rep, details, a.cache_bytes, ref_st)
    if not a.quick:
        floors_16(fam, casts, t1, n, rep, details, cast_refs)

    # 8: unpack peak memory
    rep.load.mark()
    log(f"goal 8: tallpack unpack --task {t1} (planes archive), {min(n, 3)} runs")
    from safetensors import safe_open
    unp = []
    for _ in range(min(n, 3)):
        d = work / "unpacked"
        if d.exists():
            shutil.rmtree(d)
        unp.append(run_child("unpack_cli", {"archive": str(arch["planes"]), "task": t1, "dir": str(d)},
                             sample_memory=True))
        with contextlib.ExitStack() as stack:  # what it wrote, checked here after the child ended
            files = [stack.enter_context(safe_open(str(p), "pt")) for p in sorted(d.glob("*.safetensors"))]
            got = {k: f.get_tensor(k) for f in files for k in f.keys()}
            if msg := mismatch(got, ref["ref"], f"tallpack unpack --task {t1}, {d}"):
                raise ValueMismatch(msg)
    details["unpack"] = unp
    rep.add("8", f"unpack peak RssAnon (max of {len(unp)})", max(u["peak_anon"] for u in unp),
            3 * fam["largest_bytes"] + 300 * MB, "B", "<=", 1.0, alt_label="budget 3 x largest + 300 MB",
            seconds=median(u["seconds"] for u in unp))

    # where state_dict spends its time
    log("profiling state_dict (cProfile)")
    details["profile"] = {c: run_child("profile", {"archive": str(arch[c]), "task": t1, **cb, **ref})
                          for c in ("planes", "raw")}


def floors(fam: dict, arch: dict[str, Path], t1: str, t2: str, T: int, n: int, rep: Report, details: dict,
           cache_bytes: int, ref_st: dict) -> None:
    """How far down goals 1 to 4 can go, measured in this run: the parts of the work that any
    reader of this format must do, each against the goal's own alternative (its loads checked
    against ``ref_st``, the original's values)."""
    st1 = median(r["seconds"] for r in details["load_planes"]["safetensors"])
    label = "load_file + clone (goal 1's median)"
    codec = details.get("codec", {})
    if "base" in codec and "merged vector" in codec:
        dec = sum(median(codec[w]["default"]["decode_seconds"]) for w in ("base", "merged vector"))
        rep.floor("1", "decoding the base and the merged vector alone (planes-exp, 2 threads, goal 6's medians)",
                  dec, st1, label)
    numels = [_prod(s) for s in shapes(fam["layers"]).values()]
    rep.load.mark()
    log(f"floor 2: a fresh process doing raw's arithmetic alone, {n} each")
    load_st = lambda: run_child("load_st", {"path": fam["alt"][t1], **ref_st})  # noqa: E731
    ar, st = alternate(n, lambda: run_child("arith_fresh", {"base": fam["alt"]["base"], "other": fam["alt"][t1]}),
                       load_st)
    details["floor_arith_fresh"] = {"arith": ar, "safetensors": st}
    rep.floor("2", "fresh process: the reconstruction's arithmetic alone (addcmul of two mapped files, the mask "
              "already decoded, fresh outputs)", median(r["seconds"] for r in ar), median(r["seconds"] for r in st),
              "load_file + clone (alternated)")
    for masks, what in ((False, "the mask already decoded"), (True, "the task's mask chunks checked and decoded")):
        rep.load.mark()
        log(f"floor 2: a fresh process doing raw's checked arithmetic alone ({what}), {n} each")
        ck, st = alternate(n, lambda: run_child("raw_checked", {"archive": str(arch["raw"]), "task": t1,
                                                                   "masks": masks}),
                           load_st)
        details[f"floor_raw_checked{'_masks' if masks else ''}"] = {"checked": ck, "safetensors": st}
        rep.floor("2", f"fresh process: raw's checked arithmetic alone, one loop (map the raw archive; per chunk, "
                  f"the checksums, then addcmul into fresh outputs, {what}; unmap; no manifest parse)",
                  median(r["seconds"] for r in ck), median(r["seconds"] for r in st), "load_file + clone (alternated)")
    rep.load.mark()
    log(f"floor 3: goal 3's work in one loop (masks decoded, addcmul into fresh outputs), {n} each")
    sf, st = alternate(n, lambda: run_child("second_floor", {"archive": str(arch["planes"]), "task": t1, "warm_task": t2,
                                                             "cache_bytes": cache_bytes}), load_st)
    details["floor_second_task"] = {"loop": sf, "safetensors": st}
    rep.floor("3", "second task, planes: one loop (the task's mask chunks checked and decoded, addcmul with the "
              "cached base and merged vector into fresh outputs; no threads)", median(r["seconds"] for r in sf),
              median(r["seconds"] for r in st), "load_file + clone (alternated)")
    # goal 1's pages: the output, and what the first task keeps in the cache for the next (the
    # planes of base and merged vector that zstd coded: about a quarter of their floats)
    held = int(median(r.get("cache_held", 0) for r in details["load_planes"]["tallpack"]))
    for goal, extra, what in (("2", [], "the output"),
                              ("1", [held // 4] if held else [], "the output and what the cache keeps")):
        rep.load.mark()
        log(f"floor {goal}: a fresh process allocating and filling {what}, {n} each")
        fill, st = alternate(n, lambda: run_child("fill", {"numels": numels + extra, "copies": 1}), load_st)
        details[f"floor_fill_{goal}"] = {"fill": fill, "safetensors": st, "held_bytes": held}
        rep.floor(goal, f"fresh process: allocate and fill {what} ({fam['member_bytes'] / MB:.0f} MB"
                  f"{f' + {held / MB:.0f} MB' if extra else ''}), nothing else",
                  median(r["seconds"] for r in fill), median(r["seconds"] for r in st), "load_file + clone (alternated)")
    for codec in ("raw", "planes"):
        fl = (details["get_tensor"].get(f"{codec}-{T}") or [{}])[0].get("floors")
        if not fl:
            continue
        st = median(fl["safetensors"])
        for k, what in (("mask", "reading the task's mask alone"), ("arith", "the arithmetic alone (addcmul, hot inputs)")):
            rep.floor("4", f"get_tensor, {codec}, {T} tasks: {what}", median(fl[k]), st,
                      "safe_open get_tensor + clone (alternated)")


def floors_16(fam: dict, casts: dict, t1: str, n: int, rep: Report, details: dict, cast_refs: dict) -> None:
    """Goal 1's floors for the 16-bit families: a first task decodes a float32 merged vector (4
    bytes a parameter) for a member of 2, and keeps what it decoded for the next task. The
    decoding alone, the fresh pages alone, and the same load keeping nothing, each against the
    16-bit member's load_file + clone, alternated."""
    numels = [_prod(s) for s in shapes(fam["layers"]).values()]
    for dtype, (c_arch, c_alt) in casts.items():
        load_st = lambda: run_child("load_st", {"path": str(c_alt), **cast_refs[dtype][1]})  # noqa: E731
        rep.load.mark()
        log(f"floor 1, {dtype}: a fresh process decoding the coded planes alone, {n} each")
        dec, st = alternate(n, lambda: run_child("decode_planes", {"archive": str(c_arch)}), load_st)
        details[f"floor_decode_{dtype}"] = {"decode": dec, "safetensors": st}
        rep.floor("1", f"{dtype}: fresh process: decoding the base's and merged vector's planes alone (arrays of "
                  f"{dec[0]['decoded_bytes'] / MB:.0f} MB, 2 threads, into reused buffers; no fill)",
                  median(r["seconds"] for r in dec), median(r["seconds"] for r in st), "load_file + clone (alternated)")
        held = int(median(r.get("cache_held", 0) for r in details[f"load_{dtype}_goal1"]["tallpack"]))
        rep.load.mark()
        log(f"floor 1, {dtype}: a fresh process allocating and filling the output and what the cache keeps, {n} each")
        fill, st = alternate(n, lambda: run_child("fill", {"numels": numels, "copies": 1, "dtype": dtype,
                                                           "held": [held] if held else []}), load_st)
        details[f"floor_fill_{dtype}"] = {"fill": fill, "safetensors": st, "held_bytes": held}
        rep.floor("1", f"{dtype}: fresh process: allocate and fill the output and what the cache keeps "
                  f"({fam['member_bytes'] / 2 / MB:.0f} MB + {held / MB:.0f} MB), nothing else",
                  median(r["seconds"] for r in fill), median(r["seconds"] for r in st), "load_file + clone (alternated)")
        rep.load.mark()
        log(f"goal 1, {dtype}, for comparison: state_dict({t1!r}) opened with cache_bytes=0, {n} each")
        ours, theirs = alternate_loads(n, {"archive": str(c_arch), "task": t1, "cache_bytes": 0, **cast_refs[dtype][0]},
                                       {"path": str(c_alt), **cast_refs[dtype][1]})
        details[f"load_{dtype}_no_cache"] = {"tallpack": ours, "safetensors": theirs}
        rep.floor("1", f"{dtype}: for comparison, not a floor: the same load opened with cache_bytes=0 (nothing "
                  "kept for a next task)", median(r["seconds"] for r in ours), median(r["seconds"] for r in theirs),
                  "load_file + clone (alternated)")


# ---------------------------------------------------------------------------------------------
# scaling mode


def run_scaling(a) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {"points": []}
    load = LoadMonitor()
    work = a.out / "perf-work"
    work.mkdir(parents=True, exist_ok=True)
    cb = {"cache_bytes": a.cache_bytes} if a.cache_bytes else {}
    for params in a.scaling_params:
        fam = make_family(a.out, params, max(a.scaling_tasks), a.seed)
        names = list(fam["tasks"])
        for T in a.scaling_tasks:
            files = [fam["base"], *(fam["tasks"][t] for t in names[:T])]
            warm(files)
            load.mark()
            arch = work / f"scaling-L{fam['layers']}-{T}.tallpack"
            os.sync()  # neither side starts while the disk writes back the family or the other's output
            p = do_pack(fam, names[:T], arch, "planes", a.threads)
            os.sync()
            z = zstd_files(files, work / "zstd", a.threads)
            other = work / "alt-scaling.safetensors"  # written now, as the archive (see run_goals)
            shutil.copyfile(fam["tasks"][names[1]], other)
            warm([arch, other])
            refs = (reference(fam["base"], {t: fam["tasks"][t] for t in names[:T]}, names[1],
                              work / f"ref-scaling-L{fam['layers']}-{T}.json"),
                    original_reference(fam["tasks"][names[1]], work / f"ref-scaling-L{fam['layers']}-original.json"))
            ours, theirs = alternate_loads(a.scaling_repeats, {"archive": str(arch), "task": names[1], **cb,
                                                               "ref": refs[0]}, {"path": str(other), "ref": refs[1]})
            pt = {"params": fam["params"], "layers": fam["layers"], "tasks": T,
                  "input_bytes": sum(f.stat().st_size for f in files), "archive_bytes": p["archive_bytes"],
                  "pack_seconds": p["seconds"], "zstd_seconds": z["seconds"], "zstd_bytes": z["bytes"],
                  "pack_peak_anon": p["peak_anon"],
                  "memory_budget": (T + 4) * fam["largest_bytes"] + 300 * MB,
                  "load_tallpack_s": median(r["seconds"] for r in ours),
                  "load_safetensors_s": median(r["seconds"] for r in theirs)}
            pt["load_ratio"] = pt["load_tallpack_s"] / pt["load_safetensors_s"]
            pt["runnable"] = load.since_mark()
            res["points"].append(pt)
            log(f"  {fam['params'] / 1e6:.0f}M x {T} tasks: pack {p['seconds']:.1f}s (zstd {z['seconds']:.1f}s), "
                f"peak {p['peak_anon'] / MB:.0f} MB (budget {pt['memory_budget'] / MB:.0f}), "
                f"load {pt['load_ratio']:.1f}x safetensors")
            arch.unlink()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for params in sorted({p["params"] for p in res["points"]}):
        pts = [p for p in res["points"] if p["params"] == params]
        ts = [p["tasks"] for p in pts]
        lab = f"{params / 1e6:.0f}M/member"
        line, = ax[0].plot(ts, [p["pack_seconds"] for p in pts], "o-", label=f"tallpack {lab}")
        ax[0].plot(ts, [p["zstd_seconds"] for p in pts], "x--", color=line.get_color(), label=f"zstd -3 -T2 {lab}")
        ax[1].plot(ts, [p["load_ratio"] for p in pts], "o-", color=line.get_color(), label=lab)
        ax[2].plot(ts, [p["pack_peak_anon"] / MB for p in pts], "o-", color=line.get_color(), label=f"peak {lab}")
    bud = sorted({(p["tasks"], p["memory_budget"]) for p in res["points"]})
    ax[2].plot([t for t, _ in bud], [b / MB for _, b in bud], "k:", label="budget (T+4) x largest + 300 MB")
    ax[1].axhline(3.0, color="k", ls=":", label="goal 3.0x")
    for x, title, yl in zip(ax, ("pack time", "state_dict vs load_file + clone", "pack peak RssAnon"),
                            ("seconds", "time ratio", "MB")):
        x.set_title(title)
        x.set_xlabel("tasks")
        x.set_ylabel(yl)
        x.set_xscale("log", base=2)
        x.set_xticks(a.scaling_tasks, [str(t) for t in a.scaling_tasks])
        x.set_ylim(bottom=0)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.figure, dpi=110)
    return res


# ---------------------------------------------------------------------------------------------
# output


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "--", "tallpack"))}


def meta(a, command: str) -> dict:
    import torch
    from tallpack import kernels  # the children inherit this process's environment, so its choice
    g = git_state()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command, **g,
            "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "repeats": a.repeats,
            "loops": "compiled kernels" if kernels.COMPILED else "numpy loops (no compiled kernels)",
            "omp_wait_policy": child_env()["OMP_WAIT_POLICY"]}


def table(rows: list[dict]) -> str:
    lines = ["| goal | what | ours | alternative | ratio | goal | met? | ratio of fastest runs | runnable |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        run = f"{r['runnable']:.1f}" if r.get("runnable") is not None else "?"
        rb = f"{r['ratio_best']:.2f}x" if r.get("ratio_best") is not None else ""
        if r.get("ratio") is None:
            lines.append(f"| {r['goal']} | {r['what']} | {fmt(r['ours'], r['unit'])} | n/a | n/a | | {r['note']} | | {run} |")
            continue
        alt = f"{fmt(r['alternative'], r['unit'])} ({r['alt_label']})" if r["alt_label"] else fmt(r["alternative"], r["unit"])
        lines.append(f"| {r['goal']} | {r['what']} | {fmt(r['ours'], r['unit'])} | {alt} | {r['ratio']:.2f}x | "
                     f"{r['goal_op']} {r['goal_x']:g}x | {'yes' if r['met'] else 'NO'} | {rb} | {run} |")
    return "\n".join(lines)


def floors_md(rows: list[dict]) -> str:
    lines = ["| goal | the part of the work | time | alternative | ratio | runnable |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        run = f"{r['runnable']:.1f}" if r.get("runnable") is not None else "?"
        lines.append(f"| {r['goal']} | {r['what']} | {fmt(r['seconds'], 's')} | {fmt(r['alternative'], 's')} "
                     f"({r['alt_label']}) | {r['ratio']:.2f}x | {run} |")
    return "\n".join(lines)


def profile_md(prof: dict) -> str:
    out = []
    for codec, p in prof.items():
        out.append(f"`state_dict` of one task, {codec} archive: {p['seconds']:.2f} s under cProfile "
                   f"(profiler overhead included).\n")
        out.append("| library function (by cumulative time) | calls | cumulative s | own s |")
        out.append("|---|---:|---:|---:|")
        for r in p["lib_by_cumtime"]:
            out.append(f"| `{r['function']}` | {r['ncalls']} | {r['cumtime']:.3f} | {r['tottime']:.3f} |")
        out.append("")
        out.append("| any function (by own time) | calls | own s | share of total |")
        out.append("|---|---:|---:|---:|")
        for r in p["all_by_tottime"]:
            out.append(f"| `{r['function']}` | {r['ncalls']} | {r['tottime']:.3f} | "
                       f"{r['tottime'] / p['total_tt']:.0%} |")
        out.append("")
    return "\n".join(out)


def baseline_md(res: dict) -> str:
    from tallpack.cache import DEFAULT_CACHE_BYTES as DEFAULT_CACHE

    m, fam, d = res["meta"], res["details"]["family"], res["details"]
    commit = m["commit"] + (" (library modified)" if m["library_dirty"] else "")
    met = sum(1 for r in res["rows"] if r.get("met"))
    codec = d.get("codec", {}).get("base", {})
    z = codec.get("zipnn", {})
    zl = (f"ZipNN {z['version']} (`ZipNN(input_format='byte', bytearray_dtype='float32', threads=2)`) on the "
          "same bytes, as one buffer" if "version" in z else f"ZipNN could not be used: {z.get('error')}")
    return f"""{SECTION_BASELINE} at commit {commit}

Produced by `{m['command']}` on {m['date']} ({m['machine']}, {m['cpus']} CPUs, Python {m['python']},
torch {m['torch']}, tallpack's {m.get('loops', 'numpy loops')}, OMP_WAIT_POLICY={m.get('omp_wait_policy', 'unset')} in every child; 2-core shared machine; sizes exact, times are medians of {m['repeats']} runs
alternated with the alternative in the same run; total runtime {res['runtime_s'] / 60:.1f} min).
Raw numbers and every sample: `benchmarks/out/{res['json_name']}`.

Family: float32, {fam['params'] / 1e6:.1f}M parameters per member in {fam['n_tensors']} tensors
({fam['layers']} layer(s) of hidden 512 with q, k, v, o, up 2048x512, down 512x2048, norm; an
8000x512 embedding, the largest tensor, {fam['largest_bytes'] / MB:.1f} MB), base + {res['args']['tasks']}
fine-tunes (1e-4 noise everywhere, 2e-3 on a task-specific random 10%), {fam['member_bytes'] / MB:.0f} MB
per safetensors file. Archives packed with `threads={res['args']['threads']}`, level 3.

How each row is measured:
- loads (1-3): each sample is a fresh process that imports torch, tallpack and safetensors, then
  times only the load: `tallpack.open` + `state_dict(task)` (1, 2), or `state_dict(t2)` after an
  untimed `state_dict(t1)` on the same open archive (3), the archive opened with
  `cache_bytes={res['args']['cache_bytes']:,}` (`--cache-bytes`; the library's default is {DEFAULT_CACHE:,}) unless a row
  says otherwise, against `load_file(original)` and a
  `clone()` of every tensor; page cache warm; the original read is a copy written in this run, as
  the archives are (a file just written and one written long ago sit differently in the page cache).
- get_tensor (4): {res['args']['repeats']} processes per archive; in each, one warm-up call each,
  then {res['args']['tensor_reps']} alternated calls of `get_tensor` on the open archive and
  `get_tensor(name).clone()` on an open `safe_open` handle; the median of the processes' medians.
- pack (5, 7): fresh process timing `tallpack.pack`, alternated with `{d['zstd'][0]['tool']}`
  (`zstd -3 -T2` over the same {res['args']['tasks'] + 1} files, one .zst each); peak memory is the
  pack process's RssAnon sampled every 20 ms (an idle child with torch and tallpack imported holds
  {d['idle_child_anon'] / MB:.0f} MB).
- codec (6): the base checkpoint's tensors, and the merged vector (the sum of the task vectors in
  float32), encoded per {codec.get('chunk_elements', 0):,}-element chunk ({codec.get('default', codec).get('chunks', 0)}
  chunks each) with the default chain for float32 (`planes-exp`, format 1.11), the same at
  `--level 19` (rotations chosen per chunk) and format 1.3's `planes`, decoded by a 2-thread pool
  (the four decoders alternated); against {zl}.
- unpack (8): `tallpack unpack ARCHIVE --task NAME -o DIR` (the planes archive) in a
  fresh process, RssAnon sampled every 20 ms.

{met} of {len(res['rows'])} rows meet their goal. `ratio of fastest runs`: min(ours) / min(alternative), a second view that
other work on the machine disturbs less (the goals are judged on medians). `runnable`: the machine's mean runnable threads while
the row was measured (`procs_running` of /proc/stat every 0.25 s, this benchmark's own included; 2
cores, so above about 2 the two sides competed with other work and times are less reliable).

{table(res['rows'])}

### Floors: how far down the missed ratios can go (measured in this run)

Parts of the work that any reader of this format has to do, each timed alone against its goal's
alternative. They are not goals; a floor above a goal means that goal cannot be met by a faster
implementation of the same format on this machine. Goal 4's floors are timed inside the same
process as its row, on the archive of {res['args']['tasks']} tasks, through the library's internals.

{floors_md(res.get('floors', []))}

### Where `state_dict` spends its time (cProfile, one task)

{profile_md(d['profile'])}"""


def scaling_md(res: dict) -> str:
    m = res["meta"]
    lines = [f"{SECTION_SCALING} with family size (commit {m['commit']}"
             f"{', library modified' if m['library_dirty'] else ''})", "",
             f"Produced by `{m['command']}` on {m['date']} (2-core shared machine; tallpack's "
             f"{m.get('loops', 'numpy loops')}; one pack per point, "
             f"load ratio the median of {res['args']['scaling_repeats']} alternated fresh-process pairs; "
             f"planes, threads={res['args']['threads']}; total runtime {res['runtime_s'] / 60:.1f} min). "
             f"Plot: `{res['figure']}`; numbers: `benchmarks/out/{res['json_name']}`.", "",
             "| params/member | tasks | input | archive | pack s | zstd -3 -T2 s | pack / zstd | "
             "pack peak RssAnon | budget (T+4) x largest + 300 MB | state_dict / load_file+clone | runnable |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res["points"]:
        lines.append(f"| {p['params'] / 1e6:.1f}M | {p['tasks']} | {p['input_bytes'] / MB:,.0f} MB | "
                     f"{p['archive_bytes'] / MB:,.0f} MB | {p['pack_seconds']:.1f} | {p['zstd_seconds']:.1f} | "
                     f"{p['pack_seconds'] / p['zstd_seconds']:.1f}x | {p['pack_peak_anon'] / MB:,.0f} MB | "
                     f"{p['memory_budget'] / MB:,.0f} MB | {p['load_ratio']:.1f}x | {p['runnable']:.1f} |")
    lines += ["", "`runnable`: the machine's mean runnable threads during the point (2 cores; see above).",
              "", f"![scaling]({res['figure']})", ""]
    return "\n".join(lines)


def replace_section(md_path: Path, prefix: str, body: str) -> None:
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    start = text.find(prefix)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        nxt = re.search(r"^## ", text[start + len(prefix):], flags=re.M)
        end = start + len(prefix) + nxt.start() if nxt else len(text)
        tail = text[end:]
        text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    md_path.write_text(text)


def print_table(rows: list[dict]) -> None:
    print()
    print("what | ours | alternative | ratio | goal | met?")
    for r in rows:
        if r.get("ratio") is None:
            print(f"{r['what']} | {fmt(r['ours'], r['unit'])} | n/a | n/a | | {r['note']}")
            continue
        print(f"{r['what']} | {fmt(r['ours'], r['unit'])} | {fmt(r['alternative'], r['unit'])} "
              f"({r['alt_label']}) | {r['ratio']:.2f}x | {r['goal_op']} {r['goal_x']:g}x | "
              f"{'yes' if r['met'] else 'NO'}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=26e6, help="parameters per member (default 26e6)")
    ap.add_argument("--tasks", type=int, default=8, help="fine-tunes in the family (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per side, alternated (default 5)")
    ap.add_argument("--tensor-reps", type=int, default=21, help="alternated get_tensor calls per side")
    ap.add_argument("--threads", type=int, default=2, help="pack threads, and zstd -T (default 2)")
    ap.add_argument("--cache-bytes", type=int, default=512 << 20,
                    help="passed to tallpack.open(cache_bytes=...) where the library accepts it; 0: never")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small family and 3 repeats (under 2 minutes)")
    ap.add_argument("--scaling", action="store_true", help="pack/load/memory for 2..16 tasks, two sizes")
    ap.add_argument("--scaling-params", type=float, nargs="+", default=[13e6, 52e6])
    ap.add_argument("--scaling-tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--scaling-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--figure", type=Path, default=HERE / "perf_scaling.png")
    ap.add_argument("--benchmarks-md", type=Path, default=None,
                    help="replace this mode's section of this markdown file (e.g. BENCHMARKS.md)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], json.loads(a.child[1]))))
        return 0
    command = " ".join(["python benchmarks/perf.py", *(sys.argv[1:] if argv is None else argv)])
    if a.quick:
        a.params, a.tasks, a.repeats, a.tensor_reps = 6e6, 4, 3, 11
        a.scaling_params, a.scaling_tasks, a.scaling_repeats = [6e6], [2, 4], 1
    a.get_tensor_tasks = sorted({k for k in (2, 4, 8) if k <= a.tasks} | {a.tasks})
    if a.tasks < 2:
        ap.error("--tasks must be at least 2")
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"}

    if a.scaling:
        if a.quick:
            a.figure = a.out / "perf_scaling_quick.png"
        try:
            res = run_scaling(a)
        except ValueMismatch as e:
            log(f"FAILED: a timed load returned wrong values: {e}")
            return 1
        path = a.out / ("perf_scaling_quick.json" if a.quick else "perf_scaling.json")
        fig = a.figure.resolve()
        res.update(meta=meta(a, command), args=args_json, runtime_s=time.perf_counter() - t_start,
                   json_name=path.name, figure=str(fig.relative_to(REPO)) if fig.is_relative_to(REPO) else str(fig))
        path.write_text(json.dumps(res, indent=2))
        md = scaling_md(res)
        path.with_suffix(".md").write_text(md)
        if a.benchmarks_md:
            replace_section(a.benchmarks_md, SECTION_SCALING, md)
        print(md)
        log(f"done in {res['runtime_s']:.0f}s; wrote {path} and {a.figure}")
        return 0

    rep, details = Report(), {}
    try:
        run_goals(a, rep, details)
    except ValueMismatch as e:
        log(f"FAILED: a timed load returned wrong values: {e}")
        return 1
    rep.load.stop()
    details["runnable_samples"] = rep.load.samples
    rep.rows.sort(key=lambda r: r["goal"])
    path = a.out / ("perf_quick.json" if a.quick else "perf.json")
    res = {"meta": meta(a, command), "args": args_json, "rows": rep.rows, "floors": rep.floors, "details": details,
           "runtime_s": time.perf_counter() - t_start, "json_name": path.name}
    path.write_text(json.dumps(res, indent=2))
    md = baseline_md(res)
    (a.out / ("perf_quick.md" if a.quick else "perf.md")).write_text(md)
    if a.benchmarks_md:
        replace_section(a.benchmarks_md, SECTION_BASELINE, md)
    print_table(rep.rows)
    print(profile_md(details["profile"]))
    log(f"done in {res['runtime_s']:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
