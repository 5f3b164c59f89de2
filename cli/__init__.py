"""The tallpack command line (installed as the ``tallpack_cli`` package): parse, call, print."""
