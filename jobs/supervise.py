"""Run ``vidpipe run`` in a child process, so that an abrupt end is explained and recorded.

A driver can end without running a line of Python: Ray's core worker exits the process (status 1) when
it loses its cluster (the head node stopped, the local raylet or object store gone), and the kernel's
out-of-memory killer sends SIGKILL.  The user then saw Ray's log lines, or nothing, and
``progress.json`` kept saying "running".  Here the command runs in a forked child; this process waits,
and when the child ends without its "done" byte it says what happened, records the run as failed with
that message (``vidpipe status`` shows it; on S3 the lease is released at once) and ends the same way.

Signals: the terminal's Ctrl-C reaches both processes (one process group), so this one ignores
SIGINT; SIGTERM (``ray job stop``, a scheduler, ``kill``) is passed on to the child, which stops like
Ctrl-C.  The child dies with this process (``PR_SET_PDEATHSIG``): SIGKILL on ``vidpipe run``'s pid
still stops the run at once.  Linux only (elsewhere the command runs in-process, as before).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence

from jobs.spec import EXIT_INTERNAL

_PR_SET_PDEATHSIG = 1
_DONE = b"d"

# In the child: the supervising process's pid (recorded in progress.json, so that ``vidpipe status``
# sees at once that a run is over when its supervisor is gone); None when not supervised.
SUPERVISOR_PID: int | None = None


def wanted(argv: Sequence[str]) -> bool:
    """Whether this command line runs under a supervisor: ``vidpipe run`` on Linux, unless disabled."""
    if not sys.platform.startswith("linux") or os.environ.get("VIDPIPE_SUPERVISE", "1") == "0":
        return False
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "run" and not {"-h", "--help", "--version"} & set(argv)


def supervise(argv: Sequence[str], command: Callable[[], int]) -> int:
    """Run ``command`` in a forked child; return its exit status, or explain and record its abrupt end.

    A child killed by a signal makes this process die by the same signal (after the explanation), so
    callers see what they saw before (``-9`` from subprocess, 137 in a shell).
    """
    global SUPERVISOR_PID
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the command, then the "done" byte
        os.close(r)
        _die_with_parent(parent)
        SUPERVISOR_PID = parent
        code = EXIT_INTERNAL
        try:
            code = command()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            _flush()
            os.write(w, _DONE)
            os._exit(code)
    os.close(w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: _forward(pid, signum))
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    try:
        done = os.read(r, 1) == _DONE
    except BlockingIOError:
        done = False
    os.close(r)
    if done and os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = f"was killed by {_signal_name(sig)}"
        cause = "the kernel's out-of-memory killer sends SIGKILL: see 'dmesg'" if sig == signal.SIGKILL else ""
    else:
        sig = 0
        what = f"ended abruptly with exit status {os.WEXITSTATUS(status)}"
        cause = ("Ray ends its driver so when it loses the Ray cluster: the head node, the local Ray processes or "
                 "the object store stopped")
    message = f"the run {what}" + (f" ({cause})" if cause else "")
    print(f"vidpipe run: error: {message}. The videos committed before are kept; rerun the same command to "
          "resume.", file=sys.stderr, flush=True)
    record_abrupt_end(argv, pid, message)
    if sig:
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)  # SIGTERM, SIGSEGV, ...: their handlers here were replaced
        os.kill(os.getpid(), sig)
    return EXIT_INTERNAL


def record_abrupt_end(argv: Sequence[str], child: int, message: str) -> None:
    """Mark the child's run in ``OUT/_job/progress.json`` as failed with ``message``, if it is still
    recorded as running there (a child that ended before opening OUT has left nothing to mark)."""
    import logging
    import time

    from jobs.cli import build_parser
    from jobs.output import OutputDir
    from jobs.progress import PROGRESS_FILE
    from pipeline.errors import ConfigError

    try:
        out_uri = build_parser().parse_args(list(argv)).out
        out = OutputDir(out_uri)
        progress = out.read_json(PROGRESS_FILE) if out.is_output() else None
        if not progress or progress.get("state") != "running" or progress.get("pid") != child:
            return
        now = time.time()
        progress |= {"state": "failed", "message": message, "heartbeat": now,
                     "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        out.write_json(PROGRESS_FILE, progress)
    except (SystemExit, ConfigError, OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("could not record the run's end in its progress.json: %s", exc)


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_INTERNAL)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that has gone (``| head``) or a closed stream
            pass
