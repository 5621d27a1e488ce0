"""Run a stage chain in-process, without Ray: for logic tests, debugging and GPU machines without Ray."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from workers.rows import Batch, iter_rows, to_batch
from workers.stage import Stage


def _as_batches(out: Batch | Iterator[Batch]) -> Iterator[Batch]:
    if isinstance(out, dict):
        yield out
    else:
        yield from out


class SequentialRunner:
    """Feeds every batch through each stage in order, one batch at a time (bounded memory)."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._ready = False

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()
        self._ready = True

    def run(self, videos: Iterable[dict[str, str]]) -> Iterator[Batch]:
        """Yield the last stage's output batches for input rows ``{"uri", "video_id"}``."""
        if not self._ready:
            self.setup()
        for video in videos:
            yield from self._through(to_batch([dict(video)]), 0)

    def _through(self, batch: Batch, i: int) -> Iterator[Batch]:
        if i == len(self.stages):
            yield batch
            return
        for out in _as_batches(self.stages[i].process_batch(batch)):
            if out and len(out.get("video_id", ())):
                yield from self._through(out, i + 1)


def rows_of(batches: Iterable[Batch]) -> Iterator[dict]:
    for b in batches:
        yield from iter_rows(b)
