"""Discovery of videos under an ``s3://`` prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

from jobs.discover import VIDEO_EXTENSIONS, VideoRef, make_video_id
from pipeline.errors import ConfigError
from pipeline.s3 import s3_filesystem


def discover_s3(uri: str) -> Iterator[VideoRef]:
    """One object, or every video object under a prefix (recursively), in key order."""
    from pyarrow import fs as pafs

    filesystem, path = s3_filesystem(uri)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise ConfigError(f"cannot reach {uri}: {exc}; check AWS credentials, region and AWS_ENDPOINT_URL") from None
    if info.type == pafs.FileType.File:
        yield VideoRef(uri, make_video_id(uri, PurePosixPath(path).name))
        return
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {uri} does not exist; check the bucket and prefix")
    prefix = path.rstrip("/")
    infos = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    for fi in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        if PurePosixPath(fi.path).suffix.lower() in VIDEO_EXTENSIONS:
            rel = fi.path[len(prefix):].lstrip("/")
            full = f"s3://{fi.path}"
            yield VideoRef(full, make_video_id(full, rel))
