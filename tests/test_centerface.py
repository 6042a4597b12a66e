"""CenterFace: the real model on skimage's astronaut, its decoding, the landmark conventions the
gateway aligns by, and both detectors through a model server and the gateway end to end."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import requests
from conftest import SIM_PRESETS
from PIL import Image
from skimage import data

from chaoqing.config import Config
from chaoqing.errors import BadModelResponse, RunnerError
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.gateway.stages.detect import alignment_template
from chaoqing.gateway.stages.face_geometry import DLIB_5_TEMPLATE_512, FFHQ_TEMPLATE_512
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.modelserver.runners.centerface import (
    FFHQ_TEMPLATE_512 as RUNNER_FFHQ_TEMPLATE_512,
)
from chaoqing.modelserver.runners.centerface import (
    CenterFaceDetector,
    decode_detections,
    padded_size,
    suppress_overlaps,
)
from chaoqing.modelserver.runners.sim import FACE_MARK_LEVELS

# astronaut(): Eileen Collins faces the camera; her face spans about x 175-270, y 60-180
ASTRONAUT_FACE = (175, 60, 270, 180)


@pytest.fixture(scope="module")
def centerface() -> Iterator[CenterFaceDetector]:
    runner = CenterFaceDetector(threads=1)
    yield runner
    runner.close()


@pytest.mark.slow
def test_centerface_finds_the_astronaut_with_landmarks_in_ffhq_order(centerface: CenterFaceDetector) -> None:
    found = centerface.run({"image": data.astronaut()})
    assert found["boxes"].shape == (1, 4) and found["scores"].shape == (1,) and found["landmarks"].shape == (1, 5, 2)
    assert all(array.dtype == np.float32 for array in found.values())
    assert found["scores"][0] > 0.8  # measured 0.90; nothing else in the photo passes 0.2
    x1, y1, x2, y2 = found["boxes"][0]
    left, top, right, bottom = ASTRONAUT_FACE
    assert abs(x1 - left) < 15 and abs(x2 - right) < 15 and abs(y1 - top) < 15 and abs(y2 - bottom) < 15
    left_eye, right_eye, nose, left_mouth, right_mouth = found["landmarks"][0]
    assert left_eye[0] < nose[0] < right_eye[0]  # eyes on either side of the nose, image-left first
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])  # eyes, nose, mouth downwards
    assert 35 < right_eye[0] - left_eye[0] < 55  # her eyes are ~44 px apart
    for x, y in found["landmarks"][0]:
        assert x1 <= x <= x2 and y1 <= y <= y2


@pytest.mark.slow
def test_centerface_metadata_says_its_convention_and_empty_images_give_no_faces(centerface: CenterFaceDetector) -> None:
    parameters = centerface.spec.as_metadata()["parameters"]
    assert parameters["landmark_convention"] == "ffhq-5"
    assert parameters["license"] == "MIT" and "CenterFace" in parameters["source"]
    np.testing.assert_array_equal(alignment_template(parameters, "centerface"), FFHQ_TEMPLATE_512)
    for shape in ((1, 1, 3), (37, 61, 3)):  # not multiples of 32: padded
        empty = centerface.run({"image": np.full(shape, 128, dtype=np.uint8)})
        assert empty["boxes"].shape == (0, 4) and empty["landmarks"].shape == (0, 5, 2)
    with pytest.raises(RunnerError):
        centerface.run({"image": np.zeros((8, 8), dtype=np.uint8)})


def test_the_runner_template_is_the_gateways() -> None:
    np.testing.assert_array_equal(np.asarray(RUNNER_FFHQ_TEMPLATE_512), FFHQ_TEMPLATE_512)


def test_padded_size_rounds_each_side_up_to_32() -> None:
    assert padded_size(1, 1) == (32, 32)
    assert padded_size(64, 65) == (64, 96)


def _maps(cells: tuple[int, int], peaks: list[tuple[int, int, float, float, float]]) -> dict[str, np.ndarray]:
    """Network outputs with faces at (row, column, score, height px, width px), no offsets, and
    landmarks at fixed fractions of each box."""
    rows, columns = cells
    heatmap = np.zeros((1, 1, rows, columns), dtype=np.float32)
    scale = np.zeros((1, 2, rows, columns), dtype=np.float32)
    offset = np.zeros((1, 2, rows, columns), dtype=np.float32)
    landmarks = np.zeros((1, 10, rows, columns), dtype=np.float32)
    fractions = [(0.4, 0.3), (0.4, 0.7), (0.6, 0.5), (0.8, 0.35), (0.8, 0.65)]  # (y, x) of the box
    for row, column, score, height, width in peaks:
        heatmap[0, 0, row, column] = score
        scale[0, :, row, column] = np.log([height / 4, width / 4])
        for point, (y, x) in enumerate(fractions):
            landmarks[0, 2 * point : 2 * point + 2, row, column] = (y, x)
    return {"537": heatmap, "538": scale, "539": offset, "540": landmarks}


def test_decoding_places_boxes_and_landmarks_from_the_maps() -> None:
    # a face centred on cell (10, 20): pixel centre ((20 + 0.5) * 4, (10 + 0.5) * 4) = (82, 42)
    maps = _maps((32, 32), [(10, 20, 0.9, 40.0, 30.0), (25, 5, 0.4, 20.0, 20.0)])
    found = decode_detections(maps, 0.5, (128, 128))
    np.testing.assert_allclose(found["boxes"], [[67, 22, 97, 62]], atol=1e-4)
    np.testing.assert_allclose(found["scores"], [0.9])
    np.testing.assert_allclose(found["landmarks"][0], [[76, 38], [88, 38], [82, 46], [77.5, 54], [86.5, 54]], atol=1e-4)
    # below the threshold: gone; a lower threshold finds it, best first
    both = decode_detections(maps, 0.3, (128, 128))
    np.testing.assert_allclose(both["scores"], [0.9, 0.4])


def test_decoding_keeps_one_box_per_face_and_landmarks_of_a_face_cut_by_the_border() -> None:
    maps = _maps((16, 16), [(0, 0, 0.9, 40.0, 40.0)])
    maps["537"][0, 0, 0, 1] = 0.8  # a neighbour of the peak: not a local maximum
    maps["537"][0, 0, 2, 2] = 0.7  # a second peak on the same face
    maps["538"][0, :, 2, 2] = np.log(10.0)
    found = decode_detections(maps, 0.5, (64, 64))
    assert found["boxes"].shape == (1, 4)
    np.testing.assert_allclose(found["boxes"][0], [0, 0, 22, 22], atol=1e-4)  # (-18, -18, 22, 22) clipped
    np.testing.assert_allclose(found["landmarks"][0, 0], [-18 + 0.3 * 40, -18 + 0.4 * 40], atol=1e-4)  # not clipped


def test_overlapping_boxes_are_suppressed_best_first() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.2], dtype=np.float32)
    assert suppress_overlaps(boxes, scores).tolist() == [1, 2]


def test_the_gateway_aligns_by_the_detectors_landmark_convention() -> None:
    np.testing.assert_array_equal(alignment_template({"landmark_convention": "ffhq-5"}, "d"), FFHQ_TEMPLATE_512)
    # a known convention wins over a template
    dlib = alignment_template({"landmark_convention": "dlib-5", "alignment_template_512": [[0, 0]] * 5}, "d")
    np.testing.assert_array_equal(dlib, DLIB_5_TEMPLATE_512)
    custom = [[float(index), 1.0] for index in range(5)]
    np.testing.assert_array_equal(alignment_template({"landmark_convention": "mine", "alignment_template_512": custom},
                                                     "d"), custom)
    np.testing.assert_array_equal(alignment_template({}, "d"), FFHQ_TEMPLATE_512)
    with pytest.raises(BadModelResponse, match="landmark_convention 'mine'"):
        alignment_template({"landmark_convention": "mine"}, "d")
    with pytest.raises(BadModelResponse, match="not \\[5,2\\]"):
        alignment_template({"alignment_template_512": [[1, 2]]}, "d")


def test_dlib_publishes_its_convention() -> None:
    from chaoqing.modelserver.runners.dlib_detector import detector_spec

    parameters = detector_spec("face-detector", "dlib", {}).as_metadata()["parameters"]
    assert parameters["landmark_convention"] == "dlib-5"
    np.testing.assert_array_equal(alignment_template(parameters, "face-detector"), DLIB_5_TEMPLATE_512)


def test_centerface_is_the_default_detector_and_dlib_an_option() -> None:
    assert Config().detector == "centerface"
    assert "centerface" in Config().models_needed("balanced")
    assert Config(detector="face-detector").models_needed("balanced")[-1] == "face-detector"


def _png(photo: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("detector", ["centerface", "face-detector"])
def test_each_detector_serves_the_gateway_which_pastes_the_face_where_it_is(
    detector: str, start_model_server: Callable[..., Any]
) -> None:
    """A real detector in a model server, the simulated upscaler and face model (which adds
    FACE_MARK_LEVELS): the face is found, enhanced, and the marked paste covers her eyes, nose
    and mouth, not the photo's corners."""
    servers = {name: start_model_server([name], sim_latency_ms=1, max_batch_size=4)
               for name in ("sim-upscale-x4", "sim-face")}
    servers[detector] = start_model_server([detector], threads=1)
    config = Config(port=0, detector=detector, presets=SIM_PRESETS, preset="balanced",
                    endpoints={name: (server.url,) for name, server in servers.items()})
    metrics = GatewayMetrics()
    gateway = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
    gateway.start()
    try:
        photo = data.astronaut()
        replies = [requests.post(f"{gateway.url}/v1/enhance?scale=2&preset=balanced&faces={faces}"
                                 "&face_colour=false&face_texture=false", data=_png(photo),  # sim-face's own mark
                                 headers={"Content-Type": "image/png"}, timeout=120) for faces in ("true", "false")]
    finally:
        gateway.stop(grace_s=1.0)
    for reply in replies:
        assert reply.status_code == 200, reply.text
    assert replies[0].headers["X-Faces-Detected"] == "1" and replies[0].headers["X-Faces-Enhanced"] == "1"
    with_face, without = (np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB")).astype(np.int16)
                          for reply in replies)
    difference = (with_face - without).mean(axis=2)
    # CenterFace's landmarks, scaled to the 2× output (pixel centres): the paste covers them all.
    # Around each, the face model's mark, give or take the two paths' resampling (the face crop is
    # smaller than the face, then blocky: it averages out over a few of its pixels)
    points = create_runner("centerface", RunnerSettings(threads=1)).run({"image": photo})["landmarks"][0]
    for x, y in points:
        row, column = round(2 * y + 0.5), round(2 * x + 0.5)
        window = difference[row - 10 : row + 11, column - 10 : column + 11]
        assert abs(float(window.mean()) - FACE_MARK_LEVELS) <= 4, (x, y, window.mean())
    for corner in (difference[:40, :40], difference[-40:, -40:], difference[:40, -40:]):
        assert not corner.any()


@pytest.mark.slow
def test_a_large_image_is_shrunk_first_and_the_face_scaled_back(centerface: CenterFaceDetector) -> None:
    import cv2

    large_image = np.asarray(Image.fromarray(data.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC))
    large = centerface.run({"image": large_image})  # 4 MP: run at 1 MP, on the 1000 px copy
    assert centerface.spec.parameters["max_pixels"] == 1_000_000
    copy = np.ascontiguousarray(cv2.resize(large_image, (1000, 1000), interpolation=cv2.INTER_AREA))
    small = centerface.run({"image": copy})
    assert large["boxes"].shape == small["boxes"].shape == (1, 4)
    factor = 2048 / 1000
    np.testing.assert_allclose(large["boxes"][0], small["boxes"][0] * factor, rtol=1e-5)
    np.testing.assert_allclose(large["landmarks"][0], (small["landmarks"][0] + 0.5) * factor - 0.5, rtol=1e-5)
