"""``python -m metarep``: the ``metarep`` command."""

from metarep.cli import main

main()
