"""Manifests: text (one URI a line), CSV, TSV or Parquet (a ``uri``/``path``/``video`` column), read lazily.

A manifest may be a local file or an ``s3://`` object.  Entries are absolute paths, URIs, or paths
relative to the manifest's own folder (or S3 prefix).  Reading streams: one line (text, CSV, TSV) or one
8192-row batch (Parquet) at a time, whatever the manifest's size.  A TSV is a CSV with tabs between the
fields: the same header row, the same column rules.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from jobs.discover import VideoRef, make_video_id, slug_source
from pipeline.errors import ConfigError
from pipeline.inputs import file_uri_path, path_uri

URI_COLUMNS = ("uri", "path", "video", "url", "file")
# the field separator of each delimited (header row + one entry a line) manifest type
DELIMITERS = {".csv": ",", ".tsv": "\t"}
MANIFEST_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")
_BATCH_ROWS = 8192
_RESOLVED_FOLDERS = 4096  # folders whose resolved path a manifest's reading keeps (entries share few folders)


class _Base:
    """Where a manifest's relative entries point: its local folder or its S3 prefix."""

    def __init__(self, manifest: str) -> None:
        if manifest.startswith("s3://"):
            self.local: Path | None = None
            self.prefix = manifest.rsplit("/", 1)[0] + "/"
        else:
            self.local = Path(manifest).expanduser().resolve().parent
            self.prefix = ""
        self._folders: dict[str, str] = {}  # a folder as entries name it -> resolved (links followed)

    def resolve(self, entry: str) -> str:
        entry = entry.strip()
        if entry.startswith("file://"):  # the same file as a plain path names: one URI (the done-set's key)
            return path_uri(str(Path(file_uri_path(entry)).expanduser().resolve()))
        if "://" in entry:
            return entry
        if self.local is None:  # s3://bucket/dir/ + entry, with ./ and ../ resolved within the bucket
            bucket, _, key = self.prefix[len("s3://"):].partition("/")
            return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(key, entry)).lstrip("/")
        return path_uri(self._resolved(os.path.join(self.local, os.path.expanduser(entry))))  # a name not UTF-8

    def _resolved(self, path: str) -> str:
        """``Path(path).resolve()`` (links followed, ``..`` applied), with the folder's part resolved once per
        folder: a manifest's entries share a few folders, and resolving each whole path took 5 lstat calls an entry
        (a 100,000-entry manifest: ~10 s).  A folder link changed while the manifest is read is not seen.  An
        entry through a link that loops, which ``Path.resolve`` refused with a RuntimeError (the run ended in a
        traceback), is the path ``os.path.realpath`` gives: its video fails, "Too many levels of symbolic links"."""
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or "/../" in folder + "/":  # as Path.resolve has it, links and .. in its order
            return str(Path(path).resolve())
        real = self._folders.get(folder)
        if real is None:
            if len(self._folders) >= _RESOLVED_FOLDERS:
                self._folders.clear()
            real = self._folders[folder] = os.path.realpath(folder)
        joined = os.path.join(real, name)
        return os.path.realpath(joined) if os.path.islink(joined) else joined


def _ref(entry: str, base: _Base) -> VideoRef:
    uri = base.resolve(entry)
    entry = entry.strip()
    given = file_uri_path(entry) if entry.startswith("file://") else entry.split("://", 1)[-1]
    if base.local is None:  # an S3 manifest: its key relative to the manifest's prefix where it lies there, as for a
        # local manifest's folder (a full URI of the prefix's object was slugged bucket__prefix__name, its walk name)
        source = uri[len(base.prefix):] if uri.startswith(base.prefix) else given
    else:
        source = slug_source(uri, base.local, given)
    return VideoRef(uri, make_video_id(uri, source))


def _checked_ref(entry: str, base: _Base, where: str) -> VideoRef:
    if "\x00" in entry:  # no file system takes it ("embedded null byte" named no line)
        raise ManifestRowError(f"{where}: the entry holds a NUL byte; fix or delete the line")
    return _ref(entry, base)


def _name(manifest: str | Path) -> str:
    text = str(manifest)
    return file_uri_path(text) if text.startswith("file://") else text


@contextmanager
def _open_binary(manifest: str) -> Iterator[Any]:
    if manifest.startswith("s3://"):
        from pipeline.s3 import s3_filesystem

        filesystem, key = s3_filesystem(manifest)
        try:
            handle = filesystem.open_input_file(key)
        except FileNotFoundError:
            raise ConfigError(f"manifest {manifest} does not exist; check the bucket and key") from None
        except OSError as exc:
            raise ConfigError(f"cannot read manifest {manifest}: {exc}; check AWS credentials, region and "
                              "AWS_ENDPOINT_URL") from None
        with handle:
            yield handle
        return
    try:
        f = open(Path(manifest).expanduser(), "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {manifest}: {exc}") from None
    with f:
        yield f


class ManifestRowError(ConfigError):
    """A row of a manifest that cannot name a video (what the file says, not a passing failure to read it)."""


def utf8_cell(value: bytes, column: str, where: str, write: str = "paths and URIs as strings") -> str:
    """A Parquet cell of a binary column (strings written without their UTF-8 annotation, as some Hive writers
    leave them) as the text it holds, not the bytes' repr; bytes that are not UTF-8 say to ``write`` them so."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestRowError(f"{where}: the {column!r} value is bytes that are not UTF-8 text; write {write}"
                               ) from None


def path_cell(value: object, column: str, where: str) -> str | None:
    """A Parquet cell that names a video, as text (a manifest's, an annotation file's); None stays None."""
    if isinstance(value, bytes):
        return utf8_cell(value, column, where)
    if value is not None and not isinstance(value, str):
        raise ManifestRowError(f"{where}: the {column!r} column holds {type(value).__name__} values, not paths or "
                               "URIs; write them as strings")
    return value


def _text(binary: Any, name: str) -> Iterator[str]:
    """The file's lines (universal newlines: a Mac spreadsheet's CR-only CSV too); bytes that are not UTF-8 are a
    usage error naming their line; a byte-order mark (as spreadsheet programs write one) is not part of the
    first entry."""
    try:
        yield from io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    except UnicodeDecodeError as exc:  # decoded a block at a time: find the line again, from the start
        with _open_binary(name) as again:
            number = first_non_utf8_line(again.read())
        raise ManifestRowError(f"manifest {name} line {number}: not UTF-8 text ({exc.reason}); save the list as "
                               "UTF-8") from None


def first_non_utf8_line(data: bytes) -> int | None:
    """The number of the first line (any of \\n, \\r\\n, \\r ends one) holding bytes that are not UTF-8; None
    where all are: a text reader decodes blocks, so its error does not say which line."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return 1 + data[: exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n")
    return None


def _csv_column(header: list[str] | None, manifest: str) -> int | None:
    if header is None:
        return None
    lowered = [h.strip().lower() for h in header]
    col = next((lowered.index(c) for c in URI_COLUMNS if c in lowered), None)
    if col is None:
        raise ConfigError(f"manifest {manifest}: no column named one of {', '.join(URI_COLUMNS)} "
                          f"in header {header}; add a 'uri' column")
    return col


def _parquet_column(names: list[str], manifest: str) -> str:
    lowered = [n.lower() for n in names]
    col = next((names[lowered.index(c)] for c in URI_COLUMNS if c in lowered), None)
    if col is None:
        raise ConfigError(f"manifest {manifest}: no column named one of {', '.join(URI_COLUMNS)}; "
                          f"columns are {names}")
    return col


def _suffix(manifest: str) -> str:
    suffix = PurePosixPath(manifest.split("://", 1)[-1]).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(f"manifest {manifest}: unknown manifest type {suffix!r}; use "
                          f"{', '.join(MANIFEST_SUFFIXES[:-1])} or {MANIFEST_SUFFIXES[-1]}")
    return suffix


def check_manifest(manifest: str | Path) -> None:
    """Open the manifest, check its header and that it lists a video (fails fast with ConfigError)."""
    name = _name(manifest)
    suffix = _suffix(name)
    with _open_binary(name) as binary:
        if suffix in DELIMITERS:
            _csv_column(next(csv.reader(_text(binary, name), delimiter=DELIMITERS[suffix]), None), name)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.ParquetFile(binary).schema_arrow.names
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError: not Parquet
                raise ConfigError(f"manifest {name}: not a readable Parquet file ({exc})") from None
            _parquet_column(names, name)
    entries = read_manifest(name)
    try:
        first = next(entries, None)  # reads up to the first entry
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # a damaged Parquet file past its footer, a read that failed
        raise ConfigError(f"cannot read manifest {name}: {exc}") from None
    finally:
        entries.close()
    if first is None:
        raise ConfigError(f"manifest {name} lists no videos; check the file (empty lines and, in .txt, lines "
                          "starting with # are skipped)")


def read_manifest(manifest: str | Path) -> Generator[VideoRef, None, None]:
    """Yield the manifest's entries in order; relative paths are relative to the manifest's folder."""
    name = _name(manifest)
    suffix = _suffix(name)
    base = _Base(name)
    with _open_binary(name) as binary:
        if suffix == ".txt":
            for number, line in enumerate(_text(binary, name), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _checked_ref(line, base, f"manifest {name} line {number}")
        elif suffix in DELIMITERS:
            reader = csv.reader(_text(binary, name), delimiter=DELIMITERS[suffix])
            header = next(reader, None)
            col = _csv_column(header, name)
            if header is None or col is None:
                return
            for row in reader:
                if not row:
                    continue
                if len(row) <= col:  # line_num: the file's line where the row ends (a quoted field may span lines)
                    raise ManifestRowError(f"manifest {name} line {reader.line_num}: missing the {header[col]!r} "
                                           "column")
                if row[col].strip():
                    yield _checked_ref(row[col], base, f"manifest {name} line {reader.line_num}")
                elif any(cell.strip() for cell in row):  # a row of blank cells is a blank line (spreadsheets)
                    raise ManifestRowError(f"manifest {name} line {reader.line_num}: the {header[col]!r} cell is "
                                           "empty; fill in the video's path or URI, or delete the row")
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(binary)
            col_name = _parquet_column(pf.schema_arrow.names, name)
            number = 0
            for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[col_name]):
                for entry in batch.column(0).to_pylist():
                    number += 1
                    where = f"manifest {name} row {number}"
                    entry = path_cell(entry, col_name, where)
                    if entry is None or not entry.strip():
                        raise ManifestRowError(f"{where}: the {col_name!r} value is "
                                               f"{'null' if entry is None else 'empty'}; fill in the video's path "
                                               "or URI, or drop the row")
                    yield _checked_ref(entry, base, where)
