"""``chaoqing bench``: programs that measure and print numbers (and JSON), never tests.

Scenarios are added as subcommands of :data:`bench`; each imports what it needs lazily so
that ``chaoqing --help`` stays fast.
"""

from __future__ import annotations

import click

from chaoqing.bench.detect import detect
from chaoqing.bench.encode import encode
from chaoqing.bench.faces import faces
from chaoqing.bench.fanout import fanout
from chaoqing.bench.large import large, seams
from chaoqing.bench.load import load
from chaoqing.bench.local import local
from chaoqing.bench.models import models
from chaoqing.bench.overhead import overhead
from chaoqing.bench.overload import overload
from chaoqing.bench.presets import presets
from chaoqing.bench.quality import quality
from chaoqing.bench.runtimes import runtimes
from chaoqing.bench.soak import soak

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Measure chaoqing: latency, overhead, capacity, models (loopback only)."""


bench.add_command(detect)
bench.add_command(encode)
bench.add_command(faces)
bench.add_command(fanout)
bench.add_command(large)
bench.add_command(seams)
bench.add_command(load)
bench.add_command(local)
bench.add_command(models)
bench.add_command(overhead)
bench.add_command(overload)
bench.add_command(presets)
bench.add_command(quality)
bench.add_command(runtimes)
bench.add_command(soak)
