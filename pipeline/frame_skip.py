"""Skip decoding frames that no segment samples and that no sampled frame depends on.

Two kinds of H.264 frames can go undecoded without changing a single output pixel (tests compare
with and without):

* A coded picture whose slices all have ``nal_ref_idc == 0`` is *disposable*: no other picture is
  predicted from it.  If no sampling target time falls while it would be on screen, nothing needs
  it.  About half the frames of a typical x264 encode (non-reference B-frames) qualify.
* An IDR picture starts afresh: no picture after it in decode order refers to one before it.  So in
  the run of pictures from one IDR to the next (a closed GOP), every picture after the last one
  that a target needs (in decode order) is needed by nobody: the reference frames of a GOP's tail,
  and whole GOPs that no target falls in (short-GOP streaming and broadcast encodes sample one
  GOP in two at one frame a second).

To know when a packet's frame would leave the screen we need the next presentation time, which in
decode order can arrive a few packets later (B-frame reordering); to know a GOP's tail we need the
next IDR.  So packets wait in a queue until the next IDR, at most ``MAX_GOP_PACKETS`` packets and
``MAX_GOP_BYTES``; past that (long GOPs, open-GOP streams without IDRs) the oldest packets are passed
on, skipping only disposable ones, and the GOP-tail rule applies to what is still held when an IDR
comes.  Never skipped: anything before the decoder's first frame (that frame stands in for every
target before it, and which one it is depends on what FFmpeg drops at the start of a cut stream),
access units with parameter sets or other units the decoder must see (even IDRs, unless the
parameter sets repeat unchanged what the decoder holds, as MPEG-TS sends with every IDR), and the frames
near the end (a short last segment's targets depend on the true end).  Where the header announces no end (a
Matroska file written live), or frames run on past the end it announces (MPEG-TS/PS parts joined with ``cat``,
whose last part gives FFmpeg's estimate), the end is unknown: whole GOPs then wait (within
``MAX_WAITING_PACKETS`` and ``MAX_GOP_BYTES``) until a later frame proves that every segment they may be shown
in is full-length, so that only the true last segment's frames are all decoded.  A skipped frame's end (pts +
duration) still counts for the video's duration.  The decoder turns the gate off for AVI, whose packet times
are in decode order, and for streams whose SPS does not bound the reorder depth or allows interlaced coding
(``pipeline/h264_sps.py``); the gate itself stops skipping for good at an in-band SPS of that kind, where a
held GOP shows B-frames in decode order although the SPS allows reordering (packet times that are decode times:
an MP4 without composition offsets, a remuxed AVI), and, in MPEG-TS/PS, where decode times start again (parts
joined with ``cat``).

Known limits (the output may then differ from a full decode): audio more than 30 s behind the video
in file order, of which how much is dropped depends on how far video decoding has got; a single
frame whose timestamp is out of order (the decoder moves it, the gate cannot know).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import av

from pipeline import h264_sps

LOOKAHEAD_PACKETS = 32  # more than any real reorder depth (H.264 allows at most 16)
MAX_GOP_PACKETS = 300  # a GOP held whole: x264's default longest is 250 frames
MAX_GOP_BYTES = 32 << 20
# With the end unknown, GOPs wait for a frame past the end of their segment (up to a segment and a GOP ahead): what
# waits, with the GOP being read, stays within MAX_WAITING_PACKETS and MAX_GOP_BYTES (40 s of 60-fps video).
MAX_WAITING_PACKETS = 2400
_DRAIN_TO = 0.75  # past the limits, waiting GOPs go on until this share of them is held
_MARGIN_S = 1e-4  # a frame within this of a target counts as possibly shown at it
# Where parts may be joined end to end (MPEG-TS/PS, which the decoder lays one after the other), a decode time
# this far before the latest one, or CLOCK_JUMP_S after it, means the clock started again (or the times are
# damaged): packet times no longer say which frames the targets need, so skipping stops for good.  Decode times,
# not presentation times: those go back in normal B-frame reordering (by seconds at a few frames a second).
JUMP_BACK_S = 0.5
CLOCK_JUMP_S = 10.0


def h264_nal_length_size(extradata: bytes | None) -> int | None:
    """NAL length prefix size for avcC (MP4/MKV) streams; None for Annex B (start codes)."""
    if extradata and len(extradata) >= 7 and extradata[0] == 1:
        return (extradata[4] & 3) + 1
    return None


def _nal_units(data: bytes, nal_length_size: int | None) -> list[bytes]:
    """The NAL units of an access unit (header byte first)."""
    units = []
    if nal_length_size is not None:
        i = 0
        while i + nal_length_size < len(data):
            length = int.from_bytes(data[i : i + nal_length_size], "big")
            units.append(data[i + nal_length_size : i + nal_length_size + length])
            i += nal_length_size + length
        return units
    return h264_sps.annexb_units(data)


def _nal_headers(data: bytes, nal_length_size: int | None) -> list[int]:
    """First byte of each NAL unit in an access unit."""
    return [unit[0] for unit in _nal_units(data, nal_length_size) if unit]


# NAL unit types a skipped access unit may hold: slices (non-IDR and IDR), SEI, access unit delimiter,
# filler.  Parameter sets (SPS/PPS), end-of-sequence and the rest must reach the decoder.
_SKIPPABLE_NAL_TYPES = frozenset({1, 5, 6, 9, 12})

IDR, REFERENCE, DISPOSABLE, OTHER = "idr", "reference", "disposable", "other"
IDR_KEPT = "idr+other"  # an IDR access unit that also carries NAL units that must reach the decoder


def h264_access_unit_kind(data: bytes, nal_length_size: int | None) -> str:
    """``IDR`` (an IDR picture), ``DISPOSABLE`` (non-reference slices only), ``REFERENCE`` (non-IDR
    slices, one of them a reference), ``IDR_KEPT`` (an IDR picture with parameter sets or other units
    that must reach the decoder) or ``OTHER`` (no slice, or such units)."""
    heads = _nal_headers(data, nal_length_size)
    types = [h & 0x1F for h in heads]
    droppable = all(t in _SKIPPABLE_NAL_TYPES for t in types)
    if 5 in types:
        return IDR if droppable else IDR_KEPT
    if 1 not in types or not droppable:
        return OTHER
    return REFERENCE if any((h >> 5) & 3 for h in heads if h & 0x1F == 1) else DISPOSABLE


class _Shown:
    """Sorted times of frames the decoder is to show, and where the clock steps more than CLOCK_JUMP_S between two."""

    def __init__(self, times: Iterable[float]) -> None:
        self.times = sorted(times)
        self.steps = [k for k in range(1, len(self.times)) if self.times[k] - self.times[k - 1] > CLOCK_JUMP_S]

    def reaches(self, from_s: float, to_s: float) -> bool:
        """Whether a frame at or after ``to_s`` follows the frame at ``from_s`` through frames none more than
        CLOCK_JUMP_S after the one before: past such a step a time may be damaged (and the frame dropped) or a
        joined part start, where skipping stops."""
        i = bisect.bisect_left(self.times, to_s)
        if i == len(self.times):
            return False
        j = bisect.bisect_left(self.times, from_s)
        if self.times[j] - from_s > CLOCK_JUMP_S:
            return False
        k = bisect.bisect_right(self.steps, j)
        return k == len(self.steps) or self.steps[k] > i


class DisposableFrameGate:
    """Passes video packets on to the decoder, holding each until the next IDR, and drops the skippable ones.

    Args:
        nal_length_size: from :func:`h264_nal_length_size`.
        packet_time_s: presentation time of a packet relative to the video's origin (None: unknown).
        needed_between: whether any sampling target lies in ``[lo_s, hi_s]``.
        keep_from_s: frames at or after this time are always decoded (the tail, sampled exactly).
    """

    def __init__(self, nal_length_size: int | None, packet_time_s: Callable[[av.Packet], float | None],
                 needed_between: Callable[[float, float], bool], keep_from_s: float,
                 packet_end_s: Callable[[av.Packet], float | None] = lambda p: None, may_reorder: bool = True,
                 parameter_sets: Sequence[bytes] = (),
                 decode_time_s: Callable[[av.Packet], float | None] | None = None,
                 segment_s: float | None = None) -> None:
        self.nal_length_size = nal_length_size
        self.decode_time_s = decode_time_s  # given where parts may be joined: a clock restart turns skipping off
        self.packet_time_s = packet_time_s
        self.packet_end_s = packet_end_s
        self.may_reorder = may_reorder  # the SPS allows B-frame reordering
        # The SPS/PPS the decoder holds (from the extradata, then from the stream), by kind and id: an
        # IDR access unit that repeats them unchanged (MPEG-TS sends them with every IDR) may be skipped.
        self.parameter_sets: dict[tuple[int, int], bytes] = {}
        for unit in parameter_sets:
            self._hold_parameter_set(unit)
        self.needed_between = needed_between
        self.keep_from_s = keep_from_s
        # Set by the decoder where the end is unknown (none in the header, frames ran on past it, or a joined part):
        # frames at or after keep_from_s are then skipped where later frames prove that every segment they may be
        # shown in is full-length (not the last).
        self.end_unknown = False
        self.segment_s = segment_s
        # With the end unknown, whole GOPs (each with the time of the IDR after it) wait here until a frame at or after
        # the end of the segment their last frame is shown in has come (see _not_last), within the queue's limits.
        self.waiting: deque[tuple[list[tuple[av.Packet, float | None, str]], float | None, int]] = deque()  # +bytes
        self.waiting_packets = 0
        self.waiting_bytes = 0
        self.newest_s = -math.inf  # the latest packet time seen
        self.queue: deque[tuple[av.Packet, float | None, str]] = deque()
        self.queued_bytes = 0
        self.released: deque[float] = deque(maxlen=2 * LOOKAHEAD_PACKETS)  # times of packets passed on
        # Nothing is skipped until the decoder has put out its first frame: that frame stands in for
        # every target before it, and which one it is depends on what FFmpeg drops at the start (a
        # stream cut mid-GOP shows nothing before its first IDR).
        self.started = False
        # Skipping stops for good where the stream turns out unsafe: an in-band SPS that
        # h264_sps.frames_skippable refuses, packet times that are not presentation times, or a jump back.
        self.off = False
        self.latest_dts = -math.inf  # the latest decode time seen (with decode_time_s)
        self.skipped = 0
        self.skipped_last_s = -math.inf  # the time of the skipped frame shown last
        self.skipped_end_s = -math.inf  # and its end (pts + duration)
        # times of the latest skipped frames: in MPEG-TS/PS the decoder tells a gap they leave from a jump of the clock.
        # Enough for all the gate may skip at once (what it holds) and in the next two pushes, before the decoder puts
        # out the frame after such a gap
        self.skipped_times: deque[float] = deque(maxlen=3 * (MAX_WAITING_PACKETS + MAX_GOP_PACKETS))

    def push(self, packet: av.Packet) -> list[av.Packet]:
        """Take the next video packet (decode order); return the packets to decode now, in order."""
        if packet.size == 0:  # end of stream: decode everything held, then the flush packet
            return self.flush() + [packet]
        t = self.packet_time_s(packet)
        dts = self.decode_time_s(packet) if self.decode_time_s is not None else None
        if dts is not None and math.isfinite(dts):
            if math.isfinite(self.latest_dts) and not (
                    self.latest_dts - JUMP_BACK_S <= dts <= self.latest_dts + CLOCK_JUMP_S):
                self.off = True  # what is held passes whole: its frames' times are of the part before
            self.latest_dts = max(self.latest_dts, dts)
        data = bytes(packet)
        kind = h264_access_unit_kind(data, self.nal_length_size)
        if kind in (OTHER, IDR_KEPT):
            kind = self._take_parameter_sets(data, kind)
        if self.off or not self.started:  # until the decoder's first frame, everything passes at once
            if t is not None:
                self.released.append(t)
            return self._take_waiting() + self._take_queue() + [packet]
        if t is not None and math.isfinite(t):
            self.newest_s = max(self.newest_s, t)
        out: list[av.Packet] = []
        if kind in (IDR, IDR_KEPT) and self.queue:
            if self.end_unknown:
                self.waiting.append((list(self.queue), t, self.queued_bytes))
                self.waiting_packets += len(self.queue)
                self.waiting_bytes += self.queued_bytes
                self._take_queue()
                out = self._release_waiting()
            else:
                out = self._release_gop(t)
        self.queue.append((packet, t, kind))
        self.queued_bytes += packet.size
        if self.waiting and self._over_bounds():
            out += self._release_waiting()  # the oldest, until what is held is within the limits again
        while len(self.queue) > MAX_GOP_PACKETS or (self.queued_bytes > MAX_GOP_BYTES and len(self.queue) > 1):
            out += self._release_waiting(force=True) + self._release_oldest()
        return out

    def _release_waiting(self, *, force: bool = False) -> list[av.Packet]:
        """The waiting GOPs (oldest first) that later frames have decided, or that the limits push out (all of them
        with ``force``; over the limits, down to _DRAIN_TO of them): skip what no target needs.  The frames at hand
        are gathered once a call: a pass over all that waits for each GOP made GOPs of one frame (all-intra) decode
        slower than with nothing skipped, and draining below the limits spares a call at every packet."""
        out: list[av.Packet] = []
        drain = self._over_bounds()
        shown: _Shown | None = None
        while self.waiting:
            entries, idr_t, size = self.waiting[0]
            if not (force or self.off or (drain and self._over_bounds(_DRAIN_TO)) or self._decided(entries, idr_t)):
                break
            self.waiting.popleft()
            self.waiting_packets -= len(entries)
            self.waiting_bytes -= size
            if self.off:
                out += [p for p, _, _ in entries]
                continue
            if shown is None:  # every frame waiting (this GOP's too), being read, or just released
                held = [u for gop, i, _ in self.waiting for u in [*(v for _, v, _ in gop), i]]
                held += [u for _, u, _ in itertools.chain(entries, self.queue)] + [idr_t, *self.released]
                shown = _Shown({u for u in held if u is not None and math.isfinite(u)})
            out += self._decide_gop(entries, idr_t, shown)
        return out

    def _decided(self, entries: list[tuple[av.Packet, float | None, str]], idr_t: float | None) -> bool:
        """Whether a frame has come at or after the end of the segment the GOP's last frame may be shown in."""
        times = [u for _, u, _ in entries if u is not None and math.isfinite(u)]
        if idr_t is not None and math.isfinite(idr_t):
            times.append(idr_t)
        if not times or not self.segment_s:
            return True
        return self.newest_s >= self._segment_end(max(times), self.segment_s)

    def _over_bounds(self, share: float = 1.0) -> bool:
        """Whether the waiting GOPs and the GOP being read hold more than ``share`` of MAX_WAITING_PACKETS or of
        MAX_GOP_BYTES."""
        return (self.waiting_packets + len(self.queue) > share * MAX_WAITING_PACKETS
                or self.waiting_bytes + self.queued_bytes > share * MAX_GOP_BYTES)

    @staticmethod
    def _segment_end(t: float, segment_s: float) -> float:
        """The end of the segment a frame shown until ``t`` may be shown in last."""
        return (math.floor((t + _MARGIN_S) / segment_s) + 1) * segment_s

    def _take_waiting(self) -> list[av.Packet]:
        """Every waiting GOP's packets, in order, for the decoder (nothing skipped)."""
        out = [p for entries, _, _ in self.waiting for p, _, _ in entries]
        self.waiting.clear()
        self.waiting_packets = self.waiting_bytes = 0
        return out

    def _hold_parameter_set(self, unit: bytes) -> bool:
        """Record an SPS/PPS the decoder receives; whether the decoder held it already, unchanged."""
        key = h264_sps.parameter_set_key(unit)
        if key is None:
            return False
        same = self.parameter_sets.get(key) == unit
        self.parameter_sets[key] = unit
        return same

    def _take_parameter_sets(self, data: bytes, kind: str) -> str:
        """Record the SPS/PPS an access unit carries; stop skipping for good at an SPS under which it is
        not safe (see h264_sps).  Returns ``IDR`` for an ``IDR_KEPT`` unit whose only extra units are
        SPS/PPS the decoder already holds unchanged (skipping it changes nothing the decoder knows)."""
        extra = [u for u in _nal_units(data, self.nal_length_size) if u and u[0] & 0x1F not in _SKIPPABLE_NAL_TYPES]
        if h264_sps.skippable_sps([u for u in extra if u[0] & 0x1F == 7]) is None:
            self.off = True
        # evaluated for every unit, so that the decoder's parameter sets are always up to date
        unchanged = [u[0] & 0x1F in (7, 8) and self._hold_parameter_set(u) for u in extra]
        return IDR if kind == IDR_KEPT and extra and all(unchanged) else kind

    def _take_queue(self) -> list[av.Packet]:
        """Everything held, in order, for the decoder; the queue is then empty."""
        out = [p for p, _, _ in self.queue]
        self.queue.clear()
        self.queued_bytes = 0
        return out

    def _in_decode_order(self, entries: Sequence[tuple[av.Packet, float | None, str]], idr_t: float | None) -> bool:
        """Whether a held GOP's times look like decode-order times (an MP4 without composition
        offsets, a remuxed AVI): B-frames shown in the order they are decoded, where the SPS allows
        reordering.  Low-delay B-frames look the same; skipping then merely stops."""
        if not any(kind == DISPOSABLE for _, _, kind in entries):
            return False
        times = [t for _, t, _ in entries] + ([idr_t] if idr_t is not None else [])
        known = [t for t in times if t is not None]
        return len(known) == len(times) and all(a < b for a, b in itertools.pairwise(known))

    def flush(self) -> list[av.Packet]:
        """The stream has ended: what is held is the last GOP (the frames near the end are always kept)."""
        return self._release_waiting(force=True) + self._release_gop(None)

    def _needed(self, t: float | None, later_s: float | None, shown: _Shown | None = None) -> bool:
        """Whether a target may fall while the frame at ``t`` is shown (until ``later_s``); ``shown``: the times of
        the frames at hand (see :meth:`_not_last`)."""
        if t is None or not math.isfinite(t) or later_s is None:
            return True
        if t >= self.keep_from_s and not self._not_last(later_s, shown):
            return True
        return self.needed_between(t - _MARGIN_S, later_s + _MARGIN_S)

    def _not_last(self, later_s: float, shown: _Shown | None) -> bool:
        """With the end unknown: whether a frame at or after the end of the segment holding ``later_s`` proves that
        segment, and every one before it, full-length, so that their targets are the usual ones (a short last
        segment's depend on the true end)."""
        if not self.end_unknown or not self.segment_s or shown is None:
            return False
        return shown.reaches(later_s, self._segment_end(later_s, self.segment_s))

    def _release_gop(self, idr_t: float | None) -> list[av.Packet]:
        """The queue holds one GOP's packets (or its tail) and the next IDR (at ``idr_t``) or the end of
        the stream has come: skip what no target needs."""
        out = self._decide_gop(list(self.queue), idr_t)
        self._take_queue()
        return out

    def _decide_gop(self, entries: list[tuple[av.Packet, float | None, str]], idr_t: float | None,
                    shown: _Shown | None = None) -> list[av.Packet]:
        """What of one GOP's packets (or its tail; the next IDR at ``idr_t``) the decoder needs; ``shown``: the frames
        at hand, the GOP's, the next IDR's and those after it (with the end unknown, see _not_last)."""
        if self.may_reorder and self._in_decode_order(entries, idr_t):
            self.off = True
            return [p for p, _, _ in entries]
        known = [u for _, u, _ in entries if u is not None and math.isfinite(u)] + list(self.released)
        if idr_t is not None and math.isfinite(idr_t):
            known.append(idr_t)
        times = sorted(set(known))
        if shown is None and self.end_unknown:
            shown = _Shown(times)

        def later(t: float | None) -> float | None:
            if t is None or not math.isfinite(t):
                return None
            i = bisect.bisect_right(times, t)
            return times[i] if i < len(times) else None

        # An OTHER access unit (parameter sets, perhaps with a slice) always reaches the decoder; counting
        # it as needed also keeps the references of any slice it carries intact.
        needed = [kind in (OTHER, IDR_KEPT) or self._needed(t, later(t), shown) for _, t, kind in entries]
        last_needed = max((i for i, n in enumerate(needed) if n), default=-1)
        out = []
        for i, (packet, t, kind) in enumerate(entries):
            if not needed[i] and (kind == DISPOSABLE or i > last_needed):
                self._skip(packet)
            else:
                out.append(packet)
            if t is not None:
                self.released.append(t)
        return out

    def _release_oldest(self) -> list[av.Packet]:
        """The GOP is too long to hold whole: pass its oldest packet on, skipping it only if disposable."""
        packet, t, kind = self.queue.popleft()
        self.queued_bytes -= packet.size
        skip = False
        if kind == DISPOSABLE and t is not None:
            # B-frame reordering is at most 16 deep: the next shown frame is among these
            ahead = (u for _, u, _ in itertools.islice(self.queue, LOOKAHEAD_PACKETS))
            later = sorted(u for u in itertools.chain(self.released, ahead) if u is not None and u > t)
            shown = _Shown(later) if self.end_unknown else None
            skip = not self._needed(t, later[0] if later else None, shown)
        if t is not None:
            self.released.append(t)
        if skip:
            self._skip(packet)
            return []
        return [packet]

    def _skip(self, packet: av.Packet) -> None:
        self.skipped += 1
        t = self.packet_time_s(packet)
        if t is not None and math.isfinite(t):
            self.skipped_times.append(t)
        end = self.packet_end_s(packet)
        if t is not None and end is not None and t >= self.skipped_last_s:
            # the end of the frame shown last: not the furthest end, as a frame's duration in MP4 is its step in
            # decode order (see _VideoRun._show)
            self.skipped_last_s, self.skipped_end_s = t, end
