"""Where the umask cannot be read from /proc (macOS), it is read by setting it to 0 and back under a
lock: a fork in that moment gave the child a umask of 0 and the lock held for good. The fork now
waits for the lock, and the child has its own."""

from __future__ import annotations

import builtins
import os
import threading
import time

import pytest

from conftest import child_exit
from tallpack import fsutil


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_in_the_umask_window_waits_and_the_child_reads_its_umask(monkeypatch):
    real_open = builtins.open

    def no_proc(path, *a, **k):  # as on a system without /proc/self/status
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_proc)
    before = os.umask(0o022)
    try:
        holding = threading.Event()

        def window() -> None:  # another thread inside the umask-0 window for a while
            with fsutil._umask_lock:
                os.umask(0)
                holding.set()
                time.sleep(0.3)
                os.umask(0o022)
        t = threading.Thread(target=window)
        t.start()
        holding.wait()
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if fsutil._umask() == 0o022 else 3)
            except BaseException:
                os._exit(4)
        t.join()
        assert child_exit(pid, "reading the umask", limit=20) == 0
        assert fsutil._umask() == 0o022
    finally:
        os.umask(before)
