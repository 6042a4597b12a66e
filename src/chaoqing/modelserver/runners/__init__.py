"""The model registry: which runners exist and how to build one.

::

    from chaoqing.modelserver.runners import RunnerSettings, available_models, create_runner

    runner = create_runner("realesr-animevideov3-x4", RunnerSettings(threads=2))
    upscaled = runner.run({"image": images})["image"]      # UINT8 [B,H,W,3] -> [B,4H,4W,3]
    runner = create_runner("realesrgan-x4plus", RunnerSettings(runtime="torch", device="cuda:0"))

Models:

- the bundled upscalers (:data:`~chaoqing.modelserver.runners.catalog.UPSCALERS`: Real-ESRGAN
  and SPAN, with their licenses), served by
  :class:`~chaoqing.modelserver.runners.upscaler.UpscalerRunner` on the runtime the settings
  name: ncnn, OpenVINO, ONNX Runtime or PyTorch (:mod:`chaoqing.modelserver.runners.backends`).
- ``centerface``: the CenterFace CNN detector on ONNX Runtime, boxes and FFHQ's 5 points
  (:mod:`chaoqing.modelserver.runners.centerface`); the default detector.
- the user's own model files, ``[models.NAME]`` in the config (:class:`chaoqing.config.UserModel`,
  given as ``RunnerSettings.user_models``): .pth/.safetensors through spandrel on torch, .onnx
  on ONNX Runtime or OpenVINO, ncnn .param files
  (:mod:`chaoqing.modelserver.runners.user_models`), each on its own runtime.
- ``face-detector``: dlib HOG + 5-point landmarks (:mod:`chaoqing.modelserver.runners.dlib_detector`).
- ``face-descriptor``: dlib's 128-D face descriptor of faces at given boxes (and landmarks)
  (:mod:`chaoqing.modelserver.runners.face_descriptor`), for identity measurements.
- ``sim-upscale-x2``, ``sim-upscale-x4``, ``sim-face``, ``sim-detector``: simulators for tests
  and benchmarks (:mod:`chaoqing.modelserver.runners.sim`); built only when named. Only they
  take model options (``latency_ms``, ``faces``, ``concurrency``: see
  :class:`~chaoqing.modelserver.runners.sim.SimSettings`).

Importing this package is cheap: ncnn, dlib and the other runtimes are imported when a runner
that needs them is created (or :func:`check_runtimes` asks for them). Every failure to build a
runner is a :class:`RunnerError`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from chaoqing.config import UserModel
from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import (
    AUTO,
    RUNTIMES,
    check_device,
    check_runtime,
    resolve_runtime,
)
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec
from chaoqing.modelserver.runners.catalog import UPSCALERS

__all__ = [
    "AUTO",
    "RUNTIMES",
    "ModelSpec",
    "Runner",
    "RunnerError",
    "RunnerSettings",
    "TensorSpec",
    "available_models",
    "check_model_options",
    "check_runtimes",
    "create_runner",
    "runtime_for",
    "uses_runtime",
]

SIMULATOR_PREFIX = "sim-"


@dataclass(frozen=True)
class RunnerSettings:
    """How runners are built; one value for every model a server hosts.

    - ``threads``: compute threads per model instance; 0 means ``os.cpu_count()``.
    - ``runtime``: what computes the upscalers: ``auto`` (the default: each model's measured
      default CPU runtime, ``cpu_runtime`` in the catalog, or ncnn when that one is not
      installed; on a GPU the runtime that drives it, see
      :func:`~chaoqing.modelserver.runners.backends.resolve_runtime`), ``ncnn``, ``openvino``,
      ``onnxruntime`` or ``torch`` (the dlib detector and the simulators ignore it).
    - ``device``: ``"cpu"``, or a device the runtime drives: ``vulkan:N`` (ncnn), ``cuda:N``
      (onnxruntime, torch), ``tensorrt:N`` (onnxruntime's TensorRT provider); the detector and
      the simulators always run on the CPU.
    - ``tile_size``: Real-ESRGAN tile side in input pixels; 0 means the model's default
      (128 for x4plus, 256 for the compact models), which bounds memory per instance.
    - ``max_batch_size``: published batch limit of the image models.
    - ``detector_upsample``: HOG upsampling count, -1 for automatic (once up to 1 MP).
    - ``detector_threshold``: added to dlib's detection threshold (0.3 drops the patches and
      logos HOG mistakes for faces at 0.0).
    - ``model_options``: ``KEY=VALUE`` settings of runners that take their own (the
      simulators); a model that takes none refuses any (see :func:`check_model_options`).
    - ``user_models``: the user's model files by name (``[models.NAME]``); each runs on its own
      ``runtime`` and on ``device``.

    Raises RunnerError when a value is out of range, ``runtime`` is unknown, or ``device`` is
    malformed or not one the runtime drives (cheap: nothing is imported; :func:`check_runtimes`
    checks that they are installed and present).
    """

    threads: int = 0
    runtime: str = AUTO
    device: str = "cpu"
    tile_size: int = 0
    max_batch_size: int = 8
    detector_upsample: int = -1
    detector_threshold: float = 0.3
    model_options: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    user_models: Mapping[str, UserModel] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_options", types.MappingProxyType(dict(self.model_options)))
        object.__setattr__(self, "user_models", types.MappingProxyType(dict(self.user_models)))
        taken = [name for name in self.user_models if name in _FACTORIES]
        if taken:
            raise RunnerError(f"models.{taken[0]}: {taken[0]} is a bundled model's name; choose another")
        for name in ("threads", "tile_size"):
            if getattr(self, name) < 0:
                raise RunnerError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_batch_size < 1:
            raise RunnerError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not -1 <= self.detector_upsample <= 3:
            raise RunnerError(
                f"detector_upsample must be -1 (automatic) or 0 to 3, got {self.detector_upsample}"
            )
        check_device(self.runtime, self.device)


def _create_upscaler(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.backends import create_backend
    from chaoqing.modelserver.runners.upscaler import EDGE_PADDING_PX, UpscalerRunner, one_pass_size

    model = UPSCALERS[name]
    runtime = resolve_runtime(model, settings.runtime, settings.device)
    # the longest side the runner feeds the network: one pass with its edge padding
    max_side = one_pass_size(settings.tile_size or model.default_tile_size, model.tile_context) + 2 * EDGE_PADDING_PX
    backend = create_backend(model, runtime, settings.device, threads=settings.threads,
                             max_items=settings.max_batch_size, max_side=max_side)
    return UpscalerRunner(
        model,
        backend,
        runtime=runtime,
        device=settings.device,
        tile_size=settings.tile_size,
        max_batch_size=settings.max_batch_size,
    )


def _create_face_detector(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.dlib_detector import DlibFaceDetector

    return DlibFaceDetector(
        upsample=settings.detector_upsample, adjust_threshold=settings.detector_threshold
    )


def _create_centerface(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.centerface import CenterFaceDetector

    return CenterFaceDetector(threads=settings.threads)


def _create_face_descriptor(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.face_descriptor import FaceDescriptorRunner

    return FaceDescriptorRunner()


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
        **{name: _create_upscaler for name in UPSCALERS},
        "face-detector": _create_face_detector,
        "centerface": _create_centerface,
        "face-descriptor": _create_face_descriptor,
        "sim-upscale-x2": _create_sim_upscaler,
        "sim-upscale-x4": _create_sim_upscaler,
        "sim-face": _create_sim_face,
        "sim-detector": _create_sim_detector,
    }
)


def _create_user_model(name: str, settings: RunnerSettings) -> Runner:
    from chaoqing.modelserver.runners.user_models import create_user_runner

    model = settings.user_models[name]
    return create_user_runner(model, model.runtime, settings.device, threads=settings.threads,
                              max_batch_size=settings.max_batch_size)


def available_models(settings: RunnerSettings | None = None) -> list[str]:
    """Every model name :func:`create_runner` accepts (the user models of ``settings`` last);
    simulators start with ``sim-``."""
    return [*_FACTORIES, *(settings.user_models if settings else ())]


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


def uses_runtime(name: str) -> bool:
    """Whether model ``name`` is computed by the settings' runtime (the bundled upscalers are;
    the detector and the simulators are not, and a user model has its own)."""
    return name in UPSCALERS


def runtime_for(name: str, settings: RunnerSettings) -> str | None:
    """The runtime model ``name`` runs on: a user model's own, the settings' for a bundled
    upscaler, None for the detector and the simulators."""
    if name in settings.user_models:
        return settings.user_models[name].runtime
    return resolve_runtime(UPSCALERS[name], settings.runtime, settings.device) if uses_runtime(name) else None


def check_runtimes(names: Iterable[str], settings: RunnerSettings) -> None:
    """Before any model loads: check that the runtimes and device the models ``names`` need
    are installed and present (nothing when none of them uses a runtime).

    Raises RunnerError in one line that says what is missing and what to install, e.g.
    ``runtime openvino is not installed: pip install 'chaoqing[openvino]'``; for a user model,
    the line starts with its config key.
    """
    for name in dict.fromkeys(names):
        if name in settings.user_models:
            try:
                check_runtime(settings.user_models[name].runtime, settings.device)
            except RunnerError as exc:
                raise RunnerError(f"models.{name}.runtime: {exc}") from exc
    needed = {resolve_runtime(UPSCALERS[name], settings.runtime, settings.device) for name in names if uses_runtime(name)}
    for runtime in sorted(needed):
        check_runtime(runtime, settings.device)


def create_runner(name: str, settings: RunnerSettings) -> Runner:
    """Build and load the runner for model ``name``.

    Raises RunnerError for an unknown name (listing the known ones) or model options it does
    not take, and whatever the runner raises while loading: missing weights or packages, an
    unusable device.
    """
    factory = _create_user_model if name in settings.user_models else _FACTORIES.get(name)
    if factory is None:
        raise RunnerError(f"unknown model {name!r}; known models: {', '.join(available_models(settings))}")
    check_model_options(name, settings.model_options)
    return factory(name, settings)
