"""A decode worker's memory does not grow with the video's length (``jobs.decode_memory``)."""

from __future__ import annotations

import av
import pytest

from jobs.decode_memory import remux_long_video, run

pytestmark = pytest.mark.slow


def test_decoder_memory_is_flat_from_a_short_to_a_three_times_longer_video(tmp_path):
    # both past the first chunks (48 s each), where buffers reach their bounded size
    results = run([2.0, 6.0], cache=tmp_path, size=(96, 64), say=lambda s: None)
    short, long = results
    assert (short["failure"], long["failure"]) == (None, None)
    assert (short["segments"], long["segments"]) == (120, 360)
    # decoded frames are 224 px whatever the source: a chunk is ~14 MB; growth would show as tens of MB
    assert long["decoder_peak_rss_mb"] - short["decoder_peak_rss_mb"] < 10, results
    assert long["worker_peak_rss_mb"] - short["worker_peak_rss_mb"] < 5, results


def test_remuxed_long_video_repeats_the_source_without_reencoding(tmp_path, shared_media):
    source = shared_media / "bikes_noaudio.mp4"
    with av.open(str(source)) as c:
        length_s = float(c.duration) / av.time_base
        packets = sum(1 for p in c.demux(video=0) if p.pts is not None)
    out = remux_long_video(source, tmp_path / "long.mp4", minutes=2.5 * length_s / 60)
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        got = [p for p in c.demux(stream) if p.pts is not None]
        times = sorted(float(p.pts * p.time_base) for p in got)
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert abs(len(got) - 2.5 * packets) <= 2
    assert frames == len(got)
    assert times[-1] == pytest.approx(2.5 * length_s, abs=0.2)
    assert all(b > a for a, b in zip(times, times[1:], strict=False))  # no overlapping repeats
