"""tallpack run from scripts, CI jobs and services (thirty-second round): exit codes, what goes to
stdout and stderr, outputs that cannot be written, and interruptions, through the command line in
a process of its own as a pipeline runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _unprivileged() -> list[str]:
    """A prefix that runs a command without the power to write where its permissions say no:
    root (these machines' user) is denied it by dropping the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions are not enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _tallpack(*args: object, prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}
    return subprocess.run([*(prefix or []), sys.executable, "-m", "tallpack", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120, **kw)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A family of three tasks (2 MB of float32), packed by the command line."""
    root = tmp_path_factory.mktemp("ops")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(3)}
    save_file(base, root / "base.safetensors")
    for t in ("a", "b", "c"):
        keep = torch.rand(256, 256, generator=g) < 0.3
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) * keep for k, v in base.items()},
                  root / f"{t}.safetensors")
    out = root / "family.tallpack"
    r = _tallpack("-q", "pack", "--base", root / "base.safetensors", "-o", out,
                  *(root / f"{t}.safetensors" for t in ("a", "b", "c")))
    assert r.returncode == 0, r.stderr
    return out


def test_stats_plot_into_a_folder_it_cannot_write_is_refused_before_the_masks_are_read(archive, tmp_path):
    """``stats --json --plot ro/stats.png`` read every mask and printed its JSON on stdout, then
    failed at the plot (exit 1): a script took the JSON of a command that failed. A folder it
    cannot write into is now refused first, as a missing one is: one line, nothing on stdout."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = _tallpack("stats", archive, "--json", "--plot", ro / "stats.png", prefix=_unprivileged())
    finally:
        ro.chmod(0o755)
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert "reading masks" not in r.stderr  # refused before any mask was read
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and str(ro) in r.stderr, r.stderr
    assert "permission denied" in r.stderr.lower(), r.stderr
    assert list(ro.iterdir()) == []


def _family_args(archive: Path) -> list[object]:
    root = archive.parent
    return ["--base", root / "base.safetensors", root / "a.safetensors", root / "b.safetensors"]


def _no_stderr(how: str):
    """What a launcher leaves as the command's stderr: ``closed`` (``2>&-``, a daemon that closed its
    descriptors) or ``gone`` (a pipe whose reader, a log collector, has exited)."""
    if how == "closed":
        return {"preexec_fn": lambda: os.close(2)}
    r, w = os.pipe()
    os.close(r)
    return {"stderr": w, "pass_fds": (w,)}


@pytest.mark.parametrize("how", ["closed", "gone"])
def test_a_command_whose_stderr_cannot_be_written_still_does_its_work(archive, tmp_path, how):
    """Progress lines go to stderr; with stderr closed every command failed at once with exit 1
    and nothing written (``sys.stderr`` is None there: an internal AttributeError, which it could
    not even say), and with a stderr pipe nobody reads, at the first progress line (a
    BrokenPipeError). Progress nobody can see is no reason to stop: the work is done, exit 0."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}
    commands = {"pack": ["pack", *_family_args(archive), "-o", tmp_path / "f.tallpack"],
                "unpack": ["unpack", tmp_path / "f.tallpack", "--all", "-o", tmp_path / "u"],
                "verify": ["verify", tmp_path / "f.tallpack"]}
    for name, args in commands.items():
        kw = _no_stderr(how)
        r = subprocess.run([sys.executable, "-m", "tallpack", *map(str, args)], stdout=subprocess.PIPE, text=True,
                           env=env, timeout=120, **kw)
        if "stderr" in kw:
            os.close(kw["stderr"])
        assert r.returncode == 0, (name, r)
        assert r.stdout.startswith(("wrote ", "ok: ")), (name, r.stdout)
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["a", "b"]


def test_reading_the_umask_never_changes_it_for_other_threads(tmp_path):
    """Each output's temporary file (``fsutil.temp_beside``) read the umask by setting it to 0 and
    back: a file that another thread of the process (a service's) created in that moment was
    world-writable (0666 under umask 022; thousands in a second of reads here). It is read now
    without being changed (Linux: ``/proc/self/status``)."""
    import time

    from tallpack import fsutil

    before = os.umask(0o022)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can, as on a loaded machine
    stop, modes = threading.Event(), []

    def service(k: int) -> None:
        i = 0
        while not stop.is_set():
            path = tmp_path / f"s{k}-{i}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # a new file: the umask applies
            modes.append(os.fstat(fd).st_mode & 0o777)
            os.close(fd)
            os.unlink(path)
            i += 1

    others = [threading.Thread(target=service, args=(k,)) for k in range(2)]
    try:
        for t in others:
            t.start()
        seen, end = set(), time.monotonic() + 1.0
        while time.monotonic() < end:
            seen.add(fsutil._umask())
    finally:
        stop.set()
        for t in others:
            t.join()
        sys.setswitchinterval(interval)
        os.umask(before)
    assert seen == {0o022}
    assert len(modes) > 1000 and set(modes) == {0o644}, sorted(set(map(oct, modes)))


@pytest.mark.parametrize("option", ["-q", "--quiet", "-v", "-vv", "--verbose"])
def test_quiet_or_verbose_after_the_command_says_where_it_goes(archive, option):
    """``tallpack verify x.tallpack -q`` (where most tools take it) said "No such option '-q' (see
    'tallpack verify --help')", whose help does not list it either: the line now says that it is
    tallpack's own option, given before the command, with the command to type."""
    r = _tallpack("verify", archive, option)
    assert r.returncode == 2 and r.stdout == "", r
    flag = option[:2] if option.startswith("-v") and not option.startswith("--") else option
    assert r.stderr == (f"error: No such option '{flag}' ({flag} goes before the command: "
                        f"'tallpack {flag} verify ...'; see 'tallpack --help')\n"), r.stderr


def test_sigterm_while_the_modules_load_is_one_line_and_exit_143(archive):
    """``docker stop`` or a job's timeout in the second the command spends importing its modules
    killed it without a word (-15) where Ctrl-C there gave "interrupted" and exit 130: SIGTERM now
    ends it as it does later, in one line and exit 143 (nothing was written yet). The signal is sent
    as the command line starts importing click, its first module."""
    code = ("import os, signal, sys\n"
            "class Signal:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'click':\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.meta_path.insert(0, Signal())\n"
            f"sys.argv = ['tallpack', 'inspect', {str(archive)!r}]\n"
            "from tallpack_cli import run\n"
            "run()\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode, r.stdout) == (143, ""), r
    assert r.stderr == "error: terminated (SIGTERM); nothing was written\n", r.stderr


def _with_read_only_tmp(work: Path, cwd: Path, args: str) -> subprocess.CompletedProcess:
    """``tallpack ARGS`` run in ``cwd`` in a mount namespace of its own where /tmp and /var/tmp are
    read-only and only ``work`` is writable, without $TMPDIR (skips where it cannot mount)."""
    script = (f"mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && mount -t tmpfs -o ro none /var/tmp && "
              f"mount --bind {work} {work} && mount -o remount,bind,rw {work} && cd {cwd} && "
              f"exec {sys.executable} -m tallpack {args}")
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'cli'}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, env=env, timeout=120)
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")
    return r


def test_no_writable_temporary_folder_leaves_no_lock_folder_in_the_working_folder(archive, tmp_path):
    """A container whose root file system is read-only (/tmp and /var/tmp too, no $TMPDIR) and
    whose working folder is a writable volume: Python's last resort for a temporary folder is the
    working folder, and every unpack left ``tallpack-locks-0/`` there, among the user's files (a
    lock that two processes started in different folders would not even share). The folder locks
    are skipped there, as where none can be made."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only /tmp of this test's own")
    work = tmp_path / "work"
    work.mkdir()
    r = _with_read_only_tmp(work, work, f"-q unpack {archive} --task a -o out")
    assert r.returncode == 0, r
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def _hung_up(archive: Path, out: Path, hup) -> tuple[subprocess.Popen, str]:
    """``tallpack pack`` (slowly: zstd level 19, one thread) into ``out``, sent SIGHUP once its
    archive is being written, with SIGHUP's disposition ``hup`` (a terminal's session: the
    default; ``nohup``: ignored); tried again where the signal came after the pack was done."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}"}
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-m", "tallpack", "pack", *map(str, _family_args(archive)), "-o",
                              str(out), "--codec", "zstd", "--level", "19", "-j", "1", "-f"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, hup))
        deadline = time.monotonic() + 60
        while (p.poll() is None and time.monotonic() < deadline
               and not any(n.endswith(".partial") for n in os.listdir(out.parent))):
            time.sleep(0.005)
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=120)
        if p.returncode != 0 or hup is signal.SIG_IGN:
            return p, err
        out.unlink()
    return p, err


def test_sighup_during_pack_cleans_up_as_sigterm_does(archive, tmp_path):
    """Closing the terminal or losing the SSH session a pack runs in (SIGHUP) killed it without a
    word (-1), leaving its partial archive (up to the whole size) beside the output until the next
    write into that folder: it unwinds now as on SIGTERM, exit 129, no temporary left; under
    ``nohup`` (SIGHUP ignored) the pack goes on."""
    import signal

    out = tmp_path / "out" / "f.tallpack"
    out.parent.mkdir()
    p, err = _hung_up(archive, out, signal.SIG_DFL)
    assert p.returncode == 128 + signal.SIGHUP, err
    assert err.strip().splitlines()[-1] == "error: hung up (SIGHUP); nothing was written", err
    assert os.listdir(out.parent) == []
    p, err = _hung_up(archive, out, signal.SIG_IGN)
    assert p.returncode == 0, err
    assert os.listdir(out.parent) == ["f.tallpack"]


def test_reading_from_many_threads_leaves_the_warning_filters_as_they_were(archive, tmp_path):
    """A service's threads each open an archive and read a task: tallpack silences torch's warning
    about a tensor over read-only memory (a raw array mapped from the file) with
    ``warnings.catch_warnings``, which is not thread-safe: two threads' blocks interleaved left
    ``ignore UserWarning`` in the process's filters for good, so every UserWarning of the
    program was silenced from then on (within a second here)."""
    import time
    import warnings

    import tallpack

    raw = tmp_path / "raw.tallpack"
    r = _tallpack("-q", "pack", *_family_args(archive), "-o", raw, "--codec", "raw")
    assert r.returncode == 0, r.stderr
    with tallpack.open(raw) as fam:
        fam.state_dict("a")  # torch imported, with the filters it adds
    before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can, as on a loaded machine

    def serve() -> None:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            with tallpack.open(raw) as fam:
                fam.state_dict("b")

    threads = [threading.Thread(target=serve) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == before, [f for f in warnings.filters if f not in before]


def test_a_name_the_systems_encoding_cannot_hold_is_one_line_saying_what_to_set(tmp_path):
    """Under a locale that is not UTF-8 (``PYTHONUTF8=0 LC_ALL=C``: ASCII file names), ``unpack
    --all`` of a task named ``café`` ended in "internal error: UnicodeEncodeError ... (a bug in
    tallpack ...)": the line now names the name and the setting that lets it be written."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + 0.1 * torch.randn(64, 64, generator=g)}, tmp_path / "t.safetensors")
    r = _tallpack("-q", "pack", "--base", tmp_path / "base.safetensors", "-o", tmp_path / "f.tallpack",
                  f"café={tmp_path / 't.safetensors'}")
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cli'}", "PYTHONUTF8": "0", "LC_ALL": "C"}
    r = subprocess.run([sys.executable, "-m", "tallpack", "-q", "unpack", str(tmp_path / "f.tallpack"), "--all",
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r
    assert "internal error" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert ("'é'" in r.stderr or "'\\xe9'" in r.stderr) and "PYTHONUTF8=1" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_legacy_checkpoint_packs_where_no_temporary_folder_is_writable(tmp_path):
    """A legacy (pre-zip) PyTorch file is copied to the temporary folder to be read from there,
    and kept in memory, with a warning, where that has no room (README); where no folder at all
    can be written (a read-only container: /tmp, /var/tmp and the working folder, no $TMPDIR) the
    pack failed with Python's "No usable temporary directory found". It is kept in memory there too."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only /tmp of this test's own")
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(64, 64, generator=g)}
    torch.save(base, tmp_path / "base.pt", _use_new_zipfile_serialization=False)
    torch.save({"w": base["w"] + 0.1 * torch.randn(64, 64, generator=g)}, tmp_path / "t.pt",
               _use_new_zipfile_serialization=False)
    work, here = tmp_path / "work", tmp_path / "here"
    work.mkdir()
    here.mkdir()
    r = _with_read_only_tmp(work, here, f"pack --base {tmp_path / 'base.pt'} -o {work / 'f.tallpack'} {tmp_path / 't.pt'}")
    assert r.returncode == 0, r
    assert "kept in memory" in r.stderr and "TMPDIR" in r.stderr, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["f.tallpack"]


def test_help_states_the_exit_statuses_a_script_tests():
    """``tallpack --help`` said what each command does but not what its exit status means; a
    script's author found 1 for ``verify``'s damage in verify's help alone."""
    r = _tallpack("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Exit status: 0 done; 1 an error (verify: damage found);" in text, text
    for said in ("2 a mistake in the command line", "130 Ctrl-C", "143 SIGTERM", "129 SIGHUP"):
        assert said in text, text
