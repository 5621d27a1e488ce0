"""Open an input URI for decoding: local paths and ``file://`` as paths, ``s3://`` through pyarrow."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pipeline.errors import ConfigError, MediaError

# Failure kinds worth another try: the bytes could not be fetched this time (network, throttling,
# a node's disk), as opposed to bytes that are not a video or an object that does not exist.
TRANSIENT_ERROR_KINDS = frozenset({"read_error"})

# S3 errors that another try will not fix.
_PERMANENT_S3_MARKERS = ("ACCESS_DENIED", "ACCESSDENIED", "FORBIDDEN", "NO_SUCH_BUCKET", "NOSUCHBUCKET",
                         "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH")


@dataclass
class OpenedInput:
    """What the decoder reads: a local path or a seekable binary file object.

    ``io_errors`` collects the I/O errors the file object raised while being read, so that a decode
    failure they caused (FFmpeg reports them as its own errors) is known to be a transient one.
    """

    file: str | BinaryIO
    size_bytes: int | None
    io_errors: list[OSError] = field(default_factory=list)


def file_uri_path(uri: str) -> str:
    """The path a ``file://`` URI names: percent-escapes decoded (``Path.as_uri()`` writes them); bytes that are
    not UTF-8 become the file system's surrogate escapes, as ``os.listdir`` gives them."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):]))


def path_uri(path: str) -> str:
    """How a local path is recorded: the path itself, or, where its name holds bytes that are not UTF-8
    (output strings must be UTF-8), a ``file://`` URI with its bytes percent-encoded (:func:`file_uri_path`)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path), safe="/")
    return path


def local_path(uri: str) -> str | None:
    """The local path of a URI, or None for remote URIs."""
    if uri.startswith("file://"):
        return file_uri_path(uri)
    if "://" in uri:
        return None
    return uri


def _not_found(uri: str, path: str) -> MediaError:
    if os.path.islink(path):  # the link is there, what it points to is not
        return MediaError(uri, "not_found", f"a symbolic link to {os.path.realpath(path)!r}, which does not exist; "
                          "restore the file or fix the link")
    return MediaError(uri, "not_found", "no such file; check the path or the manifest entry")


def missing_local_file(uri: str) -> MediaError | None:
    """The ``not_found`` error that opening the local input ``uri`` would raise, found by one stat; None for a file
    that is there, a remote URI, or a stat that fails otherwise (opening it says what)."""
    path = local_path(uri)
    if path is None:
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return _not_found(uri, path)
    except (OSError, ValueError):  # EIO, a component that is a file, an embedded NUL: the decoder's to say
        return None
    return None


def _s3_error(uri: str, what: str, exc: OSError) -> MediaError:
    text = str(exc)
    if any(m in text.upper().replace(" ", "") for m in _PERMANENT_S3_MARKERS):
        return MediaError(uri, "unreadable", f"cannot {what}: {text}; check the credentials' access to it")
    return MediaError(uri, "read_error", f"cannot {what}: {text}")


class _GuardedFile:
    """A file object that records the OSErrors of the one it wraps (and re-raises them)."""

    def __init__(self, inner: Any, errors: list[OSError]) -> None:
        self._inner = inner
        self._errors = errors

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except OSError as exc:
            self._errors.append(exc)
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._inner.seek(offset, whence)
        except OSError as exc:
            self._errors.append(exc)
            raise

    def tell(self) -> int:
        return self._inner.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return str(getattr(self._inner, "path", "") or "")


@contextmanager
def open_input(uri: str, *, wrap: Any = None) -> Iterator[OpenedInput]:
    """Open ``uri`` for reading; missing or unreadable inputs raise MediaError.

    Args:
        wrap: optional ``f(file) -> file`` applied to a remote file object (tests inject faults).
    """
    path = local_path(uri)
    if path is not None:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise _not_found(uri, path) from None
        except PermissionError:
            raise MediaError(uri, "unreadable", "permission denied; make the file readable by this user") from None
        except OSError as exc:  # EIO, a network file system gone away, ...
            raise MediaError(uri, "read_error", f"cannot stat the file: {exc}") from None
        yield OpenedInput(path, size)
        return
    if uri.startswith("s3://"):
        from pyarrow import fs as pafs

        from pipeline.s3 import bucket_missing, odd_key_part, s3_filesystem

        try:
            filesystem, key = s3_filesystem(uri)
        except ConfigError as exc:  # a manifest's 's3:///key'
            raise MediaError(uri, "not_found", f"{exc}; check the manifest entry") from None
        if key.endswith("/") and "/" in key.rstrip("/"):  # a manifest line naming a prefix: its read fails each time
            raise MediaError(uri, "unreadable", "this names an S3 prefix (a folder), not an object: give it as an "
                             "input of its own (vidpipe run s3://…/PREFIX/) to label the videos under it")
        odd = odd_key_part(key)
        if odd is not None:  # read as another key: 'not found', or another object's bytes
            shown = "an empty path component ('//')" if odd == "//" else f"a '{odd}' path component"
            raise MediaError(uri, "unsupported_uri", f"its key has {shown}, which the S3 client (pyarrow) cannot "
                             "address as written: it would read another key; copy the object to a key without it "
                             "(aws s3 mv) and run again")
        try:
            info = filesystem.get_file_info(key)
        except OSError as exc:
            raise _s3_error(uri, "stat object", exc) from None
        if info.type == pafs.FileType.NotFound:
            raise MediaError(uri, "not_found", f"there is no bucket {key.split('/', 1)[0]!r}; check the URI"
                             if bucket_missing(filesystem, key) else "no such object in the bucket; check the URI")
        try:
            handle = filesystem.open_input_file(key)
        except FileNotFoundError:
            raise MediaError(uri, "not_found", "no such object in the bucket; check the URI") from None
        except OSError as exc:
            raise _s3_error(uri, "open object", exc) from None
        errors: list[OSError] = []
        with handle:
            inner = wrap(handle) if wrap is not None else handle
            yield OpenedInput(_GuardedFile(inner, errors), info.size, errors)  # type: ignore[arg-type]
        return
    scheme = uri.split("://", 1)[0]
    raise MediaError(uri, "unsupported_uri", f"unsupported URI scheme {scheme!r}; use a local path, file:// or s3://")
