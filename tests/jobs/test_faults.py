"""A video that crashes its decoder, one that hangs, and flaky reads: each fails alone, the job finishes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from jobs.query import run_query
from jobs.runner import JobRunner
from jobs.spec import EXIT_SOME_FAILED, JobSpec
from pipeline.media import ChunkingSpec, SamplingSpec
from tests.jobs.conftest import duplicate_keys, make_archive, run_script

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


_RUN_WITHOUT_RAY = """
import json, sys
import ray
from jobs.runner import JobRunner
from jobs.spec import JobSpec

spec = JobSpec(inputs=[sys.argv[1]], out=sys.argv[2], allow_untrained=True, progress=False)
result = JobRunner(spec).run()
print(json.dumps({"ray_started": ray.is_initialized(), "failed": result.videos_failed, "exit": result.exit_code}))
"""


def test_local_files_that_are_not_there_fail_on_the_driver_with_the_decoders_rows(tmp_path):
    """On an embedded Ray a missing local file cost a decode task (~40 ms of Ray's each: a manifest of 100,000
    stale entries, over an hour) to say "not_found". The driver now finds it with a stat and writes the row the
    decode stage writes; a job of nothing else starts no Ray at all."""
    from workers.decode_stage import DecodeStage

    (tmp_path / "gone.mp4").symlink_to(tmp_path / "was_here.mp4")  # a link whose file is not there
    entries = [str(tmp_path / "a" / "missing.mp4"), str(tmp_path / "gone.mp4"), (tmp_path / "b c.mp4").as_uri()]
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(e + "\n" for e in entries))
    out = tmp_path / "out"
    r = run_script(_RUN_WITHOUT_RAY, [str(manifest), str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"ray_started": False, "failed": 3, "exit": EXIT_SOME_FAILED}
    keys = ["uri", "video_id", "stage", "error_kind", "message", "attempts"]
    rows = run_query(out, f"SELECT {', '.join(keys)} FROM failures ORDER BY uri").to_pylist()
    expected = []
    for row in rows:  # what the decode stage says of the same video, in this process
        stage = DecodeStage(SamplingSpec(), ChunkingSpec(), threads=1)
        stage.setup()
        (decoded,) = stage.decode_video(row["uri"], row["video_id"])
        expected.append({"uri": decoded["uri"], "video_id": decoded["video_id"], "stage": decoded["error_stage"],
                         "error_kind": decoded["error_kind"], "message": decoded["error_message"],
                         "attempts": json.loads(decoded["info_json"])["attempts"]})
    assert rows == expected
    assert [r["error_kind"] for r in rows] == ["not_found"] * 3
    # discovery records a link by what it points to, and a file:// entry as its path
    assert [r["uri"] for r in rows] == sorted([entries[0], str(tmp_path / "was_here.mp4"), str(tmp_path / "b c.mp4")])


def test_a_bad_manifest_row_after_missing_files_stops_the_run_saying_what_it_committed(tmp_path):
    """The waves read past missing files at once, so they may meet a bad row before the count of the inputs does
    (feeder: test_feeder_fails_what_is_missing_at_once_and_stops_at_a_row_that_names_no_video). Whichever finds it,
    the run stops there saying where, and what it says is committed is what is."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,note\n" + "".join(f"{tmp_path / f'gone{i}.mp4'},x\n" for i in range(3)) + ",y\n")
    out = tmp_path / "out"
    r = run_script(_RUN_WITHOUT_RAY, [str(manifest), str(out)])
    assert r.returncode == 1 and "ConfigError" in r.stderr, r.stderr[-3000:]
    said = r.stderr.strip().splitlines()[-1]
    found = re.search(r"m.csv line 5: the 'uri' cell is empty; .* \(found (as the run reached it|while counting the "
                      r"inputs, ahead of the videos being run); (.*): fix it and rerun", said)
    assert found, said
    failures = run_query(out, "SELECT uri FROM failures").column("uri").to_pylist()
    if found[2] == "no video had been run yet":
        assert failures == []
    else:
        assert found[2] == "the 3 videos this run finished are committed", said
        assert sorted(failures) == [str(tmp_path / f"gone{i}.mp4") for i in range(3)]
