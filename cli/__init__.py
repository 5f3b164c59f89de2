"""The tallpack command line (installed as the ``tallpack_cli`` package): parse, call, print."""


def _terminated_loading(signum: int, frame: object) -> None:
    """SIGTERM or Ctrl-C before the command has begun (its modules loading): nothing was written,
    so the process ends at once, in the line and exit status it has later."""
    import os
    import signal

    what = b"terminated (SIGTERM)" if signum == signal.SIGTERM else b"interrupted"
    try:
        os.write(2, b"error: " + what + b"; nothing was written\n")
    except OSError:  # stderr closed
        pass
    os._exit(128 + signum)


def begin() -> None:
    """Set up the command's process before its modules load. OpenMP's threads wait passively
    (``OMP_WAIT_POLICY``) unless the environment says otherwise; SIGTERM and Ctrl-C end the process
    at once in one line and exit 143 or 130, not silently (-15) or in a traceback (torch's import
    takes seconds); a signal the parent ignores stays ignored (nohup's; SIGINT of a shell's
    ``cmd &``). ``run`` gives SIGINT back to Python before the command begins, and the command sets
    its own SIGTERM handler. Called by ``run``, and by ``tallpack/__init__.py`` first when ``python
    -m tallpack`` imports it (``as_module``)."""
    import os
    import signal
    import sys

    if "torch" not in sys.modules:  # read once, when torch's OpenMP runtime loads
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (ignored by the parent: it stays so)
            signal.signal(signal.SIGTERM, _terminated_loading)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _terminated_loading)
    except ValueError:  # not the main thread: a caller's process keeps its handlers
        pass
    whole_writes()


def whole_writes() -> None:
    """Standard output and error written whole, or not at all: under ``PYTHONUNBUFFERED=1`` (``-u``;
    Docker's and CI's usual setting) Python writes text straight to the file descriptor and takes a
    short write as done, so output cut short by a reader that left (``| head -1``) or a full disk
    (``> report.txt``) ended in exit 0 and a partial file, not 141 or 1. A buffered layer between
    retries the rest of a short write, which then fails as it should; click flushes each line."""
    import io
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        raw = getattr(stream, "buffer", None)
        if isinstance(stream, io.TextIOWrapper) and isinstance(raw, io.RawIOBase):
            setattr(sys, name, io.TextIOWrapper(io.BufferedWriter(raw), encoding=stream.encoding,
                                                errors=stream.errors, line_buffering=True, write_through=True))


def as_module() -> bool:
    """Whether this process is ``python -m tallpack`` locating its module (``sys.argv[0]`` is
    ``-m`` until then), not a program that imports tallpack."""
    import sys

    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", ()))
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1:i + 2] == ["tallpack"]
        if arg.startswith("-m"):
            return arg == "-mtallpack"
    return False


#: OpenMP's wait policy for the command's process, unless the environment sets one: torch's
#: element-wise operations (a merge's, the packer's) each wait for their OpenMP threads, which by
#: default spin before they sleep; where other work keeps the cores busy the spinning thread is
#: what waits for a turn: a merge took 4.4-5.7 s against 0.22-0.38 s passive, on two busy cores (BENCHMARKS.md,
#: thirty-second round). A library user's process keeps the policy its author chose.
OMP_WAIT_POLICY = "PASSIVE"


def run() -> None:
    """The ``tallpack`` command (and ``python -m tallpack``): Ctrl-C or SIGTERM while its modules
    load ends as any interrupt does, in one line and exit 130 or 143 (not a traceback, or a silent
    -15; ``begin``); so does a signal after the command has ended, until the process has
    (``end_process``)."""
    import signal
    import sys

    begin()
    try:
        from .main import end_process, main
    except KeyboardInterrupt:  # (a caller's thread, where no handler was set)
        sys.stderr.write("error: interrupted; nothing was written\n")
        sys.exit(130)
    try:
        if signal.getsignal(signal.SIGINT) is _terminated_loading:  # Ctrl-C: KeyboardInterrupt again, which
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the command cleans up after
    except ValueError:
        pass
    main.own_process = True  # a signal after the command (its ``wrote`` line) still ends in its line
    try:
        main(prog_name="tallpack")
    except SystemExit as e:
        end_process(e.code)
        raise
