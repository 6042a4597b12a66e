"""The face detector: dlib's HOG frontal face detector plus its 5-point shape predictor.

``image`` UINT8 [H,W,3] RGB (no batch dimension) → ``boxes`` FP32 [N,4] (x1, y1, x2, y2),
``scores`` FP32 [N], ``landmarks`` FP32 [N,5,2] (x, y), all in image pixels, faces sorted by
score, best first. An image without faces — or too small to hold one, 1×1 included — gives
N = 0 with the same dtypes and trailing dimensions.

Weights ship in packages: the detector is built into dlib (PyPI ``dlib-bin``); the shape
predictor is ``shape_predictor_5_face_landmarks.dat`` from ``face_recognition_models``.

The five points, in dlib's order (checked on skimage's astronaut, where the subject faces the
camera: points 0/1 lie at x 255/238, 2/3 at x 195/212, 4 at the nose below the eyes, and
against the FFHQ template below):

0. outer corner of the eye on the image's right (the subject's left eye)
1. inner corner of that same eye
2. outer corner of the eye on the image's left (the subject's right eye)
3. inner corner of that same eye
4. base of the nose, under the nostrils (subnasale)

face_recognition's ``face_landmarks(model="small")`` calls points 0–1 ``right_eye`` and 2–3
``left_eye``, naming eyes by image side as it does for the 68-point model (whose ``left_eye``,
iBUG points 36–41, is also on the image's left); "left"/"right" are ambiguous, so
:data:`LANDMARK_POINTS` spells the order out with image sides, and
:data:`ALIGNMENT_TEMPLATE_512` gives these points' mean positions on FFHQ-aligned 512×512
crops, so ``cv2.estimateAffinePartial2D(landmarks, template · size/512)`` aligns a face the
way FFHQ-trained face models expect. Both are published in the model metadata.

Upsampling: HOG scans an 80×80 window, so it misses faces smaller than about 80 px unless
the image is upsampled first (each upsample doubles the image, quarters the smallest face it
finds… and quadruples the cost). ``upsample`` -1 (the default) means: once for images up to
:data:`AUTO_UPSAMPLE_MAX_PIXELS`, not at all above — the HOG pyramid stays within about
4 MP, about a second on 2 cores, while faces down to ~40 px are found in the small photos
that most need super-resolution. Measured on 7 sample photos: without upsampling, 3 of them
lost every face (37–55 px faces); with one upsample all were found.

Threshold: ``adjust_threshold`` is added to dlib's decision threshold (dlib's default 0.0).
At 0.0 the mission patch on the astronaut's suit is a "face" (score 0.02–0.26 depending on
upsampling); real faces in the sample photos scored 0.46 and up. The default
:data:`DEFAULT_ADJUST_THRESHOLD` = 0.3 sits between.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch

__all__ = [
    "ALIGNMENT_TEMPLATE_512",
    "AUTO_UPSAMPLE",
    "AUTO_UPSAMPLE_MAX_PIXELS",
    "DEFAULT_ADJUST_THRESHOLD",
    "LANDMARK_POINTS",
    "DlibFaceDetector",
    "detector_spec",
    "empty_detections",
]

FACE_DETECTOR_NAME = "face-detector"

# dlib shape_predictor_5_face_landmarks order, with image sides (see the module docstring).
LANDMARK_POINTS: tuple[str, ...] = (
    "image_right_eye_outer_corner",
    "image_right_eye_inner_corner",
    "image_left_eye_outer_corner",
    "image_left_eye_inner_corner",
    "nose_base",
)

# Mean positions of dlib's 5 points on 24 FFHQ-aligned 512×512 crops, in dlib's order
# (shared/DESIGN.md, "Face geometry"; std 3–9 px).
ALIGNMENT_TEMPLATE_512: tuple[tuple[float, float], ...] = (
    (345.12, 243.88),
    (294.58, 245.46),
    (166.71, 242.71),
    (216.79, 244.83),
    (256.88, 333.17),
)

# What the gateway reads to align these points (chaoqing.gateway.pipeline): dlib's 5 points
LANDMARK_CONVENTION = "dlib-5"

AUTO_UPSAMPLE = -1
# Upsample once up to 1 MP: the upsampled image (4 MP) then costs about what a 4 MP image
# costs without upsampling (~0.7–0.9 s on 2 cores, measured), the gateway's largest
# detection input (detection_max_side 2048).
AUTO_UPSAMPLE_MAX_PIXELS = 1_000_000
DEFAULT_ADJUST_THRESHOLD = 0.3
LANDMARK_COUNT = 5


def detector_spec(
    name: str,
    platform: str,
    parameters: Mapping[str, Any],
    *,
    landmark_points: Sequence[str] = LANDMARK_POINTS,
    alignment_template_512: Sequence[tuple[float, float]] = ALIGNMENT_TEMPLATE_512,
) -> ModelSpec:
    """The v2 metadata every face detector shares (real or simulated): the same tensors, and
    which 5 points its landmarks are (``landmark_points``, ``landmark_convention``) with the
    512 px template they align to; dlib's 5 points unless told otherwise."""
    return ModelSpec(
        name=name,
        platform=platform,
        inputs=(TensorSpec("image", "UINT8", (-1, -1, 3)),),
        outputs=(
            TensorSpec("boxes", "FP32", (-1, 4)),
            TensorSpec("scores", "FP32", (-1,)),
            TensorSpec("landmarks", "FP32", (-1, LANDMARK_COUNT, 2)),
        ),
        max_batch_size=0,
        parameters={
            "landmark_convention": LANDMARK_CONVENTION,
            "landmark_points": list(landmark_points),
            "alignment_template_512": [list(point) for point in alignment_template_512],
            **parameters,
        },
    )


def empty_detections() -> dict[str, np.ndarray]:
    """The outputs for an image without faces: N = 0, right dtypes and trailing shapes."""
    return {
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "scores": np.zeros((0,), dtype=np.float32),
        "landmarks": np.zeros((0, LANDMARK_COUNT, 2), dtype=np.float32),
    }


def validate_image(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """``inputs["image"]`` if it is a UINT8 [H,W,3] array with H, W >= 1.

    Raises RunnerError otherwise.
    """
    image: np.ndarray = image_batch(inputs, batched=False)
    return image


def choose_upsample(height: int, width: int, upsample: int) -> int:
    """The number of times HOG upsamples an image of this size (``upsample`` -1: automatic)."""
    if upsample != AUTO_UPSAMPLE:
        return upsample
    return 1 if height * width <= AUTO_UPSAMPLE_MAX_PIXELS else 0



# face_recognition_models' own lookup goes through pkg_resources, which setuptools 81+ no longer
# ships: only the package's files are wanted, found without importing it (as with the ncnn packages)
LANDMARK_MODEL_FILE = "shape_predictor_5_face_landmarks.dat"


def landmark_model_path() -> Path:
    """The 5-point shape predictor inside the installed face_recognition_models package.

    Raises RunnerError when the package or the file is missing."""
    return model_file_path(LANDMARK_MODEL_FILE)


def model_file_path(file_name: str) -> Path:
    """``models/<file_name>`` inside the installed face_recognition_models package (found,
    not imported).

    Raises RunnerError when the package or the file is missing."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RunnerError("dlib's face models need face_recognition_models: pip install face_recognition_models")
    path = Path(locations[0]) / "models" / file_name
    if not path.is_file():
        raise RunnerError(f"face_recognition_models is installed but {path} is missing")
    return path


class DlibFaceDetector(Runner):
    """dlib HOG face detector + 5-point landmarks. CPU only; one :meth:`run` at a time."""

    holds_compute_slot = False  # one thread, ~0.3 s a photo: it overlaps the upscale

    def __init__(
        self,
        *,
        upsample: int = AUTO_UPSAMPLE,
        adjust_threshold: float = DEFAULT_ADJUST_THRESHOLD,
    ) -> None:
        """Load dlib's detector and the 5-point shape predictor.

        ``upsample``: -1 automatic (see the module docstring) or a fixed count 0–3.

        Raises RunnerError when dlib or face_recognition_models is missing or ``upsample`` is
        out of range.
        """
        if not AUTO_UPSAMPLE <= upsample <= 3:
            raise RunnerError(f"upsample must be -1 (automatic) or 0 to 3, got {upsample}")
        try:
            import dlib  # lazy: only a process that serves the detector pays for it
        except ImportError as exc:
            raise RunnerError(f"the face detector needs dlib-bin: {exc}") from exc
        predictor_path = str(landmark_model_path())
        try:
            self._shape_predictor = dlib.shape_predictor(predictor_path)
        except RuntimeError as exc:
            raise RunnerError(
                f"cannot load the 5-point shape predictor {predictor_path}: {exc}"
            ) from exc
        self._detector = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.adjust_threshold = adjust_threshold
        self.spec = detector_spec(
            FACE_DETECTOR_NAME,
            "dlib",
            {
                "upsample": "auto" if upsample == AUTO_UPSAMPLE else upsample,
                "auto_upsample_max_pixels": AUTO_UPSAMPLE_MAX_PIXELS,
                "adjust_threshold": adjust_threshold,
            },
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Detect faces in ``inputs["image"]`` (UINT8 [H,W,3] RGB).

        Boxes are dlib's rectangles with exclusive right/bottom edges, clipped to the image;
        landmarks are not clipped (a face cut by the border keeps its geometry).

        Raises RunnerError when the input is malformed or dlib fails.
        """
        image = validate_image(inputs)
        height, width, _ = image.shape
        # dlib must get a C-contiguous array: measured, a strided view sometimes yields no
        # faces at all once the detector has run on other images.
        contiguous_image = np.ascontiguousarray(image)
        upsample = choose_upsample(height, width, self.upsample)
        try:
            rectangles, scores, _ = self._detector.run(
                contiguous_image, upsample, self.adjust_threshold
            )
            shapes = [
                self._shape_predictor(contiguous_image, rectangle) for rectangle in rectangles
            ]
        except RuntimeError as exc:
            raise RunnerError(f"dlib failed on a {width}×{height} image: {exc}") from exc
        if not rectangles:
            return empty_detections()
        boxes = np.array(
            [
                (rectangle.left(), rectangle.top(), rectangle.right() + 1, rectangle.bottom() + 1)
                for rectangle in rectangles
            ],
            dtype=np.float32,
        )
        np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
        landmarks = np.array([_points_of(shape) for shape in shapes], dtype=np.float32).reshape(
            -1, LANDMARK_COUNT, 2
        )
        score_array = np.asarray(scores, dtype=np.float32)
        order = np.argsort(-score_array, kind="stable")
        return {
            "boxes": np.ascontiguousarray(boxes[order]),
            "scores": np.ascontiguousarray(score_array[order]),
            "landmarks": np.ascontiguousarray(landmarks[order]),
        }


def _points_of(shape: Any) -> Sequence[tuple[int, int]]:
    """The (x, y) of every part of a dlib full_object_detection."""
    return [(shape.part(index).x, shape.part(index).y) for index in range(shape.num_parts)]
