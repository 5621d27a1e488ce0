"""Skip decoding frames that no segment samples and no other frame references.

In H.264, a coded picture whose slices all have ``nal_ref_idc == 0`` is *disposable*: no other
picture is predicted from it, so not decoding it changes no other frame.  If, in addition, no
sampling target time falls while it would be on screen, the decoder's result is exactly the same
without it.  About half the frames of a typical x264 encode (non-reference B-frames) qualify, and
the pipeline samples one frame a second, so this removes a large share of the decoding work — the
pipeline's ceiling — without changing a single output pixel (tests compare with and without).

To know when a packet's frame would leave the screen we need the next presentation time, which in
decode order can arrive a few packets later (B-frame reordering): packets wait in a short
look-ahead queue.  At the end of the stream everything still queued is decoded.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import av

LOOKAHEAD_PACKETS = 32  # more than any real reorder depth (H.264 allows at most 16)
_MARGIN_S = 1e-4  # a frame within this of a target counts as possibly shown at it


def h264_nal_length_size(extradata: bytes | None) -> int | None:
    """NAL length prefix size for avcC (MP4/MKV) streams; None for Annex B (start codes)."""
    if extradata and len(extradata) >= 7 and extradata[0] == 1:
        return (extradata[4] & 3) + 1
    return None


def _nal_headers(data: bytes, nal_length_size: int | None) -> list[int]:
    """First byte of each NAL unit in an access unit."""
    heads = []
    if nal_length_size is not None:
        i = 0
        while i + nal_length_size < len(data):
            length = int.from_bytes(data[i : i + nal_length_size], "big")
            heads.append(data[i + nal_length_size])
            i += nal_length_size + length
        return heads
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        heads.append(data[i + 3])
        i = data.find(b"\x00\x00\x01", i + 3)
    return heads


def h264_is_disposable(data: bytes, nal_length_size: int | None) -> bool:
    """True if the access unit holds picture slices and none of them is a reference."""
    slices = [h for h in _nal_headers(data, nal_length_size) if (h & 0x1F) in (1, 5)]
    return bool(slices) and all((h >> 5) & 3 == 0 and (h & 0x1F) == 1 for h in slices)


class DisposableFrameGate:
    """Passes video packets on to the decoder, holding each briefly, and drops the skippable ones.

    Args:
        nal_length_size: from :func:`h264_nal_length_size`.
        packet_time_s: presentation time of a packet relative to the video's origin (None: unknown).
        needed_between: whether any sampling target lies in ``[lo_s, hi_s]``.
        keep_from_s: frames at or after this time are always decoded (the tail, sampled exactly).
    """

    def __init__(self, nal_length_size: int | None, packet_time_s: Callable[[av.Packet], float | None],
                 needed_between: Callable[[float, float], bool], keep_from_s: float) -> None:
        self.nal_length_size = nal_length_size
        self.packet_time_s = packet_time_s
        self.needed_between = needed_between
        self.keep_from_s = keep_from_s
        self.queue: deque[tuple[av.Packet, float | None]] = deque()
        self.recent: deque[float] = deque(maxlen=3 * LOOKAHEAD_PACKETS)  # times around the queue's head
        self.skipped = 0

    def push(self, packet: av.Packet) -> list[av.Packet]:
        """Take the next video packet (decode order); return the packets to decode now, in order."""
        if packet.size == 0:  # end of stream: decode everything held, then the flush packet
            return self.flush() + [packet]
        t = self.packet_time_s(packet)
        self.queue.append((packet, t))
        if t is not None:
            self.recent.append(t)
        out = []
        while len(self.queue) > LOOKAHEAD_PACKETS:
            p, pt = self.queue.popleft()
            if self._skippable(p, pt):
                self.skipped += 1
            else:
                out.append(p)
        return out

    def flush(self) -> list[av.Packet]:
        out = [p for p, _ in self.queue]
        self.queue.clear()
        return out

    def _skippable(self, packet: av.Packet, t: float | None) -> bool:
        if t is None or not math.isfinite(t) or t >= self.keep_from_s:
            return False
        if not h264_is_disposable(bytes(packet), self.nal_length_size):
            return False
        later = [u for u in self.recent if u > t]
        if not later:
            return False
        return not self.needed_between(t - _MARGIN_S, min(later) + _MARGIN_S)
