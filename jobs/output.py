"""The output directory and its commit protocol.

Layout::

    OUT/segments/part-<run>-<seq>.parquet   one row per segment
    OUT/videos/part-<run>-<seq>.parquet     one row per finished video
    OUT/failures/part-<run>-<seq>.parquet   one row per failed video
    OUT/_job/job.json                       the job's identity (bundle id, sampling)
    OUT/_job/commits/<run>-<seq>.json       one record per committed flush
    OUT/_job/staging/                       files written but not yet committed

A flush holds only *complete* videos.  Its files are written under ``staging/``, then the commit
record is written atomically (``os.replace``), then the files are renamed into place.  A crash
before the record leaves only staging files, which the next run deletes; a crash after it is rolled
forward by the next run (or read from staging by ``vidpipe query``).  So a reader never sees a
partial chunk or a video twice, and a rerun skips every committed video.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.media import Failure, VideoInfo
from pipeline.schema import FAILURES_SCHEMA, TABLES, VIDEOS_SCHEMA, segments_schema

log = logging.getLogger(__name__)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Commit:
    """One committed flush: the data files it made visible and the videos they hold."""

    name: str
    files: dict[str, str]  # table → file name (within the table's directory)
    n_videos: int
    n_failures: int
    n_segments: int

    @classmethod
    def read(cls, path: Path) -> Commit:
        d = json.loads(path.read_text(encoding="utf-8"))
        return cls(name=d["name"], files=d["files"], n_videos=d["n_videos"], n_failures=d["n_failures"],
                   n_segments=d["n_segments"])

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


class OutputDir:
    """Paths of an output directory and its recovery."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.job_dir = self.root / "_job"
        self.commits_dir = self.job_dir / "commits"
        self.staging_dir = self.job_dir / "staging"

    def table_dir(self, table: str) -> Path:
        return self.root / table

    def create(self) -> None:
        for d in (self.commits_dir, self.staging_dir, *(self.table_dir(t) for t in TABLES)):
            d.mkdir(parents=True, exist_ok=True)

    def commits(self) -> list[Commit]:
        if not self.commits_dir.is_dir():
            return []
        return [Commit.read(p) for p in sorted(self.commits_dir.glob("*.json"))]

    def committed_files(self, table: str) -> list[Path]:
        """Every committed file of ``table`` where it is now (in place, or still in staging)."""
        out = []
        for c in self.commits():
            name = c.files.get(table)
            if not name:
                continue
            final = self.table_dir(table) / name
            staged = self.staging_dir / name
            out.append(final if final.exists() else staged)
        return out

    def recover(self) -> None:
        """Roll committed flushes forward and delete what no commit names (a crashed run's leftovers)."""
        committed: dict[str, set[str]] = {t: set() for t in TABLES}
        for c in self.commits():
            for table, name in c.files.items():
                committed[table].add(name)
                staged, final = self.staging_dir / name, self.table_dir(table) / name
                if staged.exists() and not final.exists():
                    os.replace(staged, final)
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                p.unlink()
        for table in TABLES:
            d = self.table_dir(table)
            if d.is_dir():
                for p in d.glob("*.parquet"):
                    if p.name not in committed[table]:
                        log.warning("removing uncommitted output file %s (left by an interrupted run)", p)
                        p.unlink()

    def finished_video_ids(self, *, include_failed: bool = True) -> set[str]:
        """Video ids that a committed flush holds (done, and by default failed too)."""
        ids: set[str] = set()
        tables = ("videos", "failures") if include_failed else ("videos",)
        for table in tables:
            for p in self.committed_files(table):
                ids.update(pq.read_table(p, columns=["video_id"]).column("video_id").to_pylist())
        return ids


@dataclass
class _VideoBuffer:
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)
    n_chunks: int | None = None
    info: VideoInfo | None = None
    uri: str = ""


class ResultWriter:
    """Collects head output per video and commits complete videos in batches of sensible size."""

    def __init__(self, out: OutputDir, *, model_id: str, labels: list[str], embedding_dim: int | None = None,
                 flush_segments: int = 200_000, flush_seconds: float = 60.0) -> None:
        self.out = out
        self.model_id = model_id
        self.labels = np.asarray(labels, dtype=object)
        self.embedding_dim = embedding_dim
        self.flush_segments = flush_segments
        self.flush_seconds = flush_seconds
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._seq = 0
        self._buffers: dict[str, _VideoBuffer] = {}
        self._ready_segments: list[pa.Table] = []
        self._ready_videos: list[dict[str, Any]] = []
        self._ready_failures: list[dict[str, Any]] = []
        self._ready_n_segments = 0
        self._last_flush = time.monotonic()
        self.videos_done = 0
        self.videos_failed = 0
        self.video_seconds_done = 0.0
        self.segments_written = 0

    # -- input ---------------------------------------------------------------------------------------------
    def add_row(self, row: dict[str, Any]) -> None:
        """Take one head-output row (a chunk's results or a failure row)."""
        video_id = str(row["video_id"])
        if row.get("error_kind"):
            self._buffers.pop(video_id, None)
            self.add_failure(Failure(uri=str(row["uri"]), video_id=video_id, stage=str(row["error_stage"]),
                                     error_kind=str(row["error_kind"]), message=str(row["error_message"])))
            return
        buf = self._buffers.setdefault(video_id, _VideoBuffer(uri=str(row["uri"])))
        idx = int(row["chunk_index"])
        buf.chunks[idx] = {k: row[k] for k in ("segment_index", "start_s", "end_s", "topk_idx", "topk_scores",
                                               "has_audio", *(("embedding",) if self.embedding_dim else ()))}
        if bool(row["is_last"]):
            buf.n_chunks = idx + 1
            info_json = str(row.get("info_json") or "")
            buf.info = VideoInfo.from_dict(json.loads(info_json)) if info_json else None
        if buf.n_chunks is not None and len(buf.chunks) == buf.n_chunks:
            del self._buffers[video_id]
            self._finish_video(video_id, buf)
        self.maybe_flush()

    def add_failure(self, failure: Failure) -> None:
        self._ready_failures.append(failure.to_dict() | {"model_id": self.model_id, "failed_at": _now()})
        self.videos_failed += 1

    @property
    def pending_videos(self) -> int:
        return len(self._buffers)

    # -- assembling ------------------------------------------------------------------------------------------
    def _finish_video(self, video_id: str, buf: _VideoBuffer) -> None:
        parts = [buf.chunks[i] for i in range(buf.n_chunks or 0)]
        seg_index = np.concatenate([np.asarray(p["segment_index"], np.int32) for p in parts])
        expected = buf.info.n_segments if buf.info is not None else len(seg_index)
        if not np.array_equal(seg_index, np.arange(expected, dtype=np.int32)):
            self.add_failure(Failure(uri=buf.uri, video_id=video_id, stage="sink", error_kind="internal_error",
                                     message=f"chunks gave segments {seg_index.tolist()[:5]}... expected 0..{expected - 1}"))
            return
        idx = np.concatenate([np.asarray(p["topk_idx"], np.int32).reshape(len(p["segment_index"]), -1)
                              for p in parts])
        scores = np.concatenate([np.asarray(p["topk_scores"], np.float32).reshape(len(p["segment_index"]), -1)
                                 for p in parts])
        n, k = idx.shape
        has_audio = bool(parts[0]["has_audio"])
        cols: dict[str, Any] = {
            "video_id": pa.array([video_id] * n, pa.string()),
            "segment_index": pa.array(seg_index, pa.int32()),
            "start_s": pa.array(np.concatenate([np.asarray(p["start_s"], np.float64) for p in parts])),
            "end_s": pa.array(np.concatenate([np.asarray(p["end_s"], np.float64) for p in parts])),
            "label": pa.array(self.labels[idx[:, 0]].tolist(), pa.string()),
            "score": pa.array(scores[:, 0], pa.float32()),
            "topk_labels": pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                                    pa.array(self.labels[idx.reshape(-1)].tolist(), pa.string())),
            "topk_scores": pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                                    pa.array(scores.reshape(-1), pa.float32())),
            "has_audio": pa.array([has_audio] * n, pa.bool_()),
            "model_id": pa.array([self.model_id] * n, pa.string()),
        }
        schema = segments_schema(self.embedding_dim)
        if self.embedding_dim:
            emb = np.concatenate([np.asarray(p["embedding"], np.float32).reshape(len(p["segment_index"]), -1)
                                  for p in parts])
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.embedding_dim)
        self._ready_segments.append(pa.Table.from_pydict(cols, schema=schema))
        self._ready_n_segments += n
        info = buf.info
        video = {"uri": buf.uri, "video_id": video_id, "status": "ok", "model_id": self.model_id,
                 "finished_at": _now()}
        if info is not None:
            video |= {k: getattr(info, k) for k in ("duration_s", "n_segments", "video_codec", "audio_codec", "fps",
                                                   "width", "height", "rotation_deg", "has_audio", "audio_channels",
                                                   "audio_rate_hz", "size_bytes")}
            self.video_seconds_done += info.duration_s
        self._ready_videos.append(video)
        self.videos_done += 1

    # -- committing -----------------------------------------------------------------------------------------
    def maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if self._ready_n_segments >= self.flush_segments or (due and (self._ready_videos or self._ready_failures)):
            self.flush()

    def flush(self) -> Commit | None:
        """Commit every complete video collected so far."""
        self._last_flush = time.monotonic()
        if not (self._ready_videos or self._ready_failures):
            return None
        self._seq += 1
        name = f"{self.run_id}-{self._seq:05d}"
        files: dict[str, str] = {}
        n_segments = self._ready_n_segments
        if self._ready_videos:
            seg = pa.concat_tables(self._ready_segments).sort_by([("video_id", "ascending"),
                                                                  ("segment_index", "ascending")])
            files["segments"] = self._stage(seg, name)
            files["videos"] = self._stage(pa.Table.from_pylist(self._ready_videos, schema=VIDEOS_SCHEMA), name)
        if self._ready_failures:
            files["failures"] = self._stage(pa.Table.from_pylist(self._ready_failures, schema=FAILURES_SCHEMA),
                                            name)
        commit = Commit(name=name, files=files, n_videos=len(self._ready_videos),
                        n_failures=len(self._ready_failures), n_segments=n_segments)
        _atomic_write_text(self.out.commits_dir / f"{name}.json", commit.to_json())
        for table, fname in files.items():
            os.replace(self.out.staging_dir / fname, self.out.table_dir(table) / fname)
        self.segments_written += n_segments
        self._ready_segments, self._ready_videos, self._ready_failures = [], [], []
        self._ready_n_segments = 0
        return commit

    def _stage(self, table: pa.Table, name: str) -> str:
        # staging is shared by the three tables: the random suffix keeps their names apart
        fname = f"part-{name}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.out.staging_dir / fname
        pq.write_table(table, path, compression="zstd")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return fname


def _now() -> datetime:
    return datetime.now(timezone.utc)
