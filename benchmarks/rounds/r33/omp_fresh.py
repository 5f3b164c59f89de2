import gc, sys, time, json, torch
from safetensors.torch import load_file
if len(sys.argv) > 2: torch.set_num_threads(int(sys.argv[2]))
gc.collect(); t0 = time.perf_counter()
sd = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
print(f"{(time.perf_counter() - t0)*1e3:.1f}")
