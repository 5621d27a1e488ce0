"""Discovery of videos under an ``s3://`` prefix."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from jobs.discover import VIDEO_EXTENSIONS, VideoRef, make_video_id
from pipeline.errors import ConfigError
from pipeline.s3 import bucket_missing, odd_key_part, s3_filesystem

if TYPE_CHECKING:
    from pyarrow import fs as pafs


def check_s3(uri: str, *, videos: bool = True) -> None:
    """Fail fast when ``uri`` cannot be reached or names nothing; with ``videos``, also when a prefix holds no
    video (a walk up to the first one)."""
    from pyarrow import fs as pafs

    filesystem, path = s3_filesystem(uri)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise ConfigError(f"cannot reach {uri}: {exc}; check AWS credentials, region and AWS_ENDPOINT_URL") from None
    if info.type == pafs.FileType.NotFound:
        if glob.has_magic(uri):  # taken as one key: a not_found row, exit 3
            raise ConfigError(f"input {uri}: glob patterns are read for local paths only; give the S3 prefix "
                              "(s3://BUCKET/PREFIX/: its videos are found under it) or a manifest of the keys")
        if _names_an_object(uri) and not bucket_missing(filesystem, path):
            return  # a named video that is not there: a not_found failure row, as for a local file
        raise ConfigError(f"input {uri} does not exist; check the bucket and prefix")
    if videos and info.type == pafs.FileType.Directory and next(_walk(filesystem, path.rstrip("/")), None) is None:
        # it ran nothing and exited 0, as if the job were done
        raise ConfigError(f"input {uri} holds no video files (no key under it ends in "
                          f"{', '.join(sorted(VIDEO_EXTENSIONS))}); check the prefix")


def _names_an_object(uri: str) -> bool:
    """Whether ``uri`` names one video (a key with a video extension), not a prefix."""
    from jobs.discover import VIDEO_EXTENSIONS

    return not uri.endswith("/") and PurePosixPath(uri).suffix.lower() in VIDEO_EXTENSIONS


def discover_s3(uri: str) -> Iterator[VideoRef]:
    """One object, or every video object under a prefix (recursively), in key order.

    The prefix is walked one "folder" (common prefix) at a time, so memory holds one folder's
    listing, not the whole archive's.
    """
    from pyarrow import fs as pafs

    check_s3(uri, videos=False)  # its own walk follows (check_inputs made the walk to the first video)
    filesystem, path = s3_filesystem(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File or (info.type == pafs.FileType.NotFound and _names_an_object(uri)):
        size = info.size if info.type == pafs.FileType.File else None  # a rerun checks it (WaveFeeder)
        yield VideoRef(uri, make_video_id(uri, PurePosixPath(path).name), size)
        return
    yield from _walk(filesystem, path.rstrip("/"))


def _walk(filesystem: pafs.FileSystem, prefix: str) -> Iterator[VideoRef]:
    """The video objects under ``prefix`` (``bucket/key...``), one folder's listing at a time, in key order."""
    from pyarrow import fs as pafs

    def ref(fi: pafs.FileInfo) -> Iterator[VideoRef]:
        if fi.type == pafs.FileType.File and PurePosixPath(fi.path).suffix.lower() in VIDEO_EXTENSIONS:
            full = f"s3://{fi.path}"
            yield VideoRef(full, make_video_id(full, fi.path[len(prefix):].lstrip("/")), fi.size)

    def walk(folder: str) -> Iterator[VideoRef]:
        infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
        odd = False
        for fi in sorted(infos, key=lambda i: i.path):
            # keys with '//', '.' or '..' parts: a listing names 'p//' as 'p' itself (walking it recursed without
            # end) and 'p/./' as 'p/.'
            if fi.path.rstrip("/") == folder.rstrip("/") or odd_key_part(fi.path):
                odd = True
            elif fi.type == pafs.FileType.Directory:
                yield from walk(fi.path)
            else:
                yield from ref(fi)
        if odd:  # their real keys come in a listing of the whole folder; reading each fails, saying why
            everything = filesystem.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
            for fi in sorted(everything, key=lambda i: i.path):
                if odd_key_part(fi.path) and fi.path not in odd_seen:  # (a folder above may have listed it)
                    odd_seen.add(fi.path)
                    yield from ref(fi)

    odd_seen: set[str] = set()
    yield from walk(prefix)
