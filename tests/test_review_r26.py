"""Review of round 26's changes: the bugs found, each shown failing before its fix."""

from __future__ import annotations

import errno
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest
import torch

import tallpack
from tallpack import dial
from tallpack.errors import OutOfMemoryError, memory_named


def test_a_signed_link_in_a_logged_traceback_is_redacted(tmp_path):
    """A server that refuses HEAD (an S3 link signed for GET answers 403): fsspec logs the
    aiohttp error at DEBUG with its traceback, whose last line names the whole signed link; -vv
    printed it. The traceback is still logged, the signature no longer."""
    from rangeserver import RangeServer, _Handler

    class NoHead(_Handler):
        def do_HEAD(self) -> None:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    base = {"w": torch.randn(32, 32)}
    tallpack.pack(base, {"a": {"w": base["w"] + 0.01}}, tmp_path / "f.tallpack")
    server = RangeServer(tmp_path)
    server.RequestHandlerClass = NoHead
    server.start()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # the CLI's
    root = logging.getLogger()
    was = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with tallpack.open(f"{server.url}/f.tallpack?X-Amz-Signature=SEKRIT5ig&X-Amz-Credential=AKIASEKRIT") as fam:
            assert fam.get_tensor("a", "w").shape == (32, 32)
    finally:
        root.removeHandler(handler)
        root.setLevel(was)
        server.stop()
    text = out.getvalue()
    assert "ClientResponseError: 403" in text  # the traceback is there
    assert "SEKRIT" not in text


def test_a_task_before_the_failed_one_is_run_whatever_the_threads_timing(monkeypatch):
    """Task 1 fails before a thread takes up task 0 (two cores, busy): task 0, whose result is
    asked for first, was skipped, and the pack's error was a bare ``_Skipped`` (no TallpackError,
    no message) instead of task 1's."""
    one_failed = threading.Event()

    class Late(ThreadPoolExecutor):  # the thread of task 0 takes it up after task 1 failed
        def submit(self, fn, /, *args, **kwargs):
            if args == (0,):
                def late(*a):
                    assert one_failed.wait(10)
                    return fn(*a)
                return super().submit(late, *args)
            return super().submit(fn, *args, **kwargs)

    def run(i: int) -> int:
        if i == 1:
            one_failed.set()
            raise ValueError("task 1 failed")
        return i

    monkeypatch.setattr(dial, "ThreadPoolExecutor", Late)
    with closing(dial._in_order(run, 4, 2)) as results:
        calls = iter(results)
        assert next(calls)() == 0
        with pytest.raises(ValueError, match="task 1 failed"):
            next(calls)()


@pytest.mark.parametrize("path", ["/data/blocks/model.safetensors", "/scratch/threads/model.safetensors"])
def test_out_of_memory_says_what_ran_out_whatever_the_path(path):
    """ENOMEM opening a file whose path holds "lock" (blocks/) or "thread": the message said
    "could not allocate a lock" / "could not start a thread"."""
    with pytest.raises(OutOfMemoryError, match=r"out of memory \(Cannot allocate memory;"):
        with memory_named("x.tallpack, task 'a'"):
            raise OSError(errno.ENOMEM, "Cannot allocate memory", path)
    with pytest.raises(OutOfMemoryError, match=r"could not allocate a lock"):
        with memory_named("x.tallpack"):
            raise RuntimeError("can't allocate lock")


def test_a_model_folder_holding_snapshots_and_blobs_is_read_as_it_is(tmp_path):
    """A model folder of one's own with ``snapshots/`` and ``blobs/`` subfolders (a training run's
    copies) was taken for a Hugging Face cache repository: its snapshot's weights were packed,
    not the folder's. Only a ``models--org--name`` folder is one."""
    from safetensors.torch import save_file

    from tallpack.sources import open_source

    folder = tmp_path / "run"
    (folder / "snapshots" / "step100").mkdir(parents=True)
    (folder / "blobs").mkdir()
    save_file({"w": torch.full((8, 8), 1.0)}, folder / "model.safetensors")
    save_file({"w": torch.full((8, 8), 2.0)}, folder / "snapshots" / "step100" / "model.safetensors")
    assert open_source(folder).get("w")[0, 0].item() == 1.0
    repo = tmp_path / "models--org--run"
    folder.rename(repo)
    (repo / "model.safetensors").unlink()
    assert open_source(repo).get("w")[0, 0].item() == 2.0  # a cache repository: its only snapshot
