"""A video that crashes its decoder, one that hangs, and flaky reads: each fails alone, the job finishes."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from jobs.query import run_query
from jobs.runner import JobRunner
from jobs.spec import EXIT_SOME_FAILED, JobSpec
from tests.jobs.conftest import duplicate_keys, make_archive

pytestmark = pytest.mark.slow


def test_crash_hang_and_read_errors_fail_only_their_video(tmp_path, ray_session, monkeypatch):
    archive = make_archive(tmp_path / "archive", 5, duration_s=2.0)
    clip = archive / "b" / "clip000.mp4"
    for name in ("crashme.mp4", "hangme.mp4", "flaky_once.mp4", "flaky_always.mp4"):
        shutil.copy(clip, archive / name)
    # Test hooks read by the decode stage (built on this driver, shipped to the workers): SIGKILL the
    # decoder process, sleep forever, fail the reads once / every time.
    monkeypatch.setenv("VIDPIPE_TEST_FAULTS",
                       "crash=crashme.mp4;hang=hangme.mp4;ioerror_once=flaky_once.mp4;ioerror=flaky_always.mp4")
    out = tmp_path / "out"
    spec = JobSpec(inputs=[str(archive)], out=str(out), allow_untrained=True, segment_seconds=1.0,
                   chunk_seconds=16, progress=False, video_timeout_s=3.0, max_attempts=3)
    result = JobRunner(spec).run()
    assert result.exit_code == EXIT_SOME_FAILED
    assert (result.videos_done, result.videos_failed) == (6, 3)
    failures = {r["uri"].rsplit("/", 1)[1]: r for r in run_query(out, "SELECT * FROM failures").to_pylist()}
    assert set(failures) == {"crashme.mp4", "hangme.mp4", "flaky_always.mp4"}
    crash = failures["crashme.mp4"]
    assert (crash["error_kind"], crash["attempts"], crash["stage"]) == ("worker_crashed", 3, "decode")
    assert "killed by signal SIGKILL" in crash["message"] and "in each of 3 tries" in crash["message"]
    hang = failures["hangme.mp4"]
    assert (hang["error_kind"], hang["stage"]) == ("timeout", "decode") and "no progress for 3 s" in hang["message"]
    flaky = failures["flaky_always.mp4"]
    assert (flaky["error_kind"], flaky["attempts"]) == ("read_error", 3) and "injected read error" in flaky["message"]
    videos = run_query(out, "SELECT uri, n_segments FROM videos").to_pylist()
    assert {v["uri"].rsplit("/", 1)[1] for v in videos} == {"clip000.mp4", "clip001.mp4", "clip002.mp4",
                                                            "clip003.mp4", "clip004.mp4", "flaky_once.mp4"}
    counts = run_query(out, "SELECT video_id, count(*) n FROM segments GROUP BY 1").to_pylist()
    assert sorted(c["n"] for c in counts) == sorted(v["n_segments"] for v in videos)
    assert duplicate_keys(out) == 0
    # the same labels as an undisturbed copy of the same clip
    same = run_query(out, "SELECT s.video_id, list(s.label ORDER BY s.segment_index) labels FROM segments s "
                          "JOIN videos v USING (video_id) WHERE v.uri LIKE '%clip000.mp4' OR v.uri LIKE '%flaky_once.mp4' "
                          "GROUP BY 1").to_pylist()
    assert len(same) == 2 and same[0]["labels"] == same[1]["labels"]
    # a rerun does not retry recorded failures (unless --retry-failed), but for read errors, which say nothing
    # of the video: the faults gone, flaky_always.mp4 is done now
    monkeypatch.delenv("VIDPIPE_TEST_FAULTS")
    again = JobRunner(spec).run()
    assert (again.videos_skipped, again.videos_done, again.videos_failed) == (8, 1, 0)
    # ... and still says that some inputs are failed
    assert again.videos_failed_before == 2 and again.exit_code == EXIT_SOME_FAILED
    # --retry-failed, the faults gone but one file now damaged: `failures` holds what is failed now,
    # one row per video; `failures_log` keeps every failure recorded
    (archive / "hangme.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x01" * 4000)
    retried = JobRunner(dataclasses.replace(spec, retry_failed=True)).run()
    assert (retried.videos_done, retried.videos_failed, retried.videos_skipped) == (1, 1, 7)
    now = run_query(out, "SELECT uri, error_kind FROM failures").to_pylist()
    assert [(r["uri"].rsplit("/", 1)[1], r["error_kind"]) for r in now] == [("hangme.mp4", "invalid_data")]
    log = run_query(out, "SELECT uri, error_kind FROM failures_log ORDER BY failed_at").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in log) == ["crashme.mp4", "flaky_always.mp4", "hangme.mp4",
                                                                 "hangme.mp4"]
    assert run_query(out, "SELECT count(*) n FROM videos").column("n")[0].as_py() == 8
    assert duplicate_keys(out) == 0
    final = JobRunner(spec).run()
    assert (final.videos_skipped, final.videos_failed_before, final.exit_code) == (9, 1, EXIT_SOME_FAILED)
