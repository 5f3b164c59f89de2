"""A checkpoint cut in place (a training job saving over it) while ``tallpack pack`` reads it.

The packer handed out tensors as views of a mapping of each input (safetensors' ``get_tensor``,
``torch.load(mmap=True)``): a file cut after its size was checked killed the process with SIGBUS
(exit -7) wherever the bytes were next touched (RELIABILITY.md). Now it reads each tensor's bytes
into memory of its own, and a read that comes back short is a one-line CheckpointError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.errors import CheckpointError

#: The command line, run with another process's cut (os.truncate) of file ARGV[1] to ARGV[3] bytes
#: just before the packer reads that file's tensor number ARGV[2] (counted from 0).
CUT_BEFORE = r"""
import os, sys
from tallpack import sources
victim, at, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
read = []
get = sources.Source.get
def get_cut(self, name):
    if self.label == victim:
        if len(read) == at:
            os.truncate(victim, size)
        read.append(name)
    return get(self, name)
sources.Source.get = get_cut
sys.argv = ["tallpack", *sys.argv[4:]]
from tallpack_cli import run
run()
"""

NAMES = [f"layer{i}.weight" for i in range(8)]


def _family(d: Path, kind: str) -> list[Path]:
    """A base and two tasks of 8 tensors of 512 KB (4 MB a file), saved as ``kind``."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(256, 512, generator=g) for n in NAMES}
    paths = []
    for i, sd in enumerate([base, *({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                                    for _ in range(2))]):
        p = d / f"m{i}.{kind}"
        save_file(sd, p) if kind == "safetensors" else torch.save(sd, p)
        paths.append(p)
    return paths


def _pack_cut(d: Path, kind: str, at: int, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    base, t0, t1 = _family(d, kind)
    out = d / "x.tallpack"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tallpack.__file__).parents[1]),
                                                        str(Path(tallpack.__file__).parents[1] / "cli"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CUT_BEFORE, str(t1), str(at), "100", "pack", "--base", str(base),
                           "-o", str(out), "--no-progress", "-j", "1", str(t0), str(t1), *extra],
                          capture_output=True, text=True, timeout=120, env=env)
    return done, t1


@pytest.mark.parametrize(("kind", "at", "extra"), [("safetensors", 1, ()), ("safetensors", 5, ("--exact",)),
                                                   ("pt", 2, ()), ("pt", 6, ())])
def test_an_input_cut_while_it_packs_is_one_line_not_a_crash(tmp_path, kind, at, extra) -> None:
    """Cut before its tensor ``at`` is read, while the ones before it are still in use (the
    packer loads the next tensor while it writes this one): exit 1 and one line naming the file
    and the tensor; before, the process died of SIGBUS (exit -7) on the mapped pages past the cut."""
    done, victim = _pack_cut(tmp_path, kind, at, *extra)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert str(victim) in lines[0] and f"tensor {NAMES[at]!r}" in lines[0] and "shrank from" in lines[0], lines[0]
    assert "pack it again once it is complete" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{i}.{kind}" for i in range(3)]  # no archive, no debris


def test_a_pt_input_is_read_as_torch_loads_it(tmp_path) -> None:
    """Tensors of a PyTorch file read from the file's bytes: views (a slice, a transpose, a tied
    weight) come back as torch.load gives them, and the source holds no mapping of the file
    that they share."""
    from tallpack.sources import open_source

    w = torch.randn(64, 32)
    sd = {"w": w, "tied": w, "t": w.t(), "rows": w[8:24], "cols": w[:, 3:9], "empty": torch.zeros(0, 4),
          "bf": torch.randn(5, 7).to(torch.bfloat16), "b": torch.tensor([True, False, True]), "s": torch.tensor(3.5)}
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    want = torch.load(path, weights_only=True)
    src = open_source(path)
    try:
        for name, t in want.items():
            got = src.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == t.stride(), name
            assert torch.equal(got, t), name
        assert src.aliases() == {"tied": "w"}
        assert src.get("w").untyped_storage().data_ptr() != src.get("tied").untyped_storage().data_ptr()
    finally:
        src.close()


def test_an_input_removed_while_an_exact_pack_runs_names_the_file_and_the_task(tmp_path) -> None:
    """A task file removed before the exact tier hashes it said only "No such file or directory";
    now it names the file, the task and what to do."""
    base, t0, t1 = _family(tmp_path, "safetensors")
    done: list[int] = []

    def progress(desc: str, i: int, total: int) -> None:
        if desc == "packing" and i == 6 and not done:
            t1.unlink()
            done.append(1)

    with pytest.raises(CheckpointError) as e:
        tallpack.pack(base, {"a": t0, "b": t1}, tmp_path / "x.tallpack", exact=True, progress=progress, threads=1)
    assert done and str(e.value) == (f"{t1}: removed while it was packed; pack it again once it is complete "
                                     "(the file of task 'b')")


#: Open a legacy PyTorch file (ARGV[1]) with no room for tallpack's temporary copy of it: files
#: this process writes are limited to 64 KB (a write past that fails, as on a full disk).
NO_ROOM = r"""
import logging, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
from tallpack.sources import open_source
src = open_source(sys.argv[1])
print("sum", float(src.get("w").sum()))
"""


def test_a_legacy_file_without_room_for_its_copy_is_warned_of_in_our_words(tmp_path) -> None:
    """A legacy (pre-zip) .bin whose copy in $TMPDIR cannot be written was warned of in torch's
    words ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"); now the
    warning names the folder, the cause and what to do, and the tensors are read from memory."""
    w = torch.randn(256, 1024)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": w}, path, _use_new_zipfile_serialization=False)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(Path(tallpack.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", NO_ROOM, str(path)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    warning, result = done.stdout.strip().splitlines()
    assert warning.startswith(f"WARNING {path}: a legacy (pre-zip) PyTorch file, kept in memory while it is packed")
    assert f"no room for a copy in the temporary folder {tmp_path}" in warning and "set TMPDIR" in warning, warning
    assert "enforce fail" not in warning and "inline_container" not in warning, warning
    assert result == f"sum {float(w.sum())}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]  # no temporary left


def test_tensors_read_into_freed_memory_stay_their_own(tmp_path) -> None:
    """Reads reuse the memory of tensors read before and freed (fresh pages cost four times the
    read): a tensor still held, or a view of it, is never written over by a later read."""
    import gc

    from tallpack.sources import open_source

    sd = {k: torch.randn(256, 512) for k in "abc"}  # 512 KB each, the size reads reuse
    save_file(sd, tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    try:
        a = src.get("a")
        row = src.get("b")[3]  # a view: holds its tensor's memory
        del a
        gc.collect()
        got = {k: src.get(k) for k in "cab"}  # "c" in the memory "a" had
        assert all(torch.equal(got[k], sd[k]) for k in "abc") and torch.equal(row, sd["b"][3])
        assert len({t.data_ptr() for t in got.values()} | {row.data_ptr()}) == 4
    finally:
        src.close()


def _open_inputs(folder: Path) -> list[str]:
    """The files under ``folder`` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_pack_refused_at_its_plan_closes_every_input_at_once(tmp_path: Path) -> None:
    # (review r27) inputs hold their files open; a family refused while planned (a task's tensor
    # name that cannot be stored) closed the base's and left the tasks' open until collected
    bad = "bad\udc80name"
    torch.save({"w": torch.ones(8)}, tmp_path / "base.pt")
    torch.save({"w": torch.ones(8) * 2, bad: torch.ones(2)}, tmp_path / "t.pt")
    with pytest.raises(tallpack.errors.TallpackError) as e:
        tallpack.pack(tmp_path / "base.pt", {"t": tmp_path / "t.pt"}, tmp_path / "x.tallpack")
    assert "cannot be stored" in str(e.value)
    assert _open_inputs(tmp_path) == []  # while the error's traceback (its frames) is still held
