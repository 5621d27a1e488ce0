"""vidpipe's pure library: media types, decoding, encoders, fusion + LSTM head, bundles, output schema.

Nothing here imports Ray; every stage runs in-process as well as under Ray.
"""

from pipeline.errors import ConfigError, MediaError, VidpipeError, WeightsNotFoundError
from pipeline.media import Chunk, ChunkingSpec, Failure, SamplingSpec, VideoInfo
from pipeline.specs import AudioEncoderSpec, HeadSpec, ImageEncoderSpec

__all__ = [
    "AudioEncoderSpec",
    "Chunk",
    "ChunkingSpec",
    "ConfigError",
    "Failure",
    "HeadSpec",
    "ImageEncoderSpec",
    "MediaError",
    "SamplingSpec",
    "VidpipeError",
    "VideoInfo",
    "WeightsNotFoundError",
]
