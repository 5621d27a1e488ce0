"""The stage interface: what Ray (or the in-process runner) needs to know to run a step.

A stage's constructor only stores configuration (it runs on the driver and is pickled to workers);
``setup()`` runs inside the worker and loads models; ``process_batch`` maps a numpy batch of chunk
rows to output rows.  A failure on one video is recorded on its row, never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.media import Failure
from workers.rows import Batch, Row, failure_row, is_failure, iter_rows, keys_of, peak_rss_mb, to_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the scheduler for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs: its resources per worker, pool size, batch size (chunks) and threads."""

    resources: Resources = Resources()
    pool_size: int = 1
    batch_size: int = 1
    threads: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class PipelinePlan:
    """How each stage runs.  ``models`` set: the image encoder, audio encoder and head share one pool.

    Fusing the three model stages into one actor (CPU-only clusters) saves two worker processes, two
    torch imports and two hand-offs of every chunk; on GPUs they stay separate pools sharing the GPU.
    """

    decode: StagePlan = StagePlan()
    image: StagePlan = StagePlan()
    audio: StagePlan = StagePlan()
    head: StagePlan = StagePlan()
    models: StagePlan | None = None


class Stage:
    """Base of the per-chunk stages (encoders, head)."""

    name: str = "stage"
    # run in Ray tasks whose pooled worker processes keep the set-up stage between executions, rather than
    # in actors started per execution: for stages whose work needs no model (see workers/ray_adapter.py)
    runs_as_task: bool = False

    def setup(self) -> None:
        """Load models; runs once inside the worker."""

    def empty_outputs(self) -> Row:
        """This stage's output array columns with zero rows (for failure rows)."""
        return {}

    def process_row(self, row: Row) -> Row:
        """Map one non-failure chunk row to its output columns (without the key columns)."""
        raise NotImplementedError

    def process_rows(self, rows: list[Row]) -> list[Row]:
        """Map the non-failure rows of a batch; override to batch work across chunks."""
        return [self.process_row(r) for r in rows]

    def process_batch(self, batch: Batch) -> Batch | Iterator[Batch]:
        started = time.perf_counter()
        rows = list(iter_rows(batch))
        good = [r for r in rows if not is_failure(r)]
        try:
            results = iter(self.process_rows(good))
        except Exception as exc:  # noqa: BLE001 - one bad chunk must not stop the job: it fails its videos
            log.exception("%s failed on a batch of %d chunks", self.name, len(good))
            results = None
            failed_msg = f"{type(exc).__name__}: {exc}"
        out: list[Row] = []
        for row in rows:
            if is_failure(row):
                out.append(keys_of(row) | self.empty_outputs())
            elif results is None:
                fail = Failure(uri=str(row["uri"]), video_id=str(row["video_id"]), stage=self.name,
                               error_kind="stage_error", message=failed_msg)
                out.append(failure_row(fail, self.empty_outputs()))
            else:
                out.append(keys_of(row) | next(results))
        self.account(out, time.perf_counter() - started)
        return to_batch(out)

    def account(self, rows: list[Row], busy_s: float) -> None:
        """Spread ``busy_s`` over ``rows`` by segment count and record this process's peak RSS."""
        if not rows:
            return
        sizes = [max(1, int(r["core_end"]) - int(r["core_start"])) for r in rows]
        total = sum(sizes)
        rss = peak_rss_mb()
        for r, n in zip(rows, sizes, strict=True):
            r[f"busy_{self.name}_s"] = busy_s * n / total
            r[f"rss_{self.name}_mb"] = rss


class ChainStage(Stage):
    """Several per-chunk stages run one after the other in the same worker."""

    name = "chain"

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ValueError("ChainStage needs at least one stage")
        self.stages = stages
        self.name = "+".join(s.name for s in stages)

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def empty_outputs(self) -> Row:
        return self.stages[-1].empty_outputs()

    def process_batch(self, batch: Batch) -> Batch:
        for stage in self.stages:
            out = stage.process_batch(batch)
            if not isinstance(out, dict):
                raise TypeError(f"stage {stage.name} yields several batches; it cannot be chained")
            batch = out
        return batch
