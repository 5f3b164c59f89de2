"""``python -m tallpack``: the command line."""

from tallpack_cli.main import main

main(prog_name="tallpack")
