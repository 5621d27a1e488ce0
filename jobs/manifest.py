"""Manifests: text (one URI a line), CSV or Parquet (a ``uri``/``path``/``video`` column), read lazily."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from jobs.discover import VideoRef, make_video_id
from pipeline.errors import ConfigError

URI_COLUMNS = ("uri", "path", "video", "url", "file")
_BATCH_ROWS = 8192


def _resolve(entry: str, base: Path) -> str:
    entry = entry.strip()
    if "://" in entry:
        return entry
    p = Path(entry).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _ref(entry: str, base: Path) -> VideoRef:
    uri = _resolve(entry, base)
    return VideoRef(uri, make_video_id(uri, entry.strip().split("://", 1)[-1]))


def read_manifest(path: Path) -> Iterator[VideoRef]:
    """Yield the manifest's entries in order; relative paths are relative to the manifest's folder."""
    base = path.resolve().parent
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _ref(line, base)
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            lowered = [h.strip().lower() for h in header]
            col = next((lowered.index(c) for c in URI_COLUMNS if c in lowered), None)
            if col is None:
                raise ConfigError(f"manifest {path}: no column named one of {', '.join(URI_COLUMNS)} "
                                  f"in header {header}; add a 'uri' column")
            for lineno, row in enumerate(reader, start=2):
                if len(row) <= col:
                    raise ConfigError(f"manifest {path} line {lineno}: missing the {header[col]!r} column")
                if row[col].strip():
                    yield _ref(row[col], base)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = [n.lower() for n in pf.schema_arrow.names]
        col = next((pf.schema_arrow.names[names.index(c)] for c in URI_COLUMNS if c in names), None)
        if col is None:
            raise ConfigError(f"manifest {path}: no column named one of {', '.join(URI_COLUMNS)}; "
                              f"columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[col]):
            for entry in batch.column(0).to_pylist():
                if entry:
                    yield _ref(str(entry), base)
    else:
        raise ConfigError(f"manifest {path}: unknown manifest type {suffix!r}; use .txt, .csv or .parquet")
