"""The one place where stages meet Ray Data: each stage becomes a ``map_batches`` actor pool."""

from __future__ import annotations

import warnings
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
# worker it meets would stall the job.  One retry absorbs a lost node or a one-off kill; past it the
# task's block is dropped (the runner sets DataContext.max_errored_blocks) and the runner re-runs
# the videos that did not come back, isolating the one that keeps killing workers.
TASK_RETRIES = 1


def actor_class(stage: Stage) -> type[StageActor]:
    """A StageActor subclass named after the stage, so that processes, logs and the dashboard say which
    stage a worker runs (``ray::MapWorker(MapBatches(DecodeActor))``)."""
    name = "".join(part.title() for part in stage.name.split("_")) + "Actor"
    return type(name, (StageActor,), {"__module__": __name__, "__qualname__": name})


def add_stage(ds: ray.data.Dataset, stage: Stage, plan: StagePlan) -> ray.data.Dataset:
    """Append ``stage`` to ``ds`` as an actor pool sized by ``plan``."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates free-form remote args, yet has no named parameter for actor retries
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return ds.map_batches(
            actor_class(stage),
            fn_constructor_args=(stage,),
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.pool_size),
            num_cpus=plan.resources.num_cpus,
            num_gpus=plan.resources.num_gpus or None,
            max_restarts=-1,
            max_task_retries=TASK_RETRIES,
        )
