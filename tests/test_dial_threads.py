"""The fidelity dial measures a merged tensor's tasks on up to ``threads`` threads at once
(``Dial._observe``) and records them in task order: the archive is the same bytes for any thread
count, the log the same lines in the same order, and a task's error surfaces as it would on one
thread, naming its task and tensor, with no thread of the dial left running."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack import dial as dial_module
from tallpack.dial import THREADS_FROM, Dial, in_flight, memory_free
from tallpack.errors import InvalidArgumentError

#: name -> shape: two tensors the dial measures on threads (at least THREADS_FROM elements), one it
#: measures on this thread alone
SHAPES = {"a.weight": (128, 256), "b.weight": (96, 192), "c.bias": (300,)}
TASKS = ("t0", "t1", "t2")
ROOT = Path(tallpack.__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli"), *sys.path]))


def family(root: Path, dtype: torch.dtype) -> tuple[Path, dict[str, Path]]:
    """A base and three fine-tunes, each moving 30% of every tensor's entries (about 200 KB a float32 member)."""
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in SHAPES.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in base.items()}, root / "base.safetensors")
    tasks = {}
    for t in TASKS:
        tasks[t] = root / f"{t}.safetensors"
        save_file({k: (v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 0.005)
                   .to(dtype) for k, v in base.items()}, tasks[t])
    return root / "base.safetensors", tasks


@pytest.fixture
def spied(monkeypatch):
    """The dial's per-task measurement watched: the thread each (tensor, task) ran on; task 0 of
    every threaded tensor held back a little, so that the others finish before it."""
    seen: list[tuple[str, int, str]] = []
    measure = Dial._measure

    def slow_first(self, ctx, item, i, *args):
        name = threading.current_thread().name
        seen.append((item.name, i, name))
        if i == 0 and name.startswith("tallpack-dial"):
            time.sleep(0.02)
        return measure(self, ctx, item, i, *args)

    monkeypatch.setattr(Dial, "_measure", slow_first)
    return seen


def dial_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tallpack-dial")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{"fidelity": 0.99}, {"fidelity": 0.9999}, {"budget": 2.5}],
                         ids=["f0.99", "f0.9999", "budget2.5"])
def test_one_and_two_threads_write_the_same_bytes(tmp_path, dtype, options, spied, caplog):
    base, tasks = family(tmp_path / "fam", dtype)
    out, logs = {}, {}
    for j in (1, 2):
        caplog.clear()
        path = tmp_path / f"j{j}.tallpack"
        with caplog.at_level(logging.DEBUG, logger="tallpack"):
            tallpack.pack(base, tasks, path, threads=j, **options)
        out[j] = path.read_bytes()
        logs[j] = [(r.name, r.levelno, r.getMessage().replace(str(path), "OUT")) for r in caplog.records]
        assert not dial_threads()
    assert out[1] == out[2]
    assert logs[1] == logs[2]
    on = {(name, who.startswith("tallpack-dial")) for name, _, who in spied}
    # threaded where the tensor is large enough (and only with threads=2), on this thread otherwise
    assert {("a.weight", True), ("b.weight", True), ("c.bias", False)} <= on
    assert ("c.bias", True) not in on
    with tallpack.open(tmp_path / "j2.tallpack") as fam:
        assert tuple(fam.tasks) == TASKS


def test_weighted_by_a_sensitivity_one_and_two_threads_write_the_same_bytes(tmp_path, spied):
    base, tasks = family(tmp_path / "fam", torch.float32)
    g = torch.Generator().manual_seed(3)
    sensitivity = {t: {k: torch.rand(s, generator=g) for k, s in SHAPES.items()} for t in TASKS}
    for j in (1, 2):
        tallpack.pack(base, tasks, tmp_path / f"j{j}.tallpack", threads=j, fidelity=0.999, sensitivity=sensitivity)
    assert (tmp_path / "j1.tallpack").read_bytes() == (tmp_path / "j2.tallpack").read_bytes()
    assert any(who.startswith("tallpack-dial") for _, _, who in spied)


def test_the_cli_with_j_writes_what_one_thread_does(tmp_path):
    base, tasks = family(tmp_path / "fam", torch.bfloat16)
    tallpack.pack(base, tasks, tmp_path / "api.tallpack", threads=1, fidelity=0.999)
    args = [sys.executable, "-m", "tallpack", "-q", "pack", "--base", str(base), "-o", str(tmp_path / "cli.tallpack"),
            "--fidelity", "0.999", "-j", "3", *(a for t, p in tasks.items() for a in ("--task", f"{t}={p}"))]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.tallpack").read_bytes() == (tmp_path / "api.tallpack").read_bytes()


def bad_sensitivity(task: str) -> dict:
    """Weights for every task and tensor, those of ``task`` on ``b.weight`` negative (refused)."""
    return {t: {k: -torch.ones(s) if (t, k) == (task, "b.weight") else torch.ones(s) for k, s in SHAPES.items()}
            for t in TASKS}


def test_an_error_in_the_middle_of_a_tensors_tasks_names_its_task(tmp_path, spied):
    base, tasks = family(tmp_path / "fam", torch.float32)
    got = {}
    for j in (1, 2):
        with pytest.raises(InvalidArgumentError) as e:
            tallpack.pack(base, tasks, tmp_path / f"j{j}.tallpack", threads=j, fidelity=0.999,
                          sensitivity=bad_sensitivity("t1"))
        got[j] = str(e.value)
        assert not dial_threads()  # none left running
        assert not (tmp_path / f"j{j}.tallpack").exists()
    assert got[1] == got[2] == "sensitivity of task 't1', tensor 'b.weight': weights must be finite and non-negative"


def test_the_first_task_in_order_that_fails_is_the_error_raised(tmp_path, monkeypatch):
    """Two tasks fail (t2 at once, t1 after a while): t1's error is raised, as on one thread, the
    same exception object the worker raised, and no later tensor is measured."""
    base, tasks = family(tmp_path / "fam", torch.float32)
    measure, raised, ran = Dial._measure, {}, []

    def failing(self, ctx, item, i, *args):
        ran.append((item.name, i))
        if item.name == "a.weight" and i >= 1:
            if i == 1:
                time.sleep(0.05)  # t2 fails first in time
            raised[i] = MemoryError(f"injected for task {item.tasks[i]!r}, tensor {item.name!r}")
            raise raised[i]
        return measure(self, ctx, item, i, *args)

    monkeypatch.setattr(Dial, "_measure", failing)
    with pytest.raises(MemoryError) as e:
        tallpack.pack(base, tasks, tmp_path / "x.tallpack", threads=3, fidelity=0.999)
    assert e.value is raised[1] and str(e.value) == "injected for task 't1', tensor 'a.weight'"
    assert not dial_threads()
    assert not any(name != "a.weight" for name, _ in ran)  # the pack stopped at that tensor


def test_in_flight_keeps_the_extra_work_within_a_share_of_free_memory():
    n = 1 << 20
    each = dial_module.WORK_PER_ELEMENT * n + dial_module.THREAD_BYTES
    assert in_flight(8, 20, n, None) == 8  # memory not known: threads and tasks alone
    assert in_flight(8, 3, n, None) == 3
    assert in_flight(1, 20, n, None) == 1
    assert in_flight(8, 20, THREADS_FROM - 1, None) == 1  # a small tensor: one at a time
    for extra in range(0, 9):
        free = int(extra * each / dial_module.MEMORY_SHARE) + 1
        k = in_flight(16, 20, n, free)
        assert k == min(16, 1 + extra)
        assert (k - 1) * each <= dial_module.MEMORY_SHARE * free  # the extra work within the share
    assert in_flight(8, 20, n, 0) == 1  # nothing free: the first task only, as on one thread


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="/proc/self/statm: Linux")
def test_memory_free_sees_an_address_space_limit():
    code = """if True:
        import resource, sys
        from tallpack.dial import memory_free
        held = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (held + (200 << 20), resource.RLIM_INFINITY))
        print(memory_free())
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    assert 0 < int(r.stdout) <= 200 << 20
    assert memory_free() > 200 << 20  # this process, unlimited: the machine's available memory


def test_tasks_not_begun_when_one_fails_are_not_run(tmp_path, monkeypatch):
    """On two threads, t0 fails at once (t1, if it began, still under way): t2, after it in order,
    is never measured, and t1 is waited for (no thread is left running)."""
    base, tasks = family(tmp_path / "fam", torch.float32)
    measure, ran = Dial._measure, []

    def failing(self, ctx, item, i, *args):
        ran.append(i)
        if i == 0:
            raise ValueError("injected")
        time.sleep(0.3)  # t1 still under way when t0's error reaches the caller
        return measure(self, ctx, item, i, *args)

    monkeypatch.setattr(Dial, "_measure", failing)
    with pytest.raises(ValueError, match="^injected$"):
        tallpack.pack(base, tasks, tmp_path / "x.tallpack", threads=2, fidelity=0.999)
    assert 0 in ran and 2 not in ran
    assert not dial_threads()
