"""``python -m chaoqing``: the same as the ``chaoqing`` command."""

from chaoqing.cli import main

main()
