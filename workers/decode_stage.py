"""DecodeStage: one input video row in, a stream of chunk rows out (or one failure row)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from pipeline.decode import VideoDecoder
from pipeline.errors import MediaError
from pipeline.inputs import open_input
from pipeline.media import ChunkingSpec, Failure, SamplingSpec
from workers.rows import Batch, Row, chunk_row, failure_row, iter_rows, to_batch
from workers.stage import Stage

log = logging.getLogger(__name__)


class DecodeStage(Stage):
    """Decode whole videos with PyAV into chunk rows; a bad file becomes a failure row."""

    name = "decode"

    def __init__(self, sampling: SamplingSpec, chunking: ChunkingSpec, *, threads: int = 0,
                 hwaccel: str | None = None) -> None:
        self.sampling = sampling
        self.chunking = chunking
        self.threads = threads
        self.hwaccel = hwaccel
        self._decoder: VideoDecoder | None = None

    def setup(self) -> None:
        self._decoder = VideoDecoder(self.sampling, self.chunking, threads=self.threads, hwaccel=self.hwaccel)

    def empty_outputs(self) -> Row:
        s, k, n = self.sampling.image_size, self.sampling.frames_per_segment, self.sampling.samples_per_segment
        return {
            "start_s": np.zeros(0, np.float64),
            "end_s": np.zeros(0, np.float64),
            "frames": np.zeros((0, k, s, s, 3), np.uint8),
            "audio": np.zeros((0, n), np.float32),
            "audio_valid_samples": np.zeros(0, np.int32),
        }

    def process_batch(self, batch: Batch) -> Iterator[Batch]:
        for row in iter_rows(batch):
            started = time.perf_counter()
            for out in self.decode_video(str(row["uri"]), str(row["video_id"])):
                # busy time excludes the time the consumer holds us suspended at the yield
                self.account([out], time.perf_counter() - started)
                yield to_batch([out])
                started = time.perf_counter()

    def decode_video(self, uri: str, video_id: str) -> Iterator[Row]:
        """Yield the chunk rows of one video, or a single failure row."""
        if self._decoder is None:
            self.setup()
        assert self._decoder is not None
        try:
            with open_input(uri) as source:
                for chunk in self._decoder.chunks(source.file, uri=uri, video_id=video_id,
                                                  size_bytes=source.size_bytes):
                    yield chunk_row(chunk)
        except MediaError as exc:
            yield failure_row(Failure(uri=uri, video_id=video_id, stage=self.name,
                                      error_kind=exc.error_kind, message=exc.message), self.empty_outputs())
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must fail that file, not the job
            log.exception("unexpected error decoding %s", uri)
            yield failure_row(Failure(uri=uri, video_id=video_id, stage=self.name, error_kind="internal_error",
                                      message=f"unexpected {type(exc).__name__} while decoding: {exc}"),
                              self.empty_outputs())
