"""The output directory (a local folder or an ``s3://`` prefix) and its commit protocol.

Layout::

    OUT/segments/part-<run>-<seq>-<x>.parquet   one row per segment
    OUT/videos/part-<run>-<seq>-<x>.parquet     one row per finished video
    OUT/failures/part-<run>-<seq>-<x>.parquet   one row per failed video
    OUT/_job/job.json                           the job's identity (bundle id, sampling)
    OUT/_job/progress.json                      the running (or last) run's counters, rewritten atomically
    OUT/_job/commits/<run>-<seq>.json           one record per committed flush
    OUT/_job/commits/checkpoint-<name>.json     many older records folded into one (same content)
    OUT/_job/staging/                           files written but not yet committed
    OUT/_job/lock                               held (flock) by the run writing to a local OUT

A flush holds only *complete* videos.  Its files are written under ``staging/``; then the commit
record is written, atomically (local: temp file + ``fsync`` + ``os.replace``; S3: one PUT); then the
files are moved into place (local: ``os.replace``; S3: copy + delete).  **The commit record is the
only atomic step and the only thing that makes data visible**: readers (``vidpipe query``, a rerun's
done-set) take exactly the files that commit records name, from their table folder or, when the
move has not happened yet, from staging.  A crash before the record leaves staging files that no
record names; the next run deletes them.  A crash after it is rolled forward by the next run (files
moved, or on S3 a staged copy whose final copy already exists is deleted).  So a reader never sees a
partial chunk or a video twice, and a rerun skips every committed video.

Only the driver writes here (workers on any node stream their results back to it), and one run at a
time: a local OUT is locked with ``flock`` (freed by the kernel when the process dies, even by
SIGKILL); on S3, which has no locks, ``progress.json`` is a lease that a live run refreshes every
few seconds and a new run waits out (best effort), unless its driver is known to be gone (a run on the
same machine, in the same boot and pid namespace).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from jobs import stopping
from jobs.fs import Store
from jobs.idset import IdSet
from jobs.progress import count_of, driver_ended, this_process
from pipeline.errors import ConfigError
from pipeline.media import NO_AUDIO_DECODER, Failure, VideoInfo
from pipeline.s3 import unreachable
from pipeline.schema import ACTIVE_LABELS, FAILURES_SCHEMA, TABLES, VIDEOS_SCHEMA, segments_schema
from workers.metrics import StageMeter

if TYPE_CHECKING:
    import pyarrow.parquet as pq

T = TypeVar("T")

log = logging.getLogger(__name__)

JOB = "_job"
COMMITS = "_job/commits"
STAGING = "_job/staging"
CHECKPOINT_PREFIX = "checkpoint-"
COMPACT_AT = 256  # commit records folded into one checkpoint when a run starts with more than this
CLAIMS = f"{JOB}/claims"  # S3: one object per run that claims OUT (OutputDir.lock)
LEASE_S = 30.0  # S3: a run whose progress.json (rewritten every 5 s) is older than this is taken as dead
_JSON_READS = 8  # tries at a small JSON object before it is called damaged (OutputDir.read_json), ~1.2 s in all
_JSON_PAUSE_S = (0.05, 0.1, 0.2)  # the pauses between them; the last one repeats


def _atomic_write_text(path: Path, text: str) -> None:
    Store(path.parent).write_atomic(path.name, text.encode("utf-8"))


def crash_point(step: str) -> None:
    """Test hook: ``VIDPIPE_TEST_CRASH_AT=step:n`` SIGKILLs this process the n-th time ``step`` is reached.

    Steps of a flush: ``staged`` (data files written), ``recorded`` (commit record written),
    ``moved`` (first file moved into place).  Kill tests use it to stop a real driver exactly there.
    """
    spec = os.environ.get("VIDPIPE_TEST_CRASH_AT")
    if not spec or not spec.startswith(step + ":"):
        return
    counter = f"_VIDPIPE_CRASH_COUNT_{step}"
    seen = int(os.environ.get(counter, "0")) + 1
    os.environ[counter] = str(seen)
    if seen >= int(spec.split(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _lock_holder(lock_file: Any, wait_s: float = 1.0) -> str:
    """Which run holds a local OUT's lock, as its lock file says (written right after the lock is taken)."""
    deadline = time.monotonic() + wait_s
    while True:
        lock_file.seek(0)
        try:
            holder = json.loads(lock_file.read() or "null")
        except ValueError:
            holder = None
        if isinstance(holder, dict):
            return f"run {holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}"
        if time.monotonic() >= deadline:
            return "a run that has just started"
        time.sleep(0.05)


@dataclass
class Commit:
    """One committed flush: the data files it made visible and the videos they hold."""

    name: str
    files: dict[str, str]  # table → file name (within the table's directory)
    n_videos: int
    n_failures: int
    n_segments: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Commit:
        """A record's commit; a TypeError where a field is not of its kind (a record edited by hand: it was read,
        and failed later as an AttributeError or TypeError traceback; a helper)."""
        c = cls(name=d["name"], files=d["files"], n_videos=d["n_videos"], n_failures=d["n_failures"],
                n_segments=d["n_segments"])
        if not isinstance(c.name, str) or not c.name:
            raise TypeError(f"its 'name' is {c.name!r}, not a commit's name")
        if not isinstance(c.files, dict) or not all(table in TABLES and isinstance(f, str) and f
                                                    for table, f in c.files.items()):
            raise TypeError("its 'files' is not a table → file name mapping")
        for key in ("n_videos", "n_failures", "n_segments"):
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"its {key!r} is {value!r}, not a count")
        return c

    def rows(self, table: str) -> int:
        """The rows its file of ``table`` holds."""
        return {"segments": self.n_segments, "videos": self.n_videos, "failures": self.n_failures}[table]

    @classmethod
    def read(cls, path: Path) -> Commit:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class MissingCommitted(ConfigError):
    """A commit record names a data file that is in neither its table folder nor staging."""

    def __init__(self, out: OutputDir, table: str, lost: list[tuple[Commit, str]]) -> None:
        self.lost = lost
        # videos finished and failures: a video retried may be in both (its count as videos was one too many)
        held = count_of(sum(c.n_videos for c, _ in lost), "video") + (
            f" and {count_of(n, 'failure')}" if (n := sum(c.n_failures for c, _ in lost)) else "")
        names = ", ".join(out.store.uri_of(f"{table}/{n}") for _, n in lost[:3])
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        super().__init__(
            f"{names}{more} {'is' if len(lost) == 1 else 'are'} missing: committed (with the results of {held}) "
            f"but in neither {table}/ nor _job/staging/ (deleted or moved by hand?). Put "
            f"{'it' if len(lost) == 1 else 'them'} back; or run 'vidpipe repair {shlex.quote(out.uri)}' to drop those "
            "videos' results, so that rerunning the job does them again.")


_NUMBER = (int, float)
# the fields of progress.json that status and the S3 lease read, with their types (each may be absent or null)
_PROGRESS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "state": str, "run_id": str, "updated_at": str, "message": str, "heartbeat": _NUMBER, "inputs_total": int,
    "inputs_finished": int, "discovered": int, "skipped": int, "done": int, "failed": int, "videos_per_s": _NUMBER,
    "steady_videos_per_s": _NUMBER, "video_seconds_per_s": _NUMBER, "steady_video_seconds_per_s": _NUMBER,
    "pid": int, "pid_started": _NUMBER, "supervisor_pid": int, "supervisor_started": _NUMBER}


def wrong_progress_field(progress: dict[str, Any]) -> str | None:
    """What is wrong in a progress.json that parses (a field of the wrong type: a hand edit), or None."""
    for key, kind in _PROGRESS_FIELDS.items():
        value = progress.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            wanted = "a text" if kind is str else "a whole number" if kind is int else "a number"
            return f"its {key!r} is {json.dumps(value)[:40]}, not {wanted}"
    return None


def sized(uri: str, size_bytes: int | None) -> str:
    """The key of "``uri`` had ``size_bytes`` bytes" in a set of finished videos' sizes (None: not recorded)."""
    return f"{uri}\n{size_bytes}"


FILE_NAME_KEY = b"vidpipe.file"  # a data file's own name, in its Parquet footer's key-value metadata


# the columns vidpipe writes to each table (never removed, only added): any other name in a footer is damage
_COLUMNS = {"segments": {*segments_schema(1).names, ACTIVE_LABELS.name}, "videos": set(VIDEOS_SCHEMA.names),
            "failures": set(FAILURES_SCHEMA.names)}


def footer_damage(rel: str, metadata: pq.FileMetaData, rows: int | None = None) -> ValueError | None:
    """What the readable footer of the committed file ``rel`` shows wrong, or None: it names another data file
    (copied over it), it holds other than the ``rows`` its commit record says (another file copied over it: an
    export, or a file of before 2026-12-02, which names none), or a column name is damaged (not UTF-8, or no
    column vidpipe writes: it would read as nulls)."""
    named = (metadata.metadata or {}).get(FILE_NAME_KEY)
    if named is not None and named != rel.rsplit("/", 1)[-1].encode():  # files written before 2026-12-02 name none
        return ValueError(f"it holds the rows of {named.decode(errors='replace')}, another file copied over it")
    if rows is not None and metadata.num_rows != rows:
        # an export of the table copied over a file was read whole: every row it held counted again (a helper)
        return ValueError(f"it holds {metadata.num_rows} rows where its commit record says {rows}: another file "
                          "copied over it")
    try:
        names = metadata.schema.to_arrow_schema().names
    except UnicodeDecodeError as exc:
        return ValueError(f"a column name in its footer is damaged ({exc})")
    unknown = [n for n in names if n not in _COLUMNS.get(rel.split("/", 1)[0], names)]  # staging: table unknown
    if unknown:
        return ValueError(f"its footer names a column vidpipe does not write ({unknown[0]!r}): a damaged name")
    return None


def damaged_message(out: OutputDir, rel: str, exc: Exception, *, more: str = "", pages: bool = False) -> str:
    """What to say of a committed data file that cannot be read (``more``: the others, if any); ``pages``: its
    footer is whole and the damage is in its data pages, which only ``repair --verify`` reads."""
    verify = " --verify" if pages else ""
    return (f"a committed file of {out.uri} is damaged: {out.store.uri_of(rel)}{more} cannot be read "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); restore "
            f"{'them' if more else 'it'}, or run 'vidpipe repair {shlex.quote(out.uri)}{verify}' to drop "
            f"{'their' if more else 'its'} results so that rerunning the job does those videos again")


def _duckdb_read_error(path: str) -> Exception | None:
    """Why DuckDB's own Parquet reader (a user's DuckDB over OUT's files) cannot read every row of ``path``, or
    None.  A file DuckDB cannot open at all (gone, no permission) is raised."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        quoted = path.replace("'", "''")
        reader = con.sql(f"SELECT * FROM read_parquet('{quoted}')").to_arrow_reader(65_536)
        for _ in reader:  # every page, a batch at a time
            pass
    except duckdb.IOException as exc:
        if not os.path.exists(path) or not os.access(path, os.R_OK):
            raise OSError(str(exc)) from exc
        return exc
    except duckdb.Error as exc:  # "TProtocolException: Invalid data", "Out of buffer", a decompression failure
        return exc
    finally:
        con.close()
    return None


_DAMAGE_WORDS = ("deserialize thrift", "corrupt", "don't know what type", "checksum", "decompress",
                 "invalid parquet", "unexpected end of stream", "tprotocolexception", "out of buffer",
                 "invalid ttype")
_TRANSIENT_WORDS = ("aws error", "curl", "connection", "timed out", "timeout", "throttl", "slow down",
                    "service unavailable", "internal error", "network")


def looks_damaged(error_text: str, names: tuple[str, ...] = ()) -> bool:
    """Whether a Parquet reader's error says the bytes are wrong, not that they could not be fetched.

    ``names`` (the file's path, key and bucket) are taken out first: an S3 error quotes them, and a bucket
    named 'corrupt-media' must not make a network error read as damage (repair would drop a whole commit).
    """
    text = error_text
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, "")
    text = text.lower()
    if any(w in text for w in _TRANSIENT_WORDS):
        return False
    return any(w in text for w in _DAMAGE_WORDS)


def _damaged(where: str, why: object, *, repair: str | None = None) -> str:
    """``repair``: the OUT that ``vidpipe repair`` would mend (where it can)."""
    return (f"{where} is damaged ({why}); it was changed by something other than vidpipe: restore it from a "
            "backup, " + (f"or run 'vidpipe repair {shlex.quote(repair)}' to drop it with the files it named (a rerun "
                          "then does their videos again), " if repair else "") + "or run the job again into a new --out")


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

# a data file's name: part-COMMIT-XXXXXXXX.parquet (ResultWriter._stage), COMMIT being RUN_ID-SEQUENCE
_PART_NAME = re.compile(r"part-(.+-\d{5})-[0-9a-f]{8}\.parquet")


class OutputDir:
    """An output directory or ``s3://`` prefix: its paths, commit records, recovery and lock.

    ``root``, ``job_dir``, ``commits_dir``, ``staging_dir`` and ``table_dir()`` are ``Path`` s for a
    local OUT and ``bucket/key`` ``PurePosixPath`` s (pyarrow filesystem paths) for S3.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.store = Store(root)
        self.uri = self.store.uri
        self.local = self.store.local
        self.root: Path | PurePosixPath = Path(self.store.root) if self.local else PurePosixPath(self.store.root)
        self.job_dir = self.root / JOB
        self.commits_dir = self.root / COMMITS
        self.staging_dir = self.root / STAGING
        self._lock_file: Any = None
        self._claim: str | None = None  # S3: this run's claim while it holds OUT (lock)
        self._lease_s = LEASE_S
        self.lost = False  # S3: another run took OUT over (this one stalled past a lease): commit nothing more
        self._rows: dict[str, int] = {}  # committed file name → the rows its commit record says (_records)

    def check_held(self) -> None:
        """On S3, a ConfigError when another run took OUT over: this run gave no sign of life for longer than a
        lease (stopped, suspended, starved), and the other removed its claim as dead.  It finished and
        committed the same videos beside the first one, which every row then held twice."""
        if self._claim is None:
            return
        if not self.lost:
            try:
                self.lost = not self.store.is_file(self._claim)
            except OSError:  # cannot tell now: the commit's own write says whether S3 is there
                return
        if self.lost:
            raise ConfigError(f"another run took over {self.uri} while this one gave no sign of life for more than "
                              f"{self._lease_s:.0f} s (stopped or suspended?); this run stops without committing "
                              "more: that run carries the job on ('vidpipe status' shows it)")

    def __repr__(self) -> str:
        return f"OutputDir({self.uri!r})"

    def table_dir(self, table: str) -> Path | PurePosixPath:
        return self.root / table

    def create(self) -> None:
        for d in (COMMITS, STAGING, *TABLES):
            self.store.makedirs(d)

    def is_output(self) -> bool:
        """Whether a run has ever written here (its ``_job/`` exists)."""
        return self.store.exists(JOB)

    # -- small job files (identity, progress) ------------------------------------------------------
    def read_json(self, rel: str) -> dict[str, Any] | None:
        """``rel`` as a JSON object; None where there is none.

        On S3 a read that meets a rewrite of the key (a run's progress.json, every 5 s) can come back torn: the
        reader takes the size of one version and the bytes of another (on moto, 1 read in 5 under two writers:
        cut off, padded with stray bytes, not UTF-8, or the key gone in between).  A JSON object torn so never
        parses, so such a read is tried again before the object is called damaged (locally, where writes are
        atomic renames, too: it costs ~1.2 s only where the file is damaged or unreadable).  The pauses are jittered, so
        that a reader does not keep step with a writer; a loaded CI machine met five tries torn in a row once.
        """
        for attempt in range(_JSON_READS):
            try:
                obj = json.loads(self.store.read_text(rel))
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                if rel == f"{JOB}/job.json" and (lacks := [k for k in ("model_id", "sampling") if k not in obj]):
                    # '{}' was "another job (model None with sampling None)", and repair called OUT sound
                    raise ValueError(f"it does not say the job's {' or '.join(lacks)}")
                return obj
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as exc:
                # not where no connection to the endpoint could be made: each failed read is ~1.8 s of the
                # client's own tries there, and asks whether the key was deleted (as long again): 17 s in all
                if attempt + 1 < _JSON_READS and not unreachable(exc):
                    time.sleep(_JSON_PAUSE_S[min(attempt, len(_JSON_PAUSE_S) - 1)] * random.uniform(0.75, 1.25))
                    continue
                if isinstance(exc, OSError):
                    raise
                message = _damaged(self.store.uri_of(rel), exc)
                if rel == f"{JOB}/job.json":  # the job's identity: a run rebuilds it, checked against the committed rows
                    message += (", or move it out of OUT and rerun the job's own command: the run records the job "
                                "again, refusing settings other than the committed rows' (model, segment length, "
                                "--top-k, --embeddings)")
                raise ConfigError(message) from None
        raise AssertionError("unreachable")

    def last_progress(self) -> dict[str, Any]:
        """The last run's progress.json; empty when there is none or it is damaged (the run rewrites it)."""
        try:
            progress = self.read_json(f"{JOB}/progress.json") or {}
        except ConfigError:
            return {}
        return {} if wrong_progress_field(progress) else progress  # "heartbeat": "x" was a traceback of run on S3

    def write_json(self, rel: str, obj: dict[str, Any]) -> None:
        self.store.write_atomic(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    # -- commit records ------------------------------------------------------------------------------
    def commits(self, *, past_damaged: bool = False) -> list[Commit]:
        """Every committed flush, in name order (records and checkpoints together, each once); a ConfigError
        where a record is damaged, unless ``past_damaged`` (then those of the records that read whole)."""
        found, damaged = self._records()
        if damaged and not past_damaged:
            name, exc = damaged[0]
            raise ConfigError(_damaged(self.store.uri_of(f"{COMMITS}/{name}"), exc, repair=self.uri) + " (a commit "
                              "record names the files of one flush: without it they cannot be read safely)")
        return found

    def _records(self) -> tuple[list[Commit], list[tuple[str, Exception]]]:
        """The commits of the records that read whole, in name order; and the records that do not, with why."""
        for _ in range(5):
            names = self.store.list_names(COMMITS, ".json")
            try:
                texts = self.map_files(self.store.read_bytes, [f"{COMMITS}/{n}" for n in names])
            except FileNotFoundError:
                continue  # a run folded records into a checkpoint meanwhile: list again
            found: dict[str, Commit] = {}
            damaged: list[tuple[str, Exception]] = []
            for name, text in zip(names, texts, strict=True):
                try:
                    d = json.loads(text)  # bytes: one that is not UTF-8 is damage too (a UnicodeDecodeError)
                    held = [Commit.from_dict(c) for c in (d["commits"] if name.startswith(CHECKPOINT_PREFIX)
                                                          else [d])]
                except (ValueError, KeyError, TypeError) as exc:
                    damaged.append((name, exc))
                    continue
                found.update((c.name, c) for c in held)
            self._rows = {f: c.rows(table) for c in found.values() for table, f in c.files.items()}
            return [found[k] for k in sorted(found)], damaged
        raise RuntimeError(f"the commit records of {self.uri} kept changing while being read; try again")

    def damaged_records(self) -> list[tuple[str, list[str]]]:
        """Each commit record that does not read whole (relative path), with the data files it must have named
        (relative paths): those no other record names whose names carry its commit's name (``part-NAME-*``), or
        for a checkpoint the name of a commit up to its last one; a file that two damaged records could have named
        (a checkpoint and a record it folded) is listed under the first."""
        commits, damaged = self._records()
        if not damaged:
            return []
        named = {name for c in commits for name in c.files.values()}
        ours = [(rel, m[1]) for rel in [*(f"{t}/{n}" for t in TABLES for n in self.store.list_names(t, ".parquet")),
                                        *(f"{STAGING}/{n}" for n in self.store.list_names(STAGING, ".parquet"))]
                if (m := _PART_NAME.fullmatch(PurePosixPath(rel).name)) and PurePosixPath(rel).name not in named]
        result, listed = [], set()
        for record, _ in damaged:
            stem = record[: -len(".json")]
            if stem.startswith(CHECKPOINT_PREFIX):
                last = stem[len(CHECKPOINT_PREFIX):]
                files = [rel for rel, commit in ours if commit <= last and rel not in listed]
            else:
                files = [rel for rel, commit in ours if commit == stem and rel not in listed]
            listed.update(files)
            result.append((f"{COMMITS}/{record}", files))
        return result

    def unaccounted_parts(self, damaged: list[tuple[str, list[str]]]) -> list[str]:
        """Data files in the table folders that neither a record that reads whole nor one of the ``damaged``
        records (:meth:`damaged_records`) names (relative paths)."""
        theirs = {rel for _, files in damaged for rel in files}
        return [rel for rel in self.unrecorded_parts(self.commits(past_damaged=True)) if rel not in theirs]

    def drop_damaged_records(self, damaged: list[tuple[str, list[str]]] | None = None) -> list[tuple[str, list[str]]]:
        """Drop each damaged commit record and its data files (``damaged``, else :meth:`damaged_records`), so that
        a rerun does their videos again: the files go to staging first, then the record; :meth:`recover` (by
        ``forget_missing``) deletes them.  A crash at any step leaves an OUT that a later repair finishes.  Hold the
        lock."""
        dropped = self.damaged_records() if damaged is None else damaged
        # first, before any change: files that neither a record nor a damaged record can have named
        self.refuse_unrecorded(parts=self.unaccounted_parts(dropped),
                               then="Move those files out of it, then run 'vidpipe repair' again.")
        for record, files in dropped:
            for rel in files:
                if not rel.startswith(STAGING + "/"):
                    self.store.move(rel, f"{STAGING}/{PurePosixPath(rel).name}")
            self.store.delete(record)
        return dropped

    def map_files(self, fn: Callable[[str], T], rels: list[str]) -> list[T]:
        """``fn`` of each of ``rels`` (files of OUT), in order: on S3 in parallel."""
        if self.local or len(rels) < 4:
            return [fn(r) for r in rels]
        with ThreadPoolExecutor(16) as pool:  # S3: a GET or two each, so in parallel
            return list(pool.map(fn, rels))

    def committed_rel(self, table: str, commits: list[Commit] | None = None) -> list[str]:
        """Committed files of ``table`` relative to the root: in place, or still in staging.

        A file that a commit names but that is in neither place (deleted or moved by hand) is a
        :class:`MissingCommitted` error that names it: read without it, the output would silently lack
        rows, and a rerun would skip its videos as finished.
        """
        found, lost = self.locate(table, self.commits() if commits is None else commits)
        if lost:
            raise MissingCommitted(self, table, lost)
        return [rel for _, rel in found]

    def locate(self, table: str, commits: list[Commit]) -> tuple[list[tuple[Commit, str]], list[tuple[Commit, str]]]:
        """The committed files of ``table``: ``(commit, relative path)`` of those there, in place or in
        staging, and ``(commit, name)`` of those in neither place."""
        named = [(c, c.files[table]) for c in commits if c.files.get(table)]
        in_place = set(self.store.list_names(table, ".parquet"))
        staged: set[str] = set()
        if any(name not in in_place for _, name in named):
            staged = set(self.store.list_names(STAGING))
            if any(name not in in_place and name not in staged for _, name in named):
                # a running writer may have moved it out of staging between the two listings: list again
                in_place |= set(self.store.list_names(table, ".parquet"))
        found = [(c, f"{table}/{n}" if n in in_place else f"{STAGING}/{n}") for c, n in named
                 if n in in_place or n in staged]
        return found, [(c, n) for c, n in named if n not in in_place and n not in staged]

    def committed_files(self, table: str) -> list[Any]:
        """Every committed file of ``table`` where it is now: local ``Path`` s, or ``bucket/key`` strings."""
        rels = self.committed_rel(table)
        if self.local:
            return [Path(self.store.full(r)) for r in rels]
        return [self.store.full(r) for r in rels]

    def read_committed(self, table: str, columns: list[str]) -> Iterator[pa.Table]:
        """The committed files of ``table``, one table each (``columns`` only)."""
        for rel in self.committed_rel(table):
            try:
                data = self.store.read_table(rel, columns=columns)
            except FileNotFoundError:
                if not rel.startswith(STAGING + "/"):
                    raise
                # moved into place by the running writer since we listed: it is there now
                rel = f"{table}/{rel.rsplit('/', 1)[1]}"
                data = self.store.read_table(rel, columns=columns)
            except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
                if not self.readable_parquet(rel):
                    raise ConfigError(damaged_message(self, rel, exc)) from None
                raise
            yield data

    # -- recovery --------------------------------------------------------------------------------------
    def unrecorded_parts(self, commits: list[Commit] | None = None) -> list[str]:
        """Data files in the table folders that no commit record names (relative paths).

        A run never leaves such a file (it writes into ``_job/staging/`` and moves a file into place only
        after its commit record): another tool wrote it, or its record (or all of ``_job/``) was deleted.
        Either way it is not vidpipe's to delete, and its rows cannot be trusted to be whole.
        """
        # in subfolders too (a partitioned dataset's 'year=2024/'): a reader of 'segments/**' takes them.
        # Listed before the records are read: a running writer moves a file into place only after its record
        found = [f"{t}/{p}" for t in TABLES for p in self.store.list_tree(t, ".parquet")]
        commits = self.commits() if commits is None else commits
        named = {f"{t}/{name}" for c in commits for t, name in c.files.items()}
        return [rel for rel in found if rel not in named]

    def refuse_occupied_tables(self) -> None:
        """For an OUT that is not an output yet: a ConfigError where a table folder already holds files (any kind;
        ``--out s3://archive`` wrote its Parquet beside the archive's own ``videos/*.mp4``).  Hidden files
        (``.DS_Store``) and S3's empty folder markers do not count."""
        from pyarrow import fs as pafs

        taken = []
        for table in TABLES:
            info = self.store.fs.get_file_info(self.store.full(table))
            if info.type == pafs.FileType.NotFound:
                continue
            if info.type != pafs.FileType.Directory:
                taken.append(table)
                continue
            entries = self.store.fs.get_file_info(pafs.FileSelector(self.store.full(table), allow_not_found=True))
            if any(not PurePosixPath(e.path.rstrip("/")).name.startswith(".")
                   and not (e.path.endswith("/") and e.size == 0) for e in entries):
                taken.append(f"{table}/")
        if taken:
            raise ConfigError(f"cannot use --out {self.uri}: it is not a vidpipe output, and its {', '.join(taken)} "
                              "already holds files that vidpipe would write its results among (segments/, videos/ "
                              "and failures/ of a new output are absent or empty); use a new --out directory")

    def refuse_unrecorded(self, commits: list[Commit] | None = None, *, parts: list[str] | None = None,
                          then: str = "Use a new --out directory, or move those files out of it and rerun.") -> None:
        """A ConfigError naming the data files no commit names (``parts``, else :meth:`unrecorded_parts`), if any."""
        parts = self.unrecorded_parts(commits) if parts is None else parts
        if not parts:
            return
        shown = ", ".join(self.store.uri_of(r) for r in parts[:3]) + (f" and {len(parts) - 3} more"
                                                                     if len(parts) > 3 else "")
        whose = ("it has no _job/ folder: it is not a vidpipe output, or its _job/ was removed"
                 if not self.is_output() else "no commit record in _job/commits names them: they were not "
                 "written by a run of this output, or their records were removed")
        raise ConfigError(f"{self.uri} holds data files that vidpipe cannot account for ({shown}); {whose}. "
                          f"Nothing was deleted. {then}{self._renamed_hint(parts, commits)}")

    def _renamed_hint(self, parts: list[str], commits: list[Commit] | None) -> str:
        """Where a file no record names has the name of a commit's file (``part-<commit>-``) other than the one
        its record names: it may be that file renamed (repair named one missing and refused the other; a
        helper)."""
        try:
            by_name = {c.name: c for c in (self.commits(past_damaged=True) if commits is None else commits)}
        except (ConfigError, OSError):
            return ""
        said = []
        for rel in parts:
            table, _, fname = rel.partition("/")
            m = _PART_NAME.fullmatch(fname)
            c = by_name.get(m[1]) if m else None
            if c is not None and c.files.get(table) not in (None, fname):
                said.append(f" {self.store.uri_of(rel)} has the name of a file of commit {c.name}, whose record names "
                            f"{table}/{c.files[table]}: if it is that file renamed, give it that name back.")
        return "".join(said[:3])

    def recover(self) -> None:
        """Roll committed flushes forward, delete staged files no commit names, fold old records into a
        checkpoint; refuse (a ConfigError, nothing changed) when a committed file is missing or a table
        folder holds a data file no commit names.

        Call only while holding the lock (:meth:`lock`): it deletes other runs' staging files.
        """
        commits = self.commits()
        self.refuse_unrecorded(commits)
        rels = [rel for table in TABLES for rel in self.committed_rel(table, commits)]  # MissingCommitted if not
        damaged = self.damaged_files(rels)
        if damaged:  # else a rerun would skip its videos as finished, and only a query would find the damage
            more = f" (and {len(damaged) - 1} more committed files)" if len(damaged) > 1 else ""
            raise ConfigError(damaged_message(self, damaged[0][0], damaged[0][1], more=more))
        staged = set(self.store.list_names(STAGING))
        for c in commits:
            for table, name in c.files.items():
                if name in staged:
                    if self.store.is_file(f"{table}/{name}"):
                        self.store.delete(f"{STAGING}/{name}")  # S3: copied before the crash, not yet deleted
                    else:
                        self.store.move(f"{STAGING}/{name}", f"{table}/{name}")
                    staged.discard(name)
        for name in sorted(staged):
            self.store.delete(f"{STAGING}/{name}")  # written before a crash, never committed
        self._compact(commits)

    def forget_missing(self, *, pages: bool = False,
                       damaged: list[tuple[str, list[str]]] | None = None) -> list[tuple[Commit, list[str]]]:
        """Drop every commit one of whose files is missing or damaged, so that a rerun does its videos again.

        Returns each dropped commit with its missing or damaged files (relative paths); refuses (a ConfigError, nothing
        changed) where a table folder holds a data file no commit names.  The commit's other files
        go back to staging first (still readable through the record), then the record goes (rewritten
        checkpoints, deleted record files), then :meth:`recover` deletes the staged files: a crash at
        any step leaves an output that a later ``forget_missing`` or run finishes cleanly.  Damaged commit records
        (``damaged``, else :meth:`damaged_records`) are dropped first.  Call only while holding the lock.
        """
        self.drop_damaged_records(damaged)  # first: until then no commit can be read
        # before any change: recover() at the end would refuse half-way through
        self.refuse_unrecorded(then="Move those files out of it, then run 'vidpipe repair' again.")
        dropped = self.missing_files(pages=pages)
        for c, _ in dropped:
            for table, name in c.files.items():
                if self.store.is_file(f"{table}/{name}"):  # a damaged one too
                    self.store.move(f"{table}/{name}", f"{STAGING}/{name}")
        gone = {c.name for c, _ in dropped}
        for n in self.store.list_names(COMMITS, ".json"):
            if n.startswith(CHECKPOINT_PREFIX):
                held = json.loads(self.store.read_text(f"{COMMITS}/{n}"))["commits"]
                kept = [c for c in held if c["name"] not in gone]
                if len(kept) != len(held):
                    self._write_checkpoint(n, kept)
            elif n[: -len(".json")] in gone:
                self.store.delete(f"{COMMITS}/{n}")
        self.recover()
        return dropped

    def missing_files(self, *, pages: bool = False, past_damaged_records: bool = False) -> list[tuple[Commit, list[str]]]:
        """The commits whose files are not all there and readable, each with its missing or damaged files
        (relative paths; each present file's Parquet footer is read, with ``pages`` every page too).
        ``past_damaged_records``: of the records that read whole only (else a damaged one is a ConfigError)."""
        commits = self.commits(past_damaged=past_damaged_records)
        lost: dict[str, list[str]] = {}
        found: list[tuple[Commit, str]] = []
        for table in TABLES:
            there, missing = self.locate(table, commits)
            found += there
            for c, name in missing:
                lost.setdefault(c.name, []).append(f"{table}/{name}")
        damaged = {rel for rel, _ in self.damaged_files([rel for _, rel in found], pages=pages)}
        for c, rel in found:
            if rel in damaged:
                lost.setdefault(c.name, []).append(rel)
        return [(c, lost[c.name]) for c in commits if c.name in lost]

    def committed_rows(self, rel: str) -> int | None:
        """The rows the commit record that names ``rel``'s file says it holds (None: no record read names it)."""
        return self._rows.get(rel.rsplit("/", 1)[-1])

    def readable_parquet(self, rel: str) -> bool:
        """Whether ``rel``'s Parquet footer can be read: False for a file cut short or overwritten; a failure to
        reach it (permissions, the network, S3) is raised, not taken as damage."""
        return self.footer_error(rel) is None

    def footer_error(self, rel: str, *, pages: bool = False) -> Exception | None:
        """Why ``rel``'s Parquet footer (with ``pages``, also every data page, CRCs checked) cannot be read: a
        file cut short, overwritten or with damaged bytes; None where it can.  A failure to reach it
        (permissions, the network, S3) is raised, not taken as damage."""
        try:
            if (damage := footer_damage(rel, self.store.read_metadata(rel), self.committed_rows(rel))) is not None:
                return damage
            if pages:
                self.store.read_table(rel, verify=True)
                if self.local:  # and as DuckDB's own reader does: it also reads what pyarrow skips (page indexes)
                    error = _duckdb_read_error(self.store.full(rel))
                    if error is not None:
                        return error
        except ValueError as exc:  # pyarrow's ArrowInvalid: too small, no Parquet magic bytes, a bad page
            return exc
        except OSError as exc:
            # a damaged footer or page header is "Couldn't deserialize thrift: ..."; an S3 or file system error
            # names the key (which ends in .parquet), so only these words count
            if not isinstance(exc, (FileNotFoundError, PermissionError)) and looks_damaged(str(exc),
                                                                                         self._names(rel)):
                return exc
            raise
        return None

    def _names(self, rel: str) -> tuple[str, ...]:
        """The spellings of ``rel`` an error may quote: its path or bucket/key, key, URI, and OUT's bucket."""
        full = self.store.full(rel)
        bucket, _, key = full.partition("/")
        return (full, self.store.uri_of(rel), rel, *(() if self.local else (key, bucket)))

    def damaged_files(self, rels: list[str], *, pages: bool = False) -> list[tuple[str, Exception]]:
        """Of the committed files ``rels`` (found by :meth:`locate`), those that cannot be read, each with why
        (see :meth:`footer_error`)."""
        errors = self.map_files(lambda rel: self.footer_error(rel, pages=pages), rels)
        return [(rel, exc) for rel, exc in zip(rels, errors, strict=True) if exc is not None]

    def _write_checkpoint(self, name: str, commits: list[dict[str, Any]]) -> None:
        """Write (atomically) the checkpoint ``name``: the commit records it holds, as dicts."""
        self.store.write_atomic(f"{COMMITS}/{name}", json.dumps({"commits": commits}).encode("utf-8"))

    def _compact(self, commits: list[Commit]) -> None:
        # Thousands of tiny records make every start and query slow (one GET each on S3).  The
        # checkpoint is written (atomically) before any record it holds is deleted, and readers take
        # the union of both by name, so no moment exists where a commit is missing.
        names = self.store.list_names(COMMITS, ".json")
        records = [n for n in names if not n.startswith(CHECKPOINT_PREFIX)]
        if len(records) <= COMPACT_AT or not commits:
            return
        checkpoint = f"{CHECKPOINT_PREFIX}{commits[-1].name}.json"
        self._write_checkpoint(checkpoint, [asdict(c) for c in commits])
        for n in names:
            if n != checkpoint:
                self.store.delete(f"{COMMITS}/{n}")

    # -- what is finished ------------------------------------------------------------------------------
    def finished_uris(self, *, include_failed: bool = True, sizes: IdSet | None = None) -> tuple[IdSet, IdSet]:
        """URIs of committed videos — done, and by default failed too — and, of those, the ones failed
        now (a committed failure, no ``videos`` row; empty without ``include_failed``), as compact
        :class:`IdSet` s, each committed file read once.  ``sizes``, where given, gets each finished
        video's :func:`sized` key (its URI and the size its file had when it was labelled).

        Keyed by URI, as discovery de-duplicates: a video's id also depends on the input that named it
        (folder, manifest, ...), and a rerun that names the same file another way must still skip it.
        """
        from pipeline.inputs import TRANSIENT_ERROR_KINDS

        uris, failed = IdSet(), IdSet()
        for t in self.read_committed("videos", ["uri"] if sizes is None else ["uri", "size_bytes"]):
            uris.update(t.column("uri").to_pylist())
            if sizes is not None:
                sizes.update(sized(u, n) for u, n in zip(t.column("uri").to_pylist(),
                                                         t.column("size_bytes").to_pylist(), strict=True))
        if include_failed:
            # a video whose every failure was transient (its bytes could not be fetched: a network, or a
            # cluster's workers without the S3 settings) is tried again by a rerun: such a failure says nothing
            # of the video, and a whole archive stayed failed after one misconfigured run
            transient_only: dict[str, bool] = {}
            for t in self.read_committed("failures", ["uri", "error_kind"]):
                for uri, kind in zip(t.column("uri").to_pylist(), t.column("error_kind").to_pylist(), strict=True):
                    if uri not in uris:  # not finished
                        transient_only[uri] = transient_only.get(uri, True) and kind in TRANSIENT_ERROR_KINDS
            for uri, transient in transient_only.items():
                if not transient:
                    failed.add(uri)
                    uris.add(uri)
        return uris, failed

    def finished_video_ids(self, *, include_failed: bool = True) -> set[str]:
        """Video ids that a committed flush holds, as plain strings (small outputs and tests)."""
        ids: set[str] = set()
        for table in ("videos", "failures") if include_failed else ("videos",):
            for t in self.read_committed(table, ["video_id"]):
                ids.update(t.column("video_id").to_pylist())
        return ids

    # -- one writer at a time ------------------------------------------------------------------------
    def _open_lock(self, writes: bool) -> Any:
        """The local lock file, open; where ``writes``, after checking that this user can write the folders a
        run writes (a ConfigError naming the first that refuses: it was an internal error, exit 1, after the work,
        that said to rerun to resume).  Without ``writes`` it may be open read-only: flock takes that too."""
        import tempfile

        try:
            self.store.makedirs(JOB)
        except OSError as exc:
            raise self._unwritable(JOB, exc) from None
        try:
            f = open(self.store.full(f"{JOB}/lock"), "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as exc:
            if writes or exc.errno not in _NOT_WRITABLE:
                raise self._unwritable(JOB, exc) from None
            return open(self.store.full(f"{JOB}/lock"))  # noqa: SIM115
        for folder in [JOB, STAGING, COMMITS, *TABLES] if writes else []:
            if os.path.isdir(self.store.full(folder)):
                try:  # a file without a name (O_TMPFILE): nothing is left behind, whatever happens
                    with tempfile.TemporaryFile(dir=self.store.full(folder)):
                        pass
                except OSError as exc:
                    f.close()
                    raise self._unwritable(folder, exc) from None
        return f

    def _unwritable(self, folder: str, exc: OSError) -> Exception:
        if exc.errno not in _NOT_WRITABLE:
            return exc
        return ConfigError(f"cannot write to {self.store.uri_of(folder)} ({exc.strerror}): a run keeps its lock, "
                           "commit records and results in OUT; make it writable for this user, or give another "
                           "directory ('vidpipe query', 'status' and 'repair --dry-run' only read it)")

    @contextmanager
    def lock(self, run_id: str, *, wait_s: float = 2 * LEASE_S, keepalive: bool = False,
             writes: bool = True) -> Iterator[None]:
        """Hold OUT for one run; another live run makes this wait (S3) or fail (local) with a clear message.

        Locally, a holder that ``writes`` is refused at once, before any work, where this user cannot write the
        folders a run writes; one that does not (``repair --dry-run``) may hold a read-only OUT.

        On S3 the lease is ``progress.json``: a run renews it with its progress; a holder that writes none
        (``vidpipe repair``) passes ``keepalive`` to have it renewed here, and gets the last run's back at the end.
        """
        if self.local:
            import fcntl

            f = self._open_lock(writes)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _lock_holder(f)
                f.close()
                raise ConfigError(f"another vidpipe run is writing to {self.uri} ({who}); wait for it to finish "
                                  "or stop it, then give this command again") from None
            if f.writable():
                # Who holds OUT, for the message of a run refused: progress.json is written later (a run
                # refused in between named the previous run, or none).
                f.seek(0)
                f.truncate()
                from jobs import supervise

                # the process the user started (`vidpipe run`, which supervises this driver), else this one
                pid = supervise.SUPERVISOR_PID or os.getpid()
                f.write(json.dumps({"run_id": run_id, "pid": pid, "host": socket.gethostname()}))
                f.flush()
            self._lock_file = f
            try:
                yield
            finally:
                self._lock_file = None
                f.close()
            return
        deadline = time.time() + wait_s
        lease_s = float(os.environ.get("VIDPIPE_S3_LEASE_S", LEASE_S))  # tests shorten it
        claim = f"{CLAIMS}/{run_id}.json"
        record = {"run_id": run_id, "heartbeat": 0.0, **this_process()}

        def write_claim() -> None:
            record["heartbeat"] = time.time()
            self.write_json(claim, record)

        while True:
            lease = self.last_progress()
            age = time.time() - float(lease.get("heartbeat", 0) or 0)
            # a run whose driver is known to be gone (this machine, this boot) holds nothing: no waiting out its
            # lease after a kill -9, or after a run that could not record its end (its S3 endpoint gone)
            if lease.get("state") != "running" or lease.get("run_id") == run_id or age > lease_s or \
                    driver_ended(lease):
                # no live run holds OUT: claim it. Two runs that both found it free both wrote progress.json and
                # both wrote every row; with a claim each, written and then listed, the later of two claims always
                # sees the earlier one (S3 lists what was written before), so at most one run goes on
                try:
                    write_claim()
                    rivals = self._live_claims(run_id, lease, lease_s)
                    if rivals:
                        self.store.delete(claim)
                except BaseException:
                    self._drop(claim)
                    raise
                if not rivals:
                    break
                holder = {"run_id": rivals[0], "host": "another host or process"}
                age = 0.0
            else:
                holder = lease
            if time.time() > deadline:
                raise ConfigError(f"another vidpipe run is writing to {self.uri} (run {holder.get('run_id')} on "
                                  f"{holder.get('host')}, alive {age:.0f} s ago); stop it or wait, then give this command again")
            log.warning("waiting for run %s to release %s (alive %.0f s ago; a run that sends no sign of life "
                        "for %.0f s is taken as stopped; this run gives up %.0f s from now)",
                        holder.get("run_id"), self.uri, age, lease_s, max(0.0, deadline - time.time()))
            # rivals that met at once retry at random times: one of them gets there first
            time.sleep(min(5.0, lease_s / 2) * (0.5 + random.random()))
        placeholder = {"run_id": run_id, "state": "running", "heartbeat": time.time(), **this_process()}
        stop = threading.Event()

        def renew() -> None:
            # the claim is renewed for as long as OUT is held: before a run's own progress.json beats (its
            # recovery of a large OUT may take longer than a lease), a claim 30 s old let another run in
            while not stop.wait(min(5.0, lease_s / 3)):
                try:
                    if not self.store.is_file(claim):  # removed as dead by a run that took over: not put back
                        self.lost = True
                        log.error("another run took over %s (this run gave no sign of life for more than %.0f s); "
                                  "this run commits nothing more", self.uri, lease_s)
                        return
                    write_claim()
                    if keepalive:
                        placeholder["heartbeat"] = time.time()
                        self.write_json(f"{JOB}/progress.json", placeholder)
                except OSError as exc:  # a hiccup: the next beat tries again
                    log.warning("could not renew the lease on %s: %s", self.uri, exc)

        beat = threading.Thread(target=renew, name="vidpipe-lease", daemon=True)
        self._claim, self._lease_s, self.lost = claim, lease_s, False
        try:
            self.write_json(f"{JOB}/progress.json", placeholder)
            beat.start()
            yield
        finally:
            stop.set()
            if beat.is_alive():
                beat.join()
            self._claim = None
            if not self.lost:  # else OUT is another run's now: its claim and progress are not ours to touch
                self._let_go(claim, placeholder, lease)

    def _let_go(self, claim: str, placeholder: dict[str, Any], lease: dict[str, Any]) -> None:
        self._drop(claim)
        try:
            if self.last_progress() == placeholder:
                # held by something that keeps no progress of its own ('vidpipe repair'): the last run's is back
                if lease:
                    self.write_json(f"{JOB}/progress.json", lease)
                else:
                    self.store.delete(f"{JOB}/progress.json")
        except OSError as exc:
            log.warning("could not put back the last run's progress on %s: %s", self.uri, exc)

    def _drop(self, claim: str) -> None:
        try:
            self.store.delete(claim)
        except OSError as exc:  # left behind: another run takes it as alive for one lease at most
            log.warning("could not remove the claim %s: %s", self.store.uri_of(claim), exc)

    def _live_claims(self, run_id: str, lease: dict[str, Any], lease_s: float) -> list[str]:
        """Run ids of the other claims on OUT that are alive: renewed less than ``lease_s`` ago, by a run whose
        progress.json does not say it ended.  A dead run's claim (killed, or stalled past a lease) is removed.
        Asked only while no run's progress.json beats (``lock``)."""
        live = []
        for name in self.store.list_names(CLAIMS, ".json"):
            other = name[: -len(".json")]
            if other == run_id:
                continue
            try:
                record = self.read_json(f"{CLAIMS}/{name}")  # read again where torn
            except ConfigError:  # damaged by hand (a claim is one PUT): no run's
                record = {}
            if record is None:  # let go while listed
                continue
            ended = lease.get("run_id") == other and lease.get("state") != "running"  # its run said it ended
            if time.time() - float(record.get("heartbeat", 0) or 0) <= lease_s and not ended and \
                    not driver_ended(record):
                live.append(other)
            else:
                self.store.delete(f"{CLAIMS}/{name}")
        return sorted(live)


@dataclass
class _VideoBuffer:
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)
    n_chunks: int | None = None
    info: VideoInfo | None = None
    uri: str = ""


class ResultWriter:
    """Collects head output per video and commits complete videos in batches of sensible size."""

    def __init__(self, out: OutputDir, *, model_id: str, labels: list[str], embedding_dim: int | None = None,
                 flush_segments: int = 200_000, flush_seconds: float = 60.0, run_id: str | None = None) -> None:
        self.out = out
        self.model_id = model_id
        self.labels = np.asarray(labels, dtype=object)
        self.embedding_dim = embedding_dim
        self.flush_segments = flush_segments
        self.flush_seconds = flush_seconds
        self.run_id = run_id or new_run_id()
        self._seq = 0
        self._buffers: dict[str, _VideoBuffer] = {}
        self._ready_segments: list[pa.Table] = []
        self._ready_videos: list[dict[str, Any]] = []
        self._ready_failures: list[dict[str, Any]] = []
        self._ready_n_segments = 0
        self._unrecorded: Commit | None = None  # staged, its record's write broke off: written again first
        self._last_flush = time.monotonic()
        self.videos_done = 0
        self.videos_failed = 0
        self.video_seconds_done = 0.0
        self.videos_audio_undecodable = 0  # labelled without audio: no decoder for any of their audio tracks
        self.segments_written = 0
        self.meter = StageMeter()
        # Videos finished or failed in the current wave: a late or repeated chunk of one of them (a
        # retried task re-sends what a dead worker had sent) is dropped, not taken for a new video.
        self._closed: set[str] = set()
        # Earlier lost runs per video (worker crashes), kept by the runner: a failure row's attempts
        self.attempts: dict[str, int] = {}

    # -- input ---------------------------------------------------------------------------------------------
    def add_row(self, row: dict[str, Any]) -> None:
        """Take one head-output row (a chunk's results or a failure row)."""
        self.meter.add(row)
        video_id = str(row["video_id"])
        if video_id in self._closed:
            return
        if row.get("error_kind"):
            self._buffers.pop(video_id, None)
            # a failure row's info_json may say how many times the worker tried (transient read errors)
            tries = int(json.loads(str(row.get("info_json") or "{}")).get("attempts", 1))
            self.add_failure(Failure(uri=str(row["uri"]), video_id=video_id, stage=str(row["error_stage"]),
                                     error_kind=str(row["error_kind"]), message=str(row["error_message"]),
                                     attempts=self.attempts.get(video_id, 0) + tries))
            return
        buf = self._buffers.setdefault(video_id, _VideoBuffer(uri=str(row["uri"])))
        idx = int(row["chunk_index"])
        buf.chunks[idx] = {k: row[k] for k in ("segment_index", "start_s", "end_s", "topk_idx", "topk_scores",
                                               "has_audio", *(("embedding",) if self.embedding_dim else ()))}
        if "active_mask" in row:  # a multilabel head: every row of the job carries it
            buf.chunks[idx]["active_mask"] = row["active_mask"]
        if bool(row["is_last"]):
            buf.n_chunks = idx + 1
            info_json = str(row.get("info_json") or "")
            buf.info = VideoInfo.from_dict(json.loads(info_json)) if info_json else None
        if buf.n_chunks is not None and len(buf.chunks) == buf.n_chunks:
            del self._buffers[video_id]
            self._closed.add(video_id)
            self._finish_video(video_id, buf)
        self.maybe_flush()

    def add_failure(self, failure: Failure) -> None:
        self._closed.add(failure.video_id)
        self._ready_failures.append(failure.to_dict() | {"model_id": self.model_id, "failed_at": _now()})
        self.videos_failed += 1

    def begin_wave(self) -> None:
        """A new set of videos starts: forget the last wave's finished ids (its tasks are all over)."""
        self._closed = set()

    def is_closed(self, video_id: str) -> bool:
        """Whether ``video_id`` finished or failed in the current wave."""
        return video_id in self._closed

    def discard_incomplete(self) -> set[str]:
        """Drop the chunks of videos that did not deliver all of them; return their ids (to run again)."""
        lost = set(self._buffers)
        self._buffers.clear()
        return lost

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
        # the video's end knows whether its audio track gave any sound (an empty track sends has_audio chunks)
        has_audio = buf.info.has_audio if buf.info is not None else bool(parts[0]["has_audio"])
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
        if "active_mask" in parts[0]:
            # multilabel bundles: every label whose probability reached its tuned threshold, in label order
            active = np.concatenate([np.asarray(p["active_mask"], np.bool_).reshape(len(p["segment_index"]), -1)
                                     for p in parts])
            cols[ACTIVE_LABELS.name] = pa.array([self.labels[np.flatnonzero(r)].tolist() for r in active],
                                                ACTIVE_LABELS.type)
            schema = schema.append(ACTIVE_LABELS)
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
            self.videos_audio_undecodable += info.audio_codec == NO_AUDIO_DECODER
        self._ready_videos.append(video)
        self.videos_done += 1

    # -- committing -----------------------------------------------------------------------------------------
    def maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if self._ready_n_segments >= self.flush_segments or (
                due and (self._ready_videos or self._ready_failures or self._unrecorded is not None)):
            self.flush()

    def flush(self) -> Commit | None:
        """Commit every complete video collected so far (a stop arriving meanwhile waits for its end)."""
        with stopping.deferred("the commit of the finished videos"):
            return self._flush()

    def _flush(self) -> Commit | None:
        self._last_flush = time.monotonic()
        commit = None
        if self._unrecorded is not None:  # a record whose write broke off: the same record again, first
            commit = self._record(self._unrecorded)
        if self._ready_videos or self._ready_failures:
            self.out.check_held()
            self._unrecorded = self._stage_ready()
            crash_point("staged")
            commit = self._record(self._unrecorded)
        return commit

    def _stage_ready(self) -> Commit:
        """Write the ready videos' rows into staging; they are then the returned (not yet recorded) commit's."""
        self._seq += 1
        name = f"{self.run_id}-{self._seq:05d}"
        files: dict[str, str] = {}
        if self._ready_videos:
            seg = pa.concat_tables(self._ready_segments).sort_by([("video_id", "ascending"),
                                                                  ("segment_index", "ascending")])
            files["segments"] = self._stage(seg, name)
            files["videos"] = self._stage(pa.Table.from_pylist(self._ready_videos, schema=VIDEOS_SCHEMA), name)
        if self._ready_failures:
            files["failures"] = self._stage(pa.Table.from_pylist(self._ready_failures, schema=FAILURES_SCHEMA),
                                            name)
        commit = Commit(name=name, files=files, n_videos=len(self._ready_videos),
                        n_failures=len(self._ready_failures), n_segments=self._ready_n_segments)
        self._ready_segments, self._ready_videos, self._ready_failures = [], [], []
        self._ready_n_segments = 0
        return commit

    def _record(self, commit: Commit) -> Commit:
        """Write ``commit``'s record (the commit itself), then move its files into place.

        A record's write that breaks off (an S3 timeout, a stop) may land all the same, even later: it is
        written again under the same name, never its videos under another (that would double their rows).
        """
        self.out.check_held()  # again: staging took a while
        self.out.store.write_atomic(f"{COMMITS}/{commit.name}.json", commit.to_json().encode("utf-8"))
        # Committed: whatever breaks off the moves below (an S3 error, a stop), readers and the next run's
        # recovery find the files still in staging by the record.
        self._unrecorded = None
        self.segments_written += commit.n_segments
        crash_point("recorded")
        for table, fname in commit.files.items():
            self.out.store.move(f"{STAGING}/{fname}", f"{table}/{fname}")
            crash_point("moved")
        return commit

    def _stage(self, table: pa.Table, name: str) -> str:
        # staging is shared by the three tables: the random suffix keeps their names apart
        fname = f"part-{name}-{uuid.uuid4().hex[:8]}.parquet"
        # its own name in its footer: another of OUT's files copied over it reads whole, and would double some
        # videos' rows and lose others' (see OutputDir.footer_error)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), FILE_NAME_KEY: fname.encode()})
        # page CRCs: 'vidpipe repair --verify' tells a damaged page from a whole one
        self.out.store.write_parquet(table, f"{STAGING}/{fname}", compression="zstd", write_page_checksum=True)
        return fname


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    """A sortable, unique id for one run (commit names start with it)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
