"""The compute budget: slots that the model servers on one machine share, so that concurrent
calls never oversubscribe its cores.

Why. ``chaoqing serve`` starts one model-server process per model, and each used to start
its runtime with every core. A balanced request runs the compact background upscale, the
detector and x4plus on each face at the same time, so a 2-core machine ran 5 compute
threads on 2 cores; ncnn's threads then wait on each other, and chaoqing took 1.15–1.32× as
long as a script doing the same calls in turn (shared/DESIGN.md, "Measured since the first
release"). Measured here since: ncnn also gains only 1.2–1.5× from a second thread (x4plus on
a 128 px face: 5.5 s on 2 threads, 8.1 s on 1), so on a CPU the most work per second comes
from one call per core side by side, each on one thread, and never more calls than that.

How. A budget is a folder of ``slot-N`` files, one per slot, that the gateway's supervisor
creates for its embedded model servers and passes to each (``chaoqing model-server
--compute-slots DIR``). A batch of a heavy model holds one slot, an exclusive ``flock`` on
one of the files, for as long as it computes, and runs on ``cores / slots`` threads (the
supervisor passes ``--threads``). Light work holds none: dlib's single-threaded HOG detection,
the gateway's decode, resampling, composite and encode overlap the model calls
(:attr:`chaoqing.modelserver.runners.base.Runner.holds_compute_slot`).

Why ``flock`` on files rather than a POSIX named semaphore: the kernel drops a process's
locks when it exits, however it exits, so a model server that crashes or is killed while it
computes never leaks a slot; a semaphore's count would stay taken forever. And a folder
needs nothing beyond the standard library, works for any set of processes that can read it
(standalone model servers too), and shows its size in ``ls``.

Waiting is cooperative: a greenlet tries every slot without blocking (a few microseconds)
and, when all are held, sleeps :data:`POLL_INTERVAL_S` on the hub and tries again; in one
process waiters take turns in arrival order (a gevent lock), across processes the first to
try after a release wins. A lock taken per open file description means two budgets opened
in one process exclude each other exactly as two processes do (the tests rely on it).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gevent
from gevent.lock import Semaphore

from chaoqing.errors import ConfigError

__all__ = ["POLL_INTERVAL_S", "SLOT_FILE_PREFIX", "ComputeBudget", "ComputeSlot", "create_slot_files"]

SLOT_FILE_PREFIX = "slot-"  # slot-0, slot-1, ...; the supervisor writes the same names
# A heavy batch computes for 0.1–15 s on a CPU (a compact tile to an x4plus face), so a slot
# freed is taken again within at most 5 % of even the shortest; a try costs microseconds.
POLL_INTERVAL_S = 0.005


def _always() -> bool:
    return True


@dataclass(frozen=True)
class ComputeSlot:
    """One slot held by this process: its number and how long it was waited for."""

    index: int
    waited_s: float


def create_slot_files(directory: Path, slots: int) -> None:
    """Make ``directory`` (if needed) with ``slots`` empty slot files.

    Raises ConfigError when ``slots`` is under 1 or the folder cannot be written.
    """
    if slots < 1:
        raise ConfigError(f"a compute budget needs at least 1 slot, not {slots}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(slots):
            (directory / f"{SLOT_FILE_PREFIX}{index}").touch()
    except OSError as exc:
        raise ConfigError(f"cannot create compute slots in {directory}: {exc.strerror or exc}") from exc


class ComputeBudget:
    """The slot files of ``directory``, opened by this process. Hub-thread only.

    Raises ConfigError when the folder is missing, unreadable or holds no slot files.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            names = sorted(
                (path for path in self.directory.iterdir() if path.name.startswith(SLOT_FILE_PREFIX)),
                key=lambda path: path.name,
            )
        except OSError as exc:
            raise ConfigError(f"compute slots: cannot read {self.directory}: {exc.strerror or exc}") from exc
        if not names:
            raise ConfigError(
                f"compute slots: {self.directory} holds no {SLOT_FILE_PREFIX}N files "
                f"(create one per slot, e.g. touch {self.directory}/{SLOT_FILE_PREFIX}0)"
            )
        try:
            self._descriptors = [os.open(path, os.O_RDWR | os.O_CLOEXEC) for path in names]
        except OSError as exc:
            raise ConfigError(f"compute slots: cannot open the slot files in {self.directory}: {exc.strerror}") from exc
        self._held = [False] * len(self._descriptors)
        self._turn = Semaphore()  # waiters of this process take turns in arrival order
        self.waiting = 0  # greenlets of this process waiting for a slot now
        self.acquired_total = 0  # slots taken by this process so far
        self.closed = False

    @property
    def slots(self) -> int:
        return len(self._descriptors)

    @property
    def held(self) -> int:
        """Slots this process holds now."""
        return sum(self._held)

    def try_acquire(self) -> int | None:
        """Take a free slot without waiting: its index, or None when every slot is held."""
        if self.closed:
            return None
        for index, descriptor in enumerate(self._descriptors):
            if self._held[index]:
                continue  # ours already: flock on the same descriptor would not exclude
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held[index] = True
            self.acquired_total += 1
            return index
        return None

    def acquire(self, wanted: Callable[[], bool] = _always) -> ComputeSlot | None:
        """Wait (cooperatively) for a slot and take it; None when ``wanted()`` turns False first
        (the work the slot was for is gone) or the budget is closed."""
        started = time.monotonic()
        self.waiting += 1
        try:
            with self._turn:
                while not self.closed and wanted():
                    index = self.try_acquire()
                    if index is not None:
                        return ComputeSlot(index, time.monotonic() - started)
                    gevent.sleep(POLL_INTERVAL_S)
                return None
        finally:
            self.waiting -= 1

    def release(self, slot: ComputeSlot | int) -> None:
        """Give a slot back (a slot not held, or a closed budget: nothing to do)."""
        index = slot.index if isinstance(slot, ComputeSlot) else slot
        if self.closed or not self._held[index]:
            return
        fcntl.flock(self._descriptors[index], fcntl.LOCK_UN)
        self._held[index] = False

    def close(self) -> None:
        """Release every slot and close the files."""
        if self.closed:
            return
        self.closed = True
        for descriptor in self._descriptors:
            os.close(descriptor)  # closing the last descriptor of a file drops its lock
        self._held = [False] * len(self._descriptors)
