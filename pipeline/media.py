"""Values that cross module boundaries: sampling settings, decoded chunks, video facts, failures.

A *segment* is ``[start_s, end_s)`` of fixed length ``segment_seconds``; a *chunk* is a run of
consecutive segments of one video plus ``context`` segments on both sides, the unit that moves
between stages.  Arrays are numpy; a chunk converts to and from one Ray Data row (a dict of arrays)
so that stages never depend on Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

AUDIO_RATE_HZ = 16_000


@dataclass(frozen=True)
class SamplingSpec:
    """How a video is cut and sampled; part of a model bundle (features depend on it)."""

    segment_seconds: float = 1.0
    frames_per_segment: int = 1
    image_size: int = 224
    audio_rate_hz: int = AUDIO_RATE_HZ

    def __post_init__(self) -> None:
        if not (self.segment_seconds > 0 and math.isfinite(self.segment_seconds)):
            raise ValueError(f"segment_seconds must be a positive number, got {self.segment_seconds!r}")
        if self.frames_per_segment < 1:
            raise ValueError(f"frames_per_segment must be >= 1, got {self.frames_per_segment!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size!r}")
        if self.audio_rate_hz < 1000:
            raise ValueError(f"audio_rate_hz must be >= 1000, got {self.audio_rate_hz!r}")

    @property
    def samples_per_segment(self) -> int:
        return int(round(self.segment_seconds * self.audio_rate_hz))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ChunkingSpec:
    """How segments are grouped into chunks. ``core_segments`` is a multiple of the head window."""

    core_segments: int = 64
    context_segments: int = 8

    def __post_init__(self) -> None:
        if self.core_segments < 1:
            raise ValueError(f"core_segments must be >= 1, got {self.core_segments}")
        if self.context_segments < 0:
            raise ValueError(f"context_segments must be >= 0, got {self.context_segments}")


# ``videos.audio_codec`` of a video labelled without audio because this FFmpeg build cannot decode any of its
# audio tracks (AC-4, MPEG-H: PyAV does not say which codec a track without a decoder has)
NO_AUDIO_DECODER = "(no decoder)"


@dataclass
class VideoInfo:
    """Facts about one video, complete once decoding has finished."""

    uri: str
    video_id: str
    duration_s: float
    n_segments: int
    video_codec: str
    width: int
    height: int
    fps: float
    rotation_deg: int
    has_audio: bool
    audio_codec: str | None = None  # NO_AUDIO_DECODER: audio tracks there, none that FFmpeg can decode
    audio_channels: int | None = None
    audio_rate_hz: int | None = None
    size_bytes: int | None = None
    n_frames_decoded: int = 0
    n_frames_skipped: int = 0  # disposable frames no target needed, never decoded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Failure:
    """One video that could not be processed; becomes one ``failures`` row."""

    uri: str
    video_id: str
    stage: str
    error_kind: str
    message: str
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Chunk:
    """Decoded segments ``first_segment .. first_segment + n - 1`` of one video.

    Only segments ``core_start .. core_end - 1`` are labelled from this chunk; the others are
    context for the head.  ``info`` is set on the last chunk of a video only.
    """

    video_id: str
    uri: str
    chunk_index: int
    is_last: bool
    first_segment: int
    core_start: int
    core_end: int
    start_s: np.ndarray  # float64 [n]
    end_s: np.ndarray  # float64 [n]
    frames: np.ndarray  # uint8 [n, frames_per_segment, H, W, 3]
    frame_pts_s: np.ndarray  # float64 [n, frames_per_segment]; pts of the frame shown, NaN if none
    audio: np.ndarray  # float32 [n, samples_per_segment], zero-padded
    audio_valid_samples: np.ndarray  # int32 [n]: real (not padding) samples per segment
    has_audio: bool
    info: VideoInfo | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.start_s)
        for name in ("end_s", "frames", "frame_pts_s", "audio", "audio_valid_samples"):
            arr = getattr(self, name)
            if len(arr) != n:
                raise ValueError(f"Chunk.{name} has {len(arr)} rows, expected {n} (start_s)")
        if self.frames.ndim != 5 or self.frames.dtype != np.uint8:
            raise ValueError(f"Chunk.frames must be uint8 [n, k, H, W, 3], got {self.frames.dtype} {self.frames.shape}")
        if not (self.first_segment <= self.core_start <= self.core_end <= self.first_segment + n):
            raise ValueError(
                f"core [{self.core_start}, {self.core_end}) outside chunk "
                f"[{self.first_segment}, {self.first_segment + n})"
            )

    @property
    def n_segments(self) -> int:
        return len(self.start_s)

    @property
    def core_slice(self) -> slice:
        return slice(self.core_start - self.first_segment, self.core_end - self.first_segment)

    def __repr__(self) -> str:
        return (
            f"Chunk(video_id={self.video_id!r}, chunk_index={self.chunk_index}, is_last={self.is_last}, "
            f"segments=[{self.first_segment}, {self.first_segment + self.n_segments}), "
            f"core=[{self.core_start}, {self.core_end}), frames={tuple(self.frames.shape)}, "
            f"audio={tuple(self.audio.shape)}, has_audio={self.has_audio})"
        )
