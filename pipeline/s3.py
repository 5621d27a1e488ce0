"""S3 access through pyarrow, configured only from the standard AWS environment and config files."""

from __future__ import annotations

import os

from pyarrow import fs as pafs


def s3_filesystem(uri: str) -> tuple[pafs.S3FileSystem, str]:
    """The filesystem and ``bucket/key`` path of an ``s3://`` URI.

    Credentials and region come from the usual AWS chain (environment, ~/.aws); a custom endpoint
    (MinIO, moto, ...) from ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``.  Nothing is logged.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    path = uri[len("s3://"):]
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or endpoint
        kwargs["scheme"] = scheme if host else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), path  # type: ignore[arg-type]
