"""MPEG-TS / MPEG-PS files joined with ``cat``: each part starts its clock again, and the parts must follow one
another as in one continuous file (as ``ffmpeg -f concat`` would join them), with their own audio."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.frame_skip as frame_skip
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


@pytest.mark.parametrize("segment_s,k", [(1.0, 2), (4.0, 3)])  # 4 s: 100 frames a segment, past the tail's bound
def test_frames_past_the_headers_end_are_skipped_and_converted_as_before_it(tmp_path, monkeypatch, segment_s, k):
    """Past the end the header announces (an earlier part longer than the last), every frame was decoded and
    converted to the end of the file: the film cut in two decoded 2.4 times slower than whole. Later frames now
    prove which segments are not the last, and the open segment's frames wait unconverted; the output is that
    of the continuous file, short last segment included."""
    import pipeline.decode as decode_mod

    # FFmpeg takes the end from the file's last 250 kB: the short part (lossless) is larger than that
    long = _part(tmp_path / "long.ts", 440.0, duration_s=30.0)
    short = _part(tmp_path / "short.ts", 880.0, duration_s=4.32, size=(320, 240),
                  video_options={**GOP, "qp": "0"})
    joined = tmp_path / "joined.ts"
    joined.write_bytes(long.read_bytes() + short.read_bytes())
    with av.open(str(joined)) as c:
        assert c.duration / 1e6 < 6  # the header's end: the short part's
    whole = _continuous([long, short], tmp_path / "whole.ts", 30.0)
    converters: list[decode_mod._Converter] = []

    class Counting(decode_mod._Converter):
        def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **kw)
            converters.append(self)

    monkeypatch.setattr(decode_mod, "_Converter", Counting)
    if segment_s > 1.0:  # 12 frames of 320x240: the open segment's frames are converted as they come past that
        monkeypatch.setattr(decode_mod, "_LAZY_TAIL_BYTES", 12 * 320 * 240 * 3 // 2)
    sampling = SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=64)
    frames, pts, audio, info = _core_arrays(joined, sampling, skip=True)
    w_frames, w_pts, w_audio, w_info = _core_arrays(whole, sampling, skip=True)
    assert info.duration_s == pytest.approx(34.32) and info.n_segments == math.ceil(34.32 / segment_s)  # short last
    np.testing.assert_array_equal(frames, w_frames)
    np.testing.assert_array_equal(pts, w_pts)
    assert w_info.duration_s == info.duration_s
    # skipping goes on past the header's end (it stops for good at the join), as in the continuous file
    assert info.n_frames_skipped > 0.8 * w_info.n_frames_skipped - 4.32 * 25
    if segment_s == 1.0:
        assert [round(_peak_hz(a, sampling.audio_rate_hz) / 10) * 10 for a in audio[[0, 29, 31, 34]]] == \
            [440] * 2 + [880] * 2
        # the 70 sampled, every frame from the tail's start (0.3 s) to where the header's end is found wrong
        # (6.3 s), and the open segments' candidates; before, every frame from 0.3 s to the end
        assert converters[0].n_converted <= 70 + 6 * 25 + 2 * 25
    assert _assert_same(joined, sampling) == info.n_frames_skipped


def _pes_times_moved(src: Path, dest: Path, stream_id: int, moves: dict[int, float]) -> Path:
    """Copy an MPEG-TS file with the PTS (and DTS) of some PES packets of one stream (0xE0 video, 0xC0 audio)
    moved by seconds, byte for byte otherwise: timestamps damaged in transmission."""
    data = bytearray(src.read_bytes())

    def read(o: int) -> int:
        return (((data[o] >> 1) & 7) << 30) | (data[o + 1] << 22) | ((data[o + 2] >> 1) << 15) | (data[o + 3] << 7) \
            | (data[o + 4] >> 1)

    def write(o: int, v: int) -> None:
        v %= 1 << 33
        data[o] = (data[o] & 0xF0) | (((v >> 30) & 7) << 1) | 1
        data[o + 1], data[o + 2] = (v >> 22) & 0xFF, (((v >> 15) & 0x7F) << 1) | 1
        data[o + 3], data[o + 4] = (v >> 7) & 0xFF, ((v & 0x7F) << 1) | 1

    n = 0
    for p in range(0, len(data) - 187, 188):
        if not data[p + 1] & 0x40:  # no PES starts in this TS packet
            continue
        control, o = (data[p + 3] >> 4) & 3, p + 4
        if control & 2:
            o += 1 + data[o]
        if not control & 1 or data[o:o + 3] != b"\0\0\1" or data[o + 3] != stream_id:
            continue
        if n in moves:
            ticks = round(moves[n] * 90_000)
            write(o + 9, read(o + 9) + ticks)
            if data[o + 7] >> 6 == 3:  # a DTS too
                write(o + 14, read(o + 14) + ticks)
        n += 1
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("moves", [{100: -3.0}, {100: 3.0}, {100: 3.0, 101: 3.0}, {100: 30.0}],
                         ids=["one-back", "one-ahead", "two-ahead", "one-far-ahead"])
def test_damaged_video_times_start_no_part(tmp_path, caplog, moves):
    """One or two frames whose times are damaged (the next frames come back to the clock) must not start a part:
    that shifted the rest of the video seconds away from its audio (a reviewer: 8 s became 11 s)."""
    clean = _part(tmp_path / "clean.ts", 440.0, duration_s=8.0, codec="mpeg2video")
    damaged = _pes_times_moved(clean, tmp_path / "damaged.ts", 0xE0, moves)
    with caplog.at_level(logging.INFO, logger="pipeline.decode"):
        _, pts, audio, info = _core_arrays(damaged, SAMPLING, skip=True)
    assert "parts joined" not in caplog.text
    _, c_pts, c_audio, c_info = _core_arrays(clean, SAMPLING, skip=True)
    assert info.duration_s == pytest.approx(c_info.duration_s) and info.n_segments == 8
    np.testing.assert_allclose(audio, c_audio, atol=1e-6)  # the audio keeps its place
    same = [s for s in range(8) if np.array_equal(pts[s], c_pts[s])]
    assert same[:4] == [0, 1, 2, 3] and same[-1] == 7, same  # the frames before the damage, and after the clock


def test_a_damaged_audio_time_moves_no_audio_of_a_part(tmp_path, caplog, monkeypatch):
    """An audio PES whose time is damaged (3 s back: before the stream's start, so FFmpeg reads it 26.5 h ahead)
    starts no part: the audio comes out as it did before parts were joined at all."""
    import tracemalloc

    import pipeline.decode as decode

    clean = _part(tmp_path / "clean.ts", 440.0, duration_s=8.0, codec="mpeg2video")
    damaged = _pes_times_moved(clean, tmp_path / "damaged.ts", 0xC0, {60: -3.0})
    tracemalloc.start()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.decode"):
            frames, pts, audio, _ = _core_arrays(damaged, SAMPLING, skip=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "parts joined" not in caplog.text
    assert peak < 300e6, peak  # the frame said to be 26.5 h ahead was laid there: 7.5 GB of buffers
    c_frames, c_pts, _, _ = _core_arrays(clean, SAMPLING, skip=True)
    np.testing.assert_array_equal(frames, c_frames)
    np.testing.assert_array_equal(pts, c_pts)
    monkeypatch.setattr(decode, "_DISCONT_FORMATS", frozenset())  # no joining at all, as before
    _, _, before, _ = _core_arrays(damaged, SAMPLING, skip=True)
    np.testing.assert_array_equal(audio, before)


def _onset_s(audio: np.ndarray, rate_hz: int, from_s: float) -> float:
    """The first time from ``from_s`` on where the (per-segment, 1-s) audio is loud."""
    flat = audio.reshape(-1)
    start = round(from_s * rate_hz)
    return (start + int(np.argmax(np.abs(flat[start:]) > 0.1))) / rate_hz


@pytest.mark.parametrize("restart_s", [0.0, -0.7, 20.0], ids=["same-clock", "overlapping-clock", "20-s-later"])
def test_each_part_keeps_its_own_sync(tmp_path, restart_s):
    """Part 2's sound starts 0.5 s into it; its clock starts where part 1's did, 0.7 s before part 1's end, or
    20 s after it.  Its sound must start 4.5 s into the joined video whatever its clock (a reviewer: 0.7 s early
    where its audio stepped back less than its video; 17 s of a frozen frame where it started 20 s later)."""
    first = _part(tmp_path / "a.ts", 440.0)
    second = _part(tmp_path / "b.ts", 880.0, audio_start_s=0.5)
    if restart_s:
        second = _pes_times_moved(second, tmp_path / "b2.ts", 0xE0, dict.fromkeys(range(1000), 4.0 + restart_s))
        second = _pes_times_moved(second, tmp_path / "b3.ts", 0xC0, dict.fromkeys(range(1000), 4.0 + restart_s))
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    frames, _, audio, info = _core_arrays(joined, SAMPLING, skip=True)
    assert info.duration_s == pytest.approx(8.0) and info.n_segments == 8
    assert [mf.read_stamp(frames[s, 0]) for s in range(8)] == [math.floor((s % 4 + 0.25) * 25 + 1e-6)
                                                               for s in range(8)]
    rate = SAMPLING.audio_rate_hz
    assert _onset_s(audio, rate, 4.0) == pytest.approx(4.5, abs=0.03)
    assert [round(_peak_hz(a, rate) / 10) * 10 for a in audio[5:]] == [880] * 3


def test_the_gate_stops_skipping_where_decode_times_start_again():
    """Where parts may be joined, a decode time going back (or 10 s ahead) turns skipping off for good."""
    units = {"I": bytes([0x65, 0x88]), "P": bytes([0x41, 0x9A])}

    def passed(frames: list[tuple[str, float]]) -> list[float]:
        gate = frame_skip.DisposableFrameGate(
            4, lambda p: p.pts / 1000, lambda lo, hi: any(lo <= n + 0.5 <= hi for n in range(100)), keep_from_s=50.0,
            decode_time_s=lambda p: p.dts / 1000)
        gate.started = True
        out = []
        for kind, t in frames + [("end", 0.0)]:
            packet = av.Packet(b"" if kind == "end" else len(units[kind]).to_bytes(4, "big") + units[kind])
            packet.pts = packet.dts = round(t * 1000)
            out += [p.pts / 1000 for p in gate.push(packet) if p.size]
        return out

    # IDR every 0.4 s, P every 0.1 s; targets at 0.5, 1.5, ...; then a second part from 0.0 again
    first = [("I" if n % 4 == 0 else "P", n / 10) for n in range(12)]
    second = [("I" if n % 4 == 0 else "P", n / 10) for n in range(8)]
    assert _gate_passes(first) == passed(first) == [0.4, 0.5, 0.8, 0.9, 1.0, 1.1]
    # the first part's GOP 0.0-0.3 (no target) and the tail of 0.4-0.7 are skipped; at the restart the GOP held
    # then (0.8-1.1) passes whole, and from there on everything: its times no longer say what is needed
    assert passed(first + second) == [0.4, 0.5, 0.8, 0.9, 1.0, 1.1] + [n / 10 for n in range(8)]
    later = [("I" if n % 4 == 0 else "P", 30 + n / 10) for n in range(8)]  # a part 29 s later
    assert passed(first + later) == [0.4, 0.5, 0.8, 0.9, 1.0, 1.1] + [30 + n / 10 for n in range(8)]


@pytest.mark.parametrize("suffix", [".mp4", ".ts"])
def test_b_frames_at_a_few_frames_a_second_still_skip(tmp_path, suffix):
    """B-frame reordering moves presentation times back by more than 0.5 s at 5 fps: a gate that watched them
    for a restart stopped skipping in every such file (a reviewer's 40-s clip: 0 skipped instead of 65)."""
    path = mf.make_video(tmp_path / f"low{suffix}", duration_s=40.0, fps=5, size=(96, 64), codec="libx264",
                         video_options={"x264-params": "keyint=20:min-keyint=20:scenecut=0:bframes=3"})
    assert _assert_same(path, SamplingSpec(segment_seconds=2.0, frames_per_segment=1)) > 30
