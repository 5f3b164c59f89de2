"""Round trips of one op at a 50 ms server: request start/end times, concurrency, waves."""
import os
from pathlib import Path
import sys, time, threading
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import tallpack
from rangeserver import RangeServer, _Handler
D = Path(os.environ.get("R34_REMOTE_DIR", "/tmp/r34/d"))
DELAY = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
T = []
lock = threading.Lock()
class Slow(_Handler):
    def _serve(self, body):
        t0 = time.perf_counter(); time.sleep(DELAY); super()._serve(body)
        with lock: T.append((t0, time.perf_counter()))
name, what = sys.argv[1], sys.argv[2]
srv = RangeServer(D / "www"); srv.RequestHandlerClass = Slow; srv.start()
t0 = time.perf_counter()
fam = tallpack.open(f"{srv.url}/{name}")
print(f"open: {len(T)} requests, {time.perf_counter()-t0:.2f}s")
T.clear(); srv.reset()
t0 = time.perf_counter()
exec(what)
el = time.perf_counter() - t0
T.sort()
# waves: greedy, a request that starts after every earlier one ended starts a new wave
busy = 0; end = -1
for a, b in T:
    if b > end:
        busy += b - max(a, end); end = b
waves = busy / DELAY
avg = sum(b - a for a, b in T) / busy if busy else 0
maxc = max(sum(1 for a, b in T if a <= t < b) for t, _ in T) if T else 0
print(f"first request at {T[0][0]-t0:.2f}s, last end at {max(b for a,b in T)-t0:.2f}s")
print(f"{what}: {len(T)} requests, {srv.served():,} bytes, {el:.2f}s, max in flight {maxc}, busy {busy:.2f}s (= {waves:.0f} round trips), mean in flight while busy {avg:.1f}")
srv.stop()
