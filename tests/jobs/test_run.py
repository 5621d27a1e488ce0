"""End to end on a real local Ray: real PyAV decoding of real files, Parquet read back, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.output import OutputDir
from jobs.query import run_query
from jobs.runner import JobRunner
from jobs.spec import EXIT_SOME_FAILED, EXIT_USAGE, JobSpec

pytestmark = pytest.mark.slow


def _duration_s(path: Path) -> float:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f for f in c.decode(v)]
        last = frames[-1]
        first_t = frames[0].time
        dur = last.duration * v.time_base if last.duration else 1 / float(v.average_rate)
        return float(last.time - first_t + dur)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, shared_media):
    """Two real clips in a folder tree, plus a corrupt file; and a missing path named on the command line."""
    root = tmp_path_factory.mktemp("archive")
    (root / "sub").mkdir()
    shutil.copy(shared_media / "bbb_5s_51.mp4", root / "bbb 5s.mp4")
    shutil.copy(shared_media / "bikes_noaudio.mp4", root / "sub" / "bikes.mp4")
    (root / "sub" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(5000))
    return root


@pytest.fixture(scope="module")
def first_run(archive, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("out") / "o"
    spec = JobSpec(inputs=[str(archive), str(archive / "missing.mp4")], out=str(out), allow_untrained=True,
                   chunk_seconds=4, progress=False)
    result = JobRunner(spec).run()
    return spec, out, result


def test_the_job_records_the_precision_its_encoders_ran_at(first_run):
    """job.json recorded the flag 'auto', which says nothing of the rows: bf16 here, float32 on another machine."""
    from pipeline.precision import cpu_has_native_bf16

    spec, out, _ = first_run
    assert spec.precision == "auto"
    assert json.loads((out / "_job" / "job.json").read_text())["precision"] == ("bf16" if cpu_has_native_bf16()
                                                                                 else "fp32")


def test_segments_match_each_files_duration(first_run, archive):
    _, out, result = first_run
    assert result.videos_done == 2 and result.videos_failed == 2
    assert result.exit_code == EXIT_SOME_FAILED
    videos = {r["uri"]: r for r in run_query(out, "SELECT * FROM videos").to_pylist()}
    for name in ("bbb 5s.mp4", "sub/bikes.mp4"):
        path = archive / name
        v = videos[str(path.resolve())]
        dur = _duration_s(path)
        assert v["duration_s"] == pytest.approx(dur, abs=1e-3)
        assert v["n_segments"] == math.ceil(dur - 1e-3)
        seg = run_query(out, f"SELECT * FROM segments WHERE video_id = '{v['video_id']}' ORDER BY segment_index")
        rows = seg.to_pylist()
        assert [r["segment_index"] for r in rows] == list(range(v["n_segments"]))
        assert rows[0]["start_s"] == 0.0 and rows[-1]["end_s"] == pytest.approx(dur, abs=1e-3)
        assert all(r["model_id"] == "untrained" for r in rows)
        assert all(len(r["topk_labels"]) == 5 and r["topk_labels"][0] == r["label"] for r in rows)
        assert all(r["score"] == pytest.approx(r["topk_scores"][0]) for r in rows)
    assert videos[str((archive / "sub/bikes.mp4").resolve())]["has_audio"] is False
    assert videos[str((archive / "bbb 5s.mp4").resolve())]["audio_channels"] == 6


def test_bad_inputs_become_failures_rows(first_run):
    _, out, _ = first_run
    f = {Path(r["uri"]).name: r for r in run_query(out, "SELECT * FROM failures").to_pylist()}
    assert f["missing.mp4"]["error_kind"] == "not_found"
    assert f["broken.mp4"]["error_kind"] == "invalid_data"
    assert all(r["stage"] == "decode" and r["message"] for r in f.values())


def test_rerun_resumes_without_duplicates(first_run):
    spec, out, first = first_run
    before = run_query(out, "SELECT * FROM segments ORDER BY video_id, segment_index")
    again = JobRunner(spec).run()
    assert again.videos_skipped == 4 and again.videos_done == 0
    after = run_query(out, "SELECT * FROM segments ORDER BY video_id, segment_index")
    assert after.equals(before)
    dupes = run_query(out, "SELECT video_id, segment_index, count(*) c FROM segments GROUP BY 1, 2 HAVING c > 1")
    assert dupes.num_rows == 0


def test_a_rerun_names_finished_videos_whose_file_changed_since(first_run, archive, tmp_path, capsys):
    """A file re-encoded or replaced in place was skipped as finished without a word: its rows describe the old file."""
    spec, out, _ = first_run
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    keys = "SELECT video_id, segment_index, label, score FROM segments ORDER BY 1, 2"
    before = run_query(copy, keys)
    rerun = ["run", *spec.inputs, "--out", str(copy), "--allow-untrained", "--chunk-seconds", "4", "--no-progress"]
    clip = archive / "bbb 5s.mp4"
    original = clip.read_bytes()
    try:
        with open(clip, "ab") as f:
            f.write(b"\0" * 1000)
        code = main(rerun)
    finally:
        clip.write_bytes(original)
    err = capsys.readouterr().err
    assert code == EXIT_SOME_FAILED  # the two inputs that failed in the first run
    assert (f"WARNING: 1 finished video changed size since it was labelled ({clip.resolve()} (now "
            f"{len(original) + 1000:,} bytes)): its rows in {copy} describe the old file") in err, err
    assert "run them into a new --out" in err
    assert run_query(copy, keys).equals(before)  # nothing relabelled, nothing lost
    assert main(rerun) == EXIT_SOME_FAILED and "changed size" not in capsys.readouterr().err


def test_other_sampling_on_same_out_is_refused(first_run, capsys):
    spec, out, _ = first_run
    code = main(["run", *spec.inputs, "--out", str(out), "--allow-untrained", "--segment-seconds", "2"])
    assert code == EXIT_USAGE
    assert "already holds results of another job" in capsys.readouterr().err


def test_a_deleted_committed_file_is_named_until_repair_and_the_rerun_redoes_its_videos(first_run, tmp_path,
                                                                                        capsys):
    """Before: the rerun said '0 ok, 4 skipped' over the lost segments, query and status failed with tracebacks."""
    spec, out, _ = first_run
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    keys = "SELECT video_id, segment_index, label, score FROM segments ORDER BY 1, 2"
    before = run_query(copy, keys)
    lost = OutputDir(copy).committed_files("segments")[0]
    commit = next(c for c in OutputDir(copy).commits() if c.files.get("segments") == lost.name)
    lost.unlink()
    rerun = ["run", *spec.inputs, "--out", str(copy), "--allow-untrained", "--chunk-seconds", "4", "--no-progress"]
    for argv in (rerun, ["query", str(copy), "SELECT 1"], ["status", str(copy)]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert f"{lost} is missing: committed" in err and f"vidpipe repair {copy}" in err, err
        assert "Traceback" not in err
    assert main(["repair", str(copy), "--dry-run"]) == 0 and lost.name in capsys.readouterr().out
    assert OutputDir(copy).missing_files()  # the dry run changed nothing
    assert main(["repair", str(copy)]) == 0
    said = capsys.readouterr().out
    assert f"dropped commit {commit.name}" in said and "rerun the job" in said
    assert main(["repair", str(copy)]) == 0 and "nothing to drop" in capsys.readouterr().out
    assert main(rerun) == EXIT_SOME_FAILED  # the two bad inputs fail again
    said = capsys.readouterr().out
    from tests.jobs.conftest import videos_ok

    redone = commit.n_videos + commit.n_failures
    assert f"{videos_ok(commit.n_videos)}, {commit.n_failures} failed, {4 - redone} skipped" in said, said
    after = run_query(copy, keys)
    assert after.column("video_id").to_pylist() == before.column("video_id").to_pylist()
    assert after.column("label").to_pylist() == before.column("label").to_pylist()
    assert after.column("score").to_pylist() == pytest.approx(before.column("score").to_pylist(), abs=1e-5)


def test_a_bad_manifest_row_far_ahead_stops_the_run_at_the_next_wave(shared_media, tmp_path, ray_session):
    """Counting the inputs reads the whole manifest at the start; the bad row used to be only a warning
    there, and an error when a wave reached it (hours later on a big manifest)."""
    from pipeline.errors import ConfigError

    # empty files: videos the waves must run (a missing file would fail in the driver, at once)
    for i in range(20):  # ten waves of two ahead of the bad row
        (tmp_path / f"empty{i}.mp4").touch()
    rows = [str(shared_media / "bbb_5s_51.mp4")] + [str(tmp_path / f"empty{i}.mp4") for i in range(20)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("note,uri\n" + "".join(f"x,{r}\n" for r in rows) + "lonely\n")
    out = tmp_path / "o"
    spec = JobSpec(inputs=[str(manifest)], out=str(out), allow_untrained=True, progress=False, wave_size=2)
    with pytest.raises(ConfigError, match=r"manifest .*m.csv line 23: missing the 'uri' column \(found while "
                                          r"counting the inputs.*fix it and rerun") as err:
        JobRunner(spec).run()
    finished = OutputDir(out).finished_video_ids()
    assert len(finished) <= 2  # the first wave at most, not 10 waves up to the bad row
    # it said "the videos finished so far are committed" when none had been run
    assert (f"the {len(finished)} videos this run finished are committed" if finished
            else "no video had been run yet") in str(err.value)
    manifest.write_text(manifest.read_text().replace("lonely\n", "lonely,y\n"))
    again = JobRunner(dataclasses.replace(spec, wave_size=None)).run()
    assert again.videos_skipped == len(finished) and again.videos_done + again.videos_failed == 22 - len(finished)


def test_without_its_job_json_an_output_still_refuses_another_jobs_rows(first_run, tmp_path, capsys):
    """Before: a removed _job/job.json skipped the identity check, and rows of two jobs mixed in one OUT."""
    spec, out, _ = first_run
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    (copy / "_job" / "job.json").unlink()
    rerun = ["run", *spec.inputs, "--out", str(copy), "--allow-untrained", "--chunk-seconds", "4", "--no-progress"]
    for extra, said in ((["--segment-seconds", "2"], "segment_seconds 1.0; this run: segment_seconds 2.0"),
                        (["--embeddings"], "embeddings False; this run: embeddings True"),
                        (["--top-k", "2"], "top_k 5; this run: top_k 2")):
        assert main([*rerun, *extra]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{copy} holds results of another job ({said}), and its _job/job.json" in err, err
        assert not (copy / "_job" / "job.json").exists()
    assert main(rerun) == EXIT_SOME_FAILED  # the same job: resumes, and records itself again
    said = capsys.readouterr()
    assert "0 videos ok, 0 failed, 4 skipped" in said.out
    assert "4 videos already finished in" in said.err and "(2 of them failed; done-set" in said.err
    assert json.loads((copy / "_job" / "job.json").read_text())["model_id"] == "untrained"


@pytest.mark.parametrize("clip_name, bundle", [("bikes_noaudio.mp4", "untrained"), ("bbb_clip_720p.mp4", "default")])
def test_chunked_and_whole_runs_give_identical_labels(shared_media, tmp_path, ray_session, clip_name, bundle):
    """One chunk or many: the same labels and scores (the default bundle's audio features included)."""
    clip = shared_media / clip_name
    untrained = bundle == "untrained"
    results = []
    for chunk_seconds in (16, 600):
        out = tmp_path / f"o{chunk_seconds}"
        spec = JobSpec(inputs=[str(clip)], out=str(out), allow_untrained=untrained, chunk_seconds=chunk_seconds,
                       progress=False, segment_seconds=0.5 if untrained else None)
        JobRunner(spec).run()
        results.append(run_query(out, "SELECT segment_index, label, score FROM segments ORDER BY 1").to_pylist())
    whole, chunked = results
    assert [r["label"] for r in whole] == [r["label"] for r in chunked]
    assert [r["score"] for r in whole] == pytest.approx([r["score"] for r in chunked], abs=1e-5)


def test_query_command_prints_table_csv_json(first_run, capsys):
    _, out, _ = first_run
    assert main(["query", str(out), "SELECT count(*) AS n FROM segments"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].strip() == "n" and "(1 row)" in text
    assert main(["query", str(out), "SELECT error_kind FROM failures ORDER BY 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["error_kind", "invalid_data", "not_found"]
    assert main(["query", str(out), "SELECT 1 AS one", "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '{"one": 1}'
    assert main(["query", str(out), "SELEC nonsense"]) == EXIT_USAGE


def test_console_script_against_the_session_cluster(first_run, shared_media, tmp_path, ray_session):
    """The installed ``vidpipe`` command, connected with --address to the test session's Ray."""
    address = ray_session.get_runtime_context().gcs_address
    exe = Path(sys.executable).with_name("vidpipe")
    out = tmp_path / "o"
    proc = subprocess.run([str(exe), "run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(out),
                           "--allow-untrained", "--address", address],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr and "1 video ok," in proc.stdout
    files = OutputDir(out).committed_files("segments")
    assert pq.read_table(files[0]).num_rows == 6
    proc = subprocess.run([str(exe), "query", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "segments" in proc.stdout


def test_console_script_on_its_own_embedded_ray_stops_every_ray_process(shared_media, tmp_path):
    """``vidpipe run`` without --address starts a Ray of its own; when it returns, its output is complete
    (the summary line included: the command leaves without the interpreter's teardown) and none of
    that Ray's processes are left."""
    import psutil

    from tests.jobs.conftest import VIDPIPE, vidpipe_env, wait_for

    ray_tmp = Path(tempfile.mkdtemp(prefix="vpray", dir="/tmp"))  # short: Ray's Unix sockets live under it
    try:
        def session_processes() -> list[psutil.Process]:
            found = []
            for p in psutil.process_iter(["cmdline"]):
                if str(ray_tmp) in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            return found

        out = tmp_path / "o"
        env = vidpipe_env(RAY_TMPDIR=str(ray_tmp))
        env.pop("PYTHONUNBUFFERED", None)  # as most users run it: stdout to a pipe is block-buffered
        proc = subprocess.Popen([str(VIDPIPE), "run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(out),
                                 "--no-progress"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = 0
        while proc.poll() is None:
            seen = max(seen, len(session_processes()))
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        assert seen >= 3  # GCS, raylet and the workers were there, found by the session's directory
        assert stdout.startswith("done: 1 video ok, 0 failed") and stdout.endswith(f"output {out}\n")
        # a command without Ray takes the same way out, its output intact
        query = subprocess.run([str(VIDPIPE), "query", str(out), "SELECT count(*) AS n FROM segments", "--format",
                                "csv"], env=env, capture_output=True, text=True, timeout=120)
        assert query.returncode == 0 and query.stdout == "n\n6\n", query.stderr
        # workers end on their own just after the command returns (it does not wait for them)
        wait_for(lambda: not session_processes(), 20, "the session's processes to end")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sigterm_stops_a_run_like_ctrl_c(shared_media, tmp_path):
    """A scheduler's SIGTERM (SLURM, Kubernetes, systemd): the run stops as interrupted, exit 130 (starting
    its own Ray, ray.init had replaced the CLI's handler with one that exited 15, the run "failed")."""
    import signal

    from jobs.status import read_status
    from tests.jobs.conftest import VIDPIPE, vidpipe_env, wait_for

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):  # ten minutes of video: still running when the signal comes
        (inputs / f"clip{i}.mp4").symlink_to(shared_media / "bbb_clip_720p.mp4")
    out = tmp_path / "o"
    proc = subprocess.Popen([str(VIDPIPE), "run", str(inputs), "--out", str(out), "--no-progress"],
                            env=vidpipe_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def working() -> bool:  # Ray started and a wave handed out (progress.json is rewritten every 5 s)
            progress = out / "_job" / "progress.json"
            return progress.exists() and json.loads(progress.read_text()).get("wave_size", 0) > 0

        wait_for(lambda: working() or proc.poll() is not None, 120, "the run to start its first wave")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "vidpipe: interrupted (stopped by SIGTERM); rerun the same command to resume" in stderr
    status = read_status(str(out))
    assert (status.run_state, status.message) == ("interrupted", "stopped by SIGTERM")


_SIGTERM_WHILE_RAY_STARTS = """
import os, signal, sys
import ray._private.node as node
from jobs.stopping import install
from jobs.runner import init_ray

install()
start = node.Node.start_ray_processes

def signalled(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # inside ray.init, where Ray's own handler would sys.exit(15)
    return start(self, *args, **kwargs)

node.Node.start_ray_processes = signalled
try:
    init_ray(None)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
print("ray started")
"""


def test_sigterm_while_ray_starts_stops_like_ctrl_c():
    """A scheduler's SIGTERM in the first seconds, while ray.init runs with Ray's handler (sys.exit(15)):
    the run stops as interrupted (exit 130), not 'failed: SystemExit: 15'."""
    from tests.jobs.conftest import run_script

    r = run_script(_SIGTERM_WHILE_RAY_STARTS, [])
    assert (r.returncode, r.stdout) == (130, "interrupted\n"), r.stderr[-3000:]


_STOP_AS_RAY_FORKS = """
import logging, os, signal, sys, threading
from jobs.stopping import install
from jobs.raystop import shutdown_ray
from jobs.runner import init_ray

install()
forks = []

def before_fork():  # the stop arrives as Ray forks a process of its node (with a preexec_fn)
    forks.append(1)
    if len(forks) == 1:
        os.kill(os.getpid(), signal.SIGTERM)

os.register_at_fork(before=before_fork)  # runs first: before logging's own at-fork handler
try:
    init_ray(None)
    print("ray started, the stop lost", flush=True)
except KeyboardInterrupt as exc:
    print(f"interrupted: {exc}", flush=True)
logged = threading.Thread(target=logging.getLogger("x").warning, args=("logging works",), daemon=True)
logged.start()
logged.join(20)
print("logging works" if not logged.is_alive() else "logging hangs", flush=True)
if not logged.is_alive():
    shutdown_ray()
os._exit(0)
"""


def test_a_stop_as_ray_forks_its_processes_is_taken_after_ray_has_started():
    """`vidpipe train` stopped by SIGTERM as Ray started hung in CI: the KeyboardInterrupt landed in
    logging's at-fork handler (Ray starts its processes with a preexec_fn), was swallowed there with
    logging's lock held, and the next log line waited for ever. The stop now waits for ray.init's end."""
    from tests.jobs.conftest import run_script

    r = run_script(_STOP_AS_RAY_FORKS, [])
    assert r.stdout == "interrupted: stopped by SIGTERM\nlogging works\n", (r.stdout, r.stderr[-3000:])

_STOP_AFTER_THE_RUN = """
import os, signal, sys, time
from jobs import cli, raystop, stopping

sig = getattr(signal, sys.argv[1])

def main():
    stopping.install()  # as 'vidpipe run' does
    print("run finished", flush=True)
    return 0

def shutdown_ray():  # the stop arrives while Ray shuts down ('ray job stop' as the run ends, a terminal closing)
    os.kill(os.getpid(), sig)
    time.sleep(0.3)
    print("ray stopped", flush=True)

cli.main, raystop.shutdown_ray = main, shutdown_ray
sys.exit(cli._command())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stop_after_the_run_has_finished_does_not_break_off_its_end(sig):
    """A SIGTERM or SIGHUP that comes once the command is over (during Ray's shutdown) has nothing left to stop:
    the command ends with the run's own status, not a KeyboardInterrupt traceback and status 1 (SIGHUP did)."""
    r = subprocess.run([sys.executable, "-c", _STOP_AFTER_THE_RUN, sig], capture_output=True, text=True,
                       cwd=Path(__file__).parents[2], timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "run finished\nray stopped\n", "")


_RAY_ENDS_THE_PROCESS_AS_IT_SHUTS_DOWN = """
import os, sys
from jobs import cli, raystop, supervise

def main():
    print("vidpipe: interrupted (stopped by Ctrl-C (SIGINT)); rerun the same command to resume", flush=True)
    return 130

def shutdown_ray():
    os._exit(1)  # as Ray's core worker once ended a stopped run's driver while Ray shut down

cli.main, raystop.shutdown_ray = main, shutdown_ray
sys.exit(supervise.supervise(["run", "in.mp4", "--out", sys.argv[1]], cli._command))
"""


def test_a_driver_that_ray_ends_after_the_command_finished_keeps_the_commands_status(tmp_path):
    """A run stopped by Ctrl-C said "interrupted" and committed its videos; Ray's core worker then ended the
    driver with status 1 as Ray shut down, and the supervisor reported "the run was stopped by SIGINT and
    ended abruptly ... Ray's local processes had the signal too", recording the run as interrupted there."""
    r = subprocess.run([sys.executable, "-c", _RAY_ENDS_THE_PROCESS_AS_IT_SHUTS_DOWN, str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert (r.returncode, r.stderr) == (130, ""), r.stderr[-2000:]
    assert not (tmp_path / "o").exists()  # no record of an abrupt end


def test_a_reader_that_goes_away_does_not_fail_the_run(shared_media, tmp_path):
    """`vidpipe run ... 2>&1 | head -1`: the pipe closes, the run goes on and exits with its own status."""
    from jobs.status import read_status
    from tests.jobs.conftest import VIDPIPE, vidpipe_env

    out = tmp_path / "o"
    proc = subprocess.Popen([str(VIDPIPE), "run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(out)],
                            env=vidpipe_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    proc.stdout.readline()  # the first line, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    status = read_status(str(out))
    assert (status.run_state, status.done, status.failed) == ("finished", 1, 0)


def test_device_cuda_without_a_gpu_is_a_usage_error(first_run, tmp_path, capsys):
    """It ran on the CPUs and exited 0 without a word."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec, _, _ = first_run
    code = main(["run", *spec.inputs, "--out", str(tmp_path / "o"), "--allow-untrained", "--device", "cuda",
                 "--no-progress"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no CUDA GPU" in err and "--device auto" in err
    assert not (tmp_path / "o").exists()


def test_codecs_without_a_decoder_are_explained_and_the_picture_is_labelled(first_run, tmp_path, capsys):
    """Such a file failed as internal_error with a Python traceback for message; a video whose only audio track
    cannot be decoded (AC-4, MPEG-H) is labelled without audio, and the run says so."""
    from tests import media_factory as mf

    source = mf.make_video(tmp_path / "src.mp4", duration_s=2.0, audio="tone")
    inputs = tmp_path / "in"
    inputs.mkdir()
    mf.without_decoder(inputs / "ac4.mp4", source, "audio")
    mf.without_decoder(inputs / "unknown_video.mp4", source, "video")
    out = tmp_path / "o"
    code = main(["run", str(inputs), "--out", str(out), "--allow-untrained", "--no-progress"])
    assert code == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert ("WARNING: 1 video was labelled without audio: this FFmpeg build cannot decode its audio tracks' codec"
            in err and "\"SELECT uri FROM videos WHERE audio_codec = '(no decoder)'\"" in err), err
    (failure,) = run_query(out, "SELECT uri, error_kind, message FROM failures").to_pylist()
    assert failure["uri"].endswith("unknown_video.mp4") and failure["error_kind"] == "unsupported_codec"
    assert "its video track has a codec this FFmpeg build" in failure["message"] and "Traceback" not in failure["message"]
    (video,) = run_query(out, "SELECT uri, has_audio, audio_codec, n_segments FROM videos").to_pylist()
    assert video == {"uri": str(inputs / "ac4.mp4"), "has_audio": False, "audio_codec": "(no decoder)",
                     "n_segments": 2}
    assert run_query(out, "SELECT count(*) AS n FROM segments WHERE NOT has_audio").to_pylist() == [{"n": 2}]


def test_a_bad_manifest_row_found_by_the_run_is_its_status_message_in_its_own_words(first_run, tmp_path, capsys):
    """status said 'failed: ConfigError: manifest ...' (the exception's class, as for an internal error)."""
    from jobs.status import read_status

    spec, _, _ = first_run
    good = next(p for p in spec.inputs if Path(p).is_dir() or Path(p).suffix == ".mp4")
    manifest = tmp_path / "m.csv"
    first = next(Path(good).rglob("*.mp4")) if Path(good).is_dir() else Path(good)
    manifest.write_text(f"id,uri\n1,{first}\n2,,note\n")
    out = tmp_path / "o"
    assert main(["run", str(manifest), "--out", str(out), "--allow-untrained", "--no-progress"]) == EXIT_USAGE
    said = f"manifest {manifest} line 3: the 'uri' cell is empty"
    assert said in capsys.readouterr().err
    status = read_status(str(out))
    assert status.run_state == "failed" and status.message.startswith(said), status.message


def test_a_path_that_is_not_utf8_named_on_the_command_line_runs(tmp_path, shared_media):
    """Named directly (not found in a folder), it stopped the run inside ray.init, exit 1: Ray records the
    driver's command line as UTF-8. A current folder with such a name is a usage error naming it."""
    from tests.jobs.conftest import run_vidpipe

    odd = tmp_path / os.fsdecode(b"bad\xffname.mp4")
    shutil.copy(shared_media / "bbb_5s_51.mp4", odd)
    out = tmp_path / "o"
    done = run_vidpipe(["run", str(odd), "--out", str(out), "--allow-untrained", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"file://{tmp_path.resolve()}/bad%FFname.mp4"
    assert run_query(out, "SELECT uri, n_segments FROM videos").to_pylist() == [{"uri": uri, "n_segments": 6}]
    here = tmp_path / os.fsdecode(b"folder\xfe")
    here.mkdir()
    stopped = subprocess.run([sys.executable, "-m", "jobs.cli", "run", uri, "--out", str(tmp_path / "o2"),
                              "--allow-untrained", "--no-progress"], cwd=here, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert stopped.returncode == EXIT_USAGE, stopped.stderr[-3000:]
    assert "has a name that is not UTF-8, which Ray cannot start from; run vidpipe from another folder" in \
        stopped.stderr


_HANDLER_AT_HEAVY_IMPORTS = """
import signal, sys
from jobs import cli

class Watch:  # notes the SIGTERM handler when the runner (torch, pyarrow, Ray's adapter) starts loading
    def find_spec(self, name, path=None, target=None):
        if name == "jobs.runner":
            print(getattr(signal.getsignal(signal.SIGTERM), "__module__", "default"), flush=True)
            sys.exit(0)

sys.meta_path.insert(0, Watch())
cli.main(["run", "in.mp4", "--out", "out"])
"""


def test_the_stop_handler_is_in_place_before_the_run_loads_its_libraries():
    """The runner's imports take 2-4 s: a SIGTERM then killed `vidpipe run` by the signal (status 143,
    "the run was killed by SIGTERM") where any later one stops it as interrupted (130)."""
    r = subprocess.run([sys.executable, "-c", _HANDLER_AT_HEAVY_IMPORTS], capture_output=True, text=True,
                       cwd=Path(__file__).parents[2], timeout=120)
    assert (r.returncode, r.stdout) == (0, "jobs.stopping\n"), r.stderr[-2000:]


def test_a_stop_inside_the_runs_imports_is_taken_once_they_are_done(tmp_path):
    """A SIGTERM inside the run's imports (seconds: torch, PyAV, pyarrow) is taken once they are done: the run
    ends as interrupted, with nothing written and no half-imported package left for its cleanup to meet."""
    from tests.jobs.conftest import stop_inside_an_import

    r = stop_inside_an_import("av.container", ["run", str(tmp_path / "in.mp4"), "--out", str(tmp_path / "out")])
    assert (r.returncode, r.stderr) == (130, "vidpipe: interrupted (stopped by SIGTERM); rerun the same command "
                                             "to resume\n")
    assert not (tmp_path / "out").exists()


_BROKEN_OFF_IMPORT = """
import os, signal, sys
from jobs import cli, stopping

class StopThere:
    def find_spec(self, name, path=None, target=None):
        if name == "av.container":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

def main():  # a command whose stop lands in a lazy import no deferral covers, with Ray imported
    import ray
    stopping.install()
    sys.meta_path.insert(0, StopThere())
    try:
        import pipeline.decode  # noqa: F401  (imports PyAV)
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}", flush=True)
        return 130
    return 0

cli.main = main
sys.exit(cli._command())
"""


def test_the_cleanup_after_a_stop_does_not_meet_a_half_imported_module():
    """The cleanup every command ends with imported the runner to stop Ray; after a stop inside `import av`
    that import met the half-made package and the stopped command ended with a traceback (status 1)."""
    r = subprocess.run([sys.executable, "-c", _BROKEN_OFF_IMPORT], capture_output=True, text=True,
                       cwd=Path(__file__).parents[2], timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (130, "interrupted: stopped by SIGTERM\n", "")


_SLOW_STOP_AFTER_RAY_STARTED = """
import os, signal, sys, time
from jobs.stopping import install
from jobs.raystop import shutdown_ray
from jobs.runner import init_ray

install()
init_ray(None)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except KeyboardInterrupt as exc:
    print(f"interrupted: {exc}", flush=True)
time.sleep(4.5)  # a stop that takes a while: the finished videos' commit on S3, Ray's shutdown
print("still here", flush=True)
shutdown_ray()
"""


def test_a_stop_that_takes_more_than_3_s_after_ray_has_started_is_not_aborted():
    """Ray's core worker installs abseil's failure handler for SIGTERM under the CLI's: a SIGTERM printed a
    crash trace ("*** SIGTERM received ...") and armed a 3-s alarm that aborted the driver (SIGABRT)."""
    from tests.jobs.conftest import vidpipe_env

    r = subprocess.run([sys.executable, "-c", _SLOW_STOP_AFTER_RAY_STARTED], capture_output=True, text=True,
                       cwd=Path(__file__).parents[2], env=vidpipe_env(), timeout=300)
    assert (r.returncode, r.stdout) == (0, "interrupted: stopped by SIGTERM\nstill here\n"), r.stderr[-3000:]
    assert "SIGTERM received" not in r.stderr


def test_bf16_asked_for_on_a_cpu_without_native_bf16_is_said_to_be_emulated(shared_media, tmp_path, capsys,
                                                                            monkeypatch, ray_session):
    """--precision bf16 where oneDNN emulates it ran the encoders several times slower than fp32, unsaid."""
    import pipeline.precision as precision

    assert precision.emulated_bf16_warning("fp32", "cpu") is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.emulated_bf16_warning("bf16", "cpu") is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.emulated_bf16_warning("fp32", "cpu") is None
    code = main(["run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(tmp_path / "o"), "--allow-untrained",
                 "--precision", "bf16", "--device", "cpu", "--no-progress"])
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    assert ("WARNING: --precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): the encoders' bf16 is "
            "emulated here") in said.out + said.err
    assert json.loads((tmp_path / "o" / "_job" / "job.json").read_text())["precision"] == "bf16"
