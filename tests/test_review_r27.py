"""Review of round 27's changes: each test here failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tallpack
from tallpack.errors import RemoteError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli"), *sys.path]))


def test_a_signal_while_stdout_is_being_written_still_ends_in_the_signal_line():
    """A SIGTERM that lands while the command's stdout is mid-write (its ``wrote`` lines to a slow
    pipe, flushed at the end): the handler's own flush of stdout is a reentrant call, which must
    not turn into a traceback in place of the command's line and exit 143."""
    script = textwrap.dedent("""
        import io, os, signal, sys
        from tallpack_cli.main import _end_at_once
        from tallpack.fsutil import committed

        class Raw(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the buffer's write
                return len(b)

        sys.stdout = io.TextIOWrapper(io.BufferedWriter(Raw()))
        _end_at_once(committed(), [])
        sys.stdout.write("wrote x\\n")
        sys.stdout.flush()
        print("not reached", file=sys.stderr)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 143, run.stderr
    assert run.stderr == "error: terminated (SIGTERM); nothing was written\n", run.stderr


@pytest.fixture
def exact_server(tmp_path):
    """A Range server serving ``f.tallpack``: a small family packed with the exact tier."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    from rangeserver import RangeServer

    g = torch.Generator().manual_seed(27)
    base = {f"l{i}.w": torch.randn(64, 64, generator=g) for i in range(2)}
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    (tmp_path / "www").mkdir()
    tallpack.pack(base, tasks, tmp_path / "www" / "f.tallpack", exact=True, chunk_elements=256)
    srv = RangeServer(tmp_path / "www").start()
    yield srv
    srv.stop()


def test_verify_of_the_exact_tier_does_not_call_a_cut_connection_damage(exact_server):
    """``verify`` raises a cut connection (RemoteError) while it checks chunks (0e9f114); so must
    its check of the exact originals, not list it as a damaged task."""
    from tallpack.originals import verify_originals

    with tallpack.open(f"{exact_server.url}/f.tallpack", cache_bytes=0) as fam:
        assert verify_originals(fam, None) == []  # intact while the server answers
        exact_server.cut.add("f.tallpack")
        fam.source.forget()  # (what was fetched stays kept: KEEP_READ; Archive.verify forgets it first)
        with pytest.raises(RemoteError):
            verify_originals(fam, None)


def test_a_lazy_model_says_the_dtype_of_the_first_tensor_it_overflowed_as_the_eager_one(tmp_path, caplog):
    """Two tensors of two dtypes overflowed: the warning names the model's first one's dtype (the
    eager model's ``warn_overflow``), not that of the last one built (write_merged builds float32
    tensors before float16 ones)."""
    from tallpack.merged import MergeParts

    base = {"a": torch.ones(8), "b": torch.ones(8, dtype=torch.float16)}
    fts = {t: {"a": torch.full((8,), 2.0 - i / 2), "b": torch.full((8,), 2.0 - i / 2, dtype=torch.float16)}
           for i, t in enumerate("xy")}
    tallpack.pack(base, fts, tmp_path / "o.tallpack", merge="ta", group=False)
    with tallpack.open(tmp_path / "o.tallpack") as fam:
        parts = MergeParts(fam, "ta")
        caplog.clear()
        assert parts.warn_overflow(parts.state_dict(3e38), 3e38) == ["a", "b"]
        eager = [r.getMessage() for r in caplog.records]
        assert len(eager) == 1 and "torch.float32" in eager[0], eager
        for order in (["b", "a"], ["a", "b"]):
            model = MergeParts(fam, "ta", lazy=True).state_dict(3e38, lazy=True)
            for name in order:
                model[name]
            caplog.clear()
            assert model.warn_overflow() == ["a", "b"]
            assert [r.getMessage() for r in caplog.records] == eager, order


def test_inspect_tensors_of_a_cut_connection_fails_not_a_warning_per_group(tmp_path):
    """``inspect --tensors`` reads each group's masks for its members' densities: a damaged mask is
    warned of and the table shown, but a cut connection (RemoteError) is no damage: it fails once,
    not one warning per group each asking the dead server again."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    from rangeserver import RangeServer

    from tallpack.report import tensor_rows

    g = torch.Generator().manual_seed(27)
    base = {f"l{i}.b": torch.randn(300, generator=g) for i in range(40)}  # small tensors: stored in groups
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.4)
                 for k, v in base.items()} for t in ("a", "b")}
    (tmp_path / "www").mkdir()
    tallpack.pack(base, tasks, tmp_path / "www" / "g.tallpack")
    srv = RangeServer(tmp_path / "www").start()
    try:
        with tallpack.open(f"{srv.url}/g.tallpack", cache_bytes=0) as fam:
            assert any(e.members for e in fam.manifest.tensors)
            rows = tensor_rows(fam.manifest, fam.read_array, fam.packed_bits)
            assert any(r.get("group") and r["density"] for r in rows)  # the members' densities, read
            srv.cut.add("g.tallpack")
            with pytest.raises(RemoteError):
                tensor_rows(fam.manifest, fam.read_array, fam.packed_bits)
    finally:
        srv.stop()
