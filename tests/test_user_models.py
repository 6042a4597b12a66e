"""Users' own model files ([models.NAME]): the config, the runners, and the whole path.

Nothing is downloaded: the PyTorch files are state dicts of spandrel's own architecture classes
(Real-ESRGAN's Compact, SPAN) with few channels and random weights, saved by the test; the ONNX
file is built with onnx.helper (a 1×1 convolution then DepthToSpace), whose exact output numpy
computes. Each serves through a model server and a gateway whose preset names it, and its
pixels are what running the same network directly gives.
"""

from __future__ import annotations

import io
import json
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import run_cli
from PIL import Image
from skimage import data

from chaoqing.config import (
    UNKNOWN_LICENSE,
    Config,
    ModelServerSettings,
    Preset,
    RemoteSettings,
    UserModel,
    config_from_mapping,
    load_config,
    user_models_toml,
)
from chaoqing.errors import ConfigError, RunnerError, SupervisorError
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModel, RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.gateway.supervisor import ModelServerSupervisor, _write_user_models
from chaoqing.modelserver.app import ModelServer, ModelServerOptions
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.modelserver.runners.upscaler import EDGE_PADDING_PX, UpscalerRunner

ONE_LEVEL = 1  # float rounding between two computations of the same network (channels_last, fused ops)
UINT8_MAX = 255.0


# --- files the tests make ---------------------------------------------------------------------


def spandrel_module(architecture: str) -> Any:
    """A small network of one of spandrel's own architecture classes, random weights, in eval mode."""
    import torch

    from chaoqing.modelserver.runners.spandrel_backend import import_spandrel

    import_spandrel()
    torch.manual_seed(7)
    if architecture == "Compact":
        from spandrel.architectures.Compact import Compact

        module = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    elif architecture == "SPAN":
        from spandrel.architectures.SPAN import SPAN

        module = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4)
    else:  # a grey-scale Compact: a network chaoqing refuses
        from spandrel.architectures.Compact import Compact

        module = Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2)
    return module.eval()


def save_state_dict(module: Any, path: Path) -> Path:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(module.state_dict(), str(path))
    else:
        torch.save(module.state_dict(), path)
    return path


# The ONNX upscaler: out = DepthToSpace_2(conv1x1(x)), 3 → 12 channels; CRD order (PyTorch's pixel_shuffle)
ONNX_SCALE = 2
ONNX_WEIGHTS = np.random.default_rng(3).uniform(-0.3, 0.6, (3 * ONNX_SCALE**2, 3)).astype(np.float32)
ONNX_BIAS = np.random.default_rng(4).uniform(-0.1, 0.2, 3 * ONNX_SCALE**2).astype(np.float32)


def write_onnx_upscaler(path: Path, *, fixed_side: int | None = None, input_type: int | None = None) -> Path:
    """The 1×1 convolution + DepthToSpace upscaler, input ``pixels`` [N,3,H,W] (H, W fixed to
    ``fixed_side`` when given), output ``upscaled``."""
    import onnx
    from onnx import TensorProto, helper

    element = TensorProto.FLOAT if input_type is None else input_type
    side: list[int | str] = [fixed_side, fixed_side] if fixed_side else ["height", "width"]
    cast = [] if input_type is None else [helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        [
            *cast,
            helper.make_node("Conv", ["as_float" if cast else "pixels", "weights", "bias"], ["features"],
                             kernel_shape=[1, 1]),
            helper.make_node("DepthToSpace", ["features"], ["upscaled"], blocksize=ONNX_SCALE, mode="CRD"),
        ],
        "tiny-upscaler",
        [helper.make_tensor_value_info("pixels", element, ["batch", 3, *side])],
        [helper.make_tensor_value_info("upscaled", TensorProto.FLOAT, ["batch", 3, None, None])],
        [
            helper.make_tensor("weights", TensorProto.FLOAT, [3 * ONNX_SCALE**2, 3, 1, 1], ONNX_WEIGHTS.ravel()),
            helper.make_tensor("bias", TensorProto.FLOAT, [3 * ONNX_SCALE**2], ONNX_BIAS),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def onnx_upscaler_by_numpy(image: np.ndarray) -> np.ndarray:
    """What the ONNX upscaler gives for ``image`` (UINT8 [H,W,3]), computed with numpy, as 8 bits."""
    planes = image.astype(np.float32).transpose(2, 0, 1) / np.float32(UINT8_MAX)  # [3,H,W]
    features = np.einsum("ok,khw->ohw", ONNX_WEIGHTS, planes) + ONNX_BIAS[:, None, None]  # [12,H,W]
    _, height, width = planes.shape
    # CRD: channel c·s² + i·s + j goes to pixel (h·s + i, w·s + j) of channel c
    blocks = features.reshape(3, ONNX_SCALE, ONNX_SCALE, height, width).transpose(0, 3, 1, 4, 2)
    upscaled = blocks.reshape(3, height * ONNX_SCALE, width * ONNX_SCALE)
    return np.rint(np.clip(upscaled * UINT8_MAX, 0, UINT8_MAX)).astype(np.uint8).transpose(1, 2, 0)


def torch_module_upscale(module: Any, image: np.ndarray, scale: int) -> np.ndarray:
    """``module`` run directly on ``image`` (UINT8 [H,W,3]) as the upscaler runner feeds a whole
    image: edges replicated by EDGE_PADDING_PX, cropped after, clamped and rounded to 8 bits."""
    import torch

    planes = image.astype(np.float32).transpose(2, 0, 1)[np.newaxis] / np.float32(UINT8_MAX)
    padded = np.pad(planes, ((0, 0), (0, 0), (EDGE_PADDING_PX,) * 2, (EDGE_PADDING_PX,) * 2), mode="edge")
    with torch.inference_mode():
        output = module(torch.from_numpy(padded)).numpy()[0]
    margin = EDGE_PADDING_PX * scale
    core = output[:, margin:-margin, margin:-margin]
    return np.rint(np.clip(core * UINT8_MAX, 0, UINT8_MAX)).astype(np.uint8).transpose(1, 2, 0)


def levels_apart(first: np.ndarray, second: np.ndarray) -> int:
    assert first.shape == second.shape, (first.shape, second.shape)
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 40×36 crop of the astronaut (around her eye): real pixels, small enough for one pass."""
    return np.ascontiguousarray(data.astronaut()[90:126, 200:240])


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def enhance_through_gateway(gateway_url: str, image: np.ndarray, scale: int, preset: str) -> np.ndarray:
    response = requests.post(f"{gateway_url}/v1/enhance?scale={scale}&faces=false&format=png&preset={preset}",
                             data=png_bytes(image), headers={"Content-Type": "image/png"}, timeout=120)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as output:
        return np.asarray(output.convert("RGB"))


def start_gateway(config: Config, endpoints: dict[str, tuple[str, ...]]) -> GatewayServer:
    metrics = GatewayMetrics()
    config = config.replace(endpoints=endpoints)
    gateway = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
    gateway.start()
    return gateway


# --- the config --------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_model_tables_take_defaults_and_paths_from_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "4x-Mine.pth").write_bytes(b"not read by the config")
    (tmp_path / "tiny.onnx").write_bytes(b"")
    (tmp_path / "net.param").write_text("7767517\n")
    (tmp_path / "net.bin").write_bytes(b"")
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text("""
[models.mine]
path = "weights/4x-Mine.pth"
license = "CC-BY-4.0"
source = "https://example.org/4x-Mine"
commercial_use = "yes"
tile_size = 192
[models.tiny]
path = "tiny.onnx"
runtime = "openvino"
scale = 2
[models.old-ncnn]
path = "net.param"
[presets.mine]
upscaler = "mine"
face_model = "tiny"
""")
    config = load_config(config_file, environ={})
    mine, tiny, old = config.models["mine"], config.models["tiny"], config.models["old-ncnn"]
    assert mine.path == str(tmp_path / "weights" / "4x-Mine.pth") and mine.runtime == "torch"
    assert (mine.license, mine.commercial_use, mine.tile_size, mine.scale) == ("CC-BY-4.0", "yes", 192, 0)
    assert tiny.runtime == "openvino" and tiny.scale == 2 and tiny.license == UNKNOWN_LICENSE
    assert old.runtime == "ncnn" and old.files == (tmp_path / "net.param", tmp_path / "net.bin")
    assert config.presets["mine"].upscaler == "mine" and config.models_needed("mine") == ("mine", "tiny",
                                                                                          config.detector)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("table, message", [
    ({"path": "absent.pth"}, r"^models\.mine\.path: .*absent\.pth does not exist$"),
    ({"path": "weights.h5"}, (r"^models\.mine\.path: .*weights\.h5 is not a model file chaoqing loads \(expected "
                             r"\.pth, \.pt, \.ckpt, \.safetensors, \.onnx, \.param")),
    ({"path": "model.pth", "runtime": "onnxruntime"}, (r"^models\.mine\.runtime: onnxruntime does not load \.pth "
                                                      r"files; it takes torch$")),
    ({"path": "model.onnx", "runtime": "torch"}, r"it takes onnxruntime, openvino$"),
    ({"path": "model.pth", "kind": "detector"}, r"^models\.mine\.kind: 'detector' is not one of upscaler, face-restorer$"),
    ({"path": "model.pth", "scale": "4"}, r"^models\.mine\.scale: '4' is not an integer$"),
    ({"path": "model.pth", "scale": -2}, r"^models\.mine\.scale: must be 0 \(from the model\) or positive$"),
    ({"path": "model.pth", "commercial_use": "maybe"}, r"commercial_use: 'maybe' is not one of yes, no, unverified"),
    ({"path": "model.pth", "licence": "MIT"}, r"^models\.mine: unknown key\(s\) licence$"),
    ({"license": "MIT"}, r"^models\.mine\.path: the model file is required$"),
    ({"path": "lonely.param"}, (r"^models\.mine\.path: .*lonely\.bin \(ncnn's weights beside .*lonely\.param\) "
                               r"does not exist$")),
])
def test_a_model_table_that_cannot_be_right_is_refused_naming_its_key(
        tmp_path: Path, table: dict[str, Any], message: str) -> None:
    for name in ("model.pth", "model.onnx", "lonely.param"):
        (tmp_path / name).write_bytes(b"")
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text("[models.mine]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items()))
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, environ={})


@pytest.mark.timeout(10)
def test_model_names_are_those_endpoints_use_and_not_taken(tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"")
    for name, message in [("My_Model", "a model name is lower case, with - for _ \\(my-model\\)"),
                          ("sim-upscale-x4", "the name is reserved"), ("face-detector", "the name is reserved")]:
        with pytest.raises(ConfigError, match=f"models.{name}: {message}"):
            config_from_mapping({"models": {name: {"path": str(weights)}}})
    with pytest.raises(ConfigError, match="model_server.runtimes.mine: mine is a model file of yours; set "
                                          "models.mine.runtime instead"):
        config_from_mapping({"models": {"mine": {"path": str(weights)}},
                             "model_server": {"runtimes": {"mine": "onnxruntime"}}})
    with pytest.raises(RunnerError, match="models.realesrgan-x4plus: realesrgan-x4plus is a bundled model's name"):
        RunnerSettings(user_models={"realesrgan-x4plus": UserModel("realesrgan-x4plus", str(weights))})


@pytest.mark.timeout(10)
def test_a_model_served_at_an_endpoint_needs_no_file_here() -> None:
    config = config_from_mapping({"models": {"remote": {"path": "/elsewhere/model.pth"}},
                                  "endpoints": {"remote": ["http://127.0.0.1:9"]}})
    assert config.models["remote"].path == "/elsewhere/model.pth"


@pytest.mark.timeout(10)
def test_the_tables_a_child_is_given_read_back_as_they_were(tmp_path: Path) -> None:
    weights = tmp_path / "odd \"name\" ü.pth"
    weights.write_bytes(b"")
    model = UserModel("mine", str(weights), license='CC-BY-4.0 "as published"\tü', source="a\\b\nc\x7f",
                      scale=4, tile_size=100, tile_context=12, purpose="🙂 faces")
    text = user_models_toml([model])
    assert config_from_mapping(tomllib.loads(text)).models == {"mine": model}


# --- PyTorch files through spandrel ----------------------------------------------------------


@pytest.fixture(scope="module")
def compact_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_state_dict(spandrel_module("Compact"), tmp_path_factory.mktemp("models") / "2x-compact.pth")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("architecture, file_name, scale", [
    ("Compact", "2x-compact.pth", 2), ("SPAN", "4x-span.pth", 4), ("SPAN", "4x-span.safetensors", 4),
])
def test_a_state_dict_runs_as_the_network_it_holds(
        tmp_path: Path, photo: np.ndarray, architecture: str, file_name: str, scale: int) -> None:
    module = spandrel_module(architecture)
    path = save_state_dict(module, tmp_path / file_name)
    model = UserModel("mine", str(path), license="MIT", source="made by the test")
    runner = create_runner("mine", RunnerSettings(threads=2, runtime="torch", user_models={"mine": model}))
    try:
        parameters = runner.spec.parameters
        assert runner.spec.platform == "pytorch_libtorch"
        assert parameters["scale"] == scale and parameters["runtime"] == "torch" and parameters["device"] == "cpu"
        assert parameters["architecture"] == ("RealESRGAN Compact" if architecture == "Compact" else "SPAN")
        assert (parameters["license"], parameters["source"]) == ("MIT", "made by the test")
        assert parameters["package"] == f"user file {path}" and parameters["commercial_use"] == "unverified"
        assert parameters["tile_size"] == 300 and parameters["tile_context"] == 32  # 256 + 2·(32 − 10)
        output = runner.run({"image": photo[np.newaxis]})["image"][0]
    finally:
        runner.close()
    assert output.shape == (36 * scale, 40 * scale, 3)
    assert levels_apart(output, torch_module_upscale(module, photo, scale)) <= ONE_LEVEL


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_batch_of_two_runs_in_one_forward_and_the_gpu_options_run_on_the_cpu(
        compact_file: Path, photo: np.ndarray) -> None:
    import torch

    from chaoqing.modelserver.runners.backends import Device
    from chaoqing.modelserver.runners.spandrel_backend import (
        create_spandrel_backend,
        load_descriptor,
    )
    from chaoqing.modelserver.runners.torch_backend import TorchOptions

    model = UserModel("mine", str(compact_file))
    runner = create_runner("mine", RunnerSettings(threads=2, runtime="torch", user_models={"mine": model}))
    assert isinstance(runner, UpscalerRunner)
    second = np.ascontiguousarray(photo[::-1])
    before = runner.backend.forward_calls
    outputs = runner.run({"image": np.stack([photo, second])})["image"]
    assert runner.backend.forward_calls - before == 1
    module = spandrel_module("Compact")
    for output, image in zip(outputs, (photo, second), strict=True):
        assert levels_apart(output, torch_module_upscale(module, image, 2)) <= ONE_LEVEL
    # the CUDA path's conversions (fp16, channels_last), on the CPU
    descriptor = load_descriptor(compact_file, "models.mine.path")
    backend = create_spandrel_backend(descriptor, Device("cpu"), model_name="mine", threads=2,
                                      options=TorchOptions(half=True, channels_last=True))
    weights = [parameter for parameter in backend._module.parameters() if parameter.dim() == 4]
    assert weights and all(weight.dtype == torch.float16 for weight in weights)
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    half = UpscalerRunner(runner.model, backend, runtime="torch", device="cpu")
    assert levels_apart(half.run({"image": photo[np.newaxis]})["image"][0], outputs[0]) <= 4  # fp16: 11 bits


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_each_wrong_pytorch_file_is_said_in_one_line_naming_it(tmp_path: Path, compact_file: Path) -> None:
    import torch

    def load(path: Path, **table: Any) -> None:
        model = UserModel("mine", str(path), **table)
        create_runner("mine", RunnerSettings(threads=1, runtime="torch", user_models={"mine": model}))

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"these bytes are no pickle")
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.block.weight": torch.zeros(4, 4)}, unknown)
    grey = save_state_dict(spandrel_module("grey"), tmp_path / "grey.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    cases = [
        (junk, {}, rf"^models\.mine\.path: {junk} is not a PyTorch state dict \(UnpicklingError: "),
        (unknown, {}, (rf"^models\.mine\.path: {unknown} is not a state dict spandrel recognises \(supported: "
                      r"Compact, .*SPAN, .*ESRGAN")),
        (grey, {}, (rf"^models\.mine\.path: {grey} is a RealESRGAN Compact model from 1 to 1 channels; chaoqing's "
                   r"upscalers take RGB to RGB \(3 to 3\)$")),
        (not_a_dict, {}, rf"^models\.mine\.path: {not_a_dict} (holds no state dict of tensors|is not a PyTorch)"),
        (compact_file, {"scale": 4}, (rf"^models\.mine\.scale: 4, but {compact_file} \(RealESRGAN Compact\) "
                                     r"upscales ×2$")),
        (tmp_path / "gone.pth", {}, r"^models\.mine\.path: .*gone\.pth does not exist$"),
    ]
    for path, table, message in cases:
        with pytest.raises(RunnerError, match=message) as raised:
            load(path, **table)  # a UserModel checks no file: the config does, and the runner again
        assert "\n" not in str(raised.value)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_face_restorer_is_not_taken_as_an_upscaler(compact_file: Path) -> None:
    """spandrel's GFPGAN, RestoreFormer and CodeFormer say purpose FaceSR: refused as upscalers."""
    import spandrel

    from chaoqing.modelserver.runners.spandrel_backend import check_upscaler, import_spandrel

    import_spandrel()
    module = spandrel_module("Compact")
    face_restorer = spandrel.ImageModelDescriptor(
        module, module.state_dict(), spandrel.MAIN_REGISTRY.get("GFPGAN").architecture, purpose="FaceSR", tags=[],
        supports_half=True, supports_bfloat16=True, scale=1, input_channels=3, output_channels=3)
    with pytest.raises(RunnerError, match=r"^models\.face\.path: /x/face\.pth is a GFPGAN model for FaceSR, not an "
                                          r"upscaler \(kind = \"upscaler\" takes SR or Restoration models\)$"):
        check_upscaler(face_restorer, Path("/x/face.pth"), "models.face.path")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_spandrel_imports_with_or_without_torchvision_and_normalize_is_torchvisions() -> None:
    """Where torchvision does not import (CI: a CPU torch), spandrel gets the stand-in; either
    way RestoreFormer's normalize computes (x − mean) / std per channel."""
    import sys

    import torch

    from chaoqing.modelserver.runners.spandrel_backend import import_spandrel

    import_spandrel()
    functional = sys.modules["torchvision.transforms.functional"]
    image = torch.rand(2, 3, 5, 4)
    expected = (image - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.2, 0.1]).view(3, 1, 1)
    assert torch.allclose(functional.normalize(image, [0.5, 0.4, 0.3], [0.5, 0.2, 0.1]), expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_missing_spandrel_says_how_to_install_it(compact_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "spandrel", None)  # its import now fails, as if it were not installed
    model = UserModel("mine", str(compact_file))
    with pytest.raises(RunnerError, match=r"^models\.mine\.path: PyTorch model files need spandrel, which is not "
                                          r"installed: pip install 'chaoqing\[spandrel\]' && pip install --no-deps "
                                          r"spandrel==0\.4\.2"):
        create_runner("mine", RunnerSettings(runtime="torch", user_models={"mine": model}))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_model_server_command_refuses_a_bad_file_in_one_line_before_it_listens(tmp_path: Path) -> None:
    import torch

    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.block.weight": torch.zeros(4, 4)}, unknown)
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text('[models.mine]\npath = "unknown.pth"\n')
    completed = run_cli("model-server", "--model", "mine", "--config", str(config_file), "--port", "0", timeout=80)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: models.mine.path: {unknown} is not a state dict spandrel recognises (supported: Compact,"), lines
    assert "listening" not in completed.stdout


# --- ONNX files ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_onnx_file_runs_exactly_as_its_operations_say(tmp_path: Path, photo: np.ndarray, runtime: str) -> None:
    path = write_onnx_upscaler(tmp_path / "tiny.onnx")
    model = UserModel("tiny", str(path), runtime=runtime, license="MIT")
    runner = create_runner("tiny", RunnerSettings(threads=2, user_models={"tiny": model}))
    try:
        assert runner.spec.parameters["scale"] == ONNX_SCALE and runner.spec.parameters["runtime"] == runtime
        assert runner.spec.parameters["architecture"] == "ONNX" and runner.spec.parameters["license"] == "MIT"
        outputs = runner.run({"image": np.stack([photo, photo[::-1]])})["image"]
    finally:
        runner.close()
    # a per-pixel network: the replicated edges change nothing, and each output pixel is known
    assert levels_apart(outputs[0], onnx_upscaler_by_numpy(photo)) <= ONE_LEVEL
    assert levels_apart(outputs[1], onnx_upscaler_by_numpy(np.ascontiguousarray(photo[::-1]))) <= ONE_LEVEL


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_each_wrong_onnx_file_is_said_in_one_line_naming_it(tmp_path: Path) -> None:
    from onnx import TensorProto

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"no protobuf")
    fixed = write_onnx_upscaler(tmp_path / "fixed.onnx", fixed_side=64)
    double = write_onnx_upscaler(tmp_path / "double.onnx", input_type=TensorProto.DOUBLE)
    cases = [
        (junk, {}, rf"^models\.tiny\.path: {junk} is not an ONNX model onnxruntime opens"),
        (fixed, {}, (rf"^models\.tiny\.path: {fixed} takes a fixed 64×64 input; chaoqing needs dynamic height and "
                    r"width \(export with dynamic axes\)$")),
        (double, {}, (rf"^models\.tiny\.path: {double} takes tensor\(double\) \['batch', 3, 'height', 'width'\]; "
                   r"chaoqing sends float32 \[N,3,H,W\] RGB in \[0, 1\]$")),
        (write_onnx_upscaler(tmp_path / "scaled.onnx"), {"scale": 3}, (r"^models\.tiny\.scale: 3, but .*scaled\.onnx "
                                                                     r"\(ONNX\) upscales ×2$")),
    ]
    for path, table, message in cases:
        model = UserModel("tiny", str(path), **table)
        with pytest.raises(RunnerError, match=message) as raised:
            create_runner("tiny", RunnerSettings(threads=1, user_models={"tiny": model}))
        assert "\n" not in str(raised.value)


def write_ncnn_upscaler(param_path: Path) -> Path:
    """The ONNX upscaler's operations as ncnn files: Convolution 1×1 (3 → 12, bias) then
    PixelShuffle ×2 in PyTorch's order (mode 0), blobs ``images`` → ``result``."""
    weight_count = ONNX_WEIGHTS.size
    param_path.write_text(
        "7767517\n3 3\n"
        "Input in0 0 1 images\n"
        f"Convolution conv 1 1 images features 0={3 * ONNX_SCALE**2} 1=1 5=1 6={weight_count}\n"
        f"PixelShuffle shuffle 1 1 features result 0={ONNX_SCALE}\n")
    # ncnn's ModelBin: the weights after a 4-byte tag (0: float32), the bias raw
    param_path.with_suffix(".bin").write_bytes(
        np.int32(0).tobytes() + ONNX_WEIGHTS.astype("<f4").tobytes() + ONNX_BIAS.astype("<f4").tobytes())
    return param_path


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_ncnn_file_runs_exactly_as_its_layers_say(tmp_path: Path, photo: np.ndarray) -> None:
    path = write_ncnn_upscaler(tmp_path / "tiny.param")
    config = config_from_mapping({"models": {"tiny-ncnn": {"path": str(path), "license": "MIT"}}})
    model = config.models["tiny-ncnn"]
    assert model.runtime == "ncnn"
    runner = create_runner("tiny-ncnn", RunnerSettings(threads=1, user_models=config.models))
    try:
        assert runner.spec.platform == "ncnn" and runner.spec.parameters["scale"] == ONNX_SCALE
        assert runner.spec.parameters["architecture"] == "ncnn" and runner.spec.parameters["license"] == "MIT"
        output = runner.run({"image": photo[np.newaxis]})["image"][0]
    finally:
        runner.close()
    assert levels_apart(output, onnx_upscaler_by_numpy(photo)) <= ONE_LEVEL


@pytest.mark.timeout(10)
def test_an_ncnn_param_file_names_its_blobs_or_is_refused(tmp_path: Path) -> None:
    from chaoqing.modelserver.runners.user_models import ncnn_blob_names

    param = tmp_path / "net.param"
    param.write_text("7767517\n3 3\nInput in0 0 1 images\nConvolution conv 1 1 images features 0=12 1=1 6=36\n"
                     "PixelShuffle shuffle 1 1 features result 0=2\n")
    assert ncnn_blob_names(param, "models.net.path") == ("images", "result")
    param.write_text("name: not ncnn\n")
    with pytest.raises(RunnerError, match="models.net.path: .*net.param is not an ncnn .param file"):
        ncnn_blob_names(param, "models.net.path")


# --- through a model server and the gateway -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_preset_naming_a_users_files_serves_them_through_the_model_server_and_the_gateway(
        tmp_path: Path, photo: np.ndarray, compact_file: Path,
        start_model_server: Callable[..., ModelServer]) -> None:
    onnx_path = write_onnx_upscaler(tmp_path / "tiny.onnx")
    models = {"my-compact": UserModel("my-compact", str(compact_file), license="Apache-2.0",
                                      source="https://example.org/compact"),
              "my-onnx": UserModel("my-onnx", str(onnx_path))}
    server = start_model_server(list(models), runtime="torch", user_models=models, ready_timeout_s=120)
    metadata = requests.get(f"{server.url}/v2/models/my-compact", timeout=10).json()
    assert metadata["platform"] == "pytorch_libtorch" and metadata["parameters"]["scale"] == 2
    assert metadata["parameters"]["license"] == "Apache-2.0"
    assert metadata["parameters"]["source"] == "https://example.org/compact"
    onnx_metadata = requests.get(f"{server.url}/v2/models/my-onnx", timeout=10).json()
    assert onnx_metadata["platform"] == "onnxruntime_onnx" and onnx_metadata["parameters"]["scale"] == ONNX_SCALE
    assert onnx_metadata["parameters"]["license"] == UNKNOWN_LICENSE

    remote = RemoteModel("my-compact", [server.url], RemoteSettings())
    try:
        served = remote.infer({"image": photo[np.newaxis]}, ["image"], time.monotonic() + 60)["image"][0]
    finally:
        remote.close()
    expected_compact = torch_module_upscale(spandrel_module("Compact"), photo, 2)
    assert levels_apart(served, expected_compact) <= ONE_LEVEL

    config = Config(port=0, detector="sim-detector", preset="compact", models=models, presets={
        "compact": Preset("compact", "my-compact", None), "onnx": Preset("onnx", "my-onnx", None)})
    gateway = start_gateway(config, {name: (server.url,) for name in models})
    try:
        through_compact = enhance_through_gateway(gateway.url, photo, 2, "compact")
        through_onnx = enhance_through_gateway(gateway.url, photo, 2, "onnx")
    finally:
        gateway.stop(grace_s=1.0)
    assert levels_apart(through_compact, expected_compact) <= ONE_LEVEL
    assert levels_apart(through_onnx, onnx_upscaler_by_numpy(photo)) <= ONE_LEVEL


@pytest.fixture
def supervised() -> Iterator[list[ModelServerSupervisor]]:
    supervisors: list[ModelServerSupervisor] = []
    yield supervisors
    for supervisor in supervisors:
        supervisor.stop(grace_s=5.0)


@pytest.mark.timeout(30)
def test_the_supervisor_hands_a_child_its_table_and_runtime(tmp_path: Path) -> None:
    """What ``chaoqing serve --config`` starts for a user model: ``--runtime`` and ``--config``
    from the table (in a private file that stop() removes); the other children get neither."""
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"")
    model = UserModel("mine", str(weights), runtime="openvino", license="CC0-1.0")
    settings = ModelServerSettings(compute_slots=0, runtime="ncnn")
    supervisor = ModelServerSupervisor(["mine", "realesrgan-x4plus"], settings, user_models={"mine": model})
    assert supervisor.user_models == {"mine": model}
    supervisor.user_models_directory = _write_user_models(supervisor.user_models.values())
    command = supervisor._command(supervisor._children["mine"])
    assert command[command.index("--runtime") + 1] == "openvino"
    tables = Path(command[command.index("--config") + 1])
    assert load_config(tables, environ={}).models == {"mine": model}
    bundled = supervisor._command(supervisor._children["realesrgan-x4plus"])
    assert bundled[bundled.index("--runtime") + 1] == "ncnn" and "--config" not in bundled
    supervisor.stop(grace_s=0.1)
    assert not tables.exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_command_serves_a_preset_naming_a_users_file(tmp_path: Path, photo: np.ndarray) -> None:
    import signal
    import subprocess
    import sys

    save_state_dict(spandrel_module("Compact"), tmp_path / "2x-compact.pth")
    every_preset = "".join(f'[presets.{name}]\nupscaler = "mine"\nface_model = ""\n'
                           for name in ("fast", "balanced", "quality", "anime"))  # nothing else to start
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text('preset = "mine"\ndetector = "sim-detector"\n[model_server]\ncompute_slots = 0\n'
                           'threads = 1\n[models.mine]\npath = "2x-compact.pth"\nlicense = "MIT"\n'
                           f'[presets.mine]\nupscaler = "mine"\nface_model = ""\n{every_preset}')
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--config", str(config_file),
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "chaoqing serving on" in line, line
        output = enhance_through_gateway(line.split("serving on ")[1].split()[0], photo, 2, "mine")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert levels_apart(output, torch_module_upscale(spandrel_module("Compact"), photo, 2)) <= ONE_LEVEL


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_stops_at_start_up_when_a_users_file_is_malformed(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], supervised: list[ModelServerSupervisor]) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"these bytes are no pickle")
    supervisor = ModelServerSupervisor(["mine"], ModelServerSettings(compute_slots=0, threads=1),
                                       user_models={"mine": UserModel("mine", str(junk))})
    supervised.append(supervisor)
    with pytest.raises(SupervisorError, match="model server for mine did not start \\(exit code 2\\)"):
        supervisor.start()
    assert f"error: models.mine.path: {junk} is not a PyTorch state dict" in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_serve_command_names_a_missing_file_in_one_line(tmp_path: Path) -> None:
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text('[models.mine]\npath = "absent.safetensors"\n[presets.mine]\nupscaler = "mine"\n')
    completed = run_cli("serve", "--config", str(config_file), "--port", "0", timeout=50)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == f"error: models.mine.path: {tmp_path / 'absent.safetensors'} does not exist"


# --- chaoqing models ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_models_command_lists_a_users_files_with_their_license_and_source(tmp_path: Path) -> None:
    (tmp_path / "mine.pth").write_bytes(b"")
    config_file = tmp_path / "chaoqing.toml"
    config_file.write_text('[models.mine]\npath = "mine.pth"\nlicense = "CC-BY-NC-4.0"\ncommercial_use = "no"\n'
                           'source = "https://example.org/mine"\nscale = 4\n'
                           '[models.unlabelled]\npath = "mine.pth"\n')
    completed = run_cli("models", "--config", str(config_file), timeout=50)
    assert completed.returncode == 0, completed.stderr
    row = next(line for line in completed.stdout.splitlines() if line.startswith("mine "))
    assert "CC-BY-NC-4.0" in row and " no " in row and " 4 " in row
    assert "source: https://example.org/mine; from the config's [models.mine]" in completed.stdout
    listing = json.loads(run_cli("models", "--json", "--config", str(config_file), timeout=50).stdout)
    entries = {entry["name"]: entry for entry in listing["models"]}
    assert entries["mine"]["user_model"] and not entries["realesrgan-x4plus"]["user_model"]
    assert entries["mine"]["files"] == [str(tmp_path / "mine.pth")] and entries["mine"]["installed"]
    assert entries["unlabelled"]["license"] == UNKNOWN_LICENSE and entries["unlabelled"]["scale"] == 0


@pytest.mark.timeout(30)
def test_a_model_server_refuses_a_users_file_before_it_takes_the_port(tmp_path: Path) -> None:
    """In process: the load runs in the constructor, so the error comes before the listener."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"no protobuf")
    options = ModelServerOptions(models=("tiny",), port=0,
                                 runner=RunnerSettings(user_models={"tiny": UserModel("tiny", str(junk))}))
    with pytest.raises(RunnerError, match=f"models.tiny.path: {junk} is not an ONNX model onnxruntime opens"):
        ModelServer(options)


@pytest.mark.timeout(10)
def test_tensorrt_profiles_a_users_onnx_file_by_its_own_input_name(tmp_path: Path) -> None:
    from chaoqing.modelserver.runners.backends import Device
    from chaoqing.modelserver.runners.onnxruntime_backend import onnxruntime_providers

    tensorrt, _, _ = onnxruntime_providers(Device("tensorrt", 0), max_items=2, max_side=300, cache_folder=tmp_path,
                                           input_name="pixels")
    assert isinstance(tensorrt, tuple)
    assert tensorrt[1]["trt_profile_max_shapes"] == "pixels:2x3x300x300"
    assert tensorrt[1]["trt_profile_min_shapes"] == "pixels:1x3x1x1"
