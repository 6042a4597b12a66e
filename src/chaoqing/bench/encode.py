"""``chaoqing bench encode``: what each encoder setting costs, in time and bytes, on ×4 upscales.

The gateway's last stage encodes the upscaled photo; on a ×4 request that image is 16× the
input's pixels, and PNG at zlib's default level spent 1–3 s on it. This program measures the
choices on the kind of image the gateway really encodes:

- **Photos**: ``--photos PATH`` (a photo or a folder of them), each upscaled ×``--scale`` by
  ``--upscaler``: a bundled model run in this process (``realesr-animevideov3-x4``, the
  fast preset's, by default), or ``lanczos`` (Pillow's resampling, no model; smoother than a
  GAN's output, so it flatters every encoder). Without ``--photos``, scikit-image's
  astronaut (512×512) is used the same way.
- **Settings**: PNG through Pillow at each zlib level of ``--png-levels`` (Pillow's wheels
  link zlib-ng, which this reports), Pillow's ``optimize``; PNG through OpenCV (libpng, the
  gateway's 16-bit path) at the same levels; ``fpng`` when it is importable (a fast PNG
  writer on PyPI, 8-bit only; not a dependency); JPEG at qualities × chroma subsampling;
  WebP at quality 90 for each ``--webp-methods`` and lossless.
- **Time**: each setting encodes each photo once per round, the settings taking turns in
  every round (so a busy machine slows them alike); the median of ``--rounds`` rounds.
  Sizes are deterministic. Per setting the table gives the total bytes over all photos,
  bytes relative to the reference setting (``png-pillow level 6``, zlib's default), the
  median seconds summed over the photos, and output megapixels per second.

Encoding runs on this thread, one image at a time, as one gateway threadpool worker does.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["EncoderSetting", "encode", "encoder_settings", "run_encode"]

COMPACT_X4 = "realesr-animevideov3-x4"
LANCZOS = "lanczos"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PHOTOS_VARIABLE = "CHAOQING_BENCH_PHOTOS"  # as `chaoqing bench models`
REFERENCE_SETTING = "png-pillow level 6"  # zlib's own default level (Z_DEFAULT_COMPRESSION)
JPEG_QUALITIES = (85, 92, 95)
JPEG_SUBSAMPLINGS = {"4:4:4": 0, "4:2:0": 2}  # Pillow's JpegImagePlugin codes
WEBP_QUALITY = 90  # the gateway's default
WEBP_LOSSLESS_EFFORT = 25  # the gateway's (stages/encode.py)
BYTES_PER_MEGABYTE = 1e6

COLUMNS = [
    ("setting", "setting", ""),
    ("MB", "megabytes", ".2f"),
    ("bytes vs level 6", "bytes_vs_reference", ".1%"),
    ("s (median)", "seconds", ".3f"),
    ("time vs level 6", "time_vs_reference", ".2f"),
    ("output MP/s", "megapixels_per_s", ".1f"),
]


@dataclass(frozen=True)
class EncoderSetting:
    """One way to encode: its name in the table, its format, and the function (RGB → bytes)."""

    name: str
    output_format: str
    encode: Callable[[Any], bytes]


# -- the settings -----------------------------------------------------------------------------


def _pillow(rgb: Any, image_format: str, **options: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, image_format, **options)
    return buffer.getvalue()


def _opencv_png(rgb: Any, level: int) -> bytes:
    import cv2

    succeeded, encoded = cv2.imencode(".png", rgb[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not succeeded:
        raise click.ClickException("OpenCV could not encode a PNG")
    return bytes(encoded.tobytes())


def _fpng_encoder() -> Callable[[Any], bytes] | None:
    try:
        import fpng  # type: ignore[import-not-found,unused-ignore]  # optional, not a dependency
    except ImportError:
        return None

    def encode_fpng(rgb: Any) -> bytes:
        import numpy as np

        return bytes(fpng.from_ndarray(np.ascontiguousarray(rgb)))

    return encode_fpng


def _png_pillow(**options: Any) -> Callable[[Any], bytes]:
    def encode_png(rgb: Any) -> bytes:
        return _pillow(rgb, "PNG", **options)

    return encode_png


def _png_opencv(level: int) -> Callable[[Any], bytes]:
    def encode_png(rgb: Any) -> bytes:
        return _opencv_png(rgb, level)

    return encode_png


def _jpeg(quality: int, subsampling: int) -> Callable[[Any], bytes]:
    def encode_jpeg(rgb: Any) -> bytes:
        return _pillow(rgb, "JPEG", quality=quality, subsampling=subsampling)

    return encode_jpeg


def _webp(**options: Any) -> Callable[[Any], bytes]:
    def encode_webp(rgb: Any) -> bytes:
        return _pillow(rgb, "WEBP", **options)

    return encode_webp


def encoder_settings(png_levels: Sequence[int], webp_methods: Sequence[int]) -> list[EncoderSetting]:
    """Every setting measured, the reference first (it is what the ratios divide by)."""
    settings = [EncoderSetting(REFERENCE_SETTING, "png", _png_pillow(compress_level=6))]
    settings += [EncoderSetting(f"png-pillow level {level}", "png", _png_pillow(compress_level=level))
                 for level in png_levels if level != 6]
    settings.append(EncoderSetting("png-pillow optimize", "png", _png_pillow(optimize=True)))
    settings += [EncoderSetting(f"png-opencv level {level}", "png", _png_opencv(level)) for level in png_levels]
    fpng_encode = _fpng_encoder()
    if fpng_encode is not None:
        settings.append(EncoderSetting("png-fpng", "png", fpng_encode))
    settings += [EncoderSetting(f"jpeg q{quality} {label}", "jpeg", _jpeg(quality, code))
                 for quality in JPEG_QUALITIES for label, code in JPEG_SUBSAMPLINGS.items()]
    settings += [EncoderSetting(f"webp q{WEBP_QUALITY} method {method}", "webp",
                                _webp(quality=WEBP_QUALITY, method=method)) for method in webp_methods]
    settings.append(EncoderSetting(f"webp lossless effort {WEBP_LOSSLESS_EFFORT}", "webp",
                                   _webp(lossless=True, quality=WEBP_LOSSLESS_EFFORT, method=4, exact=True)))
    return settings


# -- the photos -------------------------------------------------------------------------------


def _photo_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(item for item in path.iterdir() if item.suffix.lower() in PHOTO_SUFFIXES)


def _read_photo(path: Path) -> Any:
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


def _source_photos(photos_path: Path | None, count: int) -> list[tuple[str, Any]]:
    """(name, RGB uint8) for the first ``count`` photos of ``photos_path``, or the astronaut."""
    if photos_path is None:
        import numpy as np

        try:
            import skimage.data
        except ImportError as exc:
            raise click.ClickException("scikit-image is not installed: pass --photos PATH") from exc
        return [("astronaut", np.asarray(skimage.data.astronaut()))]  # type: ignore[no-untyped-call]
    paths = _photo_paths(photos_path)[:count]
    if not paths:
        raise click.ClickException(f"no photos in {photos_path}")
    return [(path.name, _read_photo(path)) for path in paths]


def _upscaler(name: str, scale: int, threads: int) -> Callable[[Any], Any]:
    """RGB → RGB ×``scale``: a bundled model in this process, or Pillow's Lanczos."""
    import numpy as np

    if name == LANCZOS:
        from PIL import Image

        def resample(rgb: Any) -> Any:
            height, width = rgb.shape[:2]
            image = Image.fromarray(rgb).resize((width * scale, height * scale), Image.Resampling.LANCZOS)
            return np.asarray(image)

        return resample
    from chaoqing.errors import RunnerError
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    try:
        runner = create_runner(name, RunnerSettings(threads=threads))
    except (RunnerError, KeyError, ValueError) as exc:
        raise click.ClickException(f"cannot run {name}: {exc}") from exc
    model_scale = int(runner.spec.as_metadata()["parameters"].get("scale", scale))
    if model_scale != scale:
        raise click.ClickException(f"{name} upscales ×{model_scale}, not ×{scale}: pass --scale {model_scale}")

    def run_model(rgb: Any) -> Any:
        return np.ascontiguousarray(runner.run({"image": rgb[None]})["image"][0])

    return run_model


# -- the measurement --------------------------------------------------------------------------


def run_encode(images: Sequence[tuple[str, Any]], settings: Sequence[EncoderSetting], rounds: int,
               progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Encode every image with every setting, ``rounds`` times, the settings alternating within
    each round; one row per setting (sizes summed over the images, the median time summed)."""
    seconds: dict[str, list[list[float]]] = {setting.name: [[] for _ in images] for setting in settings}
    sizes: dict[str, int] = {}
    for round_index in range(rounds):
        progress(f"round {round_index + 1} of {rounds}")
        for setting in settings:
            total_bytes = 0
            for image_index, (_, rgb) in enumerate(images):
                started = time.perf_counter()
                data = setting.encode(rgb)
                seconds[setting.name][image_index].append(time.perf_counter() - started)
                total_bytes += len(data)
            sizes[setting.name] = total_bytes
    megapixels = sum(rgb.shape[0] * rgb.shape[1] for _, rgb in images) / 1e6
    rows: list[dict[str, Any]] = []
    for setting in settings:
        median_s = sum(statistics.median(times) for times in seconds[setting.name])
        rows.append({"setting": setting.name, "format": setting.output_format, "bytes": sizes[setting.name],
                     "megabytes": sizes[setting.name] / BYTES_PER_MEGABYTE, "seconds": median_s,
                     "megapixels_per_s": megapixels / median_s if median_s > 0 else float("nan")})
    reference = next(row for row in rows if row["setting"] == REFERENCE_SETTING)
    for row in rows:
        row["bytes_vs_reference"] = row["bytes"] / reference["bytes"]
        row["time_vs_reference"] = row["seconds"] / reference["seconds"]
    return rows


@click.command("encode")
@click.option("--photos", "photos_path", default=None, envvar=PHOTOS_VARIABLE, show_envvar=True,
              type=click.Path(exists=True, path_type=Path),
              help="A photo or a folder of them (default: scikit-image's astronaut).")
@click.option("--count", default=3, show_default=True, type=click.IntRange(1, 100),
              help="Photos taken from --photos (sorted by name).")
@click.option("--upscaler", default=COMPACT_X4, show_default=True,
              help=f"A bundled upscaler run in this process, or {LANCZOS!r} (no model).")
@click.option("--scale", default=4, show_default=True, type=click.IntRange(1, 4), help="Upscale factor.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="ncnn threads for the upscaler; 0 = number of CPUs.")
@click.option("--png-levels", "png_levels_text", default="0,1,2,3,4,5,6,7,8,9", show_default=True,
              help="zlib levels for PNG (Pillow and OpenCV).")
@click.option("--webp-methods", "webp_methods_text", default="0,2,4,6", show_default=True,
              help="libwebp methods (0 fast … 6 slow) for lossy WebP.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 50),
              help="Rounds; each setting's time is the median.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def encode(photos_path: Path | None, count: int, upscaler: str, scale: int, threads: int, png_levels_text: str,
           webp_methods_text: str, rounds: int, as_json: bool) -> None:
    """Time and bytes of PNG levels, other PNG encoders, JPEG and WebP settings on ×4 upscales."""
    from PIL import features

    from chaoqing.bench.common import Report, command_line, number_list, report

    png_levels = list(number_list(png_levels_text, "--png-levels", int, 0, 9))
    webp_methods = list(number_list(webp_methods_text, "--webp-methods", int, 0, 6))

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    sources = _source_photos(photos_path, count)
    upscale = _upscaler(upscaler, scale, threads)
    images = []
    for name, rgb in sources:
        progress(f"upscaling {name} ({rgb.shape[1]}×{rgb.shape[0]}) ×{scale} with {upscaler}")
        images.append((name, upscale(rgb)))
    settings = encoder_settings(png_levels, webp_methods)
    rows = run_encode(images, settings, rounds, progress)
    zlib_library = (f"zlib-ng {features.version_feature('zlib_ng')}" if features.check_feature("zlib_ng")
                    else f"zlib {features.version('zlib')}")
    record = {
        "photos": str(photos_path) if photos_path else "skimage astronaut", "upscaler": upscaler, "scale": scale,
        "rounds": rounds, "images": [{"name": name, "width": rgb.shape[1], "height": rgb.shape[0]}
                                     for name, rgb in images],
        "pillow_zlib": zlib_library, "pillow_jpeg": f"libjpeg {features.version('jpg')}",
        "pillow_webp": f"libwebp {features.version('webp')}", "fpng": _fpng_encoder() is not None,
    }
    report(Report("encode", command_line(), record, rows), COLUMNS, as_json=as_json)
    if not as_json:
        output = ", ".join(f"{name} {rgb.shape[1]}×{rgb.shape[0]}" for name, rgb in images)
        click.echo(f"images: {output}; Pillow PNG uses {zlib_library}")
