"""Embedded model servers: child processes started, watched and restarted by the gateway.

``chaoqing serve`` and ``chaoqing enhance`` with no model endpoints configured start one
``chaoqing model-server`` process per model (a crash takes one model down, not all), on
127.0.0.1 and a free port; the child prints its URL on its first line. A child that exits
unexpectedly is started again on the same port (so the gateway's endpoints stay valid),
with a growing back-off. Children die with the parent (PR_SET_PDEATHSIG on Linux), and
:meth:`ModelServerSupervisor.stop` terminates them gracefully, then kills stragglers.

Every child gets the same server settings but its runtime and device: ``[model_server]``'s
``runtime`` and ``device``, or the model's own entry in ``[model_server.runtimes]`` and
``[model_server.devices]`` (``--runtime``, ``--device``); a runtime or device that is missing
stops that child at start-up with one line on stderr saying what to install. Only a simulator
(a ``sim-*`` model, for tests and benchmarks) also gets ``[model_server]``'s ``sim_latency_ms`` and ``sim_faces``, as
``--model-option`` settings of its own. A real model is never started with them.

A child may serve more models than its own (``companions``): the face detector's child also
serves dlib's face descriptor (``--model centerface --model face-descriptor``), which the
identity guard calls (:mod:`chaoqing.gateway.stages.identity`). The two are called together,
per face, and are small (the descriptor is ~20 ms a face on one thread, 22 MB of weights), so
one process costs less than two — and a remote detector's server, started the same way, is
where the gateway looks for the descriptor when ``[endpoints]`` names none. The companions
get the child's runtime and device, which they ignore (dlib runs on the CPU).

A model file of the user's own (``[models.NAME]``, :class:`chaoqing.config.UserModel`) runs on
its table's runtime: its child gets ``--runtime`` from there and ``--config`` naming a TOML file
the supervisor writes with that table alone (paths absolute), in a private folder that
:meth:`stop` removes. A file that is missing or malformed stops that child before it listens,
with one line on stderr naming the file.

The compute budget: with ``[model_server] compute_slots`` N > 0 on the CPU, :meth:`start`
makes a private folder of N slot files (in ``$XDG_RUNTIME_DIR``, else the temp folder) and
passes it to every child as ``--compute-slots``, with ``--threads`` cores / N when
``threads`` is 0, so that the children together never compute more than N heavy batches on
that many threads (:mod:`chaoqing.modelserver.compute` says why and how); :meth:`stop`
removes it. A restarted child gets the same folder; a child that dies holding a slot loses
its lock with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gevent
from gevent import subprocess

from chaoqing.config import ModelServerSettings, UserModel, user_models_toml
from chaoqing.errors import SupervisorError

__all__ = ["ModelServerSupervisor", "die_with_parent"]

_log = logging.getLogger("chaoqing.gateway.supervisor")

LISTENING_PATTERN = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_AFTER_S = 30.0  # a child that ran this long resets the back-off


def restart_backoff(started_at: float, restarts: int) -> tuple[float, int]:
    """For a process (a model server here, a gateway worker in :mod:`chaoqing.gateway.workers`)
    that started at ``started_at`` (monotonic) and has been restarted ``restarts`` times in a
    row: how long to wait before the next start, and the count after it. One that ran
    :data:`STABLE_AFTER_S` counts from 0 again."""
    if time.monotonic() - started_at > STABLE_AFTER_S:
        restarts = 0
    return RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)], restarts + 1
PR_SET_PDEATHSIG = 1
SIMULATOR_PREFIX = "sim-"  # how chaoqing.modelserver.runners names its simulators
SLOT_FILE_PREFIX = "slot-"  # how chaoqing.modelserver.compute names its slot files
CPU_DEVICE = "cpu"  # the budget shares CPU cores; a GPU device gets none
RUNTIME_DIRECTORY_VARIABLE = "XDG_RUNTIME_DIR"
USER_MODELS_FILE = "models.toml"  # the user models' tables, for the children's --config



def die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _model_options(model: str, settings: ModelServerSettings) -> list[str]:
    """The ``--model-option`` arguments of ``model``: the sim settings for a simulator, none otherwise."""
    if not model.startswith(SIMULATOR_PREFIX):
        return []
    return ["--model-option", f"latency_ms={settings.sim_latency_ms}", "--model-option", f"faces={settings.sim_faces}"]


@dataclass
class _Child:
    model: str
    port: int = 0
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    watcher: gevent.Greenlet | None = None
    extra_arguments: tuple[str, ...] = field(default_factory=tuple)
    companions: tuple[str, ...] = ()  # more models the same process serves


class ModelServerSupervisor:
    """Starts and watches one model-server process per model. Hub-thread only."""

    def __init__(self, models: Iterable[str], settings: ModelServerSettings, *, log_level: str = "warning",
                 threads_per_model: int | None = None, user_models: Mapping[str, UserModel] | None = None,
                 companions: Mapping[str, Sequence[str]] | None = None) -> None:
        self.settings = settings
        self.log_level = log_level
        models = tuple(models)
        # the budget shares CPU cores: it is made when a model computes on the CPU, for those that do
        on_cpu = any(settings.device_for(model) == CPU_DEVICE for model in models)
        self.compute_slots = settings.compute_slots if on_cpu else 0
        if threads_per_model is None:
            threads_per_model = settings.threads
            if threads_per_model == 0 and self.compute_slots:
                threads_per_model = max(1, len(os.sched_getaffinity(0)) // self.compute_slots)
        self.threads_per_model = threads_per_model
        self.compute_slots_directory: Path | None = None  # made by start() when there is a budget
        served_along = {name for names in (companions or {}).values() for name in names}
        self._children = {model: _Child(model, companions=tuple((companions or {}).get(model, ())))
                          for model in dict.fromkeys(models) if model not in served_along}
        self.user_models = {name: model for name, model in (user_models or {}).items() if name in self._children}
        self.user_models_directory: Path | None = None  # made by start() when a child serves a user model
        self._stopping = False

    @property
    def endpoints(self) -> Mapping[str, tuple[str, ...]]:
        """Model name → (URL,), for the gateway's remote client."""
        return {model: (child.url,) for child in self._children.values() if child.url
                for model in (child.model, *child.companions)}

    def _command(self, child: _Child) -> list[str]:
        settings = self.settings
        return [
            sys.executable, "-m", "chaoqing", "model-server",
            "--model", child.model,
            *(argument for companion in child.companions for argument in ("--model", companion)),
            "--host", "127.0.0.1",
            "--port", str(child.port),
            "--threads", str(self.threads_per_model),
            "--runtime", self._runtime_for(child.model),
            "--device", settings.device_for(child.model),
            "--instances", str(settings.instances),
            "--max-batch-size", str(settings.max_batch_size),
            "--max-queue-delay-ms", str(settings.max_queue_delay_ms),
            "--max-queue-size", str(settings.max_queue_size),
            *_model_options(child.model, settings),
            *(["--compute-slots", str(self.compute_slots_directory)]
              if self.compute_slots_directory and settings.device_for(child.model) == CPU_DEVICE else []),
            *(["--config", str(self.user_models_directory / USER_MODELS_FILE)]
              if self.user_models_directory and child.model in self.user_models else []),
            "--log-level", self.log_level,
            *child.extra_arguments,
        ]

    def _runtime_for(self, model: str) -> str:
        """A user model's own runtime, else the settings' for the model."""
        user_model = self.user_models.get(model)
        return user_model.runtime if user_model else self.settings.runtime_for(model)

    def _launch(self, child: _Child) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            self._command(child), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=environment,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            # a session of its own: Ctrl-C in a terminal reaches the gateway only, which drains
            # its requests before it stops the children
            start_new_session=True,
        )
        child.process = process
        child.started_at = time.monotonic()
        assert process.stdout is not None
        line = b""
        with gevent.Timeout(START_TIMEOUT_S, False):
            line = process.stdout.readline()
        match = LISTENING_PATTERN.search(line.decode("utf-8", "replace"))
        if not match:
            process.kill()
            process.wait()
            raise SupervisorError(
                f"model server for {child.model} did not start (exit code {process.returncode}); see its log above"
            )
        child.url = match.group(1)
        child.port = int(child.url.rsplit(":", 1)[1])
        _log.info("model server %s started at %s (pid %d)", child.model, child.url, process.pid)

    def start(self) -> None:
        """Start every child (concurrently) and return once each has printed its URL.

        Raises SupervisorError when one does not start (or the compute slots cannot be made);
        the others are stopped then.
        """
        if self.compute_slots and self.compute_slots_directory is None:
            self.compute_slots_directory = _make_slot_files(self.compute_slots)
        if self.user_models and self.user_models_directory is None:
            self.user_models_directory = _write_user_models(self.user_models.values())
        jobs = [gevent.spawn(self._launch, child) for child in self._children.values()]
        gevent.joinall(jobs)
        failed = [job.exception for job in jobs if not job.successful()]
        if failed:
            self.stop(grace_s=2.0)
            error = failed[0]
            raise error if isinstance(error, SupervisorError) else SupervisorError(str(error))
        for child in self._children.values():
            child.watcher = gevent.spawn(self._watch, child)

    def _watch(self, child: _Child) -> None:
        while not self._stopping:
            assert child.process is not None
            code = child.process.wait()
            if self._stopping:
                return
            delay, child.restarts = restart_backoff(child.started_at, child.restarts)
            _log.error("model server %s exited with %s; restarting in %.1f s", child.model, code, delay)
            gevent.sleep(delay)
            try:
                self._launch(child)
            except SupervisorError as exc:
                _log.error("%s", exc)

    def pids(self) -> dict[str, int]:
        return {model: child.process.pid for model, child in self._children.items() if child.process is not None}

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child, wait up to ``grace_s``, then SIGKILL what is left."""
        self._stopping = True
        for child in self._children.values():
            if child.watcher is not None:
                child.watcher.kill(block=False)
        processes = [child.process for child in self._children.values() if child.process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        ends_at = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, ends_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self.compute_slots_directory is not None:
            shutil.rmtree(self.compute_slots_directory, ignore_errors=True)
            self.compute_slots_directory = None
        if self.user_models_directory is not None:
            shutil.rmtree(self.user_models_directory, ignore_errors=True)
            self.user_models_directory = None


def _make_slot_files(slots: int) -> Path:
    """A private folder with ``slots`` slot files; raises SupervisorError when it cannot be made."""
    runtime_directory = os.environ.get(RUNTIME_DIRECTORY_VARIABLE, "")
    parent = runtime_directory if runtime_directory and os.path.isdir(runtime_directory) else None
    try:
        directory = Path(tempfile.mkdtemp(prefix="chaoqing-compute-", dir=parent))
        for index in range(slots):
            (directory / f"{SLOT_FILE_PREFIX}{index}").touch()
    except OSError as exc:
        raise SupervisorError(f"cannot make the model servers' compute slots: {exc.strerror or exc}") from exc
    return directory


def _write_user_models(models: Iterable[UserModel]) -> Path:
    """A private folder holding the user models' tables as TOML; raises SupervisorError when it cannot be made."""
    try:
        directory = Path(tempfile.mkdtemp(prefix="chaoqing-models-"))
        (directory / USER_MODELS_FILE).write_text(user_models_toml(models), encoding="utf-8")
    except OSError as exc:
        raise SupervisorError(f"cannot write the model servers' user model tables: {exc.strerror or exc}") from exc
    return directory
