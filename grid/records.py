"""The driver's MLflow writes, off the scheduler's path and never waiting on a dead tracking store.

Every write the driver makes while the grid runs (a node's run opened, its epochs, its final metrics and
files, a retry, the parent's end) is a :class:`Job` on one background thread, taken in order. The Tune
callback that submits them never waits: a tracking server that stops answering used to freeze the driver
inside MLflow's HTTP retries (7 retries with back-off, ~4 minutes per call) and end the grid with a
traceback. Here:

- MLflow's HTTP retries are bounded (:data:`HTTP_SETTINGS`, unless the user set them);
- a job that fails while the store does not answer (:meth:`Recorder.reachable`) is *held*, not dropped,
  with one line saying so; nodes keep training and sealing;
- every ``probe_every`` seconds the thread asks again; once the store answers, the held jobs run, in
  order, with one line saying so;
- what is still held when the grid ends is counted (:meth:`Recorder.unrecorded`): the driver exits
  non-zero and the next invocation records those nodes from storage (their outputs are sealed there).

A job that fails while the store *does* answer (a file gone before its upload) is an error of its own,
kept with its label (:attr:`Recorder.errors`), as before.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from mlflow.tracking import MlflowClient

#: MLflow's defaults retry a dead server 7 times with back-off 2 (~4 minutes per call) and wait 120 s for an
#: answer. Bounded: 3 retries 1 + 2 + 4 s apart, 30 s per request (between bytes, so large uploads still fit).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _name, _value in HTTP_SETTINGS.items():
    os.environ.setdefault(_name, _value)

#: Seconds between two questions to a store that did not answer.
PROBE_EVERY_S = float(os.environ.get("OCCKD_TRACKER_PROBE_S", "10"))


@dataclass
class Job:
    """One write. ``node``: the node key it records (or "parent"); ``final``: the write that completes that
    record (a node left without it is counted unrecorded); ``size``: bytes it uploads (for the wait line)."""

    label: str
    node: str
    fn: Callable[[MlflowClient], None]
    final: bool = False
    size: int = 0


def short_reason(err: BaseException) -> str:
    """The cause of a failed MLflow call in a few words (MLflow's message holds the whole urllib3 chain)."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    for needle in ("Read timed out", "Connection aborted", "RemoteDisconnected", "Max retries exceeded"):
        if needle in text:
            return needle
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:160]


class Recorder:
    """One ordered writer thread with its own MlflowClient. ``say``: where its lines go (the driver's stderr)."""

    def __init__(self, tracking_uri: str, say: Callable[[str], None] | None = None,
                 probe_every: float = PROBE_EVERY_S) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.probe_every = probe_every
        self.errors: dict[str, str] = {}  # label -> error of a job that failed while the store answered
        self.down: str | None = None  # why the store is not answering, while it is not
        self._held: list[Job] = []
        self._recorded: set[str] = set()  # nodes whose final job ran
        self._final: set[str] = set()  # nodes with a final job submitted
        self._queue: queue.Queue[Job | str] = queue.Queue()
        self._busy = 0  # jobs submitted and neither done nor held
        self._bytes = 0
        self._cond = threading.Condition()
        self._abandoned = False
        self._last_probe = 0.0
        # A daemon: a driver that must leave (a second Ctrl-C, or after drain's deadline) is not held back
        # by an upload in flight; what it did not finish, the next invocation records.
        self._thread = threading.Thread(target=self._work, name="mlflow-records", daemon=True)
        self._thread.start()

    def __getstate__(self) -> dict[str, str]:
        """Tune pickles its callbacks (and so the tracker) into its experiment state: a copy carries no
        thread or queue, and records nothing."""
        return {"tracking_uri": self.tracking_uri}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["tracking_uri"])

    # The driver's side: never blocks, except drain.
    def submit(self, job: Job) -> None:
        with self._cond:
            self._busy += 1
            self._bytes += job.size
            if job.final:
                self._final.add(job.node)
        self._queue.put(job)

    def pending(self) -> tuple[int, int]:
        """Jobs not yet done (held ones included) and the bytes they upload."""
        with self._cond:
            return self._busy + len(self._held), self._bytes

    def drain(self, say: Callable[[str], None] | None = None, *, retry_held: bool = True) -> dict[str, str]:
        """Wait until every job has run or is held; then, if some are held, ask the store once more and run
        them if it answers. The errors of jobs that failed while the store answered (label -> error).
        Waits in short steps, so that a signal reaches the driver's handler while it waits."""
        count, size = self.pending()
        if count and say:
            say(f"waiting for {count} MLflow record(s), {size / 1e6:.0f} MB to upload")
        self._wait_idle()
        if retry_held and self._held:
            with self._cond:
                self._busy += 1
            self._queue.put("retry")
            self._wait_idle()
        return dict(self.errors)

    def unrecorded(self) -> list[str]:
        """Nodes (and "parent") whose final record is not in the store: held through an outage, or never
        run because the driver left."""
        with self._cond:
            return sorted(self._final - self._recorded - set(self.errors))

    def abandon(self) -> None:
        """Stop taking jobs (the driver is leaving): the one in flight may finish, the rest are left."""
        self._abandoned = True

    def _wait_idle(self) -> None:
        with self._cond:
            # A writer thread that died (a bug, or its ``say`` failing) will never finish the jobs: the driver
            # must not wait for it forever; what it left is counted unrecorded.
            while self._busy and self._thread.is_alive():
                self._cond.wait(timeout=0.5)

    # The thread's side.
    def reachable(self) -> bool:
        """Does the store answer? A server: its /health within 3 s. A database: one cheap read."""
        self._last_probe = time.monotonic()
        if self.tracking_uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health", timeout=3) as response:
                    response.read()
                return True
            except (OSError, urllib.error.URLError):
                return False
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001 - any failure to read is "does not answer"
            return False

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.probe_every if self._held else None)
            except queue.Empty:
                item = None
            if self._abandoned:
                self._done(item, ran=False)
                continue
            if self._held and (item == "retry" or time.monotonic() - self._last_probe >= self.probe_every):
                self._replay_held()
            if isinstance(item, Job):
                if self._held:  # still down: behind the held ones, in order
                    with self._cond:
                        self._held.append(item)
                    self._done(item, ran=False)
                else:
                    self._done(item, ran=self._run(item))
            elif item == "retry":
                self._done(item)

    def _done(self, item: Job | str | None, ran: bool = True) -> None:
        """``item`` left the queue: it ran (its bytes are up) or is held."""
        if item is None:
            return
        with self._cond:
            self._busy -= 1
            if isinstance(item, Job) and ran:
                self._bytes -= item.size
            self._cond.notify_all()

    def _run(self, job: Job) -> bool:
        """Run one job; False if the store stopped answering (the job is then held)."""
        try:
            job.fn(self.client)
        except Exception as err:  # noqa: BLE001 - sorted below: an outage, or this job's own error
            if self.reachable():
                self.errors[job.label] = f"{type(err).__name__}: {err}"[:2000]
            else:
                if self.down is None:
                    self.down = short_reason(err)
                    self.say(f"MLflow tracking store {self.tracking_uri} is not answering ({self.down}): the nodes "
                             f"go on training and sealing; their records wait until it answers (asked every "
                             f"{self.probe_every:g} s), or the next run records them")
                with self._cond:
                    self._held.insert(0, job)
                return False
        if job.final:
            with self._cond:
                self._recorded.add(job.node)
        return True

    def _replay_held(self) -> None:
        if not self.reachable():
            return
        with self._cond:
            count = len(self._held)
        self.say(f"MLflow tracking store {self.tracking_uri} answers again: writing the {count} record(s) held")
        self.down = None
        while self._held and not self._abandoned:
            with self._cond:
                job = self._held.pop(0)
            if not self._run(job):  # down again: it went back to the front
                return
            with self._cond:
                self._bytes -= job.size
                self._cond.notify_all()


def describe_unrecorded(keys: list[str], tracking_uri: str) -> str:
    """The exit's line for records an outage kept out of the store."""
    nodes = [k for k in keys if k != "parent"]
    what = f"{len(nodes)} node(s)" + (" and the grid's parent run" if "parent" in keys else "")
    return (f"{what} not recorded in MLflow ({tracking_uri} did not answer): their outputs are sealed on storage; "
            f"rerun the same command once the store answers and it records them (nothing is trained again)"
            + (f": {', '.join(nodes[:8])}{' ...' if len(nodes) > 8 else ''}" if nodes else ""))

