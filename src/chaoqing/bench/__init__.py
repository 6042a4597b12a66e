"""``chaoqing bench``: programs that measure and print numbers (and JSON), never tests.

Scenarios are added as subcommands of :data:`bench`; each imports what it needs lazily so
that ``chaoqing --help`` stays fast.
"""

from __future__ import annotations

import click

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Measure chaoqing: latency, overhead, capacity, models (loopback only)."""
