"""Face restorers from files ([models.NAME] kind = "face-restorer"): the config, the runner, the
start-up checks, and the whole path through a model server and the gateway.

Nothing is downloaded. The ONNX files are built with onnx.helper with FaceFusion's interface
(``input`` float32 [1,3,S,S] in [-1, 1] → ``output`` the same; CodeFormer's export adds
``weight``, double [1]) and a per-channel affine operation whose exact output numpy computes;
the .pth file is a state dict of spandrel's own RestoreFormer class with few channels and
random weights. The pixels the gateway pastes are checked against the same crop, operation,
inverse warp and soft mask computed here with the gateway's own stage functions.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import run_cli
from PIL import Image
from skimage import data

from chaoqing.config import (
    DEFAULT_FACE_FIDELITY,
    Config,
    JobSettings,
    Preset,
    RemoteSettings,
    UserModel,
    config_from_mapping,
    user_models_toml,
)
from chaoqing.errors import BadModelResponse, ConfigError, RunnerError
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.pipeline import EnhanceOptions, face_match_settings
from chaoqing.gateway.remote import RemoteModel, RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.gateway.stages.composite import composite_face_pastes_in_place, prepare_face_paste
from chaoqing.gateway.stages.detect import (
    DETECTOR_OUTPUTS,
    alignment_template,
    faces_from_detections,
)
from chaoqing.gateway.stages.enhance_faces import (
    ARCFACE_128_TEMPLATE_512,
    align_face,
    enhanced_face_from,
    face_model_inputs,
    face_model_template,
)
from chaoqing.gateway.stages.face_geometry import (
    DLIB_5_TEMPLATE_512,
    FFHQ_TEMPLATE_512,
    estimate_affine_matrix,
)
from chaoqing.gateway.stages.face_match import match_paste_to_background
from chaoqing.modelserver.app import ModelServer
from chaoqing.modelserver.runners.face_restorer import FaceRestorerRunner
from chaoqing.modelserver.runners.user_models import create_user_runner

ONE_LEVEL = 1
FACE_SIDE = 512  # FaceFusion's exports: GFPGAN 1.4, CodeFormer, GPEN-BFR-512, RestoreFormer++
# The known operation, per RGB channel, on [-1, 1]: y = gain · x (· weight) + offset
GAINS = np.array([0.5, -0.8, 0.9], dtype=np.float32)
OFFSETS = np.array([0.1, 0.05, -0.2], dtype=np.float32)
PHOTO_SIDE = 192
SCALE = 2


# --- files the tests make ---------------------------------------------------------------------


def write_onnx_restorer(path: Path, *, side: int | str = FACE_SIDE, weight: bool = False, channels: int = 3,
                        image_rank: int = 4, extra_input: bool = False, halve_output: bool = False) -> Path:
    """A face restorer with FaceFusion's interface: ``input`` float32 [1,C,side,side] → ``output``
    GAINS · x (· weight) + OFFSETS; ``weight`` double [1] when asked (CodeFormer's export)."""
    import onnx
    from onnx import TensorProto, helper

    shape: list[int | str] = [1, channels, side, side] if image_rank == 4 else [1, channels]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    nodes = [helper.make_node("Mul", ["input", "gains"], ["scaled"])]
    if weight:
        inputs.append(helper.make_tensor_value_info("weight", TensorProto.DOUBLE, [1]))
        nodes += [helper.make_node("Cast", ["weight"], ["weight_float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["scaled", "weight_float"], ["weighted"])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, side, side]))
    nodes.append(helper.make_node("Add", ["weighted" if weight else "scaled", "offsets"],
                                  ["halved_input" if halve_output else "output"]))
    if halve_output:
        nodes.append(helper.make_node("AveragePool", ["halved_input"], ["output"], kernel_shape=[2, 2],
                                      strides=[2, 2]))
    constant_shape = [1, channels, 1, 1] if image_rank == 4 else [1, channels]
    graph = helper.make_graph(
        nodes, "tiny-face-restorer", inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [helper.make_tensor("gains", TensorProto.FLOAT, constant_shape, np.resize(GAINS, channels)),
         helper.make_tensor("offsets", TensorProto.FLOAT, constant_shape, np.resize(OFFSETS, channels))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def restore_by_numpy(face: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """What the ONNX restorer gives for ``face`` (UINT8 [S,S,3]), with FaceFusion's pre- and
    post-processing: x / 127.5 - 1, the operation, clip to [-1, 1], round((y + 1) · 127.5)."""
    planes = face.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    restored = planes * GAINS * np.float32(weight) + OFFSETS
    return np.rint((np.clip(restored, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def restoreformer_module() -> Any:
    """spandrel's RestoreFormer with few channels (spandrel reads them back from the state
    dict), random weights scaled so the output mostly stays inside [-1, 1]."""
    import torch

    from chaoqing.modelserver.runners.spandrel_backend import import_spandrel

    import_spandrel()
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(11)
    module = RestoreFormer(n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32)
    with torch.no_grad():
        module.decoder.conv_out.weight.mul_(0.2)
    return module.eval()


def restore_by_torch(module: Any, face: np.ndarray) -> np.ndarray:
    """``module`` run directly on ``face`` as the original repositories call it: [-1, 1] in,
    its first output clipped to [-1, 1] and back to 8 bits."""
    import torch

    planes = face.astype(np.float32).transpose(2, 0, 1)[np.newaxis] / np.float32(127.5) - np.float32(1.0)
    with torch.inference_mode():
        output = module(torch.from_numpy(planes))[0].numpy()[0]
    return np.rint((np.clip(output, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)


def levels_apart(first: np.ndarray, second: np.ndarray) -> int:
    assert first.shape == second.shape, (first.shape, second.shape)
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The astronaut at PHOTO_SIDE² (the simulated detector lays one face over its middle)."""
    return np.ascontiguousarray(cv2.resize(data.astronaut(), (PHOTO_SIDE, PHOTO_SIDE), interpolation=cv2.INTER_AREA))


def random_faces(count: int, side: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def face_restorer(name: str, path: Path, **table: Any) -> UserModel:
    return UserModel(name, str(path), kind="face-restorer", **table)


# --- the config --------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_face_restorer_table_takes_its_keys_and_reads_back_as_it_was(tmp_path: Path) -> None:
    path = write_onnx_restorer(tmp_path / "codeformer.onnx", weight=True)
    config = config_from_mapping({
        "models": {"codeformer": {"path": str(path), "kind": "face-restorer", "weight": 0.7,
                                  "license": "S-Lab-1.0", "commercial_use": "no"},
                   "gpen": {"path": str(path), "kind": "face-restorer", "template": "arcface-128", "input_size": 256}},
        "presets": {"restore": {"upscaler": "realesr-animevideov3-x4", "face_model": "codeformer",
                                "face_fidelity": 0.9}},
    })
    codeformer, gpen = config.models["codeformer"], config.models["gpen"]
    assert (codeformer.template, codeformer.input_size, codeformer.weight) == ("ffhq-512", 0, 0.7)
    assert (gpen.template, gpen.input_size, gpen.weight) == ("arcface-128", 256, DEFAULT_FACE_FIDELITY)
    assert config.presets["restore"].face_fidelity == 0.9 and config.presets["balanced"].face_fidelity is None
    written = tmp_path / "models.toml"
    written.write_text(user_models_toml(config.models.values()), encoding="utf-8")
    import tomllib

    again = config_from_mapping(tomllib.loads(written.read_text(encoding="utf-8")))
    assert dict(again.models) == dict(config.models)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("table", "message"), [
    ({"template": "ffhq-1024"}, r"^models\.face\.template: 'ffhq-1024' is not one of ffhq-512, arcface-128$"),
    ({"weight": 1.5}, r"^models\.face\.weight: 1\.5 is not a number in \[0, 1\]$"),
    ({"weight": "high"}, r"^models\.face\.weight: 'high' is not a number in \[0, 1\]$"),
    ({"tile_size": 128}, r"^models\.face\.tile_size: kind = \"face-restorer\" takes no tile_size$"),
    ({"scale": 2}, r"^models\.face\.scale: a face restorer gives the face at the size it takes \(scale 1\)$"),
    ({"runtime": "openvino"}, (r"^models\.face\.runtime: a face restorer runs on onnxruntime or torch \(\.onnx, "
                              r"\.pth, \.safetensors\), not openvino$")),
    ({"input_size": 4096}, r"^models\.face\.input_size: 4096 is not 0 \(the file's\) to 2048$"),
    ({"kind": "upscaler", "template": "arcface-128"}, r"^models\.face\.template: kind = \"upscaler\" takes no template$"),
])
def test_a_face_restorer_table_that_cannot_be_right_is_refused_naming_its_key(
        tmp_path: Path, table: dict[str, Any], message: str) -> None:
    path = write_onnx_restorer(tmp_path / "face.onnx")
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"models": {"face": {"path": str(path), "kind": "face-restorer", **table}}})


@pytest.mark.timeout(10)
def test_a_preset_face_fidelity_outside_0_to_1_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^presets\.p\.face_fidelity: 2 is not a number in \[0, 1\]$"):
        config_from_mapping({"presets": {"p": {"upscaler": "realesr-animevideov3-x4", "face_fidelity": 2}}})


# --- the runner and its start-up checks ------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_onnx_restorer_with_facefusions_interface_runs_exactly_as_its_operation_says(tmp_path: Path) -> None:
    runner = create_user_runner(face_restorer("gfpgan", write_onnx_restorer(tmp_path / "gfpgan.onnx"),
                                              license="Apache-2.0"), "onnxruntime", "cpu")
    assert isinstance(runner, FaceRestorerRunner)
    metadata = runner.spec.as_metadata()
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, FACE_SIDE, FACE_SIDE, 3]}]
    assert metadata["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, FACE_SIDE, FACE_SIDE, 3]}]
    parameters = metadata["parameters"]
    assert (parameters["scale"], parameters["face_template"], parameters["input_size"]) == (1, "ffhq-512", FACE_SIDE)
    assert parameters["license"] == "Apache-2.0" and "fidelity_weight" not in parameters
    faces = random_faces(2, FACE_SIDE)  # a batch of two through a file whose batch is fixed at 1
    restored = runner.run({"image": faces})["image"]
    for face, output in zip(faces, restored, strict=True):
        assert levels_apart(output, restore_by_numpy(face)) <= ONE_LEVEL
    runner.close()


@pytest.mark.timeout(30)
def test_a_restorer_with_a_weight_input_takes_each_faces_weight_or_its_default(tmp_path: Path) -> None:
    model = face_restorer("codeformer", write_onnx_restorer(tmp_path / "codeformer.onnx", side="size", weight=True),
                          input_size=128, weight=0.25)
    runner = create_user_runner(model, "onnxruntime", "cpu")
    assert isinstance(runner, FaceRestorerRunner)
    metadata = runner.spec.as_metadata()
    assert metadata["inputs"][1] == {"name": "weight", "datatype": "FP32", "shape": [-1, 1]}
    assert metadata["parameters"]["optional_inputs"] == ["weight"]
    assert metadata["parameters"]["fidelity_weight"] == 0.25 and metadata["parameters"]["input_size"] == 128
    faces = random_faces(3, 128)
    weights = np.array([[0.9], [0.1], [0.9]], dtype=np.float32)
    restored = runner.run({"image": faces, "weight": weights})["image"]
    for face, weight, output in zip(faces, weights[:, 0], restored, strict=True):
        assert levels_apart(output, restore_by_numpy(face, float(weight))) <= ONE_LEVEL
    by_default = runner.run({"image": faces[:1]})["image"][0]
    assert levels_apart(by_default, restore_by_numpy(faces[0], 0.25)) <= ONE_LEVEL
    assert levels_apart(by_default, restore_by_numpy(faces[0], 0.9)) > ONE_LEVEL  # the weight matters
    with pytest.raises(RunnerError, match=r"^input 'image' must be 128×128 faces, got 64×64$"):
        runner.run({"image": random_faces(1, 64)})


@pytest.mark.timeout(30)
def test_each_wrong_onnx_restorer_is_said_at_start_up_in_one_line_naming_it(tmp_path: Path) -> None:
    def load(path: Path, **table: Any) -> None:
        create_user_runner(face_restorer("face", path, **table), "onnxruntime", "cpu")

    missing = tmp_path / "missing.onnx"
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {missing} does not exist$"):
        load(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {garbage} is not an ONNX model onnxruntime opens"):
        load(garbage)
    flat = write_onnx_restorer(tmp_path / "flat.onnx", image_rank=2)
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {flat} has no single 4-D float input \(it has "
                                          r"input tensor\(float\) \[1, 3\]\); a face restorer takes float32 "
                                          r"\[N,3,S,S\] RGB in \[-1, 1\]"):
        load(flat)
    four_channels = write_onnx_restorer(tmp_path / "rgba.onnx", channels=4)
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {four_channels} takes 4 channels "
                                          r"\(\[1, 4, 512, 512\]\); a face restorer takes RGB, \[N,3,S,S\]$"):
        load(four_channels)
    masked = write_onnx_restorer(tmp_path / "masked.onnx", side=64, extra_input=True)
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {masked} has an input mask tensor\(float\) "
                                          r"\[1, 1, 64, 64\]; a face restorer takes the face and at most a scalar"):
        load(masked)
    halved = write_onnx_restorer(tmp_path / "halved.onnx", side=64, halve_output=True)
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {halved} turned a \[1,3,64,64\] face into "
                                          r"\[1, 3, 32, 32\]; a face restorer gives the face back at its size$"):
        load(halved)
    with pytest.raises(RunnerError, match=rf"^models\.face\.input_size: 256, but {halved} takes 64×64 faces$"):
        load(halved, input_size=256)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_spandrel_restoreformer_state_dict_runs_as_the_network_it_holds(tmp_path: Path) -> None:
    import torch

    module = restoreformer_module()
    path = tmp_path / "restoreformer.pth"
    torch.save(module.state_dict(), path)
    runner = create_user_runner(face_restorer("restoreformer", path, input_size=64), "torch", "cpu", threads=2)
    assert isinstance(runner, FaceRestorerRunner)
    parameters = runner.spec.as_metadata()["parameters"]
    assert parameters["architecture"] == "RestoreFormer" and parameters["input_size"] == 64
    assert runner.spec.platform == "pytorch_libtorch" and "fidelity_weight" not in parameters
    faces = random_faces(2, 64)
    restored = runner.run({"image": faces})["image"]
    for face, output in zip(faces, restored, strict=True):
        assert levels_apart(output, restore_by_torch(module, face)) <= ONE_LEVEL
    runner.close()
    with pytest.raises(RunnerError, match=rf"^models\.restoreformer\.input_size: {path} is a RestoreFormer model, "
                                          r"which does not take 80×80 faces"):
        create_user_runner(face_restorer("restoreformer", path, input_size=80), "torch", "cpu")


@pytest.mark.timeout(30)
def test_a_pytorch_file_that_is_no_face_model_is_refused_as_a_face_restorer(tmp_path: Path) -> None:
    import torch

    from chaoqing.modelserver.runners.spandrel_backend import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    path = tmp_path / "compact.pth"
    torch.save(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(), path)
    with pytest.raises(RunnerError, match=rf"^models\.face\.path: {path} is a RealESRGAN Compact model for SR, not a "
                                          r"face restorer \(kind = \"face-restorer\" takes FaceSR models"):
        create_user_runner(face_restorer("face", path), "torch", "cpu")


# --- the gateway's side ----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_model_template_carries_the_detectors_landmarks_into_its_own_layout() -> None:
    assert face_model_template(FFHQ_TEMPLATE_512, {}, "m") is FFHQ_TEMPLATE_512
    assert face_model_template(DLIB_5_TEMPLATE_512, {"face_template": "ffhq-512"}, "m") is DLIB_5_TEMPLATE_512
    assert face_model_template(FFHQ_TEMPLATE_512, {"face_template": "arcface-128"}, "m") is ARCFACE_128_TEMPLATE_512
    carried = face_model_template(DLIB_5_TEMPLATE_512, {"face_template": "arcface-128"}, "m")
    # dlib's points of a face, aligned to the carried template, put FFHQ's points where arcface has them
    ffhq_to_arcface = estimate_affine_matrix(FFHQ_TEMPLATE_512, ARCFACE_128_TEMPLATE_512)
    expected = DLIB_5_TEMPLATE_512 @ ffhq_to_arcface[:, :2].T + ffhq_to_arcface[:, 2]
    np.testing.assert_allclose(carried, expected)
    with pytest.raises(BadModelResponse, match=r"^face model m: face_template 'ffhq-2048' is not one of"):
        face_model_template(FFHQ_TEMPLATE_512, {"face_template": "ffhq-2048"}, "m")


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def enhance(gateway_url: str, image: np.ndarray, preset: str, **query: str) -> np.ndarray:
    parameters = {"scale": str(SCALE), "format": "png", "preset": preset, "face_colour": "false",
                  "face_texture": "false", **query}
    response = requests.post(f"{gateway_url}/v1/enhance", params=parameters, data=png_bytes(image),
                             headers={"Content-Type": "image/png"}, timeout=120)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as output:
        return np.asarray(output.convert("RGB"))


def expected_composite(detector_url: str, server_url: str, photo: np.ndarray, background: np.ndarray, model_name: str,
                       restore: Callable[[np.ndarray], np.ndarray], preset: Preset) -> np.ndarray:
    """The gateway's answer computed here: the detector's faces, each aligned to the face
    model's template at its size, the known operation, the inverse warp and soft mask."""
    detector = RemoteModel("sim-detector", [detector_url], RemoteSettings())
    face_model = RemoteModel(model_name, [server_url], RemoteSettings())
    deadline = time.monotonic() + 30
    try:
        detections = detector.infer({"image": photo}, DETECTOR_OUTPUTS, deadline)
        template = alignment_template(detector.metadata(deadline).parameters, "sim-detector")
        face_metadata = face_model.metadata(deadline)
    finally:
        detector.close()
        face_model.close()
    faces = faces_from_detections(detections, 1.0, photo.shape)
    assert faces
    model_template = face_model_template(template, face_metadata.parameters, model_name)
    side = face_metadata.find_input("image").shape[1]  # type: ignore[union-attr]
    settings = face_match_settings(EnhanceOptions(face_colour=False, face_texture=False), preset)
    pastes = []
    for face in faces:
        crop = align_face(photo, face, model_template, side)
        enhanced = enhanced_face_from(crop, restore(crop.crop)[np.newaxis], float(SCALE), model_name)
        paste = prepare_face_paste(enhanced, background.shape)
        pastes.append(match_paste_to_background(paste, background, settings, float(SCALE))[0])
    canvas = background.copy()
    composite_face_pastes_in_place(canvas, pastes)
    return canvas


def _started_gateway(config: Config, restorers_url: str, simulators_url: str) -> GatewayServer:
    """A gateway on ``config``: its user models served at ``restorers_url``, the simulated
    detector and ×2 background at ``simulators_url``; started."""
    config = config.replace(endpoints={**{name: (restorers_url,) for name in config.models},
                                       **{name: (simulators_url,) for name in ("sim-detector", "sim-upscale-x2")}})
    metrics = GatewayMetrics()
    gateway = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
    gateway.start()
    return gateway


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_onnx_restorers_paste_through_the_gateway_exactly_what_their_operation_predicts(
        tmp_path: Path, photo: np.ndarray, start_model_server: Callable[..., ModelServer]) -> None:
    models = {
        "gfpgan": face_restorer("gfpgan", write_onnx_restorer(tmp_path / "gfpgan.onnx")),
        "codeformer": face_restorer("codeformer", write_onnx_restorer(tmp_path / "codeformer.onnx", weight=True),
                                    weight=0.8),
        "gpen-256": face_restorer("gpen-256", write_onnx_restorer(tmp_path / "gpen.onnx", side="size"),
                                  template="arcface-128", input_size=256),
    }
    simulators = start_model_server(["sim-detector", "sim-upscale-x2"], sim_faces=1)
    server = start_model_server(list(models), user_models=models, ready_timeout_s=60)
    # the restorer's own pixels: no identity guard (on by default for restorers; tests/test_identity_guard.py)
    presets = {name: Preset(name, "sim-upscale-x2", name, identity_guard=False) for name in models}
    presets["codeformer-faithful"] = Preset("codeformer-faithful", "sim-upscale-x2", "codeformer", face_fidelity=0.6,
                                            identity_guard=False)
    config = Config(port=0, detector="sim-detector", preset="gfpgan", models=models, presets=presets,
                    jobs=JobSettings(spool_dir=str(tmp_path / "spool")))
    gateway = _started_gateway(config, server.url, simulators.url)
    try:
        background = enhance(gateway.url, photo, "gfpgan", faces="false")
        answers = {
            ("gfpgan", 1.0): enhance(gateway.url, photo, "gfpgan"),
            ("gpen-256", 1.0): enhance(gateway.url, photo, "gpen-256"),
            ("codeformer", 0.8): enhance(gateway.url, photo, "codeformer"),  # the model's default weight
            ("codeformer", 0.3): enhance(gateway.url, photo, "codeformer", face_fidelity="0.3"),
            ("codeformer-faithful", 0.6): enhance(gateway.url, photo, "codeformer-faithful"),
        }
        refused = requests.post(f"{gateway.url}/v1/enhance", params={"face_fidelity": "1.5"}, data=png_bytes(photo),
                                headers={"Content-Type": "image/png"}, timeout=30)
        (tmp_path / "photo.png").write_bytes(png_bytes(photo))
        completed = run_cli("enhance", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--server", gateway.url,
                            "--preset", "codeformer", "--scale", str(SCALE), "--face-fidelity", "0.3",
                            "--no-face-colour", "--no-face-texture", timeout=60)
    finally:
        gateway.stop(grace_s=1.0)
    assert refused.status_code == 400 and "face_fidelity must be between 0 and 1" in refused.text
    for (preset_name, weight), answer in answers.items():
        model_name = presets[preset_name].face_model
        assert model_name is not None
        expected = expected_composite(simulators.url, server.url, photo, background, model_name,
                                      lambda face, weight=weight: restore_by_numpy(face, weight), presets[preset_name])
        assert levels_apart(answer, expected) <= ONE_LEVEL, (preset_name, weight)
        assert levels_apart(answer, background) > 10, (preset_name, weight)  # a face was pasted at all
    assert levels_apart(answers[("codeformer", 0.3)], answers[("codeformer", 0.8)]) > 10
    assert completed.returncode == 0, completed.stderr
    with Image.open(tmp_path / "out" / "photo.png") as through_cli:  # --face-fidelity as the query's
        assert levels_apart(np.asarray(through_cli.convert("RGB")), answers[("codeformer", 0.3)]) == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_spandrel_restorer_pastes_through_the_gateway_what_the_network_gives(
        tmp_path: Path, photo: np.ndarray, start_model_server: Callable[..., ModelServer]) -> None:
    import torch

    module = restoreformer_module()
    path = tmp_path / "restoreformer.pth"
    torch.save(module.state_dict(), path)
    models = {"restoreformer": face_restorer("restoreformer", path, input_size=64)}
    simulators = start_model_server(["sim-detector", "sim-upscale-x2"], sim_faces=1)
    server = start_model_server(list(models), user_models=models, ready_timeout_s=60)
    preset = Preset("restore", "sim-upscale-x2", "restoreformer", identity_guard=False)  # the network's own pixels
    config = Config(port=0, detector="sim-detector", preset="restore", models=models, presets={"restore": preset})
    gateway = _started_gateway(config, server.url, simulators.url)
    try:
        background = enhance(gateway.url, photo, "restore", faces="false")
        answer = enhance(gateway.url, photo, "restore")
    finally:
        gateway.stop(grace_s=1.0)
    expected = expected_composite(simulators.url, server.url, photo, background, "restoreformer",
                                  lambda face: restore_by_torch(module, face), preset)
    assert levels_apart(answer, expected) <= ONE_LEVEL
    assert levels_apart(answer, background) > 10


@pytest.mark.timeout(10)
def test_the_gateway_sends_a_weight_only_to_a_model_that_takes_one() -> None:
    from chaoqing.gateway.stages.enhance_faces import FaceCrop

    crop = FaceCrop(0, np.zeros((8, 8, 3), dtype=np.uint8), np.eye(2, 3))
    assert set(face_model_inputs(crop, False, 0.4)) == {"image"}
    assert set(face_model_inputs(crop, True, None)) == {"image"}  # the model's own default
    inputs = face_model_inputs(crop, True, 0.4)
    assert inputs["image"].shape == (1, 8, 8, 3)
    assert inputs["weight"].dtype == np.float32 and inputs["weight"].tolist() == [[pytest.approx(0.4)]]
