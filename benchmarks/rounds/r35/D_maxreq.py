"""Task D (round 35), lead 2: MAX_REQUEST (the largest request one coalesced fetch makes) against
a loopback server made far (``--ttfb`` before each answer, ``--mbps`` a connection; 0: plain
loopback): the time to fetch 64 MiB of contiguous chunks (what ``verify`` and ``read_array``'s
windows ask for at once) in one ``prefetch``, and the peak of Python's allocations meanwhile.

    python benchmarks/rounds/r35/D_maxreq.py [--ttfb 0.02] [--mbps 50] [--runs 5]
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import D_net  # noqa: E402  (the far server)
import tallpack  # noqa: E402
import tallpack.remote as remote  # noqa: E402
from rangeserver import RangeServer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--ttfb", type=float, default=0.02)
ap.add_argument("--mbps", type=float, default=50.0)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--name", default="bfloat16-big")
args = ap.parse_args()
D_net.args.ttfb, D_net.args.mbps = args.ttfb, args.mbps
D = Path(os.environ.get("R35_REMOTE_DIR", "/tmp/r35/d"))
remote.coalesce = D_net._coalesce
remote.RemoteFile._fetch = D_net._fetch

srv = RangeServer(D / "www")
srv.RequestHandlerClass = D_net.Far
srv.start()
rows: dict[int, list[tuple[float, int, int]]] = {}
try:
    with tallpack.open(f"{srv.url}/{args.name}.tallpack") as fam:
        spans, size = [], 0
        for off, n, _ in sorted(fam._c._spans()):
            if size + n > 64 << 20:
                break
            spans.append((off, n))
            size += n
        for run in range(args.runs):
            sizes = [32 << 20, 16 << 20, 8 << 20, 4 << 20]
            for m in sizes if run % 2 == 0 else sizes[::-1]:
                remote.MAX_REQUEST = m
                fam.source.forget()
                srv.reset()
                tracemalloc.start()
                t0 = time.perf_counter()
                fam.source.prefetch(spans)
                dt = time.perf_counter() - t0
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                rows.setdefault(m, []).append((dt, srv.gets(), peak))
finally:
    srv.stop()
print(f"{args.name}: {len(spans)} chunks, {size:,} bytes in one prefetch; ttfb {args.ttfb * 1e3:.0f} ms, "
      f"{args.mbps:g} MB/s a connection (0: loopback as it is), medians of {args.runs}")
print("| MAX_REQUEST | requests | s (median) | s (min..max) | peak Python allocations |\n|---|---:|---:|---:|---:|")
for m, v in rows.items():
    ts = [x[0] for x in v]
    print(f"| {m >> 20} MiB | {v[0][1]} | {statistics.median(ts):.3f} | {min(ts):.3f}..{max(ts):.3f} | "
          f"{statistics.median(x[2] for x in v) / 2**20:.0f} MiB |")
