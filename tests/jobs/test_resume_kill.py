"""Kill real processes mid-job, rerun, and get exactly the rows of a clean run (DESIGN invariants 1-3)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from jobs.output import OutputDir
from jobs.query import run_query
from jobs.runner import JobRunner
from jobs.spec import JobSpec
from jobs.status import read_status
from tests.jobs.clusters import session_workers
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

pytestmark = pytest.mark.slow


def _commits(out) -> int:  # noqa: ANN001
    d = out / "_job" / "commits"
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


def test_driver_sigkilled_at_random_points_then_rerun_equals_clean_run(small_archive, baseline, tmp_path,
                                                                      ray_session):
    """SIGKILL the ``vidpipe run`` driver (a subprocess on the session's Ray cluster) at seeded random
    moments and once exactly between a commit record and its file moves; rerun to the end."""
    rng = random.Random(4)
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    args = ["run", str(small_archive), "--out", str(out), *RUN_FLAGS, "--wave-size", "8", "--commit-seconds", "0.3",
            "--address", address]
    killed_at = []
    for crash_at in (None, "recorded:2", None):
        env = vidpipe_env(**({"VIDPIPE_TEST_CRASH_AT": crash_at} if crash_at else {}))
        proc = subprocess.Popen([str(VIDPIPE), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        before = _commits(out)
        if crash_at is None:
            # a moment when this run has committed something and is still working: mid-wave, between
            # waves, or inside a flush, whichever the seeded delay hits
            wait_for(lambda: _commits(out) > before or proc.poll() is not None, 180, "a commit")  # noqa: B023
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=180)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:] if proc.stderr else ""
        killed_at.append(_commits(out))
        # a reader between crashes sees whole videos only, never one twice
        assert duplicate_keys(out) == 0
        # status knows at once that the run is over, not after the heartbeat ages
        status = read_status(str(out))
        if crash_at:  # the driver itself was killed: 'vidpipe run' (its supervisor) said so and recorded it
            assert status.run_state == "failed" and "killed by SIGKILL" in status.message, status
            assert "killed by SIGKILL" in (proc.stderr.read() if proc.stderr else ""), status
        else:  # 'vidpipe run' was killed, its driver with it: nothing recorded, but its pid is gone
            assert status.run_state == "dead", status
            driver = json.loads((out / "_job" / "progress.json").read_text())["pid"]
            assert driver != proc.pid  # the driver is the supervised child ...
            wait_for(lambda: not process_running(driver), 30, "the driver to end with 'vidpipe run'")  # noqa: B023
    assert killed_at[0] >= 1
    by_key = {(r["video_id"], r["segment_index"]): r for r in baseline}
    assert all(by_key[(r["video_id"], r["segment_index"])] == r for r in segment_rows(out))
    per_video = run_query(out, "SELECT v.video_id, v.n_segments, count(s.segment_index) n FROM videos v "
                               "JOIN segments s USING (video_id) GROUP BY 1, 2").to_pylist()
    assert per_video and all(r["n_segments"] == r["n"] for r in per_video)

    done = run_vidpipe(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert segment_rows(out) == baseline
    assert duplicate_keys(out) == 0
    # recovery left nothing behind: no staging files, every data file named by a commit
    o = OutputDir(out)
    assert list(o.staging_dir.iterdir()) == []
    for table in ("segments", "videos", "failures"):
        assert sorted(p.name for p in o.table_dir(table).glob("*.parquet")) == \
            sorted(p.name for p in o.committed_files(table))
    # a further run has nothing to do
    again = run_vidpipe(args)
    assert again.returncode == 0 and "0 videos ok" in again.stdout and "20 skipped" in again.stdout


def _kill_one(workers: list) -> bool:
    """SIGKILL the first of ``workers`` that is still there; whether one was."""
    for p in workers:
        try:
            os.kill(p.pid, signal.SIGKILL)
            return True
        except ProcessLookupError:
            continue
    return False


def test_decode_and_encoder_workers_sigkilled_mid_job(small_archive, baseline, tmp_path, ray_session):
    """SIGKILL a decode worker and an image-encoder worker while the job runs: same rows, nothing lost."""
    out = tmp_path / "out"
    spec = JobSpec(inputs=[str(small_archive)], out=str(out), allow_untrained=True, segment_seconds=1.0,
                   chunk_seconds=16, progress=False)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", JobRunner(spec).run()))
    runner.start()
    killed = []
    try:
        for title in ("DecodeTask", "ImageEncoder"):  # Ray Data may fuse the encoders and head in one actor
            wait_for(lambda: session_workers(title), 120, f"a {title} worker")  # noqa: B023
            time.sleep(0.5)  # at work, not just started
            # one that is still there: the first may have ended meanwhile (its task done)
            wait_for(lambda: _kill_one(session_workers(title)), 120, f"a {title} worker to kill")  # noqa: B023
            killed.append(title)
    finally:
        runner.join(timeout=600)
    assert killed == ["DecodeTask", "ImageEncoder"]
    r = result["r"]
    assert r.videos_done == 20 and r.videos_failed == 0
    assert segment_rows(out) == baseline
