"""``chaoqing serve --workers N``: N gateway processes accepting on one listening socket.

One gevent process computes nothing but still spends CPU per request (decoding, resampling,
compositing and encoding on its threadpool; JSON and HTTP on its hub), and Python runs one
thread at a time: on a machine with more cores, N processes serve more. The parent:

- binds the socket once (so a busy port is said at once) and starts the embedded model
  servers once (:class:`chaoqing.gateway.supervisor.ModelServerSupervisor`), not per worker;
- starts N workers: ``chaoqing serve`` again, each given the socket's descriptor
  (``--listen-fd``, inherited) and every model's endpoint in ``CHAOQING_ENDPOINTS__<MODEL>``
  (so a worker starts no model server); the kernel hands each new connection to one of the
  workers waiting in accept;
- restarts a worker that exits unexpectedly, with a growing back-off, on the same socket: the
  others keep serving meanwhile, and connections queued in the socket wait for whichever
  worker accepts next, none are lost;
- on SIGTERM or Ctrl-C, forwards the signal to every worker (each drains its requests for
  ``shutdown_grace_s``, as one gateway does), waits for them, and then stops the model
  servers.

Workers share the jobs spool (each runs jobs from it, as gunicorn's workers do). Each keeps
its own metrics: ``GET /metrics`` answers from whichever worker takes the connection, with
``chaoqing_gateway_process{pid}`` saying which.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gevent
from gevent import subprocess
from gevent.event import Event

from chaoqing.errors import SupervisorError
from chaoqing.gateway.supervisor import die_with_parent, restart_backoff

__all__ = ["GatewayWorkers", "endpoint_environment", "worker_command"]

_log = logging.getLogger("chaoqing.gateway.workers")

# after the drain a worker stops its job runner and closes its connections; then it is killed
STOP_MARGIN_S = 10.0
ENDPOINT_VARIABLE_PREFIX = "CHAOQING_ENDPOINTS__"  # chaoqing.config: a model's endpoints from the environment


def endpoint_environment(endpoints: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``CHAOQING_ENDPOINTS__<MODEL>`` variables naming ``endpoints`` (model → URLs)."""
    return {
        ENDPOINT_VARIABLE_PREFIX + model.upper().replace("-", "_"): ",".join(urls)
        for model, urls in endpoints.items()
    }


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    watcher: gevent.Greenlet | None = None


class GatewayWorkers:
    """N worker processes on the inherited socket ``listen_fd``. Hub-thread only.

    ``command`` is the worker's command line without ``--listen-fd``; ``environment`` is added
    to this process's.
    """

    def __init__(self, count: int, listen_fd: int, command: Sequence[str], environment: Mapping[str, str]) -> None:
        if count < 1:
            raise ValueError(f"workers must be >= 1, got {count}")
        self.listen_fd = listen_fd
        self.command = [*command, "--listen-fd", str(listen_fd)]
        self.environment = {**os.environ, **environment, "PYTHONUNBUFFERED": "1"}
        self._workers = [_Worker(index) for index in range(count)]
        self._stopping = False
        self._all_exited = Event()

    def _launch(self, worker: _Worker) -> None:
        try:
            worker.process = subprocess.Popen(
                self.command, env=self.environment, stdin=subprocess.DEVNULL, pass_fds=(self.listen_fd,),
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
                # a session of its own: Ctrl-C reaches the parent, which forwards it once
                start_new_session=True,
            )
        except OSError as exc:
            raise SupervisorError(f"cannot start gateway worker {worker.index}: {exc.strerror or exc}") from exc
        worker.started_at = time.monotonic()
        _log.info("gateway worker %d started (pid %d)", worker.index, worker.process.pid)

    def start(self) -> None:
        """Start every worker. Raises SupervisorError when one cannot be started."""
        for worker in self._workers:
            self._launch(worker)
        for worker in self._workers:
            worker.watcher = gevent.spawn(self._watch, worker)

    def _watch(self, worker: _Worker) -> None:
        while True:
            assert worker.process is not None
            code = worker.process.wait()
            if self._stopping:
                return
            delay, worker.restarts = restart_backoff(worker.started_at, worker.restarts)
            _log.error("gateway worker %d (pid %d) exited with %s; restarting in %.1f s",
                       worker.index, worker.process.pid, code, delay)
            gevent.sleep(delay)
            if self._stopping:
                return
            try:
                self._launch(worker)
            except SupervisorError as exc:
                _log.error("%s", exc)
                return

    def pids(self) -> list[int]:
        """The workers' process ids (a restarted worker's new one)."""
        return [worker.process.pid for worker in self._workers if worker.process is not None]

    def wait(self) -> None:
        """Block until every worker has exited for good (after :meth:`stop`)."""
        self._all_exited.wait()

    def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each drains for ``grace_s``), wait, SIGKILL what is left."""
        self._stopping = True
        processes = [worker.process for worker in self._workers if worker.process is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        ends_at = time.monotonic() + grace_s + STOP_MARGIN_S
        for process in processes:
            try:
                process.wait(timeout=max(0.1, ends_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log.warning("gateway worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        for worker in self._workers:
            if worker.watcher is not None:
                worker.watcher.kill(block=False)
        self._all_exited.set()


def worker_command(arguments: Sequence[str]) -> list[str]:
    """This program run again with ``arguments`` (``chaoqing serve ...``)."""
    return [sys.executable, "-m", "chaoqing", *arguments]
