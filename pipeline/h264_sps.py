"""Read the few H.264 sequence parameter set fields that decide whether frames may be skipped safely.

Skipping frames (``pipeline/frame_skip.py``) leaves the output unchanged only where FFmpeg's output
does not depend on which frames it was given.  Two kinds of stream break that:

* **No ``bitstream_restriction`` in the SPS's VUI** (so no ``max_num_reorder_frames``) while pictures
  may be reordered (``pic_order_cnt_type`` 0 or 1): FFmpeg then guesses the reorder depth from the
  frames it sees and drops frames that come out of order while it learns, so skipping some changes
  what it drops.
* **Interlaced coding allowed** (``frame_mbs_only_flag`` 0): the two fields of a frame may come as two
  pictures in two packets (PAFF), which the gate cannot treat as one frame.

The SPS comes from the stream's extradata: an ``avcC`` record (MP4, MKV, MOV) or Annex B NAL units
(MPEG-TS and raw streams once parsed).  Syntax: ITU-T H.264 (08/2021) 7.3.2.1.1 and E.1.1.
"""

from __future__ import annotations

from dataclasses import dataclass

# profile_idc values whose SPS carries chroma_format_idc, bit depths and scaling matrices
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


@dataclass(frozen=True)
class SpsInfo:
    pic_order_cnt_type: int
    frame_mbs_only: bool
    bitstream_restriction: bool
    max_num_reorder_frames: int | None  # from the VUI's bitstream_restriction, when present
    restriction_flag_bit: int | None = None  # bit offset of bitstream_restriction_flag in the RBSP

    @property
    def may_reorder(self) -> bool:
        """Whether output order can differ from decode order (POC type 2 is decode order)."""
        return self.pic_order_cnt_type != 2 and self.max_num_reorder_frames != 0

    @property
    def frames_skippable(self) -> bool:
        """Whether skipping frames leaves FFmpeg's output of the other frames unchanged (see above)."""
        return self.frame_mbs_only and (self.bitstream_restriction or not self.may_reorder)


class _Bits:
    """An MSB-first bit reader over an RBSP (emulation prevention bytes removed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise ValueError("SPS ends early")
            value = (value << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code in SPS")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def rbsp(nal: bytes) -> bytes:
    """A NAL unit's payload without its emulation prevention bytes (``00 00 03`` -> ``00 00``)."""
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _skip_scaling_list(r: _Bits, size: int) -> None:
    last = next_scale = 8
    for _ in range(size):
        if next_scale != 0:
            next_scale = (last + r.se() + 256) % 256
        last = next_scale if next_scale != 0 else last


def _skip_hrd(r: _Bits) -> None:
    cpb_cnt = r.ue() + 1
    r.u(4)  # bit_rate_scale
    r.u(4)  # cpb_size_scale
    for _ in range(cpb_cnt):
        r.ue()  # bit_rate_value_minus1
        r.ue()  # cpb_size_value_minus1
        r.u(1)  # cbr_flag
    r.u(20)  # four 5-bit delay / offset lengths


def parse_sps(nal: bytes) -> SpsInfo:
    """The fields of one SPS NAL unit (header byte included) that :class:`SpsInfo` holds."""
    r = _Bits(rbsp(nal))
    if r.u(8) & 0x1F != 7:
        raise ValueError("not an SPS NAL unit")
    profile_idc = r.u(8)
    r.u(16)  # constraint flags, level_idc
    r.ue()  # seq_parameter_set_id
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = r.ue()
        if chroma_format_idc == 3:
            r.u(1)  # separate_colour_plane_flag
        r.ue()  # bit_depth_luma_minus8
        r.ue()  # bit_depth_chroma_minus8
        r.u(1)  # qpprime_y_zero_transform_bypass_flag
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        r.u(1)
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.u(1)  # gaps_in_frame_num_value_allowed_flag
    r.ue()  # pic_width_in_mbs_minus1
    r.ue()  # pic_height_in_map_units_minus1
    frame_mbs_only = bool(r.u(1))
    if not frame_mbs_only:
        r.u(1)  # mb_adaptive_frame_field_flag
    r.u(1)  # direct_8x8_inference_flag
    if r.u(1):  # frame_cropping_flag
        for _ in range(4):
            r.ue()
    restriction, reorder, flag_bit = False, None, None
    if r.u(1):  # vui_parameters_present_flag
        if r.u(1) and r.u(8) == 255:  # aspect_ratio_info_present_flag, aspect_ratio_idc == Extended_SAR
            r.u(32)
        if r.u(1):  # overscan_info_present_flag
            r.u(1)
        if r.u(1):  # video_signal_type_present_flag
            r.u(4)
            if r.u(1):  # colour_description_present_flag
                r.u(24)
        if r.u(1):  # chroma_loc_info_present_flag
            r.ue()
            r.ue()
        if r.u(1):  # timing_info_present_flag
            r.u(32)
            r.u(32)
            r.u(1)
        nal_hrd = r.u(1)
        if nal_hrd:
            _skip_hrd(r)
        vcl_hrd = r.u(1)
        if vcl_hrd:
            _skip_hrd(r)
        if nal_hrd or vcl_hrd:
            r.u(1)  # low_delay_hrd_flag
        r.u(1)  # pic_struct_present_flag
        flag_bit = r.pos
        restriction = bool(r.u(1))
        if restriction:
            r.u(1)  # motion_vectors_over_pic_boundaries_flag
            r.ue()  # max_bytes_per_pic_denom
            r.ue()  # max_bits_per_mb_denom
            r.ue()  # log2_max_mv_length_horizontal
            r.ue()  # log2_max_mv_length_vertical
            reorder = r.ue()
            r.ue()  # max_dec_frame_buffering
    return SpsInfo(poc_type, frame_mbs_only, restriction, reorder, flag_bit)


def parameter_set_key(nal: bytes) -> tuple[int, int] | None:
    """``(7, seq_parameter_set_id)`` of an SPS, ``(8, pic_parameter_set_id)`` of a PPS, else None."""
    if not nal or nal[0] & 0x1F not in (7, 8):
        return None
    try:
        r = _Bits(rbsp(nal))
        nal_type = r.u(8) & 0x1F
        if nal_type == 7:
            r.u(24)  # profile_idc, constraint flags, level_idc
        return nal_type, r.ue()
    except ValueError:
        return None


def parameter_sets_from_extradata(extradata: bytes | None) -> list[bytes]:
    """The SPS and PPS NAL units of an ``avcC`` record or of Annex B extradata."""
    if not extradata:
        return []
    if extradata[0] == 1 and len(extradata) >= 7:  # avcC: SPS count and list, then PPS count and list
        out, i = [], 6
        for count_at in (5, None):
            if count_at is None:
                if i >= len(extradata):
                    break
                count, i = extradata[i], i + 1
            else:
                count = extradata[count_at] & 0x1F
            for _ in range(count):
                length = int.from_bytes(extradata[i : i + 2], "big")
                out.append(extradata[i + 2 : i + 2 + length])
                i += 2 + length
        return [n for n in out if n and n[0] & 0x1F in (7, 8)]
    return [u for u in annexb_units(extradata) if u[0] & 0x1F in (7, 8)]


def annexb_units(data: bytes) -> list[bytes]:
    """The NAL units of Annex B bytes (start-code separated), header byte first."""
    # A 4-byte start code leaves a zero byte at the end of the unit before it (a unit ends in its stop
    # bit, never in a zero byte, except for trailing cabac_zero_words, which no reader here looks at).
    return [unit for u in data.split(b"\x00\x00\x01")[1:] if (unit := u.rstrip(b"\x00"))]


def sps_from_extradata(extradata: bytes | None) -> list[bytes]:
    """The SPS NAL units of an ``avcC`` record or of Annex B extradata."""
    return [u for u in parameter_sets_from_extradata(extradata) if u[0] & 0x1F == 7]


def read_sps(units: list[bytes]) -> list[SpsInfo] | None:
    """The fields of each SPS NAL unit; None if one of them cannot be read."""
    try:
        return [parse_sps(u) for u in units]
    except (ValueError, IndexError):
        return None


def skippable_sps(units: list[bytes]) -> list[SpsInfo] | None:
    """The fields of each SPS NAL unit when every one allows skipping frames; None when one does not or
    cannot be read (an empty list: no SPS among ``units``)."""
    infos = read_sps(units)
    return infos if infos is not None and all(info.frames_skippable for info in infos) else None


def frames_skippable(extradata: bytes | None) -> bool:
    """Whether the stream's SPS (all of them) allow skipping frames; False when there is none or it
    cannot be read (the decoder then decodes every frame, which is always right)."""
    return bool(skippable_sps(sps_from_extradata(extradata)))
