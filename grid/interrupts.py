"""Ctrl-C and SIGTERM for the grid's driver: stop the nodes within seconds, record them as KILLED, exit
130 / 143 (the shell's codes for a process ended by SIGINT / SIGTERM), never as a success.

Before the Tune experiment starts, a signal raises :class:`GridInterrupted` where the driver is. During
it, the first signal asks Tune to stop every trial (a Tune ``Stopper``: Tune ends the trials, their Train
worker groups with them, and returns from ``fit``), so the driver can close its MLflow runs; a second
signal exits at once. Tune's own SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``): it
would end the experiment as if it had finished. SIGTERM also replaces the handler Ray's core installs
in the driver, which dumped a C++ stack and aborted.

A deadline backs the first signal up: if the driver has not exited ``grace_s`` seconds after it (default
20, ``OCCKD_STOP_GRACE_S``), it runs its ``on_overdue`` action (the driver's: end every MLflow run it left
open as KILLED) and exits. A batch system's cancel (Slurm's ``scancel``) signals every process of the job
at once, Ray's own too: a driver whose Ray is gone can wait a minute on it, while Slurm kills whatever is
left after its KillWait (30 s by default), which would leave the runs RUNNING.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

from ray.tune.stopper import Stopper


class GridInterrupted(BaseException):
    """The driver got SIGINT / SIGTERM before its nodes ran (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: int) -> int:
    return 128 + signum


def stop_grace_s() -> float:
    """Seconds the driver has after the first signal before it closes its runs and exits regardless."""
    raw = os.environ.get("OCCKD_STOP_GRACE_S", "20")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"OCCKD_STOP_GRACE_S must be a number of seconds > 0, got {raw!r}")
    return value


class Interrupts(Stopper):
    """Installed once by the driver; also the Tune stopper of its experiment."""

    def __init__(self, grace_s: float | None = None) -> None:
        self.signum: int | None = None
        self.in_experiment = False
        self._previous: dict[int, Any] = {}
        self.grace_s = stop_grace_s() if grace_s is None else grace_s
        #: Called from a timer thread when the driver is still there ``grace_s`` after the first signal.
        self.on_overdue: Callable[[], None] | None = None
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """The handlers from before :meth:`install` (a caller that runs the grid in-process keeps its own);
        the deadline is off once the driver has returned."""
        if self._timer is not None:
            self._timer.cancel()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: the user insists
            print(f"\n{signal.Signals(signum).name} again: exiting now; rerun the same command to resume",
                  file=sys.stderr, flush=True)
            os._exit(exit_status(self.signum))
        self.signum = signum
        self._timer = threading.Timer(self.grace_s, self._overdue)
        self._timer.daemon = True
        self._timer.start()
        if not self.in_experiment:
            raise GridInterrupted(signum)
        print(f"\n{signal.Signals(signum).name}: stopping the running nodes (again to exit at once) ...",
              file=sys.stderr, flush=True)

    def _overdue(self) -> None:
        assert self.signum is not None
        print(f"\n{signal.Signals(self.signum).name}: the driver did not stop within {self.grace_s:g} s (is Ray "
              "gone?): closing its MLflow runs as KILLED and exiting; rerun the same command to resume",
              file=sys.stderr, flush=True)
        try:
            if self.on_overdue is not None:
                self.on_overdue()
        except BaseException as err:  # noqa: BLE001 - said, then the exit all the same
            print(f"could not close the runs: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        finally:
            os._exit(exit_status(self.signum))

    def __getstate__(self) -> dict:
        """What Tune may save: it writes its stopper into every experiment checkpoint (cloudpickled), and the
        deadline's timer (a lock) and the closing action (the driver's tracker) are live objects of this
        process that no other process could use. Saving them made the first checkpoint after a Ctrl-C raise
        ``cannot pickle '_thread.lock'`` inside ``Tuner.fit``, so the driver crashed instead of stopping."""
        return {"signum": self.signum, "in_experiment": self.in_experiment, "grace_s": self.grace_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(grace_s=state["grace_s"])
        self.signum, self.in_experiment = state["signum"], state["in_experiment"]

    # Stopper: checked by Tune every step of its loop.
    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.signum is not None

    def stop_all(self) -> bool:
        return self.signum is not None
