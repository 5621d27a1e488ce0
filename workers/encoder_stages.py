"""Encoder stages: image embeddings from a chunk's frames, audio embeddings from its samples.

Both concatenate the segments of every chunk in a batch, encode them in large device batches, and
split the result back per chunk; they drop the raw pixels / samples so later stages move less data.
"""

from __future__ import annotations

import numpy as np

from pipeline.audio_encoder import AudioEncoder, ClassicAudioEncoder, build_audio_encoder
from pipeline.image_encoder import IMAGE_ENCODER_DIMS, ImageEncoder
from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec
from workers.rows import KEY_COLUMNS, Row
from workers.stage import Stage

_DROP_AFTER_IMAGE = ("frames",)
_DROP_AFTER_AUDIO = ("audio", "audio_valid_samples")


def _passthrough(row: Row, drop: tuple[str, ...]) -> Row:
    """Per-segment columns of ``row`` that are neither key columns nor dropped."""
    return {k: v for k, v in row.items() if k not in KEY_COLUMNS and k not in drop}


def _split(values: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if lengths else []


class ImageEncoderStage(Stage):
    """Frames → ``image_emb`` [n, D] (and ``image_grid`` [n, R, D] for attention fusion)."""

    name = "image_encoder"

    def __init__(self, spec: ImageEncoderSpec, *, device: str = "cpu", batch_size: int | None = None,
                 threads: int | None = None, carry: tuple[str, ...] = (), precision: str = "auto") -> None:
        self.spec = spec
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.carry = carry  # columns of the decode output the later stages still need
        self._encoder: ImageEncoder | None = None

    def setup(self) -> None:
        self._encoder = ImageEncoder(self.spec, device=self.device, batch_size=self.batch_size, threads=self.threads,
                                     precision=self.precision)  # type: ignore[arg-type]
        self._encoder.setup()

    def empty_outputs(self) -> Row:
        d = IMAGE_ENCODER_DIMS[self.spec.name]
        out: Row = {"start_s": np.zeros(0), "end_s": np.zeros(0),
                    "audio": np.zeros((0, 0), np.float32), "audio_valid_samples": np.zeros(0, np.int32),
                    "image_emb": np.zeros((0, d), np.float32)}
        if self.spec.grid:
            out["image_grid"] = np.zeros((0, 0, d), np.float32)
        return out

    def process_rows(self, rows: list[Row]) -> list[Row]:
        if not rows:
            return []
        if self._encoder is None:
            self.setup()
        encoder = self._encoder
        if encoder is None:
            raise RuntimeError("image encoder did not set up")
        lengths = [len(r["frames"]) for r in rows]
        feats = encoder.encode(np.concatenate([np.asarray(r["frames"]) for r in rows]))
        pooled = _split(feats.pooled, lengths)
        grids = _split(feats.grid, lengths) if feats.grid is not None else None
        out = []
        for i, row in enumerate(rows):
            o = _passthrough(row, _DROP_AFTER_IMAGE)
            o["image_emb"] = pooled[i]
            if grids is not None:
                o["image_grid"] = grids[i]
            out.append(o)
        return out


class AudioEncoderStage(Stage):
    """Audio samples → ``audio_emb`` [n, D]."""

    name = "audio_encoder"

    def __init__(self, spec: AudioEncoderSpec, *, sample_rate_hz: int, state_dict: dict | None = None,
                 device: str = "cpu", batch_size: int = 256, threads: int | None = None,
                 image_dim: int = 512, image_grid: bool = False, precision: str = "auto") -> None:
        self.spec = spec
        self.precision = precision
        self.sample_rate_hz = sample_rate_hz
        self.state_dict = state_dict
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.image_dim = image_dim
        self.image_grid = image_grid
        self._encoder: AudioEncoder | ClassicAudioEncoder | None = None
        self._dim: int | None = None

    def setup(self) -> None:
        encoder = build_audio_encoder(self.spec, sample_rate_hz=self.sample_rate_hz, device=self.device,
                                      batch_size=self.batch_size, threads=self.threads,
                                      state_dict=self.state_dict, precision=self.precision)
        encoder.setup()
        # The first call pays one-time costs (torch's kernel selection and allocator for the CNN, numpy's
        # FFT plans for the classic features); pay them here, while the first chunk is still decoding.
        warm = np.random.default_rng(0).standard_normal((1, self.sample_rate_hz)).astype(np.float32) * 0.1
        encoder.encode(warm, np.array([self.sample_rate_hz], np.int32))
        self._encoder, self._dim = encoder, encoder.dim

    def empty_outputs(self) -> Row:
        dim = self._dim or build_audio_encoder(self.spec, sample_rate_hz=self.sample_rate_hz).dim
        out: Row = {"start_s": np.zeros(0), "end_s": np.zeros(0),
                    "image_emb": np.zeros((0, self.image_dim), np.float32),
                    "audio_emb": np.zeros((0, dim), np.float32)}
        if self.image_grid:
            out["image_grid"] = np.zeros((0, 0, self.image_dim), np.float32)
        return out

    def process_rows(self, rows: list[Row]) -> list[Row]:
        if not rows:
            return []
        if self._encoder is None:
            self.setup()
        encoder = self._encoder
        if encoder is None:
            raise RuntimeError("audio encoder did not set up")
        lengths = [len(r["audio"]) for r in rows]
        emb = encoder.encode(np.concatenate([np.asarray(r["audio"], np.float32) for r in rows]),
                             np.concatenate([np.asarray(r["audio_valid_samples"], np.int32) for r in rows]))
        parts = _split(np.asarray(emb, np.float32), lengths)
        out = []
        for i, row in enumerate(rows):
            o = _passthrough(row, _DROP_AFTER_AUDIO)
            o["audio_emb"] = parts[i]
            out.append(o)
        return out
