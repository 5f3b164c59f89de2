"""A/B: Archive.merged side by side (new) vs one at a time (dict(model)), alternated, same process."""
import statistics, sys, time, gc
import tallpack
from tallpack.merged import MergedModel
W = "benchmarks/out/perf-work/"
archives = {"f32": (W + "planes-4.tallpack", ("consensus-ta", "ta")),
            "bf16": (W + "bf16-planes.tallpack", ("consensus-ta", "ta")),
            "ties": ("benchmarks/out/merge-speed/ties-4.tallpack", ("consensus-ties", "ties"))}
orig = MergedModel.whole
def seq(self, share=None):
    return dict(self)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
times = {}
fams = {k: tallpack.open(p, cache_bytes=0) for k, (p, _) in archives.items()}
for k, fam in fams.items():
    fam.state_dict(fam.tasks[0])
    for m in archives[k][1]:
        fam.merged(m)
for r in range(rounds):
    for k, fam in fams.items():
        t0 = time.perf_counter(); sd = fam.state_dict(fam.tasks[0]); times.setdefault((k, "unpack", ""), []).append(time.perf_counter() - t0); del sd
        for m in archives[k][1]:
            for side in ((True, False) if r % 2 == 0 else (False, True)):
                MergedModel.whole = orig if side else seq
                t0 = time.perf_counter(); sd = fam.merged(m); times.setdefault((k, m, side), []).append(time.perf_counter() - t0); del sd
MergedModel.whole = orig
print("| archive | model | side by side | median s | / unpack |")
for (k, m, s), v in times.items():
    u = statistics.median(times[(k, "unpack", "")]); med = statistics.median(v)
    print(f"| {k} | {m} | {s} | {med:.3f} | {med / u:.2f} |")
