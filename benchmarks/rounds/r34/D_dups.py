"""Which arrays' chunks are fetched more than once in one op (server log mapped to the manifest)."""
import os
from pathlib import Path
import sys, collections
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import tallpack
from rangeserver import RangeServer
from tallpack.reader import iter_arrays
D = Path(os.environ.get("R34_REMOTE_DIR", "/tmp/r34/d"))
name, what = sys.argv[1], sys.argv[2]
local = tallpack.open(D / "www" / name)
chunks = []
for tname, key, ref in iter_arrays(local.manifest.tensors):
    for i, c in enumerate(ref.chunks):
        chunks.append((c.offset, c.offset + c.nbytes, f"{tname}:{key}:{i}"))
chunks.sort()
srv = RangeServer(D / "www").start()
fam = tallpack.open(f"{srv.url}/{name}", cache_bytes=int(sys.argv[3]) if len(sys.argv) > 3 else 1 << 30)
srv.reset()
exec(what)
hits = collections.Counter()
for m, s, n in srv.log:
    if m != "GET": continue
    for a, b, lab in chunks:
        if a < s + n and b > s:
            hits[lab] += 1
print("requests", srv.gets(), "bytes", srv.served())
multi = {k: v for k, v in hits.items() if v > 1}
print("chunks fetched more than once:", len(multi), "of", len(hits))
byarr = collections.Counter()
for k, v in multi.items():
    byarr[k.rsplit(":", 1)[0]] += v
for k, v in sorted(byarr.items())[:40]:
    print(" ", k, v)
srv.stop()
