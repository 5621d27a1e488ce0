"""The one place where stages meet Ray Data: each stage becomes a ``map_batches`` actor pool."""

from __future__ import annotations

from collections.abc import Iterator

import ray.data

from workers.rows import Batch
from workers.stage import Stage, StagePlan


class StageActor:
    """A Ray Data actor that owns one stage: ``setup()`` runs in the actor, then batches stream through."""

    def __init__(self, stage: Stage) -> None:
        self._stage = stage
        self._stage.setup()

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        out = self._stage.process_batch(batch)
        if isinstance(out, dict):
            yield out
        else:
            yield from out


# Ray Data's default retries an actor task forever when its worker dies: a video that kills every
# decoder it meets would stall the job.  One retry absorbs a lost node or a one-off kill; past it the
# task's block is dropped (the runner sets DataContext.max_errored_blocks) and the runner re-runs
# the videos that did not come back, isolating the one that keeps killing workers.
TASK_RETRIES = 1


def add_stage(ds: ray.data.Dataset, stage: Stage, plan: StagePlan) -> ray.data.Dataset:
    """Append ``stage`` to ``ds`` as an actor pool sized by ``plan``."""
    return ds.map_batches(
        StageActor,
        fn_constructor_args=(stage,),
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.pool_size),
        num_cpus=plan.resources.num_cpus,
        num_gpus=plan.resources.num_gpus or None,
        max_restarts=-1,
        max_task_retries=TASK_RETRIES,
    )
