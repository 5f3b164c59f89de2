"""Task D (round 35), lead 1: how far apart may two wanted ranges be and still be fetched as one
request? The ranges each prefetch of a remote read asks for are recorded (through the real
loopback HTTP server), then merged under each rule offline: requests and bytes per rule.

    python benchmarks/rounds/r35/D_gaps.py
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import tallpack  # noqa: E402
import tallpack.remote as remote  # noqa: E402
from rangeserver import RangeServer  # noqa: E402

D = Path(os.environ.get("R35_REMOTE_DIR", "/tmp/r35/d"))
asked: list[list[tuple[int, int]]] = []
_coalesce = remote.coalesce


def recording(ranges, gap=remote.DEFAULT_GAP, max_request=remote.MAX_REQUEST):
    asked.append(list(ranges))
    return _coalesce(ranges, gap, max_request)


remote.coalesce = recording


def merge(ranges, gap, frac=0.0, max_request=remote.MAX_REQUEST):
    """Requests under a rule: a gap is bridged if <= gap, or <= frac x the request so far."""
    out = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        end = off + n
        if out and end - out[-1][0] <= max_request and (off - out[-1][1] <= gap
                                                        or off - out[-1][1] <= frac * (out[-1][1] - out[-1][0])):
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([off, end])
    return out


RULES = [("64 B (now)", 64, 0), ("4 KiB", 4 << 10, 0), ("16 KiB", 16 << 10, 0), ("64 KiB", 64 << 10, 0),
         ("256 KiB", 256 << 10, 0), ("64 B or 1/8 of the request", 64, 1 / 8),
         ("64 B or 1/4 of the request", 64, 1 / 4), ("4 KiB or 1/8", 4 << 10, 1 / 8)]

OPS = {
    "state_dict(task2)": lambda f: f.state_dict("task2"),
    "get_tensor(task1, up.5)": lambda f: f.get_tensor("task1", "model.layers.5.mlp.up.weight"),
    "state_dict(task2, exact)": lambda f: f.state_dict("task2", exact=True),
    "merged()": lambda f: f.merged(),
}

srv = RangeServer(D / "www").start()
try:
    for name in ["bfloat16", "float32", "bfloat16-exact", "float32-exact"]:
        print(f"\n## {name}.tallpack ({(D / 'www' / f'{name}.tallpack').stat().st_size:,} bytes)")
        print("| read | rule | requests | bytes | over the wanted |\n|---|---|---:|---:|---:|")
        for op, fn in OPS.items():
            if "exact" in op and "exact" not in name:
                continue
            with tallpack.open(f"{srv.url}/{name}.tallpack", cache_bytes=0) as fam:
                fam.source.forget()
                asked.clear()
                srv.reset()
                fn(fam)
                real = (srv.gets(), srv.served())
                calls = [list(dict.fromkeys(a)) for a in asked]
            want = sum(n for a in calls for _, n in a)
            for label, gap, frac in RULES:
                reqs = [merge(a, gap, frac) for a in calls]
                n = sum(len(r) for r in reqs)
                b = sum(e - s for r in reqs for s, e in r)
                print(f"| {op} | {label} | {n} | {b:,} | {b / want - 1:+.1%} |")
            print(f"| {op} | (server counted, now) | {real[0]} | {real[1]:,} | {len(calls)} prefetches |")
finally:
    srv.stop()
