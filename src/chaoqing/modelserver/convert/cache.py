"""Converted models on disk: made at first use from the installed files, then reused.

:func:`converted_onnx_path` returns ``<cache>/converted-v1/<stem>-<digest[:16]>.onnx``, where
``<cache>`` is :func:`cache_directory` and the digest is the sha256 of the ``.param`` and
``.bin`` bytes (so a changed file gets a new name, and an unchanged one is never converted
again). Nothing is downloaded. The file is written to a temporary name in the same folder and
moved into place with :func:`os.replace`, which is atomic: a reader sees the whole file or
none, and two processes converting at once each write their own temporary file and the last
rename wins with identical bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from chaoqing.errors import RunnerError
from chaoqing.modelserver.convert.ncnn_graph import digest_files, parse_ncnn_model

__all__ = ["CACHE_ENVIRONMENT_VARIABLE", "CONVERTED_FOLDER", "cache_directory", "converted_onnx_path"]

CACHE_ENVIRONMENT_VARIABLE = "CHAOQING_CACHE_DIR"
APPLICATION_FOLDER = "chaoqing"  # under $XDG_CACHE_HOME or ~/.cache
# the converter's own version is in the folder name: bump it when its output changes, so files an
# older converter cached are never reused
CONVERTED_FOLDER = "converted-v1"
DIGEST_PREFIX_LENGTH = 16  # hex digits of the sha256 in a converted file's name


def cache_directory() -> Path:
    """The user's cache folder for chaoqing: ``$CHAOQING_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/chaoqing``, else ``~/.cache/chaoqing`` (not created here)."""
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache_home:
        return Path(xdg_cache_home).expanduser() / APPLICATION_FOLDER
    return Path.home() / ".cache" / APPLICATION_FOLDER


def converted_onnx_path(param_path: Path, bin_path: Path) -> Path:
    """The ONNX form of the ncnn model ``param_path`` + ``bin_path``, converted if not cached.

    Raises RunnerError naming the file when a model file is missing, unreadable or malformed,
    when a layer cannot be converted (naming the layer), or when the cache folder cannot be
    written.
    """
    digest = digest_files(param_path, bin_path)
    folder = cache_directory() / CONVERTED_FOLDER
    target = folder / f"{param_path.stem}-{digest[:DIGEST_PREFIX_LENGTH]}.onnx"
    if target.is_file():
        return target
    # onnx is imported only when a conversion is needed: a cache hit costs a hash
    from chaoqing.modelserver.convert.onnx_export import graph_to_onnx

    graph = parse_ncnn_model(param_path, bin_path)
    if graph.digest != digest:
        raise RunnerError(f"{param_path} or {bin_path} changed while it was being converted")
    serialized = graph_to_onnx(graph).SerializeToString()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, serialized)
    except OSError as exc:
        raise RunnerError(f"cannot write the converted model {target}: {exc}") from exc
    return target


def _write_atomically(target: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file beside ``target``, flush it to disk, rename it over."""
    descriptor, temporary_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as temporary_file:
            temporary_file.write(content)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        os.chmod(temporary_name, 0o644)
        os.replace(temporary_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
