"""The row format that moves between stages: one row per chunk, a dict of numpy columns.

Per-segment arrays (frames, audio, embeddings, labels) are *ragged* across rows (chunks differ in
length), so a batch column holds either a regular ``[B, ...]`` array (equal shapes) or an object
array of arrays; ``iter_rows`` hides the difference.  Failure rows carry no segments and a non-empty
``error_kind``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.media import Chunk, Failure, VideoInfo

Batch = dict[str, np.ndarray]
Row = dict[str, Any]

STAGE_NAMES = ("decode", "image_encoder", "audio_encoder", "head")
# Per-row accounting each stage fills in for itself: seconds it was busy on this row and its
# process's peak RSS; the driver sums them for `vidpipe bench` (per-stage throughput, busy fraction).
# ``bf16_emulated``: 1 where an encoder ran this row in bf16 on a CPU without native bf16 (a node that joined a
# bf16 job later, or --precision bf16 there): the driver says so, since that is several times slower than fp32.
METRIC_COLUMNS = (tuple(f"busy_{s}_s" for s in STAGE_NAMES) + tuple(f"rss_{s}_mb" for s in STAGE_NAMES)
                  + ("bf16_emulated",))
# Identity columns every stage passes through unchanged (metrics: each stage sets its own).
KEY_COLUMNS = ("video_id", "uri", "chunk_index", "is_last", "first_segment", "core_start", "core_end", "has_audio",
               "info_json", "error_stage", "error_kind", "error_message", *METRIC_COLUMNS)


def iter_rows(batch: Batch) -> Iterator[Row]:
    """Yield one dict per row of a numpy batch."""
    n = len(batch["video_id"])
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def to_batch(rows: list[Row]) -> Batch:
    """Build a numpy batch from rows; array values become ragged object columns."""
    if not rows:
        return {}
    out: Batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            col = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                col[i] = v
            out[key] = col
        elif isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.asarray(values)
    return out


def chunk_row(chunk: Chunk) -> Row:
    """A decoded chunk as one row."""
    return {
        "video_id": chunk.video_id,
        "uri": chunk.uri,
        "chunk_index": chunk.chunk_index,
        "is_last": bool(chunk.is_last),
        "first_segment": chunk.first_segment,
        "core_start": chunk.core_start,
        "core_end": chunk.core_end,
        "has_audio": bool(chunk.has_audio),
        "info_json": json.dumps(chunk.info.to_dict()) if chunk.info is not None else "",
        "error_stage": "",
        "error_kind": "",
        "error_message": "",
        **{c: 0.0 for c in METRIC_COLUMNS},
        "start_s": np.ascontiguousarray(chunk.start_s, dtype=np.float64),
        "end_s": np.ascontiguousarray(chunk.end_s, dtype=np.float64),
        "frames": np.ascontiguousarray(chunk.frames),
        "audio": np.ascontiguousarray(chunk.audio, dtype=np.float32),
        "audio_valid_samples": np.ascontiguousarray(chunk.audio_valid_samples, dtype=np.int32),
    }


def failure_row(failure: Failure, empty: Row) -> Row:
    """A failed video as one row with no segments; downstream stages pass it through.

    ``empty`` holds the producing stage's array columns with zero rows, so that every row of a
    stage's output has the same columns and dtypes.
    """
    return empty | {
        "video_id": failure.video_id,
        "uri": failure.uri,
        "chunk_index": -1,
        "is_last": True,
        "first_segment": 0,
        "core_start": 0,
        "core_end": 0,
        "has_audio": False,
        "info_json": "",
        "error_stage": failure.stage,
        "error_kind": failure.error_kind,
        "error_message": failure.message,
        **{c: 0.0 for c in METRIC_COLUMNS},
    }


def is_failure(row: Row) -> bool:
    return bool(row.get("error_kind"))


def row_failure(row: Row) -> Failure:
    return Failure(uri=str(row["uri"]), video_id=str(row["video_id"]), stage=str(row["error_stage"]),
                   error_kind=str(row["error_kind"]), message=str(row["error_message"]))


def row_info(row: Row) -> VideoInfo | None:
    text = str(row.get("info_json") or "")
    return VideoInfo.from_dict(json.loads(text)) if text else None


def keys_of(row: Row) -> Row:
    """The identity columns of a row (what a stage copies into its output row)."""
    return {k: _plain(row[k]) for k in KEY_COLUMNS}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux from ``VmHWM`` (the high-water mark of this process's own address space);
    ``ru_maxrss`` would report a spawned process's parent's size at the fork if that was larger.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _plain(v: Any) -> Any:
    # numpy scalars from a batch → Python scalars, so to_batch builds clean columns.
    return v.item() if isinstance(v, np.generic) else v
