"""Round 34's review: bugs found in the round's changes, each with the test that showed it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tallpack
from tallpack.sources import SafetensorsSource


def _empties(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"w": torch.randn(32, 32, generator=g), "x": torch.randn(32, generator=g)}
    for n in "pqrstuv":  # empty tensors: all at one data offset
        sd[f"e.{n}"] = torch.zeros(0)
    return sd


def test_a_safetensors_files_empty_tensors_come_in_one_order_every_open(tmp_path):
    """safetensors' offset_keys() lists tensors of equal data offsets (empty ones) in hash order,
    another at each open: the task's key order, and the archive's bytes, changed run to run."""
    save_file(_empties(0), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    want = sorted((k for k in header if k != "__metadata__"), key=lambda k: (*header[k]["data_offsets"], k))
    orders = set()
    for _ in range(8):
        src = SafetensorsSource("m", [tmp_path / "m.safetensors"])
        try:
            orders.add(tuple(src.keys()))
        finally:
            src.close()
    assert orders == {tuple(want)}


def test_an_archive_of_empty_tensors_is_the_same_bytes_each_pack(tmp_path):
    save_file(_empties(0), tmp_path / "base.safetensors")
    for i, t in enumerate("ab"):
        save_file({k: v + 0.01 * (i + 1) for k, v in _empties(0).items()}, tmp_path / f"{t}.safetensors")
    digests = set()
    for _ in range(2):
        tallpack.pack(tmp_path / "base.safetensors", {t: tmp_path / f"{t}.safetensors" for t in "ab"},
                      tmp_path / "f.tallpack", overwrite=True)
        digests.add(hashlib.sha256((tmp_path / "f.tallpack").read_bytes()).hexdigest())
    assert len(digests) == 1


def _raced(f, ranges):
    """Each range prefetched and read while another thread (simulated: inside this prefetch's
    fetch, after its look at what is held) prefetches and reads the same range."""
    real = f._fetch
    for o, n in ranges:
        state = {"first": True}

        def fetch(spans, o=o, n=n, state=state):
            if state["first"]:
                state["first"] = False
                f.prefetch([(o, n)])
                f.read(o, n)
            return real(spans)
        f._fetch = fetch
        f.prefetch([(o, n)])
        f._fetch = real
        assert bytes(f.read(o, n)) == (bytes(range(256)) * 64)[o : o + n]


def test_a_range_two_threads_prefetch_is_kept_and_counted_once(monkeypatch):
    """KEEP_READ (b70a96d): a range two prefetches fetched at once was put in the prefetch cache
    after a read had moved it to the kept ones; read, it was kept again and counted twice: the
    count stayed above what was kept, and from then on less (here: nothing) was kept."""
    import fsspec

    from tallpack import remote

    fsspec.filesystem("memory").pipe("/review_r34.bin", bytes(range(256)) * 64)
    monkeypatch.setattr(remote, "KEEP_READ", 120)
    f = remote.RemoteFile("memory://review_r34.bin")
    try:
        _raced(f, [(100, 50)])
        assert f._kept_bytes == sum(map(len, f._kept.values())) and f._cached == sum(map(len, f._cache.values()))
        _raced(f, [(1000 + 256 * i, 50) for i in range(6)])
        assert f._kept_bytes == sum(map(len, f._kept.values())) == 100  # the last two
    finally:
        f.close()


_IN_NAMESPACE = r"""
import os, sys
from pathlib import Path
from tallpack.fsutil import commit, temp_beside
target = Path(sys.argv[1])
fd, tmp = temp_beside(target)
os.write(fd, b"new")
commit(tmp, target)
os.close(fd)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root to give a file another owner, and unshare")
def test_force_keeps_the_mode_where_the_kernel_refuses_an_unmapped_owner(tmp_path):
    """--force over a file whose owner this user namespace does not map (a rootless container's
    volume: it shows as 65534): chown says EINVAL, not EPERM, and the replacement did not get the
    old file's mode at all (0644 for a 0666 file of the writer's own group, 0644 for a 0444 one)."""
    for mode in (0o666, 0o444):
        target = tmp_path / f"m{mode:o}.bin"
        target.write_bytes(b"old")
        os.chown(target, 1234, 0)  # an owner the namespace below does not map; group root, which it does
        os.chmod(target, mode)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run(["unshare", "-r", sys.executable, "-c", _IN_NAMESPACE, str(target)], env=env,
                              capture_output=True, text=True)
        if done.returncode and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
            pytest.skip("no user namespaces here")
        assert done.returncode == 0, done.stderr
        assert target.read_bytes() == b"new"
        assert stat.S_IMODE(target.stat().st_mode) == mode


_CHECK = r"""
import sys
from pathlib import Path
from tallpack.errors import OutputError
from tallpack.fsutil import check_replaceable
for name in sys.argv[1:]:
    try:
        check_replaceable(Path(name))
        print("replaceable")
    except OutputError:
        print("refused")
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root to give a file another owner, and unshare")
def test_force_in_a_sticky_folder_refused_before_the_work_where_root_does_not_map_the_owner(tmp_path):
    """67e236f refuses --force over another user's file in a sticky folder before the work, but
    for a process with CAP_FOWNER; root of a user namespace has it only over files whose owner it
    maps, so over another's the rename failed after the work (EPERM) as before."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chown(folder, 1234, 1234)
    os.chmod(folder, 0o1777)
    theirs, ours = folder / "theirs.bin", folder / "ours.bin"
    for path, owner in ((theirs, 1235), (ours, 0)):
        path.write_bytes(b"old")
        os.chown(path, owner, owner)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["unshare", "-r", sys.executable, "-c", _CHECK, str(theirs), str(ours)], env=env,
                          capture_output=True, text=True)
    if done.returncode and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip("no user namespaces here")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused", "replaceable"]
    renamed = subprocess.run(["unshare", "-r", "mv", "-f", str(ours), str(folder / "moved.bin")],
                             capture_output=True, text=True)
    assert renamed.returncode == 0, renamed.stderr  # (the kernel agrees: root there may replace a mapped owner's)


@pytest.mark.parametrize("golden", ["v1_2_exact", "v1_8_derived_merged", "v1_14_aliases_exact"])
def test_opening_an_exact_archive_imports_no_torch(golden):
    """Opening an exact archive imports no torch, as for any other archive (an
    exact entry's check took the residual's width from torch's dtype: seconds at a fresh start)."""
    path = Path(__file__).parent / "golden" / f"{golden}.tallpack"
    code = ("import sys, tallpack\n"
            "with tallpack.open(sys.argv[1]) as fam:\n"
            "    fam.tasks, fam.manifest.tensors\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_prefetch_begun_before_forget_keeps_nothing():
    """``forget()`` (which ``verify`` calls first) drops what was fetched; a prefetch whose fetch
    was under way then stored its ranges after it, so a later read took bytes fetched before
    the forget instead of the server's (the reviewer's lead)."""
    import fsspec

    from tallpack import remote

    fs = fsspec.filesystem("memory")
    fs.pipe("/review_r34_forget.bin", bytes(64) * 64)
    f = remote.RemoteFile("memory://review_r34_forget.bin")
    real = f._fetch

    def fetch(spans):
        got = real(spans)  # the old bytes, fetched; meanwhile the file changes and is forgotten
        fs.pipe("/review_r34_forget.bin", bytes([7]) * 4096)
        f.forget()
        return got
    try:
        f._fetch = fetch
        f.prefetch([(100, 50)])
        f._fetch = real
        assert not f._cache and f._cached == 0
        assert bytes(f.read(100, 50)) == bytes([7]) * 50
    finally:
        f.close()
