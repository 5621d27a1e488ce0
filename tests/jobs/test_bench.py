"""`vidpipe bench` runs its three measurements on real files and reports consistent numbers (no timing asserts)."""

from __future__ import annotations

import json
import re

import pytest

from jobs.cli import main
from jobs.spec import EXIT_USAGE
from tests.conftest import SAMPLES
from tests.media_factory import make_corrupt

pytestmark = pytest.mark.slow


def test_bench_reports_consistent_figures_for_the_samples(ray_session, capsys):
    assert main(["bench", str(SAMPLES), "--json"]) == 0
    r = json.loads(capsys.readouterr().out, parse_constant=_not_json)  # strict JSON: no NaN or Infinity
    decode, pipeline, naive = r["decode_only"], r["pipeline"], r["naive"]
    assert r["files"] == 2 and r["model_id"] == "1434b10b7b367cd4"
    # figures are quoted with their date and machine: the report says them (a helper had to add them by hand)
    m = r["measured"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["date"]) and m["cpu"] and m["cpus"] == r["cpus"]
    assert m["versions"]["vidpipe"] == "0.1.0" and m["versions"]["torch"].startswith("2.11")
    # the same files, the same sampling: the same video-seconds and segments in every measurement
    assert pipeline["videos_failed"] == 0
    assert pipeline["segments"] == decode["segments"] == 16  # 6 for the 5.28 s clip, 10 for the 10 s one
    assert pipeline["video_s"] == pytest.approx(decode["video_s"], abs=0.05)
    assert naive["video_s"] == pytest.approx(decode["video_s"], abs=0.2)
    assert naive["segments"] <= decode["segments"]  # the naive loop keeps one frame per segment, no more
    for run in (decode, pipeline, naive):
        assert run["wall_s"] > 0 and run["video_s_per_s"] == pytest.approx(run["video_s"] / run["wall_s"])
    ratios = r["ratios"]
    assert ratios["pipeline_over_decode"] == pytest.approx(pipeline["video_s_per_s"] / decode["video_s_per_s"])
    assert ratios["pipeline_over_naive"] == pytest.approx(pipeline["video_s_per_s"] / naive["video_s_per_s"])
    assert ratios["orchestration_efficiency"] == pytest.approx(pipeline["video_s_per_s"] / r["ideal_video_s_per_s"])
    iso = r["isolated_s_per_segment"]
    assert set(iso) == set(pipeline["stages"]) == {"decode", "image_encoder", "audio_encoder", "head"}
    assert r["ideal_video_s_per_s"] == pytest.approx(
        (decode["video_s"] / decode["segments"]) / sum(iso.values()))
    for name, stage in pipeline["stages"].items():
        assert stage["workers"] >= 1 and stage["busy_s"] > 0, name
        assert 0 < stage["busy_fraction"] <= 1.0, name  # a worker cannot be busy longer than the run
        assert stage["peak_rss_mb"] > 20, name  # every stage reports its worker's memory
    assert 0.0 <= r["fp32_label_agreement"] <= 1.0 and r["agreement_segments"] > 0
    assert r["precision"] == "auto" and r["sample_precision"] in ("bf16", "fp32")
    assert pipeline["bf16_emulated_chunks"] == 0  # auto is bf16 only where it is native
    assert pipeline["ray_session_start_s"] >= 0  # reported apart from (b)'s clock


def test_bench_text_report_names_what_it_excludes(ray_session, capsys):
    assert main(["bench", str(SAMPLES / "bbb_5s_51.mp4"), "--skip-naive"]) == 0
    out = capsys.readouterr().out
    assert "(b) pipeline" in out and "(c) naive" not in out and "(b) over (c)" not in out
    assert out.startswith("vidpipe bench: 1 file, ")
    assert re.search(r"^measured \d{4}-\d\d-\d\dT[\d:]+Z on .+ \(vidpipe 0\.1\.0, torch 2\.11[^,]*, .*ray ", out,
                     re.MULTILINE), out
    # what "auto" meant for the sample segments, not only the flag (a helper could not tell)
    assert re.search(r"encoder precision auto \((bf16|fp32) on this machine's CPU\): labels agree with float32 on "
                     r"[\d.]+ % of \d+ sample segments of the first file", out), out
    assert "excludes starting Ray and Ray Data" in out and "orchestration efficiency" in out
    assert "nan" not in out.lower()
    ideal = next(row for row in out.splitlines() if row.strip().startswith("ideal from isolated stage costs"))
    video_s, wall_s, rate, segments = ideal.split()[-4:]
    assert video_s == wall_s == segments == "-" and float(rate) > 0  # a rate from costs: no run of its own


def test_bench_refuses_what_it_cannot_measure(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == EXIT_USAGE
    assert f"input folder {str(tmp_path)!r} holds no video files" in capsys.readouterr().err
    missing = tmp_path / "missing.mp4"
    assert main(["bench", str(missing)]) == EXIT_USAGE
    assert f"bench input {missing} does not exist; check the path" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["bench", str(tmp_path / "empty.txt")]) == EXIT_USAGE
    assert f"manifest {tmp_path / 'empty.txt'} lists no videos" in capsys.readouterr().err
    # flags the pipeline (b) refuses, refused before anything is measured: nan and inf were tracebacks, 0 and
    # --device cuda came after the decode pass, minutes in on a long input (a helper)
    clip = str(SAMPLES / "bbb_5s_51.mp4")
    for flags, said in ((["--chunk-seconds", "nan"], "--chunk-seconds must be a number of seconds > 0, got nan"),
                        (["--chunk-seconds", "inf"], "--chunk-seconds must be a number of seconds > 0, got inf"),
                        (["--chunk-seconds", "0"], "--chunk-seconds must be a number of seconds > 0, got 0.0"),
                        (["--allow-untrained", "--segment-seconds", "1e6"], "at most 600, got 1000000.0")):
        assert main(["bench", clip, *flags]) == EXIT_USAGE, flags
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", clip, "--device", "cuda"]) == EXIT_USAGE
        assert "--device cuda: this machine has no CUDA GPU" in capsys.readouterr().err


def test_the_naive_baseline_counts_from_the_first_frame(tmp_path):
    """An MPEG-TS whose clock starts at 10 s: the baseline kept a frame a segment for 10 s of nothing and counted 14
    video-s for 4, so pipeline / naive compared different work (a helper)."""
    from jobs.bench import naive_baseline
    from jobs.models import resolve_bundle
    from tests.media_factory import make_video

    late = make_video(tmp_path / "late.ts", frame_times_s=[10 + i / 25 for i in range(100)], size=(96, 96),
                      codec="libx264")
    measured = naive_baseline([str(late)], resolve_bundle(None, allow_untrained=True), cpus=1)
    assert measured["video_s"] == pytest.approx(4.0, abs=0.05) and measured["segments"] == 4


@pytest.mark.parametrize("damage", ["garbage", "bad_packets"])
def test_bench_refuses_an_undecodable_file_with_a_usage_error(tmp_path, capsys, damage):
    """Garbage fails the up-front check; bad packets past the first segment fail in the decode-only pool."""
    clip = SAMPLES / "bbb_5s_51.mp4"
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / clip.name).write_bytes(clip.read_bytes())
    bad = make_corrupt(folder / "bad.mp4", kind=damage, source=clip, bad_packets=range(60, 150))
    assert main(["bench", str(folder), "--skip-naive"]) == EXIT_USAGE
    err = capsys.readouterr().err
    kind = "invalid_data" if damage == "garbage" else "decode_error"
    assert f"bench input cannot be decoded: {bad} ({kind}: " in err
    assert "remove it from the bench inputs" in err and "Traceback" not in err


def _not_json(constant: str) -> None:
    raise AssertionError(f"bench --json wrote {constant}, which is not JSON")


def test_bench_stopped_by_sigterm_to_its_group_says_so_like_ctrl_c(tmp_path):
    """'timeout' and schedulers send SIGTERM to the process group: it reached bench's embedded Ray too, whose
    processes printed 39 lines of stack dumps ("*** SIGTERM received ...") and the bench ended with exit 134
    (Aborted) (a helper). Now bench runs supervised as run does: exit 130, "interrupted", nothing of Ray's."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from tests.jobs.conftest import VIDPIPE, vidpipe_env

    p = subprocess.Popen([str(VIDPIPE), "bench", str(SAMPLES / "bbb_5s_51.mp4"), "--skip-naive"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=vidpipe_env(),
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:  # until its pipeline (b) has Ray's raylet up
            if any("raylet" in " ".join(c.cmdline()) for c in psutil.Process(p.pid).children(recursive=True)):
                break
            time.sleep(0.5)
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(2)
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert err.rstrip().endswith("vidpipe: interrupted (stopped by SIGTERM)"), err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
