"""What a runner is: a model behind a plain function, numpy in, numpy out, no HTTP inside.

The model server (:mod:`chaoqing.modelserver.app`) owns threads, queues and the wire; a runner
only computes. :meth:`Runner.run` is called from one native thread per model instance, one
batch at a time per instance, so a runner needs no locks of its own.

A runner whose :meth:`Runner.run` waits cooperatively instead (gevent, holding no native
thread) sets :attr:`Runner.runs_on_hub`: the server then calls it in a greenlet on its hub,
up to :attr:`Runner.max_concurrent_batches` batches at once. The simulators do, so that a
simulated latency costs no thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError

__all__ = ["ModelSpec", "Runner", "TensorSpec", "image_batch"]



def image_batch(inputs: Mapping[str, Any], batched: bool = True) -> Any:
    """``inputs["image"]`` checked to be UINT8 [B,H,W,3] (``batched``) or [H,W,3], with no
    empty dimension.

    Raises RunnerError otherwise.
    """
    images = inputs.get("image")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise RunnerError("input 'image' must be a UINT8 array")
    if images.ndim != (4 if batched else 3) or images.shape[-1] != 3 or 0 in images.shape:
        expected = "[B,H,W,3]" if batched else "[H,W,3]"
        raise RunnerError(f"input 'image' must have shape {expected}, got {list(images.shape)}")
    return images


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, as v2 metadata shows it (-1 for a variable dimension).

    ``optional`` inputs may be left out of a request (the model's metadata ``parameters`` list
    them under ``optional_inputs``); ``value_range`` (inclusive) is checked by the server,
    which refuses values outside it with a 400.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    value_range: tuple[float, float] | None = None

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    """A model's v2 metadata.

    ``max_batch_size`` > 0 means the first dimension of every input and output is the batch
    dimension and the server may stack requests of equal shape along it; 0 means no batch
    dimension (the detector). ``parameters`` is published in the model metadata; it always
    holds ``scale`` for image models.
    """

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_batch_size": self.max_batch_size, **dict(self.parameters)}
        optional = [spec.name for spec in self.inputs if spec.optional]
        if optional:
            parameters["optional_inputs"] = optional
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
            "inputs": [spec.as_metadata() for spec in self.inputs],
            "outputs": [spec.as_metadata() for spec in self.outputs],
            "parameters": parameters,
        }


class Runner(ABC):
    """A loaded model. Subclasses set ``spec`` and implement :meth:`run`."""

    spec: ModelSpec
    #: False: run() computes, on one native thread per model instance. True: run() waits
    #: cooperatively (gevent) and blocks neither the hub nor a thread, so the server calls it
    #: in a greenlet on its hub and starts no instance threads.
    runs_on_hub: bool = False
    #: For a runner on the hub, how many batches it takes at once (0: no limit), as the
    #: instances do for the others; the server queues the rest.
    max_concurrent_batches: int = 0
    #: True: a batch holds one of the machine's compute slots while it runs, when the server
    #: has a compute budget (:mod:`chaoqing.modelserver.compute`): models that keep every
    #: thread they are given busy. False: light or single-threaded work (dlib's HOG detector)
    #: and the simulators, which compute nothing, run beside them.
    holds_compute_slot: bool = True

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute outputs for already-validated inputs (a whole batch when batched).

        Raises RunnerError when the computation fails.
        """

    def close(self) -> None:
        """Release native resources. Default: nothing to release."""
