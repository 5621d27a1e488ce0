"""Decode a video once, in order, into chunks of fixed-length segments (RGB frames + mono audio).

One pass demuxes the video and one audio stream together (the first of the video's program that FFmpeg can
decode).  Frames are sampled by
presentation time (so variable frame rate is right) and only the sampled ones are converted to RGB,
by FFmpeg's scaler.  Audio is resampled to mono ``audio_rate_hz`` and laid on the same timeline.
Segments are grouped into :class:`~pipeline.media.Chunk` s as soon as a chunk's right context has
been decoded, so memory is bounded by the chunk size, not the video length.

Conventions:

- t = 0 is the video stream's first presentation time (``stream.start_time``; in AVI, where the
  stream has none, and where FFmpeg's probe saw none of its frames, the first decoded frame's); audio
  before it is dropped.
- duration = end of the last video frame (pts + duration, or 1 / average fps) minus the origin, or
  the end of the audio where it runs on more than 1 s past that (the last frame stays on screen, as
  players show it: a still image over a song).
  ``n_segments = ceil(duration / segment_seconds)``, except that a remainder under 1 ms does not
  make a segment; the last segment keeps its true (possibly shorter) end.
- Frame ``k`` of segment ``[a, b)`` is the frame shown at ``a + (k + 0.5) * (b - a) / K``: the last
  frame whose pts <= that time (the first frame if the time precedes it).
- Rotation: ``VideoInfo.rotation_deg`` is FFmpeg's display-matrix angle (counter-clockwise degrees,
  as ``av.VideoFrame.rotation`` and ffprobe report it, e.g. -90 for a typical portrait phone video),
  rounded to a multiple of 90.  Output frames are turned by it, upright as a player shows them;
  a matrix that also mirrors is applied as FFmpeg's players apply it (see ``_orientation``).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, BinaryIO

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline import h264_sps, truncation
from pipeline.errors import ConfigError, MediaError
from pipeline.frame_skip import DisposableFrameGate, h264_nal_length_size
from pipeline.media import NO_AUDIO_DECODER, Chunk, ChunkingSpec, SamplingSpec, VideoInfo

log = logging.getLogger(__name__)

SEGMENT_TOLERANCE_S = 1e-3  # a remainder shorter than this after the last full segment is dropped
_TIE_S = 1e-6  # a frame starting within 1 µs after a target time counts as shown at it (float noise)
# Corrupt packets (FFmpeg conceals each) that fail a video: more than MAX_BAD_PACKETS and more than
# MAX_BAD_FRACTION of the packets decoded, counted at its end (a broadcast capture with 0.1 % of its MPEG-TS
# packets lost had 14 corrupt in a minute, 0.35 %: more than 10 failed it); and at once where more than half
# of a track's last BAD_RUN_PACKETS are (the file is damaged from there on: reading on labels nothing, while
# the other track's data waits for frames that do not come).
MAX_BAD_PACKETS = 10
MAX_BAD_FRACTION = 0.01
BAD_RUN_PACKETS = 100

MAX_PLAUSIBLE_FPS = 1000  # an average frame rate above it is a demuxer's mistake (raw DV: 60,000)

# A frame that ends further than this (or than half the announced length) past the end the header
# announces has a damaged timestamp: a damaged MP4 index gave a 60-s video frames at 140,400 s, and the
# segments up to there, held in memory, took the machine's 21 GB.  It is dropped and counted as corrupt.
_PAST_END_S = 60.0
# Without an announced end, the most segments one gap between frames may fill (each holds its frames in
# memory until its chunk goes: ~150 KB at 224 px): more is a damaged timestamp, not a pause.
_MAX_GAP_SEGMENTS = 10_000
# How far decoded video may run ahead of the audio before the missing audio is taken as absent: a
# short audio track must not make the decoder hold the whole video, yet badly interleaved files
# (audio tens of seconds behind the video in file order) still come out right.  Costs at most this
# many seconds of extra sampled segments in memory.
_AUDIO_WAIT_S = 30.0
# Resampled audio frames are laid back to back unless their timestamp disagrees by more than this
# (container timestamps are often rounded to 1 ms; following them would leave 1-sample gaps).
_AUDIO_RESYNC_S = 0.010
# In MPEG-TS and MPEG-PS (files joined with `cat`: each part starts its clock again; FFmpeg's AVFMT_TS_DISCONT
# formats), video whose timestamps jump back by more than this (or ahead by more than _SMOOTH_STEP_S) goes on where
# it had got to: later parts follow the earlier ones, as after `ffmpeg -f concat` (see _VideoRun._joined).
# Elsewhere (and for smaller steps back, which are damage) a frame out of order is shown right after the previous one.
_DISCONT_BACK_S = 0.5
_DISCONT_FORMATS = frozenset({"mpegts", "mpeg"})
# Audio whose time went back waits this long (in its own samples) for the video to start a part too; past it the
# jump is taken for damage and the audio is placed by its times.
_AUDIO_HOLD_S = 10.0
# Audio whose time is this far past the end the header announces, what the video has reached and where the track's
# audio has got to is damaged (audio that runs on past the video's end, gaps in it included, goes on from there).
_AUDIO_FAR_AHEAD_S = 600.0
# Audio that runs on more than this past the video's last frame makes the video that long, its last frame on screen
# to the end, as players play it (a still image over a song: one frame and minutes of audio).  Less is the usual
# slack of muxed tracks (an AAC track's last frame, tens of ms), which makes no segment.
_AUDIO_RUNS_ON_S = 1.0
# Where it does, a remainder this short after the last whole segment is an audio codec's padding of its last frame
# (AAC's 1,024 samples: 23 ms at 44.1 kHz), not a segment.
_AUDIO_PADDING_S = 0.05
# MP4/MOV list every packet of a track in their index, and Matroska files from FFmpeg's or mkvmerge's muxers tag each
# track with its own end (DURATION): once all of the video's packets have been read, or the audio has run this far
# past the tagged end, the video decoder is drained (its last frames held in its threads come out) and segments past
# the last frame go out with the audio as it comes, rather than all of it waiting in memory for the file's end.
_RUN_ON_DRAIN_S = _AUDIO_WAIT_S
# A frame this close after the previous one continues the stream (FFmpeg's own discontinuity threshold, 10 s).
_SMOOTH_STEP_S = 10.0
# Segments this close to the end announced in the header convert every frame, so that a short
# last segment can be sampled exactly once its true end is known (see _FrameSampler).
_TAIL_MARGIN_S = 1.0
# Bytes of decoded frames (full size) a tail whose end is unknown holds unconverted (see _FrameSampler.lazy_tail):
# 90 frames of 720p, 40 of 1080p, 10 of 2160p
_LAZY_TAIL_BYTES = 128 << 20

# av.open raises these for bytes that are not a (supported) media file.  UnicodeDecodeError:
# PyAV decodes container metadata as UTF-8, and a damaged header can hold any bytes.
_INVALID_DATA_ERRORS: tuple[type[BaseException], ...] = (
    av.error.InvalidDataError,
    UnicodeDecodeError,
    av.error.EOFError,
    av.error.PatchWelcomeError,
    av.error.DemuxerNotFoundError,
    av.error.UnknownError,
)


def count_segments(duration_s: float, segment_seconds: float) -> int:
    """Number of segments of a video of ``duration_s`` (a remainder under 1 ms makes none)."""
    if duration_s <= 0:
        return 0
    return max(1, math.ceil((duration_s - SEGMENT_TOLERANCE_S) / segment_seconds))


class VideoDecoder:
    """Turns one video into :class:`Chunk` s of sampled frames and audio.

    Construction only stores settings (cheap, picklable); each :meth:`chunks` call opens and decodes
    one video.

    Args:
        threads: FFmpeg frame-threading threads for the video decoder; 0 lets FFmpeg choose.
        skip_unsampled: do not decode H.264 frames that are disposable (no other frame references
            them) and shown at no sampling target; the output is identical, decoding is faster.
        hwaccel: ``"cuda"`` decodes on the GPU (NVDEC) through PyAV's HWAccel, falling back to
            software decoding where the codec or machine does not allow it; sampling is the same.
    """

    def __init__(self, sampling: SamplingSpec, chunking: ChunkingSpec, *, threads: int = 0,
                 skip_unsampled: bool = True, hwaccel: str | None = None) -> None:
        if threads < 0:
            raise ConfigError(f"decoder threads must be >= 0 (0 = FFmpeg's choice), got {threads}")
        if hwaccel not in (None, "cuda"):
            raise ConfigError(f"unknown decode device {hwaccel!r}; choose cpu or cuda")
        self.hwaccel = hwaccel
        self.sampling = sampling
        self.chunking = chunking
        self.threads = threads
        self.skip_unsampled = skip_unsampled

    def __repr__(self) -> str:
        return (f"VideoDecoder({self.sampling}, {self.chunking}, threads={self.threads}, "
                f"skip_unsampled={self.skip_unsampled})")

    def chunks(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        uri: str | None = None,
        video_id: str = "",
        size_bytes: int | None = None,
    ) -> Generator[Chunk, None, None]:
        """Decode ``source`` (a local path or a binary file object) and yield its chunks in order.

        The last chunk has ``is_last=True`` and ``info``.  Raises :class:`MediaError` for a file
        that cannot be decoded; a failure after some chunks were yielded also raises (the caller
        discards that video's chunks).  The container is closed even if iteration stops early.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            uri = uri if uri is not None else str(path)
            if size_bytes is None:
                try:
                    size_bytes = os.path.getsize(path)
                except OSError:
                    size_bytes = None  # av.open below reports the real problem
            _refuse_cut_file(path, uri)
            container = _open(path, uri, self.hwaccel)
        else:
            name = getattr(source, "name", None)
            uri = uri if uri is not None else (name if isinstance(name, str) else "<file object>")
            if getattr(source, "seekable", lambda: False)():
                _refuse_cut_file(source, uri)
            container = _open(source, uri, self.hwaccel)
        with container:
            run = _VideoRun(self, container, uri, video_id, size_bytes)
            yield from run.chunks()


def _refuse_cut_file(source: str | BinaryIO, uri: str) -> None:
    """A ``truncated`` failure for a file whose container claims more bytes than it has (see
    :mod:`pipeline.truncation`); a file object is left at its start."""
    def read_at(f: BinaryIO) -> truncation.ReadAt:
        def read(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        return read

    try:
        if isinstance(source, str):
            with open(source, "rb") as f:
                cut = truncation.cut_short(read_at(f), os.fstat(f.fileno()).st_size)
        else:
            try:
                cut = truncation.cut_short(read_at(source), source.seek(0, os.SEEK_END))
            finally:
                source.seek(0)
    except OSError:
        return  # opening the file reports what is wrong with it
    if cut is not None:
        raise MediaError(uri, "truncated", cut)


def _hwaccel(device: str | None) -> Any:
    """PyAV's HWAccel for ``device`` with software fallback, or None where this PyAV/FFmpeg has none."""
    if device is None:
        return None
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available

        if device not in hwdevices_available():
            log.warning("decode device %s is not available in this FFmpeg build; decoding in software", device)
            return None
        return HWAccel(device_type=device, allow_software_fallback=True)
    except (ImportError, ValueError, av.error.FFmpegError) as e:
        log.warning("cannot use decode device %s (%s); decoding in software", device, e)
        return None


def _open(source: str | BinaryIO, uri: str, hwaccel: str | None = None) -> av.container.InputContainer:
    """av.open with its failures turned into MediaError kinds a person can act on."""
    accel = _hwaccel(hwaccel)
    if accel is not None:
        try:
            return av.open(source, mode="r", hwaccel=accel)
        except (av.error.FFmpegError, OSError) as e:
            # No usable GPU decoder here (no device, no driver access): decode in software; a real
            # problem with the file shows again, with its proper error kind, in the plain open below.
            log.warning("%s: GPU decoding unavailable (%s); decoding in software", uri, _ffmpeg_message(e))
            if hasattr(source, "seek"):
                source.seek(0)
    try:
        return av.open(source, mode="r")
    except FileNotFoundError as e:
        raise MediaError(uri, "not_found", "no such file; check the path or URI") from e
    except IsADirectoryError as e:
        raise MediaError(uri, "unreadable", "this is a directory, not a video file") from e
    except PermissionError as e:
        raise MediaError(
            uri, "unreadable", "permission denied; give this user read access to the file"
        ) from e
    except _INVALID_DATA_ERRORS as e:
        _refuse_empty(source, uri, e)
        raise MediaError(
            uri,
            "invalid_data",
            f"not a readable media file (FFmpeg: {_ffmpeg_message(e)}); the file may be truncated, "
            "corrupt, or not a video at all",
        ) from e
    except OSError as e:  # other I/O failures (EIO, network file systems, ...)
        _refuse_empty(source, uri, e)
        raise MediaError(uri, "unreadable", f"could not read the file: {e}") from e
    except av.error.FFmpegError as e:
        # Broad on purpose, after the specific cases: whatever else libav reports while opening,
        # the bytes are not a video it can read, and a bad file must become a failure row.
        raise MediaError(uri, "invalid_data", f"FFmpeg cannot open this file: {_ffmpeg_message(e)}") from e


def _refuse_empty(source: str | BinaryIO, uri: str, error: BaseException) -> None:
    """An empty file is said to be one: FFmpeg says 'Invalid data' of a path, EINVAL of a file object (S3)."""
    try:
        if isinstance(source, str):
            empty = os.path.isfile(source) and os.path.getsize(source) == 0
        else:
            at = source.tell()
            empty = source.seek(0, os.SEEK_END) == 0
            source.seek(at)
    except (OSError, ValueError, AttributeError):
        return
    if empty:
        raise MediaError(uri, "invalid_data", "the file is empty (0 bytes); it may not have been written or copied "
                         "completely") from error


def _ffmpeg_message(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


# --- frame conversion -----------------------------------------------------------------------------

# How a decoded picture is turned upright: counter-clockwise quarter turns, after a horizontal mirror
# when the flag is set (the eight orientations a display matrix can give).
Orientation = tuple[int, bool]


class _Converter:
    """Turns a decoded frame into an upright image_size x image_size RGB picture.

    FFmpeg's scaler does colour conversion and an aspect-preserving resize in one pass (short side
    = image_size, honouring the sample aspect ratio); the centre crop, the mirror and the quarter turns
    are numpy slicing.
    """

    def __init__(self, image_size: int, sample_aspect: Fraction, orientation: Orientation) -> None:
        self.image_size = image_size
        self.sample_aspect = sample_aspect
        self.orientation = orientation
        self.n_converted = 0
        # One scaler for the whole video: ``frame.reformat`` sets up a new one (filter coefficients,
        # threads) for every frame, which costs about as much as the scaling itself (720p -> 224:
        # 1.1 ms a frame, 0.6 ms with the scaler kept).  It rebuilds itself when the frames' size or
        # format changes, and its pictures are bit-identical to frame.reformat's.
        self.reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        size = self.image_size
        disp_w = frame.width * float(self.sample_aspect)
        disp_h = float(frame.height)
        scale = size / min(disp_w, disp_h)
        out_w = max(size, int(round(disp_w * scale)))
        out_h = max(size, int(round(disp_h * scale)))
        rgb = self.reformatter.reformat(frame, width=out_w, height=out_h, format="rgb24").to_ndarray()
        top, left = (out_h - size) // 2, (out_w - size) // 2
        crop = rgb[top : top + size, left : left + size]
        turns, mirror = self.orientation
        if mirror:
            crop = crop[:, ::-1]
        if turns:
            crop = np.rot90(crop, turns)  # counter-clockwise, the display matrix's direction
        self.n_converted += 1
        return np.ascontiguousarray(crop)


# --- per-segment storage ----------------------------------------------------------------------------


@dataclass
class _SegmentSlots:
    frames: np.ndarray  # uint8 [K, H, W, 3]
    pts_s: np.ndarray  # float64 [K]


class _SegmentStore:
    """Sampled frames of the segments that are still needed (bounded by the chunk size)."""

    def __init__(self, frames_per_segment: int, image_size: int) -> None:
        self.k = frames_per_segment
        self.image_size = image_size
        self.slots: dict[int, _SegmentSlots] = {}
        self.max_retained = 0  # for tests and diagnostics: the most segments held at once

    def put(self, segment: int, k: int, rgb: np.ndarray, pts_s: float) -> None:
        slots = self.slots.get(segment)
        if slots is None:
            size = self.image_size
            slots = _SegmentSlots(
                np.zeros((self.k, size, size, 3), dtype=np.uint8), np.full(self.k, np.nan, dtype=np.float64)
            )
            self.slots[segment] = slots
            self.max_retained = max(self.max_retained, len(self.slots))
        slots.frames[k] = rgb
        slots.pts_s[k] = pts_s

    def drop_before(self, segment: int) -> None:
        for i in [i for i in self.slots if i < segment]:
            del self.slots[i]


# --- frame sampling ---------------------------------------------------------------------------------


@dataclass
class _Shown:
    """A decoded frame and, once needed, its converted picture."""

    t_s: float
    frame: av.VideoFrame | None
    rgb: np.ndarray | None = None

    def picture(self, convert: _Converter) -> np.ndarray:
        if self.rgb is None:
            assert self.frame is not None  # frame is only released after conversion
            self.rgb = convert(self.frame)
            self.frame = None  # release the decoder's buffer
        return self.rgb


def _frame_bytes(frame: av.VideoFrame) -> int:
    return sum(plane.buffer_size for plane in frame.planes)


@dataclass
class _FrameSampler:
    """Picks, for every segment, the frames shown at its target times, converting only those.

    Targets are first assumed to be those of full-length segments, which is right for every
    segment but a short last one, whose targets depend on the video's true end (known only at
    EOF).  Frames at or after ``tail_start_s`` (a little before the end the header announces) are
    therefore all converted and kept while their segment is open, so the short last segment is
    sampled exactly.  If the header's end was wrong, the last segment is sampled from the frames
    at hand (the closest earlier one) and a debug message says so; ``frame_pts_s`` always records
    the frame actually used.

    Where the end is unknown (``lazy_tail``: no end in the header, or frames ran on past it), the tail holds the
    open segment's frames unconverted and converts only those a target takes (up to _LAZY_TAIL_BYTES of them held:
    the decoder's buffers), as it would otherwise convert every frame to the end of the file.
    """

    segment_s: float
    k: int
    convert: _Converter
    store: _SegmentStore
    tail_start_s: float
    next_target: int = 0  # global index segment * k + slot of the first unresolved target
    prev: _Shown | None = None
    tail: list[_Shown] = field(default_factory=list)
    tail_active: bool = False
    tail_has_first: bool = False  # the tail starts at the video's first frame
    lazy_tail: bool = False
    tail_bytes: int = 0  # of the tail's frames added unconverted (at least those still unconverted)

    def _target_s(self, g: int) -> float:
        segment, slot = divmod(g, self.k)
        return segment * self.segment_s + (slot + 0.5) * self.segment_s / self.k

    def push(self, t_s: float, frame: av.VideoFrame) -> None:
        """Take the next frame in presentation order."""
        new = _Shown(t_s, frame)
        # Targets before this frame are showing the previous frame (or this one, the first).
        while self._target_s(self.next_target) < t_s - _TIE_S:
            shown = self.prev if self.prev is not None else new
            segment, slot = divmod(self.next_target, self.k)
            self.store.put(segment, slot, shown.picture(self.convert), shown.t_s)
            self.next_target += 1
        if not self.tail_active and t_s >= self.tail_start_s:
            self.tail_active = True
            if self.prev is not None:
                self.prev.picture(self.convert)
                self.tail.append(self.prev)  # shown at the start of the first tail segment
        if self.tail_active:
            if self.prev is None:
                self.tail_has_first = True
            self.tail.append(new)
            self._prune_tail(t_s)
            if not self.lazy_tail:
                new.picture(self.convert)
            else:
                self.tail_bytes += _frame_bytes(frame)
                if self.tail_bytes > _LAZY_TAIL_BYTES:  # count again what is still unconverted (targets took some)
                    self.tail_bytes = sum(_frame_bytes(shown.frame) for shown in self.tail if shown.frame is not None)
                if self.tail_bytes > _LAZY_TAIL_BYTES:
                    for shown in self.tail:  # a long open segment: its frames as pictures (150 KB each at 224 px)
                        shown.picture(self.convert)
                    self.tail_bytes = 0
        self.prev = new

    def _prune_tail(self, t_s: float) -> None:
        # Segments before the one holding the newest frame are full-length: their (eager) picks
        # are final.  Keep only the frame shown at the open segment's start and those after it (the tail's
        # times never go back: see _VideoRun._show).
        open_start_s = math.floor(t_s / self.segment_s) * self.segment_s
        keep_from = 0
        while keep_from + 1 < len(self.tail) and self.tail[keep_from + 1].t_s <= open_start_s + _TIE_S:
            keep_from += 1
        if keep_from:
            self.tail_bytes -= sum(_frame_bytes(shown.frame) for shown in self.tail[:keep_from]
                                   if shown.frame is not None)
            del self.tail[:keep_from]

    def hold(self, until: int) -> None:
        """The targets of the segments before ``until`` show the last frame (the video has no more)."""
        while self.prev is not None and self.next_target < until * self.k:
            segment, slot = divmod(self.next_target, self.k)
            self.store.put(segment, slot, self.prev.picture(self.convert), self.prev.t_s)
            self.next_target += 1

    def finish(self, n_segments: int, duration_s: float, until: int) -> None:
        """Resolve what is left of the segments before ``until`` once the video's true end is known.

        Called for each chunk built after the end, so that segments past the last frame (audio that runs on) are
        held a chunk at a time, not all at once."""
        if self.prev is None:
            return
        last = n_segments - 1
        last_end_s = min(n_segments * self.segment_s, duration_s)
        short_last = last_end_s < n_segments * self.segment_s - _TIE_S
        self.hold(min(last if short_last else n_segments, until))  # targets after the last frame show it
        if short_last and until >= n_segments and self.next_target < n_segments * self.k:
            self._sample_short_last(last, last_end_s)
            self.next_target = n_segments * self.k
        for i in [i for i in self.store.slots if i >= n_segments]:
            del self.store.slots[i]

    def _sample_short_last(self, segment: int, end_s: float) -> None:
        start_s = segment * self.segment_s
        targets = [start_s + (slot + 0.5) * (end_s - start_s) / self.k for slot in range(self.k)]
        candidates = list(self.tail)
        exact = bool(candidates) and (self.tail_has_first or candidates[0].t_s <= start_s + _TIE_S)
        if self.prev is not None and self.prev.t_s <= start_s + _TIE_S:  # after the last frame (audio runs on)
            candidates, exact = [self.prev], True
        if not exact:
            log.debug(
                "video ended before the end its header announced; sampling the short last segment "
                "from the frames at hand"
            )
            kept = self.store.slots.get(segment)
            candidates = [_Shown(self.prev.t_s, None, self.prev.picture(self.convert))] if self.prev else []
            if kept is not None:
                candidates += [
                    _Shown(float(kept.pts_s[slot]), None, kept.frames[slot].copy())
                    for slot in range(self.k)
                    if not math.isnan(kept.pts_s[slot])
                ]
            candidates.sort(key=lambda s: s.t_s)
        times = np.array([s.t_s for s in candidates])
        for slot, target_s in enumerate(targets):
            idx = max(0, int(np.searchsorted(times, target_s + _TIE_S, side="right")) - 1)
            shown = candidates[idx]
            self.store.put(segment, slot, shown.picture(self.convert), shown.t_s)


# --- audio timeline ---------------------------------------------------------------------------------


class _AudioTimeline:
    """Mono samples placed by timestamp on the video's timeline, kept only while still needed."""

    def __init__(self, rate_hz: int) -> None:
        self.rate_hz = rate_hz
        self.resync_samples = _AUDIO_RESYNC_S * rate_hz
        self.base = 0  # timeline sample index of buf[0]
        self.buf = np.zeros(0, dtype=np.float32)
        self.written = np.zeros(0, dtype=bool)
        self.cursor: int | None = None  # where the next frame goes if its timestamp agrees
        self.frontier = 0  # end of the furthest sample written
        self.n_late = 0  # samples that arrived for segments already emitted (dropped)

    @property
    def frontier_s(self) -> float:
        return self.frontier / self.rate_hz

    def place(self, start_s: float | None, samples: np.ndarray) -> None:
        """Lay ``samples`` from ``start_s`` (seconds from the origin; None: right after the last frame)."""
        # Called for every resampled audio frame (tens of thousands per film): kept lean.
        cursor = self.cursor
        if start_s is None:
            start = cursor if cursor is not None else 0
        else:
            by_ts = int(round(start_s * self.rate_hz))
            near = cursor is not None and abs(by_ts - cursor) <= self.resync_samples
            start = cursor if near and cursor is not None else by_ts
        end = start + len(samples)
        self.cursor = end
        lo = start if start > 0 else 0  # samples before t = 0 are dropped
        base = self.base
        if lo < base:  # these segments were already emitted
            self.n_late += max(0, min(end, base) - lo)
            lo = base
        if lo >= end:
            return
        if end - base > len(self.buf):
            self._ensure(end)
        self.buf[lo - base : end - base] = samples[lo - start :] if lo > start else samples
        self.written[lo - base : end - base] = True
        if end > self.frontier:
            self.frontier = end

    def _ensure(self, end: int) -> None:
        need = end - self.base
        if need > len(self.buf):
            cap = max(need, 2 * len(self.buf), 4096)
            buf = np.zeros(cap, dtype=np.float32)
            written = np.zeros(cap, dtype=bool)
            buf[: len(self.buf)] = self.buf
            written[: len(self.written)] = self.written
            self.buf, self.written = buf, written

    def window(self, lo: int, hi: int, out: np.ndarray) -> int:
        """Copy samples [lo, hi) into ``out`` (zero elsewhere); return how many were real samples."""
        a, b = max(lo, self.base), min(hi, self.base + len(self.buf))
        if b <= a:
            return 0
        out[a - lo : b - lo] = self.buf[a - self.base : b - self.base]
        return int(self.written[a - self.base : b - self.base].sum())

    def drop_before(self, sample: int) -> None:
        cut = min(sample - self.base, len(self.buf))
        if cut > 0:
            self.buf = self.buf[cut:].copy()
            self.written = self.written[cut:].copy()
            self.base += cut


def _mono_samples(frame: av.AudioFrame) -> np.ndarray:
    """The samples of a resampled (packed float, mono) audio frame, float32 [n].

    A view of the frame's buffer (it keeps the frame alive), as ``to_ndarray`` would give it but
    without its copies: the plane's buffer can be longer than the samples (padding), so exactly
    ``frame.samples`` values are read.  Any other layout goes through ``to_ndarray``.
    """
    if frame.format.name == "flt" and frame.layout.nb_channels == 1:
        planes = frame.planes
        if len(planes) == 1:
            return np.frombuffer(memoryview(planes[0]), dtype=np.float32, count=frame.samples)
    return frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)


# --- one video ----------------------------------------------------------------------------------------


class _GuessedPtsReorder:
    """Puts an AVI's guessed timestamps back on the frames they belong to.

    AVI stores no presentation times: FFmpeg guesses them from the decode order, and for H.264 with
    B-frames it can attach them to the wrong frames (pts 1, 2, 4, 3, 6, 5, ... on frames the decoder
    outputs in presentation order), which sampled a segment's frame one frame early.  The decoder's
    output order is right, and so is the set of timestamps: the k-th frame out gets the smallest
    timestamp not yet given, over a window of ``depth`` frames (more than a B-pyramid reorders).
    With timestamps already in order this changes nothing.
    """

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self.frames: deque[av.VideoFrame] = deque()
        self.pts: list[int] = []  # a heap of the held frames' timestamps

    def push(self, frame: av.VideoFrame) -> list[av.VideoFrame]:
        if frame.pts is None:  # no timestamp to move: keep the order
            return [*self.drain(), frame]
        self.frames.append(frame)
        heapq.heappush(self.pts, frame.pts)
        out = []
        while len(self.frames) > self.depth:
            out.append(self._next())
        return out

    def drain(self) -> list[av.VideoFrame]:
        return [self._next() for _ in range(len(self.frames))]

    def _next(self) -> av.VideoFrame:
        frame = self.frames.popleft()
        frame.pts = heapq.heappop(self.pts)
        return frame


def _rotation_quarter_turns(frame: av.VideoFrame) -> int:
    """The display matrix's angle (as ffprobe reports it) in counter-clockwise quarter turns."""
    try:
        rotation = frame.rotation
    except (AttributeError, ValueError):  # no display matrix, or a degenerate one
        return 0
    if not rotation or not math.isfinite(rotation):
        return 0
    # Only quarter turns are applied; other angles are rare and rounded to the nearest one.
    return int(round(rotation / 90)) % 4


def _display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    side_data = frame.side_data.get("DISPLAYMATRIX")
    if side_data is None:
        return None
    matrix = np.frombuffer(memoryview(side_data), dtype=np.int32).copy()  # type: ignore[arg-type]
    return matrix if matrix.size == 9 else None


def _orientation(frame: av.VideoFrame) -> Orientation:
    """How a player turns the decoded picture upright: (counter-clockwise quarter turns, mirror first).

    FFmpeg's players (``ffmpeg``'s and ``ffplay``'s autorotate) read the display matrix's angle and,
    for the matrices that also mirror, the signs of its entries: at 90 and 270 degrees a transpose
    instead of a turn, at 180 degrees a horizontal and/or a vertical flip, at 0 degrees a vertical
    flip.  This follows them, so a mirrored recording (a front camera) comes out as a player shows
    it, not turned upside down.  Other angles are rounded to quarter turns.
    """
    turns = _rotation_quarter_turns(frame)
    matrix = _display_matrix(frame)
    if matrix is None:
        return turns, False
    a, c, d = int(matrix[0]), int(matrix[3]), int(matrix[4])
    clockwise = (-turns) % 4  # the angle the players test, clockwise quarter turns
    if clockwise == 1:
        return (1, True) if c > 0 else (3, False)  # transpose "cclock_flip" (a transpose), else "clock"
    if clockwise == 3:
        return (3, True) if c < 0 else (1, False)  # transpose "clock_flip" (the anti-transpose), else "cclock"
    if clockwise == 2:
        hflip, vflip = a < 0, d < 0
        if hflip and vflip:
            return 2, False
        return (2, True) if vflip else (0, hflip)
    return (2, True) if d < 0 else (0, False)  # 0 degrees: "vflip" where the matrix flips vertically


def _quarter_turns_to_deg(turns: int) -> int:
    return {0: 0, 1: 90, 2: 180, 3: -90}[turns % 4]


def _duration_tag_s(metadata: dict[str, str]) -> float | None:
    """A Matroska track's ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``), in seconds; None when absent or unreadable.

    Matroska has no duration per track, only the file's (its longest track's); FFmpeg's and
    mkvmerge's muxers write the video track's own end as this tag (FFmpeg names it ``DURATION-eng``,
    with its language, where the tag has one, as mkvmerge's often do).  Without it, audio that
    outlasts the video would make the file's duration stand for the video's end.
    """
    text = next((value for key, value in metadata.items()
                 if key.upper() == "DURATION" or key.upper().startswith("DURATION-")), None)
    if not text:
        return None
    try:
        hours, minutes, seconds = text.strip().split(":")
        value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _codec_name(stream: av.stream.Stream) -> str:
    codec = stream.codec_context.codec
    return getattr(codec, "canonical_name", None) or codec.name


class _VideoRun:
    """State of decoding one open container."""

    def __init__(
        self,
        decoder: VideoDecoder,
        container: av.container.InputContainer,
        uri: str,
        video_id: str,
        size_bytes: int | None,
    ) -> None:
        self.sampling = decoder.sampling
        self.chunking = decoder.chunking
        self.threads = decoder.threads
        self.skip_unsampled = decoder.skip_unsampled
        self.frames_skipped = 0
        self.video_packets_left: int | None = None  # set in _setup
        self.video_tagged_end_s: float | None = None
        self.video_drained = False
        self.gate: DisposableFrameGate | None = None
        self.video_end_s: float = -math.inf
        self.container = container
        self.uri = uri
        self.video_id = video_id
        self.size_bytes = size_bytes

    # The generator is split into steps so that each stays readable.
    def chunks(self) -> Iterator[Chunk]:
        self._select_streams()
        self._setup()
        gate = self.gate = self._frame_gate()
        for packet in self._demux():
            if packet.stream is self.vstream:
                if self.video_drained:
                    if not packet.size:
                        continue  # the end-of-stream packet: drained already
                    self._undrain()
                    gate = self.gate = None
                if packet.size and self.video_packets_left is not None:
                    self.video_packets_left -= 1
                for p in gate.push(packet) if gate is not None else (packet,):
                    for frame in self._reordered(self._decode(p)):
                        self._on_video_frame(frame)
                        # Checked per frame, not per packet, so no more than one segment past the
                        # chunk's right context is ever held.
                        if self._next_chunk_ready():
                            yield from self._ready_chunks()
            else:
                for aframe in self._decode(packet):
                    self._on_audio_frame(aframe)
                if self._video_over_and_audio_runs_on():
                    self._drain_video()
                if self._next_chunk_ready():
                    yield from self._ready_chunks()
        if gate is not None:
            held = gate.flush()  # normally empty: the stream's flush packet already drained it
            for p in held:
                for frame in self._decode(p):
                    self._on_video_frame(frame)
            if held:
                for frame in self.vstream.codec_context.decode(None):
                    self._on_video_frame(frame)
            self._take_gate_counts(gate)
        if self.reorder is not None:
            for frame in self.reorder.drain():
                self._on_video_frame(frame)
        self._flush_join_candidate()
        yield from self._finish()

    def _take_gate_counts(self, gate: DisposableFrameGate) -> None:
        """The frames ``gate`` skipped (it is done: the stream ended, or decoding goes on without it)."""
        self.frames_skipped += gate.skipped
        # a skipped frame may be the one shown last
        if gate.skipped_last_s > self.last_t_s:
            self.video_end_s = gate.skipped_end_s

    def _reordered(self, frames: list) -> list:
        if self.reorder is None:
            return frames
        return [out for frame in frames for out in self.reorder.push(frame)]

    def _frame_gate(self) -> DisposableFrameGate | None:
        """A gate that skips unsampled disposable frames, where that is provably safe (H.264, presentation times)."""
        if not self.skip_unsampled or self.vstream.codec_context.name != "h264" or self.origin_pts is None:
            return None
        if "avi" in self.container.format.name.split(","):
            return None  # AVI's packet times are in decode order, not presentation times
        extradata = self.vstream.codec_context.extradata
        extradata_bytes = bytes(extradata) if extradata else None
        sps = h264_sps.skippable_sps(h264_sps.sps_from_extradata(extradata_bytes))
        if not sps:
            return None  # reorder depth unknown, interlaced coding, or no SPS to read
        end_s = self._estimated_end_s()
        if end_s is not None and not math.isfinite(end_s):
            return None
        seg_s, k = self.sampling.segment_seconds, self.sampling.frames_per_segment
        tb_num, tb_den = self.tb_num, self.tb_den

        def packet_time_s(packet: av.Packet) -> float | None:
            pts = packet.pts
            if pts is None or self.origin_pts is None:
                return None
            return (pts - self.origin_pts) * tb_num / tb_den  # = float((pts - origin) * time_base)

        def packet_end_s(packet: av.Packet) -> float | None:
            t, duration = packet_time_s(packet), packet.duration
            if t is None or not duration:
                return None
            return t + duration * tb_num / tb_den  # as _on_video_frame adds a frame's time and duration

        def needed_between(lo_s: float, hi_s: float) -> bool:
            for segment in range(max(0, math.floor(lo_s / seg_s)), math.floor(hi_s / seg_s) + 1):
                for slot in range(k):
                    if lo_s <= segment * seg_s + (slot + 0.5) * seg_s / k <= hi_s:
                        return True
            return False

        def decode_time_s(packet: av.Packet) -> float | None:
            return None if packet.dts is None else packet.dts * tb_num / tb_den

        # Frames near the end are all decoded: the short last segment's targets depend on the true end.  Without an
        # end in the header, any frame may be near it: later frames must prove it is not (_end_unknown, called at the
        # first frame, before which the gate passes everything, says so to the gate)
        keep_from_s = end_s - 2 * seg_s - _TAIL_MARGIN_S - 1.0 if end_s is not None else -math.inf
        may_reorder = any(info.may_reorder for info in sps)
        return DisposableFrameGate(h264_nal_length_size(extradata_bytes), packet_time_s, needed_between, keep_from_s,
                                   packet_end_s, may_reorder, h264_sps.parameter_sets_from_extradata(extradata_bytes),
                                   decode_time_s if self.joins_parts else None, seg_s)

    def _select_streams(self) -> None:
        video = [
            s
            for s in self.container.streams.video
            if not (s.disposition & av.stream.Disposition.attached_pic)
        ]
        if not video:
            if not self.container.streams:  # FFmpeg found no track at all: what an MP4 whose moov box is damaged gives
                demuxer = self.container.format.name.split(",")[0]  # "mov,mp4,m4a,3gp,3g2,mj2": its first name
                raise MediaError(self.uri, "invalid_data", f"the {demuxer} demuxer found no "
                                 "track at all in this file: it is damaged (an MP4's index, its moov box, unreadable) "
                                 "or not a video")
            what = "an audio-only file" if self.container.streams.audio else "a file without a video track"
            raise MediaError(self.uri, "no_video_stream", f"no video stream: this is {what}")
        # A stream whose codec this FFmpeg build has no decoder for (PyAV gives it no codec context):
        # broadcast formats such as AC-4 or MPEG-H audio, a codec FFmpeg does not know at all.
        decodable = [s for s in video if s.codec_context is not None]
        if not decodable:
            which = "its video track has" if len(video) == 1 else f"none of its {len(video)} video tracks has"
            raise MediaError(
                self.uri,
                "unsupported_codec",
                f"{which} a codec this FFmpeg build (PyAV {av.__version__}) cannot decode; convert the file "
                "(for example 'ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4') and run it again",
            )
        self.vstream: av.video.stream.VideoStream = decodable[0]
        self.astream: av.audio.stream.AudioStream | None = self._audio_stream()

    def _image_format(self) -> str:
        """The kind of image FFmpeg read the file as ("PNG" of its ``png_pipe`` demuxer, ... ``image2``: the
        codec's name); "" for a video format."""
        for name in self.container.format.name.split(","):
            if name.endswith("_pipe"):
                return name.removesuffix("_pipe").upper()
            if name == "image2":
                return _codec_name(self.vstream).upper()
            if name == "gif":  # an animated GIF is read as a video; one of a single frame is a picture
                return "GIF"
        return ""

    def _audio_stream(self) -> av.audio.stream.AudioStream | None:
        """The audio track to use: the first of the video's program (in a broadcast multiplex the file's first
        audio track can be another service's: a radio station's) that FFmpeg can decode."""
        tracks = self._same_program(self.container.streams.audio)
        audio = [s for s in tracks if s.codec_context is not None]
        if len(audio) < len(tracks):
            skipped = [str(s.index) for s in tracks if s.codec_context is None]
            log.warning("%s: audio stream %s has a codec this FFmpeg build cannot decode; %s", self.uri,
                        ", ".join(skipped), f"using stream {audio[0].index}" if audio else "labelled without audio")
        self.audio_undecodable = bool(tracks) and not audio
        return audio[0] if audio else None

    def _same_program(self, tracks: tuple[av.audio.stream.AudioStream, ...]) -> list[av.audio.stream.AudioStream]:
        """``tracks`` of the video's program: all of them in a file of one program or of none (PyAV does not list
        programs; ``av_find_best_stream`` keeps to the program of the stream it is given, and finds no video for a
        radio service's audio)."""
        best = self.container.streams.best
        mine = best("video", related=self.vstream)
        if mine is None or not tracks:
            return list(tracks)
        return [s for s in tracks if (v := best("video", related=s)) is not None and v.index == mine.index]

    def _setup(self) -> None:
        s = self.sampling
        vcc = self.vstream.codec_context
        vcc.thread_type = "AUTO"  # frame + slice threading: decoding is the pipeline's ceiling
        vcc.thread_count = self.threads
        tb = self.vstream.time_base
        self.time_base = Fraction(tb) if tb else Fraction(1, 90_000)
        # Per-frame times are computed in integers: float(n * time_base) is n * num / den, the same
        # correctly rounded value, without building Fractions for every frame and packet.
        self.tb_num, self.tb_den = self.time_base.numerator, self.time_base.denominator
        # t = 0: the stream's start time, as players count; in AVI the first decoded frame's pts, since
        # AVI's start time is its first decode time, which B-frames put a frame or more before the first
        # picture (3 s of video came out 3.04 s long, with a last segment of one frame).
        # Where FFmpeg's probe saw no frame of the video (its size is unknown: in MPEG-TS, video that starts more
        # than the probe's ~7 s after the audio), its start time is the container's and its rate a guess equal to
        # the time base (90,000): t = 0 is then the first decoded frame's pts too, and the rate is left unknown
        # (each frame's length comes from the frames' own times; a 5 s video starting 8 s in made 14 segments).
        avi = "avi" in self.container.format.name.split(",")
        unprobed = not vcc.width
        self.origin_pts: int | None = None if avi or unprobed else self.vstream.start_time
        self.reorder = _GuessedPtsReorder() if avi else None
        # video packets still to come where the index says how many there are (MP4/MOV), or the video's end where
        # its track is tagged with it (Matroska); see _RUN_ON_DRAIN_S
        formats = self.container.format.name.split(",")
        self.video_packets_left = self.vstream.frames if "mov" in formats and self.vstream.frames > 0 else None
        tagged_s = _duration_tag_s(self.vstream.metadata) if "matroska" in formats else None
        self.video_tagged_end_s = (None if tagged_s is None or self.origin_pts is None
                                   else tagged_s - float(self.origin_pts * self.time_base))
        self.video_drained = False
        rate = self.vstream.average_rate
        if not rate or (rate > MAX_PLAUSIBLE_FPS and self.vstream.guessed_rate):
            rate = self.vstream.guessed_rate  # FFmpeg's raw DV demuxer gives its time base, 60,000, as the average
        self.avg_fps = float(rate) if rate and rate <= MAX_PLAUSIBLE_FPS else 0.0
        sar = self.vstream.sample_aspect_ratio or vcc.sample_aspect_ratio
        self.sample_aspect = Fraction(sar) if sar and sar > 0 else Fraction(1)

        self.store = _SegmentStore(s.frames_per_segment, s.image_size)
        self.sampler: _FrameSampler | None = None  # built at the first frame (rotation is per file)
        self.converter: _Converter | None = None
        self.n_frames = 0
        self.last_t_s = -math.inf
        self.video_end_s = -math.inf  # end of the latest frame (pts + duration)
        self.quarter_turns = 0
        self.width = self.height = 0
        self.bad_packets = 0
        self.packets_decoded = 0  # of the video and audio tracks used (skipped ones are not)
        # whether each of a track's latest packets failed to decode (True), for a run of damage
        self.recent_bad: dict[str, deque[bool]] = {"video": deque(maxlen=BAD_RUN_PACKETS),
                                                   "audio": deque(maxlen=BAD_RUN_PACKETS)}
        self.first_error = ""  # where and how the first corrupt packet failed
        self.last_packet: av.Packet | None = None  # the latest demuxed (where a damaged file stops)
        self.announced_end_s: float | None = None  # the video's end as its header says (set at the first frame)
        self.run_on_from_s = math.inf  # a frame later than this shows the header's end wrong (see _end_unknown)
        # parts joined end to end (see _DISCONT_BACK_S): the shift of each part after the first, set where the video
        # starts the part and taken by its audio too, so that each part keeps its own audio/video sync
        self.joins_parts = bool(_DISCONT_FORMATS & set(self.container.format.name.split(",")))
        self.part_shifts_s: list[float] = []
        self.video_part = self.audio_part = 0  # parts each stream has reached (0: the first)
        # the times the last 16 frames gave (on the joined timeline, before out-of-order ones were moved)
        self.recent_claims: deque[float] = deque(maxlen=16)
        # a frame off the clock, its raw time, and which way it left ("back" or "ahead")
        self.join_candidate: tuple[av.VideoFrame, float, str] | None = None
        self.held_audio: list[tuple[float, np.ndarray]] = []  # audio of a part the video has not reached yet
        self.held_samples = 0

        self.audio: _AudioTimeline | None = None
        self.resampler: av.AudioResampler | None = None
        self.pending_audio: list[tuple[float | None, np.ndarray]] = []  # until the origin is known
        self.audio_done = self.astream is None
        if self.astream is not None:
            self.audio = _AudioTimeline(s.audio_rate_hz)
            self.resampler = self._new_resampler()
        self.next_chunk = 0
        self.ready_at: tuple[int, float] = (-1, math.inf)  # (next_chunk, the frontier that completes it)

    def _new_resampler(self) -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=self.sampling.audio_rate_hz)

    def _estimated_end_s(self) -> float | None:
        """End of the video as the header announces it, relative to the origin (None if unknown)."""
        v = self.vstream
        origin = self._origin_or_start()
        if v.duration and v.start_time is not None:
            return float((v.start_time + v.duration - origin) * self.time_base)
        tagged_end_s = _duration_tag_s(v.metadata)
        if tagged_end_s is not None:
            return tagged_end_s - float(origin * self.time_base)
        c = self.container
        if c.duration:
            start_us = c.start_time or 0
            return (start_us + c.duration) / 1e6 - float(origin * self.time_base)
        return None

    # -- demux and decode ----------------------------------------------------------------------------

    def _demux(self) -> Iterator[av.Packet]:
        streams = [self.vstream] + ([self.astream] if self.astream is not None else [])
        packets = self.container.demux(streams)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as e:  # the demuxer cannot go on: the file is damaged here
                raise MediaError(
                    self.uri,
                    "decode_error",
                    f"the file is damaged after {self._position_s(self.last_packet):.1f} s and cannot be read further "
                    f"(FFmpeg: {_ffmpeg_message(e)}); re-encode or re-download it",
                ) from e
            self.last_packet = packet
            yield packet

    def _position_s(self, packet: av.Packet | None) -> float:
        """Where ``packet`` lies on the video's timeline (seconds, for messages about damage).

        Taken from the packet, not from the last decoded frame: frames that skipping leaves out, or
        that a held GOP has not decoded yet, would otherwise make the place depend on skipping.
        """
        ts = None if packet is None else packet.pts if packet.pts is not None else packet.dts
        if packet is None or ts is None or packet.time_base is None:
            return max(self.last_t_s, 0.0)
        return max(float(ts * packet.time_base) - float(self._origin_or_start() * self.time_base), 0.0)

    def _origin_or_start(self) -> int:
        """The origin's pts; before an AVI's first frame, the stream's start time stands in for it."""
        return self.origin_pts if self.origin_pts is not None else (self.vstream.start_time or 0)

    def _decode(self, packet: av.Packet) -> list:
        self.packets_decoded += 1
        track = "video" if packet.stream is self.vstream else "audio"
        recent = self.recent_bad[track]
        try:
            frames = packet.stream.codec_context.decode(packet)
        except av.error.FFmpegError as e:
            # Broad on purpose: any libav error here concerns this one packet, which FFmpeg
            # conceals; only many of them make the video a failure.
            recent.append(True)
            error = e  # (``e`` is unbound after the except clause; the message is built only for the first)
            self._count_bad(lambda: f"near {self._position_s(packet):.1f} s: {_ffmpeg_message(error)}", e, track)
            return []
        recent.append(False)
        return frames

    def _count_bad(self, where: Callable[[], str], error: BaseException | None = None, track: str = "") -> None:
        """One more corrupt packet or frame (``where()`` says where and how): the video fails at once where there
        are more than MAX_BAD_PACKETS and most of the latest packets of ``track`` (of a packet that failed to
        decode) are corrupt (see ``_check_damage`` for its end)."""
        self.bad_packets += 1
        if not self.first_error:
            self.first_error = where()
        if self.bad_packets > MAX_BAD_PACKETS and track:
            recent = self.recent_bad[track]
            if 2 * (bad := sum(recent)) > len(recent):
                raise MediaError(
                    self.uri,
                    "decode_error",
                    f"{self.bad_packets} corrupt packets, {bad} of the last {len(recent)} of the {track} track "
                    f"(first {self.first_error}); the file is damaged: re-encode or re-download it",
                ) from error

    def _check_damage(self) -> None:
        """At the end: more than MAX_BAD_PACKETS corrupt packets, and more than MAX_BAD_FRACTION of those decoded,
        fail the video; fewer are concealed (a damaged minute of a long recording is not a failed recording)."""
        if self.bad_packets > max(MAX_BAD_PACKETS, MAX_BAD_FRACTION * self.packets_decoded):
            raise MediaError(
                self.uri,
                "decode_error",
                f"{self.bad_packets} corrupt packets in {self.packets_decoded} (first {self.first_error}): more than "
                f"{MAX_BAD_PACKETS} and more than {MAX_BAD_FRACTION:.0%} of them; the file is damaged: re-encode or "
                "re-download it",
            )

    # -- video -----------------------------------------------------------------------------------------

    def _frame_time_s(self, frame: av.VideoFrame) -> float:
        if frame.pts is None:
            # No timestamp (some raw streams): assume it follows the previous frame.
            step = 1 / self.avg_fps if self.avg_fps else 0.04
            return self.last_t_s + step if self.n_frames else 0.0
        if self.origin_pts is None:
            self.origin_pts = frame.pts
            self._flush_pending_audio()
        return (frame.pts - self.origin_pts) * self.tb_num / self.tb_den  # = float((pts - origin) * time_base)

    def _on_video_frame(self, frame: av.VideoFrame) -> None:
        if self.gate is not None:
            self.gate.started = True
        if self.origin_pts is None and frame.pts is None:
            self.origin_pts = self.vstream.start_time or 0
            self._flush_pending_audio()
        t_s = self._frame_time_s(frame)
        if not self.joins_parts:
            self._show(frame, t_s)
        elif frame.pts is None:  # its time follows the previous frame's: no part starts here
            self._flush_join_candidate()
            self._show(frame, t_s)
        else:
            for f, t in self._joined(frame, t_s):
                self._show(f, t)

    def _show(self, frame: av.VideoFrame, t_s: float) -> None:
        """Take a decoded frame at ``t_s`` (seconds from the origin; on the joined timeline)."""
        # Out-of-order timestamps (broken files) are treated as shown right after the previous frame.
        t_s = max(t_s, self.last_t_s)
        sampler = self.sampler if self.sampler is not None else self._start_sampling(frame)
        if frame.duration:
            dur_s = frame.duration * self.tb_num / self.tb_den  # = float(duration * time_base)
        elif self.avg_fps:
            dur_s = 1 / self.avg_fps
        else:
            dur_s = t_s - self.last_t_s if self.n_frames and t_s > self.last_t_s else 0.04
        if self._damaged_time(t_s, t_s + dur_s):
            return
        if t_s > self.run_on_from_s:
            self._end_unknown(sampler)
        sampler.push(t_s, frame)
        self.n_frames += 1
        self.last_t_s = t_s
        # The video ends with the frame shown last (frames come in display order), not with the furthest end of any
        # frame: an MP4/MOV frame's duration is its step to the next frame in *decode* order, and with B-frames at a
        # variable rate one reached past the last frame's end (a 3.00-s screen recording came out 3.22 s long, a
        # fourth segment re-showing its last frame; a helper).
        self.video_end_s = t_s + dur_s

    # -- parts joined end to end (MPEG-TS / MPEG-PS, see _DISCONT_BACK_S) ---------------------------------

    def _shift_s(self, part: int) -> float:
        return self.part_shifts_s[part - 1] if part else 0.0

    def _breaks_clock(self, t_s: float) -> str | None:
        """Whether ``t_s`` (shifted) leaves the clock of the recent frames: "back" (more than 0.5 s before the last
        two frames' times, and no return to the clock a frame or two ahead of it had left), "ahead" (more than 10 s
        after them), or None."""
        claims = self.recent_claims
        if len(claims) < 2:
            return None
        last_two = (claims[-2], claims[-1])
        if t_s > max(last_two) + _SMOOTH_STEP_S and t_s > self._latest_skipped_s(t_s) + _SMOOTH_STEP_S:
            return "ahead"
        if t_s >= min(last_two) - _DISCONT_BACK_S:
            return None
        # back to where the clock was before a step ahead among the recent frames: those were damaged, not this
        for before, after in zip(list(claims)[:-1], list(claims)[1:], strict=True):
            if after - before > _DISCONT_BACK_S and before - _DISCONT_BACK_S <= t_s <= before + 2.0:
                return None
        return "back"

    def _latest_skipped_s(self, t_s: float) -> float:
        """The latest time up to ``t_s`` of a frame the gate skipped, which a full decode would have shown (-inf if
        none): where no target falls for more than 10 s (segments that long), the frames around a gap it leaves are
        on one clock.  (Skipping stops for good at a part's start: only the first part's times are here.)"""
        gate = self.gate
        if gate is None or self.video_part:
            return -math.inf
        return max((u for u in gate.skipped_times if u <= t_s), default=-math.inf)

    def _joined(self, frame: av.VideoFrame, raw_s: float) -> list[tuple[av.VideoFrame, float]]:
        """The frames to show now, with their times on the joined timeline.

        A frame whose time leaves the clock of the recent frames (see :meth:`_breaks_clock`) waits for the next
        one: if that one leaves the clock the same way and follows the waiting frame on its clock, a new part
        starts there and goes on where the video had got to.  If not, the waiting frame's time was damaged: one
        far ahead is dropped (counted as a damaged frame), one back is shown right after the previous frame, as
        before.  The video decides where each part starts: the audio of a part takes the same shift, so that each
        part keeps its own sync."""
        out: list[tuple[av.VideoFrame, float]] = []
        shift = self._shift_s(self.video_part)
        if self.join_candidate is not None:
            cand, cand_raw, way = self.join_candidate
            self.join_candidate = None
            if self._breaks_clock(raw_s + shift) == way and -_DISCONT_BACK_S <= raw_s - cand_raw <= _SMOOTH_STEP_S:
                self._start_part(self.video_end_s - cand_raw)
                shift = self._shift_s(self.video_part)
                out.append((cand, cand_raw + shift))
                self.recent_claims.append(cand_raw + shift)
            elif way == "ahead":
                last = max(self.last_t_s, 0.0)
                self._count_bad(lambda: f"near {last:.1f} s: a frame's time is damaged (its timestamp jumps from "
                                        f"{last:,.1f} s to {cand_raw + shift:,.1f} s)")
            else:
                out.append((cand, cand_raw + shift))
        leaves = self._breaks_clock(raw_s + shift)
        if leaves is not None:
            self.join_candidate = (frame, raw_s, leaves)
            return out
        out.append((frame, raw_s + shift))
        self.recent_claims.append(raw_s + shift)
        return out

    def _flush_join_candidate(self) -> None:
        """Show a frame that waited to see whether a part starts with it, where no next frame can tell (the end)."""
        if self.join_candidate is not None:
            cand, cand_raw, _ = self.join_candidate
            self.join_candidate = None
            self._show(cand, cand_raw + self._shift_s(self.video_part))

    def _start_part(self, shift_s: float) -> None:
        """A part joined after the others starts (its clock started again): its times move by ``shift_s``.

        The header's duration no longer says where the video ends: the past-the-end check stops, and the frames of
        the open segment are kept from here on (unconverted, see _end_unknown), so that a short last segment is
        sampled exactly wherever the video ends."""
        self.part_shifts_s.append(shift_s)
        self.video_part += 1
        self.recent_claims.clear()
        self.announced_end_s = self.video_tagged_end_s = None
        if self.sampler is not None:
            self.sampler.tail_start_s = -math.inf
            self._end_unknown(self.sampler)
        if self.video_part == 1:
            log.info("%s: its timestamps start again (parts joined end to end): later parts follow the earlier ones",
                     self.uri)
        if self.held_audio:  # the audio reached this part first: it waited for its shift
            self._release_held_audio()

    def _place_audio_part(self, t_s: float, samples: np.ndarray) -> None:
        """Place an audio frame of a joinable container: in its part, shifted as the video shifted it."""
        assert self.audio is not None
        if self.held_audio:
            self.held_audio.append((t_s, samples))
            self.held_samples += len(samples)
            if self.held_samples > _AUDIO_HOLD_S * self.audio.rate_hz:  # no part came: a damaged time, not a join
                self._release_held_audio(joined=False)
            return
        shift = self._shift_s(self.audio_part)
        cursor = self.audio.cursor
        if cursor is not None:
            step_s = t_s + shift - cursor / self.audio.rate_hz  # 0 for audio laid back to back
            if self.audio_part < len(self.part_shifts_s):
                # the video has started a part the audio has not: the audio's first step off its clock starts it
                if step_s < -_AUDIO_RESYNC_S or step_s > _DISCONT_BACK_S:
                    self.audio_part += 1
                    shift = self._shift_s(self.audio_part)
            elif step_s < -_DISCONT_BACK_S or step_s > _SMOOTH_STEP_S:
                # the audio reaches a new part before the video: it waits for the video to start it
                self.held_audio.append((t_s, samples))
                self.held_samples = len(samples)
                return
        self.audio.place(t_s + shift, samples)

    def _release_held_audio(self, *, joined: bool = True) -> None:
        """Place the audio held since its time went back: in the part the video has now reached, or (``joined``
        False: none came within _AUDIO_HOLD_S, or the file ended) where its own times say, as before."""
        assert self.audio is not None
        held, self.held_audio, self.held_samples = self.held_audio, [], 0
        if joined:
            self.audio_part += 1
        shift = self._shift_s(self.audio_part)
        for t_s, samples in held:
            self._place_audio_at(t_s + shift, samples)

    def _damaged_time(self, t_s: float, end_s: float) -> bool:
        """Whether a frame's time cannot be right (counted as a corrupt frame, and the frame dropped)."""
        announced = self.announced_end_s
        past_end = announced is not None and end_s > announced + max(_PAST_END_S, announced / 2)
        if past_end and self.joins_parts and self.n_frames and \
                t_s - max(self.last_t_s, self._latest_skipped_s(t_s)) <= _SMOOTH_STEP_S:
            # in MPEG-TS/PS the header's end is FFmpeg's estimate from the file's last timestamps: where parts
            # were joined, the last part's.  A stream that runs on past it step by step is an earlier, longer part.
            self.announced_end_s = None
            past_end = False
        if past_end:
            what = f"its timestamp says {t_s:,.1f} s, past the video's end the header announces ({announced:,.1f} s)"
        elif (t_s - max(self.last_t_s, 0.0)) / self.sampling.segment_seconds > _MAX_GAP_SEGMENTS:
            what = f"its timestamp jumps from {max(self.last_t_s, 0.0):,.1f} s to {t_s:,.1f} s"
        else:
            return False
        self._count_bad(lambda: f"near {max(self.last_t_s, 0.0):.1f} s: a frame's time is damaged ({what})")
        return True

    def _end_unknown(self, sampler: _FrameSampler) -> None:
        """The header announces no end (a Matroska/WebM file written live), or frames have run on past the one it
        announces (an MPEG-TS or MPEG-PS whose earlier parts, joined with `cat`, outlast its last: FFmpeg estimates
        the end from the last part's times), or a joined part has started: the end is unknown.  The frame gate and
        the sampler's tail then keep to what later frames prove, instead of decoding and converting every frame from
        here to the end of the file."""
        self.run_on_from_s = math.inf
        sampler.lazy_tail = True
        if self.gate is not None:
            self.gate.end_unknown = True

    def _start_sampling(self, frame: av.VideoFrame) -> _FrameSampler:
        self.width, self.height = frame.width, frame.height
        self.quarter_turns = _rotation_quarter_turns(frame)
        self.converter = _Converter(self.sampling.image_size, self.sample_aspect, _orientation(frame))
        end_s = self.announced_end_s = self._estimated_end_s()
        tail_start_s = -math.inf  # no end in the header (a Matroska/WebM file written live): every frame may be last
        if end_s is not None:
            tail_start_s = end_s - 2 * self.sampling.segment_seconds - _TAIL_MARGIN_S
            if self.joins_parts:  # elsewhere a frame far past the header's end is damage (see _damaged_time)
                self.run_on_from_s = end_s + self.sampling.segment_seconds + _TAIL_MARGIN_S
        self.sampler = _FrameSampler(
            self.sampling.segment_seconds,
            self.sampling.frames_per_segment,
            self.converter,
            self.store,
            tail_start_s,
        )
        if end_s is None:
            self._end_unknown(self.sampler)
        return self.sampler

    # -- audio -----------------------------------------------------------------------------------------

    def _on_audio_frame(self, frame: av.AudioFrame) -> None:
        assert self.resampler is not None
        try:
            out = self.resampler.resample(frame)
        except ValueError:
            # The stream changed format, layout or rate mid-way: start a new resampler.
            out = self.resampler.resample(None)
            self.resampler = self._new_resampler()
            out += self.resampler.resample(frame)
        for o in out:
            self._place_audio(o)

    def _place_audio(self, frame: av.AudioFrame) -> None:
        samples = _mono_samples(frame)
        pts = frame.pts
        tb = frame.time_base
        # Exact rational arithmetic in integers, rounded to float once (as float() of the Fraction
        # pts * time_base - origin would be): int / int is correctly rounded.
        if self.origin_pts is None:
            self.pending_audio.append(
                (None if pts is None or tb is None else pts * tb.numerator / tb.denominator, samples)
            )
            return
        assert self.audio is not None
        if pts is None or tb is None:
            self.audio.place(None, samples)
            return
        num, den = tb.numerator, tb.denominator
        t_s = (pts * num * self.tb_den - self.origin_pts * self.tb_num * den) / (den * self.tb_den)
        if self.joins_parts:
            self._place_audio_part(t_s, samples)
        else:
            self._place_audio_at(t_s, samples)

    def _place_audio_at(self, t_s: float | None, samples: np.ndarray) -> None:
        """Place audio by its time, unless that time is far past anything the video reaches (a damaged time: an
        MPEG-TS time 3 s before the start reads 26.5 h ahead, and laying it there took gigabytes)."""
        assert self.audio is not None
        cursor = self.audio.cursor  # where the audio placed so far ends (not a damaged time: those are not placed)
        reach_s = max(self._video_reach_s(), cursor / self.audio.rate_hz if cursor is not None else 0.0)
        if t_s is not None and t_s > reach_s + _AUDIO_FAR_AHEAD_S:
            self._count_bad(lambda: f"near {max(self.last_t_s, 0.0):.1f} s: an audio frame's time is damaged (it "
                                    f"says {t_s:,.1f} s, past where the video ends)")
            return
        self.audio.place(t_s, samples)

    def _flush_pending_audio(self) -> None:
        if self.audio is None or self.origin_pts is None:
            return
        origin_s = float(self.origin_pts * self.time_base)
        for t_abs, samples in self.pending_audio:
            self._place_audio_at(None if t_abs is None else t_abs - origin_s, samples)
        self.pending_audio.clear()

    # -- the video ends before the audio (MP4/MOV, tagged Matroska; see _RUN_ON_DRAIN_S) ------------------

    def _video_over_and_audio_runs_on(self) -> bool:
        if self.video_drained or self.audio is None:
            return False
        if self.video_packets_left == 0:
            reach_s = self._video_reach_s()
        elif self.video_tagged_end_s is not None:  # not the header's duration: in Matroska, the longest track's
            reach_s = max(self.video_tagged_end_s, self.last_t_s, self.video_end_s, 0.0)
        else:
            return False
        return self.audio.frontier_s > reach_s + _RUN_ON_DRAIN_S

    def _video_reach_s(self) -> float:
        """How far the video goes, as far as is known: the end its header announces, or its frames so far."""
        return max(self.announced_end_s or 0.0, self.last_t_s, self.video_end_s, 0.0)

    def _drain_video(self) -> None:
        """Every video packet the index lists has been read: decode what the gate and the decoder's threads hold, so
        that the last frame is known and segments past it can go out as the audio comes (see _RUN_ON_DRAIN_S)."""
        if self.gate is not None:
            for p in self.gate.flush():
                for frame in self._decode(p):
                    self._on_video_frame(frame)
        for frame in self.vstream.codec_context.decode(None):
            self._on_video_frame(frame)
        self.video_drained = True

    def _undrain(self) -> None:
        """A video packet after those the index listed (not seen in a valid file): decode on, from a reset decoder."""
        listed = (f"the {self.vstream.frames} its index lists" if self.video_tagged_end_s is None
                  else f"the end its track's DURATION tag gives ({self.video_tagged_end_s:.1f} s)")
        log.warning("%s: the video has packets past %s; decoding them after %.1f s of the video",
                    self.uri, listed, max(self.last_t_s, 0.0))
        self.vstream.codec_context.flush_buffers()
        if self.gate is not None:
            self._take_gate_counts(self.gate)
        self.video_drained = False
        self.video_packets_left = self.video_tagged_end_s = None

    # -- chunks ----------------------------------------------------------------------------------------

    def _next_chunk_ready(self) -> bool:
        """Whether the next chunk's segments (core and right context) are complete (checked per frame)."""
        if self.sampler is None:
            return False
        frontier_s = self.last_t_s  # segments ending at or before the newest frame are final
        if self.video_drained and self.audio is not None and self.audio.frontier_s > self.video_end_s + _AUDIO_RUNS_ON_S:
            # no more video: the audio that runs on makes the segments, up to where its end may be rounded down to
            # (_finish: padding), so that a chunk sent as not the last is not the last
            frontier_s = self.audio.frontier_s - _AUDIO_PADDING_S
        if not self.audio_done and self.audio is not None:
            frontier_s = min(frontier_s, max(self.audio.frontier_s, self.last_t_s - _AUDIO_WAIT_S))
        chunk, ready_s = self.ready_at
        if chunk != self.next_chunk:
            seg_s = self.sampling.segment_seconds
            core_end = (self.next_chunk + 1) * self.chunking.core_segments
            rows_end = core_end + self.chunking.context_segments
            # The second term proves a segment exists after the core, so this chunk is not the last.
            ready_s = max(rows_end * seg_s, core_end * seg_s + 2 * SEGMENT_TOLERANCE_S)
            self.ready_at = (self.next_chunk, ready_s)
        return not frontier_s < ready_s  # not ">=": the test the loop has always made, NaN included

    def _ready_chunks(self) -> Iterator[Chunk]:
        """Chunks whose segments (core and right context) are complete before the end of the file."""
        core, ctx = self.chunking.core_segments, self.chunking.context_segments
        while self._next_chunk_ready():
            core_start = self.next_chunk * core
            if self.video_drained and self.sampler is not None:  # the segments past the last frame show it
                self.sampler.hold(core_start + core + ctx)
            yield self._build_chunk(core_start, core_start + core, core_start + core + ctx, duration_s=None, info=None)

    def _finish(self) -> Iterator[Chunk]:
        if self.resampler is not None:
            for o in self.resampler.resample(None):
                self._place_audio(o)
        if self.held_audio:
            self._release_held_audio(joined=False)
        self.audio_done = True
        self._check_damage()  # first: a video track all corrupt is damage (decode_error), not a lack of frames
        if self.n_frames == 0 or self.sampler is None:
            detail = (
                f" ({self.bad_packets} corrupt packets, first {self.first_error})" if self.bad_packets else ""
            )
            raise MediaError(
                self.uri,
                "no_frames",
                f"the video stream has no decodable frames{detail}; the file may be damaged",
            )
        if self.n_frames == 1 and (image := self._image_format()):
            raise MediaError(self.uri, "no_video_stream", f"no video stream: this is a still image ({image}), not a video")
        if self.audio is not None and self.audio.n_late:
            log.warning(
                "%s: %d audio samples lagged the video by more than %.0f s in the file and were dropped",
                self.uri,
                self.audio.n_late,
                _AUDIO_WAIT_S,
            )
        duration_s = round(self.video_end_s, 9)  # sums of times: 0.36 + 0.04 was 0.39999999999999997 (a helper)
        if self.audio is not None and self.audio.cursor is not None:
            # the end of the audio as its last frame left it (the cursor: not a damaged time far ahead, which the
            # frames after it came back from)
            audio_end_s = self.audio.cursor / self.audio.rate_hz
            if audio_end_s > duration_s + _AUDIO_RUNS_ON_S:
                seg_s = self.sampling.segment_seconds
                whole_s = round(math.floor(audio_end_s / seg_s + 1e-9) * seg_s, 9)  # a decimal border, as start_s
                duration_s = whole_s if audio_end_s - whole_s < _AUDIO_PADDING_S else audio_end_s
        n = count_segments(duration_s, self.sampling.segment_seconds)
        info = self._info(duration_s, n)
        core, ctx = self.chunking.core_segments, self.chunking.context_segments
        while self.next_chunk * core < n:
            core_start = self.next_chunk * core
            core_end = min(core_start + core, n)
            last = core_end == n
            self.sampler.finish(n, duration_s, until=min(n, core_end + ctx))
            yield self._build_chunk(
                core_start,
                core_end,
                min(n, core_end + ctx),
                duration_s=duration_s,
                info=info if last else None,
            )

    def _info(self, duration_s: float, n: int) -> VideoInfo:
        acc = self.astream.codec_context if self.astream is not None else None
        # an audio track that never gave a sample (a Matroska track without packets) is no audio: the chunks,
        # sent before the end, could not know (the driver writes the segments' value from here)
        has_audio = self.audio is not None and self.audio.cursor is not None
        return VideoInfo(
            uri=self.uri,
            video_id=self.video_id,
            duration_s=duration_s,
            n_segments=n,
            video_codec=_codec_name(self.vstream),
            width=self.width,
            height=self.height,
            # (over the video's own length, not the audio that may run on past it)
            fps=self.avg_fps or ((self.n_frames + self.frames_skipped) / self.video_end_s if self.video_end_s > 0
                                 else 0.0),
            rotation_deg=_quarter_turns_to_deg(self.quarter_turns),
            has_audio=has_audio,
            audio_codec=(_codec_name(self.astream) if has_audio and self.astream is not None
                         else NO_AUDIO_DECODER if self.audio_undecodable else None),
            audio_channels=acc.layout.nb_channels if has_audio and acc is not None else None,
            audio_rate_hz=acc.sample_rate if has_audio and acc is not None else None,
            size_bytes=self.size_bytes,
            n_frames_decoded=self.n_frames,
            n_frames_skipped=self.frames_skipped,
        )

    def _build_chunk(
        self,
        core_start: int,
        core_end: int,
        rows_end: int,
        *,
        duration_s: float | None,
        info: VideoInfo | None,
    ) -> Chunk:
        s = self.sampling
        seg_s = s.segment_seconds
        first = max(0, core_start - self.chunking.context_segments)
        n_rows = rows_end - first
        spp = s.samples_per_segment
        # the decimal borders (0.9, not 3 * 0.3 = 0.8999999999999999): a query's `start_s = 0.9` finds its segment;
        # each end_s is the next one's start_s, exactly
        borders = np.round(np.arange(first, rows_end + 1, dtype=np.float64) * seg_s, 9)
        start_s, end_s = borders[:-1], borders[1:]
        if duration_s is not None:
            end_s = np.minimum(end_s, duration_s)
        frames = np.zeros((n_rows, s.frames_per_segment, s.image_size, s.image_size, 3), dtype=np.uint8)
        pts = np.full((n_rows, s.frames_per_segment), np.nan, dtype=np.float64)
        audio = np.zeros((n_rows, spp), dtype=np.float32)
        valid = np.zeros(n_rows, dtype=np.int32)
        for row, segment in enumerate(range(first, rows_end)):
            slots = self.store.slots.get(segment)
            if slots is not None:
                frames[row] = slots.frames
                pts[row] = slots.pts_s
            if self.audio is not None:
                lo = int(round(start_s[row] * s.audio_rate_hz))
                hi = min(int(round(end_s[row] * s.audio_rate_hz)), lo + spp)
                valid[row] = self.audio.window(lo, hi, audio[row])
        chunk = Chunk(
            video_id=self.video_id,
            uri=self.uri,
            chunk_index=self.next_chunk,
            is_last=info is not None,
            first_segment=first,
            core_start=core_start,
            core_end=core_end,
            start_s=start_s,
            end_s=end_s,
            frames=frames,
            frame_pts_s=pts,
            audio=audio,
            audio_valid_samples=valid,
            has_audio=self.astream is not None,
            info=info,
        )
        self.next_chunk += 1
        # Keep only what the next chunk still needs: its left context onwards.
        keep_from = max(0, self.next_chunk * self.chunking.core_segments - self.chunking.context_segments)
        self.store.drop_before(keep_from)
        if self.audio is not None:
            self.audio.drop_before(int(round(keep_from * seg_s * s.audio_rate_hz)))
        return chunk
