"""Open an input URI for decoding: local paths and ``file://`` as paths, ``s3://`` through pyarrow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.errors import MediaError


@dataclass
class OpenedInput:
    """What the decoder reads: a local path or a seekable binary file object."""

    file: str | BinaryIO
    size_bytes: int | None


def local_path(uri: str) -> str | None:
    """The local path of a URI, or None for remote URIs."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        return None
    return uri


@contextmanager
def open_input(uri: str) -> Iterator[OpenedInput]:
    """Open ``uri`` for reading; missing or unreadable inputs raise MediaError."""
    path = local_path(uri)
    if path is not None:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise MediaError(uri, "not_found", "no such file; check the path or the manifest entry") from None
        except PermissionError:
            raise MediaError(uri, "unreadable", "permission denied; make the file readable by this user") from None
        yield OpenedInput(path, size)
        return
    if uri.startswith("s3://"):
        from pyarrow import fs as pafs

        from pipeline.s3 import s3_filesystem

        filesystem, key = s3_filesystem(uri)
        try:
            info = filesystem.get_file_info(key)
        except OSError as exc:
            raise MediaError(uri, "unreadable", f"cannot stat object: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise MediaError(uri, "not_found", "no such object in the bucket; check the URI")
        try:
            handle = filesystem.open_input_file(key)
        except OSError as exc:
            raise MediaError(uri, "unreadable", f"cannot open object: {exc}") from None
        with handle:
            yield OpenedInput(handle, info.size)
        return
    scheme = uri.split("://", 1)[0]
    raise MediaError(uri, "unsupported_uri", f"unsupported URI scheme {scheme!r}; use a local path, file:// or s3://")
