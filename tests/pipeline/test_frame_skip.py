"""Skipping unsampled frames (disposable ones, and the tails of closed GOPs) must not change a single output value."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.frame_skip as frame_skip
import tests.media_factory as mf
from pipeline.decode import VideoDecoder
from pipeline.frame_skip import (
    DISPOSABLE,
    IDR,
    IDR_KEPT,
    OTHER,
    REFERENCE,
    h264_access_unit_kind,
    h264_nal_length_size,
)
from pipeline.media import ChunkingSpec, SamplingSpec


def _core_arrays(path: Path, sampling: SamplingSpec, skip: bool):
    frames, pts, audio, info = [], [], [], None
    dec = VideoDecoder(sampling, ChunkingSpec(core_segments=8, context_segments=2), skip_unsampled=skip)
    for chunk in dec.chunks(path):
        frames.append(chunk.frames[chunk.core_slice])
        pts.append(chunk.frame_pts_s[chunk.core_slice])
        audio.append(chunk.audio[chunk.core_slice])
        info = chunk.info or info
    return np.concatenate(frames), np.concatenate(pts), np.concatenate(audio), info


def _assert_same(path: Path, sampling: SamplingSpec) -> int:
    f0, p0, a0, i0 = _core_arrays(path, sampling, skip=False)
    f1, p1, a1, i1 = _core_arrays(path, sampling, skip=True)
    np.testing.assert_array_equal(f0, f1)
    np.testing.assert_array_equal(p0, p1)
    np.testing.assert_array_equal(a0, a1)
    assert i0.duration_s == i1.duration_s and i0.n_segments == i1.n_segments
    assert i1.n_frames_decoded + i1.n_frames_skipped == i0.n_frames_decoded
    return i1.n_frames_skipped


@pytest.mark.parametrize("k,segment_s", [(1, 1.0), (3, 1.0), (2, 0.4)])
def test_generated_h264_with_b_frames_is_identical(tmp_path, k, segment_s):
    path = mf.make_video(tmp_path / "b.mp4", duration_s=8.0, fps=25, size=(160, 120), audio="tone")
    skipped = _assert_same(path, SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=64))
    if k == 1:
        assert skipped > 0  # x264's non-reference B-frames between the sampled ones


def _kinds(path: Path) -> dict[str, int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        nls = h264_nal_length_size(bytes(s.codec_context.extradata) if s.codec_context.extradata else None)
        kinds = [h264_access_unit_kind(bytes(p), nls) for p in c.demux(s) if p.size]
    return {k: kinds.count(k) for k in (IDR, IDR_KEPT, REFERENCE, DISPOSABLE, OTHER)}


_GOPS = {
    "short_gop": {"x264-params": "keyint=12:min-keyint=12:scenecut=0"},  # 0.48 s: most GOPs hold no target
    "no_b_frames": {"x264-params": "keyint=20:min-keyint=20:scenecut=0:bframes=0"},
    "b_pyramid": {"x264-params": "keyint=50:min-keyint=50:scenecut=0:bframes=3:b-pyramid=normal"},
    "open_gop": {"x264-params": "keyint=25:min-keyint=25:scenecut=0:open-gop=1"},  # I-frames but one IDR
}


@pytest.mark.parametrize("gop", sorted(_GOPS))
@pytest.mark.parametrize("k,segment_s", [(1, 1.0), (3, 1.0), (2, 0.4), (1, 2.0)])
def test_gop_structures_are_identical(tmp_path, gop, k, segment_s):
    path = mf.make_video(tmp_path / f"{gop}.mp4", duration_s=24.0, fps=25, size=(160, 120), audio="tone",
                         video_options=_GOPS[gop])
    skipped = _assert_same(path, SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=64))
    kinds = _kinds(path)
    if gop == "short_gop" and k == 1:
        # whole GOPs and GOP tails go undecoded, reference frames included (the last 4-6 s are always
        # decoded whole: the short last segment is sampled from the true end)
        assert skipped > kinds[DISPOSABLE]


def test_annex_b_stream_with_repeated_headers_is_identical(tmp_path):
    # MPEG-TS carries SPS/PPS in-band with every IDR.  Repeated unchanged, they tell the decoder nothing
    # new, so a target-less GOP's IDR is skipped as in MP4 (where they live in the extradata).
    options = {"x264-params": "keyint=12:min-keyint=12:scenecut=0:repeat-headers=1"}
    ts = mf.make_video(tmp_path / "short.ts", codec="libx264", duration_s=24.0, fps=25, size=(160, 120),
                       audio="tone", audio_codec="aac", video_options=options)
    mp4 = mf.make_video(tmp_path / "short.mp4", duration_s=24.0, fps=25, size=(160, 120), audio="tone",
                        video_options={"x264-params": "keyint=12:min-keyint=12:scenecut=0"})
    assert _kinds(mp4)[IDR_KEPT] == 0
    sampling = SamplingSpec(segment_seconds=2.0, image_size=64)
    kinds = _kinds(ts)
    assert kinds[IDR_KEPT] == kinds[IDR] + kinds[IDR_KEPT] > 0  # every IDR carries its SPS/PPS
    skipped = _assert_same(ts, sampling)
    assert skipped == _assert_same(mp4, sampling) > kinds[DISPOSABLE]


def test_gops_too_long_to_hold_are_identical(tmp_path, monkeypatch):
    path = mf.make_video(tmp_path / "long_gop.mp4", duration_s=10.0, fps=25, size=(160, 120), audio=None,
                         video_options=_GOPS["b_pyramid"])
    monkeypatch.setattr(frame_skip, "MAX_GOP_PACKETS", 20)  # GOPs of 50 frames
    assert _assert_same(path, SamplingSpec(image_size=64)) > 0
    monkeypatch.setattr(frame_skip, "MAX_GOP_PACKETS", 300)
    monkeypatch.setattr(frame_skip, "MAX_GOP_BYTES", 10_000)  # or GOPs too large in bytes
    assert _assert_same(path, SamplingSpec(image_size=64)) > 0


def test_variable_frame_rate_is_identical(tmp_path):
    times = mf.vfr_frame_times(8.0)
    path = mf.make_video(tmp_path / "vfr.mp4", duration_s=8.0, size=(96, 96), frame_times_s=times, audio=None)
    _assert_same(path, SamplingSpec(image_size=48))


@pytest.mark.slow
def test_real_film_clip_is_identical_and_skips_many_frames(shared_media):
    skipped = _assert_same(shared_media / "bbb_clip_720p.mp4", SamplingSpec())
    assert skipped > 600  # of 1441 frames: 558 unsampled disposable B-frames, 78 more in the 5.3 s GOPs' tails


def _gate_passes(frames: list[tuple[str, float]], segment_s: float = 1.0, started: bool = True,
                 keep_from_s: float = 50.0, end_unknown: bool = False) -> list[float]:
    """Feed (kind, pts seconds) access units in decode order through the gate; the times it passes on."""
    units = {"I": bytes([0x65, 0x88]), "P": bytes([0x41, 0x9A]), "b": bytes([0x01, 0x9E])}

    def needed_between(lo: float, hi: float) -> bool:
        return any(lo <= (n + 0.5) * segment_s <= hi for n in range(100))

    gate = frame_skip.DisposableFrameGate(4, lambda p: p.pts / 1000, needed_between, keep_from_s=keep_from_s,
                                          segment_s=segment_s)
    gate.started = started
    gate.end_unknown = end_unknown
    passed = []
    for kind, t in frames + [("end", 0.0)]:
        packet = av.Packet(b"" if kind == "end" else len(units[kind]).to_bytes(4, "big") + units[kind])
        packet.pts = round(t * 1000)
        passed += [p.pts / 1000 for p in gate.push(packet) if p.size]
    return passed


def test_past_the_headers_end_gops_wait_for_a_frame_that_proves_their_segments_are_not_the_last():
    """Near the end (here: all of it) every frame was decoded, as the targets of a short last segment depend on
    the true end. Where frames ran on past the header's end, that was every frame to the end of the file."""
    frames = [("I" if n % 4 == 0 else "P", n / 10) for n in range(24)]  # an IDR every 0.4 s; the end at 2.4 s
    assert _gate_passes(frames, keep_from_s=0.0) == [n / 10 for n in range(24)]
    # GOPs whose frames are all shown in segments that later frames prove full-length are skipped as anywhere
    # else; from the frame shown until 2.0 s (the start of the last segment, [2, 2.4)) on, all are kept
    assert _gate_passes(frames, keep_from_s=0.0, end_unknown=True) == \
        [0.4, 0.5, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3]
    # with 2-s segments the proof for a GOP comes up to 2 s after it: GOPs wait for it, and are then skipped
    frames = [("I" if n % 4 == 0 else "P", n / 10) for n in range(64)]  # the end at 6.4 s: [6, 6.4) is short
    passed = _gate_passes(frames, segment_s=2.0, keep_from_s=0.0, end_unknown=True)
    assert passed == [0.8, 0.9, 1.0, 2.8, 2.9, 3.0, 4.8, 4.9, 5.0] + [n / 10 for n in range(56, 64)]


def test_segments_longer_than_10_s_are_proven_full_length_through_the_frames_between():
    """A frame counted as proof only within 10 s of the frame it proves for, which the end of a segment longer than
    10 s may not be: every frame in the first seconds of each 15-s segment was decoded. Now a frame proves through
    the frames between, none more than 10 s after the one before (past a longer step it may be damaged)."""
    gop = [("I" if n % 10 == 0 else "P", n / 10) for n in range(500)]  # 50 s, an IDR every second
    assert _gate_passes(gop, segment_s=15.0, keep_from_s=0.0, end_unknown=True) == \
        [n / 10 for r in (range(70, 76), range(220, 226), range(370, 376), range(440, 500)) for n in r]
    # a step of 9.9 s: the frames before it are proven (4.0 to 4.9 show the first target, 7.5 s)
    head = [("I" if n % 10 == 0 else "P", n / 10) for n in range(50)]
    for step, first in ((9.9, 4.0), (10.1, 0.0)):  # past a step over 10 s, nothing is proven
        tail = [("I" if n % 10 == 0 else "P", round(4.9 + step + n / 10, 3)) for n in range(100)]
        assert _gate_passes(head + tail, segment_s=15.0, keep_from_s=0.0, end_unknown=True) == \
            [t for _, t in head + tail if t >= first]


def test_gops_wait_for_their_proof_beyond_the_length_of_one_gop():
    """What waits for proof was bounded by MAX_GOP_PACKETS (300): at 60 fps, 5 s, less than a 6-s segment and its
    GOPs need, so every GOP went on unproven and was decoded whole."""
    frames = [("I" if n % 120 == 0 else "P", n / 60) for n in range(3600)]  # 60 s at 60 fps, an IDR every 2 s
    passed = _gate_passes(frames, segment_s=6.0, keep_from_s=0.0, end_unknown=True)
    # the GOP of each segment's target (at 3, 9, 15, ... s) up to it, and every frame from the GOP that ends where
    # the last segment [54, 60) starts
    assert passed == [round(n / 60, 3) for s in range(9) for n in range(120 + 360 * s, 181 + 360 * s)] + \
        [round(n / 60, 3) for n in range(52 * 60, 3600)]


@pytest.mark.parametrize("gop,size", [(290, 0), (200, 150_000)])
def test_gops_waiting_for_proof_stay_within_the_gates_limits(gop, size):
    """GOPs waiting with the end unknown, plus the GOP being read, could hold twice MAX_GOP_BYTES (57 MiB of 150-kB
    frames): the limits bound all the gate holds."""
    units = {"I": bytes([0x65, 0x88]), "P": bytes([0x41, 0x9A])}
    gate = frame_skip.DisposableFrameGate(4, lambda p: p.pts / 1000, lambda lo, hi: False, keep_from_s=0.0,
                                          segment_s=1000.0)
    gate.started = gate.end_unknown = True
    passed, held, held_bytes = [], 0, 0
    for i in range(3000):
        kind = "I" if i % gop == 0 else "P"
        packet = av.Packet((len(units[kind]) + size).to_bytes(4, "big") + units[kind] + bytes(size))
        packet.pts = i * 40
        passed += [p.pts for p in gate.push(packet)]
        held = max(held, len(gate.queue) + gate.waiting_packets)
        held_bytes = max(held_bytes, gate.queued_bytes + gate.waiting_bytes)
    passed += [p.pts for p in gate.flush()]
    assert held <= frame_skip.MAX_WAITING_PACKETS and held_bytes <= frame_skip.MAX_GOP_BYTES
    assert passed == sorted(passed) and len(passed) + gate.skipped == 3000


def test_gops_of_one_frame_gather_the_frames_at_hand_once_per_release(monkeypatch):
    """Each waiting GOP released gathered every frame waiting: with GOPs of one frame (all-intra) that was a pass over
    2,400 frames a packet, and skipping made decoding slower than a full decode (7.2 s against 1.5 s, a review)."""
    gathered = []

    class Counted(frame_skip._Shown):
        def __init__(self, times) -> None:  # noqa: ANN001
            super().__init__(times)
            gathered.append(len(self.times))

    monkeypatch.setattr(frame_skip, "_Shown", Counted)
    frames = [("I", n / 60) for n in range(6000)]  # 100 s at 60 fps, every frame an IDR; one segment of 1,000 s
    assert _gate_passes(frames, segment_s=1000.0, keep_from_s=0.0, end_unknown=True) == [round(t, 3) for _, t in frames]
    assert sum(gathered) < 20 * frame_skip.MAX_WAITING_PACKETS  # a few per drain of 600 GOPs, not one per GOP


def test_segments_longer_than_10_s_in_mpeg_ts_skip_without_a_false_join(tmp_path):
    """Whole GOPs skipped between targets 12 s apart left the decoder a gap of more than 10 s, which in MPEG-TS
    it took for the start of a joined part: the 60-s video came out 38 s long, 4 segments instead of 5."""
    path = mf.make_video(tmp_path / "long_segments.ts", duration_s=60.0, fps=25, size=(96, 64), codec="libx264",
                         audio="tone", audio_codec="aac", video_options={"x264-params": "keyint=25:min-keyint=25:scenecut=0"})
    for segment_s, k in ((12.0, 1), (11.0, 1)):
        sampling = SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=32)
        assert _assert_same(path, sampling) > 0
        assert _core_arrays(path, sampling, skip=True)[3].duration_s == pytest.approx(60.0)


def test_a_joined_mpeg_ts_past_its_headers_end_with_long_segments_is_identical(tmp_path):
    """Past the header's end (the last part's), GOPs wait for proof and a proven segment's go on at once: hundreds
    of frames skipped in one go, of which the gate kept the times of the latest 256 only. The gap the earliest
    left before the next decoded frame then looked like a clock jump of more than 10 s: the 170-s video came out
    83 s long (a review)."""
    opts = {"x264-params": "keyint=25:min-keyint=25:scenecut=0:bframes=3"}
    first = mf.make_video(tmp_path / "p1.ts", duration_s=150.0, fps=25, size=(96, 64), codec="libx264",
                          video_options=opts)
    # lossless: FFmpeg estimates a TS's duration from its last timestamps (the last part's), not from its bit rate
    last = mf.make_video(tmp_path / "p2.ts", duration_s=20.0, fps=25, size=(96, 64), codec="libx264",
                         video_options={**opts, "crf": "0"})
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + last.read_bytes())
    with av.open(str(joined)) as c:
        assert c.duration / 1e6 < 21.0
    for segment_s, k in ((30.0, 2), (40.0, 1)):
        sampling = SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=32)
        assert _assert_same(joined, sampling) > 0
        assert _core_arrays(joined, sampling, skip=True)[3].duration_s == pytest.approx(170.0)


def test_gate_skips_gop_tails_and_gops_without_targets():
    # IDR every 0.4 s, a P-frame every 0.1 s; targets at 0.5, 1.5, ...
    frames = [("I" if n % 4 == 0 else "P", n / 10) for n in range(24)]
    passed = _gate_passes(frames)
    # GOP 0.0-0.3: no target; 0.4-0.7: up to the frame shown at 0.5; 0.8-1.1: none; 1.2-1.5: up to
    # 1.5; 1.6-1.9: none; 2.0-2.3: the end of the stream, its last frame always kept
    assert passed == [0.4, 0.5, 1.2, 1.3, 1.4, 1.5, 2.0, 2.1, 2.2, 2.3]


def test_gate_keeps_references_of_needed_b_frames_and_skips_the_rest():
    # display 0.0 I, 0.1 b, 0.2 b, 0.3 P, ... in decode order I P b b; targets at 0.5
    frames = [("I", 0.0), ("P", 0.3), ("b", 0.1), ("b", 0.2), ("P", 0.6), ("b", 0.4), ("b", 0.48),
              ("P", 0.9), ("b", 0.7), ("b", 0.8), ("I", 1.0), ("P", 1.1)]
    # b 0.48 is shown at 0.5: it and its references (I 0.0, P 0.3, P 0.6) are decoded; b 0.1/0.2/0.4 are
    # disposable and unneeded; P 0.9 and its b-frames come after the last needed frame of the GOP
    assert _gate_passes(frames) == [0.0, 0.3, 0.6, 0.48, 1.0, 1.1]


def test_gate_skips_nothing_before_the_decoder_puts_out_its_first_frame():
    # the first frame shown stands in for every target before it, and which one it is depends on what
    # FFmpeg drops at the start: nothing is skipped until it is known
    frames = [("I", 0.6), ("P", 0.7), ("P", 0.8), ("I", 1.0), ("P", 1.1), ("I", 2.0)]
    assert _gate_passes(frames, started=False) == [0.6, 0.7, 0.8, 1.0, 1.1, 2.0]


def test_gate_holds_at_most_max_gop_packets(monkeypatch):
    monkeypatch.setattr(frame_skip, "MAX_GOP_PACKETS", 20)
    gate = frame_skip.DisposableFrameGate(4, lambda p: p.pts / 1000, lambda lo, hi: False, keep_from_s=50.0)
    gate.started = True
    released = 0
    for n in range(60):  # one IDR, then 59 P-frames: a GOP too long to hold
        unit = bytes([0x65, 0x88]) if n == 0 else bytes([0x41, 0x9A])
        packet = av.Packet(len(unit).to_bytes(4, "big") + unit)
        packet.pts = n * 40
        released += len(gate.push(packet))
        assert len(gate.queue) <= 20
    assert released == 40 and gate.skipped == 0  # reference frames passed on: no IDR came to end the GOP


def _remux(src: Path, out: Path, edit) -> Path:
    """Copy ``src``'s video packets into ``out``, ``edit(index, packet, time_s)`` changing them on the way."""
    with av.open(str(src)) as i, av.open(str(out), "w") as o:
        vs = o.add_stream_from_template(i.streams.video[0])
        tb = i.streams.video[0].time_base
        for n, p in enumerate(q for q in i.demux(i.streams.video[0]) if q.size):
            p = edit(n, p, float(p.pts * tb))
            p.stream = vs
            o.mux(p)
    return out


def test_stream_cut_mid_gop_is_identical(tmp_path):
    # A recording cut mid-GOP: FFmpeg shows nothing before the first IDR, which then stands in for the
    # targets before it.  (The gate used to skip that IDR's GOP, which held no target itself.)
    src = mf.make_video(tmp_path / "src.ts", codec="libx264", audio_codec="aac", duration_s=14.0, fps=25,
                        size=(160, 120), audio="tone", video_options={"x264-params": "keyint=50:min-keyint=50:scenecut=0"})
    with av.open(str(src)) as c:
        idr_pos = [p.pos for p in c.demux(c.streams.video[0]) if p.size and p.is_keyframe]
    start = idr_pos[1] + (idr_pos[2] - idr_pos[1]) // 4
    cut = tmp_path / "cut.ts"
    cut.write_bytes(src.read_bytes()[start // 188 * 188:])
    _assert_same(cut, SamplingSpec(segment_seconds=2.5, image_size=64))


def test_parameter_sets_in_a_skipped_gop_still_reach_the_decoder(tmp_path):
    # At 4 s the stream switches encoder settings (a new PPS, CAVLC instead of CABAC), sent in-band once
    # with the first IDR after the switch, whose GOP holds no target: the IDR must be decoded anyway.
    opts = "keyint=12:min-keyint=12:scenecut=0:bframes=0"
    a = mf.make_video(tmp_path / "a.mkv", duration_s=4.0, fps=25, size=(160, 120), audio=None,
                      video_options={"x264-params": opts})
    b = mf.make_video(tmp_path / "b.mkv", duration_s=12.0, fps=25, size=(160, 120), audio=None, seed=3,
                      video_options={"x264-params": opts + ":cabac=0:qp=30"})
    with av.open(str(b)) as bi:
        ex = bytes(bi.streams.video[0].codec_context.extradata)  # avcC: its SPS and PPS
        b_packets = [(p.pts, p.dts, bytes(p), p.is_keyframe) for p in bi.demux(bi.streams.video[0]) if p.size]
        tb = bi.streams.video[0].time_base
    params, i = b"", 6
    for count in (ex[5] & 0x1F, None):
        if count is None:
            count, i = ex[i], i + 1
        for _ in range(count):
            length = int.from_bytes(ex[i:i + 2], "big")
            params += length.to_bytes(4, "big") + ex[i + 2:i + 2 + length]
            i += 2 + length
    out = tmp_path / "switch.mkv"
    with av.open(str(a)) as ai, av.open(str(out), "w") as o:
        vs = o.add_stream_from_template(ai.streams.video[0])
        for p in ai.demux(ai.streams.video[0]):
            if p.size:
                p.stream = vs
                o.mux(p)
        offset = int(round(4.0 / tb))
        for n, (pts, dts, data, key) in enumerate(b_packets):
            q = av.Packet((params if n == 0 else b"") + data)
            q.pts, q.dts, q.time_base, q.is_keyframe, q.stream = pts + offset, dts + offset, tb, key, vs
            o.mux(q)
    assert _kinds(out)[IDR_KEPT] == 1
    for segment_s in (1.0, 2.0, 3.0):
        _assert_same(out, SamplingSpec(segment_seconds=segment_s, image_size=64))


def test_a_skipped_frame_with_a_long_duration_still_ends_the_video(tmp_path):
    src = mf.make_video(tmp_path / "src.mkv", duration_s=12.0, fps=25, size=(160, 120), audio=None,
                        video_options={"x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=0"})

    def long_frame(n: int, p: av.Packet, t: float) -> av.Packet:
        if abs(t - 3.24) < 1e-6:  # in a GOP tail no target needs; shown for 20 s (3.24 + 20 rounds up)
            p.duration = int(round(20 / p.time_base))
        return p

    out = _remux(src, tmp_path / "long.mkv", long_frame)
    assert _assert_same(out, SamplingSpec(segment_seconds=2.0, image_size=64)) > 0


def test_decode_order_times_turn_skipping_off(tmp_path):
    # An MKV whose packet times are decode-order times (pts = dts, as after remuxing an AVI with
    # B-frames): the frames come out of the decoder with times out of order, so the gate cannot tell
    # which frame is on screen when.  It sees B-frames in decode order and stops skipping.
    src = mf.make_video(tmp_path / "src.mkv", duration_s=12.0, fps=25, size=(160, 120), audio=None,
                        video_options={"x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=2:b-pyramid=none"})

    def pts_is_dts(n: int, p: av.Packet, t: float) -> av.Packet:
        p.pts = p.dts = (p.dts if p.dts is not None else -40) + 40
        return p

    out = _remux(src, tmp_path / "pts_is_dts.mkv", pts_is_dts)
    for segment_s, k in ((1.0, 1), (2.0, 1), (0.4, 2)):
        assert _assert_same(out, SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=64)) == 0
    assert _assert_same(src, SamplingSpec(image_size=64)) > 0  # the same stream with its real times


def test_avi_with_b_frames_is_identical(tmp_path):
    # AVI's packet times are in decode order: the gate cannot tell which frames are shown when
    path = mf.make_video(tmp_path / "b.avi", codec="libx264", audio=None, duration_s=12.0, fps=25, size=(160, 120),
                         video_options={"x264-params": "keyint=12:min-keyint=12:scenecut=0"})
    _assert_same(path, SamplingSpec(segment_seconds=2.0, image_size=64))


def test_nal_parsing_avcc_and_annex_b():
    assert h264_nal_length_size(bytes([1, 0x4D, 0x40, 0x1F, 0xFF, 0xE1])) is None  # too short to be avcC
    assert h264_nal_length_size(bytes([1, 0x4D, 0x40, 0x1F, 0xFF, 0xE1, 0x00])) == 4
    assert h264_nal_length_size(b"\x00\x00\x00\x01\x67") is None
    non_ref_b = bytes([0x01, 0x9E])  # nal_ref_idc 0, type 1
    ref_p = bytes([0x41, 0x9A])  # nal_ref_idc 2, type 1
    idr = bytes([0x65, 0x88])  # nal_ref_idc 3, type 5
    sei = bytes([0x06, 0x05])
    avcc = lambda *nals: b"".join(len(n).to_bytes(4, "big") + n for n in nals)  # noqa: E731
    assert h264_access_unit_kind(avcc(sei, non_ref_b), 4) == DISPOSABLE
    assert h264_access_unit_kind(avcc(ref_p), 4) != DISPOSABLE
    assert h264_access_unit_kind(avcc(idr), 4) != DISPOSABLE
    assert h264_access_unit_kind(avcc(sei), 4) != DISPOSABLE  # no picture slice: keep
    annex_b = lambda *nals: b"".join(b"\x00\x00\x00\x01" + n for n in nals)  # noqa: E731
    assert h264_access_unit_kind(annex_b(non_ref_b), None) == DISPOSABLE
    assert h264_access_unit_kind(annex_b(non_ref_b, ref_p), None) != DISPOSABLE
    sps, pps = bytes([0x67, 0x4D]), bytes([0x68, 0xEE])
    assert h264_access_unit_kind(avcc(pps, non_ref_b), 4) == OTHER  # a parameter set must reach the decoder
    assert h264_access_unit_kind(annex_b(idr), None) == IDR
    assert h264_access_unit_kind(annex_b(sps, pps, idr), None) == IDR_KEPT  # may not be skipped
    assert h264_access_unit_kind(avcc(sei, ref_p), 4) == REFERENCE
    assert h264_access_unit_kind(avcc(sei), 4) == OTHER
