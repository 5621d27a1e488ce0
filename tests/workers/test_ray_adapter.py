"""Decode as Ray Data tasks: the worker process keeps its set-up stage (and decoder process) between tasks."""

from __future__ import annotations

import numpy as np
import pytest
from ray import cloudpickle

from pipeline.media import ChunkingSpec, SamplingSpec
from workers import ray_adapter
from workers.decode_stage import DecodeStage


def _stage(size: int = 32) -> DecodeStage:
    return DecodeStage(SamplingSpec(image_size=size), ChunkingSpec(core_segments=2, context_segments=1))


def _shipped(stage: DecodeStage):  # noqa: ANN202 - what a task receives: the function as Ray pickles it
    return cloudpickle.loads(cloudpickle.dumps(ray_adapter.task_function(stage)))


def _chunks(batches) -> list[tuple[int, bytes]]:  # noqa: ANN001 - (first segment, frames) of each chunk
    return [(int(b["core_start"][0]), b["frames"][0].tobytes()) for b in batches if not b["error_kind"][0]]


@pytest.fixture
def clean_process():
    ray_adapter._SET_UP.clear()
    yield
    held = ray_adapter._SET_UP.pop("stage", None)
    if held is not None:
        held.stage.close()


def test_a_stage_task_sets_up_once_per_process_and_starts_over_after_a_task_left_mid_stream(shared_media,
                                                                                             clean_process):
    batch = {"uri": np.array([str(shared_media / "bbb_5s_51.mp4")]), "video_id": np.array(["v"])}
    first = _chunks(_shipped(_stage())(batch))
    assert [c[0] for c in first] == [0, 2, 4]  # 5 s in chunks of 2 segments
    held = ray_adapter._SET_UP["stage"]
    decoder = held.stage._child
    assert decoder is not None and decoder.alive() and not held.mid_stream
    # the next task (a new copy of the stage, as each task unpickles one) uses the process's decoder
    assert _chunks(_shipped(_stage())(batch)) == first
    assert ray_adapter._SET_UP["stage"] is held and held.stage._child is decoder and decoder.alive()
    # a task given up after its first chunk (its consumer gone): the next one does not read that video's rest
    left = _shipped(_stage())(batch)
    assert _chunks([next(left)]) == first[:1]
    left.close()
    assert held.mid_stream
    assert _chunks(_shipped(_stage())(batch)) == first
    again = ray_adapter._SET_UP["stage"]
    renewed = again.stage._child
    assert again is not held and renewed is not None and renewed.alive() and not decoder.alive()
    # another job's stage (another configuration) replaces the process's one, whose decoder stops
    other = _chunks(_shipped(_stage(size=16))(batch))
    assert len(other) == 3 and other[0][1] != first[0][1]
    assert ray_adapter._SET_UP["stage"] is not again and not renewed.alive()
