"""Is a file cut short?  Read from its container's own structure, before anything is decoded.

An interrupted download or copy leaves a file whose last top-level element claims more bytes than
the file holds.  FFmpeg reads such a file up to the cut without an error (an MP4 with its index in
front, a Matroska file), so its labels would silently cover part of the video.  Headers that
*describe* the content (frame counts, durations) cannot tell a cut file from a legitimately edited
one — an MP4 edit list trims frames that its index still lists; a Matroska file's duration may count
from 0 or from its first timestamp, or be set by a track that is not decoded — so only sizes are
compared here:

- ISO base media (MP4, MOV, 3GP, M4V; also fragmented MP4): the top-level boxes, each ``size`` bytes
  from its start (``size == 0``: to the end of the file);
- Matroska / WebM: the Segment element's size (a live-written file says "unknown size").

Other containers, and boxes or elements that do not look like the known ones (a file with trailing
bytes of something else), are not judged.
"""

from __future__ import annotations

from collections.abc import Callable

ReadAt = Callable[[int, int], bytes]  # (offset, n) -> up to n bytes at offset

# Top-level box types of ISO base media files (ISO/IEC 14496-12, QuickTime).
_BOXES = frozenset(
    b"ftyp styp moov mdat moof mfra free skip wide meta uuid pdin sidx ssix emsg prft pnot udta".split()
)
_MAX_BOXES = 64  # a fragmented file has a moof + mdat pair per fragment: stop walking, do not judge
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_SEGMENT_ID = b"\x18\x53\x80\x67"


def cut_short(read_at: ReadAt, size: int) -> str | None:
    """What is missing, if the container says it holds more bytes than ``size``; else None."""
    head = read_at(0, 16)
    if head[:4] == _EBML_MAGIC:
        return _matroska(read_at, size, head)
    if len(head) >= 8 and head[4:8] in _BOXES:
        return _iso_bmff(read_at, size)
    return None


def _iso_bmff(read_at: ReadAt, size: int) -> str | None:
    offset = 0
    for _ in range(_MAX_BOXES):
        if offset >= size:
            return None
        header = read_at(offset, 16)
        if len(header) < 8 or header[4:8] not in _BOXES:
            return None  # not a box we know (trailing bytes of something else): not ours to judge
        box_size = int.from_bytes(header[:4], "big")
        if box_size == 0:
            return None  # the last box, to the end of the file
        if box_size == 1:
            if len(header) < 16:
                return _missing(header[4:8], offset + 16, size)
            box_size = int.from_bytes(header[8:16], "big")
        if box_size < 8:
            return None  # malformed: FFmpeg reports it
        end = offset + box_size
        if end > size:
            return _missing(header[4:8], end, size)
        offset = end
    return None


def _matroska(read_at: ReadAt, size: int, head: bytes) -> str | None:
    ebml_size = _vint(head, 4)
    if ebml_size is None or ebml_size[0] is None:
        return None
    offset = 4 + ebml_size[1] + ebml_size[0]
    header = read_at(offset, 12)
    if header[:4] != _SEGMENT_ID:
        return None
    seg = _vint(header, 4)
    if seg is None or seg[0] is None:
        return None  # unknown size: written live, nothing to compare
    end = offset + 4 + seg[1] + seg[0]
    return _missing(b"Segment", end, size) if end > size else None


def _vint(data: bytes, pos: int) -> tuple[int | None, int] | None:
    """An EBML variable-size integer at ``pos``: (value or None for "unknown", its length in bytes)."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 9 - data[pos].bit_length()  # the leading zeros say how many more bytes follow
    if pos + length > len(data):
        return None
    value = data[pos] & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = value << 8 | b
    return (None if value == (1 << (7 * length)) - 1 else value), length


def _missing(kind: bytes, end: int, size: int) -> str:
    name = kind.decode("ascii", "replace").strip()
    # "at least": the box need not be the file's last (a fragmented MP4 has a moof + mdat pair per fragment), so
    # how much of the file is missing is not known, only that this box's end is (a share of it would mislead)
    return (f"its {name} ends at byte {end:,} but the file has {size:,} bytes, at least {end - size:,} bytes are "
            "missing: the file is cut short, e.g. an interrupted download or copy; fetch it again")
