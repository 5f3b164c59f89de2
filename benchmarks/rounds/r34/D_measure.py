"""Task D: bytes and requests per remote operation, counted by the server (loopback).

    python benchmarks/rounds/r34/D_measure.py [ARCHIVE-NAME ...] [--delay 0.05] [--cache BYTES]
"""
import os
from pathlib import Path
import argparse, json, sys, tempfile, time, threading
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import tallpack
from rangeserver import RangeServer, _Handler
from tallpack.encodings import encoding_for

D = Path(os.environ.get("R34_REMOTE_DIR", "/tmp/r34/d"))
ap = argparse.ArgumentParser()
ap.add_argument("names", nargs="*")
ap.add_argument("--delay", type=float, default=0.0)
ap.add_argument("--cache", type=int, default=None)
ap.add_argument("--ops", default="all")
ap.add_argument("--keep", type=int, default=None)
args = ap.parse_args()
import tallpack.remote
if args.keep is not None: tallpack.remote.KEEP_READ = args.keep

class Slow(_Handler):
    def _serve(self, body):
        if args.delay:
            time.sleep(args.delay)
        super()._serve(body)

def arrays(fam, task, names):
    entries = {n: e for e in fam.manifest.tensors for n in ([m.name for m in e.members] or [e.name])}
    out, seen = [], set()
    for n in names:
        entry = entries[n]
        if id(entry) in seen:
            continue
        seen.add(id(entry))
        tt = entry.tasks.get(task)
        if tt is None:
            out += list(entry.arrays.values()); continue
        out += [*tt.arrays.values(), *(entry.arrays[k] for k in encoding_for(tt.encoding).entry_arrays)]
    return out

def need(refs):
    seen = {}
    for r in refs:
        for c in r.chunks:
            seen[(c.offset, c.nbytes)] = 1
    return sum(n for _, n in seen)

names = args.names or [p.name for p in sorted((D / "www").glob("*.tallpack"))]
srv = RangeServer(D / "www")
srv.RequestHandlerClass = Slow
srv.start()
ever: dict = {}
for name in names:
    local = tallpack.open(D / "www" / name)
    exact = "exact" in name
    srv.reset(); ever = {}
    kw = {} if args.cache is None else {"cache_bytes": args.cache}
    rows = []
    def op(label, fn, needed=None):
        srv.reset()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        log = [x for x in srv.log if x[0] == "GET"]
        # bytes fetched within this op more than once; and bytes fetched in earlier ops of this open archive
        bytes_ = {}
        dup_in = 0
        for _, s, n in log:
            pass
        # overlap analysis on byte intervals
        iv = sorted((s, s + n) for _, s, n in log)
        covered = 0; end = -1; total = 0
        for a, b in iv:
            total += b - a
            if b > end:
                covered += b - max(a, end); end = b
        dup_in = total - covered
        again = 0
        for a, b in iv:
            for (x, y) in ever_list:
                lo, hi = max(a, x), min(b, y)
                if hi > lo: again += hi - lo
        ever_list.extend(iv)
        rows.append((label, needed, total, len(log), dup_in, again, dt))
    ever_list = []
    fam = None
    def do_open():
        nonlocal_fam[0] = tallpack.open(f"{srv.url}/{name}", **kw)
    nonlocal_fam = [None]
    op("open", do_open)
    fam = nonlocal_fam[0]
    op("tasks+keys", lambda: [fam.keys(t) for t in fam.tasks])
    t1, t2 = "task1", "task2"
    keys = local.keys(t1)
    small, large = "layers.0.norm.weight", "embed.weight"
    if "gt" in args.ops or args.ops == "all":
        op(f"get_tensor small ({small}, {t1})", lambda: fam.get_tensor(t1, small), need(arrays(local, t1, [small])))
        op(f"get_tensor large ({large}, {t1})", lambda: fam.get_tensor(t1, large), need(arrays(local, t1, [large])))
        op(f"get_slice rows 0:64 of {large} ({t2})", lambda: fam.get_slice(t2, large)[0:64], None)
        fam.close(); fam = nonlocal_fam[0] = tallpack.open(f"{srv.url}/{name}", **kw); ever_list.clear()
    op(f"state_dict({t1})", lambda: fam.state_dict(t1), need(arrays(local, t1, keys)))
    op(f"state_dict({t2}) same open", lambda: fam.state_dict(t2), need(arrays(local, t2, keys)))
    if exact:
        op(f"state_dict({t1}, exact) same open", lambda: fam.state_dict(t1, exact=True), None)
        op(f"state_dict({t2}, exact) same open", lambda: fam.state_dict(t2, exact=True), None)
        op(f"get_tensor exact {large} (task3)", lambda: fam.get_tensor("task3", large, exact=True), None)
        op(f"get_slice exact rows 0:64 {large} (task0)", lambda: fam.get_slice("task0", large, exact=True)[0:64], None)
    if args.ops == "all":
        fam.close(); fam = tallpack.open(f"{srv.url}/{name}", **kw); ever_list.clear()
        op("verify (fresh open)", lambda: fam.verify(), local.size)
        fam.close(); fam = tallpack.open(f"{srv.url}/{name}", **kw); ever_list.clear()
        with tempfile.TemporaryDirectory() as tmp:
            op(f"unpack {t1} (fresh open)", lambda: tallpack.write_task(fam, t1, Path(tmp) / "o", exact=False), need(arrays(local, t1, keys)))
            if exact:
                op(f"unpack {t2} --exact (same open)", lambda: tallpack.write_task(fam, t2, Path(tmp) / "e", exact=True), None)
        fam.close(); fam = tallpack.open(f"{srv.url}/{name}", **kw); ever_list.clear()
        op("merged() (fresh open)", lambda: fam.merged(), None)
    fam.close()
    print(f"\n## {name}: {local.size:,} bytes")
    print("| op | needed | fetched | requests | dup within | refetched from earlier ops | s |")
    for label, nd, tot, req, dup, again, dt in rows:
        print(f"| {label} | {'' if nd is None else f'{nd:,}'} | {tot:,} | {req} | {dup:,} | {again:,} | {dt:.2f} |", flush=True)
    local.close()
srv.stop()
