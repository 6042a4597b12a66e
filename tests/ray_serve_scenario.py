"""The Ray Serve scenario that tests/test_ray_serve.py runs inside a loopback-only network namespace.

Run as ``unshare -n -- sh -c 'ip link set lo up && exec python tests/ray_serve_scenario.py DIR'``:
nothing here may reach beyond 127.0.0.1, and in that namespace nothing can (Ray probes cloud
metadata and resolves outside names while it starts). Everything lives in DIR: HOME, the
temp dirs, Ray's session files (nothing is written to ~/.ray).

What it does, timing each step:

1. runs ``chaoqing ray deploy`` (a local Ray: 2 CPUs, a small object store) with a chaoqing Ray
   TOML, and joins its cluster from here: the compact model (``realesr-animevideov3-x4``, ncnn, 1 thread)
   and ``sim-upscale-x4`` with 2 replicas each, ``sim-face`` and ``sim-detector`` with one;
2. checks the v2 routes through Ray's HTTP proxy (health, metadata, a 404 for an unknown model);
3. starts chaoqing's gateway (a separate, monkey-patched process) pointed at Ray's proxy and
   enhances one photo with each upscaler (the compact one without faces, the sim one with
   faces), comparing the pixels with the same runners called here directly;
4. kills one compact replica's actor (``ray.kill``) while requests keep coming through the
   gateway, waits for Serve to start a replacement, and sends requests after that;
5. stops ``chaoqing ray deploy`` with SIGTERM and looks for Ray processes it left.

The last line on stdout is one JSON object with the results; the exit code is 0 when the
scenario ran to its end (the test judges the results).
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image
from skimage import data

COMPACT_X4 = "realesr-animevideov3-x4"
SIM_X4 = "sim-upscale-x4"
REPLICA_COUNT = 2
READY_TIMEOUT_S = 120.0
REPLACED_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 60.0


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read(), {key.lower(): value for key, value in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, error.read(), {key.lower(): value for key, value in error.headers.items()}


def ready_status(url: str) -> int:
    """The status ``GET url`` answers, 0 while nothing listens there yet."""
    try:
        return http("GET", url, timeout_s=5)[0]
    except OSError:  # URLError: refused, reset while the proxy starts
        return 0


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def decode_png(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        return np.asarray(image.convert("RGB"))


def process_tree(root: int) -> list[psutil.Process]:
    """``root`` and everything it started: `chaoqing ray deploy`, Ray's GCS, raylet, workers."""
    parent = psutil.Process(root)
    return [parent, *parent.children(recursive=True)]


def tree_rss_bytes(root: int) -> int:
    total = 0
    for process in process_tree(root):
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def write_ray_config(directory: Path, port: int) -> Path:
    path = directory / "ray.toml"
    path.write_text(f"""
[ray]
num_cpus = 2
object_store_memory_mb = 80

[http]
host = "127.0.0.1"
port = {port}

[defaults]
health_check_period_s = 1
batch_wait_timeout_s = 0.005

[models."{COMPACT_X4}"]
num_replicas = {REPLICA_COUNT}
num_cpus = 0.5
threads = 1

[models."{SIM_X4}"]
num_replicas = {REPLICA_COUNT}
num_cpus = 0.1
model_options = {{ latency_ms = "20" }}

[models."sim-face"]
num_cpus = 0.1
model_options = {{ latency_ms = "20" }}

[models."sim-detector"]
num_cpus = 0.1
model_options = {{ latency_ms = "5", faces = "2" }}
""", encoding="utf-8")
    return path


def write_gateway_config(directory: Path, ray_url: str) -> Path:
    models = (COMPACT_X4, SIM_X4, "sim-face", "sim-detector")
    lines = ['host = "127.0.0.1"', "port = 0", 'detector = "sim-detector"', "request_deadline_s = 60",
             "[presets.fast]", f'upscaler = "{COMPACT_X4}"', 'face_model = ""',
             "[presets.anime]", f'upscaler = "{COMPACT_X4}"', 'face_model = ""',
             "[presets.quality]", f'upscaler = "{COMPACT_X4}"', 'face_model = ""',
             "[presets.balanced]", f'upscaler = "{SIM_X4}"', 'face_model = "sim-face"',
             "[endpoints]", *(f'"{model}" = ["{ray_url}"]' for model in models)]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_gateway(config_path: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "chaoqing.bench.gateway_process", "--config", str(config_path), "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=log,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "listening on" not in line:
        raise RuntimeError(f"the gateway did not start: {line!r}, see {log_path}")
    url = line.split("listening on ", 1)[1].split()[0]
    ends_at = time.monotonic() + READY_TIMEOUT_S
    while ready_status(f"{url}/readyz") != 200:
        if time.monotonic() > ends_at or process.poll() is not None:
            raise RuntimeError(f"the gateway at {url} was not ready in time, see {log_path}")
        time.sleep(0.2)
    return process, url


def enhance(gateway_url: str, photo: bytes, preset: str, faces: bool) -> tuple[int, bytes, dict[str, str]]:
    query = f"preset={preset}&scale=4&format=png&faces={'true' if faces else 'false'}"
    return http("POST", f"{gateway_url}/v1/enhance?{query}", photo, {"Content-Type": "image/png"})


def replica_actor_names(ray: Any, application: str) -> list[str]:
    return sorted(
        entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith(f"SERVE_REPLICA::{application}#")
    )


def running_replicas(serve: Any, application: str) -> int:
    status = serve.status().applications[application].deployments["V2Model"]
    return int(status.replica_states.get("RUNNING", 0))


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(directory: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from chaoqing.modelserver.ray_serve import load_ray_config
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    results: dict[str, Any] = {}
    port = free_port()
    config_path = write_ray_config(directory, port)
    ray_url = load_ray_config(config_path).url
    started = time.monotonic()
    gateway: subprocess.Popen[bytes] | None = None
    # `chaoqing ray deploy`, as a user runs it: Ray in its process, Ctrl-C/SIGTERM stops it all
    with (directory / "deploy.log").open("wb") as deploy_log:
        deploy = subprocess.Popen([sys.executable, "-m", "chaoqing", "ray", "deploy", "--config", str(config_path)],
                                  stdout=deploy_log, stderr=subprocess.STDOUT)
    connected = False
    ray_processes: list[psutil.Process] = []
    try:
        ends_at = time.monotonic() + READY_TIMEOUT_S
        while ready_status(f"{ray_url}/v2/health/ready") != 200:
            if time.monotonic() > ends_at or deploy.poll() is not None:
                raise RuntimeError(f"chaoqing ray deploy was not ready (exit code {deploy.poll()}), "
                                   f"see {directory / 'deploy.log'}")
            time.sleep(0.2)
        results["first_ready_s"] = time.monotonic() - started
        ray_processes = process_tree(deploy.pid)
        results["ray_processes"] = len(ray_processes)
        results["rss_after_start_mb"] = tree_rss_bytes(deploy.pid) / 2**20
        # this process joins the cluster too, to find and kill a replica's actor
        ray.init(address="auto", _node_ip_address="127.0.0.1", logging_level="warning")
        connected = True

        # the v2 routes through Ray's proxy
        status, body, _ = http("GET", f"{ray_url}/v2/models/{COMPACT_X4}")
        results["metadata_status"] = status
        results["metadata"] = json.loads(body)
        results["live_status"] = http("GET", f"{ray_url}/v2/health/live")[0]
        results["model_ready_status"] = http("GET", f"{ray_url}/v2/models/{SIM_X4}/ready")[0]
        status, body, _ = http("GET", f"{ray_url}/v2/models/no-such-model/ready")
        results["unknown_model"] = [status, json.loads(body)]
        results["server_metadata"] = json.loads(http("GET", f"{ray_url}/v2")[1])

        # a tiny call through the proxy, timed (the bench has the careful figures)
        from chaoqing.protocol import v2

        tiny = np.zeros((1, 8, 8, 3), dtype=np.uint8)
        message = v2.encode_infer_request({"image": tiny}, ["image"])
        headers = {key: value for key, value in message.http_headers().items() if key != "Content-Length"}
        tiny_ms = []
        for _ in range(20):
            call_started = time.perf_counter()
            status, body, reply_headers = http("POST", f"{ray_url}/v2/models/{SIM_X4}/infer", message.join(), headers)
            tiny_ms.append((time.perf_counter() - call_started) * 1e3)
        results["tiny_call_status"] = status
        results["tiny_call_ms_p50"] = float(np.median(tiny_ms[5:]))

        # the same runners, called here
        photo_array = np.ascontiguousarray(data.astronaut()[180:228, 200:264])  # 48×64, a face's eye region
        photo = png_bytes(photo_array)
        compact = create_runner(COMPACT_X4, RunnerSettings(threads=1))
        expected_compact = compact.run({"image": photo_array[np.newaxis]})["image"][0]
        results["metadata_is_the_runners"] = json.loads(json.dumps(compact.spec.as_metadata())) == results["metadata"]
        compact.close()
        simulator = create_runner(SIM_X4, RunnerSettings(model_options={"latency_ms": "0"}))
        expected_sim = simulator.run({"image": photo_array[np.newaxis]})["image"][0]

        gateway, gateway_url = start_gateway(write_gateway_config(directory, ray_url), directory / "gateway.log")
        status, body, _ = enhance(gateway_url, photo, "fast", faces=False)
        results["compact_status"] = status
        if status == 200:
            served = decode_png(body)
            results["compact_shape"] = list(served.shape)
            results["compact_levels_apart"] = int(
                np.abs(served.astype(np.int16) - expected_compact.astype(np.int16)).max()
            )
        else:
            results["compact_error"] = body.decode(errors="replace")
        status, body, reply_headers = enhance(gateway_url, photo, "balanced", faces=False)
        results["sim_status"] = status
        if status == 200:
            results["sim_equal"] = bool(np.array_equal(decode_png(body), expected_sim))
        status, body, reply_headers = enhance(gateway_url, png_bytes(data.astronaut()[:256, :256]), "balanced",
                                              faces=True)
        results["faces_status"] = status
        results["faces_enhanced"] = reply_headers.get("x-faces-enhanced")

        # kill one compact replica while requests keep coming through the gateway
        names = replica_actor_names(ray, COMPACT_X4)
        results["compact_replicas"] = len(names)
        outcomes: list[tuple[float, int]] = []
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                code = enhance(gateway_url, photo, "fast", faces=False)[0]
                outcomes.append((time.monotonic(), code))

        askers = [threading.Thread(target=keep_asking) for _ in range(2)]
        for asker in askers:
            asker.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        # replaced: a new replica actor running, two in all
        ends_at = killed_at + REPLACED_TIMEOUT_S
        while True:
            current = replica_actor_names(ray, COMPACT_X4)
            if names[0] not in current and len(current) == REPLICA_COUNT and \
                    running_replicas(serve, COMPACT_X4) == REPLICA_COUNT:
                break
            if time.monotonic() > ends_at:
                raise RuntimeError(f"the killed replica was not replaced within {REPLACED_TIMEOUT_S:.0f} s: {current}")
            time.sleep(0.1)
        replaced_at = time.monotonic()
        results["replaced_after_s"] = replaced_at - killed_at
        time.sleep(1.5)  # the gateway's health check (every 1 s) sees the endpoint ready
        stop.set()
        for asker in askers:
            asker.join()
        results["during_kill"] = {
            "before": sum(1 for at, _ in outcomes if at < killed_at),
            "failed_before": sum(1 for at, code in outcomes if at < killed_at and code != 200),
            "between": sum(1 for at, _ in outcomes if killed_at <= at < replaced_at),
            "failed_between": sum(1 for at, code in outcomes if killed_at <= at < replaced_at and code != 200),
            "after": sum(1 for at, _ in outcomes if at >= replaced_at),
            "failed_after": sum(1 for at, code in outcomes if at >= replaced_at and code != 200),
            "codes": sorted({code for _, code in outcomes}),
        }
        after_codes = [enhance(gateway_url, photo, "fast", faces=False)[0] for _ in range(6)]
        results["after_restart_codes"] = after_codes
        results["rss_end_mb"] = tree_rss_bytes(deploy.pid) / 2**20
        ray_processes = process_tree(deploy.pid)
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        if connected:
            ray.shutdown()  # this driver leaves; the cluster is the deploy command's
        stopping = time.monotonic()
        deploy.send_signal(signal.SIGTERM)
        try:
            results["deploy_exit_code"] = deploy.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            results["deploy_exit_code"] = None
        results["shutdown_s"] = time.monotonic() - stopping
        time.sleep(1.0)
        left = [process for process in ray_processes if _alive(process)]
        results["processes_left"] = [" ".join(process.cmdline())[:80] for process in left if _alive(process)]
        for process in left:  # the test fails on them; never leave them to the machine
            process.kill()
    results["total_s"] = time.monotonic() - started
    return results


if __name__ == "__main__":
    work = Path(sys.argv[1])
    print(json.dumps(main(work)), flush=True)
