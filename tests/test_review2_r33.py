"""Second review of round 33's late changes: the faults found, each with the test that shows it."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tallpack import kernels


class _Terminated(BaseException):
    """As the command line's: SIGTERM or SIGHUP raised where the main thread is (not a KeyboardInterrupt)."""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1") or not hasattr(signal, "pthread_kill"), reason="POSIX signals")
def test_sigterm_during_the_wait_is_raised_after_the_ranges() -> None:
    """The command line turns SIGTERM and SIGHUP into an exception raised in the main thread
    (``cli.main._Terminated``, as Ctrl-C is a KeyboardInterrupt): while ``_run_cuts`` waits for its
    helpers, it too must come out only after their ranges end, not while a helper still writes."""
    ended: list[int] = []

    def run(a: int, b: int) -> None:
        if a:
            time.sleep(0.4)
            ended.append(a)

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGUSR1, terminate)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGUSR1))  # arrives while this thread waits
    try:
        timer.start()
        with pytest.raises(_Terminated):
            kernels._run_cuts([0, 1, 2], run)
        assert ended == [1]  # the helper's range ended before the signal's exception came out
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_a_split_from_a_helper_thread_runs_there_unsplit() -> None:
    """A helper thread that splits work again (a read whose loops split) runs it there, in one
    call: on a machine of one helper thread it would otherwise wait for itself."""
    from tallpack import kernels

    calls: list[tuple[int, int]] = []

    def inner(a: int, b: int) -> None:
        calls.append((a, b))

    def outer(a: int, b: int) -> None:
        if a:  # the range on a helper thread
            kernels.in_parts(100, 4, inner)

    import threading

    done = threading.Thread(target=kernels.in_parts, args=(2, 2, outer), daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive(), "a helper's split waited for itself"
    assert calls == [(0, 100)]


_INDEX_EXPRESSION = r"[^/]*model[^/]*\.index(\.[^/]+)?\.json"


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["model", ".index", ".json", ".", "/", "x", "mod", "el", "index", "json", ".fp16"]),
                max_size=12).map("".join))
def test_index_names_as_the_expression_says(name: str) -> None:
    """The shard-index name check (linear: the expression backtracked on crafted names, 0.3 ms
    each) says what the spec's expression says."""
    import re

    from tallpack.sources import is_index_name

    assert is_index_name(name) == bool(re.fullmatch(_INDEX_EXPRESSION, name)), name


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "model.safetensors.index.fp16.json",
                                  "diffusion_pytorch_model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_real_index_names(name: str) -> None:
    from tallpack.sources import is_index_name

    assert is_index_name(name)
