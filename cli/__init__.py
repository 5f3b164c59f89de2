"""The tallpack command line (installed as the ``tallpack_cli`` package): parse, call, print."""


def run() -> None:
    """The ``tallpack`` command: Ctrl-C while its modules load ends as any interrupt does, in one
    line and exit 130 (not a traceback)."""
    import sys

    try:
        from .main import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was written\n")
        sys.exit(130)
    main(prog_name="tallpack")
