"""Where a job's output lives: a local folder or an ``s3://`` prefix, behind the few operations it needs.

The commit protocol (:mod:`jobs.output`) relies on one atomic step per commit: writing a small
object.  Locally that is write-to-temp + ``fsync`` + ``os.replace`` (+ ``fsync`` of the folder); on S3
a single PUT, which makes an object visible whole or not at all.  Moving a data file into place is
``os.replace`` locally and copy + delete on S3 (server-side ``CopyObject``), which is *not* atomic as
a pair; the protocol never depends on it being so (see :mod:`jobs.output`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline.errors import ConfigError
from pipeline.s3 import unreachable


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as a person can read it: a byte of another encoding in a name as ``\\xff``, not a surrogate."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_remote(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


class Store:
    """A root folder on the local disk or on S3; paths given to its methods are relative to the root.

    Args:
        uri: a local path (``file://`` allowed) or ``s3://bucket/prefix``.
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        text = str(uri)
        if text in ("", "file://"):  # Path("") is the current folder: 'query ""' read it, 'status ""' named no path
            raise ConfigError("an empty path names no directory; pass the --out directory of a 'vidpipe run'")
        self.local = not is_remote(text)
        self.fs: pafs.FileSystem
        if self.local:
            path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve()
            try:
                str(path).encode("utf-8")
            except UnicodeEncodeError:  # pyarrow's paths are UTF-8: it failed on the first file, with a traceback
                raise ConfigError(f"{shown(path)}: this path is not valid UTF-8 (its name has bytes of another "
                                  "encoding), and pyarrow, which writes and reads vidpipe's Parquet files, takes "
                                  "UTF-8 paths only; rename the folder (or the one above it) to a UTF-8 name, or use "
                                  "another directory") from None
            self.fs = pafs.LocalFileSystem()
            self.root = str(path)
            self.uri = self.root
        else:
            from pipeline.s3 import s3_filesystem

            self.fs, key = s3_filesystem(text if text.rstrip("/") in ("s3:", "s3://") else text.rstrip("/"))
            if not key or key.startswith("/"):
                raise ValueError(f"not a bucket/prefix: {text!r}")
            self.root = key
            self.uri = f"s3://{key}"

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- paths -------------------------------------------------------------------------------------------
    def full(self, rel: str) -> str:
        """The filesystem path of ``rel`` (what pyarrow takes with :attr:`fs`)."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """A path or URI a person (or another tool) can use."""
        return self.full(rel) if self.local else f"s3://{self.full(rel)}"

    def local_path(self, rel: str) -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not on the local disk")
        return Path(self.full(rel))

    # -- queries -----------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type == pafs.FileType.File

    def list_names(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Names of the files directly inside ``rel_dir`` (sorted); [] when it does not exist."""
        return sorted(n for n in self.list_sizes(rel_dir) if n.endswith(suffix))

    def list_sizes(self, rel_dir: str) -> dict[str, int | None]:
        """The files directly inside ``rel_dir``, name to size in bytes; {} when it does not exist."""
        sel = pafs.FileSelector(self.full(rel_dir), recursive=False, allow_not_found=True)
        return {PurePosixPath(i.path).name: i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def list_tree(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Paths (relative to ``rel_dir``) of the files anywhere below ``rel_dir`` (sorted); [] when it does not exist."""
        base = self.full(rel_dir).rstrip("/") + "/"
        sel = pafs.FileSelector(self.full(rel_dir), recursive=True, allow_not_found=True)
        paths = [i.path[len(base):] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return sorted(p for p in paths if p.endswith(suffix))

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.full(rel)) as f:
                return f.read()
        except OSError as exc:
            # S3: a key deleted between the size request and the read is named so by the read, not as not found
            if not self.local and not isinstance(exc, FileNotFoundError) and self._deleted(rel, exc):
                raise FileNotFoundError(f"{self.uri_of(rel)}: {exc}") from exc
            raise

    def _deleted(self, rel: str, exc: OSError) -> bool:
        """Whether a read of ``rel`` failed because the object is not there: by the AWS error code in pyarrow's
        message, else (another pyarrow's wording) by asking for the object again; False where that fails too, and
        where no connection to the endpoint could be made (asking again would only repeat the client's tries)."""
        if any(code in str(exc) for code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND")):
            return True
        if unreachable(exc):
            return False
        try:
            return self.fs.get_file_info(self.full(rel)).type == pafs.FileType.NotFound
        except OSError:
            return False

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_table(self, rel: str, columns: list[str] | None = None, *, verify: bool = False) -> pa.Table:
        """``verify``: check each page's CRC where the writer stored one (vidpipe's files since 2026-12-01)."""
        return pq.read_table(self.full(rel), columns=columns, filesystem=self.fs, page_checksum_verification=verify)

    def read_schema(self, rel: str) -> pa.Schema:
        return pq.read_schema(self.full(rel), filesystem=self.fs)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        """The Parquet footer of ``rel``: ArrowInvalid (a ValueError) where it is not a whole Parquet file."""
        with self.fs.open_input_file(self.full(rel)) as f:
            return pq.read_metadata(f)

    # -- changes -----------------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        # S3 has no folders: a key's prefix exists as soon as the key does
        if self.local:
            os.makedirs(self.full(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold ``data``: readers see the old content or the new, never a part."""
        if not self.local:
            with self.fs.open_output_stream(self.full(rel)) as f:  # one PUT: visible whole or not at all
                f.write(data)
            return
        path = Path(self.full(rel))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)

    def write_parquet(self, table: pa.Table, rel: str, **kwargs: object) -> None:
        """Write a Parquet file that is durable once this returns (not atomic: write it to staging)."""
        if self.local:
            pq.write_table(table, self.full(rel), **kwargs)  # type: ignore[arg-type]
            with open(self.full(rel), "rb") as f:
                os.fsync(f.fileno())
        else:
            pq.write_table(table, self.full(rel), filesystem=self.fs, **kwargs)  # type: ignore[arg-type]

    def move(self, src: str, dst: str) -> None:
        """Rename locally; copy + delete on S3 (the copy appears whole, then the source goes)."""
        if self.local:
            os.replace(self.full(src), self.full(dst))
        else:
            self.fs.copy_file(self.full(src), self.full(dst))
            self.delete(src)

    def delete(self, rel: str) -> None:
        """Delete a file; a missing one is fine (another step or run got there first)."""
        try:
            self.fs.delete_file(self.full(rel))
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    # the rename itself must survive a power cut, not only the file's bytes
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
