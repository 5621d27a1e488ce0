"""Stops asked by signals, taken where the command can take them.

Ctrl-C, SIGTERM (``ray job stop``, a scheduler, systemd) and SIGHUP (a terminal that closed, an ssh
connection lost, unless ``nohup`` ignores it) stop ``run``, ``train`` and ``eval`` as Ctrl-C does: the
handler raises :class:`KeyboardInterrupt` naming the signal in the main thread, and the command commits
what is finished on its way out.

Such an exception lands between any two bytecodes, and two kinds of places must not take it:

- where processes are started: Ray starts its node's processes with a ``preexec_fn``, so the
  interpreter runs its at-fork handlers, logging's among them. An exception raised in logging's
  ``_releaseLock`` is printed and swallowed with logging's lock held: the stop is lost and the next
  log line hangs (``vidpipe train`` stopped by SIGTERM as Ray started hung past 120 s in CI);
- where a half-done step would be worse than a finished one: a commit, a bundle's save.

Inside :func:`deferred` a stop is noted and raised where the outermost such block ends. A second Ctrl-C
(a second or more after the first) is raised at once even there: the user insists.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import TracebackType

from jobs.supervise import stop_reason, stop_signals

_taken: list[float] = []  # when each stop that counted arrived
_depth = 0  # deferred() blocks the main thread is in
_pending: str | None = None  # a stop that came inside one, not raised yet


def install() -> None:
    """Stop on SIGINT, SIGTERM and SIGHUP (those this process was not started ignoring), as Ctrl-C does."""
    if threading.current_thread() is threading.main_thread():
        for sig in stop_signals():
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    global _pending
    # A process group's signal can come twice (directly and through the supervisor, jobs.supervise), and a
    # second KeyboardInterrupt would break off the stop that commits the finished videos: SIGTERM and SIGHUP
    # stop once; a Ctrl-C a second or more after the first breaks off the stop, as the user asks.
    now = time.monotonic()
    if _taken and (signum != signal.SIGINT or now - _taken[0] < 1.0):
        return
    _taken.append(now)
    if _depth and len(_taken) == 1:
        _pending = stop_reason(signum)
        return
    _pending = None
    raise KeyboardInterrupt(stop_reason(signum))


class _Deferred:
    def __enter__(self) -> None:
        global _depth
        self.counts = threading.current_thread() is threading.main_thread()  # handlers run in the main thread
        if self.counts:
            _depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth, _pending
        if not self.counts:
            return
        _depth -= 1
        if _depth or _pending is None or kind is not None:
            return  # an error ending the block goes first; the stop waits for the next block's end, or check()
        reason, _pending = _pending, None
        if sys.exc_info()[0] is None:  # inside an except block the command is already stopping
            raise KeyboardInterrupt(reason)


def deferred() -> _Deferred:
    """A block that a stop does not break off: a stop arriving inside is raised where the block ends
    (unless the block ends with an error, or inside an ``except`` block: the command is stopping then)."""
    return _Deferred()


def check() -> None:
    """Raise a stop that arrived in a block that ended with an error which was handled."""
    global _pending
    if _pending is not None and not _depth:
        reason, _pending = _pending, None
        raise KeyboardInterrupt(reason)
