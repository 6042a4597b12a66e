"""``chaoqing bench quality``: which upscaler restores real photos best, measured.

For every photo of ``--photos`` (the clean original, centre-cropped to at most
``--max-side`` pixels, around its largest face when the detector finds one, and trimmed to
a multiple of every scale), each named degradation of :data:`DEGRADATIONS` makes a
low-resolution copy at ×4 (and ×2 for the ×2 models). Each candidate model upscales it
through chaoqing's own runner and tiling, in this process
(:func:`chaoqing.modelserver.runners.create_runner`, the default runtime), and so does
Lanczos, the baseline. Each output is compared with the clean original:

- **PSNR** and **SSIM** on Y (BT.601 luma, as the super-resolution literature measures;
  ``skimage.metrics``; SSIM with Wang et al.'s Gaussian window, σ = 1.5), a border of
  ``scale`` pixels shaved;
- **sharpness**: the variance of the Laplacian of the output's Y over that of the
  original's. It is a ratio to the original rather than a raw variance so that photos of
  different content can share a median: 1.0 is the original's amount of fine detail, below
  1 is blur (Lanczos sits well below), above 1 is detail the original does not have —
  amplified noise, JPEG blocks, ringing or GAN texture. PSNR and SSIM reward a safe blur;
  this column says which side of the original each model lands on;
- **time**: the runner's wall-clock seconds per photo (and per input megapixel), on this
  machine, with whatever else runs on it (the runtime bench measures speed properly).

One row per scale, degradation and model with the medians over the photos, then one row per
scale and model over every photo and degradation (``all``). ``--crops DIR`` writes
side-by-side crops (original, Lanczos, each model) of each degradation as PNGs.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = [
    "CANDIDATES",
    "DEGRADATIONS",
    "LANCZOS",
    "Degradation",
    "PhotoMetrics",
    "degrade",
    "measure",
    "prepare_original",
    "quality",
    "run_quality",
    "write_crops",
    "write_native_crops",
]

LANCZOS = "lanczos"  # the baseline: PIL's Lanczos (a = 3) resampling, no model
# the candidates per scale: today's compact model, the bundled SPAN photo models, x4plus
CANDIDATES: dict[int, tuple[str, ...]] = {
    4: ("realesr-animevideov3-x4", "span-kendata-x4", "span-x4-ch48", "span-x4-ch52", "span-clearreality-x4",
        "realesrgan-x4plus"),
    2: ("realesr-animevideov3-x2", "span-x2-ch52"),
}
DETECTOR = "face-detector"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_SIDE = 192  # x4plus takes 10-30 s for a 64×64 input on a shared 2-core CPU
JPEG_QUALITY = 40  # a heavily recompressed upload (messaging apps send 60-80; 40 shows blocks)
MILD_JPEG_QUALITY = 75  # libjpeg's and Pillow's default quality: what most saved photos carry
NOISE_SIGMA = 5 / 255  # sensor noise of a phone photo in dim light, on [0, 1]
BLUR_SIGMA_PER_SCALE = 0.4  # σ 1.6 at ×4: the "BD" degradation of SR benchmarks (Zhang et al. 2018)
SSIM_SIGMA = 1.5  # Wang et al. 2004's Gaussian window
WARMUP_SIDE = 16  # the first call of a runner sets its runtime up; not timed
CROP_SIDE = 128  # side of each tile of the side-by-side crops, in output pixels
NATIVE_CROP_SIDE = 40  # input pixels of a native crop: 160 px tiles once enlarged ×4
LABEL_HEIGHT = 14  # room for a tile's caption above it
DEADLINE_S = 1800.0  # a run that takes longer was sized wrong: stop measuring more


@dataclass(frozen=True)
class Degradation:
    """A named way of making the low-resolution copy of a clean photo."""

    name: str
    description: str


DEGRADATIONS: tuple[Degradation, ...] = (
    Degradation("bicubic", "bicubic downscale (antialiased, MATLAB imresize's kernel)"),
    Degradation("blur", f"Gaussian blur σ = {BLUR_SIGMA_PER_SCALE}·scale on the original, then area downscale"),
    Degradation("jpeg", f"bicubic downscale, then JPEG quality {JPEG_QUALITY} (4:2:0)"),
    Degradation("jpeg75", f"bicubic downscale, then JPEG quality {MILD_JPEG_QUALITY} (4:2:0)"),
    Degradation("noise", f"bicubic downscale, then Gaussian noise σ = {NOISE_SIGMA * 255:.0f}/255"),
)

COLUMNS = [
    ("scale", "scale", ""),
    ("degradation", "degradation", ""),
    ("model", "model", ""),
    ("license", "license", ""),
    ("photos", "photos", ""),
    ("PSNR Y dB", "psnr_db", ".2f"),
    ("SSIM Y", "ssim", ".4f"),
    ("sharpness", "sharpness", ".2f"),
    ("s per photo", "seconds", ".2f"),
    ("s per input MP", "seconds_per_megapixel", ".1f"),
]


@dataclass(frozen=True)
class PhotoMetrics:
    """How one output compares with its clean original."""

    psnr_db: float
    ssim: float
    sharpness: float


# -- images ---------------------------------------------------------------------------------


def _photos(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        else:
            found += sorted(item for item in path.iterdir() if item.suffix.lower() in PHOTO_SUFFIXES)
    return found


def _load_rgb(path: Path) -> Any:
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _resize(rgb: Any, width: int, height: int, resample: Any) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), resample))


def prepare_original(rgb: Any, max_side: int, multiple: int, focus: tuple[int, int] | None = None) -> Any:
    """The clean original a photo is measured on: at most ``max_side`` pixels each way
    (cropped around ``focus``, a (row, column) point, or the centre), each side a multiple of
    ``multiple`` (so every scale's downscale is exact). Raises BenchError for a photo smaller
    than ``multiple``."""
    from chaoqing.errors import BenchError

    height, width = rgb.shape[:2]
    crop_height = min(height, max_side) // multiple * multiple
    crop_width = min(width, max_side) // multiple * multiple
    if not crop_height or not crop_width:
        raise BenchError(f"a {width}×{height} photo is smaller than {multiple} pixels")
    row, column = focus if focus is not None else (height // 2, width // 2)
    top = min(max(0, row - crop_height // 2), height - crop_height)
    left = min(max(0, column - crop_width // 2), width - crop_width)
    return rgb[top:top + crop_height, left:left + crop_width].copy()


def degrade(original: Any, degradation: str, scale: int, seed: int = 0) -> Any:
    """The low-resolution copy of ``original`` (uint8 RGB, sides multiples of ``scale``) that
    ``degradation`` (a name from :data:`DEGRADATIONS`) makes; deterministic for a ``seed``.
    Raises BenchError for an unknown degradation."""
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    from chaoqing.errors import BenchError

    height, width = original.shape[:2]
    small_width, small_height = width // scale, height // scale
    if degradation == "bicubic":
        return _resize(original, small_width, small_height, Image.Resampling.BICUBIC)
    if degradation == "blur":
        blurred = Image.fromarray(original).filter(ImageFilter.GaussianBlur(BLUR_SIGMA_PER_SCALE * scale))
        return np.asarray(blurred.reduce(scale))  # reduce: the mean of each scale×scale block
    if degradation in ("jpeg", "jpeg75"):
        buffer = io.BytesIO()
        Image.fromarray(_resize(original, small_width, small_height, Image.Resampling.BICUBIC)).save(
            buffer, "JPEG", quality=JPEG_QUALITY if degradation == "jpeg" else MILD_JPEG_QUALITY)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB"))
    if degradation == "noise":
        small = _resize(original, small_width, small_height, Image.Resampling.BICUBIC).astype(np.float64)
        noise = np.random.default_rng(seed).normal(0.0, NOISE_SIGMA * 255, small.shape)
        return np.clip(np.rint(small + noise), 0, 255).astype(np.uint8)
    raise BenchError(f"unknown degradation {degradation!r}; known: {', '.join(item.name for item in DEGRADATIONS)}")


def _luma(rgb: Any) -> Any:
    from skimage.color import rgb2ycbcr

    return rgb2ycbcr(rgb)[..., 0]  # BT.601 Y in [16, 235], float


def _laplacian_variance(luma: Any) -> float:
    from scipy.ndimage import laplace

    return float(laplace(luma).var())


def measure(original: Any, output: Any, shave: int) -> PhotoMetrics:
    """PSNR and SSIM on Y of ``output`` against ``original`` (uint8 RGB of one size), a border
    of ``shave`` pixels left out, and the sharpness ratio (variance of the Laplacian of Y,
    output over original). Raises BenchError when the sizes differ."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from chaoqing.errors import BenchError

    if original.shape != output.shape:
        raise BenchError(f"output {output.shape} is not the original's size {original.shape}")
    reference, candidate = _luma(original), _luma(output)
    if shave:
        reference, candidate = reference[shave:-shave, shave:-shave], candidate[shave:-shave, shave:-shave]
    with np.errstate(divide="ignore"):  # identical images: PSNR is infinite, not a warning
        psnr_db = float(peak_signal_noise_ratio(reference, candidate, data_range=255))  # type: ignore[no-untyped-call]
    ssim = float(structural_similarity(reference, candidate, data_range=255, gaussian_weights=True,
                                       sigma=SSIM_SIGMA, use_sample_covariance=False))  # type: ignore[no-untyped-call]
    reference_detail = _laplacian_variance(reference)
    sharpness = _laplacian_variance(candidate) / reference_detail if reference_detail else float("nan")
    return PhotoMetrics(psnr_db, ssim, sharpness)


def _focus(rgb: Any, detector: Any) -> tuple[int, int] | None:
    """The centre (row, column) of the largest face the detector finds, or None."""
    if detector is None:
        return None
    boxes = detector.run({"image": rgb})["boxes"]
    if not len(boxes):
        return None
    left, top, right, bottom = max(boxes, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]))[:4]
    return int((top + bottom) / 2), int((left + right) / 2)


# -- the run --------------------------------------------------------------------------------


def _upscale_lanczos(small: Any, scale: int) -> Any:
    from PIL import Image

    height, width = small.shape[:2]
    return _resize(small, width * scale, height * scale, Image.Resampling.LANCZOS)


def _model_license(name: str) -> str:
    from chaoqing.modelserver.runners.catalog import UPSCALERS

    if name == LANCZOS:
        return "—"
    card = UPSCALERS[name].card
    return card.license if card.commercial_use != "no" else f"{card.license} (non-commercial)"


def _median(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return statistics.median(finite) if finite else float("nan")


def _summary_row(scale: int, degradation: str, model: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    megapixels = sum(record["input_megapixels"] for record in records)
    seconds = [record["seconds"] for record in records]
    return {
        "scale": scale, "degradation": degradation, "model": model, "license": _model_license(model),
        "photos": len(records),
        "psnr_db": _median([record["psnr_db"] for record in records]),
        "ssim": _median([record["ssim"] for record in records]),
        "sharpness": _median([record["sharpness"] for record in records]),
        "seconds": _median(seconds),
        "seconds_per_megapixel": sum(seconds) / megapixels if megapixels else float("nan"),
    }


def run_quality(photo_paths: Sequence[Path], candidates: dict[int, Sequence[str]], degradations: Sequence[str],
                *, max_side: int, runtime: str, threads: int, progress: Callable[[str], None],
                find_faces: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Degrade, upscale and measure every photo; returns (summary rows, one record per photo,
    degradation, scale and model, and the prepared inputs for :func:`write_crops`).

    ``candidates`` maps a scale to the models to run at it (Lanczos is always added).
    Raises BenchError when there are no photos, a model does not have the scale it is listed
    under, or a photo is too small; RunnerError when a model does not load.
    """
    from chaoqing.errors import BenchError
    from chaoqing.modelserver.runners import RunnerSettings, create_runner
    from chaoqing.modelserver.runners.catalog import UPSCALERS

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as model servers do, before ncnn loads
    paths = _photos(photo_paths)
    if not paths:
        raise BenchError(f"no photos in {', '.join(str(path) for path in photo_paths)}")
    for scale, names in candidates.items():
        for name in names:
            if UPSCALERS[name].scale != scale:
                raise BenchError(f"{name} is a ×{UPSCALERS[name].scale} model, listed under ×{scale}")
    multiple = math.lcm(*candidates)
    detector = create_runner(DETECTOR, RunnerSettings()) if find_faces else None
    originals: dict[str, Any] = {}
    faces: dict[str, bool] = {}
    try:
        for path in paths:
            rgb = _load_rgb(path)
            focus = _focus(rgb, detector)
            label = f"{path.parent.name}/{path.name}"
            faces[label] = focus is not None
            originals[label] = prepare_original(rgb, max_side, multiple, focus)
    finally:
        if detector is not None:
            detector.close()
    inputs: dict[tuple[int, str, str], Any] = {
        (scale, degradation, label): degrade(original, degradation, scale, seed=index)
        for scale in candidates for degradation in degradations
        for index, (label, original) in enumerate(originals.items())
    }
    records: list[dict[str, Any]] = []
    outputs: dict[tuple[int, str, str, str], Any] = {}
    deadline = time.monotonic() + DEADLINE_S

    def record(scale: int, degradation: str, label: str, model: str, output: Any, seconds: float) -> None:
        original = originals[label]
        metrics = measure(original, output, shave=scale)
        small = inputs[(scale, degradation, label)]
        records.append({"scale": scale, "degradation": degradation, "photo": label, "model": model,
                        "input_megapixels": small.shape[0] * small.shape[1] / 1e6, "seconds": seconds,
                        "psnr_db": metrics.psnr_db, "ssim": metrics.ssim, "sharpness": metrics.sharpness})
        outputs[(scale, degradation, label, model)] = output

    for (scale, degradation, label), small in inputs.items():
        started = time.perf_counter()
        output = _upscale_lanczos(small, scale)
        record(scale, degradation, label, LANCZOS, output, time.perf_counter() - started)
    for scale, names in candidates.items():
        for name in names:
            progress(f"×{scale} {name}: loading")
            runner = create_runner(name, RunnerSettings(runtime=runtime, threads=threads))
            try:
                runner.run({"image": next(iter(inputs.values()))[None, :WARMUP_SIDE, :WARMUP_SIDE].copy()})
                for (input_scale, degradation, label), small in inputs.items():
                    if input_scale != scale:
                        continue
                    if time.monotonic() > deadline:
                        raise BenchError(f"the run passed {DEADLINE_S:.0f} s; give fewer photos or a smaller --max-side")
                    progress(f"×{scale} {name} on {label} ({degradation})")
                    started = time.perf_counter()
                    output = runner.run({"image": small[None]})["image"][0]
                    record(scale, degradation, label, name, output, time.perf_counter() - started)
            finally:
                runner.close()
    rows: list[dict[str, Any]] = []
    for scale, names in candidates.items():
        for degradation in [*degradations, "all"]:
            for model in [LANCZOS, *names]:
                chosen = [item for item in records if item["scale"] == scale and item["model"] == model
                          and degradation in ("all", item["degradation"])]
                rows.append(_summary_row(scale, degradation, model, chosen))
    prepared = {"originals": originals, "inputs": inputs, "outputs": outputs, "faces": faces}
    return rows, records, prepared


# -- side-by-side crops ---------------------------------------------------------------------


def _detail_window(original: Any, side: int) -> tuple[int, int]:
    """The top-left corner of the ``side``-pixel window of the original with the most
    detail (the largest Laplacian variance of Y), on a grid of quarter-window steps."""
    from scipy.ndimage import laplace

    luma = _luma(original)
    energy = laplace(luma) ** 2
    height, width = luma.shape
    step = max(1, side // 4)
    best, corner = -1.0, (0, 0)
    for top in range(0, max(1, height - side + 1), step):
        for left in range(0, max(1, width - side + 1), step):
            value = float(energy[top:top + side, left:left + side].mean())
            if value > best:
                best, corner = value, (top, left)
    return corner


def _caption(name: str) -> str:
    """A model's name short enough for a crop's caption (about 20 characters fit in 128 px)."""
    return name.replace("realesr-animevideov3", "compact").replace("realesrgan-", "").replace("clearreality", "clearreal (NC)")


def write_crops(prepared: dict[str, Any], candidates: dict[int, Sequence[str]], degradations: Sequence[str],
                directory: Path, photos: Sequence[str] | None = None, side: int = CROP_SIDE) -> list[Path]:
    """One PNG per scale, degradation and photo: a ``side``-pixel crop of the original, of
    Lanczos and of each model, side by side with their names; returns the paths written.

    The crop is the centre of the photo's largest face when the detector found one (the
    original was cropped around it), else its most detailed window. ``photos`` names the
    photos (labels ``folder/file`` or file names) to draw; all when None.
    Raises OSError when the directory cannot be written.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    originals: dict[str, Any] = prepared["originals"]
    written: list[Path] = []
    for label, original in originals.items():
        if photos is not None and label not in photos and label.split("/")[-1] not in photos:
            continue
        height, width = original.shape[:2]
        crop = min(side, height, width)
        if prepared["faces"].get(label):
            top, left = (height - crop) // 2, (width - crop) // 2
        else:
            top, left = _detail_window(original, crop)
        for scale, names in candidates.items():
            for degradation in degradations:
                columns = [("original", original), ("lanczos", prepared["outputs"][(scale, degradation, label, LANCZOS)])]
                columns += [(name, prepared["outputs"][(scale, degradation, label, name)]) for name in names]
                sheet = Image.new("RGB", (crop * len(columns), crop + LABEL_HEIGHT), "white")
                draw = ImageDraw.Draw(sheet)
                for index, (caption, image) in enumerate(columns):
                    tile = np.ascontiguousarray(image[top:top + crop, left:left + crop])
                    sheet.paste(Image.fromarray(tile), (index * crop, LABEL_HEIGHT))
                    draw.text((index * crop + 2, 1), _caption(caption), fill="black")
                path = directory / f"quality-x{scale}-{degradation}-{Path(label).parent.name}-{Path(label).stem}.png"
                sheet.save(path, optimize=True)
                written.append(path)
    return written


def write_native_crops(photo_paths: Sequence[Path], models: Sequence[str], directory: Path, *, runtime: str,
                       threads: int, side: int = NATIVE_CROP_SIDE) -> list[Path]:
    """One PNG per photo: a ``side``-pixel crop of the photo as it is (its own JPEG blocks and
    noise, no clean reference), around its largest face or its most detailed window, enlarged
    ×4 with Lanczos and with each ×4 model, side by side. What users upload looks like this;
    no metric can be computed (nothing to compare with), so it is drawn, not measured.
    Raises RunnerError when a model does not load, OSError when the directory cannot be written.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    directory.mkdir(parents=True, exist_ok=True)
    detector = create_runner(DETECTOR, RunnerSettings())
    crops: dict[str, Any] = {}
    try:
        for path in _photos(photo_paths):
            rgb = _load_rgb(path)
            height, width = rgb.shape[:2]
            crop = min(side, height, width)
            focus = _focus(rgb, detector)
            if focus is None:
                top, left = _detail_window(rgb, crop)
                focus = (top + crop // 2, left + crop // 2)
            crops[f"{path.parent.name}-{path.stem}"] = prepare_original(rgb, crop, 1, focus)
    finally:
        detector.close()
    enlarged: dict[str, list[tuple[str, Any]]] = {
        label: [("input, nearest x4", np.asarray(Image.fromarray(crop).resize(
            (crop.shape[1] * 4, crop.shape[0] * 4), Image.Resampling.NEAREST))),
                ("lanczos", _upscale_lanczos(crop, 4))]
        for label, crop in crops.items()
    }
    for name in models:
        runner = create_runner(name, RunnerSettings(runtime=runtime, threads=threads))
        try:
            for label, crop in crops.items():
                enlarged[label].append((name, runner.run({"image": crop[None]})["image"][0]))
        finally:
            runner.close()
    written: list[Path] = []
    for label, columns in enlarged.items():
        tile_height, tile_width = columns[0][1].shape[:2]
        sheet = Image.new("RGB", (tile_width * len(columns), tile_height + LABEL_HEIGHT), "white")
        draw = ImageDraw.Draw(sheet)
        for index, (caption, image) in enumerate(columns):
            sheet.paste(Image.fromarray(np.ascontiguousarray(image)), (index * tile_width, LABEL_HEIGHT))
            draw.text((index * tile_width + 2, 1), _caption(caption), fill="black")
        path = directory / f"quality-x4-native-{label}.png"
        sheet.save(path, optimize=True)
        written.append(path)
    return written


# -- the command ----------------------------------------------------------------------------


def _names(text: str, known: Sequence[str], option: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise click.BadParameter(f"choose from {', '.join(known)}", param_hint=option)
    return names


@click.command("quality")
@click.option("--photos", "photo_paths", multiple=True, required=True,
              type=click.Path(exists=True, path_type=Path),
              help="A photo or a folder of them (clean originals); repeat for more.")
@click.option("--models-x4", "models_x4", default=",".join(CANDIDATES[4]), show_default=True,
              help="×4 models to compare (comma-separated; empty for none).")
@click.option("--models-x2", "models_x2", default=",".join(CANDIDATES[2]), show_default=True,
              help="×2 models to compare (comma-separated; empty for none).")
@click.option("--degradations", "degradations_text", default=",".join(item.name for item in DEGRADATIONS),
              show_default=True, help="Degradations to make (comma-separated).")
@click.option("--max-side", default=DEFAULT_MAX_SIDE, show_default=True, type=click.IntRange(16, 4096),
              help="Crop each original to at most this many pixels each way (around its largest face).")
@click.option("--runtime", default="ncnn", show_default=True, help="Runtime of the models.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Compute threads of each model; 0 = number of CPUs.")
@click.option("--crops", "crops_directory", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Write side-by-side crops (original, Lanczos, each model) as PNGs into this folder.")
@click.option("--crop-photos", "crop_photos_text", default="",
              help="Photos to draw crops of (file names, comma-separated); all when empty.")
@click.option("--native-crops", is_flag=True,
              help="Also draw each photo as it is (no degradation, nothing to measure) enlarged ×4 by each ×4 model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def quality(photo_paths: tuple[Path, ...], models_x4: str, models_x2: str, degradations_text: str, max_side: int,
            runtime: str, threads: int, crops_directory: Path | None, crop_photos_text: str, native_crops: bool,
            as_json: bool) -> None:
    """PSNR, SSIM, sharpness and time of the upscalers on degraded copies of real photos."""
    from chaoqing.bench.common import Report, command_line, report
    from chaoqing.errors import BenchError, RunnerError

    try:
        import scipy.ndimage  # noqa: F401
        import skimage.metrics  # noqa: F401
    except ImportError:
        raise click.ClickException("bench quality needs scikit-image: pip install 'chaoqing[bench]'") from None
    candidates: dict[int, Sequence[str]] = {}
    for scale, text, option in ((4, models_x4, "--models-x4"), (2, models_x2, "--models-x2")):
        if text.strip():
            candidates[scale] = _names(text, CANDIDATES[scale], option)
    if not candidates:
        raise click.UsageError("no models: give --models-x4 or --models-x2")
    degradations = _names(degradations_text, [item.name for item in DEGRADATIONS], "--degradations")

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        rows, records, prepared = run_quality(list(photo_paths), candidates, degradations, max_side=max_side,
                                              runtime=runtime, threads=threads, progress=progress)
    except (BenchError, RunnerError) as exc:
        raise click.ClickException(str(exc)) from None
    extra: dict[str, Any] = {"measurements": records,
                             "degradations": {item.name: item.description for item in DEGRADATIONS
                                              if item.name in degradations}}
    if crops_directory is not None:
        crop_photos = [item.strip() for item in crop_photos_text.split(",") if item.strip()] or None
        written = write_crops(prepared, candidates, degradations, crops_directory, crop_photos)
        if native_crops and 4 in candidates:
            native_paths = [path for path in _photos(photo_paths) if crop_photos is None or path.name in crop_photos]
            try:
                written += write_native_crops(native_paths, candidates[4], crops_directory, runtime=runtime,
                                              threads=threads)
            except RunnerError as exc:
                raise click.ClickException(str(exc)) from None
        extra["crops"] = [str(path) for path in written]
        progress(f"wrote {len(written)} crop sheets into {crops_directory}")
    settings = {"photos": [str(path) for path in photo_paths], "max_side": max_side, "runtime": runtime,
                "threads": threads, "candidates": {f"x{scale}": list(names) for scale, names in candidates.items()},
                "metrics": "PSNR and SSIM on BT.601 Y, border of `scale` px shaved; sharpness = "
                           "var(Laplacian(Y output)) / var(Laplacian(Y original))"}
    report(Report("quality", command_line(), settings, rows, extra=extra), COLUMNS, as_json=as_json)
