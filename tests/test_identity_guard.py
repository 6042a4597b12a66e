"""The identity guard (chaoqing.gateway.stages.identity): restored faces that change who a
person looks like are blended back toward the photo's own face until dlib's descriptor says
they pass; faithful ones are left alone; the response says so per face.

The end-to-end tests run the real CenterFace detector and the real ``face-descriptor`` runner
in a model server, on skimage's astronaut, with two face "restorers" written here: one that
is faithful (a bicubic ×4) and one that turns the face upside down (another face as far as
the descriptor goes: 0.79 apart, where dlib's same-person line is 0.6).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from chaoqing.config import (
    FACE_DESCRIPTOR,
    Config,
    IdentityGuardSettings,
    ModelServerSettings,
    Preset,
    config_from_mapping,
)
from chaoqing.errors import ConfigError
from chaoqing.gateway.jobs import JobResult, _job_result
from chaoqing.gateway.pipeline import EnhanceOptions, PipelineServices, enhance_photo
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.gateway.stages.encode import encode_image
from chaoqing.gateway.stages.face_geometry import estimate_affine_matrix
from chaoqing.gateway.stages.identity import (
    DLIB_BOX_512,
    IdentityTiles,
    blend_candidates,
    describe_side,
    guard_identity,
    side_by_side,
)
from chaoqing.gateway.supervisor import ModelServerSupervisor
from chaoqing.modelserver.app import ModelServer
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch

pytestmark = pytest.mark.timeout(180)

THRESHOLD = IdentityGuardSettings().threshold


def _same_thread(function: Callable[..., Any], *arguments: Any) -> Any:
    return function(*arguments)


# -- the search, with a descriptor whose distance is known -------------------------------


def _linear_describe(full_distance: float) -> tuple[Callable[..., Any], list[int]]:
    """A describe() whose descriptor is the tile's mean level: a blend of a black reference and
    a white restored tile at strength w is ``w · full_distance`` from the reference."""
    calls: list[int] = []

    def describe(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        side = image.shape[0]
        calls.append(len(boxes))
        descriptors = np.zeros((len(boxes), 128), np.float32)
        for index in range(len(boxes)):
            descriptors[index, 0] = image[:, index * side:(index + 1) * side].mean() / 255 * full_distance
        placed = np.zeros((len(boxes), 5, 2), np.float32) if landmarks is None else landmarks
        return descriptors, placed

    return describe, calls


TILES = IdentityTiles(np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8))


def test_a_face_within_the_threshold_keeps_its_strength_in_two_calls() -> None:
    describe, calls = _linear_describe(0.2)
    check = guard_identity(TILES, 1.0, IdentityGuardSettings(), describe, _same_thread)
    assert (check.strength, check.guarded, check.descriptor_calls) == (1.0, False, 2)
    assert check.distance_before == pytest.approx(0.2, abs=1e-3) and check.distance_after == check.distance_before
    assert calls == [1, 1]


def test_a_face_too_far_gets_the_largest_strength_that_passes() -> None:
    describe, calls = _linear_describe(0.8)  # passes up to strength 0.375
    settings = IdentityGuardSettings(threshold=0.3, max_rounds=2, candidates_per_round=4)
    check = guard_identity(TILES, 1.0, settings, describe, _same_thread)
    assert check.guarded and check.distance_before == pytest.approx(0.8, abs=1e-3)
    assert check.distance_after <= 0.3
    assert 0.375 - 1 / 25 - 0.01 <= check.strength <= 0.375, "found to 1/25 of the requested strength"
    assert calls == [1, 1, 4, 4] and check.descriptor_calls == 4


def test_the_search_starts_from_the_requested_strength_and_can_end_at_zero() -> None:
    describe, _ = _linear_describe(0.8)
    half = guard_identity(TILES, 0.5, IdentityGuardSettings(), describe, _same_thread)
    assert half.requested_strength == 0.5 and half.strength <= 0.375 and half.distance_after <= THRESHOLD
    describe, calls = _linear_describe(100.0)  # nothing above 0.003 passes
    nothing = guard_identity(TILES, 1.0, IdentityGuardSettings(max_rounds=1), describe, _same_thread)
    assert nothing.strength == 0.0 and nothing.distance_after == 0.0 and calls == [1, 1, 4]


def test_candidates_sit_side_by_side_with_their_own_box_and_points() -> None:
    blends = blend_candidates(TILES, [0.0, 0.5, 1.0])
    assert [int(blend.mean()) for blend in blends] == [0, 128, 255]
    points = np.arange(10, dtype=np.float32).reshape(5, 2)
    image, boxes, landmarks = side_by_side(blends, points)
    assert image.shape == (64, 192, 3) and np.array_equal(image[:, 64:128], blends[1])
    scale = 64 / 512
    assert boxes[2] == pytest.approx([128 + DLIB_BOX_512[0] * scale, DLIB_BOX_512[1] * scale,
                                      128 + DLIB_BOX_512[2] * scale, DLIB_BOX_512[3] * scale])
    assert landmarks is not None and np.array_equal(landmarks[1, :, 0], points[:, 0] + 64)
    assert np.array_equal(landmarks[1, :, 1], points[:, 1])
    assert describe_side(20) == 64 and describe_side(166.3) == 167 and describe_side(900) == 256


# -- configuration ----------------------------------------------------------------------


def test_config_reads_the_guard_and_refuses_bad_values() -> None:
    config = config_from_mapping({
        "identity_guard": {"threshold": "0.25", "max_rounds": 3},
        "presets": {"restored": {"upscaler": "realesr-animevideov3-x4", "face_model": "realesrgan-x4plus",
                                 "identity_guard": True}},
    })
    assert config.identity_guard == IdentityGuardSettings(threshold=0.25, max_rounds=3)
    assert config.identity_guard_for("restored") and not config.identity_guard_for("balanced")
    assert FACE_DESCRIPTOR in config.models_needed("restored")
    assert FACE_DESCRIPTOR not in config.models_needed("balanced"), "the bundled upscalers do not repaint faces"
    for bad in ({"identity_guard": {"threshold": 0}}, {"identity_guard": {"candidates_per_round": 0}},
                {"presets": {"balanced": {"identity_guard": "maybe"}}}):
        with pytest.raises(ConfigError, match="identity_guard"):
            config_from_mapping(bad)


def test_a_remote_detectors_server_is_where_the_descriptor_is_looked_for() -> None:
    config = Config(endpoints={"centerface": ("http://10.0.0.5:9000",)})
    assert config.endpoints[FACE_DESCRIPTOR] == ("http://10.0.0.5:9000",)
    own = Config(endpoints={"centerface": ("http://10.0.0.5:9000",), FACE_DESCRIPTOR: ("http://10.0.0.6:9000",)})
    assert own.endpoints[FACE_DESCRIPTOR] == ("http://10.0.0.6:9000",)


def test_the_detectors_child_also_serves_the_descriptor() -> None:
    supervisor = ModelServerSupervisor(["realesr-animevideov3-x4", "centerface", FACE_DESCRIPTOR],
                                       ModelServerSettings(compute_slots=0), companions={"centerface": (FACE_DESCRIPTOR,)})
    children = supervisor._children  # the command each child would get
    assert sorted(children) == ["centerface", "realesr-animevideov3-x4"]
    command = supervisor._command(children["centerface"])
    models = [command[index + 1] for index, argument in enumerate(command) if argument == "--model"]
    assert models == ["centerface", FACE_DESCRIPTOR]
    children["centerface"].url = "http://127.0.0.1:9100"
    assert supervisor.endpoints == {"centerface": ("http://127.0.0.1:9100",), FACE_DESCRIPTOR: ("http://127.0.0.1:9100",)}


# -- end to end: real detector and descriptor, faithful and person-changing restorers ----


class _TestRestorer(Runner):
    """A ×4 face model: bicubic, and with ``changes_person`` the face turned upside down."""

    holds_compute_slot = False

    def __init__(self, name: str, changes_person: bool) -> None:
        self.changes_person = changes_person
        self.spec = ModelSpec(name=name, platform="test", inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
                              outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),), max_batch_size=1,
                              parameters={"scale": 4})

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = image_batch(inputs)
        side = images.shape[1] * 4
        upscaled = np.stack([cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC) for image in images])
        return {"image": np.ascontiguousarray(upscaled[:, ::-1] if self.changes_person else upscaled)}


def _factory(name: str, settings: RunnerSettings) -> Runner:
    if name in ("faithful", "changes-person"):
        return _TestRestorer(name, changes_person=name == "changes-person")
    return create_runner(name, settings)


PRESETS = {
    "balanced": Preset("balanced", "sim-upscale-x2", "faithful"),
    "changed": Preset("changed", "sim-upscale-x2", "changes-person", face_colour=False, face_texture=False),
    "guarded": Preset("guarded", "sim-upscale-x2", "changes-person", face_colour=False, face_texture=False,
                      identity_guard=True),
}


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, bytes]:
    from skimage import data

    rgb = np.ascontiguousarray(data.astronaut())
    return rgb, encode_image(rgb, None, "png", None, None, 8)


@pytest.fixture
def models(start_model_server: Callable[..., ModelServer]) -> Config:
    faces = start_model_server(["centerface", FACE_DESCRIPTOR, "faithful", "changes-person"], runner_factory=_factory,
                               max_batch_size=1)
    background = start_model_server(["sim-upscale-x2"], sim_latency_ms=0)
    endpoints = {name: (faces.url,) for name in ("centerface", "faithful", "changes-person")}
    return Config(port=0, presets=PRESETS, endpoints={**endpoints, "sim-upscale-x2": (background.url,)})


def _identity_distance(output: np.ndarray, rgb: np.ndarray, landmarks: np.ndarray) -> float:
    """``chaoqing bench faces``' identity: the output shrunk to the input's size, both described
    at the 5 points dlib's predictor places on the input."""
    from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512

    descriptor = create_runner(FACE_DESCRIPTOR, RunnerSettings(threads=1))
    matrix = estimate_affine_matrix(landmarks, FFHQ_TEMPLATE_512)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    left, top, right, bottom = DLIB_BOX_512
    centre = inverse @ np.array([(left + right) / 2, (top + bottom) / 2, 1.0])
    half = (right - left) / scale / 2
    box = np.array([[centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half]], np.float32)
    reference = descriptor.run({"image": rgb, "boxes": box})
    shrunk = cv2.resize(output, rgb.shape[1::-1], interpolation=cv2.INTER_AREA)
    described = descriptor.run({"image": np.ascontiguousarray(shrunk), "boxes": box, "landmarks": reference["landmarks"]})
    return float(np.linalg.norm(described["descriptors"][0] - reference["descriptors"][0]))


def _enhance(config: Config, data: bytes, **options: Any) -> Any:
    remotes = RemoteModels.from_config(config)
    try:
        return enhance_photo(data, "image/png", EnhanceOptions(scale=2.0, **options), PipelineServices(config, remotes))
    finally:
        remotes.close()


def _decoded(result: Any) -> np.ndarray:
    return np.asarray(cv2.cvtColor(cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_COLOR),
                                   cv2.COLOR_BGR2RGB))


def _landmarks(config: Config, rgb: np.ndarray) -> np.ndarray:
    from chaoqing.gateway.stages.detect import faces_from_detections

    detector = create_runner("centerface", RunnerSettings(threads=1))
    return faces_from_detections(detector.run({"image": rgb}), 1.0, rgb.shape)[0].landmarks


@pytest.mark.slow
def test_a_restorer_that_changes_the_person_is_blended_back_until_it_passes(
    models: Config, astronaut: tuple[np.ndarray, bytes],
) -> None:
    rgb, data = astronaut
    unguarded = _enhance(models, data, preset="changed")
    guarded = _enhance(models, data, preset="changed", identity_guard=True)
    assert unguarded.faces_enhanced == guarded.faces_enhanced == 1
    assert unguarded.faces.identity_checks == (), "guard off: nothing is checked or changed"
    (report,) = guarded.faces.identity_checks
    assert report["guarded"] and report["distance_before"] > 0.6, report  # another person, by dlib's line
    assert report["distance_after"] <= THRESHOLD and 0 < report["strength"] < 1, report
    landmarks = _landmarks(models, rgb)
    before, after = (_identity_distance(_decoded(result), rgb, landmarks) for result in (unguarded, guarded))
    assert before > 0.6, "without the guard the output shows another person"
    # measured as `chaoqing bench faces` does, on the photo the client gets
    assert after <= THRESHOLD, (before, after, report)
    by_preset = _enhance(models, data, preset="guarded")  # the preset's own setting
    assert by_preset.faces.identity_checks == guarded.faces.identity_checks
    assert np.array_equal(_decoded(by_preset), _decoded(guarded))


@pytest.mark.slow
def test_a_faithful_restorer_passes_untouched(models: Config, astronaut: tuple[np.ndarray, bytes]) -> None:
    _, data = astronaut
    plain = _enhance(models, data, preset="balanced", identity_guard=False)
    checked = _enhance(models, data, preset="balanced", identity_guard=True)
    (report,) = checked.faces.identity_checks
    assert not report["guarded"] and report["strength"] == 1.0 and report["distance_before"] < THRESHOLD, report
    assert np.array_equal(_decoded(plain), _decoded(checked)), "a face that passes is pasted as it was"
    job = _job_result(checked)
    assert job.faces_identity == checked.faces.identity_checks
    assert JobResult(**json.loads(json.dumps(job.__dict__))).faces_identity == list(job.faces_identity)


@pytest.mark.slow
def test_the_response_says_so_per_face(models: Config, astronaut: tuple[np.ndarray, bytes]) -> None:
    _, data = astronaut
    server = GatewayServer(models, RemoteModels.from_config(models), watch_hub=False)
    server.start()
    try:
        def post(**params: str) -> requests.Response:
            return requests.post(f"{server.url}/v1/enhance", params=params, data=data,
                                 headers={"Content-Type": "image/png"}, timeout=120)

        answer = post(preset="changed", identity_guard="true")
        plain = post(preset="changed")
        bad = post(identity_guard="perhaps")
        document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    finally:
        server.stop(grace_s=1.0)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Faces-Identity-Guarded"] == "1"
    (report,) = json.loads(answer.headers["X-Faces-Identity"])
    assert report["face"] == 0 and report["guarded"] and report["distance_after"] <= THRESHOLD
    assert "X-Faces-Identity" in answer.headers["Access-Control-Expose-Headers"]
    assert plain.status_code == 200 and "X-Faces-Identity" not in plain.headers
    assert bad.status_code == 400
    parameters = {parameter["name"] for parameter in document["paths"]["/v1/enhance"]["post"]["parameters"]}
    assert "identity_guard" in parameters


@pytest.mark.slow
def test_a_descriptor_that_is_not_there_fails_the_face_not_the_photo(
    start_model_server: Callable[..., ModelServer], astronaut: tuple[np.ndarray, bytes],
) -> None:
    faces = start_model_server(["centerface", "changes-person"], runner_factory=_factory, max_batch_size=1)
    background = start_model_server(["sim-upscale-x2"], sim_latency_ms=0)
    config = Config(port=0, presets=PRESETS, endpoints={"centerface": (faces.url,), "changes-person": (faces.url,),
                                                        "sim-upscale-x2": (background.url,)})
    result = _enhance(config, astronaut[1], preset="guarded")
    assert result.faces_enhanced == 0 and len(result.face_errors) == 1, "kept as background: the safe side"
    assert "face-descriptor" in result.face_errors[0]


@pytest.mark.slow
def test_bench_faces_reports_the_guarded_rows(tmp_path: Any) -> None:
    from conftest import run_cli
    from PIL import Image
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()[20:236, 92:308]).save(photo)
    completed = run_cli("bench", "faces", str(photo), "--preset", "fast", "--face-models", "realesr-animevideov3-x4",
                        "--scale", "2", "--threads", "2", "--identity-guard", "--json", timeout=280)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    rows = {row["model"]: row for row in document["results"]}
    assert list(rows) == ["lanczos", "realesr-animevideov3-x4", "realesr-animevideov3-x4, guarded"]
    guarded = rows["realesr-animevideov3-x4, guarded"]
    assert guarded["guard_strength"] == 1.0 and guarded["guard_distance_after"] <= THRESHOLD, guarded
    assert guarded["identity"] == pytest.approx(rows["realesr-animevideov3-x4"]["identity"]), "a face that passes"
    assert document["settings"]["identity_guard"] == THRESHOLD
    assert any(target["name"] == "realesr-animevideov3-x4, guarded worst identity distance"
               for target in document["targets"])


def test_a_preset_with_a_face_restorer_guards_by_default(tmp_path: Any) -> None:
    from chaoqing.config import FACE_RESTORER, UserModel

    (tmp_path / "gfpgan.onnx").write_bytes(b"")  # the config checks the file is there, the model server reads it
    restorer = UserModel("gfpgan", str(tmp_path / "gfpgan.onnx"), kind=FACE_RESTORER, runtime="onnxruntime")
    presets = {"restored": Preset("restored", "realesr-animevideov3-x4", "gfpgan"),
               "restored-unguarded": Preset("restored-unguarded", "realesr-animevideov3-x4", "gfpgan",
                                            identity_guard=False),
               "balanced": Preset("balanced", "realesr-animevideov3-x4", "realesrgan-x4plus")}
    config = Config(presets=presets, models={"gfpgan": restorer})
    assert config.identity_guard_for("restored") and not config.identity_guard_for("restored-unguarded")
    assert not config.identity_guard_for("balanced")
    assert config.models_needed("restored")[-1] == FACE_DESCRIPTOR


def test_a_face_model_with_its_own_template_is_compared_at_the_detectors_geometry() -> None:
    """A restorer that aligns its own way (arcface 128 puts the face smaller in the crop): its
    face is warped onto the detector's grid through its paste-back matrix, so a faithful one
    gives the input face back."""
    from skimage import data

    from chaoqing.gateway.stages.composite import EnhancedFace
    from chaoqing.gateway.stages.detect import DetectedFace
    from chaoqing.gateway.stages.enhance_faces import align_face
    from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512, invert_affine_matrix
    from chaoqing.gateway.stages.identity import identity_tiles

    rgb = np.ascontiguousarray(data.astronaut())
    landmarks = FFHQ_TEMPLATE_512 * 0.35 + np.array([140.0, 30.0])  # a face ~180 px wide in the photo
    face = DetectedFace(0, (140.0, 30.0, 320.0, 210.0), 1.0, landmarks)
    own_template = FFHQ_TEMPLATE_512 * 0.75 + 64  # the face smaller and centred, as arcface's is
    crop = align_face(rgb, face, own_template, 128)
    restored = cv2.resize(crop.crop, (512, 512), interpolation=cv2.INTER_CUBIC)
    enhanced = EnhancedFace(restored, invert_affine_matrix(crop.affine_matrix, 2.0, 4.0), 2.0)
    tiles = identity_tiles(rgb, landmarks, FFHQ_TEMPLATE_512, enhanced, 180)
    difference = np.abs(tiles.reference.astype(float) - tiles.restored.astype(float))
    assert tiles.restored.shape == tiles.reference.shape == (180, 180, 3)
    assert difference[30:150, 30:150].mean() < 6, "the same face at the same place (a 128 px crop's blur aside)"
