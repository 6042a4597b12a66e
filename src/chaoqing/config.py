"""One immutable :class:`Config`, built once at start-up and passed down.

Sources, later ones winning: the defaults below, a TOML file (``--config chaoqing.toml``),
``CHAOQING_*`` environment variables, then command-line flags. Nested keys use ``__`` in
variable names: ``CHAOQING_LIMITS__MAX_INPUT_PIXELS=8000000``; model endpoints are lists
of URLs: ``CHAOQING_ENDPOINTS__REALESRGAN_X4PLUS=http://10.0.0.5:9000,http://10.0.0.6:9000``.

A TOML file looks like::

    preset = "balanced"
    request_deadline_s = 300

    [limits]
    max_body_bytes = 41943040

    [model_server]                   # the model servers `chaoqing serve` starts
    runtime = "auto"                 # auto (each model's measured default) | ncnn | openvino | onnxruntime | torch
    [model_server.runtimes]          # per model, over `runtime`
    "realesrgan-x4plus" = "openvino"
    [model_server.devices]           # per model, over `device`
    "realesrgan-x4plus" = "cpu"

    [models.my-upscaler]             # a model file of your own (docs/models.md)
    path = "models/4x-MyModel.pth"   # .pth/.pt/.safetensors (spandrel), .onnx, or ncnn .param + .bin
    license = "CC-BY-4.0"            # shown by `chaoqing models` and in the model's metadata
    [presets.mine]
    upscaler = "my-upscaler"

    [endpoints]                      # absent: `chaoqing serve` starts model servers itself
    "realesr-animevideov3-x4" = ["http://127.0.0.1:9000"]
    "realesrgan-x4plus" = ["http://127.0.0.1:9001", "http://10.0.0.7:8000"]
    "face-detector" = ["http://127.0.0.1:9000"]

Invalid values raise :class:`ConfigError` with the key named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaoqing.errors import ConfigError

__all__ = [
    "DEFAULT_FACE_FIDELITY",
    "DEFAULT_FACE_TEMPLATE",
    "FACE_RESTORER",
    "FACE_TEMPLATES",
    "MODEL_RUNTIMES",
    "PRESETS",
    "UNKNOWN_LICENSE",
    "USER_MODEL_FORMATS",
    "USER_MODEL_KINDS",
    "Config",
    "EncodeSettings",
    "IdentityGuardSettings",
    "JobSettings",
    "Limits",
    "ModelServerSettings",
    "Preset",
    "RemoteSettings",
    "TileSettings",
    "UserModel",
    "load_config",
    "user_models_toml",
]

ENV_PREFIX = "CHAOQING_"
CONFIG_PATH_VARIABLE = "CHAOQING_CONFIG"  # names the TOML file (chaoqing.wsgi), not a key



@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost; checked before pixels are decoded."""

    max_body_bytes: int = 40 * 1024 * 1024
    max_input_pixels: int = 16_000_000
    max_output_pixels: int = 64_000_000
    max_faces: int = 64  # faces enhanced per photo, the largest first; the rest keep the background
    # an upload's EXIF block or XMP packet larger than this is not carried (logged); cameras
    # write 10-70 kB (JPEG caps each at 64 kB), so 1 MiB is generous and bounds a hostile PNG's
    max_metadata_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Preset:
    """Which model does what. ``face_model`` None means faces are not enhanced.

    How an enhanced face is matched to its photo (``chaoqing.gateway.stages.face_match``):
    ``face_strength`` in [0, 1] blends it with the background's own face (1: the model's face
    alone), ``face_colour`` gives it the photo's colours, ``face_texture`` the photo's grain.
    ``face_fidelity`` in [0, 1] is the fidelity ``weight`` a CodeFormer-style face restorer
    takes (1: closest to the input face); None: the model's own default (``[models.NAME] weight``).

    ``face_min_crop`` (px): every face's aligned crop is at least this side, so the face model's
    answer is shrunk onto a small face (supersampled) rather than made at the paste's own size;
    None: the gateway's fit (``chaoqing.gateway.stages.enhance_faces``, from 64 px). A model
    with a fixed input size gets that size whatever this says.

    ``identity_guard`` (``chaoqing.gateway.stages.identity``): after the face model, compare the
    restored face with the input face (dlib's descriptor) and blend it back toward the
    background's face until they are ``[identity_guard] threshold`` apart or less. None: on
    when the face model is a face restorer of yours (``kind = "face-restorer"``), off for the
    bundled upscalers (they do not repaint faces).
    """

    name: str
    upscaler: str
    face_model: str | None
    description: str = ""
    face_strength: float = 1.0
    face_colour: bool = True
    face_texture: bool = True
    face_fidelity: float | None = None
    identity_guard: bool | None = None
    face_min_crop: int | None = None

    def __post_init__(self) -> None:
        if self.face_min_crop is not None and not (
                isinstance(self.face_min_crop, int) and not isinstance(self.face_min_crop, bool)
                and MIN_FACE_CROP_PX <= self.face_min_crop <= MAX_FACE_CROP_PX):
            raise ConfigError(f"presets.{self.name}.face_min_crop: {self.face_min_crop!r} is not a whole number of "
                              f"pixels in [{MIN_FACE_CROP_PX}, {MAX_FACE_CROP_PX}]")
        if self.face_fidelity is not None and not _is_unit_number(self.face_fidelity):
            raise ConfigError(f"presets.{self.name}.face_fidelity: {self.face_fidelity!r} is not a number in [0, 1]")
        if self.identity_guard is not None and not isinstance(self.identity_guard, bool):
            raise ConfigError(f"presets.{self.name}.identity_guard: {self.identity_guard!r} is not true or false")
        if not (isinstance(self.face_strength, (int, float)) and not isinstance(self.face_strength, bool)
                and math.isfinite(self.face_strength) and 0.0 <= self.face_strength <= 1.0):
            raise ConfigError(f"presets.{self.name}.face_strength: {self.face_strength!r} is not a number in [0, 1]")
        for key in ("face_colour", "face_texture"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"presets.{self.name}.{key}: {getattr(self, key)!r} is not true or false")


PRESET_FACE_MATCH_KEYS = ("face_strength", "face_colour", "face_texture")
PRESET_FACE_MODEL_KEYS = ("face_fidelity", "face_min_crop")  # what a preset passes its face model
MIN_FACE_CROP_PX, MAX_FACE_CROP_PX = 16, 1024


def _is_unit_number(value: object) -> bool:
    """A real number (not a bool) in [0, 1]."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


PRESET_IDENTITY_KEY = "identity_guard"
# dlib's 128-D face descriptor (the model server's `face-descriptor`): served by the detector's
# model server, so the gateway compares faces without importing dlib
FACE_DESCRIPTOR = "face-descriptor"

COMPACT_X4 = "realesr-animevideov3-x4"
PLUS_X4 = "realesrgan-x4plus"
SPAN_KENDATA_X4 = "span-kendata-x4"  # CC-BY-SA-4.0: commercial use allowed, with attribution (docs/models.md)
FACE_DETECTOR = "face-detector"  # dlib's HOG + 5-point shape predictor
# CenterFace (ONNX Runtime): the default detector; as many faces as HOG on the sample photos,
# FFHQ's own 5 points, tilted heads too (docs/faces.md, `chaoqing bench detect`)
CENTERFACE = "centerface"

# Chosen by `chaoqing bench quality` on degraded copies of real photos (docs/quality.md). Every
# model a built-in preset names is a model server `chaoqing serve` starts, and each must be one
# an operator may run commercially (BSD-3, and CC-BY-SA-4.0 for 4xSPANkendata's faces). As the
# background the bundled SPAN photo models lost on what users upload: 4xSPANkendata and SPAN's
# own ×4 (license unverified) enlarge JPEG blocks and noise (SSIM 0.72 / 0.77 against compact's
# 0.80 at JPEG quality 75); ClearReality4x, the most natural on photos, is non-commercial and so
# only a documented [presets.photo-nc].
PRESETS: Mapping[str, Preset] = types.MappingProxyType(
    {
        "fast": Preset("fast", COMPACT_X4, None,
                       "compact Real-ESRGAN everywhere (smooth; robust to JPEG and noise), faces not enhanced"),
        # faces: chosen by `chaoqing bench faces` on the sample photos (docs/faces.md). 4xSPANkendata
        # on 128 px crops stays closest to each person (identity ≤ 0.13, PSNR ≥ 33 dB, where x4plus
        # on the fitted crops gave 0.32 and 27 dB: painted faces) at a 30th of x4plus's time
        "balanced": Preset(
            "balanced", COMPACT_X4, SPAN_KENDATA_X4,
            "compact Real-ESRGAN background, 4xSPANkendata on aligned faces (128 px crops)", face_min_crop=128,
        ),
        "quality": Preset("quality", PLUS_X4, PLUS_X4,
                          "Real-ESRGAN x4plus everywhere: detail closest to the original's, robust to JPEG and noise"),
        # illustrations: realesr-animevideov3 is Real-ESRGAN's anime model (video, fast). No faces:
        # HOG is trained on photos and finds few drawn ones, and a face model here would be one
        # more model every deployment starts; realesrgan-x4plus-anime is there to name
        # ([presets.anime] face_model = "realesrgan-x4plus-anime")
        "anime": Preset("anime", COMPACT_X4, None, "illustrations: compact anime model everywhere, faces not enhanced"),
    }
)

# What `[model_server] runtime` may name: "auto" (chaoqing.modelserver.runners.backends.AUTO:
# each model's measured default CPU runtime, ncnn when that is not installed), then RUNTIMES (a
# leaf cannot import them, tests/test_runtimes.py checks that they agree)
MODEL_RUNTIMES = ("auto", "ncnn", "openvino", "onnxruntime", "torch")


@dataclass(frozen=True)
class EncodeSettings:
    """How the output is written (``[encode]``); ``strip_metadata`` and ``strip_gps`` are the
    defaults of the request parameters of those names."""

    # zlib level of PNG output, 0 (stored) to 9. 2: 14 % more bytes than zlib's default 6 in
    # 14-23 % of its time, 52-65 % of 4's (which writes 6's bytes); measured on ×4 upscales,
    # `chaoqing bench encode` (docs/benchmarks.md, stages/encode.py)
    png_compress_level: int = 2
    strip_metadata: bool = False  # write no EXIF, XMP or ICC (colours converted to sRGB first)
    strip_gps: bool = False  # write EXIF and XMP without their GPS positions

    def __post_init__(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"encode.png_compress_level: {self.png_compress_level} is outside 0-9")


@dataclass(frozen=True)
class TileSettings:
    """How the gateway splits a background into tiles (input pixels)."""

    tile_size: int = 512  # at most; lowered to a model's published tile_size; 0 = never tile
    overlap: int = 16  # input pixels cross-faded at each seam
    margin: int = 8  # input pixels of context on each side of a seam that are never shown
    max_concurrent_tiles: int = 8


TENSOR_ENCODINGS = ("auto", "binary", "json")  # RemoteSettings.tensor_encoding


@dataclass(frozen=True)
class RemoteSettings:
    """How the gateway talks to model servers."""

    connections_per_endpoint: int = 32
    connect_timeout_s: float = 2.0
    health_interval_s: float = 1.0
    eject_after_failures: int = 3
    eject_for_s: float = 5.0
    # One attempt of a model call may go this long unanswered before its replica counts as
    # silent (ejected, the call retried once on another within the request's deadline); a
    # model whose metadata publishes attempt_timeout_s uses that instead; 0: the deadline alone.
    # 180 s: a call can wait out a full batch and then run in one on a 2-core CPU (x4plus,
    # 8 faces of 128 px at ~9.4 s each, docs/model-server.md: ~150 s), and 120 s of the
    # default 300 s deadline stay for the retry.
    attempt_timeout_s: float = 180.0
    # How tensors travel: "binary" (Triton's binary tensor data extension), "json" (plain v2
    # "data" arrays, which every v2 server takes), or "auto": binary where the server's
    # metadata (GET /v2) lists the binary_tensor_data extension or has no list, JSON where its
    # list lacks it (Seldon MLServer lists none): docs/model-server.md
    tensor_encoding: str = "auto"

    def __post_init__(self) -> None:
        if not self.attempt_timeout_s >= 0:  # NaN too
            raise ConfigError(f"remote.attempt_timeout_s: {self.attempt_timeout_s} must be 0 (none) or positive")
        if self.tensor_encoding not in TENSOR_ENCODINGS:
            raise ConfigError(
                f"remote.tensor_encoding: {self.tensor_encoding!r} is not one of {', '.join(TENSOR_ENCODINGS)}"
            )


@dataclass(frozen=True)
class ModelServerSettings:
    """Settings of model servers, embedded or standalone."""

    threads: int = 0  # compute threads per model instance; 0 = number of CPUs
    # what computes the upscalers, and where (docs/model-server.md "Runtimes"): auto (each model's
    # measured default on the CPU, `chaoqing models` shows it), ncnn on cpu or vulkan:N, openvino
    # on cpu, onnxruntime on cpu, cuda:N or tensorrt:N, torch on cpu or cuda:N
    runtime: str = "auto"
    device: str = "cpu"
    # per model, over runtime and device: [model_server.runtimes] "realesrgan-x4plus" = "openvino"
    runtimes: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    devices: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    instances: int = 1
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    max_request_bytes: int = 1024 * 1024 * 1024
    # The embedded model servers' shared compute budget (chaoqing.modelserver.compute): at most
    # this many heavy batches compute at once on this machine, each on cores / compute_slots
    # threads (when threads is 0); detection runs beside them. 0 = no budget: every server uses
    # every core. 2: measured on 2 cores, two 1-thread calls side by side do more than one
    # 2-thread call (ncnn gains 1.2-1.5x from its second thread), docs/benchmarks.md "One machine".
    # CPU only (a GPU device gets no budget); model servers at configured endpoints are untouched.
    compute_slots: int = 2
    # sim-* models only (tests and benchmarks): given to them alone, as --model-option settings
    sim_latency_ms: float = 100.0
    sim_faces: int = 2

    def __post_init__(self) -> None:
        if self.compute_slots < 0:
            raise ConfigError(f"model_server.compute_slots: {self.compute_slots} must be 0 (no budget) or more")
        for name in ("runtimes", "devices"):
            table = {_normalise_model_key(model): value for model, value in getattr(self, name).items()}
            object.__setattr__(self, name, types.MappingProxyType(table))
        for where, runtime in [("runtime", self.runtime), *((f"runtimes.{m}", r) for m, r in self.runtimes.items())]:
            if runtime not in MODEL_RUNTIMES:
                raise ConfigError(f"model_server.{where}: {runtime!r} is not one of {', '.join(MODEL_RUNTIMES)}")

    def runtime_for(self, model: str) -> str:
        """The runtime ``model``'s server is started with: its entry in ``runtimes``, else ``runtime``."""
        return self.runtimes.get(model, self.runtime)

    def device_for(self, model: str) -> str:
        """The device ``model``'s server is started with: its entry in ``devices``, else ``device``."""
        return self.devices.get(model, self.device)


@dataclass(frozen=True)
class IdentityGuardSettings:
    """How the identity guard decides (``[identity_guard]``; chaoqing.gateway.stages.identity).

    - ``threshold``: the largest descriptor distance a guarded face may keep from the input's.
      dlib's own "same person" line is 0.6; 0.30 is issue 13's target for every enhanced face
      (Lanczos ×2 alone measures 0.006-0.036, docs/faces.md).
    - ``max_rounds``: descriptor calls that narrow the strength after the first check fails.
    - ``candidates_per_round``: blends described in each of those calls (one call, one image).
    """

    threshold: float = 0.30
    max_rounds: int = 2
    candidates_per_round: int = 4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 2.0):
            raise ConfigError(f"identity_guard.threshold: {self.threshold} is outside (0, 2]")
        if not 0 <= self.max_rounds <= 8:
            raise ConfigError(f"identity_guard.max_rounds: {self.max_rounds} is outside 0-8")
        if not 1 <= self.candidates_per_round <= 16:
            raise ConfigError(f"identity_guard.candidates_per_round: {self.candidates_per_round} is outside 1-16")


@dataclass(frozen=True)
class JobSettings:
    """The job spool (``POST /v1/jobs``): where jobs live, its bounds, and a job's own limits.

    A job's photo may be larger and take longer than a synchronous request's: 25 MP in (a
    24 MP camera's 6000×4000), 100 MP out (that photo at 2×), 6 hours. On a 2-core CPU the
    fast preset takes 10-36 s per input MP (a 24 MP photo: 4-15 min) and x4plus everywhere
    (quality) about 0.0016-0.0027 MP/s (docs/jobs.md: 24 MP in 2.5-4.2 h), so 6 h covers a
    24 MP photo with every built-in preset here.
    """

    spool_dir: str = ""  # "" = $XDG_STATE_HOME/chaoqing/jobs (~/.local/state/chaoqing/jobs)
    max_jobs: int = 1000  # jobs in the spool, whatever their status; past it POST answers 503 spool_full
    max_bytes: int = 10 * 1024 * 1024 * 1024  # inputs and results on disk; past it 503 spool_full
    max_running: int = 1  # per gateway process: on one CPU a second job only shares its cores
    result_ttl_s: float = 86400.0  # a finished job (done, failed, cancelled) is kept this long
    deadline_s: float = 21600.0  # per run of a job (see above)
    max_body_bytes: int = 128 * 1024 * 1024
    max_input_pixels: int = 25_000_000
    max_output_pixels: int = 100_000_000
    # runs a job may lose to a gateway that stopped without releasing it (killed, crashed);
    # the loss after that fails the job with the reason. An orderly stop releases its jobs
    # and costs no attempt.
    max_attempts: int = 2
    # a running job's gateway refreshes its heartbeat every heartbeat_timeout_s / 4; one not
    # refreshed for this long is taken over by another gateway (clocks must agree to well within it)
    heartbeat_timeout_s: float = 30.0
    # the ETA before the first tile is measured, for an upscaler whose metadata publishes no
    # input_megapixels_per_s: the compact x4 model on a 2-core CPU, 10-36 s per MP (20 s)
    default_megapixels_per_s: float = 0.05
    max_event_streams: int = 64  # open GET /v1/jobs/{id}/events streams per gateway process

    def __post_init__(self) -> None:
        for name in ("max_jobs", "max_bytes", "max_running", "result_ttl_s", "deadline_s", "max_body_bytes",
                     "max_input_pixels", "max_output_pixels", "max_attempts", "heartbeat_timeout_s",
                     "default_megapixels_per_s", "max_event_streams"):
            if not getattr(self, name) > 0:  # NaN too
                raise ConfigError(f"jobs.{name}: must be positive")


# --- users' own model files: [models.NAME] (docs/models.md) ----------------------------------

# What a [models.NAME] table may serve as: an upscaler, or a face restorer (an aligned face in,
# the same face restored at the same size out: GFPGAN, CodeFormer, GPEN, RestoreFormer++).
FACE_RESTORER = "face-restorer"
USER_MODEL_KINDS = ("upscaler", FACE_RESTORER)
# The alignments a face restorer may be trained on (FaceFusion's face_helper WARP_TEMPLATE_SET):
# FFHQ's 5 points at 512 px (GFPGAN, CodeFormer, GPEN-BFR-512, RestoreFormer++), and the
# arcface 128 layout (GPEN-BFR-256). chaoqing.gateway.stages.enhance_faces holds their points.
FACE_TEMPLATES = ("ffhq-512", "arcface-128")
DEFAULT_FACE_TEMPLATE = "ffhq-512"
FACE_RESTORER_RUNTIMES = ("onnxruntime", "torch")  # chaoqing.modelserver.runners.face_restorer
# FaceFusion's face_enhancer_weight default: CodeFormer's fidelity between quality (0) and identity (1)
DEFAULT_FACE_FIDELITY = 0.5
MAX_FACE_INPUT_SIZE = 2048  # GPEN-BFR-2048, the largest published face restorer
# A model file's suffix → the runtimes that load it, the default first: PyTorch files go through
# spandrel (it recognises the architecture from the state dict), ONNX through ONNX Runtime or
# OpenVINO, ncnn's .param with the .bin of the same stem beside it.
USER_MODEL_FORMATS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    ".pth": ("torch",),
    ".pt": ("torch",),
    ".ckpt": ("torch",),
    ".safetensors": ("torch",),
    ".onnx": ("onnxruntime", "openvino"),
    ".param": ("ncnn",),
})
NCNN_WEIGHTS_SUFFIX = ".bin"
UNKNOWN_LICENSE = "user-supplied, license unknown"
USER_SOURCE = "user-supplied file"
USER_COMMERCIAL_USE = ("yes", "no", "unverified")  # as the bundled models' cards say it
_USER_MODEL_KEYS = ("path", "kind", "runtime", "scale", "license", "source", "commercial_use", "purpose",
                    "tile_size", "tile_context", "template", "input_size", "weight")
_UPSCALER_ONLY_KEYS = ("tile_size", "tile_context")
_FACE_RESTORER_ONLY_KEYS = ("template", "input_size", "weight")
_RESERVED_MODEL_PREFIX = "sim-"  # chaoqing.modelserver.runners' simulators
MAX_USER_MODEL_SCALE = 16  # generous: published single-image upscalers go to ×8


@dataclass(frozen=True)
class UserModel:
    """A model file of the user's own, from a ``[models.NAME]`` table.

    - ``path``: the file (``~`` expanded; a relative path in a TOML file is taken from that
      file's folder); the suffix says the format (:data:`USER_MODEL_FORMATS`).
    - ``kind``: what it serves as (:data:`USER_MODEL_KINDS`).
    - ``runtime``: ``""`` is the format's default (torch, onnxruntime, ncnn); ``.onnx`` also
      takes ``openvino``.
    - ``scale``: 0 reads it from the model (spandrel's descriptor, or a probe call); a value
      given is checked against the model when it loads.
    - ``license``, ``source``, ``commercial_use``, ``purpose``: what ``chaoqing models`` and
      the model's metadata say about it; the weights' terms are the user's to know.
    - ``tile_size``, ``tile_context``: input pixels per tile and of context around it; 0 is
      the model server's default for the architecture (upscalers only).
    - ``template``, ``input_size``, ``weight`` (face restorers only): the alignment the model is
      trained on (:data:`FACE_TEMPLATES`, ``""``: ``ffhq-512``), the side of the square face
      it takes (0: what the file declares, else 512) and the default fidelity weight, in
      [0, 1], of a model with a ``weight`` input (CodeFormer's).

    Raises ConfigError, naming the key, for a value that cannot be right (before any file is
    opened; :meth:`check_files` looks at the disk).
    """

    name: str
    path: str
    kind: str = "upscaler"
    runtime: str = ""
    scale: int = 0
    license: str = UNKNOWN_LICENSE
    source: str = USER_SOURCE
    commercial_use: str = "unverified"
    purpose: str = ""
    tile_size: int = 0
    tile_context: int = 0
    template: str = ""
    input_size: int = 0
    weight: float = DEFAULT_FACE_FIDELITY

    def __post_init__(self) -> None:
        where = f"models.{self.name}"
        if not self.name or self.name.startswith(_RESERVED_MODEL_PREFIX) or self.name == FACE_DETECTOR:
            raise ConfigError(f"{where}: the name is reserved (sim-*, {FACE_DETECTOR}); choose another")
        if self.kind not in USER_MODEL_KINDS:
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of {', '.join(USER_MODEL_KINDS)}")
        if not self.path:
            raise ConfigError(f"{where}.path: the model file is required")
        runtimes = USER_MODEL_FORMATS.get(self.suffix)
        if runtimes is None:
            raise ConfigError(f"{where}.path: {self.path} is not a model file chaoqing loads (expected "
                              f"{', '.join(USER_MODEL_FORMATS)}; ncnn's .param with its .bin beside it)")
        if not self.runtime:
            object.__setattr__(self, "runtime", runtimes[0])
        elif self.runtime not in runtimes:
            raise ConfigError(f"{where}.runtime: {self.runtime} does not load {self.suffix} files; "
                              f"it takes {', '.join(runtimes)}")
        if self.commercial_use not in USER_COMMERCIAL_USE:
            raise ConfigError(f"{where}.commercial_use: {self.commercial_use!r} is not one of "
                              f"{', '.join(USER_COMMERCIAL_USE)}")
        for key in ("scale", "tile_size", "tile_context"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be 0 (from the model) or positive")
        if self.scale > MAX_USER_MODEL_SCALE:
            raise ConfigError(f"{where}.scale: {self.scale} is more than {MAX_USER_MODEL_SCALE}")
        self._check_kind_keys(where)

    def _check_kind_keys(self, where: str) -> None:
        """The keys only one kind takes are left at their defaults by the other."""
        other_kind_keys = _UPSCALER_ONLY_KEYS if self.kind == FACE_RESTORER else _FACE_RESTORER_ONLY_KEYS
        for key in other_kind_keys:
            if getattr(self, key) != getattr(UserModel, key):
                raise ConfigError(f"{where}.{key}: kind = \"{self.kind}\" takes no {key}")
        if self.kind != FACE_RESTORER:
            return
        if not self.template:
            object.__setattr__(self, "template", DEFAULT_FACE_TEMPLATE)
        elif self.template not in FACE_TEMPLATES:
            raise ConfigError(f"{where}.template: {self.template!r} is not one of {', '.join(FACE_TEMPLATES)}")
        if self.runtime not in FACE_RESTORER_RUNTIMES:
            raise ConfigError(f"{where}.runtime: a face restorer runs on {' or '.join(FACE_RESTORER_RUNTIMES)} "
                              f"(.onnx, .pth, .safetensors), not {self.runtime}")
        if self.scale > 1:
            raise ConfigError(f"{where}.scale: a face restorer gives the face at the size it takes (scale 1)")
        if not 0 <= self.input_size <= MAX_FACE_INPUT_SIZE:
            raise ConfigError(f"{where}.input_size: {self.input_size} is not 0 (the file's) to {MAX_FACE_INPUT_SIZE}")
        if not _is_unit_number(self.weight):
            raise ConfigError(f"{where}.weight: {self.weight!r} is not a number in [0, 1]")

    @property
    def suffix(self) -> str:
        return Path(self.path).suffix.lower()

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the model needs: the one file, or ncnn's .param and .bin."""
        path = Path(self.path)
        return (path, path.with_suffix(NCNN_WEIGHTS_SUFFIX)) if self.runtime == "ncnn" else (path,)

    def check_files(self) -> None:
        """Raises ConfigError, naming the key and the file, when a file the model needs is not there."""
        for index, path in enumerate(self.files):
            if not path.is_file():
                state = "is not a file" if path.exists() else "does not exist"
                what = f"{path} {state}" if index == 0 else f"{path} (ncnn's weights beside {self.path}) {state}"
                raise ConfigError(f"models.{self.name}.path: {what}")


def _paths_from_folder(raw: Any, folder: Path) -> Any:
    """The ``[models.NAME]`` tables with each relative ``path`` made to start at ``folder``."""
    if not isinstance(raw, Mapping):
        return raw
    tables = {}
    for name, table in raw.items():
        if isinstance(table, Mapping) and isinstance(table.get("path"), str) and table["path"]:
            path = Path(table["path"]).expanduser()
            table = {**table, "path": str(path if path.is_absolute() else folder / path)}
        tables[name] = table
    return tables


def _parse_user_models(raw: Any) -> dict[str, UserModel]:
    """``[models.NAME]`` tables as UserModels (strings and integers as TOML gives them)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("models: must be a table of model tables ([models.NAME] with path = ...)")
    models: dict[str, UserModel] = {}
    for raw_name, table in raw.items():
        name = str(raw_name)
        if name != _normalise_model_key(name):  # as endpoints' names are, so that both can name it
            raise ConfigError(f"models.{name}: a model name is lower case, with - for _ ({_normalise_model_key(name)})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"models.{name}: must be a table with path = ...")
        unknown = set(table) - set(_USER_MODEL_KEYS)
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, value in table.items():
            number = key in ("scale", "tile_size", "tile_context", "input_size")
            if key == "weight":
                if not _is_unit_number(value):
                    raise ConfigError(f"models.{name}.weight: {value!r} is not a number in [0, 1]")
                values[key] = float(value)
                continue
            if isinstance(value, bool) or not isinstance(value, int if number else str):
                raise ConfigError(f"models.{name}.{key}: {value!r} is not {'an integer' if number else 'a string'}")
            values[key] = value
        path = values.pop("path", "")
        models[name] = UserModel(name, str(Path(path).expanduser()) if path else "", **values)
    return models


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are TOML's, but for DEL)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def user_models_toml(models: Iterable[UserModel]) -> str:
    """The ``[models.NAME]`` tables of ``models`` as TOML, paths absolute: what the supervisor
    gives a model-server child (``--config``); :func:`load_config` reads it back as it was."""
    lines: list[str] = []
    for model in models:
        lines.append(f"[models.{_toml_string(model.name)}]")
        for key in _USER_MODEL_KEYS:
            value = getattr(model, key)
            if key == "path":
                value = str(Path(value).absolute())
            lines.append(f"{key} = {value if isinstance(value, (int, float)) else _toml_string(value)}")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class Config:
    """Everything the gateway, the CLI and the embedded model servers need to know."""

    host: str = "127.0.0.1"
    port: int = 8080
    preset: str = "balanced"
    scale: float = 2.0
    request_deadline_s: float = 300.0
    body_read_timeout_s: float = 60.0  # the whole upload must arrive within this (else 408)
    max_in_flight: int = 16
    # SIGTERM/Ctrl-C: how long requests in flight may still run before they are answered 503
    # shutting_down. A balanced request for a ~1 MP photo with a face takes 25-50 s on a 2-core CPU
    # (docs/benchmarks.md: compact x4 ~23 s/MP, x4plus ~11 s per face), so 60 s lets those finish.
    shutdown_grace_s: float = 60.0
    detector: str = CENTERFACE  # or FACE_DETECTOR (dlib's HOG), or any model with the detector's tensors
    face_input_size: int = 128
    min_eye_distance_px: float = 5.0
    detection_max_side: int = 2048
    api_keys: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | text
    limits: Limits = field(default_factory=Limits)
    tiles: TileSettings = field(default_factory=TileSettings)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    model_server: ModelServerSettings = field(default_factory=ModelServerSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    identity_guard: IdentityGuardSettings = field(default_factory=IdentityGuardSettings)
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: types.MappingProxyType({}))
    presets: Mapping[str, Preset] = field(default_factory=lambda: PRESETS)
    # users' own model files ([models.NAME]): name → UserModel
    models: Mapping[str, UserModel] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.preset not in self.presets:
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(self.presets)}")
        if not 1.0 <= self.scale <= 4.0:
            raise ConfigError(f"scale: {self.scale} is outside [1, 4]")
        for name in ("request_deadline_s", "body_read_timeout_s", "max_in_flight", "face_input_size", "detection_max_side"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        minimum_tile = 2 * (self.tiles.overlap + 2 * self.tiles.margin)
        if self.tiles.tile_size and self.tiles.tile_size <= minimum_tile:
            raise ConfigError(
                f"tiles.tile_size: {self.tiles.tile_size} must be 0 (no tiling) or more than {minimum_tile} "
                "(twice overlap + 4·margin)"
            )
        if self.limits.max_faces < 0:
            raise ConfigError("limits.max_faces: must be >= 0 (0: no face is enhanced)")
        if self.tiles.overlap < 0 or self.tiles.margin < 0 or self.tiles.max_concurrent_tiles < 1:
            raise ConfigError("tiles: overlap and margin must be >= 0, max_concurrent_tiles >= 1")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s: must be >= 0 (0: answer what is in flight at once)")
        if self.log_format not in ("auto", "json", "text"):
            raise ConfigError(f"log_format: {self.log_format!r} is not auto, json or text")
        if not isinstance(self.endpoints, types.MappingProxyType):
            object.__setattr__(self, "endpoints", types.MappingProxyType(dict(self.endpoints)))
        if self.detector in self.endpoints and FACE_DESCRIPTOR not in self.endpoints:
            # the detector's model server also serves the face descriptor (docs/faces.md)
            object.__setattr__(self, "endpoints", types.MappingProxyType(
                {**self.endpoints, FACE_DESCRIPTOR: self.endpoints[self.detector]}))
        if not isinstance(self.presets, types.MappingProxyType):
            object.__setattr__(self, "presets", types.MappingProxyType(dict(self.presets)))
        self._check_user_models()

    def _check_user_models(self) -> None:
        """The user models' files are there, unless a configured endpoint serves the model
        (its files are on that machine); their runtime is their own table's."""
        if not isinstance(self.models, types.MappingProxyType):
            object.__setattr__(self, "models", types.MappingProxyType(dict(self.models)))
        for name, model in self.models.items():
            if name in self.model_server.runtimes:
                raise ConfigError(f"model_server.runtimes.{name}: {name} is a model file of yours; "
                                  f"set models.{name}.runtime instead")
            if name not in self.endpoints:
                model.check_files()

    def models_needed(self, preset_name: str | None = None) -> tuple[str, ...]:
        """Model names the given preset (all presets when None) calls, detector included."""
        presets = [self.presets[preset_name]] if preset_name else list(self.presets.values())
        names: list[str] = []
        for preset in presets:
            for name in (preset.upscaler, preset.face_model):
                if name and name not in names:
                    names.append(name)
        if self.detector not in names:
            names.append(self.detector)
        if any(self.identity_guard_for(preset.name) for preset in presets) and FACE_DESCRIPTOR not in names:
            names.append(FACE_DESCRIPTOR)
        return tuple(names)

    def identity_guard_for(self, preset_name: str) -> bool:
        """Whether the preset guards identity by default: its ``identity_guard``, or when that is
        unset, whether its face model is a face restorer of yours."""
        preset = self.presets[preset_name]
        if preset.face_model is None:
            return False
        if preset.identity_guard is not None:
            return preset.identity_guard
        model = self.models.get(preset.face_model)
        return model is not None and model.kind == FACE_RESTORER

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type[Any]] = {
    "limits": Limits,
    "tiles": TileSettings,
    "encode": EncodeSettings,
    "remote": RemoteSettings,
    "model_server": ModelServerSettings,
    "jobs": JobSettings,
    "identity_guard": IdentityGuardSettings,
}


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Turn a TOML or environment value into the type of ``default``."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(item.strip() for item in value.split(",") if item.strip())
            return tuple(str(item) for item in value)
        if isinstance(default, Mapping):  # a TOML table, or "KEY=VALUE,KEY=VALUE" from the environment
            if isinstance(value, str):
                pairs = [item.partition("=") for item in value.split(",") if item.strip()]
                if any(not separator for _, separator, _ in pairs):
                    raise ConfigError(f"{key}: {value!r} is not MODEL=VALUE,MODEL=VALUE")
                value = {model.strip(): text.strip() for model, _, text in pairs}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a table of model name = value")
            return types.MappingProxyType({str(key): str(text) for key, text in value.items()})
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid {type(default).__name__}") from exc


def _build_section(klass: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    defaults = klass()
    known = {item.name for item in dataclasses.fields(klass)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {', '.join(sorted(unknown))}")
    return klass(**{name: _coerce(value, getattr(defaults, name), f"{prefix}{name}") for name, value in values.items()})


def _normalise_model_key(name: str) -> str:
    return name.lower().replace("_", "-")


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """CHAOQING_* variables as a nested dict shaped like the TOML file."""
    tree: dict[str, Any] = {}
    for raw_key, value in environ.items():
        if not raw_key.startswith(ENV_PREFIX) or raw_key == CONFIG_PATH_VARIABLE:
            continue
        parts = raw_key[len(ENV_PREFIX) :].split("__")
        if len(parts) == 1:
            tree[parts[0].lower()] = value
        elif len(parts) == 2 and parts[0].lower() == "endpoints":
            tree.setdefault("endpoints", {})[_normalise_model_key(parts[1])] = value
        elif len(parts) == 2:
            tree.setdefault(parts[0].lower(), {})[parts[1].lower()] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _parse_endpoints(raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError("endpoints: must be a table of model name = [URL, ...]")
    endpoints: dict[str, tuple[str, ...]] = {}
    for model, urls in raw.items():
        if isinstance(urls, str):
            urls = [item.strip() for item in urls.split(",") if item.strip()]
        if not isinstance(urls, list | tuple) or not urls:
            raise ConfigError(f"endpoints.{model}: must be a non-empty list of URLs")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"endpoints.{model}: {url!r} is not an http(s) URL")
        endpoints[_normalise_model_key(str(model))] = tuple(url.rstrip("/") for url in urls)
    return endpoints


def _parse_presets(raw: Any) -> dict[str, Preset]:
    """``[presets.NAME]`` tables with ``upscaler`` and ``face_model`` (empty: no face model);
    they change or add to the built-in presets."""
    if not isinstance(raw, Mapping):
        raise ConfigError("presets: must be a table of preset tables")
    presets = dict(PRESETS)
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"presets.{name}: must be a table")
        unknown = set(table) - {"upscaler", "face_model", "description", PRESET_IDENTITY_KEY, *PRESET_FACE_MATCH_KEYS,
                                *PRESET_FACE_MODEL_KEYS}
        if unknown:
            raise ConfigError(f"presets.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        base = presets.get(name)
        upscaler = table.get("upscaler", base.upscaler if base else None)
        if not isinstance(upscaler, str) or not upscaler:
            raise ConfigError(f"presets.{name}.upscaler: a model name is required")
        face_model = table.get("face_model", base.face_model if base else None) or None
        face_match = {key: table.get(key, getattr(base, key) if base else getattr(Preset, key))
                      for key in (*PRESET_FACE_MATCH_KEYS, *PRESET_FACE_MODEL_KEYS)}
        presets[str(name)] = Preset(str(name), upscaler, None if face_model is None else str(face_model),
                                    str(table.get("description", base.description if base else "")), **face_match,
                                    identity_guard=table.get(PRESET_IDENTITY_KEY, base.identity_guard if base else None))
    return presets


def config_from_mapping(values: Mapping[str, Any]) -> Config:
    """Build a Config from a TOML-shaped mapping (strings are coerced, unknown keys refused)."""
    defaults = Config()
    top_fields = {item.name for item in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a table")
            kwargs[key] = _build_section(_SECTIONS[key], value, f"{key}.")
        elif key == "endpoints":
            kwargs[key] = _parse_endpoints(value)
        elif key == "presets":
            kwargs[key] = _parse_presets(value)
        elif key == "models":
            kwargs[key] = _parse_user_models(value)
        elif key in top_fields:
            kwargs[key] = _coerce(value, getattr(defaults, key), key)
        else:
            raise ConfigError(f"unknown configuration key {key!r}")
    return Config(**kwargs)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults ← TOML file ← CHAOQING_* environment ← ``overrides`` (flags; None values ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                values = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        if "models" in values:  # a model file's relative path starts at the config file's folder
            values["models"] = _paths_from_folder(values["models"], Path(path).absolute().parent)
    values = _merge(values, _from_environment(os.environ if environ is None else environ))
    if overrides:
        values = _merge(values, {key: value for key, value in overrides.items() if value is not None})
    return config_from_mapping(values)
