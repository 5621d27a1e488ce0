"""MPEG-TS / MPEG-PS files joined with ``cat``: each part starts its clock again, and the parts must follow one
another as in one continuous file (as ``ffmpeg -f concat`` would join them), with their own audio."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import av
import numpy as np
import pytest

import tests.media_factory as mf
from pipeline.media import SamplingSpec
from tests.pipeline.test_frame_skip import _assert_same, _core_arrays, _gate_passes

SAMPLING = SamplingSpec(segment_seconds=1.0, frames_per_segment=2)
GOP = {"x264-params": "keyint=25:min-keyint=25:scenecut=0"}  # B-frames (x264's default 3), an IDR a second


def _part(path: Path, tone_hz: float, duration_s: float = 4.0, **kw) -> Path:
    kw.setdefault("codec", "libx264")
    kw.setdefault("audio_codec", "aac")
    kw.setdefault("video_options", GOP if kw["codec"] == "libx264" else None)
    kw.setdefault("size", (160, 120))
    return mf.make_video(path, duration_s=duration_s, fps=25, audio="tone", tone_hz=tone_hz, **kw)


def _continuous(parts: list[Path], dest: Path, part_s: float) -> Path:
    """The parts' packets in one file on one clock (part n moved n * part_s later): what the join must equal."""
    with av.open(str(dest), "w", format="mpegts") as out:
        streams = None
        last_dts = [-1, -1]  # a part's audio outlasting its video overlaps the next part's: those packets go
        for n, part in enumerate(parts):
            with av.open(str(part)) as src:
                ins = [src.streams.video[0], src.streams.audio[0]]
                if streams is None:
                    streams = [out.add_stream_from_template(s) for s in ins]
                for p in src.demux(ins):
                    if not p.size:
                        continue
                    shift = round(n * part_s / p.time_base)
                    p.pts, p.dts = p.pts + shift, p.dts + shift
                    i = ins.index(p.stream)
                    if p.dts <= last_dts[i]:
                        continue
                    if n + 1 < len(parts) and i == 1 and (p.pts + p.duration) * p.time_base > (n + 1) * part_s + 1.5:
                        continue  # (MPEG-TS times start at 1.4 s)
                    last_dts[i] = p.dts
                    p.stream = streams[i]
                    out.mux(p)
    return dest


def _peak_hz(audio: np.ndarray, rate_hz: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(audio))) * rate_hz / len(audio))


def test_parts_joined_with_cat_follow_one_another_as_in_one_file(tmp_path, caplog):
    """Before: the second part's frames piled up at the first part's end, its audio overwrote the first
    part's, and two 4-s parts gave a 4-s video (4 segments) without a word."""
    parts = [_part(tmp_path / "a.ts", 440.0), _part(tmp_path / "b.ts", 880.0)]
    joined = tmp_path / "joined.ts"
    joined.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
    whole = _continuous(parts, tmp_path / "whole.ts", 4.0)
    with caplog.at_level(logging.INFO, logger="pipeline.decode"):
        frames, pts, audio, info = _core_arrays(joined, SAMPLING, skip=True)
    assert "its timestamps start again (parts joined end to end)" in caplog.text
    assert info.duration_s == pytest.approx(8.0) and info.n_segments == 8
    # each target shows the frame a continuous file shows: part 2's frames carry their own numbers again
    assert [mf.read_stamp(frames[s, k]) for s in range(8) for k in range(2)] == \
        [math.floor((t % 4.0) * 25 + 1e-6) for s in range(8) for t in (s + 0.25, s + 0.75)]
    w_frames, w_pts, w_audio, w_info = _core_arrays(whole, SAMPLING, skip=True)
    np.testing.assert_array_equal(frames, w_frames)
    np.testing.assert_allclose(pts, w_pts, rtol=0, atol=1e-9)
    assert w_info.duration_s == pytest.approx(info.duration_s)
    # each part's own audio, in its own segments
    rate = SAMPLING.audio_rate_hz
    assert [round(_peak_hz(a, rate) / 10) * 10 for a in audio] == [440] * 4 + [880] * 4
    # frame skipping stops at the join (the packets' times start again), and changes nothing
    _assert_same(joined, SAMPLING)


def test_mpeg_ps_parts_joined_with_cat_follow_one_another(tmp_path):
    """The same for MPEG program streams (.mpg, as DVD VOBs and capture cards write them)."""
    parts = [_part(tmp_path / f"{n}.mpg", hz, codec="mpeg2video", audio_codec="mp2", duration_s=3.0)
             for n, hz in enumerate((440.0, 880.0))]
    joined = tmp_path / "joined.mpg"
    joined.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
    frames, _, audio, info = _core_arrays(joined, SAMPLING, skip=True)
    assert info.duration_s == pytest.approx(6.0) and info.n_segments == 6
    assert [mf.read_stamp(frames[s, 0]) for s in range(6)] == [math.floor((s % 3 + 0.25) * 25 + 1e-6) for s in range(6)]
    assert [round(_peak_hz(a, SAMPLING.audio_rate_hz) / 10) * 10 for a in audio] == [440] * 3 + [880] * 3


def test_an_earlier_part_longer_than_the_last_is_no_damage(tmp_path):
    """FFmpeg's duration of an MPEG-TS is estimated from its last timestamps, the last part's where parts were
    joined: a first part longer than that + 60 s failed the video as damaged ('past the video's end the header
    announces'), frame after frame."""
    # FFmpeg takes the end from the file's last 250 kB: the short part is larger than that
    long = _part(tmp_path / "long.ts", 440.0, duration_s=66.0, codec="mpeg2video", size=(96, 64))
    short = _part(tmp_path / "short.ts", 880.0, duration_s=4.0, codec="mpeg2video", size=(640, 480))
    joined = tmp_path / "joined.ts"
    joined.write_bytes(long.read_bytes() + short.read_bytes())
    with av.open(str(joined)) as c:
        assert c.duration / 1e6 < 5  # the header's end: the short part's
    _, _, audio, info = _core_arrays(joined, SamplingSpec(segment_seconds=2.0, frames_per_segment=1), skip=True)
    # FFmpeg's MPEG-2 decoder drops the frame it holds back when the next part's sequence header comes
    assert 70.0 - 0.04 - 1e-9 <= info.duration_s <= 70.0 + 1e-9 and info.n_segments == 35
    assert round(_peak_hz(audio[0], 16000) / 10) * 10 == 440 and round(_peak_hz(audio[-1], 16000) / 10) * 10 == 880


def _retime(src: Path, dest: Path, stream: str, index: int, by_s: float) -> Path:
    """Copy ``src`` with the ``index``-th packet of its video or audio stream ``by_s`` later (a damaged time)."""
    with av.open(str(src)) as i, av.open(str(dest), "w", format="mpegts") as o:
        ins = [i.streams.video[0], i.streams.audio[0]]
        outs = [o.add_stream_from_template(s) for s in ins]
        target = ins[0] if stream == "video" else ins[1]
        n = 0
        for p in i.demux(ins):
            if not p.size:
                continue
            if p.stream is target:
                if n == index:
                    p.pts += round(by_s / p.time_base)
                n += 1
            p.stream = outs[ins.index(p.stream)]
            o.mux(p)
    return dest


@pytest.mark.parametrize("stream,by_s", [("video", 3.0), ("audio", 3.0)])
def test_one_damaged_time_is_no_join(tmp_path, caplog, stream, by_s):
    """A single frame whose time is damaged (the next one comes back) must not start a part: that would shift the
    rest of the video, or its audio, by the damage (seconds of lost sync)."""
    clean = _part(tmp_path / "clean.ts", 440.0, duration_s=8.0, codec="mpeg2video")
    damaged = _retime(clean, tmp_path / "damaged.ts", stream, 100 if stream == "video" else 150, by_s)
    with caplog.at_level(logging.INFO, logger="pipeline.decode"):
        frames, pts, audio, info = _core_arrays(damaged, SAMPLING, skip=True)
    assert "parts joined" not in caplog.text
    c_frames, c_pts, c_audio, c_info = _core_arrays(clean, SAMPLING, skip=True)
    assert info.n_segments == c_info.n_segments == 8
    if stream == "audio":  # the video is untouched; the audio, apart from the damaged frame's place, too
        np.testing.assert_array_equal(frames, c_frames)
        differs = [s for s in range(8) if not np.allclose(audio[s], c_audio[s], atol=1e-4)]
        assert len(differs) <= 2, differs
    else:  # frames up to the damaged one (at 4 s, said to be at 7 s) and from where the clock catches up again
        # are the clean file's; in between, the last frame before it stays on screen (as before)
        same = [s for s in range(8) if np.array_equal(pts[s], c_pts[s])]
        assert same == [0, 1, 2, 3, 7], same
        np.testing.assert_allclose(audio, c_audio, atol=1e-6)


def test_the_gate_stops_skipping_where_packet_times_go_back():
    # IDR every 0.4 s, P every 0.1 s; targets at 0.5, 1.5, ...; then a second part from 0.0 again
    first = [("I" if n % 4 == 0 else "P", n / 10) for n in range(12)]
    second = [("I" if n % 4 == 0 else "P", n / 10) for n in range(8)]
    # the first part's GOP 0.0-0.3 (no target) and the tail of 0.4-0.7 are skipped; at the jump back the GOP
    # held then (0.8-1.1) passes whole, and from there on everything: its times no longer say what is needed
    assert _gate_passes(first + second) == [0.4, 0.5, 0.8, 0.9, 1.0, 1.1] + [n / 10 for n in range(8)]
