"""The one place where stages meet Ray Data: each stage becomes a ``map_batches`` actor pool, or (a stage
that sets ``runs_as_task``: decode) a pool of tasks whose worker processes keep the set-up stage.

Why decode runs in tasks: Ray starts a new worker process for every actor of every execution (one
per wave), and that process first imports Ray Data (about 1 s on 2 cores, pandas most of it) while
the model actor does the same; a task runs in one of Ray's pooled worker processes, started with Ray
and kept between executions, so the first video decodes at once (0.1 s after the execution starts
against 1.1 s for an empty actor, measured on the 2-core VM) while the model worker starts beside it.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray.data

from workers.rows import Batch
from workers.stage import Stage, StagePlan


class StageActor:
    """A Ray Data actor that owns one stage: ``setup()`` runs in the actor, then batches stream through."""

    def __init__(self, stage: Stage) -> None:
        self._stage = stage
        self._stage.setup()

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        yield from _stream(self._stage, batch)


def _stream(stage: Stage, batch: Batch) -> Iterator[Batch]:
    """The stage's output batches for ``batch`` (a stage returns one, or yields several)."""
    out = stage.process_batch(batch)
    if isinstance(out, dict):
        yield out
    else:
        yield from out


def _title(stage: Stage) -> str:
    """The stage's name as processes, logs and the dashboard show it: ``decode`` -> ``Decode``."""
    return "".join(part.title() for part in stage.name.split("_"))


# Ray Data's default retries an actor task forever when its worker dies: a video that kills every
# worker it meets would stall the job.  One retry absorbs a lost node or a one-off kill; past it the
# task's block is dropped (the runner sets DataContext.max_errored_blocks) and the runner re-runs
# the videos that did not come back, isolating the one that keeps killing workers.
TASK_RETRIES = 1


def actor_class(stage: Stage) -> type[StageActor]:
    """A StageActor subclass named after the stage, so that processes, logs and the dashboard say which
    stage a worker runs (``ray::MapWorker(MapBatches(DecodeActor))``)."""
    name = _title(stage) + "Actor"
    return type(name, (StageActor,), {"__module__": __name__, "__qualname__": name})


@dataclass
class _Held:
    """The stage a stage task set up in this worker process."""

    key: str  # the stage's configuration
    stage: Stage
    mid_stream: bool = False  # a task left it before the end of its batch


_SET_UP: dict[str, _Held] = {}


def _stage_in_process(key: str, stage: Stage) -> _Held:
    """This process's set-up copy of the stage ``key`` names, made (``setup()``) on first use.

    One stage is kept per process: another job's (another key) replaces it.  A task that did not
    finish its batch (cancelled, or its consumer gone) may have left the stage mid-stream (a decoder
    process still sending chunks of that video), so the next task starts from a new one.
    """
    held = _SET_UP.get("stage")
    if held is not None and (held.key != key or held.mid_stream):
        del _SET_UP["stage"]
        close = getattr(held.stage, "close", None)
        if close is not None:
            close()
        held = None
    if held is None:
        stage.setup()
        held = _SET_UP["stage"] = _Held(key, stage)
    return held


def _run_task(key: str, stage: Stage, batch: Batch) -> Iterator[Batch]:
    held = _stage_in_process(key, stage)
    held.mid_stream = True
    yield from _stream(held.stage, batch)
    held.mid_stream = False


def task_function(stage: Stage) -> Callable[[Batch], Iterator[Batch]]:
    """A Ray Data task function running ``stage`` in a set-up copy kept by the worker process; named after
    the stage (``ray::MapBatches(DecodeTask)``)."""
    key = hashlib.sha256(pickle.dumps(stage)).hexdigest()  # the stage's configuration (not its process)

    def run(batch: Batch) -> Iterator[Batch]:
        # only module-level names here: this closure is pickled by value, with copies of the globals it names
        yield from _run_task(key, stage, batch)

    run.__name__ = run.__qualname__ = _title(stage) + "Task"
    return run


def add_stage(ds: ray.data.Dataset, stage: Stage, plan: StagePlan) -> ray.data.Dataset:
    """Append ``stage`` to ``ds``: an actor pool sized by ``plan``, or at most ``plan.pool_size`` tasks at once
    (``runs_as_task``)."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates free-form remote args, yet has no named parameter for actor retries
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        if stage.runs_as_task and not plan.resources.num_gpus:  # a GPU task's worker exits after it (max_calls 1)
            return ds.map_batches(
                task_function(stage),
                batch_size=plan.batch_size,
                batch_format="numpy",
                compute=ray.data.TaskPoolStrategy(size=plan.pool_size),
                num_cpus=plan.resources.num_cpus,
                max_retries=TASK_RETRIES,
            )
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
