"""Assemble the stage chain for a bundle: decode → image encoder → audio encoder → head."""

from __future__ import annotations

from pipeline.bundle import ModelBundle
from pipeline.image_encoder import IMAGE_ENCODER_DIMS
from pipeline.media import ChunkingSpec, SamplingSpec
from workers.decode_stage import DecodeStage
from workers.encoder_stages import AudioEncoderStage, ImageEncoderStage
from workers.head_stage import HeadStage
from workers.stage import ChainStage, PipelinePlan, Stage, StagePlan

__all__ = ["PipelinePlan", "StagePlan", "build_stages", "chunking_for"]


# A chunk's sampled frames are what bounds a worker's memory (224x224 RGB: 150 KB each); short segments
# must not turn --chunk-seconds into an unbounded number of them.
MAX_CHUNK_FRAMES = 512


def chunking_for(bundle: ModelBundle, chunk_seconds: float) -> ChunkingSpec:
    """Chunks hold a whole number of head windows, about ``chunk_seconds`` long (at most
    :data:`MAX_CHUNK_FRAMES` frames unless one window is more), plus head context."""
    window = bundle.head.window_segments
    per_chunk = max(1, int(chunk_seconds / bundle.sampling.segment_seconds + 1e-9))
    per_chunk = min(per_chunk, MAX_CHUNK_FRAMES // bundle.sampling.frames_per_segment)
    core = max(window, (per_chunk // window) * window)
    return ChunkingSpec(core_segments=core, context_segments=bundle.head.context_segments)


def build_stages(bundle: ModelBundle, sampling: SamplingSpec, chunking: ChunkingSpec, plan: PipelinePlan, *,
                 top_k: int = 5, with_embedding: bool = False,
                 decode_device: str = "cpu", precision: str = "auto",
                 video_timeout_s: float | None = None, crash_attempts: int = 3) -> list[tuple[Stage, StagePlan]]:
    """The stages of one job, each with how it should run."""
    image_dim = IMAGE_ENCODER_DIMS[bundle.image.name]
    hwaccel = "cuda" if decode_device == "cuda" else None
    stages: list[tuple[Stage, StagePlan]] = [
        (DecodeStage(sampling, chunking, threads=plan.decode.threads or 0, hwaccel=hwaccel,
                     video_timeout_s=video_timeout_s, crash_attempts=crash_attempts), plan.decode),
        (ImageEncoderStage(bundle.image, device=plan.image.device, threads=plan.image.threads, precision=precision),
         plan.image),
        (AudioEncoderStage(bundle.audio, sample_rate_hz=sampling.audio_rate_hz, state_dict=bundle.audio_state(),
                           device=plan.audio.device, threads=plan.audio.threads, image_dim=image_dim,
                           image_grid=bundle.image.grid > 0, precision=precision), plan.audio),
        (HeadStage(bundle, device=plan.head.device, threads=plan.head.threads, top_k=top_k,
                   with_embedding=with_embedding), plan.head),
    ]
    if plan.models is not None:
        return [stages[0], (ChainStage([s for s, _ in stages[1:]]), plan.models)]
    return stages
