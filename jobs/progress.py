"""A one-line progress display: videos done / failed / in flight, video-seconds and rate."""

from __future__ import annotations

import time
from typing import Protocol, TextIO


class _Counts(Protocol):
    videos_done: int
    videos_failed: int
    video_seconds_done: float

    @property
    def pending_videos(self) -> int: ...


class Progress:
    """Prints at most once a second on a terminal (in place), every 10 s to a log file or pipe."""

    def __init__(self, total_videos: int, stream: TextIO, *, enabled: bool = True) -> None:
        self.total = total_videos
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = 1.0 if self.tty else 10.0
        self.started = time.monotonic()
        self._last = 0.0

    def line(self, c: _Counts) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = c.video_seconds_done / elapsed
        return (f"[vidpipe] {c.videos_done + c.videos_failed}/{self.total} videos "
                f"({c.videos_done} ok, {c.videos_failed} failed, {c.pending_videos} in flight) | "
                f"{c.video_seconds_done:,.1f} video-s | {rate:,.2f} video-s/s | {elapsed:,.0f} s")

    def update(self, c: _Counts) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.line(c) + "\x1b[K")
        else:
            self.stream.write(self.line(c) + "\n")
        self.stream.flush()

    def finish(self, c: _Counts) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line(c) + ("\x1b[K\n" if self.tty else "\n"))
            self.stream.flush()
