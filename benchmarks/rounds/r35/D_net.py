"""Task D (round 35), leads 1 and 2: remote reads against the loopback HTTP server made to behave
like a store far away: each request waits ``--ttfb`` seconds before its first byte, and each
connection sends at most ``--mbps`` MB a second (S3's single-stream rate is some 50-100 MB/s;
requests run CONCURRENT_REQUESTS at a time). For each rule that merges wanted ranges into
requests (the gap bridged; MAX_REQUEST), each read's requests, waits, bytes, time in fetches and
in all, medians of ``--runs``, the rules alternated.

    python benchmarks/rounds/r35/D_net.py [--ttfb 0.02] [--mbps 50] [--runs 3] [--families ...] [--max]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import tallpack  # noqa: E402
import tallpack.remote as remote  # noqa: E402
from rangeserver import RangeServer, _Handler  # noqa: E402

D = Path(os.environ.get("R35_REMOTE_DIR", "/tmp/r35/d"))
ap = argparse.ArgumentParser()
ap.add_argument("--ttfb", type=float, default=0.02)
ap.add_argument("--mbps", type=float, default=50.0)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--families", nargs="*", default=["bfloat16", "float32", "bfloat16-exact", "float32-exact",
                                                  "bfloat16-t12", "bfloat16-chunks4M"])
ap.add_argument("--max", action="store_true", help="compare MAX_REQUEST values (else gap rules)")
ap.add_argument("--ops", default="sd,one", help="sd: state_dict(task2), one: get_tensor, verify, merged")
args = ap.parse_args([] if __name__ != "__main__" else None)


class _Throttled:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        mv = memoryview(data)
        step = 1 << 18
        for i in range(0, len(mv), step):
            piece = mv[i : i + step]
            if args.mbps:
                time.sleep(len(piece) / (args.mbps * 1e6))
            self.f.write(piece)
        return len(mv)

    def __getattr__(self, name):
        return getattr(self.f, name)


class Far(_Handler):
    def setup(self):
        super().setup()
        self.wfile = _Throttled(self.wfile)

    def _serve(self, body):
        time.sleep(args.ttfb)
        super()._serve(body)


_coalesce = remote.coalesce


def rule(bridge: int, share: float, max_request: int | None = None):
    """Holes up to ``bridge`` bytes are fetched when the holes of the request stay under ``share``
    of its wanted bytes (64-byte padding always)."""
    def co(ranges, gap=remote.DEFAULT_GAP, mr=remote.MAX_REQUEST, bridge_=0, share_=0):
        mr = max_request or mr
        out = []
        for off, n in sorted(r for r in ranges if r[1] > 0):
            end = off + n
            if out:
                s, e, want, holes = out[-1]
                h = off - e
                if end - s <= mr and (h <= gap or (h <= bridge and holes + h <= share * (want + n))):
                    out[-1] = [s, max(e, end), want + n, holes + max(h, 0)]
                    continue
            out.append([off, end, n, 0])
        return [(s, e) for s, e, _, _ in out]
    return co


INF = float("inf")
def as_now(max_request: int | None = None, bridge: int = 1 << 20):
    """tallpack.remote's own rule (``coalesce``), holes of up to ``bridge`` bytes bridged
    (``BRIDGE_MAX``), requests of at most ``max_request`` bytes (``MAX_REQUEST``)."""
    def co(ranges, gap=remote.DEFAULT_GAP, mr=remote.MAX_REQUEST, bridge_=0, share=remote.BRIDGE_SHARE):
        return _coalesce(ranges, gap, max_request or mr, bridge, share)
    return co


if args.max:
    RULES = {f"MAX_REQUEST {m >> 20} MiB": as_now(m) for m in (32 << 20, 16 << 20, 8 << 20, 4 << 20)}
else:
    RULES = {"64 B (now)": rule(64, 0), "16 KiB": rule(16 << 10, INF), "64 KiB": rule(64 << 10, INF),
             "16 KiB, holes <= 1/4": rule(16 << 10, 0.25), "1 MiB, holes <= 1/4": rule(1 << 20, 0.25),
             "1 MiB, holes <= 1/8": rule(1 << 20, 0.125)}

fetch_time = [0.0]
_fetch = remote.RemoteFile._fetch


def timed_fetch(self, spans):
    t0 = time.perf_counter()
    try:
        return _fetch(self, spans)
    finally:
        fetch_time[0] += time.perf_counter() - t0


remote.RemoteFile._fetch = timed_fetch


def op_sd(fam, exact):
    first = []
    real = fam._rebuild

    def rebuild(*a, **k):
        if not first:
            first.append(time.perf_counter())
        return real(*a, **k)
    fam._rebuild = rebuild
    fam.state_dict("task2", exact=exact)
    return first[0] if first else None


def op_one(fam, exact):
    fam.get_tensor("task1", "model.layers.3.mlp.up.weight", exact=exact)


OPS = {"sd": (op_sd, "state_dict(task2)"), "one": (op_one, "get_tensor(task1, up.3)"),
       "verify": (lambda fam, exact: (fam.verify(), None)[1], "verify()"),
       "merged": (lambda fam, exact: (fam.merged(), None)[1], "merged()")}


def main() -> None:
    srv = RangeServer(D / "www")
    srv.RequestHandlerClass = Far
    srv.start()
    rows = {}
    try:
        for run in range(args.runs):
            for name in args.families:
                for op in args.ops.split(","):
                    for label, co in (RULES.items() if run % 2 == 0 else reversed(RULES.items())):
                        remote.coalesce = co
                        with tallpack.open(f"{srv.url}/{name}.tallpack", cache_bytes=0) as fam:
                            fam.source.forget()
                            srv.reset()
                            fetch_time[0] = 0.0
                            r0 = fam.source.rounds
                            t0 = time.perf_counter()
                            first = OPS[op][0](fam, "exact" in name)
                            t1 = time.perf_counter()
                            rows.setdefault((name, op, label), []).append(
                                (srv.gets(), fam.source.rounds - r0, srv.served(), fetch_time[0],
                                 (first - t0) if first else None, t1 - t0))
    finally:
        srv.stop()
    print(f"ttfb {args.ttfb * 1e3:.0f} ms, {args.mbps:g} MB/s a connection, {remote.CONCURRENT_REQUESTS} requests at once, "
          f"medians of {args.runs}")
    print("| archive | read | rule | requests | waits | bytes | s fetching | s to the first rebuild | s in all |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (name, op, label), v in rows.items():
        med = lambda i: statistics.median(x[i] for x in v)  # noqa: E731
        ff = [x[4] for x in v if x[4] is not None]
        print(f"| {name} | {OPS[op][1]} | {label} | {v[0][0]} | "
              f"{v[0][1]} | {v[0][2]:,} | {med(3):.3f} | {statistics.median(ff) if ff else float('nan'):.3f} | "
              f"{med(5):.3f} |")


if __name__ == "__main__":
    main()
