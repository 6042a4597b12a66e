"""``chaoqing bench``: programs that measure and print numbers (and JSON), never tests.

Scenarios are added as subcommands of :data:`bench`; each imports what it needs lazily so
that ``chaoqing --help`` stays fast.
"""

from __future__ import annotations

import click

from .fanout import fanout
from .large import large, seams
from .load import load
from .models import models
from .overhead import overhead
from .overload import overload
from .soak import soak

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Measure chaoqing: latency, overhead, capacity, models (loopback only)."""


bench.add_command(fanout)
bench.add_command(large)
bench.add_command(seams)
bench.add_command(load)
bench.add_command(models)
bench.add_command(overhead)
bench.add_command(overload)
bench.add_command(soak)
