"""The SPS fields that decide whether frames may be skipped, read from real and hand-made SPS."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

import tests.media_factory as mf
from pipeline.decode import VideoDecoder
from pipeline.h264_sps import (
    frames_skippable,
    parameter_set_key,
    parameter_sets_from_extradata,
    parse_sps,
    rbsp,
    sps_from_extradata,
)
from pipeline.media import ChunkingSpec, SamplingSpec


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, v: int) -> _BitWriter:
        self.bits += [(v >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def ue(self, v: int) -> _BitWriter:
        code = v + 1
        return self.u(code.bit_length() - 1, 0).u(code.bit_length(), code)

    def se(self, v: int) -> _BitWriter:
        return self.ue(2 * v - 1 if v > 0 else -2 * v)

    def nal(self) -> bytes:
        bits = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)  # rbsp stop bit, alignment
        return _escape(bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)))


def _escape(payload: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in payload:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps(*, profile: int = 66, poc_type: int = 0, frame_mbs_only: int = 1, restriction: bool | None = True,
         reorder: int = 2, scaling: bool = False, hrd: bool = True, chroma_format: int = 1,
         everything: bool = False) -> bytes:
    """A hand-made SPS; ``everything`` also sets the optional VUI fields and a VCL HRD."""
    w = _BitWriter().u(8, 0x67).u(8, profile).u(8, 0).u(8, 30).ue(0)
    if profile in (100, 244):
        w.ue(chroma_format)
        if chroma_format == 3:
            w.u(1, 0)  # separate_colour_plane_flag
        w.ue(0).ue(0).u(1, 0).u(1, int(scaling))
        if scaling:
            for i in range(8 if chroma_format != 3 else 12):
                w.u(1, 1)
                size = 16 if i < 6 else 64
                if i % 3 == 2:
                    w.se(-8)  # next_scale 0 at once: the rest of the list is implied, not coded
                else:
                    deltas = [3, -2, 0, 5, -1] + [1] * (size - 5)
                    for d in deltas:
                        w.se(d)
    w.ue(0).ue(poc_type)
    if poc_type == 0:
        w.ue(2)
    elif poc_type == 1:
        w.u(1, 0).se(0).se(0).ue(1).se(2)
    w.ue(1).u(1, 0).ue(9).ue(7).u(1, frame_mbs_only)
    if not frame_mbs_only:
        w.u(1, 1)
    w.u(1, 1).u(1, 0)  # direct_8x8_inference, no cropping
    if restriction is None:
        return w.u(1, 0).nal()  # no VUI
    w.u(1, 1).u(1, 1).u(8, 255).u(16, 1).u(16, 1)  # VUI; aspect ratio: extended SAR 1:1
    w.u(1, int(everything))
    if everything:
        w.u(1, 1)  # overscan_appropriate_flag
    w.u(1, 1).u(4, 5).u(1, 1).u(24, 0x010101)  # video signal, colour description
    w.u(1, int(everything))
    if everything:
        w.ue(1).ue(2)  # chroma sample locations
    w.u(1, 1).u(32, 1).u(32, 50).u(1, 1)  # timing: 1/50 s ticks (zeros: emulation prevention)

    def hrd_parameters() -> None:
        w.ue(1).u(4, 0).u(4, 0)
        for _ in range(2):
            w.ue(1000).ue(2000).u(1, 0)
        w.u(20, 0)

    w.u(1, int(hrd))
    if hrd:
        hrd_parameters()
    w.u(1, int(everything))
    if everything:
        hrd_parameters()
    if hrd or everything:
        w.u(1, 0)  # low_delay_hrd_flag
    w.u(1, 0).u(1, int(restriction))
    if restriction:
        w.u(1, 1).ue(2).ue(1).ue(16).ue(16).ue(reorder).ue(4)
    return w.nal()


@pytest.mark.parametrize("profile,scaling,chroma_format,everything",
                         [(66, False, 1, False), (100, False, 1, False), (100, True, 1, False), (244, True, 3, False),
                          (100, True, 1, True), (244, True, 3, True), (66, False, 1, True)])
@pytest.mark.parametrize("poc_type", [0, 1, 2])
def test_hand_made_sps_fields(profile, scaling, chroma_format, everything, poc_type):
    # the field after all the optional parts (max_num_reorder_frames) comes out right only if every
    # part before it was read to the bit
    sps = _sps(profile=profile, scaling=scaling, poc_type=poc_type, reorder=3, chroma_format=chroma_format,
               everything=everything)
    assert b"\x00\x00\x03" in sps  # the reader must undo emulation prevention
    info = parse_sps(sps)
    assert (info.pic_order_cnt_type, info.frame_mbs_only, info.bitstream_restriction) == (poc_type, True, True)
    assert info.max_num_reorder_frames == 3 and info.frames_skippable


def test_sps_that_make_skipping_unsafe():
    assert parse_sps(_sps(hrd=False, everything=True, reorder=5)).max_num_reorder_frames == 5  # VCL HRD alone
    assert not parse_sps(_sps(restriction=False)).frames_skippable  # reordering, depth unknown
    assert not parse_sps(_sps(restriction=None, hrd=False)).frames_skippable  # no VUI at all
    assert parse_sps(_sps(restriction=False, poc_type=2)).frames_skippable  # output order = decode order
    assert not parse_sps(_sps(frame_mbs_only=0)).frames_skippable  # fields may come in separate packets
    assert not frames_skippable(None) and not frames_skippable(b"\x01\x64\x00\x1f\xff\xe0\x00")  # no SPS
    assert not frames_skippable(b"\x00\x00\x00\x01" + _sps()[:6])  # cut short: unreadable
    annex_b = b"\x00\x00\x00\x01" + _sps() + b"\x00\x00\x00\x01\x68\xee\x3c\x80"
    assert sps_from_extradata(annex_b) == [_sps()] and frames_skippable(annex_b)
    # avcC with two SPS: every one must allow skipping
    good, bad = _sps(), _sps(restriction=False)

    def avcc(*units: bytes) -> bytes:
        return bytes([1, 66, 0, 30, 0xFF, 0xE0 | len(units)]) + b"".join(
            len(u).to_bytes(2, "big") + u for u in units) + b"\x01\x00\x04\x68\xee\x3c\x80"

    assert sps_from_extradata(avcc(good, bad)) == [good, bad]
    pps = b"\x68\xee\x3c\x80"
    assert parameter_sets_from_extradata(avcc(good, bad)) == [good, bad, pps]
    assert parameter_sets_from_extradata(annex_b) == [_sps(), pps]
    assert parameter_set_key(good) == (7, 0) and parameter_set_key(pps) == (8, 0)
    assert parameter_set_key(b"\x68\x7c") == (8, 2) and parameter_set_key(b"\x65\x88") is None
    assert frames_skippable(avcc(good, good)) and not frames_skippable(avcc(good, bad))


def _extradata(path: Path) -> bytes:
    with av.open(str(path)) as c:
        return bytes(c.streams.video[0].codec_context.extradata or b"")


def test_x264_streams(tmp_path):
    progressive = mf.make_video(tmp_path / "p.mp4", duration_s=2.0, size=(160, 120), audio=None)
    info = parse_sps(sps_from_extradata(_extradata(progressive))[0])
    assert info.frame_mbs_only and info.bitstream_restriction and info.pic_order_cnt_type == 0
    assert frames_skippable(_extradata(progressive))
    ts = mf.make_video(tmp_path / "p.ts", codec="libx264", duration_s=2.0, size=(160, 120), audio=None)
    assert frames_skippable(_extradata(ts))  # Annex B extradata, as FFmpeg gathers it from the stream
    interlaced = mf.make_video(tmp_path / "i.mp4", duration_s=2.0, size=(160, 120), audio=None,
                               video_options={"x264-params": "interlaced=1"})
    assert not parse_sps(sps_from_extradata(_extradata(interlaced))[0]).frame_mbs_only


def _without_restriction(annex_b_packet: bytes) -> bytes:
    """The packet with every SPS's bitstream_restriction_flag cleared (and the fields after it dropped)."""
    units = annex_b_packet.split(b"\x00\x00\x01")
    for i, unit in enumerate(units):
        body = unit.rstrip(b"\x00")
        if body and body[0] & 0x1F == 7:
            info = parse_sps(body)
            assert info.restriction_flag_bit is not None
            raw = rbsp(body)
            bits = [(raw[j >> 3] >> (7 - (j & 7))) & 1 for j in range(info.restriction_flag_bit)] + [0, 1]
            bits += [0] * (-len(bits) % 8)
            new = bytes(int("".join(map(str, bits[j:j + 8])), 2) for j in range(0, len(bits), 8))
            units[i] = _escape(new) + unit[len(body):]
    return b"\x00\x00\x01".join(units)


def test_stream_without_reorder_depth_decodes_every_frame(tmp_path):
    # B-pyramid without bitstream_restriction: FFmpeg learns the reorder depth from what it sees, so
    # skipping frames would change which frames it drops (10 of 12 samplings differed): no skipping
    src = mf.make_video(tmp_path / "src.ts", codec="libx264", audio=None, duration_s=6.0, fps=25, size=(160, 120),
                        video_options={"x264-params": "keyint=24:min-keyint=24:scenecut=0:bframes=3:b-pyramid=normal"})
    out = tmp_path / "no_restriction.ts"
    with av.open(str(src)) as i, av.open(str(out), "w") as o:
        vs = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.size:
                q = av.Packet(_without_restriction(bytes(p)))
                q.pts, q.dts, q.time_base, q.is_keyframe, q.stream = p.pts, p.dts, p.time_base, p.is_keyframe, vs
                o.mux(q)
    assert not frames_skippable(_extradata(out)) and frames_skippable(_extradata(src))
    for path, skips in ((src, True), (out, False)):
        info = None
        for chunk in VideoDecoder(SamplingSpec(image_size=32), ChunkingSpec(core_segments=4)).chunks(path):
            info = chunk.info or info
        assert info is not None and (info.n_frames_skipped > 0) == skips


def test_an_unsafe_sps_arriving_mid_stream_turns_skipping_off(tmp_path):
    # stitched recordings: the first 4 s without B-frames (their SPS in the extradata allows skipping),
    # then a B-pyramid whose in-band SPS does not state the reorder depth
    a = mf.make_video(tmp_path / "a.ts", codec="libx264", audio=None, duration_s=4.0, fps=25, size=(160, 120),
                      video_options={"x264-params": "keyint=24:min-keyint=24:scenecut=0:bframes=0"})
    b = mf.make_video(tmp_path / "b.ts", codec="libx264", audio=None, duration_s=10.0, fps=25, size=(160, 120), seed=2,
                      video_options={"x264-params": "keyint=24:min-keyint=24:scenecut=0:bframes=3:b-pyramid=normal"})
    out = tmp_path / "stitched.ts"
    with av.open(str(a)) as ai, av.open(str(b)) as bi, av.open(str(out), "w") as o:
        vs = o.add_stream_from_template(ai.streams.video[0])
        tb = ai.streams.video[0].time_base
        last = 0
        for p in ai.demux(ai.streams.video[0]):
            if p.size:
                last = max(last, p.pts, p.dts)
                p.stream = vs
                o.mux(p)
        b_packets = [p for p in bi.demux(bi.streams.video[0]) if p.size]
        offset = last + round(0.04 / tb) - min(min(p.dts for p in b_packets), bi.streams.video[0].start_time)
        for p in b_packets:
            q = av.Packet(_without_restriction(bytes(p)))
            q.pts, q.dts, q.time_base, q.is_keyframe, q.stream = p.pts + offset, p.dts + offset, p.time_base, p.is_keyframe, vs
            o.mux(q)
    assert frames_skippable(_extradata(out))
    for segment_s, k in ((1.0, 1), (2.0, 1), (0.4, 2), (1.0, 3)):
        skipped = 0
        for path, skip in ((out, False), (out, True)):
            frames, pts = [], []
            for chunk in VideoDecoder(SamplingSpec(segment_seconds=segment_s, frames_per_segment=k, image_size=32),
                                      ChunkingSpec(core_segments=4), skip_unsampled=skip).chunks(path):
                frames.append(chunk.frames[chunk.core_slice])
                pts.append(chunk.frame_pts_s[chunk.core_slice])
                skipped = chunk.info.n_frames_skipped if chunk.info else skipped
            if not skip:
                reference = (frames, pts)
        assert all((x == y).all() for x, y in zip(frames, reference[0], strict=True))
        assert all((x == y).all() for x, y in zip(pts, reference[1], strict=True))
        assert skipped > 0  # still skipped in the first part
