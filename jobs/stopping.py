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
- where a half-done step would be worse than a finished one: a commit, a bundle's save, a heavy import
  (a package left half-imported, ``import av`` broken off, fails every later import that meets it; the
  cleanup every command ends with, :mod:`jobs.raystop`, imports nothing for that reason).

Inside :func:`deferred` a stop is noted and raised where the outermost such block ends; a Ctrl-C given
again meanwhile says what the command is finishing (``kill -9`` still ends it at once).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import TracebackType

from jobs.supervise import stop_reason, stop_signals

_taken: list[float] = []  # when each stop that counted arrived
_depth = 0  # deferred() blocks the main thread is in
_pending: str | None = None  # a stop that came inside one, not raised yet
_what: list[str] = []  # what the blocks do, innermost last


def install() -> None:
    """Stop on SIGINT, SIGTERM and SIGHUP (those this process was not started ignoring), as Ctrl-C does."""
    if threading.current_thread() is threading.main_thread():
        for sig in stop_signals():
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    global _pending
    # A process group's signal can come twice (directly and through the supervisor, jobs.supervise), and a
    # second KeyboardInterrupt would break off the stop that commits the finished videos: SIGTERM and SIGHUP
    # stop once; a Ctrl-C a second or more after the first breaks off the stop, as the user asks (but not a
    # deferred block: there it says what it waits for).
    now = time.monotonic()
    again = bool(_taken)
    if again and (signum != signal.SIGINT or now - _taken[0] < 1.0):
        return
    _taken.append(now)
    if _depth:
        if again:
            _say(f"vidpipe: stopping once {_what[-1]} has ended ('kill -9 {os.getpid()}' ends it at once)\n")
        _pending = _pending or stop_reason(signum)
        return
    raise KeyboardInterrupt(stop_reason(signum))


def _say(text: str) -> None:
    try:  # not through sys.stderr: the handler may run inside its write
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


class _Deferred:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        global _depth
        self.counts = threading.current_thread() is threading.main_thread()  # handlers run in the main thread
        if self.counts:
            _what.append(self.what)
            _depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth, _pending
        if not self.counts:
            return
        _depth -= 1
        _what.pop()
        if _depth or kind is not None:
            return  # an error ending the block goes first; the stop waits for the next block's end, or check()
        if sys.exc_info()[0] is not None:  # inside an except block the command is already stopping
            _pending = None
            return
        check()


def deferred(what: str) -> _Deferred:
    """A block that a stop does not break off (``what`` it does, for the message if Ctrl-C is given again):
    a stop arriving inside is raised where the block ends, unless the block ends with an error, or inside
    an ``except`` block (the command is stopping then)."""
    return _Deferred(what)


def check() -> None:
    """Raise a stop that arrived in a block that ended with an error which was handled."""
    global _pending
    if _pending is not None and not _depth:
        reason, _pending = _pending, None
        raise KeyboardInterrupt(reason)
