"""``vidpipe train``: train the fusion + BiLSTM head on annotated videos and write a model bundle.

Steps: read the annotations (``jobs.annotations``); extract per-segment encoder features once with the
pipeline's own Ray stages into the feature cache (``jobs.features``; ``<OUT>/work/features`` unless
``cache`` is given); split the videos into train and validation *by video* (seeded, or AVE's own split);
train the head on windows shaped exactly like the ones ``HeadRunner`` labels at inference (``W`` output
segments with up to ``X`` context segments on each side, clipped at the video's ends; each epoch shifts
the window grid of every video by a random offset, so more distinct windows are seen); stop early on
validation macro-F1 (ties: validation loss); label the validation videos again from bf16 encoder features
(``bf16_check``: where bf16 scores them lower, the bundle asks ``--precision auto`` for fp32); write a
trained ``ModelBundle`` that ``vidpipe run --model`` loads.

Inputs are standardised per feature during training (mean / std over the training segments, the std no
smaller than ``NOISE_FLOOR`` times the rounding bf16 encoders add to the feature); the standardisation is
then folded into the head's first linear layers, so the saved head takes raw encoder features like any
other and the bundle format does not change.  ``modality_dropout`` zeroes one
modality's raw features in a random fraction of training windows, which keeps the head usable when a
modality is missing (a silent or audio-less video) and makes ``vidpipe eval --ablate`` meaningful.

Deterministic on CPU for a given seed (the head's init, the split, the shuffling and the dropout masks
all come from it); on CUDA cuDNN's LSTM kernels may differ in the last bits between runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F

from jobs import stopping
from jobs.annotations import (
    AVE_SPLIT_FILES,
    BACKGROUND,
    AnnotatedVideo,
    AnnotationSet,
    TaskKind,
    UnlabeledMode,
    label_list,
    read_annotations,
    segment_targets,
    warn_spans_past_the_end,
)
from jobs.evaluate import Metrics, decide, multiclass_metrics, multilabel_metrics, predict_video
from jobs.features import FeatureSpec, VideoFeatures, extract_features, tensors_digest
from jobs.progress import count_of
from jobs.spec import check_segment_seconds, check_writable_dir, runs_here
from pipeline.audio_encoder import build_audio_encoder
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError, WeightsNotFoundError
from pipeline.head import FusionHead, HeadRunner, build_head, window_plan
from pipeline.image_encoder import IMAGE_ENCODER_DIMS, file_sha256, resolve_image_weights
from pipeline.media import SamplingSpec
from pipeline.precision import encoder_precision, pick_device
from pipeline.specs import (
    AUDIO_ENCODER_KINDS,
    FUSION_KINDS,
    IMAGE_ENCODER_NAMES,
    AudioEncoderSpec,
    FusionKind,
    HeadSpec,
    ImageEncoderSpec,
)

WORK_DIR = "work"
MAX_LR = 1.0  # --lr: AdamW moves each weight by about lr per step; past this, no head trains
# kept when a bundle directory is retrained: the feature cache and a README the user wrote there
_KEPT = (WORK_DIR, "README.md")


@dataclass
class TrainSpec:
    """Everything that defines one ``vidpipe train`` run.  Validated on construction."""

    annotations: str
    out: str
    videos: str | None = None
    fusion: FusionKind = "concat"
    task: TaskKind = "multiclass"
    unlabeled: UnlabeledMode = "background"
    epochs: int = 60
    val_fraction: float = 0.2
    patience: int = 12
    image_encoder: str = "efficientnet_lite0"
    image_weights: str = "default"
    image_grid: int = 0
    audio_encoder: str = "cnn"
    audio_f_max_hz: float = 8000.0
    segment_seconds: float = 1.0
    frames_per_segment: int = 1
    image_size: int = 224
    window_segments: int = 16
    context_segments: int = 8
    proj_dim: int = 128
    lstm_hidden: int = 128
    dropout: float = 0.2
    modality_dropout: float = 0.15
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_windows: int = 32
    seed: int = 0
    device: str = "auto"
    address: str | None = None
    cache: str | None = None  # feature cache root; default <out>/work/features
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not allowed; choose one of: {', '.join(allowed)}")

        for flag, path, what in (("--out", self.out, "the bundle directory to write"),
                                 ("--annotations", self.annotations, "the annotation file")):
            if not str(path).strip():  # --out "" was "--out .: the directory holds other files"
                raise ConfigError(f"{flag} is empty; give {what}")
        choice("--fusion", self.fusion, FUSION_KINDS)
        choice("--task", self.task, get_args(TaskKind))
        choice("--unlabeled", self.unlabeled, get_args(UnlabeledMode))
        choice("--image-encoder", self.image_encoder, IMAGE_ENCODER_NAMES)
        choice("--audio-encoder", self.audio_encoder, AUDIO_ENCODER_KINDS)
        choice("--device", self.device, ("auto", "cpu", "cuda"))
        check_segment_seconds(self.segment_seconds)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.modality_dropout < 0.5:
            raise ConfigError(f"modality_dropout must be in [0, 0.5), got {self.modality_dropout}")
        for flag, value, least in (("--patience", self.patience, 1), ("--window-segments", self.window_segments, 1),
                                   ("--frames-per-segment", self.frames_per_segment, 1),
                                   ("--context-segments", self.context_segments, 0),
                                   ("batch_windows", self.batch_windows, 1)):
            if value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if not 0 < self.lr <= MAX_LR:
            # 1e300 failed after the features' extraction with torch's traceback; 1e30 trained to NaN and saved it
            raise ConfigError(f"--lr must be a positive number at most {MAX_LR:g} (AdamW's step; the default is 2e-3), "
                              f"got {self.lr}")
        cells = max(1, -(-self.image_size // 32))  # the CNNs' feature map: 1/32 of the input a side (7 at 224)
        if not 0 <= self.image_grid <= cells:
            raise ConfigError(f"--image-grid must be in [0, {cells}] at --image-size {self.image_size} (the image "
                              f"encoder's feature map is {cells}x{cells}), got {self.image_grid}")
        if self.image_grid and self.fusion != "attention":  # ignored there, at the cost of every grid's features
            raise ConfigError(f"--image-grid is for --fusion attention (the regions it attends over); --fusion "
                              f"{self.fusion} does not use them: leave --image-grid out, or add --fusion attention")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")

    def sampling(self) -> SamplingSpec:
        try:
            return SamplingSpec(segment_seconds=self.segment_seconds, frames_per_segment=self.frames_per_segment,
                                image_size=self.image_size)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def image_spec(self) -> ImageEncoderSpec:
        return ImageEncoderSpec(name=self.image_encoder, weights=self.image_weights, grid=self.image_grid)  # type: ignore[arg-type]

    def audio_spec(self) -> AudioEncoderSpec:
        return AudioEncoderSpec(kind=self.audio_encoder, f_max_hz=self.audio_f_max_hz)  # type: ignore[arg-type]


@dataclass
class TrainResult:
    bundle: ModelBundle
    path: Path
    val_metrics: Metrics | None
    history: list[dict[str, float | None]]
    feature_cache_hits: int
    seconds: float
    n_failed: int = 0  # annotated videos that could not be decoded (left out), or failed only in the bf16 pass


# ------------------------------------------------------------------------------------------------ data


@dataclass
class _Video:
    """One video's standardised features and targets, ready for windows."""

    uri: str
    image: torch.Tensor  # [n, D] standardised
    audio: torch.Tensor  # [n, Da]
    grid: torch.Tensor | None  # [n, R, D]
    target: torch.Tensor  # multiclass long [n] (-1: none); multilabel float [n, L] (row of -1: none)

    @property
    def n(self) -> int:
        return int(self.image.shape[0])


@dataclass
class _Norm:
    image_mean: np.ndarray
    image_std: np.ndarray
    audio_mean: np.ndarray
    audio_std: np.ndarray
    floored: tuple[int, int] = (0, 0)  # how many (image, audio) features' std the bf16 rounding floor raised

    @classmethod
    def fit(cls, feats: list[VideoFeatures], noise: tuple[np.ndarray, np.ndarray] | None = None) -> _Norm:
        """Mean and std per feature over ``feats``; ``noise``: the (image, audio) per-feature RMS of bf16's
        rounding (``bf16_noise``), below ``NOISE_FLOOR`` times which no std is taken."""
        img = np.concatenate([f.image for f in feats]).astype(np.float64)
        aud = np.concatenate([f.audio for f in feats]).astype(np.float64)

        raised: list[int] = []

        def std(x: np.ndarray, rounding: np.ndarray | None) -> np.ndarray:
            s = x.std(axis=0)
            # a constant feature (dead ReLU unit) stays constant: do not blow up its noise (std 1, or the floor
            # where that is larger)
            s = np.where(s > 1e-6, s, 1.0)
            if rounding is not None:  # a variation bf16 encoders drown is not blown up into many stds either
                floor = NOISE_FLOOR * rounding
                raised.append(int((s < floor).sum()))
                s = np.maximum(s, floor)
            return s

        image_std = std(img, None if noise is None else noise[0])
        audio_std = std(aud, None if noise is None else noise[1])
        return cls(img.mean(axis=0), image_std, aud.mean(axis=0), audio_std,
                   (raised[0], raised[1]) if raised else (0, 0))

    def apply(self, f: VideoFeatures, target: np.ndarray) -> _Video:
        im = (f.image - self.image_mean) / self.image_std
        au = (f.audio - self.audio_mean) / self.audio_std
        grid = None if f.grid is None else (f.grid - self.image_mean) / self.image_std
        tgt = torch.from_numpy(target)
        return _Video(uri=f.uri, image=torch.from_numpy(im.astype(np.float32)),
                      audio=torch.from_numpy(au.astype(np.float32)),
                      grid=None if grid is None else torch.from_numpy(grid.astype(np.float32)), target=tgt)

    def zero_image(self) -> torch.Tensor:
        """Standardised value of an all-zero raw image feature (what ``--ablate visual`` feeds)."""
        return torch.from_numpy((-self.image_mean / self.image_std).astype(np.float32))

    def zero_audio(self) -> torch.Tensor:
        return torch.from_numpy((-self.audio_mean / self.audio_std).astype(np.float32))


def _videos_to_train_on(ann: AnnotationSet, source: str, say: Callable[[str], None]) -> list[AnnotatedVideo]:
    """The annotated videos training reads: with AVE's split files, its train and validation videos only (its
    test videos are eval's; they were decoded and then left unused, as were videos in no split file, unsaid)."""
    if not ann.splits:
        return list(ann.videos)
    kept = [v for v in ann.videos if ann.splits.get(v.uri) in ("train", "val")]
    n_test = sum(ann.splits.get(v.uri) == "test" for v in ann.videos)
    unsplit = [v.uri for v in ann.videos if v.uri not in ann.splits]
    say(f"AVE split: {len(kept)} train and validation videos; {count_of(n_test, 'test video')} left for "
        "'vidpipe eval'")
    if unsplit:
        say(f"warning: {count_of(len(unsplit), 'annotated video')} {'is' if len(unsplit) == 1 else 'are'} in none of "
            f"the split files beside {source} "
            f"({', '.join(AVE_SPLIT_FILES.values())}) and are left out, e.g. {unsplit[0]}")
    return kept


def split_videos(videos: list[AnnotatedVideo], ann: AnnotationSet, val_fraction: float, seed: int
                 ) -> tuple[list[AnnotatedVideo], list[AnnotatedVideo]]:
    """Train and validation videos: AVE's own split when the annotations have one, else a seeded shuffle."""
    if ann.splits:
        train = [v for v in videos if ann.splits.get(v.uri) == "train"]
        val = [v for v in videos if ann.splits.get(v.uri) == "val"]
        return train, val
    order = sorted(videos, key=lambda v: v.uri)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(order))
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    else:
        n_val = 0
    val = [order[i] for i in sorted(perm[:n_val])]
    train = [order[i] for i in sorted(perm[n_val:])]
    return train, val


def _windows(n: int, head: HeadSpec, shift: int) -> list[tuple[int, int, int, int]]:
    """``(in_lo, in_hi, out_lo, out_hi)`` of a window grid shifted by ``shift`` segments (0: inference's)."""
    W, X = head.window_segments, head.context_segments
    if shift == 0:
        return [(w.in_lo, w.in_hi, w.out_lo, w.out_hi) for w in window_plan(0, n, 0, n, head, video_n_segments=n)]
    starts = [0] + list(range(shift, n, W))
    out = []
    for i, lo in enumerate(starts):
        hi = starts[i + 1] if i + 1 < len(starts) else n
        if hi > lo:
            out.append((max(0, lo - X), min(hi + X, n), lo, hi))
    return out


# ----------------------------------------------------------------------------------------------- model


def fold_normalization(head: FusionHead, norm: _Norm) -> FusionHead:
    """A copy of ``head`` that takes raw features: the standardisation folded into its input layers.

    ``W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)`` for every Linear that reads image or audio
    features; attention's audio query has no bias, so its constant moves into the visual key's bias.
    """
    folded = copy.deepcopy(head).cpu()
    im_m, im_s = torch.from_numpy(norm.image_mean).float(), torch.from_numpy(norm.image_std).float()
    au_m, au_s = torch.from_numpy(norm.audio_mean).float(), torch.from_numpy(norm.audio_std).float()

    def fold(linear: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        w = linear.weight.detach() / std[None, :]
        shift = w @ mean
        linear.weight.data.copy_(w)
        if linear.bias is not None:
            linear.bias.data.sub_(shift)
        return shift

    with torch.no_grad():
        fold(cast(torch.nn.Linear, folded.image_proj[0]), im_m, im_s)
        fold(cast(torch.nn.Linear, folded.audio_proj[0]), au_m, au_s)
        if head.spec.fusion == "attention":
            fold(folded.att_visual, im_m, im_s)
            shift = fold(folded.att_audio, au_m, au_s)
            folded.att_visual.bias.data.sub_(shift)
    return folded


class _Trainer:
    def __init__(self, spec: TrainSpec, head_spec: HeadSpec, norm: _Norm, train: list[_Video], val: list[_Video],
                 class_weight: torch.Tensor | None, device: torch.device, say: Callable[[str], None]) -> None:
        self.spec, self.head_spec, self.norm = spec, head_spec, norm
        self.train_videos, self.val_videos = train, val
        self.device, self.say = device, say
        self.multilabel = head_spec.task == "multilabel"
        self.class_weight = None if class_weight is None else class_weight.to(device)
        self.model = build_head(head_spec).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        self.rng = np.random.default_rng(spec.seed + 1)
        self.zero_image = norm.zero_image().to(device)
        self.zero_audio = norm.zero_audio().to(device)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the segments that have a target (``logits`` ``[B, T, L]``)."""
        if self.multilabel:
            mask = (target >= 0).all(dim=-1)
            if not bool(mask.any()):
                return logits.sum() * 0.0
            return F.binary_cross_entropy_with_logits(logits[mask], target[mask])
        flat_t = target.reshape(-1)
        if not bool((flat_t >= 0).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, weight=self.class_weight,
                               ignore_index=-1)

    def _batch(self, items: list[tuple[_Video, tuple[int, int, int, int]]], *, augment: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        img = torch.stack([v.image[lo:hi] for v, (lo, hi, _, _) in items]).to(self.device)
        aud = torch.stack([v.audio[lo:hi] for v, (lo, hi, _, _) in items]).to(self.device)
        grid = None
        if self.head_spec.fusion == "attention" and items[0][0].grid is not None:
            grid = torch.stack([v.grid[lo:hi] for v, (lo, hi, _, _) in items if v.grid is not None]).to(self.device)
        targets = []
        for v, (lo, hi, olo, ohi) in items:
            t = v.target[lo:hi].clone()
            # only the window's output segments are scored, as at inference; context is input only
            t[: olo - lo] = -1
            t[ohi - lo:] = -1
            targets.append(t)
        target = torch.stack(targets).to(self.device)
        if augment and self.spec.modality_dropout > 0:
            drop = self.rng.random((len(items), 2)) < self.spec.modality_dropout
            drop[:, 1] &= ~drop[:, 0]  # never both
            for i, (d_img, d_aud) in enumerate(drop):
                if d_img:
                    img[i] = self.zero_image
                    if grid is not None:
                        grid[i] = self.zero_image
                if d_aud:
                    aud[i] = self.zero_audio
        return img, aud, grid, target

    def epoch(self) -> float:
        self.model.train()
        W = self.head_spec.window_segments
        by_len: dict[int, list[tuple[_Video, tuple[int, int, int, int]]]] = defaultdict(list)
        for v in self.train_videos:
            shift = int(self.rng.integers(W)) if v.n > W else 0
            for w in _windows(v.n, self.head_spec, shift):
                by_len[w[1] - w[0]].append((v, w))
        batches = []
        for length in sorted(by_len):
            group = by_len[length]
            order = self.rng.permutation(len(group))
            for b in range(0, len(group), self.spec.batch_windows):
                batches.append([group[i] for i in order[b: b + self.spec.batch_windows]])
        total, count = 0.0, 0
        for bi in self.rng.permutation(len(batches)):
            img, aud, grid, target = self._batch(batches[bi], augment=True)
            loss = self._loss(self.model(img, aud, grid), target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            total += float(loss.detach()) * len(batches[bi])
            count += len(batches[bi])
        return total / max(count, 1)

    @torch.no_grad()
    def predict(self, videos: list[_Video]) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """Validation loss and per-video probabilities on inference's own windows."""
        self.model.eval()
        losses, probs_all, targets = [], [], []
        for v in videos:
            probs = np.zeros((v.n, self.head_spec.n_labels), np.float32)
            for lo, hi, olo, ohi in _windows(v.n, self.head_spec, 0):
                img, aud, grid, target = self._batch([(v, (lo, hi, olo, ohi))], augment=False)
                logits = self.model(img, aud, grid)
                losses.append((float(self._loss(logits, target)), int(((target >= 0) if not self.multilabel
                                                                      else (target >= 0).all(-1)).sum())))
                p = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
                probs[olo:ohi] = p[0, olo - lo: ohi - lo].cpu().numpy()
            probs_all.append(probs)
            targets.append(v.target.numpy())
        n = sum(c for _, c in losses)
        loss = sum(value * c for value, c in losses) / n if n else float("nan")
        return loss, probs_all, targets


def tune_thresholds(probs: np.ndarray, truth: np.ndarray) -> tuple[float, ...]:
    """Per-label threshold in 0.05..0.95 that maximises that label's F1 on validation (0.5 without positives;
    where several do, the lowest of them)."""
    keep = (truth >= 0).all(axis=1)
    probs, truth = probs[keep], truth[keep] > 0.5
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    out = []
    for j in range(truth.shape[1]):
        if not truth[:, j].any():
            out.append(0.5)
            continue
        pred = probs[None, :, j] >= grid[:, None]  # (threshold, segment)
        f1 = 2 * (pred & truth[None, :, j]).sum(axis=1) / (pred.sum(axis=1) + truth[:, j].sum())
        # Of tied thresholds (separable validation ties over a range), the lowest: tried against the middle of
        # the range on a helper's multilabel set, whose held-out clips scored true 'Tone' segments at 0.20-0.28
        # under bf16 encoders, the middle (0.5) found 12 of 25 (exact-match 0.729) and the lowest (0.05) all 25
        # with 10 false (0.792); with fp32 encoders both are exact (see the README's limits)
        out.append(float(grid[int(np.argmax(f1 >= f1.max() - 1e-12))]))
    return tuple(out)


def _metrics(probs: list[np.ndarray], targets: list[np.ndarray], labels: list[str], task: str,
             thresholds: tuple[float, ...] | None = None) -> Metrics:
    p, t = np.concatenate(probs), np.concatenate(targets)
    if task == "multilabel":
        th = np.asarray(thresholds or (0.5,) * len(labels), np.float32)
        return multilabel_metrics(t, (p >= th[None, :]).astype(np.float32), labels)
    return multiclass_metrics(t, p.argmax(axis=1), labels)


# ------------------------------------------------------------------------------------------------- main


def _check_out(out: Path) -> None:
    """Refuse, before any work, an --out that saving the bundle would fail on or lose files in."""
    check_writable_dir(out, "--out")
    if out.is_dir():
        others = [p.name for p in out.iterdir() if p.name not in (*_KEPT, "bundle.json", "weights.safetensors")]
        if others and not (out / "bundle.json").is_file():
            raise ConfigError(f"--out {out}: the directory holds other files ({', '.join(sorted(others)[:5])}); "
                              "use a new directory or an earlier bundle directory")
        if others:  # saving replaces the directory, keeping only the bundle's own README.md and work/
            raise ConfigError(f"--out {out}: the bundle directory also holds {', '.join(sorted(others)[:5])}, which "
                              f"retraining would delete (it keeps only {' and '.join(_KEPT)}); move "
                              f"{'it' if len(others) == 1 else 'them'} out, or use a new directory")


def _check_cache_outside_bundle(cache: Path, out: Path) -> None:
    """Refuse a feature cache that saving the bundle would delete: --out itself or a folder in it other than its
    work/ (``--cache X --out X`` lost every feature it had extracted, without a word)."""
    cache, out = cache.resolve(), out.resolve()
    work = out / WORK_DIR
    if (cache == out or out in cache.parents) and not (cache == work or work in cache.parents):
        raise ConfigError(f"--cache {cache}: {'is' if cache == out else 'lies in'} the bundle directory --out {out}, "
                          f"which saving the bundle replaces (keeping only {' and '.join(_KEPT)}); leave --cache out "
                          f"to cache in {work / 'features'}, or give a folder outside --out")


def train(spec: TrainSpec, *, say: Callable[[str], None] = print) -> TrainResult:
    """Train a head per ``spec`` and save the bundle to ``spec.out``."""
    started = time.monotonic()
    out = Path(spec.out).expanduser()
    _check_out(out)
    sampling, image = spec.sampling(), spec.image_spec()
    try:  # built here to check it (a mel range above the audio's Nyquist frequency), before any work
        audio = spec.audio_spec()
        audio_dim = build_audio_encoder(audio, sample_rate_hz=sampling.audio_rate_hz).dim
    except ConfigError as exc:
        raise ConfigError(f"--audio-fmax {spec.audio_f_max_hz:g}: {exc}") from None
    try:  # the workers read the weights on this machine: a missing file is known now
        weights_file = resolve_image_weights(image)
    except ConfigError as exc:
        if spec.address is None or not isinstance(exc, WeightsNotFoundError):
            raise ConfigError(f"--image-weights {spec.image_weights}: {exc}") from None
        weights_file = None  # on a cluster the workers may hold it: its content is not recorded then
    if weights_file is not None:  # the bundle names the file: record what it holds (model_id, feature cache key)
        image = dataclasses.replace(image, weights_sha256=file_sha256(weights_file))
        if image.weights.startswith("file:"):  # as an absolute path: the bundle is used from other folders
            image = dataclasses.replace(image, weights=f"file:{weights_file.resolve()}")
    ann = read_annotations(spec.annotations, spec.videos, task=spec.task, unlabeled=spec.unlabeled)
    labels = ann.labels
    if len(labels) < 2:
        raise ConfigError(f"annotations {spec.annotations}: need at least 2 labels to train, found {labels}")
    # ``background`` added by read_annotations for the segments no annotation covers, not named by the file
    implicit_bg = spec.unlabeled == "background" and BACKGROUND in labels and not any(
        a.label == BACKGROUND for v in ann.videos for a in v.annotations)
    named = [name for name in labels if not (implicit_bg and name == BACKGROUND)]
    if spec.fusion == "attention" and not spec.image_grid:
        say("warning: --fusion attention without --image-grid attends over one region, the pooled image (no spatial "
            "attention); pass --image-grid G (G x G regions of the image encoder's feature map, e.g. 3)")
    say(f"vidpipe train: {count_of(len(ann.videos), 'annotated video')}, {count_of(len(named), 'label')} "
        f"({label_list(named)})"
        + (f" and {BACKGROUND!r} for the segments no annotation covers"
           + (" (if there are any)" if spec.task == "multilabel" else "") if implicit_bg else "")
        + f", task {spec.task}")

    alike: dict[str, list[str]] = defaultdict(list)
    for name in labels:  # the implicit background too: 'Background' in a file is another label
        alike[" ".join(unicodedata.normalize("NFKC", name).casefold().split())].append(name)
    for names in alike.values():
        if len(names) > 1:  # 'Red Tone' and 'red tone' are two labels: a typo, most often
            say(f"warning: labels {', '.join(map(repr, names))} differ only in case or spacing and are trained as "
                "different labels; write them alike in the annotations if they mean the same")
    fspec = FeatureSpec(sampling=sampling, image=image, audio=audio, audio_weights=None)
    cache_root = Path(spec.cache).expanduser() if spec.cache else out / WORK_DIR / "features"
    if spec.cache:
        check_writable_dir(spec.cache, "--cache")
        _check_cache_outside_bundle(cache_root, out)
    videos = _videos_to_train_on(ann, spec.annotations, say)
    fres = extract_features([(v.uri, v.video_id) for v in videos], fspec, cache_root, address=spec.address,
                            device=spec.device, say=say)
    if fres.failures:
        say(f"warning: {count_of(len(fres.failures), 'annotated video')} could not be decoded and "
            f"{'is' if len(fres.failures) == 1 else 'are'} left out")
    usable = [v for v in videos if v.uri in fres.features]
    warn_spans_past_the_end(spec.annotations, usable, fres.features, say)
    train_v, val_v = split_videos(usable, ann, spec.val_fraction, spec.seed)
    if not train_v:
        raise ConfigError("no training videos left (all failed to decode, or the split left none)")

    def targets_of(v: AnnotatedVideo, names: list[str]) -> np.ndarray:
        f = fres.features[v.uri]
        return segment_targets(v, f.start_s, f.end_s, names, task=spec.task, unlabeled=spec.unlabeled)

    train_t = [targets_of(v, labels) for v in train_v]
    val_t = [targets_of(v, labels) for v in val_v]
    if implicit_bg and spec.task == "multilabel" and \
            _label_counts(train_t + val_t, len(labels))[labels.index(BACKGROUND)] == 0:
        # Every segment has a label, so background would be an output no segment ever has.  A multilabel head
        # says "nothing here" with no label active, so it needs none (eval scores such segments that way).
        labels = [name for name in labels if name != BACKGROUND]
        say(f"every segment of the annotated videos is annotated: no {BACKGROUND!r} label; labels "
            f"{label_list(labels)}")
        if len(labels) < 2:
            raise ConfigError(f"annotations {spec.annotations}: need at least 2 labels to train, found {labels} "
                              f"(every segment is annotated, so there is no {BACKGROUND!r} either)")
        train_t = [targets_of(v, labels) for v in train_v]
        val_t = [targets_of(v, labels) for v in val_v]

    bf16_spec = dataclasses.replace(fspec, precision="bf16")

    # videos that failed only in the bf16 pass: trained on, left out of the floor and the check; train exits 3
    failed_again: set[str] = set()
    bf16_done: dict[str, VideoFeatures] = {}  # the floor's, which the check reuses

    def bf16_features(videos: list[AnnotatedVideo]) -> dict[str, VideoFeatures]:
        todo = [v for v in videos if v.uri not in bf16_done and v.uri not in failed_again]
        if todo:
            found = extract_features([(v.uri, v.video_id) for v in todo], bf16_spec, cache_root,
                                     address=spec.address, device=spec.device, say=say)
            bf16_done.update(found.features)
            failed_again.update(f.uri for f in found.failures)
            if found.failures:
                say(f"warning: {len(found.failures)} of {len(todo)} videos failed in the bf16 pass (their float32 "
                    "features are trained on; the bf16 floor and check leave them out)")
        return {v.uri: bf16_done[v.uri] for v in videos if v.uri in bf16_done}

    train_feats = [fres.features[v.uri] for v in train_v]
    # bf16 is emulated where the encoders run on a CPU without native bf16 (auto would pick fp32 there): about
    # 11x float32's cost (efficientnet_lite0, 289 ms/image against 26 with oneDNN held to AVX2 on this VM)
    emulated = runs_here(spec.address) and encoder_precision("auto", spec.device, here=True) == "fp32"

    # the segments training and validation score: with --unlabeled ignore, not the ones no annotation covers
    n_train_seg, n_val_seg = (sum(_scored(torch.from_numpy(t)) for t in targets) for targets in (train_t, val_t))

    def bf16_share(videos: list[AnnotatedVideo], kind: str, use: str) -> list[AnnotatedVideo]:
        if not emulated or len(videos) <= EMULATED_BF16_VIDEOS:
            return videos
        if (kind, use) not in said and (kind, "floor and check") not in said:
            said.add((kind, use))
            say(f"bf16 is emulated here (the encoders run on a CPU without native bf16, ~11x slower than float32): "
                f"bf16's {use} use{'' if ' and ' in use else 's'} {EMULATED_BF16_VIDEOS} of the {len(videos)} "
                f"{kind} videos")
        # those with segments to score first (--unlabeled ignore can leave a video none): the check scores them
        return sorted(videos, key=lambda v: not _scored(torch.from_numpy(targets_of(v, labels))))[
            :EMULATED_BF16_VIDEOS]

    said: set[tuple[str, str]] = set()
    # the held-out videos when there are some (the same the check labels, unless none has a segment to score)
    kind = "validation" if val_v else "training"
    sample = bf16_share(val_v or train_v, kind, "floor and check" if val_v and n_val_seg else "floor")
    noise = bf16_noise([fres.features[v.uri] for v in sample], bf16_features(sample))
    if noise is None:
        say(f"warning: none of the {len(sample)} videos decoded again alike for bf16 encoders; standardising "
            "without bf16's rounding floor")
    norm = _Norm.fit(train_feats, noise)
    if any(norm.floored):
        say(f"standardising: {norm.floored[0]} of {len(norm.image_std)} image and {norm.floored[1]} of "
            f"{len(norm.audio_std)} audio features vary less in training than {NOISE_FLOOR:g}x the rounding bf16 "
            "encoders add to them; each is scaled by that instead of its std")
    train_data = [norm.apply(fres.features[v.uri], t) for v, t in zip(train_v, train_t, strict=True)]
    val_data = [norm.apply(fres.features[v.uri], t) for v, t in zip(val_v, val_t, strict=True)]

    class_weight = None
    n_per = _label_counts(train_t, len(labels))
    counts = {name: int(c) for name, c in zip(labels, n_per, strict=True)}
    if spec.task == "multiclass":
        # sqrt-inverse frequency: rare labels count more without letting one rare clip dominate.  A label
        # without training segments weighs like one with a single segment, not 0: training never sees it,
        # but the validation loss (a weighted mean) must count its segments, or a validation split holding
        # only such labels divides 0 by 0.  Labels with training segments keep the same weights as before.
        w = np.sqrt(max(n_per.sum(), 1.0) / (len(labels) * np.maximum(n_per, 1)))
        class_weight = torch.tensor(w, dtype=torch.float32)
    missing = [name for name, c in counts.items() if c == 0 and not (implicit_bg and name == BACKGROUND)]
    if missing:
        # spans shorter than half a segment label none (a segment takes a label covering at least half of it)
        short = sorted(a.line for v in train_v for a in v.annotations
                       if a.label in missing and a.end_s - a.start_s < spec.segment_seconds / 2)
        why = (f" (their spans on lines {', '.join(map(str, short[:8]))}{' …' if len(short) > 8 else ''} are shorter "
               f"than half a segment, {spec.segment_seconds / 2:g} s: a segment takes a label that covers at least "
               "half of it)" if short else "")
        say(f"warning: no training segment has the labels {missing}; the model cannot learn them{why}")
    if implicit_bg and counts.get(BACKGROUND) == 0:
        say(f"warning: the label {BACKGROUND!r} (for segments no annotation covers) has 0 training segments: every "
            f"segment of the training videos is annotated, so the model cannot learn it; pass --unlabeled ignore "
            f"to train without it")

    head_spec = HeadSpec(fusion=spec.fusion, image_dim=IMAGE_ENCODER_DIMS[image.name], audio_dim=audio_dim,
                         n_labels=len(labels), proj_dim=spec.proj_dim, lstm_hidden=spec.lstm_hidden,
                         window_segments=spec.window_segments, context_segments=spec.context_segments,
                         dropout=spec.dropout, seed=spec.seed, task=spec.task)
    device = pick_device(spec.device)
    left_out = {"train": sum(d.n for d in train_data) - n_train_seg, "val": sum(d.n for d in val_data) - n_val_seg}
    train_text, val_text = _segments_text(n_train_seg, left_out["train"]), _segments_text(n_val_seg, left_out["val"])
    if not n_train_seg:
        raise ConfigError(f"annotations {spec.annotations}: no segment of the {len(train_data)} training videos has a "
                          "label to learn (--unlabeled ignore leaves out the segments no annotation covers); check "
                          "the times (seconds) and the video paths")
    held_out = len(val_data)  # videos kept out of training, whether or not they have a segment to score
    if val_data and not n_val_seg:  # early stopping on nothing would keep epoch 1
        say(f"warning: the {count_of(len(val_data), 'validation video')} {'has' if len(val_data) == 1 else 'have'} "
            f"no segment with a label ({val_text}); early "
            "stopping watches the training set instead")
        val_data = []
    n_train, n_val = len(train_data), len(val_data)
    say(f"training on {device.type}: {n_train} train video{'s' * (n_train != 1)} ({train_text}), {n_val} validation "
        f"video{'s' * (n_val != 1)} ({val_text if val_data else 'none'}); fusion {spec.fusion}, up to {spec.epochs} "
        "epochs")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        trainer = _Trainer(spec, head_spec, norm, train_data, val_data, class_weight, device, say)
        monitor = val_data or train_data
        best: tuple[float, float] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch, stale = 0, 0
        history: list[dict[str, float | None]] = []
        # without a validation set, early stopping watches the training set: its figures are recorded as
        # train_*, and the val_* ones are null (they used to carry the training set's figures)
        for epoch in range(1, spec.epochs + 1):
            t0 = time.monotonic()
            train_loss = trainer.epoch()
            if not math.isfinite(train_loss):
                raise ConfigError(f"training diverged in epoch {epoch} (training loss {train_loss}): no bundle is "
                                  f"written; train again with a smaller --lr (it was {spec.lr:g}; the default is 2e-3)")
            val_loss, probs, targets = trainer.predict(monitor)
            thresholds = tune_thresholds(np.concatenate(probs), np.concatenate(targets)) \
                if spec.task == "multilabel" else None
            m = _metrics(probs, targets, labels, spec.task, thresholds)
            if val_data:
                history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                "val_accuracy": m.accuracy, "val_macro_f1": m.macro_f1})
            else:
                history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": None, "val_accuracy": None,
                                "val_macro_f1": None, "train_eval_loss": val_loss, "train_accuracy": m.accuracy,
                                "train_macro_f1": m.macro_f1})
            improved = best is None or (m.macro_f1, -val_loss) > best
            say(f"epoch {epoch:3d}/{spec.epochs}: train loss {train_loss:.4f}  "
                f"{'val' if val_data else 'train(no val)'} loss {val_loss:.4f}  acc {m.accuracy:.3f}  "
                f"macro-F1 {m.macro_f1:.3f}  ({time.monotonic() - t0:.1f} s){'  *' if improved else ''}")
            if improved:
                best, best_epoch, stale = (m.macro_f1, -val_loss), epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            else:
                stale += 1
                if stale >= spec.patience:
                    watched = "validation" if val_data else "training-set"
                    say(f"early stop: no better {watched} macro-F1 / loss for {spec.patience} epochs")
                    break
        if best_state is None:
            raise RuntimeError("training produced no model")
        trainer.model.load_state_dict(best_state)
        val_loss, probs, targets = trainer.predict(monitor)
        thresholds = tune_thresholds(np.concatenate(probs), np.concatenate(targets)) \
            if spec.task == "multilabel" else None
        val_metrics = _metrics(probs, targets, labels, spec.task, thresholds) if val_data else None

    if thresholds is not None:
        head_spec = HeadSpec(**{**head_spec.to_dict(), "thresholds": thresholds})
    folded = fold_normalization(trainer.model, norm)
    tensors = {f"head.{k}": v.detach().cpu().clone() for k, v in folded.state_dict().items()}
    seconds = time.monotonic() - started
    meta: dict[str, Any] = {
        "source": "vidpipe train",
        "annotations": os.path.abspath(spec.annotations),
        "task": spec.task,
        "unlabeled": spec.unlabeled,
        "seed": spec.seed,
        "feature_key": fspec.key,
        "train_videos": len(train_data),
        "train_segments": n_train_seg,
        "val_videos": held_out,
        "val_segments": n_val_seg,
        "early_stopping_on": "validation" if val_data else "training",
        "unlabeled_segments_left_out": left_out,
        # the annotated videos that could not be decoded and were left out (the first 1,000: kind and message)
        "videos_failed": len(fres.failures),
        "failed_videos": [{"uri": f.uri, "error_kind": f.error_kind, "message": f.message}
                          for f in fres.failures[:1000]],
        "label_counts_train": counts,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "history": [{k: _json_number(v) for k, v in h.items()} for h in history],
        "hyperparameters": {k: getattr(spec, k) for k in ("epochs", "val_fraction", "patience", "lr", "weight_decay",
                                                          "batch_windows", "modality_dropout", "proj_dim",
                                                          "lstm_hidden", "dropout")},
        **spec.extra_meta,
    }
    meta["val_accuracy"] = round(val_metrics.accuracy, 4) if val_metrics is not None else None
    meta["val_macro_f1"] = round(val_metrics.macro_f1, 4) if val_metrics is not None else None
    meta["val_loss"] = _json_number(val_loss) if val_metrics is not None else None
    bundle = ModelBundle(sampling=sampling, image=image, audio=audio, head=head_spec, labels=labels, trained=True,
                         tensors=tensors, meta=meta)
    checked, on = (val_v, "validation") if val_data else (train_v, "training")
    checked = bf16_share(checked, on, "check")
    meta["bf16_check"] = bf16_check(bundle, [(v, fres.features[v.uri], targets_of(v, labels)) for v in checked],
                                    bf16_features(checked), on=on, say=say)
    meta["bf16_check"]["stds_floored"] = None if noise is None else {"image": norm.floored[0], "audio": norm.floored[1]}
    seconds = time.monotonic() - started  # the check included
    meta["train_seconds"] = round(seconds, 1)
    path: Path | None = None
    try:
        with stopping.deferred("the save of the bundle"):  # a stop amid the swap of directories would leave the old bundle aside
            path = bundle.save(out, overwrite=True, keep=_KEPT)
    except KeyboardInterrupt as exc:
        if path is None:  # before the block took it: nothing saved
            raise
        # raised where the block ended: the bundle is saved, nothing is left to stop
        say(f"vidpipe: a stop ({exc}) came during the save of the bundle, which was finished first")
    say(f"saved model {bundle.model_id} to {path} (best epoch {best_epoch}"
        + (f", validation accuracy {val_metrics.accuracy:.3f}, macro-F1 {val_metrics.macro_f1:.3f}" if val_metrics else "")
        + f"; {seconds:.0f} s)")
    return TrainResult(bundle=bundle, path=path, val_metrics=val_metrics, history=history,
                       feature_cache_hits=fres.cache_hits, seconds=seconds, n_failed=len(fres.failures) + len(failed_again))


# Training standardises no feature by a std below this many times the RMS difference bf16 encoders make to
# it (measured on the held-out videos): where features hardly vary (solid colours), bf16's rounding moved
# them by up to ~1,000 stds, and a head trained on float32 features mislabelled them (see the README)
NOISE_FLOOR = 3.0
# where bf16 is emulated, the floor and the check use at most this many held-out videos
EMULATED_BF16_VIDEOS = 8


def bf16_noise(fp32: list[VideoFeatures], bf16: dict[str, VideoFeatures]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-feature RMS of (bf16 - float32) encoder features over the videos both have, as (image, audio), or None
    when none has both alike.  With an image grid (``--image-grid``: its regions are standardised like the pooled
    image features) the image figure is the larger of the pooled features' and the regions'."""
    pairs = [(f, bf16[f.uri]) for f in fp32 if f.uri in bf16 and bf16[f.uri].n_segments == f.n_segments]
    if not pairs:
        return None

    def rms(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
        d = np.concatenate(b).astype(np.float64) - np.concatenate(a).astype(np.float64)
        return np.sqrt((d ** 2).reshape(-1, d.shape[-1]).mean(axis=0))

    image = rms([f.image for f, _ in pairs], [g.image for _, g in pairs])
    grids = [(f.grid, g.grid) for f, g in pairs if f.grid is not None and g.grid is not None
             and f.grid.shape == g.grid.shape]
    if grids:
        image = np.maximum(image, rms([a for a, _ in grids], [b for _, b in grids]))
    return image, rms([f.audio for f, _ in pairs], [g.audio for _, g in pairs])


# bf16 encoders may lower a trained head's validation accuracy and macro-F1 by this much before
# ``--precision auto`` runs the bundle's encoders in float32 instead
BF16_TOLERANCE = 0.005


def bf16_check(bundle: ModelBundle, videos: list[tuple[AnnotatedVideo, VideoFeatures, np.ndarray]],
               found: dict[str, VideoFeatures], *, on: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Label ``videos`` with the trained ``bundle`` from bf16 encoder features as well as from the float32 ones it
    was trained on, as ``vidpipe run`` would, and say whether ``--precision auto`` may use bf16 for it.

    bf16 encoders (what ``auto`` uses on GPUs and on CPUs with native bf16) round every layer; a head trained on
    float32 features that hardly vary (solid colours, a constant background) can be far off under them.  Where the
    bf16 labels score lower than the float32 ones (``BF16_TOLERANCE``), the result says ``auto_precision`` "fp32"
    and the bundle records it (``ModelBundle.fp32_reason``).  ``videos``: (video, float32 features, targets);
    ``found``: their bf16 features by uri.
    """
    runner = HeadRunner(bundle.head, bundle.head_state(), device="cpu", precision="fp32")
    truths, fp32_pred, bf16_pred = [], [], []
    for video, feats, target in videos:
        other = found.get(video.uri)
        if other is None or other.n_segments != feats.n_segments:  # not decoded again alike: nothing to compare
            continue
        truths.append(target)
        fp32_pred.append(decide(predict_video(runner, feats), bundle))
        bf16_pred.append(decide(predict_video(runner, other), bundle))
    result: dict[str, Any] = {"on": on, "videos": len(truths), "auto_precision": "bf16"}
    labels = list(bundle.labels)
    score = multilabel_metrics if bundle.head.task == "multilabel" else multiclass_metrics
    m32 = m16 = None
    if truths:
        truth, p32, p16 = (np.concatenate(parts) for parts in (truths, fp32_pred, bf16_pred))
        m32, m16 = score(truth, p32, labels), score(truth, p16, labels)
    if m32 is None or m16 is None or not m32.n_segments:  # n_segments: those with a label to score
        say("bf16 check: no segment with a label could be labelled from bf16 encoder features; --precision auto may "
            "use bf16 for this model unchecked")
        return result
    alike = (p32 == p16) if p32.ndim == 1 else (p32 == p16).all(axis=1)
    lower = m16.accuracy < m32.accuracy - BF16_TOLERANCE or m16.macro_f1 < m32.macro_f1 - BF16_TOLERANCE
    result.update({"segments": int(alike.size), "segments_alike": int(alike.sum()),
                   "fp32": {"accuracy": round(m32.accuracy, 4), "macro_f1": round(m32.macro_f1, 4)},
                   "bf16": {"accuracy": round(m16.accuracy, 4), "macro_f1": round(m16.macro_f1, 4)},
                   "auto_precision": "fp32" if lower else "bf16"})
    accuracy = "exact-match accuracy" if bundle.head.task == "multilabel" else "accuracy"
    scored = "" if m32.n_segments == alike.size else f"over the {m32.n_segments} scored: "
    said = (f"bf16 check on the {len(truths)} {on} video{'s' if len(truths) != 1 else ''}: bf16 encoders label "
            f"{int(alike.sum())} of {alike.size} segments as float32 ones do ({scored}{accuracy} {m32.accuracy:.3f} "
            f"-> {m16.accuracy:.3f}, macro-F1 {m32.macro_f1:.3f} -> {m16.macro_f1:.3f})")
    if lower:
        say(f"warning: {said}: lower, so the bundle records that --precision auto runs its encoders in fp32 "
            "(slower on CPUs with native bf16; --precision bf16 overrides)")
    else:
        say(f"{said}: --precision auto may use bf16 for this model")
    return result


def _scored(target: torch.Tensor) -> int:
    """How many segments of a target (multiclass ``[n]``, multilabel ``[n, L]``) have one (-1: none)."""
    has = target >= 0
    return int((has.all(dim=-1) if target.dim() == 2 else has).sum())


def _label_counts(targets: list[np.ndarray], n_labels: int) -> np.ndarray:
    """How many scored segments of these targets (multiclass ``[n]``, multilabel ``[n, L]`` of 0/1; -1: not
    scored) have each label, as float64 ``[n_labels]``."""
    t = np.concatenate(targets)
    if t.ndim == 1:
        return np.bincount(t[t >= 0], minlength=n_labels).astype(np.float64)
    return (t[(t >= 0).all(axis=1)] > 0.5).sum(axis=0).astype(np.float64)


def _segments_text(scored: int, left_out: int) -> str:
    return f"{scored} segments" + (f", {left_out} unlabelled left out" if left_out else "")


def _json_number(value: float | None) -> float | None:
    """A metric for the bundle's JSON meta: rounded, or None where it does not exist (NaN, e.g. no scored segment)."""
    if isinstance(value, float):
        return round(value, 5) if math.isfinite(value) else None
    return value


def features_for(bundle: ModelBundle) -> FeatureSpec:
    """The feature key of a bundle's encoders (what ``vidpipe eval`` reads from the cache)."""
    state = bundle.audio_state()
    return FeatureSpec(sampling=bundle.sampling, image=bundle.image, audio=bundle.audio,
                       audio_weights=tensors_digest(state))
