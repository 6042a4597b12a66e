"""``chaoqing bench faces PHOTOS...``: how each face comes out, per face and per face model.

The pipeline is run by direct stage calls that mirror the gateway's (no servers, as ``bench
local``'s script does): the config's detector on the copy the gateway sends it, the preset's
upscaler on the whole photo resized to ``--scale``, and per face model (``--face-models``,
default the preset's) each face aligned with the gateway's template, crop size, warp, inverse
warp and soft mask, then composited. A ``lanczos`` row is the photo resized with Lanczos, no
model at all: the baseline every metric is read against.

Per face, the output is shrunk back to the input's size (INTER_AREA) and compared with the
input:

- **identity**: the Euclidean distance between dlib's 128-D face descriptors of the input
  face and the shrunk output face, both described at the same 5 points (dlib's shape
  predictor places them on the input, in a box set from the detector's landmarks; the output
  reuses them): the ``face-descriptor`` runner. Same person < 0.6.
- **consistency**: PSNR (dB) of the shrunk output against the input over the detector's box.
- **colour shift**: mean CIELAB ΔE (CIE76) over the box, and over the eyes (discs of
  :data:`EYE_RADIUS_FRACTION` × the eye distance round the template's eye centres mapped into
  the image).
- **boundary texture**: at the output's size, the ratio of high-frequency energy (the squared
  difference of luma and its Gaussian blur, sigma :data:`HIGH_PASS_SIGMA`) in a band just
  inside the paste mask's edge (mask ≥ 0.99) to a band just outside it (mask 0), each band
  as wide as the mask's ramp (at least :data:`MIN_BAND_PX`). 1.0: the face is as sharp or as
  grainy as what surrounds it. The Lanczos row uses the first face model's mask geometry.
  A photo is rarely as textured on both sides of that edge (skin and hair inside, a wall
  outside), so each row also gives its ratio over the Lanczos row's for the same face
  (``boundary ÷ lanczos``): how much the pipeline changed the contrast across the edge.

Targets (issue 13), for every face of every face model: identity ≤ 0.30, consistency ≥ 28 dB,
boundary ratio within [0.8, 1.25].
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # numpy is imported where it is used: `chaoqing --help` stays fast
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "BOUNDARY_TARGET",
    "CONSISTENCY_TARGET_DB",
    "IDENTITY_TARGET",
    "boundary_texture_ratio",
    "faces",
    "mean_delta_e",
    "psnr",
    "run_faces",
]

LANCZOS = "lanczos"
UNMATCHED_SUFFIX = ", unmatched"  # --compare-matching rows: the face model's own pixels
GUARDED_SUFFIX = ", guarded"  # --identity-guard rows: at the strength the identity guard chose
IDENTITY_TARGET = 0.30
CONSISTENCY_TARGET_DB = 28.0
BOUNDARY_TARGET = (0.8, 1.25)
HIGH_PASS_SIGMA = 1.5  # output pixels: keeps grain, skin pores and hair strands, drops shading
MIN_BAND_PX = 4
MASK_INSIDE = 0.99
EYE_RADIUS_FRACTION = 0.2  # of the eye distance: the iris and the lids round it
# Where dlib's shape predictor looks on an aligned face: the identity guard's DLIB_BOX_512
# (chaoqing.gateway.stages.identity), so the bench and the guard describe faces alike.
FFHQ_EYES_512 = ((192.98138, 239.94708), (318.90277, 240.1936))

COLUMNS = [
    ("photo", "photo", ""),
    ("face", "face", "d"),
    ("px", "face_px", ".0f"),
    ("model", "model", ""),
    ("identity", "identity", ".3f"),
    ("PSNR dB", "psnr_db", ".1f"),
    ("ΔE face", "delta_e_face", ".2f"),
    ("ΔE eyes", "delta_e_eyes", ".2f"),
    ("boundary", "boundary_ratio", ".2f"),
    ("boundary ÷ lanczos", "boundary_vs_lanczos", ".2f"),
    ("face model s", "face_model_s", ".1f"),
]


@dataclass(frozen=True)
class _Face:
    index: int
    box: tuple[int, int, int, int]  # integer pixels, clipped to the input
    side: float  # the 512 px aligned crop's side in input pixels
    descriptor_box: tuple[float, float, float, float]
    eyes: npt.NDArray[np.float64]  # [2, 2] eye centres in input pixels
    face: Any  # the DetectedFace


def psnr(first: npt.NDArray[np.uint8], second: npt.NDArray[np.uint8]) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB (inf when equal)."""
    import numpy as np

    error = float(np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2))
    return math.inf if error == 0 else 10 * math.log10(255.0**2 / error)


def _lab(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    import cv2
    import numpy as np

    return np.asarray(cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab), dtype=np.float32)


def mean_delta_e(first: npt.NDArray[np.uint8], second: npt.NDArray[np.uint8],
                 where: npt.NDArray[np.bool_] | None = None) -> float:
    """Mean CIE76 ΔE (CIELAB distance, D65) between two uint8 RGB images, over ``where``."""
    import numpy as np

    distance = np.linalg.norm(_lab(first) - _lab(second), axis=2)
    chosen = distance if where is None else distance[where]
    return float(chosen.mean()) if chosen.size else math.nan


def boundary_texture_ratio(image: npt.NDArray[np.uint8], mask: npt.NDArray[np.float32], band_px: int) -> float:
    """High-frequency energy just inside a soft mask's edge over just outside it (see the
    module docstring); ``image`` and ``mask`` cover the same pixels. NaN when a band is empty
    or the outside is perfectly flat."""
    import cv2
    import numpy as np

    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    high = luma - cv2.GaussianBlur(luma, (0, 0), HIGH_PASS_SIGMA)
    energy = high * high
    inside = (mask >= MASK_INSIDE).astype(np.uint8)
    outside = (mask <= 0.0).astype(np.uint8)
    # distance of each inside pixel to the nearest not-inside one, and of each outside pixel to the mask
    inside_distance = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    outside_distance = cv2.distanceTransform(outside, cv2.DIST_L2, 3)
    inside_band = (inside > 0) & (inside_distance <= band_px)
    outside_band = (outside > 0) & (outside_distance <= band_px)
    if not inside_band.any() or not outside_band.any():
        return math.nan
    outside_energy = float(energy[outside_band].mean())
    return float(energy[inside_band].mean()) / outside_energy if outside_energy > 0 else math.nan


def _geometry(faces: Sequence[Any], template: npt.NDArray[np.float64], shape: tuple[int, ...]) -> list[_Face]:
    import numpy as np

    from chaoqing.gateway.stages.face_geometry import estimate_affine_matrix
    from chaoqing.gateway.stages.identity import DLIB_BOX_512

    height, width = shape[:2]
    described = []
    for face in faces:
        matrix = estimate_affine_matrix(face.landmarks, template)  # image → 512 px crop
        inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
        scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
        left, top, right, bottom = DLIB_BOX_512
        centre = inverse @ np.array([(left + right) / 2, (top + bottom) / 2, 1.0])
        half = (right - left) / scale / 2
        eyes = np.array([inverse @ np.array([x, y, 1.0]) for x, y in FFHQ_EYES_512])
        x1, y1, x2, y2 = face.box
        box = (max(0, math.floor(x1)), max(0, math.floor(y1)), min(width, math.ceil(x2)), min(height, math.ceil(y2)))
        described.append(_Face(face.index, box, 512 / scale,
                               (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half), eyes, face))
    return described


def _eye_mask(shape: tuple[int, ...], eyes: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    import numpy as np

    rows, columns = np.indices(shape[:2])
    radius = EYE_RADIUS_FRACTION * float(np.linalg.norm(eyes[1] - eyes[0]))
    mask = np.zeros(shape[:2], dtype=bool)
    for x, y in eyes:
        mask |= (columns - x) ** 2 + (rows - y) ** 2 <= radius**2
    return mask


class _Pipeline:
    """The gateway's stages, called directly, with the runners in this process."""

    def __init__(self, config: Any, preset: str, face_models: Sequence[str], threads: int) -> None:
        from chaoqing.gateway.stages.detect import alignment_template
        from chaoqing.modelserver.runners import RunnerSettings, create_runner

        def settings(name: str) -> Any:
            server = config.model_server
            return RunnerSettings(threads=threads, runtime=server.runtime_for(name), device=server.device_for(name))

        self.config = config
        self.face_min_crop = config.presets[preset].face_min_crop
        self.upscaler_name = config.presets[preset].upscaler
        self.upscaler = create_runner(self.upscaler_name, settings(self.upscaler_name))
        self.detector = create_runner(config.detector, settings(config.detector))
        self.template = alignment_template(self.detector.spec.parameters, config.detector)
        self.face_models = {name: create_runner(name, settings(name)) for name in face_models}
        self.descriptor = create_runner("face-descriptor", settings("face-descriptor"))

    def close(self) -> None:
        for runner in (self.upscaler, self.detector, self.descriptor, *self.face_models.values()):
            runner.close()

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Any]:
        from chaoqing.gateway.stages.detect import faces_from_detections, shrink_for_detection

        small, factor = shrink_for_detection(rgb, self.config.detection_max_side)
        found = faces_from_detections(self.detector.run({"image": small}), factor, rgb.shape)
        found.sort(key=lambda face: (face.box[2] - face.box[0]) * (face.box[3] - face.box[1]), reverse=True)
        return found[: self.config.limits.max_faces]

    def background(self, rgb: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
        import numpy as np

        from chaoqing.gateway.stages.resize import resize_image

        native = self.upscaler.run({"image": np.ascontiguousarray(rgb[None])})["image"][0]
        resized: npt.NDArray[np.uint8] = resize_image(native, width, height)  # type: ignore[assignment]
        return resized

    def paste(self, model_name: str, rgb: npt.NDArray[np.uint8], face: _Face, background_scale: float,
              output_shape: tuple[int, int, int]) -> Any:
        """The face's FacePaste from this face model, as the gateway makes it (None: too small)."""
        from chaoqing.gateway.stages.composite import prepare_face_paste

        enhanced = self.restore(model_name, rgb, face, background_scale)
        return None if enhanced is None else prepare_face_paste(enhanced, output_shape)

    def guard(self, rgb: npt.NDArray[np.uint8], face: _Face, enhanced: Any, strength: float, settings: Any) -> Any:
        """The identity guard's IdentityCheck for this restored face, as the gateway runs it."""
        from chaoqing.gateway.stages.identity import describe_side, guard_identity, identity_tiles

        def describe(image: Any, boxes: Any, landmarks: Any) -> Any:
            inputs = {"image": image, "boxes": boxes, **({} if landmarks is None else {"landmarks": landmarks})}
            answer = self.descriptor.run(inputs)
            return answer["descriptors"], answer["landmarks"]

        tiles = identity_tiles(rgb, face.face.landmarks, self.template, enhanced, describe_side(face.side))
        return guard_identity(tiles, strength, settings, describe, lambda function, *arguments: function(*arguments))

    def restore(self, model_name: str, rgb: npt.NDArray[np.uint8], face: _Face, background_scale: float,
                crop_side: int | None = None) -> Any:
        """The face's EnhancedFace from this face model, as the gateway makes it (None: too small);
        ``crop_side`` fixes the aligned crop's side instead of the gateway's choice."""
        import numpy as np

        from chaoqing.gateway.stages.enhance_faces import (
            align_face,
            choose_crop_size,
            enhanced_face_from,
        )
        from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512

        model = self.face_models[model_name]
        eye_fraction = float(np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0])) / 512
        if face.side * eye_fraction < self.config.min_eye_distance_px:
            return None
        image_input = next(tensor for tensor in model.spec.inputs if tensor.name == "image")
        fixed = image_input.shape[1] if len(image_input.shape) == 4 and image_input.shape[1] > 0 else None
        model_scale = float(model.spec.parameters.get("scale", 1))
        crop_size = crop_side or choose_crop_size(face.side, background_scale, model_scale, fixed,
                                                  self.config.face_input_size, self.face_min_crop)
        crop = align_face(rgb, face.face, self.template, crop_size)
        output = model.run({"image": crop.crop[None]})["image"]
        return enhanced_face_from(crop, output, background_scale, model_name)


def _measure(output: npt.NDArray[np.uint8], rgb: npt.NDArray[np.uint8], face: _Face, reference: dict[str, Any],
             paste: Any, pipeline: _Pipeline) -> dict[str, float]:
    import cv2
    import numpy as np

    height, width = rgb.shape[:2]
    shrunk = np.asarray(cv2.resize(output, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    described = pipeline.descriptor.run({
        "image": shrunk,
        "boxes": np.array([face.descriptor_box], dtype=np.float32),
        "landmarks": reference["landmarks"][None],
    })["descriptors"][0]
    left, top, right, bottom = face.box
    eyes = _eye_mask(rgb.shape, face.eyes)
    ratio = math.nan
    if paste is not None and not paste.box.is_empty:
        rows, columns = paste.box.slices
        ramp = max(MIN_BAND_PX, round(math.sqrt(float((paste.soft_mask > 0).sum())) / 20))
        ratio = boundary_texture_ratio(np.ascontiguousarray(output[rows, columns]), np.asarray(paste.soft_mask), ramp)
    return {
        "identity": float(np.linalg.norm(described - reference["descriptor"])),
        "psnr_db": psnr(shrunk[top:bottom, left:right], rgb[top:bottom, left:right]),
        "delta_e_face": mean_delta_e(shrunk[top:bottom, left:right], rgb[top:bottom, left:right]),
        "delta_e_eyes": mean_delta_e(shrunk, rgb, eyes),
        "boundary_ratio": ratio,
    }


CROP_SIDE_PX = 192  # each face's tile in a crops strip
CROP_LABEL_PX = 14


def write_face_crops(path: Path, rgb: npt.NDArray[np.uint8], faces: Sequence[_Face],
                     outputs: Mapping[str, npt.NDArray[np.uint8]], background_scale: float) -> None:
    """A PNG of side-by-side crops: per face (a row) the input (nearest-neighbour, as it is),
    then each output (Lanczos, each model and variant) over the face's box grown by half,
    each scaled to :data:`CROP_SIDE_PX` and labelled."""
    import numpy as np
    from PIL import Image, ImageDraw

    columns = ["input", *outputs]
    sheet = Image.new("RGB", (CROP_SIDE_PX * len(columns), (CROP_SIDE_PX + CROP_LABEL_PX) * len(faces)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, face in enumerate(faces):
        left, top, right, bottom = face.box
        grow = max(right - left, bottom - top) / 4
        box = (max(0.0, left - grow), max(0.0, top - grow), min(float(rgb.shape[1]), right + grow),
               min(float(rgb.shape[0]), bottom + grow))
        y = row * (CROP_SIDE_PX + CROP_LABEL_PX)
        for column, name in enumerate(columns):
            if name == "input":
                tile = Image.fromarray(rgb).crop(box)
                tile = tile.resize((CROP_SIDE_PX, CROP_SIDE_PX), Image.Resampling.NEAREST)
            else:
                left_s, top_s, right_s, bottom_s = (value * background_scale for value in box)
                tile = Image.fromarray(np.ascontiguousarray(outputs[name][..., :3])).crop(
                    (left_s, top_s, right_s, bottom_s))
                tile = tile.resize((CROP_SIDE_PX, CROP_SIDE_PX), Image.Resampling.LANCZOS)
            sheet.paste(tile, (column * CROP_SIDE_PX, y + CROP_LABEL_PX))
            draw.text((column * CROP_SIDE_PX + 3, y + 1), name if row == 0 else "", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def run_faces(photos: Sequence[Path], config: Any, preset: str, face_models: Sequence[str], scale: float,
              threads: int, progress: Callable[[str], None], compare_matching: bool = False,
              identity_guard: bool = False, crops_dir: Path | None = None, strengths: Sequence[float] = (),
              crop_sides: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One row per face and per model (``lanczos`` first); with ``identity_guard`` also each
    model's faces at the strength the identity guard chose (rows 'MODEL, guarded'); each of
    ``strengths`` adds rows 'MODEL @S' (the same faces, blended at strength S); each of
    ``crop_sides`` runs every face model again on crops of that fixed side (rows 'MODEL crop N',
    with their own strength rows). Raises BenchError, RunnerError."""
    import dataclasses

    import numpy as np

    from chaoqing.bench.models import _load_rgb
    from chaoqing.errors import BenchError
    from chaoqing.gateway.pipeline import EnhanceOptions, face_match_settings
    from chaoqing.gateway.stages.composite import composite_face_pastes, prepare_face_paste
    from chaoqing.gateway.stages.face_match import FaceMatchSettings, match_paste_to_background

    if not photos:
        raise BenchError("no photos given")
    # the preset's matching (strength, colour, texture), as the service pastes; with
    # compare_matching also the face model's own pixels, unmatched
    variants = [("", face_match_settings(EnhanceOptions(), config.presets[preset]))]
    if compare_matching:
        variants.append((UNMATCHED_SUFFIX, FaceMatchSettings(strength=1.0, colour=False, texture=False)))
    variants += [(f" @{strength:g}", dataclasses.replace(variants[0][1], strength=strength)) for strength in strengths]
    runs: list[tuple[str, str, int | None]] = [(name, name, None) for name in face_models]  # (row, model, crop)
    runs += [(f"{name} crop {side}", name, side) for side in crop_sides for name in face_models]
    pipeline = _Pipeline(config, preset, face_models, threads)
    rows: list[dict[str, Any]] = []
    try:
        for path in photos:
            rgb = np.ascontiguousarray(_load_rgb(path))
            height, width = rgb.shape[:2]
            out_width, out_height = max(1, round(width * scale)), max(1, round(height * scale))
            background_scale = (out_width / width + out_height / height) / 2
            faces = _geometry(pipeline.detect(rgb), pipeline.template, rgb.shape)
            progress(f"{path.name}: {len(faces)} faces")
            if not faces:
                continue
            described = pipeline.descriptor.run({
                "image": rgb, "boxes": np.array([face.descriptor_box for face in faces], dtype=np.float32)})
            references = [{"descriptor": described["descriptors"][index], "landmarks": described["landmarks"][index]}
                          for index in range(len(faces))]
            outputs: dict[str, tuple[npt.NDArray[np.uint8], list[Any], list[float]]] = {}
            guard_reports: dict[str, list[Any]] = {}
            from PIL import Image

            lanczos = np.asarray(Image.fromarray(rgb).resize((out_width, out_height), Image.Resampling.LANCZOS))
            background = pipeline.background(rgb, out_width, out_height)
            for model_name, face_model, crop_side in runs:
                progress(f"{path.name}: {model_name} on {len(faces)} faces")
                pastes, seconds, checks = [], [], []
                for face in faces:
                    started = time.perf_counter()
                    enhanced = pipeline.restore(face_model, rgb, face, background_scale, crop_side)
                    pastes.append(None if enhanced is None else prepare_face_paste(enhanced, (out_height, out_width, 3)))
                    seconds.append(time.perf_counter() - started)
                    checks.append(None if enhanced is None or not identity_guard else
                                  pipeline.guard(rgb, face, enhanced, variants[0][1].strength, config.identity_guard))
                guarded_variants = [(GUARDED_SUFFIX, variants[0][1])] if identity_guard else []
                for label, settings in [*variants, *guarded_variants]:
                    per_face = [settings if label != GUARDED_SUFFIX or check is None else
                                dataclasses.replace(settings, strength=check.strength) for check in checks]
                    matched = [None if paste is None else
                               match_paste_to_background(paste, background, face_settings, background_scale)[0]
                               for paste, face_settings in zip(pastes, per_face, strict=True)]
                    canvas = composite_face_pastes(background, [paste for paste in matched if paste is not None])
                    outputs[model_name + label] = (canvas, pastes, seconds)  # the mask before strength: the bands
                    if label == GUARDED_SUFFIX:
                        guard_reports[model_name + label] = checks
            first_pastes = outputs[face_models[0]][1] if face_models else [None] * len(faces)
            outputs = {LANCZOS: (lanczos, first_pastes, [math.nan] * len(faces)), **outputs}
            if crops_dir is not None:
                write_face_crops(crops_dir / f"faces-{path.stem}.png", rgb, faces,
                                 {name: canvas for name, (canvas, _, _) in outputs.items()}, background_scale)
            baseline_ratios: dict[int, float] = {}
            for model_name, (canvas, pastes, seconds) in outputs.items():
                checks = guard_reports.get(model_name, [None] * len(faces))
                for face, reference, paste, face_seconds, check in zip(faces, references, pastes, seconds, checks,
                                                                       strict=True):
                    row: dict[str, Any] = {"photo": path.name, "face": face.index, "face_px": face.side, "model": model_name,
                           "enhanced": model_name == LANCZOS or paste is not None, "face_model_s": face_seconds,
                           "box": list(face.box)}
                    row |= _measure(canvas, rgb, face, reference, paste, pipeline)
                    if model_name == LANCZOS:
                        baseline_ratios[face.index] = row["boundary_ratio"]
                    baseline = baseline_ratios[face.index]
                    row["boundary_vs_lanczos"] = row["boundary_ratio"] / baseline if baseline > 0 else math.nan
                    if check is not None:  # the guard's own view: strength chosen, distances it saw
                        row |= {"guard_strength": check.strength, "guard_distance_before": check.distance_before,
                                "guard_distance_after": check.distance_after, "guard_calls": check.descriptor_calls}
                    rows.append(row)
    finally:
        pipeline.close()
    return rows


def _targets(rows: Sequence[dict[str, Any]], face_models: Sequence[str]) -> list[Any]:
    from chaoqing.bench.common import Target

    targets = []
    for model in face_models:
        chosen = [row for row in rows if row["model"] == model and row["enhanced"]]
        if not chosen:
            continue
        ratios = [row["boundary_ratio"] for row in chosen if not math.isnan(row["boundary_ratio"])]
        targets += [
            Target(f"{model} worst identity distance", max(row["identity"] for row in chosen), IDENTITY_TARGET),
            Target(f"{model} worst consistency", min(row["psnr_db"] for row in chosen), CONSISTENCY_TARGET_DB,
                   at_most=False, unit=" dB"),
            Target(f"{model} lowest boundary ratio", min(ratios, default=math.nan), BOUNDARY_TARGET[0], at_most=False),
            Target(f"{model} highest boundary ratio", max(ratios, default=math.nan), BOUNDARY_TARGET[1]),
        ]
    return targets


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        chosen = [row for row in rows if row["model"] == model]
        summary[model] = {
            f"median_{key}": statistics.median(row[key] for row in chosen)
            for key in ("identity", "psnr_db", "delta_e_face", "delta_e_eyes")
        }
        ratios = [row["boundary_ratio"] for row in chosen if not math.isnan(row["boundary_ratio"])]
        summary[model]["median_boundary_ratio"] = statistics.median(ratios) if ratios else math.nan
        summary[model]["faces"] = len(chosen)
    return summary


@click.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="chaoqing TOML file (presets, detector, face_input_size); defaults otherwise")
@click.option("--preset", default=None, help="the preset whose upscaler, face model and detector run [config's]")
@click.option("--face-models", default=None,
              help="face models to compare, comma-separated [the preset's face model]")
@click.option("--scale", default=None, type=click.FloatRange(1.0, 4.0), help="output scale [config's, 2]")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="threads per runner (0: every CPU)")
@click.option("--compare-matching", is_flag=True,
              help="also each face model's own pixels, without the preset's strength, colour and texture matching "
                   "(rows 'MODEL, unmatched')")
@click.option("--identity-guard", is_flag=True,
              help="also each face model's faces at the strength the identity guard chooses ([identity_guard] "
                   "threshold; rows 'MODEL, guarded', with guard_strength and the guard's distances in the JSON)")
@click.option("--strengths", default=None, metavar="S,S,...",
              help="also each face model's faces blended at these strengths (rows 'MODEL @S'): the background's "
                   "own face (0) to the face model's (1)")
@click.option("--crop-sides", default=None, metavar="N,N,...",
              help="also every face model on aligned crops of these fixed sides in px (rows 'MODEL crop N'), "
                   "instead of the gateway's choice (face side × scale ÷ model scale, 64 to face_input_size)")
@click.option("--crops", "crops_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="write side-by-side crops per photo (input, Lanczos, each model) into this folder")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of the table")
def faces(photos: tuple[Path, ...], config_path: Path | None, preset: str | None, face_models: str | None,
          scale: float | None, threads: int, compare_matching: bool, identity_guard: bool, strengths: str | None,
          crop_sides: str | None, crops_dir: Path | None, as_json: bool) -> None:
    """Per face and face model: identity, consistency, colour shift and boundary texture."""
    from chaoqing.bench.common import Report, command_line, number_list, report
    from chaoqing.bench.models import _photos
    from chaoqing.config import MAX_FACE_CROP_PX, MIN_FACE_CROP_PX, load_config

    config = load_config(config_path)
    preset_name = preset or config.preset
    if preset_name not in config.presets:
        raise click.UsageError(f"--preset {preset_name!r} is not one of {', '.join(config.presets)}")
    if face_models:
        models = [name.strip() for name in face_models.split(",") if name.strip()]
    else:
        own = config.presets[preset_name].face_model
        models = [own] if own else []
    files = [file for path in photos for file in _photos(path)]
    output_scale = scale if scale is not None else config.scale
    blends = number_list(strengths, "--strengths", float, 0.0, 1.0) if strengths else ()
    sides = number_list(crop_sides, "--crop-sides", int, MIN_FACE_CROP_PX, MAX_FACE_CROP_PX) if crop_sides else ()
    rows = run_faces(files, config, preset_name, models, output_scale, threads,
                     lambda text: None if as_json else click.echo(f"… {text}", err=True), compare_matching,
                     identity_guard, crops_dir, blends, sides)
    result = Report("faces", command_line(),
                    {"preset": preset_name, "upscaler": config.presets[preset_name].upscaler, "face_models": models,
                     "detector": config.detector, "scale": output_scale, "face_input_size": config.face_input_size,
                     "threads": threads, "identity_guard": config.identity_guard.threshold if identity_guard else None},
                    rows, _targets(rows, [name for name in dict.fromkeys(row["model"] for row in rows)
                                          if name != LANCZOS and not name.endswith(UNMATCHED_SUFFIX)]),
                    extra={"summary": _summary(rows)})
    report(result, COLUMNS, as_json=as_json)
