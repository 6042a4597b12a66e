"""chaoqing's runners on a real local Ray Serve, with the gateway in front of Ray's HTTP proxy.

The scenario (tests/ray_serve_scenario.py: ``chaoqing ray deploy``, the gateway, a client that
kills a replica) runs in a network namespace of its own with only
loopback up (``unshare -n``): Ray, the gateway and the client all inside, so no packet Ray
sends while it starts (cloud metadata probes, name look-ups) leaves the machine. HOME and the
temp dirs point into the test's folder, usage stats are off and auth is set by environment,
so nothing is written to ~/.ray. The configuration's own checks run here, without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from chaoqing.errors import ConfigError
from chaoqing.modelserver.ray_serve import (
    MODEL_DEPLOYMENT,
    RayModelSettings,
    V2ModelDeployment,
    load_ray_config,
    serve_config,
)

SCENARIO = Path(__file__).with_name("ray_serve_scenario.py")
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
ONE_LEVEL = 1
SCENARIO_TIMEOUT_S = 420


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ray.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.timeout(10)
def test_the_config_file_sets_replicas_batching_and_actor_options(tmp_path: Path) -> None:
    config = load_ray_config(write(tmp_path, """
[ray]
num_cpus = 4
[http]
port = 8123
[defaults]
health_check_period_s = 2
max_batch_size = 4
[models."realesr-animevideov3-x4"]
num_replicas = 3
num_cpus = 2
[models."realesrgan-x4plus"]
autoscaling = { min_replicas = 1, max_replicas = 5, target_ongoing_requests = 3 }
num_gpus = 1
device = "cuda:0"
runtime = "torch"
max_ongoing_requests = 32
[models."sim-face"]
model_options = { latency_ms = 5 }
"""))
    assert config.url == "http://127.0.0.1:8123" and config.num_cpus == 4
    compact, plus, face = config.models
    assert compact.deployment_options() == {
        "name": MODEL_DEPLOYMENT, "num_replicas": 3, "max_ongoing_requests": 8, "health_check_period_s": 2,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.0},
    }
    assert compact.runner_arguments()["threads"] == 2  # threads 0: the replica's CPUs
    options = plus.deployment_options()
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 32
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 3}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert plus.runner_arguments()["device"] == "cuda:0" and plus.runner_arguments()["runtime"] == "torch"
    assert dict(face.model_options) == {"latency_ms": "5"}
    # Serve's own config file names the same applications, and its args read back to the same settings
    document = serve_config(config)
    assert document["http_options"] == {"host": "127.0.0.1", "port": 8123}
    prefixes = {application["name"]: application["route_prefix"] for application in document["applications"]}
    assert prefixes == {"realesr-animevideov3-x4": "/v2/models/realesr-animevideov3-x4",
                        "realesrgan-x4plus": "/v2/models/realesrgan-x4plus", "sim-face": "/v2/models/sim-face",
                        "chaoqing": "/v2"}
    for application, model in zip(document["applications"], config.models, strict=False):
        assert RayModelSettings.from_arguments(json.loads(json.dumps(application["args"]))) == model


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text, named", [
    ('[models."sim-face"]\nnum_replica = 2\n', "num_replica"),
    ('[models."sim-face"]\nnum_replicas = 0\n', "num_replicas"),
    ('[models."sim-face"]\nautoscaling = { min_replicas = 3, max_replicas = 2 }\n', "autoscaling"),
    ('[http]\nport = 70000\n[models."sim-face"]\n', "http.port"),
    ('[cluster]\n[models."sim-face"]\n', "cluster"),
    ("[ray]\nnum_cpus = 2\n", "at least one model"),
])
def test_a_bad_config_is_refused_with_the_key_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_ray_config(write(tmp_path, text))


@pytest.mark.timeout(10)
def test_a_batch_is_stacked_by_shape_within_the_runners_batch_limit() -> None:
    import numpy as np

    replica = V2ModelDeployment.__new__(V2ModelDeployment)
    replica._batched, replica._max_items = True, 3
    small = {"image": np.zeros((1, 4, 4, 3), np.uint8)}
    pair = {"image": np.zeros((2, 4, 4, 3), np.uint8)}
    large = {"image": np.zeros((1, 8, 8, 3), np.uint8)}
    assert replica._stacks([small, large, pair, small, large]) == [[0, 2], [1, 4], [3]]


def _network_namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([unshare, "-n", "--", "ip", "link", "set", "lo", "up"], check=False, capture_output=True,
                           timeout=10)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 30)
def test_ray_serve_behind_the_gateway_gives_the_runners_images_and_survives_a_killed_replica() -> None:
    if not _network_namespaces_work():
        pytest.fail("this test needs `unshare -n` and `ip` (root, util-linux, iproute2): Ray must not reach the network")
    with tempfile.TemporaryDirectory(prefix="cq-ray-") as directory:  # short: Ray's socket paths must fit 107 bytes
        home = Path(directory)
        environment = {
            **os.environ,
            "HOME": str(home),
            "TMPDIR": str(home),
            "RAY_TMPDIR": str(home),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        command = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                   sys.executable, str(SCENARIO), directory]
        finished = subprocess.run(command, check=False, env=environment, capture_output=True,
                                  timeout=SCENARIO_TIMEOUT_S)
        output = finished.stdout.decode(errors="replace")
        assert finished.returncode == 0, f"{output[-3000:]}\n{finished.stderr.decode(errors='replace')[-6000:]}"
        results = json.loads(output.strip().splitlines()[-1])
        assert not (home / ".ray").exists()
    print(json.dumps(results, indent=1))  # the timings and memory, for the record (-s)

    assert results["live_status"] == 200 and results["model_ready_status"] == 200
    assert results["metadata_status"] == 200
    metadata = results["metadata"]
    assert metadata["name"] == "realesr-animevideov3-x4" and metadata["parameters"]["scale"] == 4
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}
    assert results["metadata_is_the_runners"]
    assert results["unknown_model"][0] == 404 and "no-such-model" in results["unknown_model"][1]["error"]
    assert "binary_tensor_data" in results["server_metadata"]["extensions"]
    assert results["tiny_call_status"] == 200
    # the gateway's images equal the runners' own (the compact model within one level: ncnn's threads)
    assert results["compact_status"] == 200, results.get("compact_error")
    assert results["compact_shape"] == [192, 256, 3]
    assert results["compact_levels_apart"] <= ONE_LEVEL
    assert results["sim_status"] == 200 and results["sim_equal"]
    assert results["faces_status"] == 200 and results["faces_enhanced"] == "2"
    # a killed replica is replaced, and requests after that all succeed
    assert results["compact_replicas"] == 2
    during = results["during_kill"]
    assert during["before"] > 0 and during["failed_before"] == 0
    assert during["after"] > 0 and during["failed_after"] == 0, during
    assert results["after_restart_codes"] == [200] * 6
    # SIGTERM stops `chaoqing ray deploy` cleanly, and Ray's processes with it
    assert results["ray_processes"] > 5
    assert results["deploy_exit_code"] == 0 and results["processes_left"] == []


@pytest.mark.timeout(30)
def test_the_shipped_serve_config_file_is_what_chaoqing_ray_config_prints() -> None:
    import yaml
    from click.testing import CliRunner

    from chaoqing.cli import cli

    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    printed = CliRunner().invoke(cli, ["ray", "config", "--config", str(examples / "ray.toml")])
    assert printed.exit_code == 0, printed.output
    shipped = yaml.safe_load((examples / "ray-serve.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(printed.output) == shipped
    assert serve_config(load_ray_config(examples / "ray.toml")) == shipped


@pytest.mark.timeout(10)
def test_a_joined_cluster_is_not_sized_here(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local instance"):
        load_ray_config(write(tmp_path, '[ray]\naddress = "auto"\nnum_cpus = 2\n[models."sim-face"]\n'))
    assert load_ray_config(write(tmp_path, '[ray]\naddress = "auto"\n[models."sim-face"]\n')).address == "auto"


@pytest.mark.timeout(20)
def test_a_batch_runs_the_runner_once_per_stack_and_gives_each_request_its_own_rows() -> None:
    """The replica's batch call without Ray: the sim runner, stacked calls, split results, and a
    failing stack answered with InferenceFailed while the other stack's requests get theirs."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from chaoqing.errors import InferenceFailed
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    runner = create_runner("sim-upscale-x2", RunnerSettings(model_options={"latency_ms": "0"}))
    calls: list[tuple[int, ...]] = []
    original_run = runner.run

    def counted_run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(tuple(inputs["image"].shape))
        if inputs["image"].shape[1] == 3:
            raise RuntimeError("this shape fails")
        return original_run(inputs)

    replica = V2ModelDeployment.__new__(V2ModelDeployment)
    replica.runner, replica.spec = runner, runner.spec
    replica.runner.run = counted_run  # type: ignore[method-assign]
    replica._batched, replica._max_items = True, 8
    replica._compute = ThreadPoolExecutor(1)
    rng = np.random.default_rng(0)
    first = {"image": rng.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)}
    pair = {"image": rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)}
    failing = {"image": rng.integers(0, 256, (1, 3, 3, 3), dtype=np.uint8)}
    try:
        results = asyncio.run(replica._infer_batch([first, failing, pair]))
    finally:
        replica._compute.shutdown()
    assert sorted(calls) == [(1, 3, 3, 3), (3, 4, 4, 3)]  # one call per input shape
    assert isinstance(results[1], InferenceFailed) and "this shape fails" in str(results[1])
    for request, result in ((first, results[0]), (pair, results[2])):
        assert isinstance(result, dict)
        expected = request["image"].repeat(2, axis=1).repeat(2, axis=2)
        assert np.array_equal(result["image"], expected)
