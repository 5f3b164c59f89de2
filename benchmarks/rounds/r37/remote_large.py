"""Round 37: a tensor whose arrays store more than 64 MiB (``container.PREFETCH_BYTES``), read from a
remote archive far away: the loopback HTTP server (``tests/rangeserver.py``) waits ``--ttfb`` seconds
before each request's first byte and sends ``--mbps`` MB a second a connection (as
``benchmarks/rounds/r35/D_net.py``). Each tree (``--trees``: checkouts, each put first on
``sys.path`` of a child process) is run in turn, the order alternated, and each read timed from a
fresh open: requests, waits (``RemoteFile.rounds``), bytes fetched, seconds, the child's peak RSS
so far; medians of ``--runs``. The server runs in this process, each tree's reads in a child (in one
process, the server's threads took the reader's GIL). ``--grid``: the first tree with windows of
16/32/64 MiB (``container.READ_AHEAD_BYTES``) and requests of 8/4/2 MiB (``READ_AHEAD_REQUEST``).

    git worktree add /tmp/r37/wt_before 41f8d94     # the tree before the read-ahead
    python benchmarks/rounds/r37/remote_large.py --trees before=/tmp/r37/wt_before after=. --runs 5

At 41f8d94 and after it (2 shared cores, 20 ms, 50 MB/s; a 155.8 MB archive): state_dict('t1')
2.27 -> 0.60 s (19 -> 8 waits), get_tensor('t1', 'embed') 2.15 -> 0.52 s (18 -> 7), verify()
2.79 -> 0.98 s (12 -> 9); the same bytes. Plain loopback (``--ttfb 0 --mbps 100000``, CPU-bound):
0.43 -> 0.48, 0.36 -> 0.43, 0.56 -> 0.63 s (more and smaller requests, the pieces of a chunk joined).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
D = Path(os.environ.get("R37_REMOTE_DIR", "/tmp/r37/remote_large"))
NAME = "large.tallpack"
OPS = {"sd": "state_dict('t1')", "one": "get_tensor('t1', 'embed')", "verify": "verify()"}


def build() -> Path:
    """The family: an fp32 embedding of 6144 x 4096 (25M elements: its base and merged vector store
    about 80-100 MB each, in default 4M-element chunks) and a few small tensors, three tasks."""
    import torch

    import tallpack

    out = D / "www" / NAME
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(37)
    base = {"embed": 0.02 * torch.randn(6144, 4096, generator=g),
            **{f"layers.{i}.w": 0.02 * torch.randn(256, 256, generator=g) for i in range(4)},
            "norm": torch.ones(4096)}
    tasks = {f"t{t}": {k: v + 0.002 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
                       for k, v in base.items()} for t in range(3)}
    tallpack.pack(base, tasks, out)
    return out


def child(args: argparse.Namespace) -> None:
    """One tree's reads (``sys.path`` set by the parent), one fresh open each, as JSON on stdout."""
    import torch  # noqa: F401  (tallpack imports it when first needed: not in the first read's time)

    import tallpack
    import tallpack.container
    import tallpack.remote

    for env, module, name in (("R37_READ_AHEAD", tallpack.container, "READ_AHEAD_BYTES"),
                              ("R37_REQUEST", tallpack.container, "READ_AHEAD_REQUEST")):
        if os.environ.get(env):  # the sizes compared (``--grid``)
            setattr(module, name, int(os.environ[env]))

    t0 = 0.0
    trace: list[tuple] = []  # (--trace) each fetch: start, end (s from the read's start), thread, requests, bytes
    fetch = tallpack.remote.RemoteFile._fetch

    def traced(self, spans):
        nonlocal t0
        t = time.perf_counter()
        try:
            return fetch(self, spans)
        finally:
            trace.append((round(t - t0, 3), round(time.perf_counter() - t0, 3), threading.current_thread().name,
                          len(spans), sum(e - s for s, e in spans)))

    if args.trace:
        tallpack.remote.RemoteFile._fetch = traced
    out = {"tallpack": tallpack.__file__}
    for op in args.ops.split(","):
        with tallpack.open(f"{args.url}/{NAME}", cache_bytes=0) as fam:
            s = fam.source
            r0, b0, w0 = s.requests, s.fetched, s.rounds
            trace.clear()
            t0 = time.perf_counter()
            if op == "sd":
                fam.state_dict("t1")
            elif op == "one":
                fam.get_tensor("t1", "embed")
            else:
                assert fam.verify() == []
            out[op] = [s.requests - r0, s.rounds - w0, s.fetched - b0, time.perf_counter() - t0,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
            for row in trace:
                print(op, *row, file=sys.stderr)
    print(json.dumps(out))


def far_server(args: argparse.Namespace):
    """The loopback server, in this process (not the reader's: its threads would take the reader's
    GIL), each request waiting ``ttfb`` before its first byte, each connection sending ``mbps``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from rangeserver import RangeServer, _Handler

    class Throttled:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            mv = memoryview(data)
            for i in range(0, len(mv), 1 << 18):
                piece = mv[i : i + (1 << 18)]
                time.sleep(len(piece) / (args.mbps * 1e6))
                self.f.write(piece)
            return len(mv)

        def __getattr__(self, name):
            return getattr(self.f, name)

    class Far(_Handler):
        def setup(self):
            super().setup()
            self.wfile = Throttled(self.wfile)

        def _serve(self, body):
            time.sleep(args.ttfb)
            super()._serve(body)

    srv = RangeServer(D / "www")
    srv.RequestHandlerClass = Far
    return srv.start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ttfb", type=float, default=0.02)
    ap.add_argument("--mbps", type=float, default=50.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ops", default="sd,one,verify")
    ap.add_argument("--trees", nargs="*", default=[f"now={ROOT}"], help="label=path of a checkout")
    ap.add_argument("--grid", action="store_true", help="the first tree with READ_AHEAD_BYTES x READ_AHEAD_REQUEST sizes")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--url", help="(the child's: the server's)")
    ap.add_argument("--trace", action="store_true", help="each fetch of each read, on stderr")
    args = ap.parse_args()
    if args.child:
        return child(args)
    path = build()
    print(f"{path}: {path.stat().st_size:,} bytes; ttfb {args.ttfb * 1e3:.0f} ms, {args.mbps:g} MB/s a connection, "
          f"medians of {args.runs}")
    trees = dict(t.split("=", 1) for t in args.trees)
    sizes = {label: {} for label in trees}
    if args.grid:
        tree = next(iter(trees.values()))
        trees, sizes = {}, {}
        for ahead in (16, 32, 64):
            for request in (8, 4, 2):
                label = f"window {ahead} MiB, requests {request} MiB"
                trees[label] = tree
                sizes[label] = {"R37_READ_AHEAD": str(ahead << 20), "R37_REQUEST": str(request << 20)}
    rows: dict[tuple[str, str], list[list[float]]] = {}
    srv = far_server(args)
    for run in range(args.runs):
        for label, tree in (trees.items() if run % 2 == 0 else reversed(trees.items())):
            env = {**os.environ, **sizes[label], "PYTHONPATH": str(Path(tree).resolve())}
            cmd = [sys.executable, __file__, "--child", "--ttfb", str(args.ttfb), "--mbps", str(args.mbps),
                   "--ops", args.ops, "--url", srv.url, *(["--trace"] if args.trace else [])]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            print(done.stderr, end="", file=sys.stderr)
            done.check_returncode()
            got = json.loads(done.stdout)
            assert got["tallpack"].startswith(str(Path(tree).resolve())), got["tallpack"]
            for op in args.ops.split(","):
                rows.setdefault((op, label), []).append(got[op])
    srv.stop()
    print("| read | tree | requests | waits | bytes fetched | s | peak RSS MiB (so far) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (op, label), v in rows.items():
        med = lambda i: statistics.median(x[i] for x in v)  # noqa: E731
        print(f"| {OPS[op]} | {label} | {med(0):.0f} | {med(1):.0f} | {med(2):,.0f} | {med(3):.2f} | {med(4):.0f} |")
    labels = list(trees)
    if len(labels) == 2:
        for op in args.ops.split(","):
            a, b = (statistics.median(x[3] for x in rows[(op, k)]) for k in labels)
            print(f"{OPS[op]}: {labels[0]} / {labels[1]} = {a / b:.2f}x")


if __name__ == "__main__":
    main()
