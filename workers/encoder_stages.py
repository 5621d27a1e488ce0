"""Encoder stages: image embeddings from a chunk's frames, audio embeddings from its samples.

Both concatenate the segments of every chunk in a batch, encode them in large device batches, and
split the result back per chunk; they drop the raw pixels / samples so later stages move less data.

Consecutive chunks of a video overlap by twice the head's context (with the default bundle 16 of a
chunk's 64 rows: a third more encoding than segments).  On the CPU each stage keeps the embeddings
of the overlap it encoded last per video (:class:`_Overlap`) and encodes only the segments it has
not seen, when the next chunk of that video comes to the same worker.  That gives the very same
numbers: on the CPU every encoder here computes each segment independently of its batch-mates, bit
for bit (tested for every image backbone and both audio kinds, float32 and bf16, 1 and 2 threads).
On CUDA, where cuDNN may choose its algorithm by batch size, every segment is encoded.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from pipeline.audio_encoder import AudioEncoder, ClassicAudioEncoder, build_audio_encoder
from pipeline.image_encoder import IMAGE_ENCODER_DIMS, ImageEncoder
from pipeline.precision import runs_emulated_bf16
from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec
from workers.rows import KEY_COLUMNS, Row
from workers.stage import Stage

_DROP_AFTER_IMAGE = ("frames",)
_DROP_AFTER_AUDIO = ("audio", "audio_valid_samples")


def _passthrough(row: Row, drop: tuple[str, ...]) -> Row:
    """Per-segment columns of ``row`` that are neither key columns nor dropped."""
    return {k: v for k, v in row.items() if k not in KEY_COLUMNS and k not in drop}


def torch_device_type(device: str) -> str:
    """``"cpu"``, ``"cuda"``, ... of a device string such as ``"cuda:1"``."""
    return device.split(":", 1)[0]


def _split(values: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if lengths else []


_Kept = tuple[int, dict[str, np.ndarray], list[bytes]]  # first segment, embeddings, digests of their inputs


class _Overlap:
    """Per video, the embeddings of the last chunk's rows that the next chunk will repeat.

    The next chunk of a video starts ``context`` segments before this one's core ends, and this one
    holds up to ``context`` segments past it: those rows are kept (a video's first chunk keeps its
    whole core).  An embedding is reused only where the segment's input is the same bytes as when it
    was encoded (a digest of its frames, or of its samples and valid count): a chunk can go out before
    its right context's audio has arrived (the audio lags), and the next chunk then has that audio.
    Memory is capped (least recently used videos go first); a video's entry goes when its last chunk
    has passed.  Disabled (on CUDA), it knows nothing and keeps nothing: every segment is encoded.
    """

    def __init__(self, inputs: Callable[[Row], list[np.ndarray]], *, enabled: bool = True,
                 max_bytes: int = 64 << 20) -> None:
        self.inputs = inputs  # a row's per-segment input arrays (the same first dimension)
        self.enabled = enabled
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._bytes = 0
        self.reused = 0  # segments not encoded again (the tests read it)

    def _digest(self, arrays: list[np.ndarray], i: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            h.update(np.ascontiguousarray(a[i]).data)
        return h.digest()

    def known(self, row: Row) -> tuple[np.ndarray, _Kept | None]:
        """Which of ``row``'s segments are kept with the same input (a boolean mask over its rows), and
        what is kept."""
        n = len(row["start_s"])
        first = int(row["first_segment"])
        mask = np.zeros(n, dtype=bool)
        kept = self._kept.get(str(row["video_id"])) if self.enabled else None
        if kept is not None:
            k_first, _, digests = kept
            lo, hi = max(first, k_first), min(first + n, k_first + len(digests))
            arrays = self.inputs(row)
            for seg in range(lo, hi):
                mask[seg - first] = self._digest(arrays, seg - first) == digests[seg - k_first]
        return mask, kept

    def unknown_inputs(self, row: Row, known: tuple[np.ndarray, _Kept | None]) -> list[np.ndarray]:
        """``row``'s input arrays for the segments that must be encoded."""
        mask = known[0]
        return [a[~mask] for a in self.inputs(row)] if mask.any() else self.inputs(row)

    def merge(self, row: Row, known: tuple[np.ndarray, _Kept | None],
              fresh: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The full columns of ``row``: ``fresh`` values for its unknown segments, kept ones for the rest
        (``known`` as :meth:`known` gave it, before any row of the same batch was merged)."""
        mask, kept = known
        video_id, first, n = str(row["video_id"]), int(row["first_segment"]), len(mask)
        full = fresh
        if kept is not None and mask.any():
            k_first, values, _ = kept
            rows = np.arange(n)[mask] + first - k_first
            full = {}
            for name, part in fresh.items():
                col = np.empty((n, *part.shape[1:]), dtype=part.dtype)
                col[~mask] = part
                col[mask] = values[name][rows]
                full[name] = col
            self.reused += int(mask.sum())
        self._forget(video_id)
        core_start, core_end = int(row["core_start"]), int(row["core_end"])
        if self.enabled and not bool(row["is_last"]) and first + n > core_end:  # no right context: no overlap to keep
            # The next chunk starts `context` segments before this core's end; a first chunk (no left
            # context to tell `context` by) keeps its whole core.
            next_first = core_end - (core_start - first) if core_start > first else core_start
            keep_from = min(max(0, next_first - first), n)
            tail = {name: col[keep_from:].copy() for name, col in full.items()}
            arrays = self.inputs(row)
            digests = [self._digest(arrays, i) for i in range(keep_from, n)]
            self._kept[video_id] = (first + keep_from, tail, digests)
            self._bytes += sum(v.nbytes for v in tail.values())
            while self._bytes > self.max_bytes and self._kept:
                self._forget(next(iter(self._kept)))
        return full

    def _forget(self, video_id: str) -> None:
        kept = self._kept.pop(video_id, None)
        if kept is not None:
            self._bytes -= sum(v.nbytes for v in kept[1].values())


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
        self._overlap: _Overlap | None = None
        self._emulated = False  # bf16 on a CPU without native bf16 (see workers.rows.METRIC_COLUMNS)

    def setup(self) -> None:
        self._encoder = ImageEncoder(self.spec, device=self.device, batch_size=self.batch_size, threads=self.threads,
                                     precision=self.precision)  # type: ignore[arg-type]
        self._encoder.setup()
        self._overlap = _Overlap(_image_inputs, enabled=torch_device_type(self.device) == "cpu")
        self._emulated = runs_emulated_bf16(torch.device(self._encoder.device), self.precision)

    def account(self, rows: list[Row], busy_s: float) -> None:
        super().account(rows, busy_s)
        _mark_emulated(rows, self._emulated)

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
        encoder, overlap = self._encoder, self._overlap
        if encoder is None or overlap is None:
            raise RuntimeError("image encoder did not set up")
        known = [overlap.known(r) for r in rows]
        todo = [overlap.unknown_inputs(r, k)[0] for r, k in zip(rows, known, strict=True)]
        lengths = [len(t) for t in todo]
        feats = encoder.encode(np.concatenate(todo))
        pooled = _split(feats.pooled, lengths)
        grids = _split(feats.grid, lengths) if feats.grid is not None else None
        out = []
        for i, row in enumerate(rows):
            fresh = {"image_emb": pooled[i]} | ({"image_grid": grids[i]} if grids is not None else {})
            o = _passthrough(row, _DROP_AFTER_IMAGE)
            o.update(overlap.merge(row, known[i], fresh))
            out.append(o)
        return out


def _mark_emulated(rows: list[Row], emulated: bool) -> None:
    """Flag the chunks an encoder ran in emulated bf16 (failure rows pass through unflagged)."""
    if emulated:
        for r in rows:
            if not r.get("error_kind"):
                r["bf16_emulated"] = 1.0


def _image_inputs(row: Row) -> list[np.ndarray]:
    return [np.asarray(row["frames"])]


def _audio_inputs(row: Row) -> list[np.ndarray]:
    return [np.asarray(row["audio"], np.float32), np.asarray(row["audio_valid_samples"], np.int32)]


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
        self._overlap: _Overlap | None = None
        self._emulated = False

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
        on_cpu = isinstance(encoder, ClassicAudioEncoder) or torch_device_type(self.device) == "cpu"
        self._overlap = _Overlap(_audio_inputs, enabled=on_cpu)
        self._emulated = isinstance(encoder, AudioEncoder) and runs_emulated_bf16(torch.device(encoder.device),
                                                                                  self.precision)

    def account(self, rows: list[Row], busy_s: float) -> None:
        super().account(rows, busy_s)
        _mark_emulated(rows, self._emulated)

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
        encoder, overlap = self._encoder, self._overlap
        if encoder is None or overlap is None:
            raise RuntimeError("audio encoder did not set up")
        known = [overlap.known(r) for r in rows]
        audio, valid = zip(*(overlap.unknown_inputs(r, k) for r, k in zip(rows, known, strict=True)), strict=True)
        lengths = [len(a) for a in audio]
        emb = encoder.encode(np.concatenate(audio), np.concatenate(valid))
        parts = _split(np.asarray(emb, np.float32), lengths)
        out = []
        for i, row in enumerate(rows):
            o = _passthrough(row, _DROP_AFTER_AUDIO)
            o.update(overlap.merge(row, known[i], {"audio_emb": parts[i]}))
            out.append(o)
        return out
