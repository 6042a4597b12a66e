"""The ``chaoqing`` command: a thin click layer over Config and the servers.

Library code raises; only this module exits. gevent's monkey-patching happens first thing
in :func:`main`, before anything else imports sockets or threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["cli", "main"]

_log = logging.getLogger("chaoqing")


def main() -> None:
    """Console-script entry point."""
    from gevent import monkey

    # `chaoqing ray` drives Ray, whose threads, subprocesses and gRPC gevent's patches break
    if sys.argv[1:2] != ["ray"]:
        monkey.patch_all()
    cli(prog_name="chaoqing")


def _setup_logging(level: str, log_format: str = "auto") -> None:
    from chaoqing.logs import configure_logging

    configure_logging(level, log_format)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="chaoqing")
def cli() -> None:
    """超清 chaoqing — make photos bigger and sharper, with faces enhanced.

    \b
    Quick use:
      chaoqing enhance photo.jpg            enhance a file (starts local model servers)
      chaoqing enhance photos/ -j 4         a folder, 4 at a time, with a progress bar
      chaoqing serve                        HTTP API and web page on http://127.0.0.1:8080
      chaoqing model-server --model NAME    one KServe v2 model server
      chaoqing doctor                       check models, runtimes, GPUs and ports

    Run `chaoqing COMMAND --help` for a command's options.
    """


def _key_values(context: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict; raises click.BadParameter for one without ``=``."""
    pairs: dict[str, str] = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", context, parameter)
        pairs[key.strip()] = text.strip()
    return pairs


@cli.command("model-server", short_help="Serve models over the KServe v2 protocol.")
@click.option("--model", "models", multiple=True, required=True, metavar="NAME",
              help="Model to serve; repeat for several. `chaoqing models` lists them, with their licenses; "
                   "a model file of your own is named by its [models.NAME] table in --config.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML file whose [models.NAME] tables define model files of your own (docs/models.md); "
                   "the other settings come from the flags.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one (printed on start).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Compute threads per model instance; 0 = number of CPUs.")
@click.option("--runtime", default=None, metavar="NAME",
              help="What computes the upscalers: auto (each model's measured fastest CPU runtime, shown by "
                   "`chaoqing models`, ncnn when that one is not installed; on a GPU: ncnn on vulkan:N, torch on "
                   "cuda:N, onnxruntime on tensorrt:N), ncnn, openvino, onnxruntime or torch. The last three are "
                   "extras: pip install 'chaoqing[openvino]', 'chaoqing[onnx]' or 'chaoqing[torch]' (the detectors "
                   "bring their own: CenterFace on onnxruntime, dlib; a model file of yours runs on its table's "
                   "runtime).  [default: auto, or that of the model files served when all are yours]")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE",
              help="cpu; vulkan:N (ncnn); cuda:N (onnxruntime, torch); tensorrt:N (onnxruntime's TensorRT provider).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Model instances (one native thread each) per model.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Largest dynamic batch (requests of equal input shape).")
@click.option("--max-queue-delay-ms", default=2.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long a batch waits for more requests.")
@click.option("--max-queue-size", default=256, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Queued requests per model before answering 503.")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE", callback=_key_values,
              help="A setting of models that take their own; repeat for several. Only the sim-* simulators "
                   "do: latency_ms, faces, concurrency (see docs/model-server.md).")
@click.option("--compute-slots", "compute_slots", default=None, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of slot files (slot-0, slot-1, ...) that the model servers on this machine share: "
                   "each heavy batch holds one while it computes, so they never oversubscribe the cores. "
                   "`chaoqing serve` makes one for its own ([model_server] compute_slots).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="How much to log (stderr).")
def model_server(models: tuple[str, ...], config_path: str | None, host: str, port: int, threads: int,
                 runtime: str | None, device: str, instances: int, max_batch_size: int, max_queue_delay_ms: float,
                 max_queue_size: int, model_options: dict[str, str], compute_slots: Path | None,
                 log_level: str) -> None:
    """Serve models over the KServe v2 protocol (REST, binary tensors).

    Any v2 client works: the gateway, tritonclient, KServe, curl. A runtime or device that
    is missing stops it at start-up with one line saying what to install (exit status 2).
    """
    _setup_logging(log_level)
    # ncnn's OpenMP threads spin while idle by default; beside other model servers on the same
    # cores that spinning steals their CPU (measured here: compact x4 4.9 → 3.5 s and x4plus
    # 17 → 9.5 s when both run at once). Read by libgomp when ncnn loads, so set it first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from chaoqing.errors import ConfigError, RunnerError
    from chaoqing.modelserver.app import ModelServer, ModelServerOptions
    from chaoqing.modelserver.batcher import BatchSettings
    from chaoqing.modelserver.runners import RunnerSettings, available_models, check_model_options

    user_models = _user_models(config_path)
    unknown = [name for name in models if name not in available_models() and name not in user_models]
    if unknown:
        _fail(f"unknown model(s) {', '.join(unknown)}; available: {', '.join([*available_models(), *user_models])}")
    try:
        for name in models:
            check_model_options(name, model_options)
    except RunnerError as exc:
        _fail(f"--model-option: {exc}")
    if runtime is None:  # the user models' own when only they are served (their device must suit it)
        own = {user_models[name].runtime for name in models if name in user_models}
        runtime = own.pop() if len(own) == 1 and all(name in user_models for name in models) else "auto"
    try:
        runner_settings = RunnerSettings(threads=threads, runtime=runtime, device=device, model_options=model_options,
                                         user_models={name: user_models[name] for name in models if name in user_models})
    except RunnerError as exc:
        _fail(str(exc))
    options = ModelServerOptions(
        models=tuple(dict.fromkeys(models)),
        host=host,
        port=port,
        runner=runner_settings,
        batching=BatchSettings(
            instances=instances,
            max_batch_size=max_batch_size,
            max_queue_delay_s=max_queue_delay_ms / 1000.0,
            max_queue_size=max_queue_size,
        ),
        compute_slots=None if compute_slots is None else str(compute_slots),
    )
    try:
        server = ModelServer(options)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except ConfigError as exc:
        _fail(f"--compute-slots: {exc}")
    except RunnerError as exc:  # the runtime or device is missing
        _fail(str(exc))
    server.start()
    # machine-readable first line: supervisors and tests read the port from it
    click.echo(f"chaoqing model server listening on {server.url} models={','.join(options.models)}", err=False)
    sys.stdout.flush()
    _run_until_signalled(server.serve_forever, server.stop)


def _user_models(config_path: str | None) -> dict[str, Any]:
    """The ``[models.NAME]`` tables of the config (file and CHAOQING_* variables); exits on a bad one."""
    from chaoqing.config import load_config
    from chaoqing.errors import ConfigError

    if config_path is None:
        return {}
    try:
        return dict(load_config(config_path).models)
    except ConfigError as exc:
        _fail(str(exc))
    return {}  # not reached: _fail exits


@cli.command(short_help="List the bundled models and their licenses.")
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON: every field, and where the files are.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML file whose [models.NAME] tables (model files of your own) are listed too.")
def models(as_json: bool, config_path: str | None) -> None:
    """List the bundled models: scale, license, whether it allows commercial use, source, and
    what each is for; and which runtimes are installed. With --config, the model files of
    your own too, with the license and source their tables give.

    Non-commercial weights (span-clearreality-x4) are marked; `unverified` means no license
    for those weights could be established. The sim-* simulators (tests, benchmarks) are not
    listed.
    """
    from chaoqing.modelserver.runners.listing import (
        installed_runtimes,
        list_models,
        list_user_models,
        models_table,
    )

    listed = list_models() + list_user_models(_user_models(config_path).values())
    runtimes = installed_runtimes()
    if as_json:
        click.echo(json.dumps({"models": listed, "runtimes": runtimes}, indent=2, ensure_ascii=False))
        return
    click.echo(models_table(listed, runtimes))


@cli.command()
@click.option("--host", default=None, help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="Port to listen on.  [default: 8080]")
@click.option("--preset", default=None, metavar="NAME",
              help="Default preset for requests that name none: fast, balanced, quality, or one defined "
                   "in the config's [presets.NAME].  [default: balanced]")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML file; CHAOQING_* environment variables override it.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="How much to log (stderr); info logs one line per request.  [default: info, or log_level in the config]")
@click.option("--log-format", default=None, type=click.Choice(["auto", "json", "text"]),
              help="auto: text on a terminal, JSON lines otherwise.  [default: auto, or log_format in the config]")
@click.option("--shutdown-grace-s", "shutdown_grace_s", default=None, type=click.FloatRange(0, 24 * 3600),
              help="On SIGTERM or Ctrl-C, how long requests in flight may still finish; those still running "
                   "then are answered 503 shutting_down.  [default: 60, or shutdown_grace_s in the config]")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Gateway processes sharing the port (the model servers start once, for all of them).")
@click.option("--listen-fd", "listen_fd", default=None, type=click.IntRange(0), hidden=True,
              help="A worker of `serve --workers`: accept on this inherited socket.")
def serve(host: str | None, port: int | None, preset: str | None, config_path: str | None, log_level: str | None,
          log_format: str | None, shutdown_grace_s: float | None, workers: int, listen_fd: int | None) -> None:
    """Run the HTTP API and web page.

    Without model endpoints in the config, starts a model-server child process per model
    (restarted if it crashes). SIGTERM or Ctrl-C stops accepting and drains the requests in
    flight for up to --shutdown-grace-s; a second signal exits at once. --workers N runs N
    gateway processes on the one port, restarted if they crash (docs/scale-out.md).
    """
    from chaoqing.config import load_config
    from chaoqing.errors import ConfigError, ModelsNotReady, SupervisorError
    from chaoqing.gateway.metrics import GatewayMetrics
    from chaoqing.gateway.pipeline import return_freed_memory_promptly
    from chaoqing.gateway.server import GatewayServer, open_models, wait_until_ready
    from chaoqing.protocol.listen import create_listener

    try:
        config = load_config(config_path, overrides={
            "host": host, "port": port, "preset": preset, "log_level": log_level, "log_format": log_format,
            "shutdown_grace_s": shutdown_grace_s,
        })
    except ConfigError as exc:
        _fail(str(exc))
    if listen_fd is not None:  # a worker of `serve --workers`: the parent bound the socket
        from gevent import socket as gevent_socket

        listener = gevent_socket.socket(fileno=listen_fd)
    else:
        try:  # before any model server starts: a busy port is said at once, not after their start-up
            listener = create_listener(config.host, config.port)
        except OSError as exc:
            _fail(_cannot_listen_message(config.host, config.port, exc))
    log_level = config.log_level  # flags, then CHAOQING_LOG_LEVEL, then the file, then info
    _setup_logging(log_level, config.log_format)
    if workers > 1:
        _serve_workers(config, listener, workers, config_path)
        return
    needed = config.models_needed()
    return_freed_memory_promptly()  # large photos: see docs/tiling.md
    metrics = GatewayMetrics()
    started = time.monotonic()
    try:
        remotes, supervisor = open_models(config, needed, metrics, log_level="warning" if log_level == "info" else log_level)
    except SupervisorError as exc:
        _fail(str(exc), 1)
    server = GatewayServer(config, remotes, supervisor, metrics, listener=listener)
    server.start()
    try:
        wait_until_ready(remotes, needed, timeout_s=120)
    except ModelsNotReady as exc:
        server.stop(1.0)
        _fail(str(exc), 1)
    _log.info("ready in %.1f s", time.monotonic() - started)
    if listen_fd is None:  # the parent of workers says it once for all of them
        click.echo(f"chaoqing serving on {server.url}  (web page: {server.url}/  API: {server.url}/openapi.json)")
        sys.stdout.flush()
    _run_until_signalled(server.serve_forever, server.stop, config.shutdown_grace_s)


WORKERS_READY_TIMEOUT_S = 180.0  # model servers load, then each worker checks they are ready


def _serve_workers(config: Any, listener: Any, count: int, config_path: str | None) -> None:
    """The parent of `serve --workers N`: model servers once, N workers on ``listener``, their
    restarts, and on a signal their drain and then the model servers' stop (see
    :mod:`chaoqing.gateway.workers`)."""

    from chaoqing.errors import SupervisorError
    from chaoqing.gateway.server import open_models
    from chaoqing.gateway.workers import GatewayWorkers, endpoint_environment, worker_command
    from chaoqing.protocol.listen import bound_port

    log_level = config.log_level
    try:
        remotes, supervisor = open_models(config, config.models_needed(),
                                          log_level="warning" if log_level == "info" else log_level)
    except SupervisorError as exc:
        _fail(str(exc), 1)
    endpoints = {name: remotes[name].endpoints for name in remotes.names()}
    remotes.close()
    url = f"http://{config.host}:{bound_port(listener)}"
    arguments = ["serve", "--host", config.host, "--port", str(bound_port(listener)), "--preset", config.preset,
                 "--log-level", log_level, "--log-format", config.log_format,
                 "--shutdown-grace-s", str(config.shutdown_grace_s), *(["--config", config_path] if config_path else [])]
    environment = endpoint_environment({name: [endpoint.url for endpoint in urls] for name, urls in endpoints.items()})
    pool = GatewayWorkers(count, listener.fileno(), worker_command(arguments), environment)

    from gevent.event import Event

    stopped = Event()

    def stop(grace_s: float) -> None:
        try:
            pool.stop(grace_s)
            listener.close()
            if supervisor is not None:
                supervisor.stop()
            _log.info("stopped %d workers", count)
        finally:
            stopped.set()

    try:
        pool.start()
    except SupervisorError as exc:
        stop(1.0)
        _fail(str(exc), 1)
    if not _wait_for_ready(url, WORKERS_READY_TIMEOUT_S):
        stop(1.0)
        _fail(f"the gateway workers were not ready after {WORKERS_READY_TIMEOUT_S:.0f} s", 1)
    click.echo(f"chaoqing serving on {url} with {count} workers (pids {', '.join(map(str, pool.pids()))})")
    sys.stdout.flush()
    _run_until_signalled(stopped.wait, stop, config.shutdown_grace_s)


def _wait_for_ready(url: str, timeout_s: float) -> bool:
    """Whether ``GET /readyz`` on the workers' own listening socket (``url``: the address this
    process bound, never one a user gave) answered 200 within ``timeout_s``. A plain socket and
    one request line: the serving modules import no HTTP client (tests/test_security.py)."""
    import socket

    import gevent

    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    request = f"GET /readyz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    ends_at = time.monotonic() + timeout_s
    while time.monotonic() < ends_at:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0) as connection:
                connection.sendall(request)
                status_line = connection.makefile("rb").readline()
            if status_line.split(b" ", 2)[1:2] == [b"200"]:
                return True
        except OSError:
            pass
        gevent.sleep(0.2)
    return False


def _cannot_listen_message(host: str, port: int, error: OSError) -> str:
    """One line saying why ``serve`` cannot listen on host:port, and what to do."""
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; choose another with --port (0 picks a free one)"
    if error.errno == errno.EACCES:
        return f"no permission to listen on port {port} on {host}; choose a port above 1023 with --port"
    return f"cannot listen on {host}:{port}: {error.strerror or error}; check --host, or choose another --port"


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "output", default=None, type=click.Path(path_type=Path),
              help="Output folder (default ./enhanced), or a file name for a single input.")
@click.option("--scale", default=None, type=click.FloatRange(1.0, 4.0), help="Output size over input size.  [default: 2]")
@click.option("--preset", default=None, metavar="NAME",
              help="fast: compact model, no faces; balanced: + 4xSPANkendata faces; quality: x4plus everywhere; or a "
                   "preset the config defines ([presets.NAME]; with --server, the server's).  [default: balanced]")
@click.option("--no-faces", is_flag=True, help="Do not enhance faces.")
@click.option("--format", "output_format", default=None, type=click.Choice(["png", "jpeg", "webp"]),
              help="Output format (default: jpeg for JPEG input, webp for WebP, else png).")
@click.option("--quality", default=None, type=click.IntRange(1, 100), help="JPEG/WebP quality.")
@click.option("--strip-metadata/--keep-metadata", "strip_metadata", default=None,
              help="Write no EXIF, XMP or ICC profile (colours converted to sRGB), or keep them, EXIF and XMP made "
                   "true of the output.  [default: keep; the config's [encode] strip_metadata]")
@click.option("--strip-gps/--keep-gps", "strip_gps", default=None,
              help="Keep EXIF and XMP but without their GPS positions.  [default: keep; [encode] strip_gps]")
@click.option("--face-strength", default=None, type=click.FloatRange(0, 1),
              help="How much of the face model's face to paste, 0 to 1 (the rest is the background's own face).  "
                   "[default: the preset's]")
@click.option("--face-fidelity", default=None, type=click.FloatRange(0, 1),
              help="A face restorer's fidelity weight (CodeFormer's), 0 to 1: 1 keeps the input face closest.  "
                   "[default: the preset's, else the model's]")
@click.option("--face-colour/--no-face-colour", "face_colour", default=None,
              help="Give enhanced faces the photo's own colours.  [default: the preset's, on]")
@click.option("--face-texture/--no-face-texture", "face_texture", default=None,
              help="Continue the photo's grain into enhanced faces.  [default: the preset's, on]")
@click.option("--identity-guard/--no-identity-guard", "identity_guard", default=None,
              help="Blend a restored face back toward the photo's own face until dlib's face descriptor says it is "
                   "the same person ([identity_guard] threshold).  [default: the preset's: on for face restorers]")
@click.option("--server", default=None, metavar="URL",
              help="Use a running gateway instead of local model servers (each photo sent as a job, with its progress).")
@click.option("--api-key", default=None, envvar="CHAOQING_API_KEY", help="API key for --server (or CHAOQING_API_KEY).")
@click.option("-j", "--jobs", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Photos processed at once (with --server, as many as the gateway's [jobs] max_running allow).")
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of input folders.")
@click.option("--overwrite", is_flag=True, help="Redo photos whose output already exists.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False), help="TOML file.")
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]),
              help="How much to log (stderr).")
def enhance(inputs: tuple[Path, ...], output: Path | None, scale: float | None, preset: str | None, no_faces: bool,
            output_format: str | None, quality: int | None, strip_metadata: bool | None, strip_gps: bool | None,
            face_strength: float | None, face_fidelity: float | None, face_colour: bool | None, face_texture: bool | None,
            identity_guard: bool | None, server: str | None, api_key: str | None, jobs: int, recursive: bool, overwrite: bool,
            config_path: str | None, log_level: str) -> None:
    """Enhance photos: files or folders of them.

    \b
    chaoqing enhance photo.jpg                  → enhanced/photo.jpg
    chaoqing enhance holiday/ -o big/ --scale 4 → big/…
    chaoqing enhance a.png --server http://gpu-box:8080

    Photos whose output exists are skipped (--overwrite redoes them). Shows a progress bar,
    and under it each photo's tiles, faces, stage and ETA (plain lines when not on a terminal),
    then a table of photos, faces and times. Exits with status 1 if any photo failed; each
    failure is named.
    """
    _setup_logging(log_level, "text")
    from chaoqing.batch import BatchJob, plan_outputs, run_batch
    from chaoqing.config import load_config
    from chaoqing.errors import ConfigError

    try:
        # a remote gateway knows its own presets: only a local run checks the name here
        config = load_config(config_path, overrides={"preset": None if server else preset, "scale": scale})
    except ConfigError as exc:
        _fail(str(exc))
    try:
        planned = plan_outputs(list(inputs), output, output_format, recursive=recursive)
    except ValueError as exc:
        _fail(str(exc))
    if not planned:
        _fail("no images found in the given inputs (jpg, jpeg, png, webp, gif, bmp, tif, tiff)")
    job = BatchJob(
        config=config, preset=preset or config.preset, scale=config.scale, faces=not no_faces, output_format=output_format,
        quality=quality, server=server, api_key=api_key, concurrency=jobs, overwrite=overwrite,
        strip_metadata=strip_metadata, strip_gps=strip_gps,
        face_strength=face_strength, face_colour=face_colour, face_texture=face_texture, face_fidelity=face_fidelity,
        identity_guard=identity_guard,
    )
    summary = run_batch(planned, job)
    sys.exit(0 if summary.failed == 0 else 1)


@cli.command(short_help="Check models, runtimes, GPUs and ports.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML file whose port and model endpoints to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check this machine: packages, model files, CPUs, GPUs, temp folder, ports.

    Prints an OK / MISSING table; exits with status 1 when something essential is missing.
    """
    from chaoqing.doctor import exit_status, format_report, report_json, run_checks

    checks = run_checks(config_path)
    click.echo(report_json(checks) if as_json else format_report(checks, click.style))
    sys.exit(exit_status(checks))


def _run_until_signalled(serve: Any, stop: Any, grace_s: float = 10.0) -> None:
    """Serve until SIGINT/SIGTERM; the first signal drains (``stop(grace_s)``), a second forces exit."""
    import gevent

    stopping: list[bool] = []

    def on_signal() -> None:
        if stopping:
            _log.warning("second signal: exiting now")
            sys.exit(1)
        stopping.append(True)
        _log.info("stopping (draining up to %g s; signal again to force)", grace_s)
        gevent.spawn(stop, grace_s)

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    try:
        serve()
    except KeyboardInterrupt:
        stop(1.0)


def _register_subcommand_groups() -> None:
    from chaoqing.bench import bench
    from chaoqing.ray_cli import ray

    cli.add_command(bench)
    cli.add_command(ray)


_register_subcommand_groups()


if __name__ == "__main__":  # python -m chaoqing.cli
    main()
