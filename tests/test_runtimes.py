"""Every runtime behind the same tensor contract: ncnn, OpenVINO, ONNX Runtime and PyTorch.

Each runtime's runner serves the compact model through a real model server (in process, port
0) and through a gateway pointed at it, and its pixels match ncnn's to within 1/255; x4plus
and a SPAN model are compared at the runner on tiny inputs. The GPU code paths (CUDA and
TensorRT providers, fp16 and channels_last) are covered here on the CPU: their selection
logic directly, the torch runner in fp16 and channels_last on the CPU, and the refusals a
machine without a GPU gives. A missing runtime is simulated by making its import fail.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import gevent
import numpy as np
import pytest
import requests
from conftest import run_cli
from PIL import Image
from skimage import data

from chaoqing.config import (
    MODEL_RUNTIMES,
    Config,
    ModelServerSettings,
    Preset,
    RemoteSettings,
    config_from_mapping,
    load_config,
)
from chaoqing.errors import ConfigError, RunnerError, SupervisorError
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModel, RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.gateway.supervisor import ModelServerSupervisor
from chaoqing.modelserver.app import ModelServer, ModelServerOptions
from chaoqing.modelserver.runners import RUNTIMES, Runner, RunnerSettings, backends, create_runner
from chaoqing.modelserver.runners.backends import (
    AUTO,
    Device,
    check_device,
    check_runtime,
    cuda_device_count,
    parse_device,
    resolve_runtime,
)
from chaoqing.modelserver.runners.catalog import CPU_RUNTIMES, UPSCALERS, model_cards
from chaoqing.modelserver.runners.onnxruntime_backend import (
    CPU_PROVIDER,
    OnnxruntimeBackend,
    onnxruntime_providers,
    tensorrt_profile,
)
from chaoqing.modelserver.runners.torch_backend import TorchBackend, TorchOptions, torch_options
from chaoqing.modelserver.runners.upscaler import UpscalerRunner

COMPACT_X4 = "realesr-animevideov3-x4"
PLUS_X4 = "realesrgan-x4plus"
SPAN_X4 = "span-kendata-x4"
ONE_LEVEL = 1  # 1/255: the converted models against ncnn (tests/test_convert.py measured far less)
OPTIONAL_RUNTIMES = ("openvino", "onnxruntime", "torch")
PLATFORMS = {"ncnn": "ncnn", "openvino": "openvino", "onnxruntime": "onnxruntime_onnx", "torch": "pytorch_libtorch"}


@pytest.fixture(scope="module", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Converted ONNX files go to a folder of this module's, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHAOQING_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def face_crop() -> np.ndarray:
    """The astronaut's face, area-downscaled to 64×64: a small real low-resolution photo."""
    small = cv2.resize(data.astronaut()[0:256, 128:384], (64, 64), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small)


def levels_apart(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


def upscale_one(runner: Runner, image: np.ndarray) -> np.ndarray:
    output: np.ndarray = runner.run({"image": image[np.newaxis]})["image"][0]
    return output


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def start_gateway(upscaler: str, url: str) -> GatewayServer:
    """A gateway in this process whose only preset upscales with ``upscaler`` at ``url``."""
    preset = Preset("fast", upscaler, None, "the runtime under test, no faces")
    config = Config(port=0, detector="sim-detector", presets={"fast": preset}, preset="fast",
                    endpoints={upscaler: (url,)})
    metrics = GatewayMetrics()
    gateway = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
    gateway.start()
    return gateway


# --- runtimes, devices and what each one says is missing ---------------------------------------


@pytest.mark.timeout(10)
def test_the_config_names_the_same_runtimes_as_the_runners() -> None:
    assert MODEL_RUNTIMES == (AUTO, *RUNTIMES)
    assert ModelServerSettings().runtime == AUTO and RunnerSettings().runtime == AUTO


@pytest.mark.timeout(10)
def test_auto_is_each_models_measured_cpu_runtime_and_the_gpus_own() -> None:
    assert set(CPU_RUNTIMES.values()) <= set(RUNTIMES)
    for model in UPSCALERS.values():
        assert model.cpu_runtime == CPU_RUNTIMES[model.architecture]
        assert resolve_runtime(model, AUTO, "cpu") == model.cpu_runtime  # all installed here
        assert resolve_runtime(model, "onnxruntime", "cpu") == "onnxruntime"  # a runtime named is kept
    plus = UPSCALERS[PLUS_X4]
    assert resolve_runtime(plus, AUTO, "vulkan:0") == "ncnn"
    assert resolve_runtime(plus, AUTO, "cuda:1") == "torch"
    assert resolve_runtime(plus, AUTO, "tensorrt:0") == "onnxruntime"
    with pytest.raises(RunnerError, match="runtime openvino does not run on cuda:0"):
        resolve_runtime(plus, "openvino", "cuda:0")


@pytest.mark.timeout(10)
def test_auto_falls_back_to_ncnn_when_the_default_is_missing_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = dataclasses.replace(UPSCALERS[PLUS_X4], cpu_runtime="openvino")
    monkeypatch.setattr(backends, "runtime_installed", lambda name: name != "openvino")
    backends._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="chaoqing.modelserver.runners"):
        assert resolve_runtime(model, AUTO, "cpu") == "ncnn"
        assert resolve_runtime(model, AUTO, "cpu") == "ncnn"
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [(f"{PLUS_X4}: its default CPU runtime openvino is not installed "
                        "(pip install 'chaoqing[openvino]'); running it on ncnn")]
    assert resolve_runtime(model, "openvino", "cpu") == "openvino"  # asked for by name: no fallback
    backends._log_fallback.cache_clear()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_runner_built_with_the_default_settings_says_which_runtime_computes_it() -> None:
    runner = create_runner(COMPACT_X4, RunnerSettings(threads=1))
    try:
        runtime = UPSCALERS[COMPACT_X4].cpu_runtime
        assert runner.spec.parameters["runtime"] == runtime and runner.spec.platform == PLATFORMS[runtime]
        assert runner.run({"image": np.zeros((1, 8, 8, 3), np.uint8)})["image"].shape == (1, 32, 32, 3)
    finally:
        runner.close()


@pytest.mark.timeout(10)
def test_runtimes_are_configured_for_all_models_and_per_model() -> None:
    toml = """
[model_server]
runtime = "onnxruntime"
[model_server.runtimes]
"realesrgan_x4plus" = "torch"
[model_server.devices]
"realesrgan-x4plus" = "cuda:1"
"""
    import tomllib

    settings = config_from_mapping(tomllib.loads(toml)).model_server
    assert settings.runtime_for(PLUS_X4) == "torch" and settings.device_for(PLUS_X4) == "cuda:1"
    assert settings.runtime_for(COMPACT_X4) == "onnxruntime" and settings.device_for(COMPACT_X4) == "cpu"
    from_environment = load_config(environ={"CHAOQING_MODEL_SERVER__RUNTIMES": f"{SPAN_X4}=openvino, {PLUS_X4}=ncnn"})
    assert dict(from_environment.model_server.runtimes) == {SPAN_X4: "openvino", PLUS_X4: "ncnn"}
    with pytest.raises(ConfigError, match="model_server.runtimes.realesrgan-x4plus: 'tf' is not one of auto, ncnn"):
        load_config(environ={"CHAOQING_MODEL_SERVER__RUNTIMES": f"{PLUS_X4}=tf"})
    with pytest.raises(ConfigError, match="is not MODEL=VALUE"):
        load_config(environ={"CHAOQING_MODEL_SERVER__RUNTIMES": "torch"})


@pytest.mark.timeout(10)
def test_the_anime_preset_uses_the_anime_model_and_no_new_model() -> None:
    config = Config()
    anime = config.presets["anime"]
    assert anime.upscaler == COMPACT_X4 and anime.face_model is None
    assert set(config.models_needed("anime")) <= set(config.models_needed("balanced"))
    # Real-ESRGAN's illustration model is there to name for faces
    custom = config_from_mapping({"presets": {"anime": {"face_model": "realesrgan-x4plus-anime"}}})
    assert custom.presets["anime"].face_model in UPSCALERS


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text, device", [
    ("cpu", Device("cpu")), ("CPU", Device("cpu")), ("cuda", Device("cuda", 0)), ("cuda:3", Device("cuda", 3)),
    ("tensorrt:1", Device("tensorrt", 1)), ("vulkan", Device("vulkan", 0)), ("vulkan:2", Device("vulkan", 2)),
])
def test_devices_parse(text: str, device: Device) -> None:
    assert parse_device(text) == device
    assert str(parse_device(str(device))) == str(device)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("runtime, device, message", [
    ("ncnn", "cuda:0", "runtime ncnn does not run on cuda:0; it takes --device cpu, vulkan:N"),
    ("openvino", "vulkan:0", "runtime openvino does not run on vulkan:0; it takes --device cpu"),
    ("torch", "tensorrt:0", "runtime torch does not run on tensorrt:0; it takes --device cpu, cuda:N"),
    ("onnxruntime", "gpu", "device 'gpu' is not cpu, cuda:N, tensorrt:N or vulkan:N"),
    ("tensorflow", "cpu", "unknown runtime 'tensorflow'; choose ncnn, openvino, onnxruntime, torch"),
])
def test_a_device_the_runtime_does_not_drive_is_refused_before_anything_loads(
        runtime: str, device: str, message: str) -> None:
    with pytest.raises(RunnerError, match=message):
        check_device(runtime, device)
    with pytest.raises(RunnerError, match=message):
        RunnerSettings(runtime=runtime, device=device)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runtime, extra", [("openvino", "openvino"), ("onnxruntime", "onnx"), ("torch", "torch")])
def test_a_runtime_that_is_not_installed_says_what_to_install(
        runtime: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, runtime, None)  # its import now fails, as if it were not installed
    expected = rf"runtime {runtime} is not installed: pip install 'chaoqing\[{extra}\]'"
    with pytest.raises(RunnerError, match=expected):
        check_runtime(runtime, "cpu")
    options = ModelServerOptions(models=(COMPACT_X4,), port=0, runner=RunnerSettings(runtime=runtime))
    with pytest.raises(RunnerError, match=expected):
        ModelServer(options)  # before it listens
    # a server whose models need no runtime (the detector, the simulators) does not ask for one
    server = ModelServer(ModelServerOptions(models=("sim-face",), port=0, runner=RunnerSettings(runtime=runtime)))
    server.stop(0.1)


def _simulate_missing(tmp_path: Path, module: str) -> dict[str, str]:
    """Environment for a child Python in which ``import module`` fails (a sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.timeout(60)
def test_model_server_command_with_a_missing_runtime_exits_2_in_one_line(tmp_path: Path) -> None:
    completed = run_cli("model-server", "--runtime", "openvino", "--model", COMPACT_X4, "--port", "0",
                        env=_simulate_missing(tmp_path, "openvino"), timeout=50)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == "error: runtime openvino is not installed: pip install 'chaoqing[openvino]'"
    assert "listening" not in completed.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arguments, message", [
    (("--runtime", "torch", "--device", "cuda:0"), "was built without CUDA|there is no CUDA GPU"),  # CPU or CUDA build
    (("--runtime", "onnxruntime", "--device", "cuda:0"), "has no CUDAExecutionProvider"),
    (("--runtime", "onnxruntime", "--device", "tensorrt:0"), "has no TensorrtExecutionProvider"),
    (("--device", "vulkan:0"), "Vulkan device 0 requested but ncnn sees no GPU; use --device cpu"),
])
def test_model_server_command_on_a_gpu_this_machine_lacks_exits_2(arguments: tuple[str, ...], message: str) -> None:
    if "vulkan:0" in arguments:
        import ncnn

        from chaoqing.modelserver.runners.ncnn_backend import VULKAN_LOADER

        try:
            ctypes.CDLL(VULKAN_LOADER)
        except OSError:
            pass  # no loader: ncnn sees no GPU
        else:
            if ncnn.get_gpu_count() > 0:
                pytest.skip("ncnn sees a Vulkan GPU here")
    elif cuda_device_count()[0] > 0:
        pytest.skip("this machine has a CUDA GPU")
    completed = run_cli("model-server", *arguments, "--model", COMPACT_X4, "--port", "0", timeout=50)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.timeout(90)
def test_serve_starts_each_model_on_its_configured_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """[model_server.runtimes] reaches that model's child: with openvino missing, it alone fails, saying why."""
    for name, value in _simulate_missing(tmp_path, "openvino").items():
        monkeypatch.setenv(name, value)
    settings = ModelServerSettings(runtime="ncnn", runtimes={COMPACT_X4: "openvino"}, compute_slots=0)
    assert settings.runtime_for(COMPACT_X4) == "openvino" and settings.runtime_for(PLUS_X4) == "ncnn"
    supervisor = ModelServerSupervisor([COMPACT_X4], settings)
    with pytest.raises(SupervisorError, match=f"model server for {COMPACT_X4} did not start \\(exit code 2\\)"):
        supervisor.start()
    assert "error: runtime openvino is not installed: pip install 'chaoqing[openvino]'" in capfd.readouterr().err


@pytest.mark.timeout(10)
def test_no_cuda_gpu_is_said_with_its_reason() -> None:
    count, reason = cuda_device_count()
    if count:
        pytest.skip("this machine has a CUDA GPU")
    assert reason  # the driver library is missing, or sees no GPU
    with pytest.raises(RunnerError, match="no CUDA GPU|built without CUDA|has no CUDAExecutionProvider"):
        check_runtime("torch", "cuda:0")


# --- what the GPU paths choose, checked on the CPU ---------------------------------------------


@pytest.mark.timeout(10)
def test_onnxruntime_providers_follow_the_device(tmp_path: Path) -> None:
    assert onnxruntime_providers(Device("cpu"), max_items=8, max_side=296, cache_folder=tmp_path) == [CPU_PROVIDER]
    assert onnxruntime_providers(Device("cuda", 1), max_items=8, max_side=296, cache_folder=tmp_path) == [
        ("CUDAExecutionProvider", {"device_id": 1}), CPU_PROVIDER,
    ]
    tensorrt, cuda, cpu = onnxruntime_providers(Device("tensorrt", 2), max_items=4, max_side=296, cache_folder=tmp_path)
    assert tensorrt[0] == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider", {"device_id": 2})
    assert cpu == CPU_PROVIDER
    options = dict(tensorrt[1])
    assert options["device_id"] == 2 and options["trt_fp16_enable"] is False
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"].startswith(str(tmp_path))
    assert tensorrt_profile(4, 296) == {
        "trt_profile_min_shapes": "input:1x3x1x1",
        "trt_profile_opt_shapes": "input:1x3x296x296",
        "trt_profile_max_shapes": "input:4x3x296x296",
    }
    assert all(options[key] == value for key, value in tensorrt_profile(4, 296).items())


@pytest.mark.timeout(10)
def test_torch_chooses_fp16_on_a_gpu_only_and_channels_last_everywhere() -> None:
    assert torch_options(Device("cuda", 0)) == TorchOptions(half=True, channels_last=True)
    assert torch_options(Device("cpu")) == TorchOptions(half=False, channels_last=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_onnxruntime_refuses_a_cuda_session_that_fell_back_to_the_cpu() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    # onnxruntime itself only warns and runs on the CPU; the backend must not serve like that
    with pytest.raises(RunnerError, match="could not use CUDAExecutionProvider on cuda:0 .*fell back to CPUExecutionProvider"):
        OnnxruntimeBackend(UPSCALERS[COMPACT_X4], Device("cuda", 0), threads=1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torch_cuda_path_on_the_cpu_fp16_channels_last(face_crop: np.ndarray) -> None:
    """The conversions the CUDA path makes (fp16 weights and inputs, channels_last), run on the CPU."""
    import torch

    model = UPSCALERS[COMPACT_X4]
    options = TorchOptions(half=True, channels_last=True)
    backend = TorchBackend.for_model(model, Device("cpu"), options, threads=2)
    weights = [parameter for parameter in backend._module.parameters() if parameter.dim() == 4]
    assert weights and all(weight.dtype == torch.float16 for weight in weights)
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    runner = UpscalerRunner(model, backend, runtime="torch", device="cpu")
    crop = face_crop[:32, :32]
    reference = upscale_one(create_runner(COMPACT_X4, RunnerSettings(threads=2)), crop)
    output = upscale_one(runner, crop)
    assert output.dtype == np.uint8 and output.shape == (128, 128, 3)
    # fp16 keeps 11 significant bits: a few levels at most where fp32 keeps one
    assert levels_apart(output, reference) <= 4
    contiguous = UpscalerRunner(model, TorchBackend.for_model(model, Device("cpu"), TorchOptions(), threads=2),
                                runtime="torch", device="cpu")
    assert levels_apart(upscale_one(contiguous, crop), reference) <= ONE_LEVEL


@pytest.mark.timeout(30)
def test_a_cpu_only_torch_refuses_to_place_a_model_on_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has a GPU")
    with pytest.raises(RunnerError, match="torch could not place the model on cuda:0"):
        TorchBackend(torch.nn.Conv2d(3, 3, 3), Device("cuda", 0), TorchOptions(half=True, channels_last=True),
                     model_name="a convolution", scale=1, threads=1)


# --- every runtime through a model server and the gateway ---------------------------------------


@pytest.fixture(scope="module")
def ncnn_compact() -> Iterator[Runner]:
    runner = create_runner(COMPACT_X4, RunnerSettings(threads=2))
    yield runner
    runner.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("runtime", ["ncnn", *OPTIONAL_RUNTIMES])
def test_each_runtime_serves_through_the_model_server_and_the_gateway(
        runtime: str, start_model_server: Callable[..., ModelServer], ncnn_compact: Runner,
        face_crop: np.ndarray) -> None:
    server = start_model_server([COMPACT_X4], runtime=runtime, threads=2, ready_timeout_s=180)
    metadata = requests.get(f"{server.url}/v2/models/{COMPACT_X4}", timeout=10).json()
    parameters = metadata["parameters"]
    assert metadata["platform"] == PLATFORMS[runtime]
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}
    assert parameters["optional_inputs"] == ["edge_padding"] and parameters["scale"] == 4
    assert parameters["runtime"] == runtime and parameters["device"] == "cpu"
    assert parameters["tile_size"] == 276 and parameters["license"] == "BSD-3-Clause"
    assert parameters["source"].startswith("https://github.com/xinntao/Real-ESRGAN") and parameters["purpose"]

    expected = upscale_one(ncnn_compact, face_crop)
    remote = RemoteModel(COMPACT_X4, [server.url], RemoteSettings())
    try:
        served = remote.infer({"image": face_crop[np.newaxis]}, ["image"], time.monotonic() + 120)["image"][0]
    finally:
        remote.close()
    assert served.shape == (256, 256, 3)
    assert levels_apart(served, expected) <= ONE_LEVEL

    gateway = start_gateway(COMPACT_X4, server.url)
    try:
        response = requests.post(f"{gateway.url}/v1/enhance?scale=4&faces=false&format=png", data=png_bytes(face_crop),
                                 headers={"Content-Type": "image/png"}, timeout=120)
    finally:
        gateway.stop(grace_s=1.0)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as image:
        through_gateway = np.asarray(image.convert("RGB"))
    assert through_gateway.shape == (256, 256, 3)
    assert levels_apart(through_gateway, expected) <= ONE_LEVEL


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torch_runs_a_batch_of_two_in_one_forward(
        start_model_server: Callable[..., ModelServer], face_crop: np.ndarray) -> None:
    server = start_model_server([COMPACT_X4], runtime="torch", threads=2, max_queue_delay_s=2.0,
                                ready_timeout_s=180)
    batcher = server.models[COMPACT_X4].batcher
    assert batcher is not None
    runner = batcher.runner
    assert isinstance(runner, UpscalerRunner)
    forwards_before = runner.backend.forward_calls
    first, second = face_crop[:48, :48], np.ascontiguousarray(face_crop[16:, 16:])
    remote = RemoteModel(COMPACT_X4, [server.url], RemoteSettings())
    try:
        calls = [gevent.spawn(remote.infer, {"image": crop[np.newaxis]}, ["image"], time.monotonic() + 120)
                 for crop in (first, second)]
        gevent.joinall(calls, raise_error=True)
    finally:
        remote.close()
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert f'chaoqing_model_batch_size_count{{model="{COMPACT_X4}"}} 1.0' in metrics, metrics
    assert f'chaoqing_model_batch_size_sum{{model="{COMPACT_X4}"}} 2.0' in metrics
    assert runner.backend.forward_calls - forwards_before == 1  # the batch of two, one forward
    reference = create_runner(COMPACT_X4, RunnerSettings(threads=2))
    for call, crop in zip(calls, (first, second), strict=True):
        assert levels_apart(call.value["image"][0], upscale_one(reference, crop)) <= ONE_LEVEL


# --- the other architectures, at the runner ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, side", [(PLUS_X4, 20), (SPAN_X4, 40)])
@pytest.mark.parametrize("runtime", OPTIONAL_RUNTIMES)
def test_rrdbnet_and_span_match_ncnn_on_every_runtime(runtime: str, name: str, side: int, face_crop: np.ndarray) -> None:
    crop = np.ascontiguousarray(face_crop[10 : 10 + side, 12 : 12 + side])
    reference = upscale_one(create_runner(name, RunnerSettings(threads=2)), crop)
    runner = create_runner(name, RunnerSettings(runtime=runtime, threads=2))
    assert runner.spec.parameters["runtime"] == runtime
    assert levels_apart(upscale_one(runner, crop), reference) <= ONE_LEVEL
    runner.close()


# --- chaoqing models ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_models_command_lists_every_bundled_model_with_its_license() -> None:
    completed = run_cli("models", timeout=50)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    for card in model_cards():
        row = next((line for line in lines if line.startswith(card.name + " ")), None)
        assert row is not None, (card.name, completed.stdout)
        assert card.license in row and card.commercial_use in row and card.purpose[:40] in row
        assert f"source: {card.source}" in completed.stdout
    assert "runtimes installed: ncnn, openvino, onnxruntime, torch" in completed.stdout

    as_json = run_cli("models", "--json", timeout=50)
    assert as_json.returncode == 0, as_json.stderr
    listing = json.loads(as_json.stdout)
    models = {entry["name"]: entry for entry in listing["models"]}
    assert list(models) == [*UPSCALERS, "centerface", "face-detector", "face-descriptor"]
    for entry in models.values():
        assert entry["installed"] and entry["license"] and entry["source"] and entry["purpose"]
        assert entry["commercial_use"] in ("yes", "no", "unverified")
    assert {name: models[name]["scale"] for name in ("span-x2-ch48", SPAN_X4, COMPACT_X4, "face-detector", "centerface")} == {
        "span-x2-ch48": 2, SPAN_X4: 4, COMPACT_X4: 4, "face-detector": 0, "centerface": 0,
    }
    assert models["centerface"]["license"] == "MIT" and Path(models["centerface"]["files"][0]).name == "centerface.onnx"
    clear_reality = models["span-clearreality-x4"]
    assert clear_reality["license"] == "CC-BY-NC-SA-4.0" and clear_reality["commercial_use"] == "no"
    assert models[SPAN_X4]["license"] == "CC-BY-SA-4.0"
    assert all(models[name]["license"] == "unverified" for name in ("span-x4-ch48", "span-x4-ch52", "span-hfa2k-x2"))
    assert all(Path(path).is_file() for path in models[PLUS_X4]["files"])
    assert listing["runtimes"] == {"ncnn": True, "openvino": True, "onnxruntime": True, "torch": True}
    for name, model in UPSCALERS.items():
        assert models[name]["default_runtime"] == models[name]["runtime"] == model.cpu_runtime
    assert models["face-detector"]["runtime"] == "dlib"


@pytest.mark.timeout(60)
def test_models_command_says_which_runtime_is_missing(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *rest: None if name == 'openvino' else _find(name, *rest)\n"
    )
    completed = run_cli("models", env={"PYTHONPATH": str(tmp_path)}, timeout=50)
    assert completed.returncode == 0, completed.stderr
    assert "runtimes not installed: openvino (pip install 'chaoqing[openvino]')" in completed.stdout
    for name, model in UPSCALERS.items():  # a model whose default is missing runs on ncnn, and says so
        row = next(line for line in completed.stdout.splitlines() if line.startswith(name + " "))
        assert ("ncnn (openvino not installed)" in row) == (model.cpu_runtime == "openvino"), row
