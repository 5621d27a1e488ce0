"""Turn the user's INPUT arguments into a stream of videos: files, folders (recursive), globs, manifests."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.idset import IdSet
from pipeline.errors import ConfigError
from pipeline.inputs import file_uri_path, local_path, path_uri

VIDEO_EXTENSIONS = frozenset(
    (".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .flv .wmv .3gp .ogv .mxf .vob "
     ".dv .m2v .m2p .mod .tod .asf .f4v .y4m").split()
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".tsv", ".parquet"})
_SLUG_KEPT = ".-_"


@dataclass(frozen=True)
class VideoRef:
    """One input video: where it is, its stable id, and its size where discovery listed it (an S3 prefix)."""

    uri: str
    video_id: str
    size_bytes: int | None = None


def make_video_id(uri: str, relative: str) -> str:
    """A stable id: a readable slug of the path relative to its input root + a hash of the full URI.

    The slug keeps letters, marks and digits of every script (NFC, so a name from macOS's decomposed form
    gives the same slug) and ``.-_``; each run of other characters becomes one ``_``, a folder separator ``__``;
    ``_`` and ``.`` are stripped from its ends and it keeps its last 80 characters.  The hash: the first 10 hex
    digits of the URI's sha256.
    """
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:10]
    text = unicodedata.normalize("NFC", relative.replace(os.sep, "/")).replace("/", "__")
    # letters, marks (an Indic vowel sign, a virama) and digits of any script are kept; other runs become _
    kept = "".join(c if c in _SLUG_KEPT or unicodedata.category(c)[0] in "LMN" else "\0" for c in text)
    slug = re.sub("\0+", "_", kept).strip("_.")[-80:]
    return f"{slug}-{digest}" if slug else digest


def _no_match(pattern: str) -> str:
    return (f"input pattern {pattern!r} matches no files; check the pattern and quote it in the shell (a name holding "
            "*, ? or [ is read as a pattern when no file has that name)")


def slug_source(uri: str, root: Path, given: str) -> str:
    """What a local video's slug is made of: its file relative to the input's root (a folder, a manifest's
    folder; resolved) where it lies there, whichever link, ``../`` or absolute path led to it; else the path as given.

    So a folder and a manifest of the same files give the same ids, and a link to a file in the same
    folder gives the file's id whichever of the two the walk meets first.
    """
    path = local_path(uri)
    if path is not None:
        top = str(root)
        under = top if top.endswith(os.sep) else top + os.sep
        # Path.relative_to's answer, without its cost, for a path with no part that Path would rewrite
        if path.startswith(under) and os.sep * 2 not in path and os.sep + "." not in path:
            return path[len(under):]
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return given


def _canonical(path: Path) -> str:
    resolved = path.resolve()
    # a dangling link is recorded as itself: its target's path would not tell which entry of the folder failed
    return path_uri(str(path.absolute()) if not os.path.exists(resolved) and os.path.islink(path) else str(resolved))


def _walk(root: Path, errors: list[str] | None = None) -> Iterator[Path]:
    # sorted walk: the same folder gives the same order every time (reproducible jobs)
    def unreadable(e: OSError) -> None:
        if errors is not None:
            errors.append(f"{e.filename} ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden, as hidden files are
        for name in sorted(filenames):
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                yield Path(dirpath) / name


def discover(inputs: list[str]) -> Iterator[VideoRef]:
    """Yield the videos named by ``inputs`` lazily, each once.

    A named file is taken whatever its extension (a missing one becomes a ``not_found`` failure
    later, so the job goes on); folders are searched recursively for video extensions; a glob
    pattern is expanded; ``*.txt``/``*.csv``/``*.tsv``/``*.parquet`` files (local or ``s3://``) are manifests of
    URIs.  Nothing is listed ahead of need, and the URIs already seen are kept as 16-byte digests
    (:class:`~jobs.idset.IdSet`), so a manifest of millions of entries streams in bounded memory.
    """
    seen = IdSet()
    for item in inputs:
        for ref in _discover_one(item):
            if seen.add(ref.uri):
                yield ref


def count_videos(inputs: list[str], finished: IdSet | None = None) -> tuple[int, int]:
    """How many videos ``inputs`` name, and how many of them ``finished`` (URIs) holds: a second,
    independent pass over them, for progress, ETA and ``vidpipe status``'s pending count."""
    total = done = 0
    for ref in discover(inputs):
        total += 1
        done += finished is not None and ref.uri in finished
    return total, done


def check_inputs(inputs: list[str]) -> None:
    """Fail fast, before any work, on an input that cannot give videos (each checked cheaply, nothing listed)."""
    for item in inputs:
        if is_manifest(item):
            from jobs.manifest import check_manifest

            check_manifest(item)
        elif item.startswith("s3://"):
            from jobs.remote import check_s3

            check_s3(item)
        elif glob.has_magic(item) and not Path(item).expanduser().exists():
            matched = folders = 0
            unreadable: list[str] = []
            for m in glob.iglob(os.path.expanduser(item), recursive=True):
                matched += 1
                kind = _glob_kind(item, m)
                if kind == "manifest":
                    from jobs.manifest import check_manifest

                    check_manifest(m)  # as if it were named: an empty or unreadable one is named now
                if kind == "folder" and next(_walk(Path(m), unreadable), None) is None:  # as a folder named alone
                    folders += 1  # it ran a job of nothing, exit 0
                    continue
                if kind is not None:
                    break
            else:
                if not matched:
                    raise ConfigError(_no_match(item))
                files = matched - folders
                what = " and ".join(([f"{files} file{'s' * (files != 1)}"] if files else [])
                                    + ([f"{folders} folder{'s' * (folders != 1)} without video files"] if folders
                                       else []))
                raise ConfigError(f"input pattern {item!r} matches {what} but no video file (extensions "
                                  f"{', '.join(sorted(VIDEO_EXTENSIONS))})"
                                  + ("" if _manifest_pattern(item) or matched == folders else ", and its files are "
                                     "not read as manifests unless the pattern ends in .txt, .csv, .tsv or .parquet")
                                  + (f"; could not read {unreadable[0]}" if unreadable else "")
                                  + "; check the pattern")
        else:
            path = _local_path(item)
            if item.endswith(("/", os.sep)) and not path.exists():  # a folder by its spelling: a typo, not a failure
                raise ConfigError(f"input folder {item!r} does not exist; check the path")
            if ("://" not in item or item.startswith("file://")) and not path.exists() and not path.is_symlink():
                # a manifest or a folder by its spelling: a typo, not one failed video (it ran a whole job for it)
                if path.suffix.lower() in MANIFEST_EXTENSIONS:
                    raise ConfigError(f"manifest {item!r} does not exist; check the path")
                if not path.suffix:
                    raise ConfigError(f"input {item!r} does not exist (no file or folder by that name); check the "
                                      "path")
            unreadable = []
            if path.is_dir() and next(_walk(path, unreadable), None) is None:  # stops at the first video found
                why = f"; could not read {unreadable[0]}" if unreadable else ""
                raise ConfigError(f"input folder {item!r} holds no video files (none with the extensions "
                                  f"{', '.join(sorted(VIDEO_EXTENSIONS))} in it or its subfolders; hidden files and "
                                  f"folders (.name) are skipped and links to folders are not followed{why}); check "
                                  "the path")


def _manifest_pattern(pattern: str) -> bool:
    return Path(pattern).suffix.lower() in MANIFEST_EXTENSIONS


def _glob_kind(pattern: str, match: str) -> str | None:
    """What a glob's match gives: a folder to search, a video, a manifest (only where the pattern itself ends in
    a manifest extension: 'lists/*.csv'; a notes.txt that 'archive/*' matches is not one), or None (skipped)."""
    path = Path(match)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return "video"
    if _manifest_pattern(pattern) and is_manifest(match):
        return "manifest"
    return None


def is_manifest(item: str) -> bool:
    """Whether ``item`` names a manifest: an existing local .txt/.csv/.tsv/.parquet file, or such an s3:// object."""
    suffix = Path(item.split("://", 1)[-1]).suffix.lower()
    if suffix not in MANIFEST_EXTENSIONS:
        return False
    if item.startswith("s3://"):
        return True
    path = Path(file_uri_path(item) if item.startswith("file://") else item).expanduser()
    return path.is_file()


def _local_path(item: str) -> Path:
    return Path(file_uri_path(item) if item.startswith("file://") else item).expanduser()


def _discover_one(item: str) -> Iterator[VideoRef]:
    if is_manifest(item):
        from jobs.manifest import read_manifest

        yield from read_manifest(item)
        return
    if item.startswith("s3://"):
        from jobs.remote import discover_s3

        yield from discover_s3(item)
        return
    path = _local_path(item)
    if path.is_dir():
        root = path.resolve()
        for p in _walk(path):
            uri = _canonical(p)
            yield VideoRef(uri, make_video_id(uri, slug_source(uri, root, str(p.relative_to(path)))))
        return
    # a file that exists is itself, even where its name looks like a pattern ('Movie [1080p].mp4')
    if glob.has_magic(item) and not path.is_file():
        matches = sorted(glob.iglob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise ConfigError(_no_match(item))
        for m in matches:
            kind = _glob_kind(item, m)
            if kind in ("folder", "manifest"):
                yield from _discover_one(m)
            elif kind == "video":
                mp = Path(m)
                uri = _canonical(mp)
                yield VideoRef(uri, make_video_id(uri, mp.name))
        return
    # A plain file (or a missing one: it becomes a not_found failure row, the job goes on).
    uri = _canonical(path)
    yield VideoRef(uri, make_video_id(uri, path.name))
