"""The tallpack command line (installed as the ``tallpack_cli`` package): parse, call, print."""


def _terminated_loading(signum: int, frame: object) -> None:
    """SIGTERM before the command has begun (its modules loading): nothing was written, so the
    process ends at once, in the line and exit status it has later."""
    import os

    try:
        os.write(2, b"error: terminated (SIGTERM); nothing was written\n")
    except OSError:  # stderr closed
        pass
    os._exit(128 + signum)


#: OpenMP's wait policy for the command's process, unless the environment sets one: torch's
#: element-wise operations (a merge's, the packer's) each wait for their OpenMP threads, which by
#: default spin before they sleep; where other work keeps the cores busy the spinning thread is
#: what waits for a turn: a merge took 4.4-5.7 s against 0.22-0.38 s passive, on two busy cores (BENCHMARKS.md,
#: thirty-second round). A library user's process keeps the policy its author chose.
OMP_WAIT_POLICY = "PASSIVE"


def run() -> None:
    """The ``tallpack`` command: Ctrl-C or SIGTERM while its modules load ends as any interrupt
    does, in one line and exit 130 or 143 (not a traceback, or a silent -15); so does a signal
    after the command has ended, until the process has (``end_process``). OpenMP's threads wait
    passively (``OMP_WAIT_POLICY``) unless the environment says otherwise."""
    import os
    import signal
    import sys

    if "torch" not in sys.modules:  # read once, when torch's OpenMP runtime loads
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)

    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (ignored by the parent: it stays so)
            signal.signal(signal.SIGTERM, _terminated_loading)  # the command sets its own as it begins
    except ValueError:  # not the main thread: a caller's process keeps its handlers
        pass
    try:
        from .main import end_process, main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was written\n")
        sys.exit(130)
    main.own_process = True  # a signal after the command (its ``wrote`` line) still ends in its line
    try:
        main(prog_name="tallpack")
    except SystemExit as e:
        end_process(e.code)
        raise
