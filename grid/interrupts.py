"""Ctrl-C and SIGTERM for the grid's driver: stop the nodes within seconds, record them as KILLED, exit
130 / 143 (the shell's codes for a process ended by SIGINT / SIGTERM), never as a success.

Before the Tune experiment starts, a signal raises :class:`GridInterrupted` where the driver is. During
it, the first signal asks Tune to stop every trial (a Tune ``Stopper``: Tune ends the trials, their Train
worker groups with them, and returns from ``fit``), so the driver can close its MLflow runs; a second
signal exits at once. Tune's own SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``): it
would end the experiment as if it had finished. SIGTERM also replaces the handler Ray's core installs
in the driver, which dumped a C++ stack and aborted.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ray.tune.stopper import Stopper


class GridInterrupted(BaseException):
    """The driver got SIGINT / SIGTERM before its nodes ran (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: int) -> int:
    return 128 + signum


class Interrupts(Stopper):
    """Installed once by the driver; also the Tune stopper of its experiment."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_experiment = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """The handlers from before :meth:`install` (a caller that runs the grid in-process keeps its own)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: the user insists
            print(f"\n{signal.Signals(signum).name} again: exiting now; rerun the same command to resume",
                  file=sys.stderr, flush=True)
            os._exit(exit_status(self.signum))
        self.signum = signum
        if not self.in_experiment:
            raise GridInterrupted(signum)
        print(f"\n{signal.Signals(signum).name}: stopping the running nodes (again to exit at once) ...",
              file=sys.stderr, flush=True)

    # Stopper: checked by Tune every step of its loop.
    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.signum is not None

    def stop_all(self) -> bool:
        return self.signum is not None
