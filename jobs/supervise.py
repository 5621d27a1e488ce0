"""Run ``vidpipe run`` in a child process, so that an abrupt end is explained and recorded.

A driver can end without running a line of Python: Ray's core worker exits the process (status 1) when
it loses its cluster (the head node stopped, the local raylet or object store gone), and the kernel's
out-of-memory killer sends SIGKILL.  The user then saw Ray's log lines, or nothing, and
``progress.json`` kept saying "running".  Here the command runs in a forked child; this process waits,
and when the child ends without its "done" byte it records the run as failed with what happened
(``vidpipe status`` shows it; on S3 the lease is released at once), says so, and ends the same way.

Signals: the child runs in a process group of its own, with the local Ray processes it starts.  A signal
to ``vidpipe run``'s process group (a terminal's Ctrl-C, ``timeout``, ``kill -TERM -PGID``) reaches this
process only (``ray job stop`` signals every pid of the job's tree: the run stops once), not Ray's raylet and GCS, which used to end on it and take the driver
down (Ray's core worker exits its process on losing them) before it had committed its finished videos.
SIGINT, SIGTERM and SIGHUP (a closed terminal, a lost ssh connection; not under ``nohup``) are blocked
here from before the fork, taken with ``sigtimedwait`` and passed on to the child, which stops like
Ctrl-C, committing the videos it has finished; a terminal's Ctrl-Z (SIGTSTP) stops the child's group, then this
process, and ``fg``/``bg`` continue both.  The child dies with this process (``PR_SET_PDEATHSIG``):
SIGKILL on ``vidpipe run``'s pid still stops the run at once.  When the child has ended, what is left of
its process group (Ray's dashboard and runtime-env agents) is killed: by this process, or, where it was
killed itself (SIGKILL, SIGQUIT), by a small reaper process that waits for its end.  Linux only (elsewhere the command runs
in-process, as before).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Literal

from jobs.spec import EXIT_INTERNAL, EXIT_INTERRUPTED

_PR_SET_PDEATHSIG = 1
_DONE = b"d"
_done_pipe: int | None = None  # in the supervised child: where to say that the command is over
_REAP = b"k"  # to the reaper: the driver has ended, end what is left of the run now
# stop signals passed on to the child; SIGHUP (a terminal that closed: an ssh connection lost) too, unless
# ignored (``nohup``), when the child inherits that
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# signals whose default action dumps core: the child's core file is the one to keep
_CORE_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGQUIT, signal.SIGILL,
                 signal.SIGTRAP, signal.SIGSYS, signal.SIGXCPU, signal.SIGXFSZ}

# In the child: the supervising process's pid (recorded in progress.json, so that ``vidpipe status``
# sees at once that a run is over when its supervisor is gone); None when not supervised.
SUPERVISOR_PID: int | None = None


def wanted(argv: Sequence[str]) -> bool:
    """Whether this command line runs under a supervisor: ``vidpipe run`` and ``vidpipe bench`` (which starts an
    embedded Ray too: a SIGTERM to its group reached Ray's processes, 39 lines of their stack dumps and exit 134) on
    Linux, unless disabled."""
    if not sys.platform.startswith("linux") or os.environ.get("VIDPIPE_SUPERVISE", "1") == "0":
        return False
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] in ("run", "bench") and not {"-h", "--help", "--version"} & set(argv)


def supervise(argv: Sequence[str], command: Callable[[], int]) -> int:
    """Run ``command`` in a forked child; return its exit status, or explain and record its abrupt end.

    A child killed by a signal makes this process die by the same signal (after the explanation), so
    callers see what they saw before (``-9`` from subprocess, 137 in a shell).
    """
    global SUPERVISOR_PID, _done_pipe
    parent = os.getpid()
    r, w = os.pipe()
    stops = stop_signals()
    watched = {*stops, signal.SIGCHLD, signal.SIGTSTP}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    pid = os.fork()
    if pid == 0:  # the child: the command, then the "done" byte and its status
        _own_process_group()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        _die_with_parent(parent)
        SUPERVISOR_PID = parent
        _done_pipe = w
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
            finished(code)
            os._exit(code)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # as the child does: whichever runs first, no signal finds it in this group
    except OSError:  # the child has set it already (and may have exec'd or ended)
        pass
    reaper = _start_reaper(pid)
    from jobs.progress import process_start

    child_started = process_start(pid)
    status, stopped_by = _wait(pid, watched, stops)
    # from here a signal acts on this process alone (the child is gone): Ctrl-C ends a slow record
    for stop in stops:
        signal.signal(stop, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.set_blocking(r, False)
    try:
        said = os.read(r, 2)
    except BlockingIOError:
        said = b""
    os.close(r)
    done = len(said) == 2 and said[:1] == _DONE
    # what is left of the run: Ray's agents of an embedded node outlived even some clean ends by ~60 s, its
    # workers a killed driver by 23-26 s (the reaper, scanning while the raylet lives, finds them)
    _reap(reaper)
    _end_process_group(pid)  # done by the reaper already, unless none could be forked (or it did not finish)
    if done:
        # the command had finished (its videos committed, its status said): Ray's core worker may end the
        # process with status 1 as Ray shuts down, and that is no failure of the run
        return said[1]
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
        if stopped_by:
            # a stop that reached Ray's local processes too (systemd and batch schedulers signal every
            # process of a job): the raylet ended before the driver had finished stopping
            what = f"was stopped by {_signal_name(stopped_by)} and {what}"
            cause = ("Ray's local processes had the signal too and Ray ended its driver before it had "
                     "committed the videos it had finished")
    message = f"the run {what}" + (f" ({cause})" if cause else "")
    record_abrupt_end(argv, pid, child_started, message, "interrupted" if stopped_by and not sig else "failed")
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
    return EXIT_INTERRUPTED if stopped_by else EXIT_INTERNAL


def _start_reaper(pgid: int) -> tuple[int, int] | None:
    """Fork a small process that ends the run's processes (the driver's process group and every descendant
    of its members) when told to, or when this process is gone however it ends.  A SIGKILL (or SIGQUIT) on
    'vidpipe run' takes the driver with it (``PR_SET_PDEATHSIG``), and Ray ties its raylet and agents to the
    driver, but Ray's agents lived on for about a minute and its workers (process groups of their own,
    orphaned once the raylet is gone) for 23-26 s.

    It holds the read end of a pipe whose only write end is this process's: :data:`_REAP` on it, or its
    EOF (this process's end), makes it act.  Until then it notes the run's processes every 2 s (with
    their start times, so that a pid used again since is left alone): the workers are found below the
    raylet only while it lives.  It has a process group of its own (a SIGKILL to 'vidpipe run''s group
    must not take it too), the stop signals and SIGTSTP blocked (this process's mask, inherited), SIGQUIT
    ignored and its standard streams on /dev/null (a caller reading this process's output to its end must
    not wait for it).  Returns ``(pid, write end)``, or None where no process could be forked.
    """
    r, w = os.pipe()
    try:
        reaper = os.fork()
    except OSError:  # no process to spare: the run goes on without (as before)
        os.close(r)
        os.close(w)
        return None
    if reaper:
        os.close(r)
        return reaper, w
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        import fcntl
        import select

        high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 3)  # not 0-2 (closed by the caller), which get /dev/null
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for fd in [int(f) for f in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd != high:
                try:
                    os.close(fd)
                except OSError:  # the listing's own descriptor, closed by now
                    pass
        seen: dict[int, int] = {}
        while not select.select([high], [], [], 2.0)[0]:
            seen = _still_running(seen) | _group_and_descendants(pgid)
        seen = _still_running(seen) | _group_and_descendants(pgid)
        _end_process_group(pgid)
        for pid in _still_running(seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    finally:
        os._exit(0)


def _reap(reaper: tuple[int, int] | None) -> None:
    """Have the reaper end the run's processes now and wait for it (a few milliseconds; at most 5 s)."""
    if reaper is None:
        return
    pid, w = reaper
    try:
        os.write(w, _REAP)
    except OSError:  # it has gone
        pass
    os.close(w)
    import time

    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the process's name (which may hold spaces); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def _still_running(seen: dict[int, int]) -> dict[int, int]:
    """Of ``seen`` (pid: start time), the processes still there as themselves (not a pid used again)."""
    alive = {}
    for pid, started in seen.items():
        fields = _proc_stat(pid)
        if fields is not None and int(fields[19]) == started and fields[0] != b"Z":
            alive[pid] = started
    return alive


def _group_and_descendants(pgid: int) -> dict[int, int]:
    """The processes of group ``pgid`` and all their descendants (pid: start time), from /proc."""
    parent: dict[int, int] = {}
    started: dict[int, int] = {}
    members: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(entry)
        if fields is None:  # ended meanwhile
            continue
        pid = int(entry)
        parent[pid], started[pid] = int(fields[1]), int(fields[19])
        if int(fields[2]) == pgid:
            members.add(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(members), list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return {pid: started[pid] for pid in found}


def _end_process_group(pgid: int) -> None:
    """SIGKILL what is left of a run's process group: the local Ray processes the driver started (Ray's raylet
    and GCS die with the driver, but its dashboard and runtime-env agents outlived it by 30-60 s; Ray's
    workers and their decoders are in groups of their own and end with the raylet)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (or the child never made its group)
        pass


def _own_process_group() -> None:
    """Put this process (the child) in a process group of its own: see the module's docstring."""
    try:
        os.setpgid(0, 0)
    except OSError as exc:  # not expected (a forked child is no session leader): signals then reach it twice
        print(f"vidpipe run: warning: the driver stays in vidpipe's process group ({exc})", file=sys.stderr)
    # a background process group that writes to its terminal is stopped (SIGTTOU) where the terminal says
    # 'tostop'; the driver's progress line and messages must not be
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)


def finished(code: int) -> None:
    """In the supervised child: the command is over with status ``code`` (what follows is cleanup)."""
    global _done_pipe
    if _done_pipe is not None:
        try:
            os.write(_done_pipe, _DONE + bytes([code & 0xFF]))
        except OSError:  # the supervisor is gone: nobody to tell
            pass
        _done_pipe = None


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a run like Ctrl-C: SIGINT, SIGTERM and SIGHUP, less those this process was
    started ignoring (``nohup`` ignores SIGHUP: the run then goes on when its terminal closes)."""
    return tuple(s for s in _STOPS if signal.getsignal(s) is not signal.SIG_IGN)


def stop_reason(sig: int) -> str:
    """How a run stopped by ``sig`` records and reports it (``vidpipe status``: "interrupted: stopped by ...")."""
    what: dict[int, str] = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGHUP: "SIGHUP (its terminal closed)"}
    return f"stopped by {what.get(sig, _signal_name(sig))}"


def _wait(pid: int, watched: set[signal.Signals], stops: tuple[signal.Signals, ...]) -> tuple[int, int]:
    """Wait for the child, passing stop signals on to it and stopping it with this process on SIGTSTP;
    its wait status, and the first stop signal passed on (0: none)."""
    stopped_by = 0
    while True:
        info = signal.sigtimedwait(watched, 5.0)
        if info is not None and info.si_signo in stops:
            stopped_by = stopped_by or info.si_signo  # also when the child has ended meanwhile
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, stopped_by
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        try:
            if info.si_signo == signal.SIGTSTP:  # Ctrl-Z: the driver's group (Ray's processes too), then this one
                os.killpg(pid, signal.SIGSTOP)
                os.kill(os.getpid(), signal.SIGSTOP)
                os.killpg(pid, signal.SIGCONT)  # continued by 'fg' or 'bg'
                continue
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            continue


def record_abrupt_end(argv: Sequence[str], child: int, child_started: int | None, message: str,
                      state: Literal["failed", "interrupted"] = "failed") -> None:
    """Mark the child's run in ``OUT/_job/progress.json`` as ``state`` with ``message``, if it is still
    recorded as running there by that very process (host, pid namespace, pid and start time: a later run
    elsewhere may have taken OUT over); a child that ended before opening OUT has left nothing to mark."""
    import logging
    import time

    from jobs.cli import build_parser
    from jobs.output import OutputDir
    from jobs.progress import PROGRESS_FILE, iso_utc, recorded_here
    from pipeline.errors import ConfigError

    try:
        out_uri = getattr(build_parser().parse_args(list(argv)), "out", None)
        if not out_uri:  # bench: no OUT to mark
            return
        out = OutputDir(out_uri)
        progress = out.read_json(PROGRESS_FILE) if out.is_output() else None
        ours = {"state": "running", "pid": child, "pid_started": child_started}
        if child_started is None or not progress or not recorded_here(progress) or \
                any(progress.get(k) != v for k, v in ours.items()):
            return
        now = time.time()
        progress |= {"state": state, "message": message, "heartbeat": now, "updated_at": iso_utc(now)}
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
