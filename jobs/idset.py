"""A compact set of strings for the driver: finished video ids, URIs already seen in discovery.

A job over a million videos must not keep a million Python strings (about 110-150 bytes each with
the set's slot) on the driver just to skip the finished ones.  :class:`IdSet` keeps a 16-byte digest
per member in one sorted numpy array; additions collect in a small Python set that is merged into
the array every ``merge_every`` additions.  Memory: 16 bytes per member, plus about 100 bytes for
each of the at most ``merge_every`` recent additions; a lookup is a hash and a binary search
(a few microseconds).  Digests are 120 bits of BLAKE2b: the chance that two of a billion ids
collide is about 1e-18.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_DTYPE = "S16"


def digest(text: str) -> bytes:
    """16 bytes for ``text``; the last byte is never 0 (numpy's ``S`` dtype strips trailing NULs)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=15).digest() + b"\x01"


class IdSet:
    """A set of strings stored as digests (no iteration: members cannot be listed back)."""

    def __init__(self, members: Iterable[str] = (), *, merge_every: int = 65_536) -> None:
        self._sorted = np.empty(0, dtype=_DTYPE)
        self._recent: set[bytes] = set()
        self.merge_every = merge_every
        self.update(members)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        return self._has(digest(text))

    def _has(self, d: bytes) -> bool:
        if d in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, d))
        return i < len(self._sorted) and self._sorted[i] == d

    def add(self, text: str) -> bool:
        """Add ``text``; False when it was already a member."""
        d = digest(text)
        if self._has(d):
            return False
        self._recent.add(d)
        if len(self._recent) >= self.merge_every:
            self._merge()
        return True

    def update(self, members: Iterable[str]) -> None:
        """Add many members at once (one sort per call, no per-member Python set)."""
        batch = np.unique(np.fromiter((digest(m) for m in members), dtype=_DTYPE))
        if len(batch):
            self._insert_sorted(batch)

    def _merge(self) -> None:
        self._insert_sorted(np.sort(np.fromiter(self._recent, dtype=_DTYPE, count=len(self._recent))))
        self._recent = set()

    def _insert_sorted(self, new: np.ndarray) -> None:
        # ``new`` is sorted and distinct; a linear merge, not a re-sort of everything
        pos = np.searchsorted(self._sorted, new)
        present = pos < len(self._sorted)
        present[present] = self._sorted[pos[present]] == new[present]
        self._sorted = np.insert(self._sorted, pos[~present], new[~present])

    @property
    def nbytes(self) -> int:
        """Approximate memory held (array bytes + the recent set's objects and slots)."""
        return int(self._sorted.nbytes) + len(self._recent) * 100
