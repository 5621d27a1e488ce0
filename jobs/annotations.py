"""Segment annotations for training and evaluation: read them, check them, turn them into per-segment targets.

Two file formats:

- **Table** (``.csv``, ``.tsv`` or ``.parquet``): columns ``video, start_s, end_s, label`` (other columns are
  ignored).  ``video`` is a path relative to ``--videos``, an absolute path, or a URI (``s3://...``).
- **AVE** (the Audio-Visual Event dataset's ``Annotations.txt`` and its ``trainSet.txt`` / ``valSet.txt`` /
  ``testSet.txt``): a header line, then ``Category&VideoID&Quality&StartTime&EndTime`` per line; the video
  is ``<VideoID>.mp4`` under ``--videos``.  Recognised by the ``&`` separators.

The labelling rule (:func:`segment_targets`): a segment ``[a, b)`` takes an annotation's label when the
annotation covers at least half of it (``overlap >= (b - a) / 2``).  A segment that no annotation covers
that much gets ``background`` (as in AVE) or, with ``unlabeled="ignore"``, no target (it is left out of
training and evaluation).  In ``multiclass`` mode overlapping annotations of one video with different labels
are an error; in ``multilabel`` mode every label that covers half a segment is active on it.  A multilabel
vocabulary without ``background`` (a bundle trained on annotations that cover every segment) gives such a
segment no active label: that is how a multilabel head says "none of these".
"""

from __future__ import annotations

import csv
import datetime
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from jobs.discover import make_video_id
from jobs.manifest import first_non_utf8_line, path_cell, utf8_cell
from pipeline.errors import ConfigError
from pipeline.inputs import file_uri_path, path_uri

BACKGROUND = "background"
UnlabeledMode = Literal["background", "ignore"]
TaskKind = Literal["multiclass", "multilabel"]
UNLABELED_MODES: tuple[str, ...] = get_args(UnlabeledMode)
REQUIRED_COLUMNS = ("video", "start_s", "end_s", "label")
AVE_SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}


@dataclass(frozen=True)
class Annotation:
    """One labelled time span of one video; ``line`` is where it came from (for error messages)."""

    uri: str
    start_s: float
    end_s: float
    label: str
    line: int


@dataclass(frozen=True)
class AnnotatedVideo:
    """A video named by the annotations: its URI, stable id and the spans labelled in it (sorted by start)."""

    uri: str
    video_id: str
    annotations: tuple[Annotation, ...]


@dataclass
class AnnotationSet:
    """Every video of an annotation file, the label vocabulary, and (AVE) the dataset's own split."""

    source: str
    videos: list[AnnotatedVideo]
    labels: list[str]
    unlabeled: UnlabeledMode = "background"
    task: TaskKind = "multiclass"
    splits: dict[str, str] = field(default_factory=dict)  # uri -> train/val/test, from AVE split files

    def __repr__(self) -> str:
        return (f"AnnotationSet(source={self.source!r}, videos={len(self.videos)}, labels={self.labels}, "
                f"task={self.task!r}, unlabeled={self.unlabeled!r}, splits={len(self.splits)})")

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


def _resolve_video(entry: str, videos_root: Path | None, where: str) -> str:
    entry = entry.strip()
    if not entry:
        raise ConfigError(f"{where}: empty video")
    if "://" in entry and not entry.startswith("file://"):
        return entry  # remote: checked when it is decoded
    path = Path(file_uri_path(entry) if entry.startswith("file://") else entry).expanduser()
    if not path.is_absolute():
        if videos_root is None:
            raise ConfigError(f"{where}: video {entry!r} is a relative path; pass --videos DIR to resolve it")
        path = videos_root / path
    if not path.is_file():
        what = "a directory, not a video file" if path.is_dir() else "no such file"
        windows = ("; write folders with '/' (a '\\' is part of a file's name here)"
                   if "\\" in entry and not path.exists() else "")
        raise ConfigError(f"{where}: unknown video {entry!r}: {what} {str(path)!r}"
                          + (f" (resolved against --videos {videos_root})" if videos_root else "") + windows)
    return path_uri(str(path.resolve()))


def label_list(labels: list[str]) -> str:
    """Labels for a message: one holding a comma (or quotes, spaces at an end) is quoted, so the list reads once."""
    return ", ".join(repr(name) if "," in name or "'" in name or '"' in name or name != name.strip() else name
                     for name in labels)


def _number(value: object, column: str, where: str) -> float:
    if isinstance(value, datetime.timedelta):  # a Parquet duration column
        value = value.total_seconds()
    try:
        text = str(value).strip()
        if "_" in text:  # Python's float() reads "1_0" as 10: a typo, not a number a table holds
            raise ValueError(text)
        x = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {column} {value!r} is not a number of seconds") from None
    if not math.isfinite(x) or x < 0:
        raise ConfigError(f"{where}: {column} must be a finite number of seconds >= 0, got {value!r}")
    return x


def _table_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    """``(line number, row)`` of a CSV/TSV (line 1 is the header) or Parquet file (row n is "row n")."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names  # before reading: pyarrow refuses a column named twice, unnamed
        lowered = [n.strip().lower() for n in columns]
        twice = [c for c in REQUIRED_COLUMNS if lowered.count(c) > 1]
        if twice:
            raise ConfigError(f"annotations {path}: columns {', '.join(twice)} appear more than once "
                              f"(has {columns}); keep one of each")
        table = pq.read_table(path)
        names = {n.strip().lower(): n for n in table.column_names}
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ConfigError(f"annotations {path}: missing columns {missing}; need {', '.join(REQUIRED_COLUMNS)} "
                              f"(has {table.column_names})")
        cols = {c: table.column(names[c]).to_pylist() for c in REQUIRED_COLUMNS}
        return [(i + 1, {c: cols[c][i] for c in REQUIRED_COLUMNS}) for i in range(table.num_rows)]
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"annotations {path}: the file is empty; expected a header {','.join(REQUIRED_COLUMNS)}")
        lowered = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in lowered]
        if missing:
            other = next((sep for sep in (";", "\t", ",") if sep != delimiter and len(header) == 1
                          and header[0].count(sep) >= len(REQUIRED_COLUMNS) - 1), None)
            hint = "" if other is None else (
                f"; its cells are separated by {'tabs' if other == chr(9) else repr(other)}, a {path.suffix} by "
                f"{'tabs' if delimiter == chr(9) else 'commas'}: " + (
                    "name it .tsv" if other == "\t" else "name it .csv" if other == "," else
                    "save it with commas (.csv) or tabs (.tsv)"))
            raise ConfigError(f"annotations {path} line 1: missing columns {missing}; the header must name "
                              f"{', '.join(REQUIRED_COLUMNS)} (got {header}){hint}")
        twice = [c for c in REQUIRED_COLUMNS if lowered.count(c) > 1]
        if twice:  # which one holds the times or labels is anyone's guess
            raise ConfigError(f"annotations {path} line 1: the header names {', '.join(twice)} more than once "
                              f"(got {header}); keep one column of each")
        index = {c: lowered.index(c) for c in REQUIRED_COLUMNS}
        rows: list[tuple[int, dict[str, object]]] = []
        ended = reader.line_num  # the file's lines read so far: a quoted value may hold line breaks
        for row in reader:
            lineno, ended = ended + 1, reader.line_num
            if ended > lineno and any("\n" in x or "\r" in x for x in row):
                # a quote not closed on its line takes the lines after it into one value ('beep\ntone2.mp4,2,4,beep'
                # was trained as a label, the rows in it lost)
                raise ConfigError(f"annotations {path} line {lineno}: a quoted value runs on to line {ended}: a quote "
                                  '(") opened on this line is not closed on it; close it (a quote inside a value is '
                                  'written twice: "a ""b"" c")')
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) <= max(index.values()) or (len(row) > len(header) and any(x.strip() for x in row[len(header):])):
                # more cells than the header: an unquoted comma in a label ('noise, loud' was trained as 'noise')
                more = (f"; a value holding a {'comma' if delimiter == ',' else 'tab'} must be quoted "
                        '("noise, loud")') if len(row) > len(header) else ""
                raise ConfigError(f"annotations {path} line {lineno}: {len(row)} fields, the header has "
                                  f"{len(header)}{more}")
            rows.append((lineno, {c: row[i] for c, i in index.items()}))
        return rows


def _is_ave(path: Path) -> bool:
    if path.suffix.lower() not in (".txt", ""):
        return False
    with open(path, encoding="utf-8-sig") as f:
        head = [line for _, line in zip(range(3), f, strict=False)]
    return any(line.count("&") == 4 for line in head)


def _ave_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    rows: list[tuple[int, dict[str, object]]] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("&")
            if len(parts) != 5:
                raise ConfigError(f"annotations {path} line {lineno}: expected Category&VideoID&Quality&StartTime&EndTime "
                                  f"(5 fields separated by '&'), got {len(parts)} fields")
            category, video_id, _quality, start, end = (p.strip() for p in parts)
            if lineno == 1 and category.lower() == "category":
                continue  # the header
            rows.append((lineno, {"video": f"{video_id}.mp4", "start_s": start, "end_s": end, "label": category}))
    return rows


def _ave_splits(path: Path, videos_root: Path | None) -> dict[str, str]:
    """uri -> split, from the AVE split files beside an ``Annotations.txt`` (none when they are absent)."""
    splits: dict[str, str] = {}
    if path.name != "Annotations.txt":
        return splits
    for split, name in AVE_SPLIT_FILES.items():
        split_path = path.with_name(name)
        if not split_path.is_file():
            continue
        for lineno, row in _ave_rows(split_path):
            uri = _resolve_video(str(row["video"]), videos_root, f"annotations {split_path} line {lineno}")
            splits[uri] = split
    return splits


def read_annotations(
    path: str | os.PathLike[str],
    videos: str | os.PathLike[str] | None = None,
    *,
    task: TaskKind = "multiclass",
    unlabeled: UnlabeledMode = "background",
    labels: list[str] | None = None,
) -> AnnotationSet:
    """Read and check an annotation file; every problem raises ConfigError naming the file and line.

    Args:
        videos: the folder that relative ``video`` entries (and AVE video ids) are relative to.
        labels: a fixed vocabulary (evaluation: the bundle's labels); an annotation with another label is an
            error, and so is a multiclass vocabulary without ``background`` unless ``unlabeled="ignore"``.
            None: the sorted labels found, plus ``background`` unless ``unlabeled="ignore"`` (``train`` drops
            it again for multilabel annotations that leave no segment uncovered).
    """
    if task not in ("multiclass", "multilabel"):
        raise ConfigError(f"unknown task {task!r}; choose one of: multiclass, multilabel")
    if unlabeled not in UNLABELED_MODES:
        raise ConfigError(f"unknown --unlabeled mode {unlabeled!r}; choose one of: {', '.join(UNLABELED_MODES)}")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"annotations {path}: is a directory; pass the annotation file (.csv, .tsv, .parquet or "
                          "AVE's Annotations.txt)")
    if not path.is_file():
        raise ConfigError(f"annotations {path}: no such file")
    if path.suffix.lower() not in (".csv", ".tsv", ".parquet", ".txt", ""):
        raise ConfigError(f"annotations {path}: unknown file type {path.suffix!r}; use .csv, .tsv or .parquet with "
                          "columns video,start_s,end_s,label, or AVE's Annotations.txt")
    root = Path(videos).expanduser().resolve() if videos is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--videos {videos}: no such directory")
    try:
        ave = _is_ave(path)
        rows = _ave_rows(path) if ave else _table_rows(path)
    except UnicodeDecodeError as exc:
        number = first_non_utf8_line(path.read_bytes())
        line = f" line {number}" if number is not None else ""
        raise ConfigError(f"annotations {path}{line}: not UTF-8 text ({exc.reason}); save it as UTF-8 CSV/TSV, or "
                          "as Parquet") from None
    except ConfigError:  # a readable file with wrong contents (a missing column): said as it is
        raise
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError: not a Parquet file
        if path.suffix.lower() != ".parquet":
            raise
        raise ConfigError(f"annotations {path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]}); "
                          "write it with a Parquet writer, or name a CSV file .csv") from None
    if not rows:
        raise ConfigError(f"annotations {path}: no annotations in the file")

    by_uri: dict[str, list[Annotation]] = defaultdict(list)
    order: list[str] = []
    for lineno, row in rows:
        where = f"annotations {path} {'line' if path.suffix.lower() != '.parquet' else 'row'} {lineno}"
        # a Parquet column of numbers said "empty video" for 0, and binary strings their repr
        uri = _resolve_video(path_cell(row["video"], "video", where) or "", root, where)
        start, end = _number(row["start_s"], "start_s", where), _number(row["end_s"], "end_s", where)
        if end <= start:
            raise ConfigError(f"{where}: end_s {end:g} <= start_s {start:g}; an annotation must have end_s > start_s")
        label = utf8_cell(row["label"], "label", where, "it as a string") if isinstance(row["label"], bytes) else row["label"]
        label = str(label if label is not None else "").strip()
        if not label:
            raise ConfigError(f"{where}: empty label")
        if labels is not None and label not in labels:
            raise ConfigError(f"{where}: label {label!r} is not one of the model's labels ({label_list(labels)})")
        if uri not in by_uri:
            order.append(uri)
        by_uri[uri].append(Annotation(uri, start, end, label, lineno))

    annotated = []
    for uri in order:
        spans = sorted(by_uri[uri], key=lambda a: (a.start_s, a.end_s))
        if task == "multiclass":
            _check_no_overlap(spans, path)
        rel = os.path.relpath(uri, root) if root is not None and "://" not in uri else uri.split("://", 1)[-1]
        annotated.append(AnnotatedVideo(uri=uri, video_id=make_video_id(uri, rel), annotations=tuple(spans)))

    if labels is None:
        found = sorted({a.label for v in annotated for a in v.annotations})
        if unlabeled == "background" and BACKGROUND not in found:
            found.append(BACKGROUND)
        labels = found
    elif unlabeled == "background" and BACKGROUND not in labels and task == "multiclass":
        # multilabel needs no such label: a segment no annotation covers is one with no label active
        raise ConfigError(f"the model has no {BACKGROUND!r} label, so unannotated segments cannot be scored; "
                          f"pass --unlabeled ignore")
    splits = _ave_splits(path, root) if ave else {}
    return AnnotationSet(source=str(path), videos=annotated, labels=list(labels), unlabeled=unlabeled, task=task,
                         splits=splits)


def _check_no_overlap(spans: list[Annotation], path: Path) -> None:
    # sorted by start: any overlap shows up between a span and the furthest-reaching span before it
    reach: Annotation | None = None
    for a in spans:
        if reach is not None and a.start_s < reach.end_s and a.label != reach.label:
            raise ConfigError(
                f"annotations {path} line {a.line}: [{a.start_s:g}, {a.end_s:g}) {a.label!r} overlaps line {reach.line} "
                f"[{reach.start_s:g}, {reach.end_s:g}) {reach.label!r} in {a.uri}; a multiclass model takes one label "
                f"at a time (overlapping labels need a multilabel one: 'vidpipe train --task multilabel')")
        if reach is None or a.end_s > reach.end_s:
            reach = a


def _label_union(spans: tuple[Annotation, ...]) -> list[tuple[str, float, float]]:
    """Each label's spans merged where they overlap or touch: ``(label, start_s, end_s)``, disjoint per label."""
    merged: list[tuple[str, float, float]] = []
    for a in sorted(spans, key=lambda a: (a.label, a.start_s, a.end_s)):
        if merged and merged[-1][0] == a.label and a.start_s <= merged[-1][2]:
            merged[-1] = (a.label, merged[-1][1], max(merged[-1][2], a.end_s))
        else:
            merged.append((a.label, a.start_s, a.end_s))
    return merged


def segment_targets(video: AnnotatedVideo, start_s: np.ndarray, end_s: np.ndarray, labels: list[str], *,
                    task: TaskKind, unlabeled: UnlabeledMode) -> np.ndarray:
    """Per-segment targets of one video from its annotations (the rule in the module docstring).

    Returns ``multiclass``: int64 ``[n]`` label index, -1 where a segment has no target; ``multilabel``:
    float32 ``[n, L]`` 0/1, with a row of -1 where a segment has no target.
    """
    index = {name: i for i, name in enumerate(labels)}
    n = len(start_s)
    start = np.asarray(start_s, np.float64)
    length = np.asarray(end_s, np.float64) - start
    covered = np.zeros((n, len(labels)), np.float64)  # seconds of each segment covered by each label
    for a in video.annotations:
        if a.label not in index:
            raise ConfigError(f"line {a.line}: label {a.label!r} is not one of the labels {labels}")
    for label, lo, hi in _label_union(video.annotations):  # overlapping spans of one label count once
        overlap = np.clip(np.minimum(end_s, hi) - np.maximum(start, lo), 0.0, None)
        covered[:, index[label]] += overlap
    # a tiny tolerance: a 1 s segment half covered by a span from x.5 must count despite float rounding
    active = covered >= 0.5 * length[:, None] - 1e-6
    active &= covered > 0
    any_active = active.any(axis=1)
    bg = index.get(BACKGROUND)
    if task == "multiclass":
        target = np.where(any_active, covered.argmax(axis=1), -1).astype(np.int64)
        if unlabeled == "background" and bg is not None:
            target[~any_active] = bg
        return target
    multi = active.astype(np.float32)
    if unlabeled == "ignore":
        multi[~any_active] = -1.0
    elif bg is not None:
        multi[~any_active, bg] = 1.0
    # else: a vocabulary without background; the row stays all 0, no label active
    return multi


def warn_spans_past_the_end(annotations: str, videos: list[AnnotatedVideo], features: Mapping[str, Any],
                             say: Callable[[str], None]) -> list[str]:
    """Name the annotation lines whose span starts at or after their video's end: they label nothing
    (a wrong video, or times in another unit), so the model learns 'background' where they were meant; and those
    that end more than twice the video's length and 10 s past it (milliseconds: '0,1500' on a 4-s clip labels it
    whole).  Returns what was said: eval's report keeps it among its notes.

    ``features``: uri -> the decoded video's features (their ``end_s``, whose last is the video's end); a video
    without them (it failed) is not looked at.
    """
    ends = {v.uri: float(features[v.uri].end_s[-1]) for v in videos
            if v.uri in features and len(features[v.uri].end_s)}
    past = [(a, ends[v.uri]) for v in videos if v.uri in ends for a in v.annotations if a.start_s >= ends[v.uri]]
    far = [(a, ends[v.uri]) for v in videos if v.uri in ends for a in v.annotations
           if a.start_s < ends[v.uri] and a.end_s > max(2 * ends[v.uri], ends[v.uri] + 10)]
    said = []
    for spans, one, many, advice in (
            (past, "1 span starts after the video's end and labels no segment",
             "spans start after their video's end and label no segment", "check the times (seconds) and the video paths"),
            (far, "1 span ends far past the video's end (more than twice its length)",
             "spans end far past their video's end (more than twice its length)",
             "check the times: seconds, not milliseconds")):
        if not spans:
            continue
        shown = "; ".join(f"line {a.line}: {a.start_s:g}-{a.end_s:g} s '{a.label}', the video ends at {end:.1f} s"
                          for a, end in spans[:5])
        more = f" (and {len(spans) - 5} more)" if len(spans) > 5 else ""
        what = one if len(spans) == 1 else f"{len(spans)} {many}"
        said.append(f"warning: annotations {annotations}: {what}: {shown}{more}; {advice}")
        say(said[-1])
    return said
