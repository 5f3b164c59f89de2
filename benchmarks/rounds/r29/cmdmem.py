"""Peak RssAnon of every command on a family with one large tensor (ad hoc)."""
import json, sys, shutil
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
from pack_scale import run_child
CK = Path(sys.argv[1]).resolve()
FAM = Path("/tmp/r29/bigfam"); W = Path("/tmp/r29/cmdw"); W.mkdir(exist_ok=True)
base = str(FAM / "base.safetensors"); tasks = {f"task{i}": str(FAM / f"task{i}.safetensors") for i in range(4)}
CLI = "from tallpack_cli.main import main as cli\n"
which = sys.argv[2].split(",") if len(sys.argv) > 2 else None
jobs = {
 "pack": f"measured(lambda: tallpack.pack({base!r}, {tasks!r}, {str(W/'a.tallpack')!r}, threads=2, overwrite=True))",
 "pack_exact": f"measured(lambda: tallpack.pack({base!r}, {tasks!r}, {str(W/'x.tallpack')!r}, threads=2, overwrite=True, exact=True))",
 "pack_dial": f"measured(lambda: tallpack.pack({base!r}, {tasks!r}, {str(W/'d.tallpack')!r}, threads=2, overwrite=True, fidelity=0.999))",
 "unpack": CLI + f"measured(lambda: cli(args=['-q', 'unpack', {str(W/'a.tallpack')!r}, '--task', 'task1', '-o', {str(W/'u')!r}, '-f'], standalone_mode=False))",
 "unpack_exact": CLI + f"measured(lambda: cli(args=['-q', 'unpack', {str(W/'x.tallpack')!r}, '--task', 'task1', '--exact', '-o', {str(W/'ux')!r}, '-f'], standalone_mode=False))",
 "unpack_x": CLI + f"measured(lambda: cli(args=['-q', 'unpack', {str(W/'x.tallpack')!r}, '--task', 'task1', '-o', {str(W/'ux2')!r}, '-f'], standalone_mode=False))",
 "verify_x": CLI + f"measured(lambda: cli(args=['-q', 'verify', {str(W/'x.tallpack')!r}], standalone_mode=False))",
 "merge": CLI + f"measured(lambda: cli(args=['-q', 'merge', {str(W/'a.tallpack')!r}, '-o', {str(W/'m')!r}, '-f'], standalone_mode=False))",
 "verify": CLI + f"measured(lambda: cli(args=['-q', 'verify', {str(W/'a.tallpack')!r}], standalone_mode=False))",
 "stats": CLI + f"measured(lambda: cli(args=['-q', 'stats', {str(W/'a.tallpack')!r}], standalone_mode=False))",
 "inspect": CLI + f"measured(lambda: cli(args=['-q', 'inspect', {str(W/'a.tallpack')!r}], standalone_mode=False))",
 "get_tensor": f"fam = tallpack.open({str(W/'a.tallpack')!r}); n = max(fam.keys('task1'), key=lambda k: fam.tensor_spec('task1', k)[1][0] * (fam.tensor_spec('task1', k)[1] + (1,))[1]); measured(lambda: fam.get_tensor('task1', n))",
}
mb = 1 << 20
for k, code in jobs.items():
    if which and k not in which: continue
    try:
        got = run_child(CK, code)
        print(f"{k:14s} +{got['grown']/mb:8.1f} MB {got['seconds']:7.2f} s", flush=True)
    except Exception as e:
        print(k, "FAILED", getattr(e, "stderr", e)[-2000:] if hasattr(e, "stderr") else e, flush=True)
