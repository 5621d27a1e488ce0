"""``vidpipe run`` watches its driver (jobs.supervise): an end forced by Ray or the kernel is explained,
recorded in progress.json, and loses nothing committed; signals still stop the run as before."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import psutil
import pytest

from jobs.status import format_status, read_status
from tests.jobs.clusters import LocalCluster
from tests.jobs.conftest import (
    RUN_FLAGS,
    VIDPIPE,
    duplicate_keys,
    process_running,
    run_vidpipe,
    segment_rows,
    videos_ok,
    vidpipe_env,
    wait_for,
)
from tests.media_factory import head_of, make_video

# A stand-in driver: each MODE does what a real driver can do to its process.  It records itself in
# OUT/_job/progress.json as a run does, then touches OUT/ready.
_DRIVER = """
import json, os, signal, sys, time
from jobs import supervise
from jobs.stopping import install
from jobs.progress import RunStatus

out, mode = sys.argv[1], sys.argv[2]

def command():
    if mode == "ok":
        print("the driver's own output")
        return 3
    os.makedirs(out + "/_job", exist_ok=True)
    status = RunStatus(run_id="r1").to_dict()
    if mode == "other-run":
        status["pid_started"] = 1  # the same pid, another process: a later run's
    with open(out + "/_job/progress.json", "w") as f:
        json.dump(status, f)
    if mode in ("exit", "other-run"):
        os._exit(1)  # as Ray's core worker leaves when it loses the cluster
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    seen = []
    if mode == "ray-exits-on-stop":  # Ray's processes had the signal too: the core worker ends the driver
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(1))
    elif mode == "count":
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: seen.append(signal.Signals(signum).name))
    else:
        install()  # the run's own handlers
    if mode == "agent":  # as Ray's raylet and agents: in the driver's group, outliving it; and as Ray's
        import subprocess  # workers: the raylet's children, in process groups of their own
        agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; w = subprocess.Popen("
                                  "[sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
                                  "open(sys.argv[1], 'w').write(str(w.pid)); time.sleep(300)", out + "/worker"])
        with open(out + "/agent", "w") as f:
            f.write(str(agent.pid))
    open(out + "/ready", "w").close()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (seen_at and time.time() > seen_at[0] + 1.5):
            if seen and not seen_at:
                seen_at.append(time.time())  # then wait for copies of the signal
            time.sleep(0.05)
        print(" ".join(seen), flush=True)
        return 130
    except KeyboardInterrupt:
        time.sleep(0.5)  # committing what is finished: a second stop signal must not break this off
        print("stopped cleanly", flush=True)
        return 130

seen_at = []
sys.exit(supervise.supervise(["run", "in.mp4", "--out", out], command))
"""


def _driver(out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(out), mode], cwd=Path(__file__).parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _progress(out: Path) -> dict:
    return json.loads((out / "_job" / "progress.json").read_text())


def test_a_driver_that_returns_passes_its_status_and_output_through(tmp_path):
    p = _driver(tmp_path / "o", "ok")
    stdout, stderr = p.communicate(timeout=60)
    assert (p.returncode, stdout, stderr) == (3, "the driver's own output\n", "")


def test_a_driver_that_ray_exits_is_explained_and_recorded_as_failed(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "exit")
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "the run ended abruptly with exit status 1" in stderr and "losing the Ray cluster" in stderr, stderr
    assert "committed before are kept; rerun the same command" in stderr
    progress = _progress(out)
    assert progress["state"] == "failed" and "losing the Ray cluster" in progress["message"]


def test_a_driver_killed_by_sigkill_is_explained_and_its_supervisor_dies_the_same_way(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "sigkill")
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL  # callers see what they saw without the supervisor
    assert "the run was killed by SIGKILL" in stderr and "out-of-memory killer" in stderr, stderr
    assert _progress(out)["state"] == "failed" and "SIGKILL" in _progress(out)["message"]


def test_another_runs_progress_is_left_alone(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "other-run")  # progress.json names another pid: a later run's, not this driver's
    p.communicate(timeout=60)
    assert p.returncode == 1 and _progress(out)["state"] == "running"


def _on_a_terminal(out: Path, mode: str, nohup: bool = False) -> tuple[subprocess.Popen, int]:
    """The stand-in driver as a session leader with a pseudo-terminal of its own; the terminal's master fd."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if nohup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a command

    p = subprocess.Popen([sys.executable, "-c", _DRIVER, str(out), mode], cwd=Path(__file__).parents[2],
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=controlling_terminal)
    os.close(slave)
    return p, master


_STOPS = ["SIGTERM to vidpipe", "SIGINT to vidpipe", "SIGTERM to the process group", "SIGINT to the process group",
          "Ctrl-C on its terminal", "SIGHUP to the process group", "its terminal hangs up"]


def _stopped(out: Path, mode: str, how: str) -> tuple[int, str, str]:
    """Start the stand-in driver on a terminal, stop it ``how``; its exit status, stdout and stderr."""
    p, master = _on_a_terminal(out, mode)
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        stop = getattr(signal, how.split()[0]) if how.startswith("SIG") else signal.SIGINT
        if how == "Ctrl-C on its terminal":
            os.write(master, b"\x03")  # the kernel signals the terminal's foreground process group
        elif how == "its terminal hangs up":
            os.close(master)  # the kernel sends SIGHUP to the session's leader: 'vidpipe run' here
            master = -1
        elif how.endswith("to vidpipe"):
            p.send_signal(stop)
        else:
            os.killpg(p.pid, stop)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if master >= 0:
            os.close(master)
    return p.returncode, stdout, stderr


@pytest.mark.parametrize("how", _STOPS)
def test_signals_stop_the_driver_as_before(tmp_path, how):
    """However the stop comes, the driver stops once and cleanly and 'vidpipe run' exits 130 without a
    word of its own."""
    assert _stopped(tmp_path / "o", "wait", how) == (130, "stopped cleanly\n", "")


@pytest.mark.parametrize("how", _STOPS)
def test_what_the_driver_receives(tmp_path, how):
    """The driver has a process group of its own: every stop reaches it once, passed on by 'vidpipe run'
    (a process group's signal or a terminal's Ctrl-C used to reach it directly as well)."""
    code, stdout, _ = _stopped(tmp_path / "o", "count", how)
    expected = "SIGHUP" if "SIGHUP" in how or "hangs up" in how else "SIGTERM" if "SIGTERM" in how else "SIGINT"
    assert code == 130 and stdout.strip() == expected, stdout


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path):
    """``nohup vidpipe run ...``: SIGHUP is ignored from the start, so a closed terminal leaves the run going."""
    out = tmp_path / "o"
    p, master = _on_a_terminal(out, "wait", nohup=True)
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        driver = _progress(out)["pid"]
        os.killpg(p.pid, signal.SIGHUP)
        os.close(master)  # the terminal hangs up as well
        master = -1
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=2)
        assert process_running(driver)
        p.terminate()
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        if master >= 0:
            os.close(master)
    assert (p.returncode, stdout, stderr) == (130, "stopped cleanly\n", "")


def _state(pid: int) -> str:
    """A process's state letter from /proc (R, S, T for stopped, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_the_driver_and_its_ray_run_in_a_process_group_of_their_own(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "wait")
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        driver = _progress(out)["pid"]
        assert os.getpgid(driver) == driver and os.getpgid(p.pid) == p.pid  # p: a session of its own
    finally:
        p.terminate()
        p.communicate(timeout=60)
    assert p.returncode == 130


def test_ctrl_z_stops_the_driver_with_vidpipe_and_fg_continues_both(tmp_path):
    out = tmp_path / "o"
    p, master = _on_a_terminal(out, "wait")
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        driver = _progress(out)["pid"]
        os.write(master, b"\x1a")  # Ctrl-Z: the kernel sends SIGTSTP to the terminal's foreground group
        wait_for(lambda: _state(p.pid) == "T" and _state(driver) == "T", 30, "both processes to stop")
        os.kill(p.pid, signal.SIGCONT)  # what a shell's 'fg' or 'bg' sends to the job's process group
        wait_for(lambda: _state(p.pid) != "T" and _state(driver) != "T", 30, "both processes to continue")
        p.terminate()
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert (p.returncode, stdout, stderr) == (130, "stopped cleanly\n", "")


def test_a_driver_that_ray_ends_while_it_stops_is_recorded_as_interrupted(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "ray-exits-on-stop")
    wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
    p.terminate()
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "the run was stopped by SIGTERM and ended abruptly with exit status 1" in stderr, stderr
    assert "committed before are kept" in stderr
    assert _progress(out)["state"] == "interrupted" and "stopped by SIGTERM" in _progress(out)["message"]


def test_sigkill_to_vidpipe_takes_its_driver_with_it(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "wait")
    wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
    driver = _progress(out)["pid"]
    assert driver != p.pid and process_running(driver)
    p.kill()
    p.communicate(timeout=60)
    wait_for(lambda: not process_running(driver), 30, "the driver to end with its supervisor")


@pytest.mark.parametrize("target", ["pid", "group"])
def test_sigkill_to_vidpipe_ends_what_its_driver_started_too(tmp_path, target):
    """The driver dies with 'vidpipe run' (PDEATHSIG), but Ray's agents in its group lived on for about a
    minute after a 'kill -9' (or SIGQUIT) of 'vidpipe run'; now its reaper process ends the group."""
    out = tmp_path / "o"
    p = _driver(out, "agent")
    wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
    agent = int((out / "agent").read_text())
    wait_for(lambda: (out / "worker").exists() and (out / "worker").read_text(), 30, "the agent's worker")
    worker = int((out / "worker").read_text())
    started = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert agent in started and worker in started and os.getpgid(worker) == worker  # a group of its own
    if target == "pid":
        p.kill()
    else:  # 'timeout -s KILL', a scheduler: the reaper, in a group of its own, is not taken too
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    wait_for(lambda: not any(process_running(pid) for pid in started), 10,
             "the driver, its agent, the agent's worker and the reaper to end")


def test_a_killed_driver_takes_what_its_raylet_started_too(tmp_path):
    """The out-of-memory killer's case: the driver dies, Ray's raylet with it, and the workers below the raylet
    (groups of their own) are orphans no scan can trace back to the run: the reaper noted them while it lived."""
    out = tmp_path / "o"
    p = _driver(out, "agent")
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        wait_for(lambda: (out / "worker").exists() and (out / "worker").read_text(), 30, "the agent's worker")
        agent, worker = int((out / "agent").read_text()), int((out / "worker").read_text())
        time.sleep(5.0)  # the reaper's next looks at the run (every 2 s)
        os.kill(agent, signal.SIGKILL)  # the raylet, tied to the driver, ends with it
        os.kill(_progress(out)["pid"], signal.SIGKILL)
        wait_for(lambda: psutil.Process(worker).ppid() != agent, 10, "the worker to be orphaned")
        p.communicate(timeout=60)
        wait_for(lambda: not process_running(worker), 10, "the orphaned worker to end")
    finally:
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def clip_16s(shared_media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 16 s of the 720p clip (H.264 + AAC): in work for seconds on any machine, as a stop needs, and
    not for the minutes of the whole clip that a rerun would then spend."""
    # the clip has a keyframe at 16.0 s: the cut is there, 384 frames
    return head_of(tmp_path_factory.mktemp("clip") / "clip_16s.mp4", shared_media / "bbb_clip_720p.mp4", 16.0)


def _stoppable_archive(clip: Path, inputs: Path, copies: int) -> int:
    """A folder whose run a test stops after its first commit: a one-second clip first (committed as soon as the
    models have started), then ``copies`` copies of a 720p ``clip``, in work when the stop comes and left for the
    rerun (copies: links count once).  Returns the number of videos."""
    inputs.mkdir()
    make_video(inputs / "clip0.mp4", duration_s=1.0, fps=10, size=(96, 64), audio="tone")
    for i in range(1, copies + 1):
        shutil.copyfile(clip, inputs / f"clip{i}.mp4")
    return copies + 1


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_lost_mid_run_is_explained_and_a_rerun_completes(clip_16s, tmp_path):
    """The head node stops mid-job: Ray ends the driver (status 1, no Python runs); 'vidpipe run' says
    why, status reports the run failed with that reason, the committed videos stay, and a rerun on the
    local machine finishes the job without redoing them."""
    inputs = tmp_path / "in"
    total = _stoppable_archive(clip_16s, inputs, copies=4)  # still running when the cluster goes
    out = tmp_path / "o"
    root = Path(tempfile.mkdtemp(prefix="vpl-", dir="/tmp"))  # short: Ray's socket paths are limited
    cluster = LocalCluster(root, head_cpus=2)
    try:
        cluster.start()
        args = ["run", str(inputs), "--out", str(out), *RUN_FLAGS, "--commit-seconds", "0.3"]
        # Ray's driver gives a lost cluster 60 s of retries before it ends the driver: 10 s here (the same path)
        proc = subprocess.Popen([str(VIDPIPE), *args, "--address", cluster.address], stdout=subprocess.PIPE,
                                env=cluster.env | {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"},
                                stderr=subprocess.PIPE, text=True)
        try:
            commits = out / "_job" / "commits"
            wait_for(lambda: (commits.is_dir() and any(commits.glob("*.json"))) or proc.poll() is not None, 300,
                     "a first committed video")
            assert proc.poll() is None
            cluster.stop()
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert proc.returncode == 1, stdout + stderr[-3000:]
    assert "vidpipe run: error: the run ended abruptly" in stderr and "losing the Ray cluster" in stderr, stderr[-3000:]
    status = read_status(str(out))
    assert status.run_state == "failed" and "losing the Ray cluster" in status.message
    assert "failed: the run ended abruptly" in format_status(status)
    kept = {r["video_id"] for r in segment_rows(out)}
    assert 1 <= status.done < total and len(kept) == status.done and duplicate_keys(out) == 0

    again = run_vidpipe(args, env=vidpipe_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{videos_ok(total - status.done)}, 0 failed, {status.done} skipped" in again.stdout, again.stdout
    assert read_status(str(out)).run_state == "finished" and duplicate_keys(out) == 0


@pytest.mark.slow
@pytest.mark.parametrize("everyone", [False, True], ids=["its process group", "every process of the run"])
def test_a_run_stopped_by_sigterm_to_all_of_it_is_interrupted_and_a_rerun_completes(clip_16s, tmp_path, everyone):
    """``timeout`` and ``kill -TERM -PGID`` signal vidpipe's process group; systemd and batch schedulers signal
    every process of a job, Ray's too.  Either way the run is interrupted (exit 130, status "interrupted"),
    keeps its committed videos without duplicates, its Ray processes end, and a rerun finishes the rest."""
    inputs = tmp_path / "in"
    total = _stoppable_archive(clip_16s, inputs, copies=3)
    out = tmp_path / "o"
    args = ["run", str(inputs), "--out", str(out), *RUN_FLAGS, "--commit-seconds", "0.3"]
    proc = subprocess.Popen([str(VIDPIPE), *args], env=vidpipe_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        commits = out / "_job" / "commits"
        wait_for(lambda: (commits.is_dir() and any(commits.glob("*.json"))) or proc.poll() is not None, 300,
                 "a first committed video")
        assert proc.poll() is None
        driver = _progress(out)["pid"]
        os.killpg(proc.pid, signal.SIGTERM)
        if everyone:
            os.killpg(driver, signal.SIGTERM)  # the driver's group: the local Ray processes it started
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr[-3000:]
    # with everyone signalled, Ray may end the driver before its own stop is done: the supervisor says so
    said = ("vidpipe: interrupted" in stderr) or (everyone and "the run was stopped by SIGTERM" in stderr)
    assert said, stderr[-3000:]
    status = read_status(str(out))
    assert status.run_state == "interrupted", format_status(status)
    _kept_and_rerun_finishes(args, out, status, driver, total)


@pytest.mark.slow
def test_a_killed_driver_leaves_no_process_of_its_run_behind(clip_16s, tmp_path):
    """SIGKILL on a real run's driver (as the out-of-memory killer sends): 'vidpipe run' explains it, and
    what the driver had started (Ray's local processes and agents, the workers, their decoder processes)
    ends with it — Ray's agents used to outlive it by 30-60 s."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        shutil.copyfile(clip_16s, inputs / f"clip{i}.mp4")
    out = tmp_path / "o"
    proc = subprocess.Popen([str(VIDPIPE), "run", str(inputs), "--out", str(out), *RUN_FLAGS], env=vidpipe_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "_job" / "progress.json").exists() or proc.poll() is not None, 300, "the run to start")
        driver = psutil.Process(_progress(out)["pid"])

        def decoding() -> dict[int, str]:
            try:
                started = {p.pid: _cmdline(p) for p in driver.children(recursive=True)}
            except psutil.NoSuchProcess:
                return {}
            return started if any("workers.decode_child" in c for c in started.values()) else {}

        started = wait_for(lambda: decoding() or proc.poll() is not None, 300, "a decoder process of the run")
        assert proc.poll() is None
        driver.kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and "the run was killed by SIGKILL" in stderr, stderr[-3000:]
    assert read_status(str(out)).run_state == "failed"
    assert any("DashboardAgent" in c for c in started.values())  # what used to be left
    wait_for(lambda: not any(process_running(pid) for pid in started), 15, "every process of the run to end")


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


class _Terminal:
    """An interactive bash on a pseudo-terminal, as a user has one.  On leaving, the terminal is closed and the
    shell and ``supervisor`` (the 'vidpipe run' a test started there, once known) are killed if still there."""

    def __enter__(self) -> _Terminal:
        import pty

        self.bash, self.master = pty.fork()
        if self.bash == 0:
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], vidpipe_env())
        self.supervisor: int | None = None
        self.shown = ""
        return self

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def read(self) -> str:
        """Read what the terminal shows (unread, it would block the run's writes); all it showed so far."""
        while select.select([self.master], [], [], 0)[0]:
            try:
                shown = os.read(self.master, 65536)
            except OSError:
                break
            if not shown:
                break
            self.shown += shown.decode(errors="replace")
        return self.shown

    def hang_up(self) -> None:
        """Close the terminal: the kernel signals the shell (which signals its jobs, disowned ones not); it ends."""
        os.close(self.master)
        self.master = -1
        os.waitpid(self.bash, 0)
        self.bash = 0  # reaped

    def __exit__(self, *exc: object) -> None:
        if self.master >= 0:
            os.close(self.master)
        for pid in (self.bash, self.supervisor):
            try:
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_run_whose_terminal_closes_commits_what_it_finished_and_a_rerun_completes(clip_16s, tmp_path):
    """A lost ssh connection or a closed terminal window: the shell passes SIGHUP on to 'vidpipe run', whose
    progress lines then meet a hung-up terminal.  The run stops like Ctrl-C (its finished videos committed,
    status "interrupted: stopped by SIGHUP"), its Ray processes end, and a rerun finishes the rest.  It used
    to die with its terminal: the videos finished since the last commit lost, Ray's agents left for a minute,
    progress.json saying "running"."""
    inputs = tmp_path / "in"
    total = _stoppable_archive(clip_16s, inputs, copies=3)
    out = tmp_path / "o"
    flags = [f for f in RUN_FLAGS if f != "--no-progress"]  # progress lines on the terminal, as a user sees them
    args = ["run", str(inputs), "--out", str(out), *flags, "--commit-seconds", "0.3"]
    with _Terminal() as terminal:
        terminal.type(" ".join([str(VIDPIPE), *args]))

        def committed() -> bool:
            terminal.read()
            commits = out / "_job" / "commits"
            return commits.is_dir() and any(commits.glob("*.json"))

        wait_for(committed, 300, "a first committed video", interval_s=0.1)
        progress = _progress(out)
        driver, supervisor = progress["pid"], progress["supervisor_pid"]
        terminal.supervisor = supervisor
        assert process_running(supervisor)
        terminal.hang_up()
        wait_for(lambda: not process_running(supervisor), 120, "'vidpipe run' to end")
    status = read_status(str(out))
    assert (status.run_state, status.message) == ("interrupted", "stopped by SIGHUP (its terminal closed)")
    _kept_and_rerun_finishes(args, out, status, driver, total)


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_says_so_on_a_line_of_its_own_and_keeps_what_is_committed(clip_16s, tmp_path):
    """Ctrl-C while the terminal shows the progress line in place: the run stops (exit 130, "interrupted"), and
    what it says of the stop starts a line of its own; it was written onto the progress line
    ("| 26 s^Cvidpipe: interrupted ..."). Ray's notice that a new local cluster takes a token is not shown."""
    inputs = tmp_path / "in"
    _stoppable_archive(clip_16s, inputs, copies=3)
    out = tmp_path / "o"
    # chunks of 4 s: progress lines come while the 16-s clips are in work
    flags = [f for f in RUN_FLAGS if f != "--no-progress"] + ["--chunk-seconds", "4", "--commit-seconds", "0.3"]
    with _Terminal() as terminal:
        terminal.type(" ".join([str(VIDPIPE), "run", str(inputs), "--out", str(out), *flags]) + '; echo "RC"=$?')

        def committed_and_shown() -> bool:
            commits = out / "_job" / "commits"
            return "[vidpipe]" in terminal.read() and commits.is_dir() and any(commits.glob("*.json"))

        wait_for(committed_and_shown, 300, "a first committed video and the progress line")
        terminal.supervisor = _progress(out)["supervisor_pid"]
        os.write(terminal.master, b"\x03")  # the kernel signals the terminal's foreground process group
        wait_for(lambda: re.search(r"RC=\d", terminal.read()), 120, "'vidpipe run' to end")
    shown = terminal.shown
    assert "RC=130" in shown, shown[-3000:]
    said = [line for line in shown.split("\n") if "vidpipe: interrupted" in line]
    assert said and not any("[vidpipe]" in line for line in said), shown[-3000:]
    assert "Token authentication is enabled" not in shown  # Ray's notice at an embedded start, nothing to do
    assert read_status(str(out)).run_state == "interrupted"


@pytest.mark.slow
def test_a_disowned_run_goes_on_when_its_terminal_closes(clip_16s, tmp_path):
    """``vidpipe run ... & disown``, then the terminal closes: the shell sends no SIGHUP to a disowned job, so
    the run goes on, and its progress lines meet a hung-up terminal (EIO): they are dropped, the run finishes.
    A write error used to escape the progress printer."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        shutil.copyfile(clip_16s, inputs / f"clip{i}.mp4")
    out = tmp_path / "o"
    flags = [f for f in RUN_FLAGS if f != "--no-progress"]
    args = ["run", str(inputs), "--out", str(out), *flags]
    with _Terminal() as terminal:
        terminal.type(" ".join([str(VIDPIPE), *args]) + " & disown")
        wait_for(lambda: (out / "_job" / "progress.json").exists(), 300, "the run to start", interval_s=0.1)
        supervisor = terminal.supervisor = _progress(out)["supervisor_pid"]
        terminal.hang_up()  # while the run is still at work
        assert process_running(supervisor)
        wait_for(lambda: not process_running(supervisor), 300, "the run to end")
    status = read_status(str(out))
    assert (status.run_state, status.done, status.failed) == ("finished", 2, 0), format_status(status)
    assert duplicate_keys(out) == 0


def _kept_and_rerun_finishes(args: list[str], out: Path, status, driver: int, total: int) -> None:  # noqa: ANN001
    """A stopped run of ``total`` videos kept its committed ones without duplicates, its driver's process group
    (the local Ray processes) ends, and a rerun finishes exactly the rest."""
    kept = {r["video_id"] for r in segment_rows(out)}
    assert 1 <= status.done < total and len(kept) == status.done and duplicate_keys(out) == 0

    def group_gone() -> bool:
        try:
            os.killpg(driver, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, 60, "the run's Ray processes to end")
    again = run_vidpipe(args, env=vidpipe_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{videos_ok(total - status.done)}, 0 failed, {status.done} skipped" in again.stdout, again.stdout
    assert read_status(str(out)).run_state == "finished" and duplicate_keys(out) == 0
