"""The tallpack command line (installed as the ``tallpack_cli`` package): parse, call, print."""


def run() -> None:
    """The ``tallpack`` command: Ctrl-C while its modules load ends as any interrupt does, in one
    line and exit 130 (not a traceback); so does a signal after the command has ended, until the
    process has (``end_process``)."""
    import sys

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
