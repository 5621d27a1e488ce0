"""Progress of a run: a one-line display, and ``OUT/_job/progress.json`` for ``vidpipe status``.

``progress.json`` is rewritten atomically every few seconds by a background thread (and at every
wave's end); it holds this run's counters and a heartbeat, so that ``vidpipe status`` can tell a
live run from a dead one and estimate the rate and the time left.  It is informative only: the
committed tables are the truth for which videos are done or failed.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

if TYPE_CHECKING:
    from jobs.output import OutputDir


def count_of(n: int, noun: str) -> str:
    """``1 video``, ``2 videos``: a count and its noun (nouns that take an ``s``)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


PROGRESS_FILE = "_job/progress.json"
RunState = Literal["running", "finished", "failed", "interrupted"]


class _Counts(Protocol):
    videos_done: int
    videos_failed: int
    video_seconds_done: float

    @property
    def pending_videos(self) -> int: ...


def pid_namespace() -> int | None:
    """This process's pid namespace (Linux), or None."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@functools.cache
def boot_id() -> str | None:
    """This machine's boot (Linux: a random id drawn at each boot), or None: two machines of one host name, or
    one machine before and after a reboot, differ in it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def this_process() -> dict[str, object]:
    """What names this process in a record that another process may have to judge alive or ended."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": pid_namespace(),
            "pid_started": process_start(os.getpid()), "boot_id": boot_id()}


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def _supervisor() -> int | None:
    from jobs import supervise

    return supervise.SUPERVISOR_PID


def recorded_here(progress: dict[str, object]) -> bool:
    """Whether a progress.json was written on this host, in this pid namespace: only then do its pids
    name processes this one can look up (a container with the host's name has pids of its own)."""
    ns, boot = progress.get("pid_ns"), progress.get("boot_id")
    return (progress.get("host") == socket.gethostname() and ns is not None and ns == pid_namespace()
            and boot in (None, boot_id()))  # written before 2026-12-03: no boot id


def pid_ended(pid: object, started: object) -> bool:
    """Whether process ``pid``, which started at ``started`` (:func:`process_start`), is known to have ended: its
    pid names no process, or one that started at another time (reused).  Only on that evidence: where /proc hides
    another user's processes (``hidepid``) or cannot be read, False."""
    if not isinstance(pid, int) or pid <= 0 or started is None:
        return False
    now = process_start(pid)
    if now is not None:
        return now != started
    try:
        os.kill(pid, 0)  # no signal sent: only whether the pid names a process
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: another user's process, alive
        return False
    return False  # there, its start unreadable


def driver_ended(record: dict[str, object]) -> bool:
    """Whether the process a record names (``pid``: a run's driver, the one process that writes to OUT) is known to
    have ended: recorded in this boot of this machine, in this pid namespace, and gone (:func:`pid_ended`).  False
    whenever that cannot be known (another machine, a record without these fields).  Machines cloned from one
    running snapshot share a boot id and host name: there, a run on the clone can take a lease of the original's."""
    return (recorded_here(record) and record.get("boot_id") is not None
            and pid_ended(record.get("pid"), record.get("pid_started")))


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Progress:
    """Prints at most once a second on a terminal (in place), every 10 s to a log file or pipe.

    ``total`` may be None while discovery is still going (the line then shows the count so far).
    """

    def __init__(self, total_videos: int | None, stream: TextIO, *, enabled: bool = True) -> None:
        self.total = total_videos
        self.skipped = 0  # of the total, videos an earlier run finished (set by the runner)
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = 1.0 if self.tty else 10.0
        self.started = time.monotonic()
        self._last = 0.0
        self._written = ""  # the counts of the last line written to a log or pipe
        self._open = False  # a terminal's line written in place, not yet ended

    def line(self, c: _Counts) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = c.video_seconds_done / elapsed
        total = "?" if self.total is None else str(self.total)
        earlier = f", {self.skipped} finished earlier" if self.skipped else ""
        return (f"[vidpipe] {self.skipped + c.videos_done + c.videos_failed}/{total} videos "
                f"({c.videos_done} ok, {c.videos_failed} failed, {c.pending_videos} partly done{earlier}) | "
                f"{c.video_seconds_done:,.1f} video-s | {rate:,.2f} video-s/s | {elapsed:,.0f} s")

    def update(self, c: _Counts) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.line(c) + "\x1b[K")
            self._open = True
        else:
            self._write_line(c)
        self.stream.flush()

    def finish(self, c: _Counts) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line(c) + "\x1b[K\n")
            self._open = False
        elif self._counts(self.line(c)) != self._written:  # a log showed the same counts twice at the end
            self._write_line(c)
        self.stream.flush()

    def break_line(self) -> None:
        """End the line a terminal shows in place, so that what is printed next (a warning, a stop) has its own;
        the next update writes the progress line again below it."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def _write_line(self, c: _Counts) -> None:
        line = self.line(c)
        self._written = self._counts(line)
        self.stream.write(line + "\n")

    @staticmethod
    def _counts(line: str) -> str:
        return line.split(" | ")[0]


@dataclass
class RunStatus:
    """The counters of one run, as ``progress.json`` holds them."""

    run_id: str
    state: RunState = "running"
    started: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    # what tells this process from another with the same host name and pid (a container's pid namespace,
    # a pid reused later); None where /proc does not say
    pid_ns: int | None = field(default_factory=lambda: pid_namespace())
    pid_started: int | None = field(default_factory=lambda: process_start(os.getpid()))
    boot_id: str | None = field(default_factory=boot_id)
    # ``vidpipe run``'s own process when the run is its supervised child (see jobs.supervise): killing it
    # ends the run too
    supervisor_pid: int | None = field(default_factory=lambda: _supervisor())
    supervisor_started: int | None = field(default_factory=lambda: process_start(_supervisor() or -1))
    inputs_total: int | None = None  # every video the inputs name (finished ones included), once counted
    inputs_finished: int | None = None  # of those, finished by earlier runs (as counted with inputs_total)
    discovered: int = 0  # videos read from discovery so far (a wave may read a few ahead)
    skipped: int = 0  # of those, finished by an earlier run
    done: int = 0  # finished by this run (committed or about to be)
    failed: int = 0
    video_seconds: float = 0.0
    in_flight: int = 0
    waves: int = 0
    wave_size: int = 0
    retry_groups: int = 0
    message: str = ""
    # when the run's first video finished (None before), and its counts then: the rate from there on leaves out
    # the start (Ray, the models, the first videos' latency), which made an early ETA several times too long
    first_result_at: float | None = None
    first_result_videos: int = 0
    first_result_video_seconds: float = 0.0

    def note_results(self) -> None:
        """Called after the counts change: remember when the first result came."""
        if self.first_result_at is None and self.done + self.failed > 0:
            self.first_result_videos = self.done + self.failed
            self.first_result_video_seconds = self.video_seconds
            self.first_result_at = time.time()  # last: the progress thread reads the three without a lock

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        elapsed = max(self.heartbeat - self.started, 1e-9)
        d |= {"started_at": iso_utc(self.started), "updated_at": iso_utc(self.heartbeat), "elapsed_s": round(elapsed, 1),
              "video_seconds_per_s": round(self.video_seconds / elapsed, 3),
              "videos_per_s": round((self.done + self.failed) / elapsed, 4)}
        since = self.heartbeat - self.first_result_at if self.first_result_at is not None else 0.0
        more = self.done + self.failed - self.first_result_videos
        if since >= 5.0 and more > 0:  # the steady rate, once a second result has come and over a heartbeat at least
            d |= {"steady_video_seconds_per_s": round((self.video_seconds - self.first_result_video_seconds) / since, 3),
                  "steady_videos_per_s": round(more / since, 4)}
        return d


class ProgressFile:
    """Keeps ``OUT/_job/progress.json`` current: a background thread rewrites it every ``interval_s``."""

    def __init__(self, out: OutputDir, status: RunStatus, *, interval_s: float = 5.0) -> None:
        self.out = out
        self.status = status
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="vidpipe-progress", daemon=True)

    def __enter__(self) -> ProgressFile:
        self.write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.write()

    def write(self) -> None:
        with self._lock:
            if self.out.lost:  # another run holds OUT now: its progress.json is not this run's to write
                return
            self.status.heartbeat = time.time()
            try:
                self.out.write_json(PROGRESS_FILE, self.status.to_dict())
            except OSError as exc:  # S3 hiccup: the next beat tries again; the job goes on
                import logging

                logging.getLogger(__name__).warning("could not update %s: %s", PROGRESS_FILE, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()
