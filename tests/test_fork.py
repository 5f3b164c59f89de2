"""An archive opened and read in a parent keeps working in a forked child (a DataLoader's workers):
the child has none of the parent's threads, so the reader's pool and the kernels' helpers must be
started anew there, not waited on forever."""

import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import kernels
from conftest import forks_while_reading

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")


def test_a_forked_child_reads_an_archive_its_parent_opened(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 2 * kernels.SPLIT_ELEMENTS // 1024 + 8  # rows: large enough that one tensor's loop is split
    base = {"w": torch.randn(n, 1024, generator=g), "b": torch.randn(1024, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for t in ("x", "y"):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"{t}.safetensors")
        tasks[t] = tmp_path / f"{t}.safetensors"
    tallpack.pack(tmp_path / "base.safetensors", tasks, tmp_path / "f.tallpack", threads=2)

    with tallpack.open(tmp_path / "f.tallpack", threads=2) as fam:
        want = {t: fam.state_dict(t) for t in ("x", "y")}  # the parent's pool and helpers have run
        assert torch.equal(fam.get_tensor("x", "w"), want["x"]["w"])
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if every read comes back right
            ok = False
            try:
                torch.set_num_threads(1)  # as a DataLoader worker does: torch's own threads are not fork-safe
                ok = (all(torch.equal(fam.get_tensor(t, "w"), want[t]["w"]) for t in ("x", "y"))
                      and all(torch.equal(v, want["y"][k]) for k, v in fam.state_dict("y").items()))
                if kernels.COMPILED:  # the kernels' helper threads, split across two
                    b, m = want["x"]["w"].reshape(-1).numpy(), want["y"]["w"].reshape(-1).numpy()
                    mask, out = (b > 0).view(np.uint8), np.empty_like(b)
                    ok = ok and kernels.tall_f32(b, m, mask, out, threads=2) and np.array_equal(out, b + (b > 0) * m)
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung reading the archive")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("exact", [False, True])
def test_a_fork_pool_reads_after_the_parent_did_without_setting_torch_threads(tmp_path, exact):
    """multiprocessing's fork pools (Linux's default before 3.14): the parent's reads ran torch's
    OpenMP pool, which the child does not have; with an archive open the reader puts torch on one
    thread in the child, as a DataLoader does for its workers (the exact tier's reads, which run
    torch's operations, waited forever)."""
    import multiprocessing

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(512, 512, generator=g)}
    tasks = {t: {"w": base["w"] + 0.01 * torch.randn(512, 512, generator=g)} for t in ("x", "y")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack", exact=exact)
    global _FAM
    with tallpack.open(tmp_path / "f.tallpack") as _FAM:
        want = {t: _FAM.get_tensor(t, "w", exact=exact) for t in ("x", "y")}  # the parent's torch threads ran
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map_async(_read_w, [(t, exact) for t in ("x", "y")]).get(timeout=90)
        assert all(torch.equal(a, want[t]) for a, t in zip(got, ("x", "y")))


_FAM = None


def _read_w(args):
    task, exact = args
    return _FAM.get_tensor(task, "w", exact=exact)


def test_a_forked_child_reads_a_lazy_dict_another_thread_was_reading(tmp_path):
    """A lazy state dict's lock, held by a parent thread at the fork, stays held in the child:
    the reader gives every lazy dict a fresh one there (9 of 10 forks waited forever)."""
    g = torch.Generator().manual_seed(2)
    base = {f"layer.{i}.bias": torch.randn(64, generator=g) for i in range(40)}
    tasks = {t: {k: v + 0.01 * torch.randn(64, generator=g) for k, v in base.items()} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack", cache_bytes=0) as fam:
        lazy = fam.state_dict("a", lazy=True)
        want = lazy["layer.5.bias"].clone()
        forks_while_reading(lazy, base, lambda: torch.equal(lazy["layer.5.bias"], want), "the lazy dict's lock")


def test_a_forked_child_does_not_inherit_a_state_dict_another_thread_was_in(tmp_path):
    """While a state_dict runs, the cache pushes nothing out (the reader counts them). A child
    forked while another parent thread was in one kept that count for good: its cache never let
    anything go again. The child starts with none."""
    import threading

    g = torch.Generator().manual_seed(3)
    base = {f"layer.{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)}
    tasks = {t: {k: v + 0.01 * torch.randn(256, 256, generator=g) for k, v in base.items()} for t in ("a", "b")}
    tallpack.pack(base, tasks, tmp_path / "f.tallpack")
    with tallpack.open(tmp_path / "f.tallpack") as fam:
        stop, inside = threading.Event(), threading.Event()

        def busy():
            while not stop.is_set():
                fam.state_dict("a")
                inside.set()

        th = threading.Thread(target=busy)
        th.start()
        try:
            assert inside.wait(30)
            for _ in range(20):  # until a fork lands inside a state_dict
                while not fam._scans:
                    pass
                pid = os.fork()
                if pid == 0:
                    os._exit(0 if fam._scans == 0 else 1)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
        finally:
            stop.set()
            th.join()
