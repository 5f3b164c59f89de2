"""Round 35, helper F: the memory of a long-running service that keeps archives open and serves
requests from many threads.

Each configuration runs in a fresh process (``child``): it opens N archives of one family (the same
file, opened N times: N caches, N pools), starts R request threads that for a fixed time each take
a random archive and task and call ``state_dict`` or ``get_tensor``, and samples, every 0.25 s,
VmRSS, RssAnon (``/proc/self/status``) and the process's thread count. It prints one JSON line:
the peaks, the plateau (median of the second half of the samples), the median time of each kind of
read, and what is left after the requests end (threads joined; archives still open, then closed).

    python benchmarks/rounds/r35/F_service.py build                     # the family, in /tmp/r35F
    python benchmarks/rounds/r35/F_service.py run --archives 1 4 16     # the table
    python benchmarks/rounds/r35/F_service.py run --archives 16 --variants plain trim arena2
    python benchmarks/rounds/r35/F_service.py run --trees /tmp/r35F/base /tmp/r35F/wt   # A/B of two checkouts
    python benchmarks/rounds/r35/F_service.py run --archives 16 --per-thread 80 --idle-wait 0 --repeat 3 \
        --trees /tmp/r35F/base /tmp/r35F/wt                            # fixed work: CPU seconds per work

(``/tmp/r35F/base``: ``git worktree add /tmp/r35F/base 6120d25``; ``/tmp/r35F/wt``: main with
``/tmp/r35/F_shared_pool.patch`` applied; the compiled ``_kernels*.so`` copied into each.)

Variants: ``plain``; ``trim``: ``memory.give_back`` (``malloc_trim(0)``) after every request;
``trimsd``: the same after each ``state_dict`` only; ``arena2``/``arena4``: ``mallopt(M_ARENA_MAX, n)``
at the child's start (the process-wide cap); ``mmap1``: ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` (blocks of
1 MiB or more mapped and unmapped each time, glibc's growing threshold off); ``wide128``: the shared
reading threads' limit raised to 128 (as many as sixteen archives' own pools had).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path("/tmp/r35F")
TASKS = ["a", "b", "c", "d"]


def build() -> Path:
    """A float32 family of four tasks, 20 MB a task (5.2M parameters in 10 tensors)."""
    import torch
    from safetensors.torch import save_file

    import tallpack

    HERE.mkdir(exist_ok=True)
    out = HERE / "fam.tallpack"
    if out.exists():
        return out
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.w": torch.randn(768, 640, generator=g) for i in range(10)}
    save_file(base, HERE / "base.safetensors")
    tasks = {}
    for t in TASKS:
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
              for k, v in base.items()}
        save_file(sd, HERE / f"{t}.safetensors")
        tasks[t] = HERE / f"{t}.safetensors"
    tallpack.pack(HERE / "base.safetensors", tasks, out)
    return out


def status() -> dict[str, int]:
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                got[k] = int(v.split()[0])
    return got


def child(args: argparse.Namespace) -> None:
    import tallpack
    from tallpack import memory

    if args.variant.startswith("arena"):
        ctypes.CDLL(None).mallopt(-8, int(args.variant[5:]))  # M_ARENA_MAX
    if args.variant.startswith("mmap"):  # M_MMAP_THRESHOLD in MiB (fixed: glibc's growing threshold off)
        ctypes.CDLL(None).mallopt(-3, int(args.variant[4:]) << 20)
    if args.variant.startswith("wide"):  # the shared reading threads allowed as many as 16 pools had
        from tallpack import container
        container.reading_threads(int(args.variant[4:]))
    path = HERE / "fam.tallpack"
    fams = [tallpack.open(path, threads=args.threads, cache_bytes=args.cache_mb << 20) for _ in range(args.archives)]
    names = fams[0].keys("a")
    times: dict[str, list[float]] = {"state_dict": [], "get_tensor": []}
    stop = threading.Event()
    errors: list[BaseException] = []

    done = threading.Event()  # the request threads stay alive, idle, until then (a service's do)

    def request(i: int) -> None:
        rnd = random.Random(i)
        try:
            for _ in range(args.per_thread or 1 << 62):
                if stop.is_set():
                    break
                fam, task = rnd.choice(fams), rnd.choice(TASKS)
                t0 = time.perf_counter()
                if rnd.random() < 0.3:
                    sd = fam.state_dict(task)
                    kind = "state_dict"
                else:
                    sd = {n: fam.get_tensor(task, n) for n in rnd.sample(names, 3)}
                    kind = "get_tensor"
                del sd
                if args.variant == "trim" or (args.variant == "trimsd" and kind == "state_dict"):
                    memory.give_back(1 << 20)
                times[kind].append(time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        idle.release()
        done.wait()

    idle = threading.Semaphore(0)
    base = status()
    samples = []
    threads = [threading.Thread(target=request, args=(i,)) for i in range(args.requests)]
    t0, cpu0, faults0 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for th in threads:
        th.start()
    while time.perf_counter() - t0 < args.seconds or args.per_thread:
        time.sleep(0.25)
        samples.append(status())
        if args.per_thread and idle._value == len(threads):  # every request thread done (fixed work)
            break
    stop.set()
    for th in threads:
        idle.acquire()
    cpu1, wall = os.times(), time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    time.sleep(0.3)
    cached = sum(f._cache.size for f in fams)
    idle_open = status()  # request threads alive and idle, archives open
    time.sleep(args.idle_wait)
    idle_later = status()  # the same, ``--idle-wait`` seconds later
    trim = ctypes.CDLL(None).malloc_trim
    trim(0)
    idle_trimmed = status()
    done.set()
    for th in threads:
        th.join()
    time.sleep(0.3)
    trim(0)
    ended_trimmed = status()  # request threads ended (their thread-local buffers with them)
    for fam in fams:
        fam.close()
    time.sleep(0.3)
    after_close = status()
    trim(0)
    closed_trimmed = status()
    half = samples[len(samples) // 2 :]
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    print(json.dumps({
        "archives": args.archives, "threads": args.threads, "requests": args.requests, "variant": args.variant,
        "cache_mb": args.cache_mb, "errors": [repr(e) for e in errors[:3]],
        "start_rss_mb": mb(base["VmRSS"]), "start_threads": base["Threads"],
        "peak_rss_mb": mb(max(s["VmRSS"] for s in samples)), "peak_anon_mb": mb(max(s["RssAnon"] for s in samples)),
        "plateau_rss_mb": mb(statistics.median(s["VmRSS"] for s in half)),
        "plateau_anon_mb": mb(statistics.median(s["RssAnon"] for s in half)),
        "peak_threads": max(s["Threads"] for s in samples),
        "reads": {k: len(v) for k, v in times.items()},
        "cpu_s": round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1), "wall_s": round(wall, 1),
        "sys_s": round(cpu1.system - cpu0.system, 1), "minor_faults_k": faults // 1000,
        "load": round(os.getloadavg()[0], 1),
        "median_ms": {k: round(1000 * statistics.median(v), 1) if v else None for k, v in times.items()},
        "idle": {"anon_mb": mb(idle_open["RssAnon"]), "threads": idle_open["Threads"], "cached_mb": mb(cached / 1024),
                 "trimmed_anon_mb": mb(idle_trimmed["RssAnon"]),
                 "later": {"after_s": args.idle_wait, "anon_mb": mb(idle_later["RssAnon"]),
                           "threads": idle_later["Threads"]}},
        "requests_ended_trimmed_anon_mb": mb(ended_trimmed["RssAnon"]),
        "closed": {"anon_mb": mb(after_close["RssAnon"]), "threads": after_close["Threads"],
                   "trimmed_anon_mb": mb(closed_trimmed["RssAnon"])},
    }), flush=True)


def run(args: argparse.Namespace) -> None:
    build()
    rows = []
    for rep in range(args.repeat):
        for n in args.archives:
            for tree, v in [(t, v) for v in args.variants for t in args.trees]:  # alternated, same run
                cmd = [sys.executable, __file__, "child", "--archives", str(n), "--threads", str(args.threads),
                       "--requests", str(args.requests), "--seconds", str(args.seconds), "--variant", v,
                       "--cache-mb", str(args.cache_mb), "--idle-wait", str(args.idle_wait), "--per-thread", str(args.per_thread)]
                env = dict(os.environ, PYTHONPATH=tree) if tree else None
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    continue
                row = dict(tree=tree, **json.loads(out.stdout))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    for name in ("run", "child"):
        q = sub.add_parser(name)
        q.add_argument("--threads", type=int, default=8, help="each archive's threads (a many-core server's default)")
        q.add_argument("--requests", type=int, default=8)
        q.add_argument("--seconds", type=float, default=20)
        q.add_argument("--cache-mb", type=int, default=1024)
        q.add_argument("--per-thread", type=int, default=0,
                       help="a fixed number of requests per thread instead of --seconds (CPU per work)")
        q.add_argument("--idle-wait", type=float, default=12, help="seconds idle before a second sample")
        if name == "run":
            q.add_argument("--archives", type=int, nargs="+", default=[1, 4, 16])
            q.add_argument("--variants", nargs="+", default=["plain"])
            q.add_argument("--repeat", type=int, default=1)
            q.add_argument("--trees", nargs="+", default=[""],
                           help="checkouts to import tallpack from (PYTHONPATH), alternated: before and after")
        else:
            q.add_argument("--archives", type=int, default=1)
            q.add_argument("--variant", default="plain")
    args = p.parse_args()
    if args.cmd == "build":
        print(build())
    elif args.cmd == "run":
        run(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
