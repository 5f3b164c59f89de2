"""Round 35, helper A: the archives its A/B runs read, built once into ``OUT`` (default
/tmp/r35/A_work/out): the 26M-parameter family of ``benchmarks/perf.py`` (base + 8), raw archives of
its first 2, 4 and 8 tasks (goal 4), and the planes archives of its bfloat16 and float16 casts
(base + 4; goal 1's 16-bit rows), as perf.py packs them.

    python benchmarks/rounds/r35/A_setup.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import perf  # noqa: E402  (benchmarks/perf.py)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/r35/A_work/out")
    fam = perf.make_family(out, 26e6, 8)
    names = list(fam["tasks"])
    for k in (2, 4, 8):
        p = out / f"raw-{k}.tallpack"
        if not p.exists():
            perf.do_pack(fam, names[:k], p, "raw", 2)
        print(p)
    for dtype in ("bfloat16", "float16"):
        cf = perf.make_cast_family(fam, dtype)
        p = out / f"{cf['short']}-planes.tallpack"
        if not p.exists():
            perf.do_pack(cf, list(cf["tasks"]), p, "planes", 2)
        print(p)


if __name__ == "__main__":
    main()
