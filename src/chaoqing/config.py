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

    [endpoints]                      # absent: `chaoqing serve` starts model servers itself
    "realesr-animevideov3-x4" = ["http://127.0.0.1:9000"]
    "realesrgan-x4plus" = ["http://127.0.0.1:9001", "http://10.0.0.7:8000"]
    "face-detector" = ["http://127.0.0.1:9000"]

Invalid values raise :class:`ConfigError` with the key named.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaoqing.errors import ConfigError

__all__ = [
    "MODEL_RUNTIMES",
    "PRESETS",
    "Config",
    "EncodeSettings",
    "JobSettings",
    "Limits",
    "ModelServerSettings",
    "Preset",
    "RemoteSettings",
    "TileSettings",
    "load_config",
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
    """Which model does what. ``face_model`` None means faces are not enhanced."""

    name: str
    upscaler: str
    face_model: str | None
    description: str = ""


COMPACT_X4 = "realesr-animevideov3-x4"
PLUS_X4 = "realesrgan-x4plus"
FACE_DETECTOR = "face-detector"

PRESETS: Mapping[str, Preset] = types.MappingProxyType(
    {
        "fast": Preset("fast", COMPACT_X4, None, "compact Real-ESRGAN everywhere, faces not enhanced"),
        "balanced": Preset(
            "balanced", COMPACT_X4, PLUS_X4, "compact Real-ESRGAN background, Real-ESRGAN x4plus on aligned faces"
        ),
        "quality": Preset("quality", PLUS_X4, PLUS_X4, "Real-ESRGAN x4plus everywhere"),
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

    def __post_init__(self) -> None:
        if not self.attempt_timeout_s >= 0:  # NaN too
            raise ConfigError(f"remote.attempt_timeout_s: {self.attempt_timeout_s} must be 0 (none) or positive")


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
    detector: str = FACE_DETECTOR
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
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: types.MappingProxyType({}))
    presets: Mapping[str, Preset] = field(default_factory=lambda: PRESETS)

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
        if not isinstance(self.presets, types.MappingProxyType):
            object.__setattr__(self, "presets", types.MappingProxyType(dict(self.presets)))

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
        return tuple(names)

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
        unknown = set(table) - {"upscaler", "face_model", "description"}
        if unknown:
            raise ConfigError(f"presets.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        base = presets.get(name)
        upscaler = table.get("upscaler", base.upscaler if base else None)
        if not isinstance(upscaler, str) or not upscaler:
            raise ConfigError(f"presets.{name}.upscaler: a model name is required")
        face_model = table.get("face_model", base.face_model if base else None) or None
        presets[str(name)] = Preset(str(name), upscaler, None if face_model is None else str(face_model),
                                    str(table.get("description", base.description if base else "")))
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
    values = _merge(values, _from_environment(os.environ if environ is None else environ))
    if overrides:
        values = _merge(values, {key: value for key, value in overrides.items() if value is not None})
    return config_from_mapping(values)
