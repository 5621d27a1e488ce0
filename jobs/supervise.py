"""Run ``vidpipe run`` in a child process, so that an abrupt end is explained and recorded.

A driver can end without running a line of Python: Ray's core worker exits the process (status 1) when
it loses its cluster (the head node stopped, the local raylet or object store gone), and the kernel's
out-of-memory killer sends SIGKILL.  The user then saw Ray's log lines, or nothing, and
``progress.json`` kept saying "running".  Here the command runs in a forked child; this process waits,
and when the child ends without its "done" byte it records the run as failed with what happened
(``vidpipe status`` shows it; on S3 the lease is released at once), says so, and ends the same way.

Signals: SIGINT and SIGTERM are blocked here from before the fork and taken with ``sigtimedwait``.
SIGTERM (``ray job stop``, a scheduler, ``kill``) and a SIGINT sent to this pid are passed on to the
child, which stops like Ctrl-C; a terminal's Ctrl-C (``SI_KERNEL``) already reached the child, which
is in the same process group, and is not sent twice.  The child dies with this process
(``PR_SET_PDEATHSIG``): SIGKILL on ``vidpipe run``'s pid still stops the run at once.  Linux only
(elsewhere the command runs in-process, as before).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence

from jobs.spec import EXIT_INTERNAL

_PR_SET_PDEATHSIG = 1
_SI_KERNEL = 0x80  # si_code of a signal the kernel sends for a terminal's Ctrl-C, to the whole process group
_DONE = b"d"
_WATCHED = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
# signals whose default action dumps core: the child's core file is the one to keep
_CORE_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGQUIT, signal.SIGILL,
                 signal.SIGTRAP, signal.SIGSYS, signal.SIGXCPU, signal.SIGXFSZ}

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
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    pid = os.fork()
    if pid == 0:  # the child: the command, then the "done" byte
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
            flush_std_streams()
            os.write(w, _DONE)
            os._exit(code)
    os.close(w)
    from jobs.progress import process_start

    child_started = process_start(pid)
    status = _wait(pid)
    # from here a signal acts on this process alone (the child is gone): Ctrl-C ends a slow record
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
        cause = ("a 'kill -9', a scheduler, or the kernel's out-of-memory killer: see 'dmesg'"
                 if sig == signal.SIGKILL else "")
    else:
        sig = 0
        what = f"ended abruptly with exit status {os.WEXITSTATUS(status)}"
        cause = ("most likely Ray ending its driver on losing the Ray cluster: the head node, the local Ray "
                 "processes or the object store stopped")
    message = f"the run {what}" + (f" ({cause})" if cause else "")
    record_abrupt_end(argv, pid, child_started, message)
    try:
        lead = "\n" if sys.stderr.isatty() else ""  # after a progress line that a terminal shows in place
        print(f"{lead}vidpipe run: error: {message}. The videos committed before are kept; rerun the same "
              "command to resume.", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr gone (a closed pipe, a hung-up terminal): the record is made
        pass
    if sig:
        if sig in _CORE_SIGNALS:  # this process's core would replace the child's
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return EXIT_INTERNAL


def _wait(pid: int) -> int:
    """Wait for the child, passing SIGTERM and a SIGINT sent to this pid on to it; its wait status."""
    while True:
        info = signal.sigtimedwait(_WATCHED, 5.0)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL:
            continue  # a terminal's Ctrl-C: the child has it already
        try:
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            pass


def record_abrupt_end(argv: Sequence[str], child: int, child_started: int | None, message: str) -> None:
    """Mark the child's run in ``OUT/_job/progress.json`` as failed with ``message``, if it is still
    recorded as running there by that very process (host, pid namespace, pid and start time: a later run
    elsewhere may have taken OUT over); a child that ended before opening OUT has left nothing to mark."""
    import logging
    import time

    from jobs.cli import build_parser
    from jobs.output import OutputDir
    from jobs.progress import PROGRESS_FILE, iso_utc, recorded_here
    from pipeline.errors import ConfigError

    try:
        out_uri = build_parser().parse_args(list(argv)).out
        out = OutputDir(out_uri)
        progress = out.read_json(PROGRESS_FILE) if out.is_output() else None
        ours = {"state": "running", "pid": child, "pid_started": child_started}
        if child_started is None or not progress or not recorded_here(progress) or \
                any(progress.get(k) != v for k, v in ours.items()):
            return
        now = time.time()
        progress |= {"state": "failed", "message": message, "heartbeat": now, "updated_at": iso_utc(now)}
        out.write_json(PROGRESS_FILE, progress)
    except (SystemExit, ConfigError, OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("could not record the run's end in its progress.json: %s", exc)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` ends (the way Ray ties its own processes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        failed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        print("vidpipe run: warning: cannot tie the driver to 'vidpipe run' (prctl refused); killing 'vidpipe "
              "run' with SIGKILL would leave the driver running", file=sys.stderr)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_INTERNAL)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def flush_std_streams() -> None:
    """Flush stdout and stderr before ``os._exit``, whatever became of their readers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that has gone (``| head``) or a closed stream
            pass
