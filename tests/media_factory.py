"""Small real media files for tests, written with PyAV's own encoders.

Every file is real (a real encoder, a real muxer) so tests exercise the same code paths as user
files, yet small enough to write in well under a second.

- :func:`make_video` writes a video (optionally with audio) whose frames carry their own index as a
  big black/white code (:func:`read_stamp` reads it back from a decoded, scaled, cropped picture),
  at a constant or variable frame rate, with an optional display rotation.
- :func:`make_audio` writes an audio-only file; :func:`make_corrupt` a file that is not valid media.
- :func:`vfr_frame_times` and :func:`frame_shown_at` help tests compute which frame a player shows
  at a given time.

Codec and container come from the file suffix unless given: ``.mp4 .mkv .mov`` → H.264 + AAC,
``.webm`` → VP9 + Opus, ``.ts .m2ts`` → MPEG-2 + AAC, ``.mpg`` → MPEG-2 + MP2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np

AudioKind = Literal["tone", "noise", "silence"]
CorruptKind = Literal["garbage", "truncated", "empty", "bad_packets"]

_VIDEO_CODEC_BY_SUFFIX = {
    ".mp4": "libx264",
    ".mkv": "libx264",
    ".mov": "libx264",
    ".webm": "libvpx-vp9",
    ".ts": "mpeg2video",
    ".m2ts": "mpeg2video",
    ".mpg": "mpeg2video",
}
_AUDIO_CODEC_BY_SUFFIX = {
    ".mp4": "aac",
    ".m4a": "aac",
    ".mkv": "aac",
    ".mka": "aac",
    ".mov": "aac",
    ".webm": "libopus",
    ".ts": "aac",
    ".m2ts": "aac",
    ".mpg": "mp2",
    ".mp3": "libmp3lame",
    ".opus": "libopus",
    ".ogg": "libopus",
}
_LAYOUT_BY_CHANNELS = {1: "mono", 2: "stereo", 6: "5.1"}

# High quality settings so the stamp survives lossy coding; speed settings so tests stay fast.
_VIDEO_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "10", "preset": "veryfast"},
    "libx265": {"crf": "10", "preset": "ultrafast", "x265-params": "log-level=error"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "4", "qmin": "0", "qmax": "20"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "row-mt": "1"},
    "mpeg2video": {"qmin": "1", "qmax": "4"},
}
_VIDEO_BIT_RATE = 4_000_000  # used by the codecs that want a bitrate (VP8, VP9, MPEG-2)

# --- the frame-number stamp -------------------------------------------------------------------
#
# A 6x6 grid of black/white cells in the middle of the picture: the outer ring is a fixed pattern
# (no rotation or mirror of it matches itself, so a wrongly rotated picture is detected), the inner
# 4x4 cells are the frame number in binary, most significant bit first, row by row.  The grid sits
# inside the central square of side min(width, height), which is exactly what a centre crop keeps.
STAMP_GRID = 6
STAMP_FILL = 0.75  # the grid covers this fraction of the central square's side
STAMP_BITS = (STAMP_GRID - 2) ** 2
STAMP_MAX = 2**STAMP_BITS - 1
_RING = np.array(
    [
        [1, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
    ],
    dtype=bool,
)
_RING_MASK = np.ones((STAMP_GRID, STAMP_GRID), dtype=bool)
_RING_MASK[1:-1, 1:-1] = False


class StampNotFoundError(ValueError):
    """The picture does not carry a readable stamp (wrong crop, rotation, or too damaged)."""


def _stamp_cells(number: int) -> np.ndarray:
    if not 0 <= number <= STAMP_MAX:
        raise ValueError(f"stamp number must be in [0, {STAMP_MAX}], got {number}")
    cells = _RING.copy()
    bits = [(number >> (STAMP_BITS - 1 - i)) & 1 for i in range(STAMP_BITS)]
    cells[1:-1, 1:-1] = np.array(bits, dtype=bool).reshape(STAMP_GRID - 2, STAMP_GRID - 2)
    return cells


def _grid_geometry(height: int, width: int) -> tuple[float, float, float]:
    """Top, left and cell size (pixels, float) of the stamp grid in a height x width picture."""
    side = min(height, width)
    cell_px = side * STAMP_FILL / STAMP_GRID
    grid_px = cell_px * STAMP_GRID
    top = (height - grid_px) / 2
    left = (width - grid_px) / 2
    return top, left, cell_px


def _background(width: int, height: int, index: int) -> np.ndarray:
    """A colour gradient that moves with ``index`` so that encoders see motion (never pure black/white)."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (64 + 64 * np.sin((xs + 3 * index) / 23.0)).astype(np.uint8)
    img[..., 1] = (64 + 64 * np.cos((ys + 2 * index) / 17.0)).astype(np.uint8)
    img[..., 2] = 96
    return img


def stamped_image(width: int, height: int, number: int) -> np.ndarray:
    """An upright RGB picture (uint8 [height, width, 3]) carrying ``number`` as a stamp."""
    if min(width, height) < 4 * STAMP_GRID:
        raise ValueError(f"picture {width}x{height} is too small for a stamp (min side {4 * STAMP_GRID})")
    img = _background(width, height, number)
    top, left, cell_px = _grid_geometry(height, width)
    cells = _stamp_cells(number)
    for r in range(STAMP_GRID):
        for c in range(STAMP_GRID):
            y0, y1 = round(top + r * cell_px), round(top + (r + 1) * cell_px)
            x0, x1 = round(left + c * cell_px), round(left + (c + 1) * cell_px)
            img[y0:y1, x0:x1] = 255 if cells[r, c] else 0
    return img


def read_stamp(rgb: np.ndarray) -> int:
    """Recover the frame number drawn by :func:`make_video` from an upright RGB picture.

    Works on the full frame or on any centre crop of it that contains the central square, after
    scaling (e.g. to 224x224) and lossy coding.  Raises :class:`StampNotFoundError` when the fixed
    ring pattern is not there (e.g. the picture is rotated or mirrored).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    top, left, cell_px = _grid_geometry(height, width)
    # Read only the middle of each cell: edges blur under scaling and compression.
    margin = cell_px * 0.3
    cells = np.zeros((STAMP_GRID, STAMP_GRID), dtype=bool)
    for r in range(STAMP_GRID):
        for c in range(STAMP_GRID):
            y0 = int(round(top + r * cell_px + margin))
            y1 = max(y0 + 1, int(round(top + (r + 1) * cell_px - margin)))
            x0 = int(round(left + c * cell_px + margin))
            x1 = max(x0 + 1, int(round(left + (c + 1) * cell_px - margin)))
            cells[r, c] = luma[y0:y1, x0:x1].mean() > 127.5
    if not np.array_equal(cells[_RING_MASK], _RING[_RING_MASK]):
        raise StampNotFoundError("no frame stamp found: the fixed ring pattern does not match")
    number = 0
    for bit in cells[1:-1, 1:-1].reshape(-1):
        number = (number << 1) | int(bit)
    return number


# --- timing helpers -------------------------------------------------------------------------------


def vfr_frame_times(
    duration_s: float, intervals_s: Sequence[float] = (0.02, 0.1, 0.04, 0.3, 0.06)
) -> list[float]:
    """Presentation times (seconds, ms-rounded) of a variable-rate video: intervals cycle until duration_s."""
    if not intervals_s or min(intervals_s) <= 0:
        raise ValueError(f"intervals_s must be positive, got {intervals_s!r}")
    times: list[float] = []
    t, i = 0.0, 0
    while t < duration_s - 1e-9:
        times.append(round(t, 3))
        t += intervals_s[i % len(intervals_s)]
        i += 1
    return times


def frame_shown_at(frame_times_s: Sequence[float], t_s: float) -> int:
    """Index of the frame a player shows at ``t_s``: the last with time <= t_s (the first if none)."""
    idx = int(np.searchsorted(np.asarray(frame_times_s), t_s + 1e-9, side="right")) - 1
    return max(idx, 0)


# --- writers --------------------------------------------------------------------------------------


def _audio_signal(
    kind: AudioKind,
    n_samples: int,
    rate_hz: int,
    channels: int,
    *,
    tone_hz: float,
    tone_start_s: float,
    amplitude: float,
    seed: int,
) -> np.ndarray:
    """float32 [channels, n_samples]; the same signal on every channel."""
    if kind == "silence":
        mono = np.zeros(n_samples, dtype=np.float32)
    elif kind == "noise":
        mono = np.random.default_rng(seed).uniform(-amplitude, amplitude, n_samples).astype(np.float32)
    elif kind == "tone":
        t = np.arange(n_samples, dtype=np.float64) / rate_hz
        mono = (amplitude * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        mono[: int(round(tone_start_s * rate_hz))] = 0.0
    else:
        raise ValueError(f"unknown audio kind {kind!r}; choose one of: tone, noise, silence")
    return np.ascontiguousarray(np.broadcast_to(mono, (channels, n_samples)))


def _add_audio_stream(
    container: av.container.OutputContainer, codec: str, rate_hz: int, channels: int
) -> av.audio.stream.AudioStream:
    if channels not in _LAYOUT_BY_CHANNELS:
        raise ValueError(f"audio_channels must be one of {sorted(_LAYOUT_BY_CHANNELS)}, got {channels}")
    supported = av.Codec(codec, "w").audio_rates
    if supported and rate_hz not in supported:
        raise ValueError(f"{codec} cannot encode at {rate_hz} Hz; supported: {sorted(supported)}")
    stream = cast(av.audio.stream.AudioStream, container.add_stream(codec, rate=rate_hz))
    stream.layout = _LAYOUT_BY_CHANNELS[channels]
    stream.bit_rate = 64_000 * channels if codec != "mp2" else 192_000
    return stream


def _audio_frames(signal: np.ndarray, rate_hz: int, start_s: float) -> Iterator[tuple[float, av.AudioFrame]]:
    """(start time in seconds, frame) for 1024-sample blocks of ``signal``; the encoder re-blocks them."""
    layout = _LAYOUT_BY_CHANNELS[signal.shape[0]]
    start_pts = int(round(start_s * rate_hz))
    block = 1024
    for off in range(0, signal.shape[1], block):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(signal[:, off : off + block]), format="fltp", layout=layout
        )
        frame.sample_rate = rate_hz
        frame.pts = start_pts + off
        frame.time_base = Fraction(1, rate_hz)
        yield (start_pts + off) / rate_hz, frame


# --- display matrices ----------------------------------------------------------------------------

# FFmpeg's filters that its players insert for a display matrix (filter documentation's semantics).
_FILTERS = {
    "transpose=clock": lambda a: np.rot90(a, -1),  # rotate by 90 degrees clockwise
    "transpose=cclock": lambda a: np.rot90(a, 1),  # rotate by 90 degrees counter-clockwise
    "transpose=clock_flip": lambda a: np.rot90(a, -1)[::-1],  # clockwise, then vertically flip
    "transpose=cclock_flip": lambda a: np.rot90(a, 1)[::-1],  # counter-clockwise, then vertically flip
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
}
_FILTER_INVERSE = {"transpose=clock": "transpose=cclock", "transpose=cclock": "transpose=clock"} | {
    f: f for f in ("transpose=clock_flip", "transpose=cclock_flip", "hflip", "vflip")
}


def display_matrix(rotation_deg: float, hflip: bool = False, vflip: bool = False) -> list[int]:
    """The matrix libavutil's ``av_display_rotation_set`` + ``av_display_matrix_flip`` write (16.16 fixed point)."""
    radians = math.radians(rotation_deg)
    fixed = lambda x: int(round(x * (1 << 16)))  # noqa: E731
    m = [fixed(math.cos(radians)), fixed(-math.sin(radians)), 0, fixed(math.sin(radians)), fixed(math.cos(radians)), 0,
         0, 0, 1 << 30]
    flip = (-1 if hflip else 1, -1 if vflip else 1, 1)
    return [v * flip[i % 3] for i, v in enumerate(m)]


def player_filters(matrix: Sequence[int]) -> list[str]:
    """The filters ``ffmpeg``/``ffplay`` insert to show a picture with this display matrix (fftools' autorotate)."""
    # get_rotation(): -round(av_display_rotation_get()), wrapped to [0, 360): clockwise degrees.
    scale0, scale1 = math.hypot(matrix[0], matrix[3]), math.hypot(matrix[1], matrix[4])
    theta = -round(-math.degrees(math.atan2(matrix[1] / scale1, matrix[0] / scale0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return ["transpose=cclock_flip" if matrix[3] > 0 else "transpose=clock"]
    if abs(theta - 180) < 1:
        return (["hflip"] if matrix[0] < 0 else []) + (["vflip"] if matrix[4] < 0 else [])
    if abs(theta - 270) < 1:
        return ["transpose=clock_flip" if matrix[3] < 0 else "transpose=cclock"]
    if abs(theta) > 1:
        raise ValueError(f"a display angle of {theta} degrees needs FFmpeg's rotate filter")
    return ["vflip"] if matrix[4] < 0 else []


def make_video(
    path: str | os.PathLike[str],
    *,
    duration_s: float = 3.0,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    codec: str | None = None,
    pix_fmt: str | None = None,
    audio: AudioKind | None = None,
    audio_codec: str | None = None,
    audio_channels: int = 1,
    audio_rate_hz: int | None = None,
    audio_start_s: float = 0.0,
    audio_duration_s: float | None = None,
    tone_hz: float = 440.0,
    tone_start_s: float = 0.0,
    audio_amplitude: float = 0.5,
    frame_times_s: Sequence[float] | None = None,
    stamp: bool = True,
    rotation_deg: int = 0,
    hflip: bool = False,
    vflip: bool = False,
    interleave: bool = True,
    seed: int = 0,
    video_options: dict[str, str] | None = None,
) -> Path:
    """Write a test video and return its path.

    Args:
        duration_s: video length; ``round(duration_s * fps)`` frames at constant rate.
        size: coded (stored) ``(width, height)``; odd sizes are allowed for codecs that take them.
        codec: video encoder (libx264, libx265, libvpx, libvpx-vp9, mpeg2video); default by suffix.
        pix_fmt: default yuv420p, or yuv444p for an odd size with x264/x265 (their 4:2:0 needs even).
        audio: ``"tone"`` (sine of ``tone_hz``, silent before ``tone_start_s``), ``"noise"``,
            ``"silence"`` (a real track of zeros) or None (no audio track).
        audio_start_s: presentation time of the first audio sample (a gap before it).
        audio_duration_s: audio track length; default the video's length.
        frame_times_s: variable frame rate: the presentation time of every frame (seconds, rounded
            to ms); overrides ``duration_s``/``fps`` for the video track.
        stamp: draw each frame's index (see :func:`read_stamp`); otherwise only the moving gradient.
        rotation_deg: display rotation written to the container, counter-clockwise degrees as read
            back by ``av.VideoFrame.rotation`` (FFmpeg's display-matrix convention).  The picture is
            stored rotated the other way, so a player that honours the rotation shows it upright.
        hflip, vflip: mirror the display matrix after the rotation (PyAV's ``set_display_rotation``);
            the picture is stored so that FFmpeg's players (see :func:`player_filters`) show it upright.
        interleave: False hands the muxer all video before any audio, so audio lags the video by
            up to the muxer's interleaving window (10 s): a badly interleaved file.
        video_options: encoder options over the defaults, e.g. ``{"x264-params": "keyint=12"}``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    codec = codec or _VIDEO_CODEC_BY_SUFFIX.get(suffix)
    if codec is None:
        raise ValueError(f"no default video codec for suffix {suffix!r}; pass codec=")
    if rotation_deg % 90:
        raise ValueError(f"rotation_deg must be a multiple of 90, got {rotation_deg}")
    width, height = size
    matrix = display_matrix(rotation_deg, hflip, vflip)
    to_coded = [_FILTER_INVERSE[f] for f in reversed(player_filters(matrix))] if rotation_deg or hflip or vflip else []
    turned = any(f.startswith("transpose") for f in to_coded)
    disp_w, disp_h = (height, width) if turned else (width, height)

    if frame_times_s is not None:
        pts_ms = [int(round(t * 1000)) for t in frame_times_s]
        if any(b <= a for a, b in zip(pts_ms, pts_ms[1:], strict=False)) or not pts_ms:
            raise ValueError("frame_times_s must be non-empty and strictly increasing (at ms resolution)")
        time_base = Fraction(1, 1000)
        frame_pts = pts_ms
        last_frame_ms = int(round(1000 / fps))
        video_end_s = (pts_ms[-1] + last_frame_ms) / 1000
    else:
        time_base = Fraction(1, fps)
        frame_pts = list(range(max(1, int(round(duration_s * fps)))))
        video_end_s = len(frame_pts) / fps

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        vstream = cast(
            av.video.stream.VideoStream,
            container.add_stream(codec, rate=fps, options=dict(_VIDEO_OPTIONS.get(codec, {})) | (video_options or {})),
        )
        vstream.width, vstream.height = width, height
        odd = width % 2 or height % 2
        vstream.pix_fmt = pix_fmt or ("yuv444p" if odd and codec in ("libx264", "libx265") else "yuv420p")
        if codec in ("libvpx", "libvpx-vp9", "mpeg2video"):
            vstream.bit_rate = _VIDEO_BIT_RATE
        if frame_times_s is not None:
            vstream.codec_context.time_base = time_base
            vstream.time_base = time_base
        if rotation_deg or hflip or vflip:
            vstream.set_display_rotation(rotation_deg, hflip=hflip, vflip=vflip)

        astream = None
        if audio is not None:
            audio_codec = audio_codec or _AUDIO_CODEC_BY_SUFFIX.get(suffix)
            if audio_codec is None:
                raise ValueError(f"no default audio codec for suffix {suffix!r}; pass audio_codec=")
            audio_rate_hz = audio_rate_hz or (48_000 if audio_codec == "libopus" else 44_100)
            astream = _add_audio_stream(container, audio_codec, audio_rate_hz, audio_channels)

        audio_frames: Iterator[tuple[float, av.AudioFrame]] = iter(())
        if astream is not None and audio is not None and audio_rate_hz is not None:
            length_s = video_end_s - audio_start_s if audio_duration_s is None else audio_duration_s
            signal = _audio_signal(
                audio,
                max(0, int(round(length_s * audio_rate_hz))),
                audio_rate_hz,
                audio_channels,
                tone_hz=tone_hz,
                tone_start_s=max(0.0, tone_start_s - audio_start_s),
                amplitude=audio_amplitude,
                seed=seed,
            )
            audio_frames = _audio_frames(signal, audio_rate_hz, audio_start_s)
        pending_audio = next(audio_frames, None)

        for index, pts in enumerate(frame_pts):
            # Feed audio up to this frame's time so the muxer can interleave the streams as real
            # files are (all video first would make a badly interleaved file).
            while interleave and pending_audio is not None and pending_audio[0] <= float(pts * time_base):
                container.mux(astream.encode(pending_audio[1]))  # type: ignore[union-attr]
                pending_audio = next(audio_frames, None)
            upright = stamped_image(disp_w, disp_h, index) if stamp else _background(disp_w, disp_h, index)
            # Store the picture turned the other way; a player's filters turn it back.
            coded = upright
            for name in to_coded:
                coded = _FILTERS[name](coded)
            coded = np.ascontiguousarray(coded)
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts = pts
            frame.time_base = time_base
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        if astream is not None:
            while pending_audio is not None:
                container.mux(astream.encode(pending_audio[1]))
                pending_audio = next(audio_frames, None)
            container.mux(astream.encode(None))
    return path


def make_audio(
    path: str | os.PathLike[str],
    *,
    duration_s: float = 2.0,
    audio: AudioKind = "tone",
    codec: str | None = None,
    channels: int = 1,
    rate_hz: int | None = None,
    tone_hz: float = 440.0,
    tone_start_s: float = 0.0,
    amplitude: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write an audio-only file (``.m4a``, ``.mp3``, ``.opus``, ``.mka``, ...) and return its path."""
    path = Path(path)
    suffix = path.suffix.lower()
    codec = codec or _AUDIO_CODEC_BY_SUFFIX.get(suffix)
    if codec is None:
        raise ValueError(f"no default audio codec for suffix {suffix!r}; pass codec=")
    rate_hz = rate_hz or (48_000 if codec == "libopus" else 44_100)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = _add_audio_stream(container, codec, rate_hz, channels)
        signal = _audio_signal(
            audio,
            int(round(duration_s * rate_hz)),
            rate_hz,
            channels,
            tone_hz=tone_hz,
            tone_start_s=tone_start_s,
            amplitude=amplitude,
            seed=seed,
        )
        for _, frame in _audio_frames(signal, rate_hz, 0.0):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_corrupt(
    path: str | os.PathLike[str],
    *,
    kind: CorruptKind = "garbage",
    source: str | os.PathLike[str] | None = None,
    keep_fraction: float = 0.02,
    bad_packets: Iterable[int] = (),
    bad_stream: Literal["video", "audio"] = "video",
    size_bytes: int = 20_000,
    seed: int = 0,
) -> Path:
    """Write a damaged or non-media file and return its path.

    Args:
        kind: ``garbage``: ``size_bytes`` random bytes; ``empty``: zero bytes; ``truncated``: the
            first ``keep_fraction`` of ``source`` (for MP4 this cuts the header away);
            ``bad_packets``: ``source``'s video stream remuxed (same container type as ``path``)
            with the payload of the packets numbered in ``bad_packets`` (0-based, in file order)
            replaced by random bytes of the same size: a file that opens but fails to decode there.
            With ``bad_stream="audio"`` the audio track is kept too and its packets are the ones
            numbered and damaged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "garbage":
        path.write_bytes(rng.integers(0, 256, size_bytes, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "bad_packets"):
        if source is None:
            raise ValueError(f"kind={kind!r} needs source= (a valid media file)")
        if kind == "truncated":
            data = Path(source).read_bytes()
            path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
        else:
            _remux_with_bad_packets(Path(source), path, set(bad_packets), rng, bad_stream)
    else:
        raise ValueError(
            f"unknown corrupt kind {kind!r}; choose one of: garbage, truncated, empty, bad_packets"
        )
    return path


def _remux_with_bad_packets(
    source: Path, dest: Path, bad: set[int], rng: np.random.Generator, bad_stream: str = "video"
) -> None:
    with av.open(str(source)) as src, av.open(str(dest), "w") as out:
        in_streams = [src.streams.video[0]] + (list(src.streams.audio[:1]) if bad_stream == "audio" else [])
        out_streams = {s.index: out.add_stream_from_template(s) for s in in_streams}
        damaged = in_streams[-1]
        index = 0
        for packet in src.demux(in_streams):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            to_write: av.Packet = packet
            if packet.stream is damaged:
                if index in bad:
                    to_write = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                    to_write.pts, to_write.dts = packet.pts, packet.dts
                    to_write.time_base, to_write.is_keyframe = packet.time_base, packet.is_keyframe
                index += 1
            to_write.stream = out_streams[packet.stream.index]
            out.mux(to_write)


def combine_streams(path: str | os.PathLike[str], *sources: str | os.PathLike[str],
                    options: dict[str, str] | None = None) -> Path:
    """Copy every stream of ``sources`` (in that order) into one file at ``path``, without re-encoding:
    a video with two audio tracks, say.  ``options``: the muxer's (e.g. an MPEG-TS service id)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = [av.open(str(s)) for s in sources]
    try:
        with av.open(str(path), "w", options=options or {}) as out:
            copies = {(i, s.index): out.add_stream_from_template(s) for i, c in enumerate(inputs) for s in c.streams}
            packets = [(float(p.dts * p.time_base), i, n, p) for i, c in enumerate(inputs)
                       for n, p in enumerate(c.demux()) if p.size and p.dts is not None]
            for _, i, _, packet in sorted(packets, key=lambda e: e[:3]):
                packet.stream = copies[(i, packet.stream.index)]
                out.mux(packet)
    finally:
        for c in inputs:
            c.close()
    return path


def without_decoder(path: str | os.PathLike[str], source: str | os.PathLike[str],
                    stream: Literal["video", "audio"]) -> Path:
    """``source`` (an MP4 of H.264 + AAC) with the first track of ``stream``'s kind relabelled as a codec
    FFmpeg has no decoder for: its AAC as AC-4 (ATSC 3.0 broadcast audio), or its H.264 as an unknown code."""
    data = Path(source).read_bytes()
    if stream == "audio":
        data = data.replace(b"mp4a", b"ac-4", 1).replace(b"esds", b"xsds", 1)
    else:
        data = data.replace(b"avc1", b"xvc1")
    path = Path(path)
    path.write_bytes(data)
    return path


def _mpeg_crc32(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        crc &= 0xFFFFFFFF
    return crc


def make_multiprogram_ts(path: str | os.PathLike[str], *services: str | os.PathLike[str]) -> Path:
    """An MPEG-TS multiplex of several services (programs), as a DVB capture of a whole transponder holds:
    each of ``services`` (a media file) copied into a program of its own (service ids 1, 2, ...), their
    packets interleaved in proportion, the first service's first."""
    path = Path(path)
    parts: list[list[bytes]] = []
    pmt_pids = []
    for n, source in enumerate(services):
        one = path.with_name(f"{path.stem}.service{n + 1}.ts")
        pmt_pids.append(0x1000 + n)
        combine_streams(one, source, options={"mpegts_service_id": str(n + 1),
                                              "mpegts_pmt_start_pid": str(pmt_pids[-1]),
                                              "mpegts_start_pid": str(0x100 * (n + 1))})
        data = one.read_bytes()
        one.unlink()
        packets = [data[i:i + 188] for i in range(0, len(data), 188)]
        parts.append([p for p in packets if ((p[1] & 0x1F) << 8 | p[2]) not in (0x00, 0x11)])  # no PAT, no SDT

    def pat(counter: int) -> bytes:
        body = b"\x00\x01\xc1\x00\x00" + b"".join(
            bytes([(n + 1) >> 8, (n + 1) & 0xFF, 0xE0 | pid >> 8, pid & 0xFF]) for n, pid in enumerate(pmt_pids))
        section = bytes([0x00, 0xB0, len(body) + 4]) + body
        payload = b"\x00" + section + _mpeg_crc32(section).to_bytes(4, "big")
        return bytes([0x47, 0x40, 0x00, 0x10 | counter & 0x0F]) + payload + b"\xff" * (184 - len(payload))

    total = sum(len(p) for p in parts)
    taken = [0] * len(parts)
    out: list[bytes] = []
    for k in range(total):
        if k % 40 == 0:
            out.append(pat(k // 40))
        n = min((i for i in range(len(parts)) if taken[i] < len(parts[i])),
                key=lambda i: (taken[i] / len(parts[i]), i))
        out.append(parts[n][taken[n]])
        taken[n] += 1
    path.write_bytes(b"".join(out))
    return path


def head_of(path: str | os.PathLike[str], source: str | os.PathLike[str], seconds: float) -> Path:
    """The first ``seconds`` of ``source`` (H.264 + AAC, say) at ``path``, without re-encoding: its video packets up
    to the first keyframe at or after ``seconds`` (so every frame kept has what it refers to), its audio up to the
    same time.  A shorter copy of a real clip, for tests that need it in work for a while but not for minutes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        video = src.streams.video[0]
        end_s = min(float(p.pts * p.time_base) for p in src.demux(video)
                    if p.is_keyframe and p.pts is not None and float(p.pts * p.time_base) >= seconds)
        src.seek(0)
        copies = {s.index: out.add_stream_from_template(s) for s in src.streams}
        cut = False
        for packet in src.demux():
            if packet.dts is None or not packet.size:
                continue
            at_s = float(packet.pts * packet.time_base)
            if packet.stream.type == "video":
                cut = cut or (packet.is_keyframe and at_s >= end_s)  # in decode order: B-frames before it stay
                if cut:
                    continue
            elif at_s >= end_s:
                continue
            packet.stream = copies[packet.stream.index]
            out.mux(packet)
    return path
