"""Fast logic tests of the archive machinery: id sets, waves and bisection, cluster plans, submit, faults."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

import pytest

from jobs.discover import VideoRef, discover
from jobs.idset import IdSet
from jobs.manifest import _Base
from jobs.output import sized
from jobs.plan import plan_for, plan_for_cluster
from jobs.progress import Progress
from jobs.runner import JobRunner, WaveFeeder
from jobs.spec import JobSpec
from jobs.submit import entrypoint, split_args
from pipeline.errors import ConfigError
from pipeline.inputs import _s3_error
from pipeline.media import ChunkingSpec, SamplingSpec
from workers.decode_stage import DecodeStage


def test_idset_is_a_set_of_16_byte_digests():
    s = IdSet(merge_every=4)
    names = [f"/archive/{i}.mp4" for i in range(50)]
    assert all(s.add(n) for n in names)
    assert not s.add(names[3]) and len(s) == 50
    assert all(n in s for n in names) and "/archive/x.mp4" not in s and 5 not in s
    s.update(names[:10] + ["/new.mp4"])
    assert len(s) == 51
    assert IdSet(names).nbytes == 16 * 50


def test_feeder_streams_waves_and_skips_by_uri(tmp_path):
    for i in range(7):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x")
    refs = list(discover([str(tmp_path)]))
    done = IdSet([refs[1].uri, refs[4].uri])
    feeder = WaveFeeder(discover([str(tmp_path), str(tmp_path / "v0.mp4")]), done)  # v0 named twice
    waves = [feeder.next_wave(3), feeder.next_wave(3), feeder.next_wave(3)]
    assert [len(w) for w in waves] == [3, 2, 0]
    assert feeder.exhausted and (feeder.discovered, feeder.skipped) == (7, 2)


def test_feeder_counts_finished_videos_whose_file_changed_size(tmp_path):
    """A file re-encoded in place is skipped as finished (its rows stay): the rerun must say so, by its size."""
    for i in range(5):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x" * 10)
    uri = {i: str((tmp_path / f"v{i}.mp4").resolve()) for i in range(5)}
    sizes = IdSet([sized(uri[0], 10), sized(uri[1], 10), sized(uri[2], None), sized(uri[4], 10)])
    done, failed = IdSet(uri.values()), IdSet([uri[3]])
    (tmp_path / "v1.mp4").write_bytes(b"x" * 12)  # changed
    (tmp_path / "v2.mp4").write_bytes(b"x" * 12)  # no size recorded: not checked
    (tmp_path / "v3.mp4").write_bytes(b"x" * 12)  # failed, not finished: --retry-failed is the way
    (tmp_path / "v4.mp4").unlink()  # gone: keeps its rows, nothing to compare
    s3 = [VideoRef("s3://b/a.mp4", "a", 7), VideoRef("s3://b/c.mp4", "c", 9), VideoRef("s3://b/m.mp4", "m")]
    done.update(r.uri for r in s3)
    sizes.update([sized("s3://b/a.mp4", 7), sized("s3://b/c.mp4", 8), sized("s3://b/m.mp4", 1)])
    feeder = WaveFeeder(iter([*discover([str(tmp_path)]), VideoRef(uri[4], "v4"), *s3]), done, failed, sizes)
    assert feeder.next_wave(10) == [] and feeder.skipped == 8
    assert feeder.changed == 2
    assert feeder.changed_examples == [f"{uri[1]} (now 12 bytes)", "s3://b/c.mp4 (now 9 bytes)"]
    unchecked = WaveFeeder(discover([str(tmp_path)]), done, failed)  # no sizes given: nothing is stat'ed
    assert unchecked.next_wave(10) == [] and unchecked.changed == 0


def test_feeder_takes_back_videos_and_hands_them_out_first(tmp_path):
    for i in range(7):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x")
    feeder = WaveFeeder(discover([str(tmp_path)]), IdSet())
    first, peeked = feeder.next_wave(2), feeder.next_wave(10)
    assert feeder.exhausted and len(peeked) == 5
    feeder.unread(peeked[1:])  # the runner peeks ahead, keeps what it runs now, gives back the rest
    assert not feeder.exhausted
    assert feeder.next_wave(3) == peeked[1:4] and feeder.next_wave(3) == peeked[4:] and feeder.next_wave(3) == []
    assert feeder.exhausted and feeder.discovered == 7 and len({r.uri for r in first + peeked}) == 7
    # at_end looks one video ahead: a wave that takes exactly what is left knows it is the last
    feeder = WaveFeeder(discover([str(tmp_path)]), IdSet([str(tmp_path / "v6.mp4")]))
    wave = feeder.next_wave(6)
    assert len(wave) == 6 and not feeder.exhausted and feeder.at_end() and feeder.next_wave(6) == []
    feeder = WaveFeeder(discover([str(tmp_path)]), IdSet())
    wave = feeder.next_wave(6)
    assert not feeder.at_end() and feeder.next_wave(6) != [] and feeder.at_end()


def test_feeder_fails_what_is_missing_at_once_and_stops_at_a_row_that_names_no_video(tmp_path):
    """A video that ``fail_at_once`` recorded joins no wave (the next one is taken in its place); a manifest row that
    names no video ends the inputs there, kept for the runner to say: nothing after it is handed out."""
    for name in ("a.mp4", "b.mp4", "after.mp4"):
        (tmp_path / name).write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"{tmp_path / n}\n" for n in ("a.mp4", "gone1.mp4", "gone2.mp4", "b.mp4"))
                        + '"",x\n' + f"{tmp_path / 'after.mp4'}\n")
    failed: list[str] = []

    def fail_at_once(ref: VideoRef) -> bool:
        if "gone" in ref.uri:
            failed.append(ref.uri)
            return True
        return False

    feeder = WaveFeeder(discover([str(manifest)]), IdSet(), fail_at_once=fail_at_once)
    assert [r.uri for r in feeder.next_wave(2)] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    assert failed == [str(tmp_path / "gone1.mp4"), str(tmp_path / "gone2.mp4")] and feeder.input_error is None
    assert feeder.next_wave(2) == [] and feeder.exhausted and feeder.discovered == 4
    assert re.search(r"m.csv line 6: .*empty", str(feeder.input_error)), feeder.input_error


class _Writer:
    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.failures: list = []

    def add_failure(self, f) -> None:  # noqa: ANN001
        self.failures.append(f)

    def maybe_flush(self) -> None:
        pass


def test_lost_videos_are_bisected_until_alone_then_recorded(tmp_path):
    runner = JobRunner(JobSpec(inputs=["x"], out=str(tmp_path), max_attempts=3), stream=open("/dev/null", "w"))
    refs = [VideoRef(f"/v{i}.mp4", f"v{i}") for i in range(8)]
    writer, retry = _Writer(), deque()
    runner._requeue(refs, refs[:5], writer, retry)  # a whole execution failed: 5 did not come back
    assert [len(g) for g in retry] == [3, 2]
    retry.clear()
    runner._requeue(refs, [refs[6]], writer, retry)  # one lost in a big group: alone next
    assert list(retry) == [[refs[6]]]
    retry.clear()
    for _ in range(2):  # alone, lost again: retried while under max_attempts
        runner._requeue([refs[6]], [refs[6]], writer, retry)
    assert writer.failures and writer.failures[0].error_kind == "worker_crashed"
    assert writer.failures[0].attempts == 3 and len(retry) == 1


def test_cluster_plan_fits_every_actor_on_one_node():
    plan = plan_for_cluster([(1.0, 0.0)] * 3)
    for sp in (plan.decode, plan.image, plan.audio, plan.head):
        assert sp.resources.num_cpus <= 1.0
    total = plan.decode.resources.num_cpus * plan.decode.pool_size
    assert total == pytest.approx(1.5)
    mixed = plan_for_cluster([(4.0, 0.0), (1.0, 0.0)])
    assert all(sp.resources.num_cpus <= 1.0 for sp in (mixed.decode, mixed.image))
    assert plan_for_cluster([(2.0, 0.0), (0.0, 0.0)]) == plan_for_cluster([(2.0, 0.0)])  # a CPU-less head


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16])
def test_cpu_plan_gives_the_decoders_every_core_and_the_models_their_share(cpus):
    plan = plan_for(float(cpus), 0.0)
    # decoding is the critical path: the decoders' frame threads add up to the cores ...
    assert plan.decode.threads * plan.decode.pool_size == cpus - cpus % plan.decode.pool_size
    # ... while Ray's accounting gives them half, and torch never gets more threads than cores held
    assert plan.decode.resources.num_cpus * plan.decode.pool_size == pytest.approx(cpus / 2)
    assert plan.models is not None and plan.models.threads <= max(1, round(plan.models.resources.num_cpus))
    gpu = plan_for(float(cpus), 1.0)
    assert gpu.decode.threads == 1  # on a GPU node every core already has its own decoder
    # a wave of many videos: one decoder per core, one thread each, still half the cores in Ray's accounting
    many = plan_for(float(cpus), 0.0, videos=4 * cpus)
    assert (many.decode.pool_size, many.decode.threads) == (cpus, 1)
    assert many.decode.resources.num_cpus * many.decode.pool_size == pytest.approx(cpus / 2)
    assert many.models == plan.models
    assert plan_for(float(cpus), 0.0, videos=4 * cpus - 1) == plan  # fewer: frame threads, as without a count
    assert plan_for(float(cpus), 1.0, videos=1000) == gpu


def test_cluster_plan_counts_the_waves_videos_per_node():
    gib = float(1 << 30)
    two = plan_for_cluster([(2.0, 0.0, 8 * gib)] * 2, videos=16)  # 8 per 2-core node: one thread per decoder
    assert (two.decode.pool_size, two.decode.threads) == (4, 1)
    assert plan_for_cluster([(2.0, 0.0, 8 * gib)] * 2, videos=15).decode.threads == 2
    # a node short of memory for a decoder per core keeps frame threads
    assert plan_for_cluster([(2.0, 0.0, 1.5 * gib)], videos=100) == plan_for_cluster([(2.0, 0.0)])
    # mixed nodes keep frame threads: one small decoder per core on every node could leave no node room
    # for a model worker cut to the smallest node (Ray Data spreads actors over the nodes)
    mixed = [(2.0, 0.0, 8 * gib), (3.0, 0.0, 8 * gib)]
    assert plan_for_cluster(mixed, videos=1000) == plan_for_cluster(mixed)


def test_submit_builds_the_run_command_with_absolute_paths(tmp_path, monkeypatch):
    from jobs.cli import build_parser

    monkeypatch.chdir(tmp_path)
    options, run_argv = split_args(["videos/", "s3://b/more/", "--out", "res", "--address", "http://h:8265",
                                    "--segment-seconds", "2", "--wait"])
    assert (options.address, options.wait) == ("http://h:8265", True)
    entry = entrypoint(run_argv, lambda a: build_parser().parse_args(["run", *a]), "vidpipe")
    assert entry == f"vidpipe run {tmp_path}/videos s3://b/more/ --out {tmp_path}/res --segment-seconds 2"
    with pytest.raises(ConfigError, match="submit --address"):
        entrypoint(["v.mp4", "--out", "o", "--address", "auto"], lambda a: build_parser().parse_args(["run", *a]),
                   "vidpipe")


def test_s3_manifest_entries_resolve_within_the_bucket():
    base = _Base("s3://bkt/lists/m.txt")
    assert base.resolve("../videos/a.mp4") == "s3://bkt/videos/a.mp4"
    assert base.resolve("sub/b.mp4") == "s3://bkt/lists/sub/b.mp4"
    assert base.resolve("s3://other/c.mp4") == "s3://other/c.mp4"


def test_s3_errors_are_transient_unless_access_is_denied():
    assert _s3_error("s3://b/k", "open", OSError("AWS Error NETWORK_CONNECTION: reset")).error_kind == "read_error"
    assert _s3_error("s3://b/k", "open", OSError("AWS Error ACCESS_DENIED: no")).error_kind == "unreadable"


def test_progress_line_without_a_known_total():
    class C:
        videos_done, videos_failed, video_seconds_done, pending_videos = 3, 1, 12.0, 2

    assert "4/? videos" in Progress(None, open("/dev/null", "w")).line(C())
    resumed = Progress(30, open("/dev/null", "w"))
    resumed.skipped = 26  # finished by an earlier run: counted as done, said apart
    assert resumed.line(C()).startswith("[vidpipe] 30/30 videos (3 ok, 1 failed, 2 partly done, 26 finished earlier)")


def test_a_log_does_not_show_the_last_counts_twice():
    """To a log or pipe, the last periodic line and the closing line often said the same counts."""
    import io
    from types import SimpleNamespace

    log = io.StringIO()
    progress = Progress(2, log)
    counts = SimpleNamespace(videos_done=0, videos_failed=2, video_seconds_done=0.0, pending_videos=0)
    progress.update(counts)
    progress.finish(counts)
    assert len(log.getvalue().splitlines()) == 1
    progress.finish(SimpleNamespace(videos_done=1, videos_failed=1, video_seconds_done=3.0, pending_videos=0))
    assert [line.split(" | ")[0] for line in log.getvalue().splitlines()] == [
        "[vidpipe] 2/2 videos (0 ok, 2 failed, 0 partly done)", "[vidpipe] 2/2 videos (1 ok, 1 failed, 0 partly done)"]


def _stage(**kw) -> DecodeStage:  # noqa: ANN003
    return DecodeStage(SamplingSpec(image_size=32), ChunkingSpec(core_segments=16, context_segments=2), **kw)


def test_decode_watchdog_kills_a_hanging_decoder_in_time(tmp_path, shared_media):
    import shutil

    clip = tmp_path / "hangme.mp4"
    clip.write_bytes(b"x")
    good = shutil.copy(shared_media / "bikes_noaudio.mp4", tmp_path / "good.mp4")
    stage = _stage(video_timeout_s=0.5, faults="hang=hangme.mp4")
    stage.setup()
    assert stage._child is not None
    stuck = stage._child._proc
    t0 = time.monotonic()
    rows = list(stage.decode_video(str(clip), "vid"))
    assert time.monotonic() - t0 < 10
    assert [r["error_kind"] for r in rows] == ["timeout"]
    assert json.loads(rows[0]["info_json"]) == {"attempts": 1}
    assert stuck is not None and stuck.poll() == -signal.SIGKILL  # the stuck process is gone, not left spinning
    stage.video_timeout_s = 60.0  # a fresh decoder's start and a whole clip within 0.5 s: not on a busy machine
    after = list(stage.decode_video(str(good), "good"))  # a fresh decoder takes the next video
    assert after and not any(r["error_kind"] for r in after) and after[-1]["is_last"]
    stage.close()


@pytest.mark.parametrize("fault", ["crash", "segfault"])
def test_a_video_that_kills_its_decoder_fails_alone(tmp_path, shared_media, fault):
    import shutil

    bad = shutil.copy(shared_media / "bikes_noaudio.mp4", tmp_path / "bad.mp4")
    good = shutil.copy(shared_media / "bikes_noaudio.mp4", tmp_path / "good.mp4")
    stage = _stage(video_timeout_s=60, crash_attempts=2, faults=f"{fault}=bad.mp4")
    before = list(stage.decode_video(str(good), "g1"))
    failed = list(stage.decode_video(str(bad), "b"))
    assert [r["error_kind"] for r in failed] == ["worker_crashed"]
    signal_name = "SIGKILL" if fault == "crash" else "SIGSEGV"
    assert f"killed by signal {signal_name}" in failed[0]["error_message"]
    assert json.loads(failed[0]["info_json"]) == {"attempts": 2}
    after = list(stage.decode_video(str(good), "g2"))  # this worker goes on with a new decoder process
    assert [r["frames"].tobytes() for r in after] == [r["frames"].tobytes() for r in before]
    stage.close()


def test_decode_retries_transient_read_errors(tmp_path, shared_media):
    import shutil

    once = shutil.copy(shared_media / "bikes_noaudio.mp4", tmp_path / "flaky_once.mp4")
    always = shutil.copy(shared_media / "bikes_noaudio.mp4", tmp_path / "flaky.mp4")
    stage = _stage(video_timeout_s=60, faults="ioerror_once=flaky_once.mp4;ioerror=flaky.mp4")
    ok = list(stage.decode_video(str(once), "a"))
    assert ok and not any(r["error_kind"] for r in ok) and ok[-1]["is_last"]
    failed = list(stage.decode_video(str(always), "b"))
    assert [r["error_kind"] for r in failed] == ["read_error"]
    assert json.loads(failed[0]["info_json"]) == {"attempts": 3}


def test_bad_fault_spec_is_refused():
    with pytest.raises(ValueError, match="kind=glob"):
        _stage(faults="explode=*")


def test_a_stuck_decoder_exits_when_its_worker_is_killed(tmp_path):
    import os
    import subprocess
    import sys

    clip = tmp_path / "hangme.mp4"
    clip.write_bytes(b"x")
    worker = subprocess.Popen([sys.executable, "-c", f"""
import sys
from tests.jobs.test_archive_units import _stage
stage = _stage(faults="hang=hangme.mp4")
stage.setup()
print(stage._child._proc.pid, flush=True)
list(stage.decode_video({str(clip)!r}, "v"))  # hangs: no time limit
"""], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    child = int(worker.stdout.readline())
    time.sleep(0.5)
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}"), "the orphaned decoder process is still running"


@pytest.mark.parametrize("flags, message", [
    ({"segment_seconds": float("inf")}, "--segment-seconds must be a number of seconds >= 0.1 and at most 600, got inf"),
    # 1e6 asked numpy for 60 GiB in bench (a helper)
    ({"segment_seconds": 1e6}, "--segment-seconds must be a number of seconds >= 0.1 and at most 600, got 1000000.0"),
    ({"segment_seconds": 1e-6}, "--segment-seconds must be a number of seconds >= 0.1"),
    ({"segment_seconds": float("nan")}, "--segment-seconds"),
    ({"chunk_seconds": float("inf")}, "--chunk-seconds must be a number of seconds > 0, got inf"),
    ({"chunk_seconds": 0.0}, "--chunk-seconds"),
    # past ~24.8 days the decoder's wait overflowed: every video failed as internal_error (found by a helper)
    ({"video_timeout_s": float("inf")}, "--video-timeout must be a number of seconds > 0 and at most 1,000,000 "
                                        "(11.6 days"),
    ({"video_timeout_s": 1e10}, "--video-timeout must be a number of seconds > 0 and at most 1,000,000"),
    ({"video_timeout_s": 0.0}, "--video-timeout must be a number of seconds > 0"),
])
def test_job_flags_out_of_range_are_usage_errors(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobSpec(inputs=["x.mp4"], out="o", **flags)


def test_short_segments_do_not_make_chunks_unbounded():
    from jobs.models import untrained_bundle
    from workers.build import MAX_CHUNK_FRAMES, chunking_for

    default = chunking_for(untrained_bundle(SamplingSpec()), 60.0)
    assert default.core_segments == 48  # whole head windows of 16
    short = chunking_for(untrained_bundle(SamplingSpec(segment_seconds=0.1, frames_per_segment=4)), 60.0)
    assert short.core_segments * 4 <= MAX_CHUNK_FRAMES and short.core_segments % 16 == 0


def test_an_out_that_cannot_be_a_directory_is_a_usage_error(tmp_path, shared_media, capsys):
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    afile = tmp_path / "afile"
    afile.write_text("x")
    clip = str(shared_media / "bbb_5s_51.mp4")
    for out, why in ((afile, "it is a file, not a directory"), (afile / "sub", "Not a directory")):
        assert main(["run", clip, "--out", str(out), "--allow-untrained"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"cannot use --out {out}: " in err and why in err and "Traceback" not in err
    assert afile.read_text() == "x"


def test_an_out_whose_path_is_not_utf8_is_a_usage_error_of_every_command(tmp_path, shared_media, capsys):
    """pyarrow takes UTF-8 paths only: 'query', 'status' and 'repair' on such an OUT ended in a traceback
    (UnicodeEncodeError, exit 1), and 'run' said to pass a directory that can be created, having made it."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    old = tmp_path / os.fsdecode(b"old\xffout")
    try:
        (old / "_job").mkdir(parents=True)  # what an OUT copied under such a name looks like to a reader
    except OSError as exc:  # a filesystem that takes UTF-8 names only (APFS, ZFS with utf8only)
        pytest.skip(f"this filesystem refuses a name that is not UTF-8: {exc}")
    new = tmp_path / os.fsdecode(b"new\xfeout")
    clip = str(shared_media / "bbb_5s_51.mp4")
    for args, named in ((["run", clip, "--out", str(new), "--allow-untrained"], f"{tmp_path}/new\\xfeout"),
                        (["query", str(old), "SELECT 1"], f"{tmp_path}/old\\xffout"),
                        (["status", str(old)], f"{tmp_path}/old\\xffout"),
                        (["repair", str(old)], f"{tmp_path}/old\\xffout")):
        assert main(args) == EXIT_USAGE, args
        err = capsys.readouterr().err
        assert f"{named}: this path is not valid UTF-8" in err and "rename the folder" in err, err
        assert "Traceback" not in err and not any("\udc80" <= c <= "\udcff" for c in err), err  # no surrogate
    assert not new.exists()
    # an empty path is the current folder to pathlib: query read it, status said " is not a vidpipe output"
    for args in (["query", "", "SELECT 1"], ["repair", ""]):
        assert main(args) == EXIT_USAGE
        assert "an empty path names no directory; pass the --out directory of a 'vidpipe run'" in \
            capsys.readouterr().err


def test_an_out_inside_another_outs_tables_or_job_is_a_usage_error(tmp_path, shared_media, capsys):
    """A run there wrote data files the other OUT could not account for: that OUT then refused run and repair."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    outer = tmp_path / "outer"
    (outer / "_job").mkdir(parents=True)
    (outer / "segments").mkdir()
    clip = str(shared_media / "bbb_5s_51.mp4")
    for inner, folder in ((outer / "segments" / "nested", "segments"), (outer / "_job" / "a" / "b", "_job")):
        assert main(["run", clip, "--out", str(inner), "--allow-untrained"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"cannot use --out {inner}: it lies in {outer}/{folder}, a folder of the vidpipe output {outer}," in err
        assert not inner.exists()
    assert sorted(p.name for p in outer.iterdir()) == ["_job", "segments"]


@contextlib.contextmanager
def _unwritable(folder: Path):  # noqa: ANN202
    """``folder`` made unwritable: root writes through permissions, not through an immutable folder."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root here cannot make a folder immutable (chattr +i)")
    try:
        yield
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_out_that_cannot_be_written_is_a_usage_error_before_any_work(tmp_path, shared_media, capsys):
    """It was an internal error (exit 1, a raw errno) that said the committed videos were kept and to rerun; where
    only a table's folder refused, after the work.  'repair --dry-run' writes nothing: it still reads such an OUT."""
    from jobs.cli import main
    from jobs.spec import EXIT_OK, EXIT_USAGE

    clip = str(shared_media / "bbb_5s_51.mp4")
    fresh = tmp_path / "fresh"  # an empty folder given to a first run
    fresh.mkdir()
    earlier = tmp_path / "earlier"  # an earlier run's OUT
    (earlier / "_job").mkdir(parents=True)
    (earlier / "_job" / "lock").touch()
    (earlier / "segments").mkdir()
    for out, unwritable, named in ((fresh, fresh, fresh / "_job"), (earlier, earlier / "_job", earlier / "_job"),
                                   (earlier, earlier / "segments", earlier / "segments")):
        with _unwritable(unwritable):
            assert main(["run", clip, "--out", str(out), "--allow-untrained"]) == EXIT_USAGE
            err = capsys.readouterr().err
            assert f"cannot write to {named} (" in err and "make it writable for this user" in err, err
            assert "rerun" not in err and "Traceback" not in err, err
            if out == earlier:
                assert main(["repair", str(out)]) == EXIT_USAGE
                assert f"cannot write to {named} (" in capsys.readouterr().err
                assert main(["repair", str(out), "--dry-run"]) == EXIT_OK
                assert "nothing to drop" in capsys.readouterr().out
    assert list(fresh.iterdir()) == []
    assert sorted(p.name for p in (earlier / "_job").iterdir()) == ["lock"] and not any((earlier / "segments").iterdir())


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "is the job server's, for 'vidpipe submit'"),
    ("ray://head:10001", "Ray Client (ray://) is not supported"),
    ("bogus::", "is not HOST:PORT"),
])
def test_addresses_ray_cannot_join_are_usage_errors(address, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobSpec(inputs=["x.mp4"], out="o", address=address)


def test_an_unreachable_cluster_fails_in_seconds_naming_the_address():
    from jobs.runner import _check_reachable
    from tests.jobs.clusters import closed_port

    with closed_port() as port:  # a port nobody listens on
        with pytest.raises(ConfigError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
            _check_reachable(f"127.0.0.1:{port}")


def test_an_address_that_answers_as_a_web_server_is_named_as_not_a_gcs():
    """The job server's port given to run (127.0.0.1:8265, the address users meet first): ray.init retried "Failed
    to connect to GCS" until it was killed (a helper)."""
    import http.server
    import threading

    from jobs.runner import _check_reachable

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConfigError, match=re.escape(f"{address} answers as a web server, not as a Ray cluster's "
                                                        "GCS: that is the dashboard and job server's port")):
            _check_reachable(address)
    finally:
        server.shutdown()
        server.server_close()


def test_run_with_an_unreachable_address_makes_no_output(tmp_path, capsys):
    """Before: the error came after OUT and its _job/ were made (a new, empty output left behind)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE
    from tests.jobs.clusters import closed_port

    with closed_port() as port:  # a port nobody listens on
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"")
        out = tmp_path / "new_out"
        assert main(["run", str(clip), "--out", str(out), "--allow-untrained", "--address", f"127.0.0.1:{port}"]) == \
            EXIT_USAGE
        assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
        assert not out.exists()


def test_submit_and_status_given_a_gcs_address_say_it_takes_the_job_servers_url(tmp_path, capsys):
    """'vidpipe submit --address 127.0.0.1:6379' (run's kind of address) waited 40 s for a GCS, then a traceback
    (RpcError, exit 1)."""
    from jobs.cli import EXIT_USAGE, main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert main(["submit", str(clip), "--out", str(tmp_path / "o"), "--allow-untrained",
                 "--address", "127.0.0.1:6379"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--address 127.0.0.1:6379: the job server is given by its URL, http://HEAD:8265" in err
    assert "submitting to" not in err  # it said it was submitting, then that it could not
    assert main(["status", "--job", "j1", "--address", "10.0.0.5:6379"]) == EXIT_USAGE
    assert "--address 10.0.0.5:6379: the job server is given by its URL" in capsys.readouterr().err
    # and without --job, --address was ignored without a word
    assert main(["status", str(tmp_path), "--address", "http://127.0.0.1:8265"]) == EXIT_USAGE
    assert "--address is for --job ID" in capsys.readouterr().err
    # run's flags out of range went to the job server, to fail as the job on the cluster (found by a helper)
    assert main(["submit", str(clip), "--out", str(tmp_path / "o"), "--allow-untrained", "--segment-seconds", "0",
                 "--address", "http://127.0.0.1:8265"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "vidpipe submit: error: --segment-seconds must be a number of seconds >= 0.1 and at most 600, got 0.0" in err, err
    assert "submitting to" not in err


def test_job_server_errors_say_what_to_do():
    from jobs.submit import job_info

    class Server:  # what Ray's JobSubmissionClient raises: an unknown id, then a server gone away
        def __init__(self, error: Exception) -> None:
            self.error = error

        def get_job_info(self, job_id: str) -> None:
            raise self.error

    url = "http://127.0.0.1:8265"
    with pytest.raises(ConfigError, match="has no job 'nosuchjob'"):
        job_info(Server(RuntimeError("Request failed with status code 404: Job nosuchjob does not exist.")), url,
                 "nosuchjob")
    with pytest.raises(ConfigError, match="lost contact with the job server .* vidpipe status --job j1"):
        job_info(Server(ConnectionError("Connection refused")), url, "j1")


@pytest.mark.parametrize(("status", "message"), [
    (401, "wants an authentication token: set RAY_AUTH_MODE=token here"),
    (403, "refused this machine's authentication token: put the cluster's token in RAY_AUTH_TOKEN")])
def test_a_job_server_that_wants_a_token_is_a_usage_error_saying_so(status, message):
    """A cluster started by 'ray start' (Ray 2.60) asks for its token; without it, or with another, the
    Jobs client raised a traceback.  A real HTTP server on loopback answers as Ray's dashboard does."""
    import http.server
    import threading

    from jobs.submit import _client

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"Unauthorized: Missing authentication token")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match=f"job server at {url} {message}"):
            _client(url)
    finally:
        server.shutdown()
        server.server_close()


def test_a_finished_ray_jobs_exit_status_is_the_commands():
    from jobs.submit import job_exit_code

    failed = "Job entrypoint command failed with exit code {}, last available logs (truncated to 20,000 chars):"
    assert job_exit_code("SUCCEEDED", "") == 0
    assert [job_exit_code("FAILED", failed.format(n)) for n in (3, 2, 1)] == [3, 2, 1]
    assert job_exit_code("STOPPED", "Job was intentionally stopped.") == 130  # ray job stop: interrupted
    assert job_exit_code("FAILED", "the driver's node died") == 1


def test_an_unreachable_ray_address_in_the_environment_is_named_as_such(tmp_path, capsys, monkeypatch):
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE
    from tests.jobs.clusters import closed_port

    with closed_port() as port:  # a port nobody listens on
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"")
        out = tmp_path / "o"
        assert main(["run", str(clip), "--out", str(out), "--allow-untrained"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"cannot reach a Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS)" in err and "unset RAY_ADDRESS" in err, err
        assert not out.exists()


# 'vidpipe run' in this checkout where Ray's search for clusters by their processes finds none: other test
# sessions' (pytest's workers') clusters run on this machine, and '--address auto' falls back to joining any
_NO_OTHER_CLUSTER = """
import sys
import ray._private.services as services
from jobs import cli

assert hasattr(services, "_find_address_from_flag"), "Ray no longer finds clusters there: update this test"
services._find_address_from_flag = lambda flag: set()  # the scan of this machine's processes for raylets
sys.argv = ["vidpipe", *sys.argv[1:]]
cli.entry()
"""


def test_run_with_address_auto_and_no_cluster_says_so_and_makes_no_output(tmp_path):
    """It said to set up authentication tokens (no cluster was running at all), after making OUT with the
    settings of this run recorded (a later run with another model was then refused)."""
    from tests.jobs.conftest import run_script

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    out = tmp_path / "o"
    (tmp_path / "ray").mkdir()  # Ray's temporary folder, where 'auto' looks first: no cluster there
    r = run_script(_NO_OTHER_CLUSTER, ["run", str(clip), "--out", str(out), "--allow-untrained", "--address", "auto"],
                   timeout=120, env_extra={"RAY_TMPDIR": str(tmp_path / "ray")})
    assert r.returncode == 2 and "--address auto: could not join a Ray cluster running on this machine" in r.stderr, r.stderr
    assert not out.exists()


def test_only_a_bad_manifest_row_found_by_counting_stops_a_run(tmp_path):
    """Counting the inputs is for the progress display: a read that fails there (a manifest moved away,
    S3 unreachable for a moment) must not end a job of hours; a row that names no video does."""
    import threading

    from jobs.idset import IdSet
    from jobs.progress import RunStatus
    from jobs.runner import JobRunner

    def counted(manifest_text: str | None) -> JobRunner:
        manifest = tmp_path / "m.csv"
        if manifest_text is None:
            manifest.unlink(missing_ok=True)
        else:
            manifest.write_text(manifest_text)
        runner = JobRunner(JobSpec(inputs=[str(manifest)], out=str(tmp_path / "o"), progress=False))
        runner._count_inputs(RunStatus(run_id="r"), IdSet())
        for t in threading.enumerate():
            if t.name == "vidpipe-count-inputs":
                t.join(30)
        return runner

    assert counted(None)._input_error is None  # gone since the run started
    runner = counted("note,uri\nx,a.mp4\nlonely\n")
    assert runner._input_error is not None and "line 3: missing the 'uri' column" in str(runner._input_error)
