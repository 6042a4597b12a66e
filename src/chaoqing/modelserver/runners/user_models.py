"""Users' own model files (``[models.NAME]``, :class:`chaoqing.config.UserModel`), served as the
bundled upscalers are: the same :class:`~chaoqing.modelserver.runners.upscaler.UpscalerRunner`
(tensor contract, edge padding, tiles, batches), the same metadata keys, on the backend of the
file's runtime.

======================  ==============  =====================================================
file                    runtime         what reads it, and the scale
======================  ==============  =====================================================
.pth .pt .ckpt          ``torch``       spandrel (:mod:`.spandrel_backend`): the architecture,
.safetensors                            scale and channels from the state dict
.onnx                   ``onnxruntime`` one float32 input [N,3,H,W], H and W dynamic, RGB in
                        ``openvino``    [0, 1]; the scale from a probe call
.param + .bin           ``ncnn``        the ``Input`` layer's blob in, the last layer's out;
                                        the scale from a probe call
======================  ==============  =====================================================

Each ``kind`` of table has its factory (:data:`_FACTORIES_BY_KIND`): ``upscaler`` here,
``face-restorer`` in :mod:`.face_restorer`, whose conventions are FaceFusion's. A ``scale`` in the config is checked against the model's. Everything that can be wrong with a
file — missing, not a state dict, an architecture spandrel does not know, channels that are not
RGB, a fixed input size, a scale that is no whole number — is a :class:`RunnerError` in one line
that starts with the config key and names the file, raised before the model server listens
(:func:`check_user_model` runs the whole load once there).

Tiles: a user's network has an unknown receptive field, so tiles get :data:`DEFAULT_TILE_CONTEXT`
pixels of context (x4plus's; SPAN and the compact models need 24 and 20) unless the table says
``tile_context``; ``tile_size`` defaults to :data:`DEFAULT_TILE_SIZE`, 128 for ESRGAN (RRDBNet:
50 KB per input pixel with ncnn, docs/model-server.md).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chaoqing.config import FACE_RESTORER, UserModel
from chaoqing.errors import ConfigError, RunnerError
from chaoqing.modelserver.runners.backends import Backend, check_runtime, parse_device
from chaoqing.modelserver.runners.base import Runner
from chaoqing.modelserver.runners.catalog import ModelCard
from chaoqing.modelserver.runners.upscaler import EDGE_PADDING_PX, UpscalerRunner, one_pass_size

__all__ = [
    "DEFAULT_TILE_CONTEXT",
    "DEFAULT_TILE_SIZE",
    "UserUpscaler",
    "create_user_runner",
    "ncnn_blob_names",
    "user_model_card",
]

DEFAULT_TILE_SIZE = 256  # input pixels a side, as the bundled compact and SPAN models
DEFAULT_TILE_CONTEXT = 32  # x4plus's (catalog.py): the widest the bundled models need
# spandrel architecture id → tile size: the heavy ones get smaller tiles (memory per tile)
TILE_SIZES = {"ESRGAN": 128}
# A probe call finds an ONNX or ncnn model's scale: small enough to cost little, a multiple of
# 16 so that window-based networks (SwinIR's 8, HAT's 16) take it.
PROBE_SIDE = 32
RGB_CHANNELS = 3
ONNX_FLOAT = "tensor(float)"
NCNN_INPUT_LAYER = "Input"
NCNN_MAGIC = "7767517"


@dataclass(frozen=True)
class UserUpscaler:
    """A user's upscaler, once its file is read: its card and its tiling (what
    :class:`UpscalerRunner` needs, as a bundled :class:`~.catalog.UpscalerModel` gives it)."""

    card: ModelCard
    default_tile_size: int
    tile_context: int

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def scale(self) -> int:
        return self.card.scale


def user_model_card(model: UserModel, architecture: str, scale: int) -> ModelCard:
    """The card ``chaoqing models`` and the metadata show: the user's words for license and
    source, the architecture and scale the file has."""
    return ModelCard(
        name=model.name,
        kind=model.kind,
        architecture=architecture,
        scale=scale,
        license=model.license,
        commercial_use=model.commercial_use,
        license_note=f"from the config's [models.{model.name}]: the weights' terms are the user's to know",
        source=model.source,
        package=f"user file {model.path}",
        purpose=model.purpose or f"a model file of the user's: {architecture}{f' ×{scale}' if scale else ''}",
    )


def _where(model: UserModel) -> str:
    return f"models.{model.name}.path"


def _checked_scale(model: UserModel, found: int, architecture: str) -> int:
    if model.scale and model.scale != found:
        raise RunnerError(f"models.{model.name}.scale: {model.scale}, but {model.path} ({architecture}) "
                          f"upscales ×{found}")
    return found


def _tiling(model: UserModel, architecture: str) -> tuple[int, int]:
    return (model.tile_size or TILE_SIZES.get(architecture, DEFAULT_TILE_SIZE),
            model.tile_context or DEFAULT_TILE_CONTEXT)


def _max_side(tile_size: int, tile_context: int) -> int:
    """The longest side the runner feeds the network (as the bundled factory computes it)."""
    return one_pass_size(tile_size, tile_context) + 2 * EDGE_PADDING_PX


def create_user_runner(model: UserModel, runtime: str, device_text: str, *, threads: int = 0,
                       max_batch_size: int = 8) -> Runner:
    """Load ``model``'s file on ``runtime`` (the model's own) and ``device_text``.

    Raises RunnerError in one line naming the config key and the file when the file is missing
    or is not what its format needs, and as :func:`check_runtime` when the runtime or device is
    missing.
    """
    try:
        model.check_files()
    except ConfigError as exc:
        raise RunnerError(str(exc)) from exc
    check_runtime(runtime, device_text)
    factory = _FACTORIES_BY_KIND.get(model.kind)
    if factory is None:  # the config refuses other kinds; a kind it learns needs a factory here
        raise RunnerError(f"models.{model.name}.kind: {model.kind!r} has no runner")
    return factory(model, runtime, device_text, threads, max_batch_size)


def _create_upscaler(model: UserModel, runtime: str, device_text: str, threads: int, max_batch_size: int) -> Runner:
    """An upscaler file as an :class:`UpscalerRunner` on its backend."""
    device = parse_device(device_text)
    if runtime == "torch":
        from chaoqing.modelserver.runners.spandrel_backend import (
            check_upscaler,
            create_spandrel_backend,
            load_descriptor,
        )

        descriptor = load_descriptor(Path(model.path), _where(model))
        check_upscaler(descriptor, Path(model.path), _where(model))
        architecture = str(descriptor.architecture.name)
        scale = _checked_scale(model, int(descriptor.scale), architecture)
        tile_size, tile_context = _tiling(model, str(descriptor.architecture.id))
        backend: Backend = create_spandrel_backend(descriptor, device, model_name=model.name, threads=threads,
                                                   max_items=max_batch_size)
        description = UserUpscaler(user_model_card(model, architecture, scale), tile_size, tile_context)
    else:
        tile_size, tile_context = _tiling(model, "")
        backend, description = _probed_backend(model, runtime, device_text, tile_size, tile_context,
                                               threads=threads, max_items=max_batch_size)
    return UpscalerRunner(description, backend, runtime=runtime, device=device_text, max_batch_size=max_batch_size)


def _create_face_restorer(model: UserModel, runtime: str, device_text: str, threads: int,
                          max_batch_size: int) -> Runner:
    """A face-restorer file (:mod:`.face_restorer`: FaceFusion's ONNX exports, spandrel's face models)."""
    from chaoqing.modelserver.runners.face_restorer import create_face_restorer

    return create_face_restorer(model, runtime, parse_device(device_text),
                                lambda architecture: user_model_card(model, architecture, 1),
                                threads=threads, max_batch_size=max_batch_size)


# what each kind of [models.NAME] is served by (chaoqing.config.USER_MODEL_KINDS)
_FACTORIES_BY_KIND: Mapping[str, Callable[[UserModel, str, str, int, int], Runner]] = types.MappingProxyType({
    "upscaler": _create_upscaler,
    FACE_RESTORER: _create_face_restorer,
})


def _probed_backend(model: UserModel, runtime: str, device_text: str, tile_size: int, tile_context: int, *,
                    threads: int, max_items: int) -> tuple[Backend, UserUpscaler]:
    """An ONNX or ncnn file's backend, its scale found by a probe call."""
    device = parse_device(device_text)
    path = Path(model.path)
    probing = UserUpscaler(user_model_card(model, runtime, model.scale or 1), tile_size, tile_context)
    backend: Backend
    if runtime == "onnxruntime":
        from chaoqing.modelserver.runners.onnxruntime_backend import OnnxruntimeBackend

        input_name, output_name, fixed_batch = _onnx_image_tensors(model)
        backend = OnnxruntimeBackend(probing, device, threads=threads, max_items=fixed_batch or max_items,
                                     max_side=_max_side(tile_size, tile_context), onnx_path=path,
                                     input_name=input_name, output_name=output_name)
        architecture = "ONNX"
    elif runtime == "openvino":
        from chaoqing.modelserver.runners.openvino_backend import OpenvinoBackend

        backend = OpenvinoBackend(probing, threads=threads, max_items=max_items, onnx_path=path)
        architecture = "ONNX"
    else:
        from chaoqing.modelserver.runners.ncnn_backend import NcnnBackend

        input_blob, output_blob = ncnn_blob_names(path, _where(model))
        backend = NcnnBackend(probing, device, threads=threads, files=(path, path.with_suffix(".bin")),
                              input_blob=input_blob, output_blob=output_blob)
        architecture = "ncnn"
    scale = _checked_scale(model, _probe_scale(backend, model), architecture)
    backend.scale = scale
    return backend, UserUpscaler(user_model_card(model, architecture, scale), tile_size, tile_context)


def _probe_scale(backend: Backend, model: UserModel) -> int:
    """Run one grey PROBE_SIDE² image; the output's side over the input's is the scale.

    Raises RunnerError when the call fails or the output is not RGB at a whole scale.
    """
    probe = np.full((1, RGB_CHANNELS, PROBE_SIDE, PROBE_SIDE), 0.5, dtype=np.float32)
    try:
        output = backend._forward(probe)  # the shape check of infer() needs the scale this finds
    except RunnerError as exc:
        raise RunnerError(f"{_where(model)}: {model.path} failed on a {PROBE_SIDE}×{PROBE_SIDE} RGB probe "
                          f"({exc})") from exc
    shape = tuple(output.shape)
    if len(shape) != 4 or shape[:2] != (1, RGB_CHANNELS) or shape[2] != shape[3] or shape[2] % PROBE_SIDE:
        raise RunnerError(f"{_where(model)}: {model.path} turned a [1,3,{PROBE_SIDE},{PROBE_SIDE}] probe into "
                          f"{list(shape)}; an upscaler gives [1,3,s·{PROBE_SIDE},s·{PROBE_SIDE}] for a whole s")
    return int(shape[2]) // PROBE_SIDE


def _onnx_image_tensors(model: UserModel) -> tuple[str, str, int]:
    """The ONNX file's one image input and output names, and its fixed batch size (0: dynamic).

    Raises RunnerError when the file does not open, or its tensors are not one float32
    [N,3,H,W] in with dynamic H and W, one out.
    """
    import onnxruntime

    from chaoqing.modelserver.runners.onnxruntime_backend import CPU_PROVIDER

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = onnxruntime.InferenceSession(model.path, options, providers=[CPU_PROVIDER])
    except Exception as exc:  # onnxruntime's pybind11 errors for an unreadable file
        raise RunnerError(f"{_where(model)}: {model.path} is not an ONNX model onnxruntime opens "
                          f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise RunnerError(f"{_where(model)}: {model.path} has {len(inputs)} input(s) and {len(outputs)} output(s); "
                          "an upscaler has one image in and one out")
    image = inputs[0]
    shape = list(image.shape)  # a dynamic dimension is a name (str) or None
    if image.type != ONNX_FLOAT or len(shape) != 4 or shape[1] not in (RGB_CHANNELS, None) and \
            not isinstance(shape[1], str):
        raise RunnerError(f"{_where(model)}: {model.path} takes {image.type} {shape}; chaoqing sends "
                          f"float32 [N,3,H,W] RGB in [0, 1]")
    if any(isinstance(side, int) for side in shape[2:]):
        raise RunnerError(f"{_where(model)}: {model.path} takes a fixed {shape[2]}×{shape[3]} input; chaoqing "
                          "needs dynamic height and width (export with dynamic axes)")
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 0
    return str(image.name), str(outputs[0].name), fixed_batch


def ncnn_blob_names(param_path: Path, where: str) -> tuple[str, str]:
    """An ncnn .param file's input blob (its ``Input`` layer's) and output blob (the last layer's).

    Raises RunnerError when the file is not an ncnn param file with an Input layer.
    """
    try:
        lines = [line.split() for line in param_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RunnerError(f"{where}: {param_path} cannot be read as an ncnn .param file ({exc})") from exc
    if len(lines) < 3 or lines[0] != [NCNN_MAGIC]:
        raise RunnerError(f"{where}: {param_path} is not an ncnn .param file (its first line is not {NCNN_MAGIC})")
    layers = lines[2:]
    tops: list[list[str]] = []
    input_blob = ""
    for fields in layers:
        try:
            bottom_count, top_count = int(fields[2]), int(fields[3])
        except (IndexError, ValueError) as exc:
            raise RunnerError(f"{where}: {param_path} has a layer line ncnn would not read: {' '.join(fields)}") from exc
        layer_tops = fields[4 + bottom_count : 4 + bottom_count + top_count]
        tops.append(layer_tops)
        if fields[0] == NCNN_INPUT_LAYER and not input_blob and layer_tops:
            input_blob = layer_tops[0]
    if not input_blob or not tops[-1]:
        raise RunnerError(f"{where}: {param_path} has no Input layer")
    return input_blob, tops[-1][0]

