"""A data scientist at a prompt (IPython, Jupyter, the REPL): what the objects show when displayed,
and Ctrl-C in the middle of a call (thirty-third round)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack

ROOT = Path(tallpack.__file__).resolve().parents[1]


@pytest.fixture
def many(tmp_path) -> Path:
    """An archive of 3 tasks and 120 small tensors, as a model's many layers."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(8, 8, generator=g) for i in range(120)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for name in ("cars", "dtd", "eurosat"):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"{name}.safetensors")
        tasks[name] = tmp_path / f"{name}.safetensors"
    out = tmp_path / "family.tallpack"
    tallpack.pack(tmp_path / "base.safetensors", tasks, out)
    return out


def test_what_pack_returns_shows_in_a_few_words(many):
    """A notebook cell ending in ``tallpack.pack(...)`` (or ``fam.manifest``, ``fam.task_info(t)``)
    displays the value: one short line naming the tasks, not every tensor's chunks (it was 40 KB
    for 25 tensors and 3 tasks, growing with the model)."""
    with tallpack.open(many) as fam:
        shown = repr(fam.manifest)
        info = repr(fam.task_info("cars"))
    assert len(shown) < 300, shown
    assert "'cars', 'dtd', 'eurosat'" in shown and "120 tensors" in shown and "1." in shown
    assert len(info) < 300, info
    assert "'cars'" in info and "120 tensors" in info and "model.layers.7" not in info


def test_lazy_mappings_and_slices_say_what_they_are(many):
    """``fam.state_dict(t, lazy=True)`` and ``fam.get_slice(t, name)`` at the prompt name their
    archive, task and tensor (they were ``<tallpack.reader.LazyStateDict object at 0x...>``), and
    showing them reads nothing: a closed archive's too."""
    fam = tallpack.open(many)
    lazy = fam.state_dict("dtd", lazy=True)
    part = fam.get_slice("dtd", "model.layers.3.mlp.weight")
    assert " at 0x" not in repr(lazy) and " at 0x" not in repr(part)
    assert "family.tallpack" in repr(lazy) and "'dtd'" in repr(lazy) and "120 tensors" in repr(lazy)
    assert "'model.layers.3.mlp.weight'" in repr(part) and "(8, 8)" in repr(part) and "float32" in repr(part)
    fam.close()
    assert "'dtd'" in repr(lazy) and "(8, 8)" in repr(part)


def test_a_closed_archive_says_so_when_shown(many):
    """An archive displayed after ``close()`` (or after its ``with`` block) says it is closed; it
    looked the same as an open one, and the next read then failed."""
    with tallpack.open(many) as fam:
        assert "(closed)" not in repr(fam)
    assert repr(fam).endswith("(closed)>") and "family.tallpack" in repr(fam)


_CUT_IMPORT = textwrap.dedent("""
    import os, signal, sys, tallpack
    assert "torch" not in sys.modules  # (import tallpack does not import torch)
    d, first = sys.argv[1], sys.argv[2]
    def call():
        if first == "pack":
            return tallpack.pack(f"{d}/base.safetensors", [f"{d}/a.safetensors", f"{d}/b.safetensors"],
                                 f"{d}/f.tallpack", overwrite=True)
        with tallpack.open(f"{d}/f.tallpack") as fam:
            return fam.state_dict("a")["w"].sum().item()
    def ctrl_c(event, args):  # Ctrl-C as torch's own modules load: the first call imports torch
        if event == "import" and args[0] == "torch._utils":
            sys.addaudithook(lambda *a: None)
            os.kill(os.getpid(), signal.SIGINT)
    sys.addaudithook(ctrl_c)
    try:
        call()
        print("not interrupted")
    except KeyboardInterrupt:
        print("interrupted")
    print("again:", call())
""")


@pytest.mark.parametrize("first", ["pack", "state_dict"])
def test_ctrl_c_in_the_first_call_leaves_torch_usable(tmp_path, first):
    """The first call that builds tensors imports torch (one to three seconds); Ctrl-C then (a
    notebook's interrupt button) stops the call, and the same call run again in that process works.
    It cut torch's import in the middle, and torch cannot be imported twice: every later call of
    the session failed ("partially initialized module 'torch' has no attribute 'fx'",
    "duplicate registrations for aten...") until the kernel was restarted."""
    base = {"w": torch.zeros(16, 16)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + 0.5}, tmp_path / "a.safetensors")
    save_file({"w": base["w"] - 0.5}, tmp_path / "b.safetensors")
    if first == "state_dict":
        tallpack.pack(tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                      tmp_path / "f.tallpack")
    r = subprocess.run([sys.executable, "-c", _CUT_IMPORT, str(tmp_path), first], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == "interrupted", r.stdout
    assert r.stdout.splitlines()[1].startswith("again:"), r.stdout


def test_progress_shows_no_bar_for_a_step_with_nothing_to_do(many, capsys):
    """``fam.verify(progress=True)`` at a prompt: a bar for the chunks it checks, none for the exact
    tier's steps an archive without one skips (they showed ``checking originals: 0tensor [00:00,
    ?tensor/s]`` and ``checking derived masks: 0tensor ...``)."""
    pytest.importorskip("tqdm")
    with tallpack.open(many) as fam:
        assert fam.verify(progress=True) == []
    shown = capsys.readouterr().err
    assert "verifying" in shown
    assert "checking originals" not in shown and "checking derived masks" not in shown and "0tensor" not in shown


def test_repacking_an_archive_open_in_this_process_says_the_open_one_reads_the_old(many, caplog):
    """A notebook: one cell packs, the next opens, a later one evaluates; the first is run again
    with other lambdas (``overwrite=True``). The archive still open reads the file it opened, the
    old one, without a word: the warning says so, naming the archive."""
    base, tasks = many.parent / "base.safetensors", [many.parent / f"{t}.safetensors" for t in ("cars", "dtd")]
    fam = tallpack.open(many)
    before = fam.task_info("cars").lam
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, many, overwrite=True, lambdas=0.1)
    assert "family.tallpack" in caplog.text and "open it again" in caplog.text, caplog.text
    assert fam.task_info("cars").lam == before  # (what the warning is about)
    fam.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tallpack"):
        tallpack.pack(base, tasks, many, overwrite=True, lambdas=0.2)
    assert "open it again" not in caplog.text


def test_ipython_completes_a_lazy_state_dicts_names(many):
    """``sd["model.layers.1<Tab>`` in IPython or Jupyter lists the task's tensor names, as it does
    for a dict (a lazy state dict completed none: IPython completes keys of dicts only, or of
    objects that name them)."""
    completer = pytest.importorskip("IPython.core.completer")
    with tallpack.open(many) as fam:
        ipython = completer.IPCompleter(shell=None, namespace={"sd": fam.state_dict("cars", lazy=True)})
        line = 'sd["model.layers.11'
        offered = ipython.complete(line_buffer=line, cursor_pos=len(line))[1]  # (IPython's own matchers)
    assert "model.layers.11.mlp.weight" in offered and "model.layers.110.mlp.weight" in offered, offered
    assert "model.layers.12.mlp.weight" not in offered


_STOP_AND_AGAIN = textwrap.dedent("""
    import hashlib, os, signal, sys, threading
    import tallpack
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job's is ignored)
    d = sys.argv[1]
    os.chdir(d)
    T = {t: f"{t}.safetensors" for t in ("cars", "dtd", "eurosat")}
    def ctrl_c_at(step):  # Ctrl-C at a chosen step: a progress callback sends it
        return lambda desc, done, total: done == step and os.kill(os.getpid(), signal.SIGINT)
    calls = {
        "pack": lambda p: tallpack.pack("base.safetensors", T, "out.tallpack", overwrite=True, chunk_elements=64,
                                        progress=p),
        "unpack": lambda p: tallpack.write_tasks(fam, fam.tasks, "unpacked", overwrite=True, progress=p),
        "merge": lambda p: tallpack.write_merged(fam, "merged", overwrite=True, max_shard_size=2048, progress=p),
        "verify": lambda p: fam.verify(progress=p),
    }
    def files():
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(".") for f in fs if f != "family.tallpack")
    def digest():
        return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files() if not f.endswith("safetensors")
                or "/" in f}
    fam = tallpack.open("family.tallpack")
    for name, call in calls.items():
        clean = call(None)
        want = digest()
        for step in (1, 5, 40):
            before = set(files())
            try:
                call(ctrl_c_at(step))
                print(name, step, "not interrupted")
            except KeyboardInterrupt:
                print(name, step, "interrupted")
            left = sorted(set(files()) - before)
            threads = sorted(t.name for t in threading.enumerate() if not t.name.startswith(("tallpack-loop", "tallpack-read")))
            assert not left and threads == ["MainThread"], (name, step, left, threads)
            assert call(None) == clean and digest() == want, (name, step)
    print("ok")
""")


def test_ctrl_c_in_a_call_then_the_same_call_again(many):
    """Ctrl-C in ``pack``, ``write_tasks``, ``write_merged`` and ``verify`` (early, midway, late):
    the call stops with KeyboardInterrupt, leaves no file and no thread of its own, and run again in
    the same process it gives the same files, bit for bit, as a call never interrupted."""
    for t in ("cars", "dtd", "eurosat"):
        assert (many.parent / f"{t}.safetensors").exists()
    r = subprocess.run([sys.executable, "-c", _STOP_AND_AGAIN, str(many.parent)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok", r.stdout
    stopped = {line.split()[0] for line in r.stdout.splitlines() if line.endswith(" interrupted")}
    assert stopped == {"pack", "unpack", "merge", "verify"}, r.stdout


def test_stats_shown_at_a_prompt_leave_the_per_layer_table_out(many):
    """``tallpack.stats.compute(fam)`` as a cell's last line shows the counts and each task's density,
    not the per-layer table (one dict per layer: thousands of characters for a real model), which
    ``.layers`` and ``stats --plot`` give."""
    with tallpack.open(many) as fam:
        s = tallpack.stats.compute(fam)
    assert len(s.layers) > 100 and len(repr(s)) < 400, repr(s)
    assert "'cars'" in repr(s) and "tasks_using" in repr(s) and "layers" in s.to_dict()


def test_dir_offers_the_public_api_not_every_module() -> None:
    import tallpack

    names = dir(tallpack)
    assert "open" in names and "Archive" in names and "progress" in names
    assert "reader" not in names and "sources" not in names and "_kernels" not in names
    assert all(hasattr(tallpack, n) for n in names)


def test_ctrl_c_while_helpers_run_waits_for_their_ranges() -> None:
    """A Ctrl-C while ``_run_cuts`` waits leaves no helper writing after the call unwound."""
    import threading
    import time

    from tallpack import kernels

    ended: list[int] = []
    started = threading.Event()

    def run(a: int, b: int) -> None:
        if a == 0:  # this thread: interrupted while the helpers' ranges still run
            started.wait(5)
            raise KeyboardInterrupt
        started.set()
        time.sleep(0.2)
        ended.append(a)

    try:
        kernels._run_cuts([0, 1, 2], run)
    except KeyboardInterrupt:
        pass
    assert ended == [1]  # the helper's range ended before the interrupt came out


def test_ctrl_c_during_the_wait_is_raised_after_the_ranges() -> None:
    import _thread
    import threading
    import time

    from tallpack import kernels

    ended: list[int] = []

    def run(a: int, b: int) -> None:
        if a:
            time.sleep(0.4)
            ended.append(a)

    threading.Timer(0.1, _thread.interrupt_main).start()  # arrives while the main thread waits
    with pytest.raises(KeyboardInterrupt):
        kernels._run_cuts([0, 1, 2], run)
    assert ended == [1]
