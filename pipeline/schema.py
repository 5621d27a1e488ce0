"""The output tables' Arrow schemas.  Versioned: every file carries ``vidpipe.schema_version``."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
_META = {b"vidpipe.schema_version": SCHEMA_VERSION.encode()}


def segments_schema(embedding_dim: int | None = None) -> pa.Schema:
    """One row per segment; ``embedding`` only when the job asked for it."""
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("has_audio", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema(fields, metadata=_META)


# multilabel bundles' extra segments column: every label whose probability reached its tuned threshold
ACTIVE_LABELS = pa.field("active_labels", pa.list_(pa.string()), nullable=False)


VIDEOS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("n_segments", pa.int32()),
        pa.field("video_codec", pa.string()),
        pa.field("audio_codec", pa.string()),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("rotation_deg", pa.int32()),
        pa.field("has_audio", pa.bool_()),
        pa.field("audio_channels", pa.int32()),
        pa.field("audio_rate_hz", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata=_META,
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_kind", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("failed_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata=_META,
)

TABLES = ("segments", "videos", "failures")
