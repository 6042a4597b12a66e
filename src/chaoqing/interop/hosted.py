"""What every host of a chaoqing runner in someone else's v2 server shares (MLServer:
:mod:`chaoqing.interop.mlserver_model`, KServe: :mod:`chaoqing.interop.kserve_model`): the
settings a model takes, building its runner, checking a call's inputs as chaoqing's model
server checks them, and choosing the outputs asked for. It imports neither server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from chaoqing.errors import InvalidTensorRequest, RunnerError
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.modelserver.runners.base import Runner

__all__ = [
    "MAX_INPUT_PIXELS",
    "MODEL_SETTING",
    "RUNNER_SETTING_NAMES",
    "build_runner",
    "check_inputs",
    "chosen_outputs",
    "runner_settings",
]

RUNNER_SETTING_NAMES = (
    "threads", "runtime", "device", "tile_size", "max_batch_size", "detector_upsample", "detector_threshold",
    "model_options",  # the simulators' own: {"latency_ms": "0"} (tests, `chaoqing bench overhead --target`)
)
MODEL_SETTING = "model"  # the chaoqing model, when the server's name for it differs
MAX_INPUT_PIXELS = 16_777_216  # per call, as chaoqing's model server (ModelServerOptions.max_input_pixels)


def runner_settings(options: Mapping[str, Any]) -> RunnerSettings:
    """RunnerSettings from a hosted model's options; raises RunnerError for unknown keys."""
    unknown = sorted(set(options) - {*RUNNER_SETTING_NAMES, MODEL_SETTING})
    if unknown:
        raise RunnerError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(RUNNER_SETTING_NAMES)}")
    return RunnerSettings(**{name: options[name] for name in RUNNER_SETTING_NAMES if name in options})


def build_runner(served_name: str, options: Mapping[str, Any]) -> Runner:
    """The runner of the chaoqing model ``options["model"]`` names (``served_name`` without it),
    built as chaoqing's model server builds it (seconds: call it off the server's event loop).

    Raises RunnerError for unknown options or a model that cannot be built.
    """
    return create_runner(str(options.get(MODEL_SETTING, served_name)), runner_settings(options))


def check_inputs(runner: Runner, inputs: Mapping[str, np.ndarray]) -> None:
    """Check decoded inputs against the runner's metadata as chaoqing's model server does
    (names, datatypes, shapes, value ranges, pixels per call); raises InvalidTensorRequest."""
    from chaoqing.modelserver.app import validate_inputs

    validate_inputs(runner.spec, inputs, MAX_INPUT_PIXELS)


def chosen_outputs(served_name: str, outputs: Mapping[str, np.ndarray], wanted: Sequence[str]) -> list[str]:
    """The output names to answer with: ``wanted``, or all of them when none are named.

    Raises InvalidTensorRequest when a wanted output is not one the runner gives.
    """
    names = list(wanted) or list(outputs)
    missing = [name for name in names if name not in outputs]
    if missing:
        raise InvalidTensorRequest(f"model {served_name} has no output(s) {', '.join(missing)}")
    return names
