"""``vidpipe run`` watches its driver (jobs.supervise): an end forced by Ray or the kernel is explained,
recorded in progress.json, and loses nothing committed; signals still stop the run as before."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

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
    vidpipe_env,
    wait_for,
)

# A stand-in driver: each MODE does what a real driver can do to its process.  It records itself in
# OUT/_job/progress.json as a run does, then touches OUT/ready.
_DRIVER = """
import json, os, signal, sys, time
from jobs import supervise
from jobs.cli import _stop_on_signals
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
    if mode == "count":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: seen.append(signal.Signals(signum).name))
    else:
        _stop_on_signals()  # the run's own handlers
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


def _on_a_terminal(out: Path, mode: str) -> tuple[subprocess.Popen, int]:
    """The stand-in driver as a session leader with a pseudo-terminal of its own; the terminal's master fd."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([sys.executable, "-c", _DRIVER, str(out), mode], cwd=Path(__file__).parents[2],
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=controlling_terminal)
    os.close(slave)
    return p, master


_STOPS = ["SIGTERM to vidpipe", "SIGINT to vidpipe", "SIGTERM to the process group", "SIGINT to the process group",
          "Ctrl-C on its terminal"]


def _stopped(out: Path, mode: str, how: str) -> tuple[int, str, str]:
    """Start the stand-in driver on a terminal, stop it ``how``; its exit status, stdout and stderr."""
    p, master = _on_a_terminal(out, mode)
    try:
        wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
        stop = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
        if how == "Ctrl-C on its terminal":
            os.write(master, b"\x03")  # the kernel signals the terminal's foreground process group
        elif how.endswith("to vidpipe"):
            p.send_signal(stop)
        else:
            os.killpg(p.pid, stop)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        os.close(master)
    return p.returncode, stdout, stderr


@pytest.mark.parametrize("how", _STOPS)
def test_signals_stop_the_driver_as_before(tmp_path, how):
    """However the stop comes, the driver stops once and cleanly (its commit is not broken off by a copy
    of the signal) and 'vidpipe run' exits 130 without a word of its own."""
    assert _stopped(tmp_path / "o", "wait", how) == (130, "stopped cleanly\n", "")


@pytest.mark.parametrize(("how", "seen"), [("SIGINT to vidpipe", {"SIGINT"}), ("Ctrl-C on its terminal", {"SIGINT"}),
                                           ("SIGTERM to vidpipe", {"SIGTERM"}),
                                           ("SIGTERM to the process group", {"SIGTERM", "SIGTERM SIGTERM"})])
def test_what_the_driver_receives(tmp_path, how, seen):
    """A signal for vidpipe's pid is passed on; the terminal's Ctrl-C is not sent twice (the driver has it);
    a process group's SIGTERM can come twice (directly and passed on, unless the kernel merges the two while
    the first is pending: the run's handler stops once either way)."""
    code, stdout, _ = _stopped(tmp_path / "o", "count", how)
    assert code == 130 and stdout.strip() in seen, stdout


def test_sigkill_to_vidpipe_takes_its_driver_with_it(tmp_path):
    out = tmp_path / "o"
    p = _driver(out, "wait")
    wait_for(lambda: (out / "ready").exists() or p.poll() is not None, 60, "the driver to start")
    driver = _progress(out)["pid"]
    assert driver != p.pid and process_running(driver)
    p.kill()
    p.communicate(timeout=60)
    wait_for(lambda: not process_running(driver), 30, "the driver to end with its supervisor")


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_lost_mid_run_is_explained_and_a_rerun_completes(shared_media, tmp_path):
    """The head node stops mid-job: Ray ends the driver (status 1, no Python runs); 'vidpipe run' says
    why, status reports the run failed with that reason, the committed videos stay, and a rerun on the
    local machine finishes the job without redoing them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):  # ten minutes of video: still running when the cluster goes (copies: links count once)
        shutil.copyfile(shared_media / "bbb_clip_720p.mp4", inputs / f"clip{i}.mp4")
    out = tmp_path / "o"
    root = Path(tempfile.mkdtemp(prefix="vpl-", dir="/tmp"))  # short: Ray's socket paths are limited
    cluster = LocalCluster(root, head_cpus=2)
    try:
        cluster.start()
        args = ["run", str(inputs), "--out", str(out), *RUN_FLAGS, "--commit-seconds", "0.3"]
        proc = subprocess.Popen([str(VIDPIPE), *args, "--address", cluster.address], env=cluster.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert 1 <= status.done < 10 and len(kept) == status.done and duplicate_keys(out) == 0

    again = run_vidpipe(args, env=vidpipe_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{10 - status.done} videos ok, 0 failed, {status.done} skipped" in again.stdout, again.stdout
    assert read_status(str(out)).run_state == "finished" and duplicate_keys(out) == 0
