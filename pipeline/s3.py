"""S3 access through pyarrow, configured only from the standard AWS environment and config files."""

from __future__ import annotations

import functools
import os
import re

from pyarrow import fs as pafs

from pipeline.errors import ConfigError


def s3_filesystem(uri: str) -> tuple[pafs.S3FileSystem, str]:
    """The filesystem and ``bucket/key`` path of an ``s3://`` URI.

    Credentials and region come from the usual AWS chain (environment, ~/.aws, instance role); a
    custom endpoint (MinIO, moto, ...) from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.  Nothing
    is logged, and no credential is ever part of a URI, a message or an output.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    path = uri[len("s3://"):]
    if not path.split("/", 1)[0]:  # 's3://' listed every bucket the credentials can see, and ran them all
        raise ConfigError(f"{uri!r} names no bucket; give s3://BUCKET or s3://BUCKET/PREFIX")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    return _filesystem(endpoint, region), path


@functools.lru_cache(maxsize=8)
def _filesystem(endpoint: str, region: str) -> pafs.S3FileSystem:
    # One client per configuration and process: creating one costs milliseconds and a connection pool.
    kwargs: dict[str, object] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or endpoint
        kwargs["scheme"] = scheme if host else "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def odd_key_part(path: str) -> str | None:
    """The part of ``bucket/key`` that pyarrow's S3 client cannot address as written, or None: an empty one (``//``),
    which it drops ('p//v.mp4' reads as 'p/v.mp4', and a listing of 'p' names 'p' itself), or ``.`` / ``..``,
    which it resolves ('dot/./w.mp4' reads as 'dot/w.mp4').  A trailing ``/`` (a prefix's name) is not one."""
    for part in path.rstrip("/").split("/")[1:]:
        if part in ("", ".", ".."):
            return "//" if not part else part
    return None


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says no connection to the S3 endpoint could be made: the AWS client's NETWORK_CONNECTION
    error with curl's code 7 (could not connect: refused, no route) or 6 (host name not resolved).  The client has
    tried again itself by then (~1.8 s against a closed port), so asking once more at once does not help.  Its
    other NETWORK_CONNECTION errors (a connection reset, a body cut off mid-transfer, a timeout) are not this:
    another try may well get through."""
    return isinstance(exc, OSError) and _NO_CONNECTION.search(str(exc)) is not None


_NO_CONNECTION = re.compile(r"AWS Error NETWORK_CONNECTION .*\bcurlCode: [67],")


def bucket_missing(filesystem: pafs.FileSystem, path: str) -> bool:
    """Whether the bucket of ``path`` (``bucket/key...``) is known not to exist; False when the store will
    not say (no right to look at the bucket itself: the reads and writes that follow will tell)."""
    try:
        return filesystem.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except OSError:
        return False
