"""The one place where stages meet Ray Data: each stage becomes a ``map_batches`` actor pool."""

from __future__ import annotations

from collections.abc import Iterator

import ray.data

from workers.build import StagePlan
from workers.rows import Batch
from workers.stage import Stage


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
    )
