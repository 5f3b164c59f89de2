"""A training pipeline's use of an archive (round 36, helper G): an archive handed to DataLoader
workers under each start method, a Pool of workers opening it while another process packs it again
to the same path, SIGTERM (a pre-empted job) and Ctrl-C during pack, unpack and state_dict, many
specialists loaded in turn into a real model, and an interpreter leaving with archives still open.
Signals and start methods run in subprocesses, on real files written by safetensors and torch.save."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals and start methods")

MODEL = "torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))"


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return eval(MODEL)


@pytest.fixture
def family(tmp_path) -> dict:
    """A real model's base (safetensors) and three specialists (two safetensors, one torch.save),
    packed; the originals' state dicts for comparison."""
    base = {k: v.detach().clone() for k, v in model().state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    tasks, sds = {}, {}
    for t in ("a", "b", "c"):
        sds[t] = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if t == "b":
            torch.save(sds[t], tmp_path / "b.pt")
            tasks[t] = tmp_path / "b.pt"
        else:
            save_file(sds[t], tmp_path / f"{t}.safetensors")
            tasks[t] = tmp_path / f"{t}.safetensors"
    tallpack.pack(tmp_path / "base.safetensors", tasks, tmp_path / "f.tallpack")
    return {"dir": tmp_path, "tasks": tasks, "archive": tmp_path / "f.tallpack"}


def run_script(tmp_path: Path, body: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-X", "dev", str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_dataloader_workers_read_a_handed_archive_under_every_start_method(family, tmp_path):
    """An open archive in a Dataset goes to two DataLoader workers by fork, spawn and forkserver
    (pickled for the last two) and each specialist loads strictly into the real model there."""
    r = run_script(tmp_path, f"""
        import sys, torch, tallpack
        from torch.utils.data import DataLoader, Dataset

        class Specialists(Dataset):
            def __init__(self, fam):
                self.fam = fam
            def __len__(self):
                return 6
            def __getitem__(self, i):
                torch.manual_seed(0)
                m = {MODEL}
                m.load_state_dict(self.fam.state_dict("abc"[i % 3]), strict=True)
                with torch.no_grad():
                    return m(torch.ones(1, 64)).sum().item()

        if __name__ == "__main__":
            with tallpack.open("f.tallpack") as fam:
                want = [Specialists(fam)[i] for i in range(6)]
                for method in ("fork", "spawn", "forkserver"):
                    got = list(DataLoader(Specialists(fam), num_workers=2, batch_size=None,
                                          multiprocessing_context=method))
                    assert got == want, (method, got, want)
                    print(method, "ok")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["fork", "ok", "spawn", "ok", "forkserver", "ok"]
    # Python 3.12+ warns at any fork of a process with threads: torch's own OpenMP threads (the
    # model's forward above) are enough without tallpack's; the children above show it harmless here
    lines = r.stderr.splitlines()
    said = [line for i, line in enumerate(lines) if not (
        "DeprecationWarning: This process" in line and "use of fork() may lead to deadlocks" in line
        or i and "DeprecationWarning: This process" in lines[i - 1] and "os.fork()" in line)]
    assert "Warning" not in "\n".join(said), r.stderr[-3000:]


def test_pool_workers_read_while_another_process_packs_the_same_path_again(family, tmp_path):
    """Three Pool workers open and read the archive in a loop while the parent packs it again to the
    same path (overwrite=True) a few times: each open sees a whole archive, the old or the new one,
    never a half-written file, and no temporary is left."""
    d = family["dir"]
    r = run_script(tmp_path, """
        import os, multiprocessing as mp, tallpack
        from pathlib import Path

        def work(i):
            seen = set()
            for _ in range(15):
                with tallpack.open("f.tallpack") as fam:
                    assert fam.tasks == ("a", "b"), fam.tasks
                    seen.add(float(fam.state_dict("ab"[i % 2])["0.weight"].sum()))
            return len(seen)

        if __name__ == "__main__":
            d = Path(".")
            tallpack.pack("base.safetensors", {"a": "a.safetensors", "b": "b.pt"}, "f.tallpack", overwrite=True)
            with mp.get_context("fork").Pool(3) as pool:
                r = pool.map_async(work, range(6))
                n = 0
                while not r.ready() or n < 2:
                    b = "b.pt" if n % 2 else "c.safetensors"
                    tallpack.pack("base.safetensors", {"a": "a.safetensors", "b": b}, "f.tallpack", overwrite=True)
                    n += 1
                assert all(1 <= k <= 2 for k in r.get())
            print(n, sorted(p for p in os.listdir(".") if p.startswith(".")))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    repacks, left = r.stdout.split(" ", 1)
    assert int(repacks) >= 2 and left.strip() == "[]"
    with tallpack.open(d / "f.tallpack") as fam:
        assert fam.tasks == ("a", "b") and fam.state_dict("a").keys() == model().state_dict().keys()


SIGNALLED = """
    import os, signal, sys, tallpack
    what, handler = sys.argv[1], sys.argv[2]
    if handler == "exit":  # a training script's own: SIGTERM unwinds as an exception does
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    def progress(desc, done, total):  # the signal arrives once the first tensor is written
        if done >= 1:
            os.kill(os.getpid(), signal.SIGTERM)

    if what == "pack":
        tallpack.pack("base.safetensors", {"a": "a.safetensors", "b": "b.pt", "c": "c.safetensors"},
                      "out/g.tallpack", progress=progress)
    else:
        with tallpack.open("f.tallpack") as fam:
            tallpack.write_task(fam, "b", "out/b", progress=progress)
    print("finished")
"""


@pytest.mark.parametrize("what", ["pack", "unpack"])
def test_sigterm_in_a_training_script_leaves_no_output_and_with_a_handler_no_debris(family, tmp_path, what):
    """SIGTERM part-way through ``pack`` or ``write_task`` called from a script: the output never
    appears (nor an unpack's weights, so no folder passes as complete). With the default SIGTERM
    (Python dies at once) the one ``.partial`` left is removed by the next write into that folder;
    with a handler that raises SystemExit, nothing is left at all."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "g.tallpack" if what == "pack" else out / "b" / "model.safetensors"
    for handler in ("default", "exit"):
        r = run_script(tmp_path, SIGNALLED, what, handler)
        assert r.returncode in (-15, 143), (handler, r.returncode, r.stderr[-2000:])
        assert "finished" not in r.stdout
        assert not target.exists(), handler
        left = [p for p in out.rglob("*") if p.is_file()]
        if handler == "exit":
            assert left == [], left
            assert "Traceback" not in r.stderr, r.stderr[-2000:]
        else:
            assert all(p.name.endswith(".partial") for p in left), left
            # the next write into that folder (the job's rerun) removes the dead writer's temporary
            if what == "pack":
                tallpack.pack(tmp_path / "base.safetensors", family["tasks"], target)
            else:
                with tallpack.open(family["archive"]) as fam:
                    tallpack.write_task(fam, "b", out / "b")
            assert not [p for p in out.rglob("*.partial")]
            if what == "pack":
                target.unlink()
            else:
                for p in (out / "b").iterdir():
                    p.unlink()
                (out / "b").rmdir()


def test_ctrl_c_during_state_dict_leaves_the_archive_usable_in_that_process(tmp_path):
    """Ctrl-C while a large specialist is rebuilt: the same archive reads right afterwards in that
    process, and its threads stay bounded."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4 << 20, generator=g) * 0.02
    save_file({"big.weight": big}, tmp_path / "base.safetensors")
    tasks = {}
    for t in ("a", "b"):
        save_file({"big.weight": big + 1e-3 * torch.randn(big.shape, generator=g)}, tmp_path / f"{t}.safetensors")
        tasks[t] = tmp_path / f"{t}.safetensors"
    tallpack.pack(tmp_path / "base.safetensors", tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        want = float(fam.state_dict("b")["big.weight"].double().sum())
    r = run_script(tmp_path, """
        import signal, threading, tallpack
        fam = tallpack.open("f.tallpack", cache_bytes=0)
        interrupted = 0
        for delay in (0.01, 0.05, 0.1, 0.2):
            signal.setitimer(signal.ITIMER_REAL, delay)
            signal.signal(signal.SIGALRM, lambda *a: signal.raise_signal(signal.SIGINT))
            try:
                for _ in range(20):
                    fam.state_dict("b")
            except KeyboardInterrupt:
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(interrupted, float(fam.state_dict("b")["big.weight"].double().sum()), threading.active_count())
        fam.close()
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    interrupted, total, threads = r.stdout.split()
    assert int(interrupted) >= 1
    assert float(total) == want
    assert int(threads) <= 2 * (os.cpu_count() or 1) + 2
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_specialists_loaded_in_turn_keep_memory_threads_and_descriptors_flat(family, tmp_path):
    """Opening the archive and loading each specialist strictly into the real model, 150 times:
    anonymous memory, threads and open descriptors after the loop are those after the first rounds."""
    r = run_script(tmp_path, f"""
        import gc, os, threading, torch, tallpack

        def anon():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("RssAnon"))

        torch.manual_seed(0)
        m = {MODEL}
        rows = []
        for i in range(150):
            with tallpack.open("f.tallpack") as fam:
                for t in fam.tasks:
                    m.load_state_dict(fam.state_dict(t), strict=True)
                    with torch.no_grad():
                        m(torch.ones(1, 64))
            if i in (20, 149):
                gc.collect()
                rows.append((anon(), threading.active_count(), len(os.listdir("/proc/self/fd"))))
        print(*rows[0], *rows[1])
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    a0, t0, f0, a1, t1, f1 = map(int, r.stdout.split())
    assert a1 - a0 < 16 * 1024, (a0, a1)  # kB: under 16 MiB for 390 more loads of a 0.4 MB model
    assert t1 <= t0 + 1 and f1 == f0, (t0, t1, f0, f1)
    assert "Warning" not in r.stderr, r.stderr[-2000:]


def test_the_interpreter_leaves_with_archives_still_open(family, tmp_path):
    """A script that ends with archives open (one mid lazy state dict, one used by a thread) exits 0
    at once, printing nothing at shutdown: no hang, no warning, no traceback."""
    r = run_script(tmp_path, """
        import threading, tallpack
        a = tallpack.open("f.tallpack")
        a.state_dict("a")
        b = tallpack.open("f.tallpack")
        lazy = b.state_dict("b", lazy=True)
        lazy["0.weight"]
        c = tallpack.open("f.tallpack")
        threading.Thread(target=lambda: c.state_dict("c"), daemon=True).start()
        print("end")
    """, timeout=60)
    assert r.returncode == 0 and r.stdout == "end\n", (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stderr == "", r.stderr[-2000:]
