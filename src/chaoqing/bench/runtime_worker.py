"""One runtime's runner in a process of its own, for ``chaoqing bench runtimes``.

``python -m chaoqing.bench.runtime_worker --model M --runtime R --device D --threads T
--max-batch B --tile-size S --inputs DIR``: loads model M on runtime R, then answers commands
on stdin, one per line, each with one line on stdout that starts with :data:`MESSAGE_MARK`
followed by JSON (other output of native libraries on stdout is ignored by the bench):

- first, unasked: ``{"ready": true, "load_s": ..., "platform": ...}`` or ``{"error": "..."}``
  (the runtime or device is missing, or the model does not load), after which it exits;
- ``warm SIZE BATCH``: the first call at that shape (untimed by the bench's rounds, but its
  seconds are reported): the input is ``DIR/SIZE.npy`` (UINT8 [SIZE,SIZE,3]) repeated BATCH
  times. The network's float outputs of that call (every tile, in order) and the runner's
  UINT8 output are saved as ``DIR/R-SIZE-BATCH.npz`` for the bench to compare with ncnn's.
  Answers ``{"seconds": ..., "peak_rss_bytes": ..., "gpu_peak_bytes": ...}``;
- ``time SIZE BATCH``: one timed call, ``{"seconds": ...}``;
- ``quit``: exits.

A process per (model, runtime) makes its peak RSS (Linux's ``ru_maxrss``) that runtime's own;
it is read after each warm-up, and the bench warms sizes in ascending order, so the value
after size S is the peak up to S. The worker imports no gevent: it is not the bench's process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chaoqing.modelserver.runners.backends import Backend

__all__ = ["MESSAGE_MARK", "RecordingBackend", "main"]

MESSAGE_MARK = "chaoqing-runtime-worker "
KIB = 1024  # Linux reports ru_maxrss in KiB


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(MESSAGE_MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * KIB


class RecordingBackend(Backend):
    """Wraps a backend and, while ``recorded`` is a list, keeps a copy of each network output."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.scale)
        self.inner = inner
        self.platform = inner.platform
        self.max_items = inner.max_items
        self.recorded: list[np.ndarray] | None = None

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        output = self.inner.infer(batch)
        if self.recorded is not None:
            self.recorded.append(np.array(output, dtype=np.float32, copy=True))
        return output

    def close(self) -> None:
        """Release the wrapped backend."""
        self.inner.close()


def _load(arguments: argparse.Namespace) -> tuple[Any, RecordingBackend]:
    """The runner (an UpscalerRunner over a recording backend) and its recording backend.

    Raises RunnerError as the runner does when the runtime, device or files are missing."""
    from chaoqing.modelserver.runners.backends import create_backend
    from chaoqing.modelserver.runners.catalog import UPSCALERS
    from chaoqing.modelserver.runners.upscaler import EDGE_PADDING_PX, UpscalerRunner, one_pass_size

    model = UPSCALERS[arguments.model]
    # the longest side the runner feeds the network, as chaoqing.modelserver.runners builds it
    max_side = one_pass_size(arguments.tile_size or model.default_tile_size, model.tile_context) + 2 * EDGE_PADDING_PX
    inner = create_backend(model, arguments.runtime, arguments.device, threads=arguments.threads,
                           max_items=arguments.max_batch, max_side=max_side)
    backend = RecordingBackend(inner)
    runner = UpscalerRunner(model, backend, runtime=arguments.runtime, device=arguments.device,
                            tile_size=arguments.tile_size, max_batch_size=arguments.max_batch)
    return runner, backend


def _gpu_peak_bytes() -> int:
    """torch's peak CUDA allocation in this process (0 when torch or CUDA is not in use)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.max_memory_allocated())


def main(argv: list[str] | None = None) -> int:
    """Run the worker until ``quit`` or the end of stdin; returns the exit status."""
    parser = argparse.ArgumentParser(prog="chaoqing.bench.runtime_worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=0)
    parser.add_argument("--inputs", type=Path, required=True)
    arguments = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle workers must not spin beside the timed one
    from chaoqing.errors import ChaoqingError

    started = time.perf_counter()
    try:
        runner, backend = _load(arguments)
    except ChaoqingError as exc:
        _send({"error": str(exc)})
        return 0
    _send({"ready": True, "load_s": time.perf_counter() - started, "platform": backend.platform})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        command, size, batch = words[0], int(words[1]), int(words[2])
        crop = np.load(arguments.inputs / f"{size}.npy")
        images = np.ascontiguousarray(np.repeat(crop[None], batch, axis=0))
        if command == "warm":
            backend.recorded = []
        try:
            started = time.perf_counter()
            output = runner.run({"image": images})["image"]
            seconds = time.perf_counter() - started
        except ChaoqingError as exc:
            _send({"error": str(exc)})
            backend.recorded = None
            continue
        if command == "warm":
            arrays = {"output": output, **{f"tile_{index}": tile for index, tile in enumerate(backend.recorded or [])}}
            np.savez(arguments.inputs / f"{arguments.runtime}-{size}-{batch}.npz", **arrays)
            backend.recorded = None
            _send({"seconds": seconds, "peak_rss_bytes": _peak_rss_bytes(), "gpu_peak_bytes": _gpu_peak_bytes()})
        else:
            _send({"seconds": seconds})
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
