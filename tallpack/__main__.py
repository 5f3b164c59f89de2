"""``python -m tallpack``: the command line."""

from tallpack_cli import run

run()
