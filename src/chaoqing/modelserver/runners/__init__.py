"""The model registry: which runners exist and how to build one.

::

    from chaoqing.modelserver.runners import RunnerSettings, available_models, create_runner

    runner = create_runner("realesr-animevideov3-x4", RunnerSettings(threads=2))
    upscaled = runner.run({"image": images})["image"]      # UINT8 [B,H,W,3] -> [B,4H,4W,3]

Models:

- ``realesrgan-x4plus``, ``realesr-animevideov3-x2`` / ``-x3`` / ``-x4``: Real-ESRGAN on ncnn
  (:mod:`chaoqing.modelserver.runners.realesrgan`).
- ``face-detector``: dlib HOG + 5-point landmarks (:mod:`chaoqing.modelserver.runners.dlib_detector`).
- ``sim-upscale-x2``, ``sim-upscale-x4``, ``sim-face``, ``sim-detector``: simulators for tests
  and benchmarks (:mod:`chaoqing.modelserver.runners.sim`); built only when named. Only they
  take model options (``latency_ms``, ``faces``, ``concurrency``: see
  :class:`~chaoqing.modelserver.runners.sim.SimSettings`).

Importing this package is cheap: ncnn and dlib are imported when a runner that needs them is
created. Every failure to build a runner is a :class:`RunnerError`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec
from chaoqing.modelserver.runners.realesrgan import parse_device

__all__ = [
    "ModelSpec",
    "Runner",
    "RunnerError",
    "RunnerSettings",
    "TensorSpec",
    "available_models",
    "check_model_options",
    "create_runner",
]

SIMULATOR_PREFIX = "sim-"


@dataclass(frozen=True)
class RunnerSettings:
    """How runners are built; one value for every model a server hosts.

    - ``threads``: ncnn threads per model instance; 0 means ``os.cpu_count()``.
    - ``device``: ``"cpu"``, ``"vulkan"`` or ``"vulkan:N"`` for the ncnn models (the dlib
      detector and the simulators always run on the CPU).
    - ``tile_size``: Real-ESRGAN tile side in input pixels; 0 means the model's default
      (128 for x4plus, 256 for the compact models), which bounds memory per instance.
    - ``max_batch_size``: published batch limit of the image models.
    - ``detector_upsample``: HOG upsampling count, -1 for automatic (once up to 1 MP).
    - ``detector_threshold``: added to dlib's detection threshold (0.3 drops the patches and
      logos HOG mistakes for faces at 0.0).
    - ``model_options``: ``KEY=VALUE`` settings of runners that take their own (the
      simulators); a model that takes none refuses any (see :func:`check_model_options`).

    Raises RunnerError when a value is out of range or ``device`` is malformed.
    """

    threads: int = 0
    device: str = "cpu"
    tile_size: int = 0
    max_batch_size: int = 8
    detector_upsample: int = -1
    detector_threshold: float = 0.3
    model_options: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_options", types.MappingProxyType(dict(self.model_options)))
        for name in ("threads", "tile_size"):
            if getattr(self, name) < 0:
                raise RunnerError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_batch_size < 1:
            raise RunnerError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not -1 <= self.detector_upsample <= 3:
            raise RunnerError(
                f"detector_upsample must be -1 (automatic) or 0 to 3, got {self.detector_upsample}"
            )
        parse_device(self.device)


def _create_realesrgan(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.realesrgan import RealesrganRunner

    return RealesrganRunner(
        name,
        threads=settings.threads,
        device=settings.device,
        tile_size=settings.tile_size,
        max_batch_size=settings.max_batch_size,
    )


def _create_face_detector(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.dlib_detector import DlibFaceDetector

    return DlibFaceDetector(
        upsample=settings.detector_upsample, adjust_threshold=settings.detector_threshold
    )


def _create_sim_upscaler(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.sim import SimSettings, SimUpscaler

    scale = int(name.rsplit("-x", 1)[1])
    return SimUpscaler(
        name,
        scale,
        settings=SimSettings.from_options(settings.model_options),
        max_batch_size=settings.max_batch_size,
    )


def _create_sim_face(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.sim import SimSettings, SimUpscaler

    return SimUpscaler(
        name,
        4,
        settings=SimSettings.from_options(settings.model_options),
        max_batch_size=settings.max_batch_size,
        mark_faces=True,
    )


def _create_sim_detector(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.sim import SimFaceDetector, SimSettings

    return SimFaceDetector(name, settings=SimSettings.from_options(settings.model_options))


_FACTORIES: Mapping[str, Callable[[str, RunnerSettings], Runner]] = types.MappingProxyType(
    {
        "realesrgan-x4plus": _create_realesrgan,
        "realesr-animevideov3-x2": _create_realesrgan,
        "realesr-animevideov3-x3": _create_realesrgan,
        "realesr-animevideov3-x4": _create_realesrgan,
        "face-detector": _create_face_detector,
        "sim-upscale-x2": _create_sim_upscaler,
        "sim-upscale-x4": _create_sim_upscaler,
        "sim-face": _create_sim_face,
        "sim-detector": _create_sim_detector,
    }
)


def available_models() -> list[str]:
    """Every model name :func:`create_runner` accepts; simulators start with ``sim-``."""
    return list(_FACTORIES)


def check_model_options(name: str, options: Mapping[str, str]) -> None:
    """Check that model ``name`` takes ``options`` (cheap: nothing is loaded).

    Raises RunnerError for options given to a model that takes none (only the simulators
    take any), and for options a simulator does not know or values it refuses.
    """
    if not options:
        return
    if not name.startswith(SIMULATOR_PREFIX):
        raise RunnerError(
            f"model {name} takes no model options (given {', '.join(sorted(options))}); only the simulators do"
        )
    from chaoqing.modelserver.runners.sim import SimSettings

    SimSettings.from_options(options)


def create_runner(name: str, settings: RunnerSettings) -> Runner:
    """Build and load the runner for model ``name``.

    Raises RunnerError for an unknown name (listing the known ones) or model options it does
    not take, and whatever the runner raises while loading: missing weights or packages, an
    unusable device.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise RunnerError(f"unknown model {name!r}; known models: {', '.join(_FACTORIES)}")
    check_model_options(name, settings.model_options)
    return factory(name, settings)
