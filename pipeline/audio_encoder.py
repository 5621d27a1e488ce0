"""Audio encoders: each segment's 16 kHz mono samples -> one fixed-size vector.

Two kinds (``AudioEncoderSpec.kind``):

* ``"cnn"`` — :class:`AudioEncoder`: log-mel spectrogram (torchaudio, computed on the encoder's device)
  fed to :class:`AudioCNN`, a PANNs-style CNN (Kong et al. 2020, Cnn10-like).  Its weights come from the
  model bundle; without them it is a seeded random init.
* ``"classic"`` — :class:`ClassicAudioEncoder`: CPU-cheap MFCC / chroma / spectral statistics
  (librosa's definitions, computed per segment in numpy by :mod:`pipeline.classic_audio`), no torch
  model (see :data:`CLASSIC_FEATURE_NAMES` for the layout of its :data:`CLASSIC_AUDIO_DIM` = 74 values).

The log-mel is ``log(mel_power + 1e-6)`` (natural log of the HTK-scale mel power spectrogram, no
normalisation), so a silent segment is ``log(1e-6) ~ -13.8`` everywhere, finite.  Training code
computes the same input with :func:`build_mel_spectrogram` + :func:`log_mel`.

``valid_samples`` (real, not padding, samples per segment): the CNN pools over time only across the mel
frames whose centre lies in the valid part; the classic features use the same frames.  A segment with
``valid_samples == 0`` (no audio track: all zeros) uses all its frames, so it gets the embedding of silence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import classic_audio
from pipeline.errors import ConfigError
from pipeline.media import AUDIO_RATE_HZ
from pipeline.precision import Precision, check_precision, uses_bf16
from pipeline.specs import AudioEncoderSpec

LOG_MEL_EPS = 1e-6
AUDIO_CNN_CHANNELS: tuple[int, ...] = (64, 128, 256, 512)


# --------------------------------------------------------------------------------------------------- mel


def mel_window_samples(spec: AudioEncoderSpec, sample_rate_hz: int) -> tuple[int, int]:
    """``(win_length, hop_length)`` in samples for ``spec.win_ms``/``spec.hop_ms``; n_fft = win_length."""
    win = int(round(spec.win_ms * sample_rate_hz / 1000.0))
    hop = int(round(spec.hop_ms * sample_rate_hz / 1000.0))
    if win < 2 or hop < 1:
        raise ConfigError(
            f"audio window {spec.win_ms} ms / hop {spec.hop_ms} ms is too short at {sample_rate_hz} Hz "
            f"({win} / {hop} samples)"
        )
    if spec.f_max_hz > sample_rate_hz / 2:
        raise ConfigError(
            f"audio f_max_hz={spec.f_max_hz} is above the Nyquist frequency {sample_rate_hz / 2} Hz of "
            f"sample_rate_hz={sample_rate_hz}; lower f_max_hz"
        )
    return win, hop


def mel_frames(spec: AudioEncoderSpec, n_samples: int, sample_rate_hz: int = AUDIO_RATE_HZ) -> int:
    """Number of (centred) mel frames for ``n_samples`` samples: ``1 + n_samples // hop``."""
    _, hop = mel_window_samples(spec, sample_rate_hz)
    return 1 + n_samples // hop


def build_mel_spectrogram(spec: AudioEncoderSpec, sample_rate_hz: int = AUDIO_RATE_HZ) -> nn.Module:
    """The torchaudio MelSpectrogram (power, HTK mel scale, centred, zero-padded) that both kinds agree on."""
    import torchaudio

    win, hop = mel_window_samples(spec, sample_rate_hz)
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate_hz,
        n_fft=win,
        win_length=win,
        hop_length=hop,
        f_min=spec.f_min_hz,
        f_max=spec.f_max_hz,
        n_mels=spec.n_mels,
        power=2.0,
        center=True,
        # Segments are zero-padded already; "constant" also works for segments shorter than n_fft / 2.
        pad_mode="constant",
        norm=None,
        mel_scale="htk",
    )


def log_mel(audio: torch.Tensor, mel: nn.Module) -> torch.Tensor:
    """``log(mel(audio) + 1e-6)`` in float32: audio ``[B, L]`` -> log-mel ``[B, 1, T, n_mels]``."""
    with torch.autocast(device_type=audio.device.type, enabled=False):
        power = mel(audio.float())  # [B, n_mels, T]
        return torch.log(power + LOG_MEL_EPS).transpose(1, 2).unsqueeze(1)


def valid_mel_frames(valid_samples: np.ndarray | None, n: int, n_frames: int, hop: int) -> np.ndarray:
    """Per segment, how many leading mel frames have their centre in the valid samples (0 valid -> all)."""
    if valid_samples is None:
        return np.full(n, n_frames, dtype=np.int64)
    valid = np.asarray(valid_samples, dtype=np.int64).reshape(-1)
    if len(valid) != n:
        raise ValueError(f"valid_samples has {len(valid)} entries, expected {n} (one per segment)")
    frames = (np.clip(valid, 0, None) + hop - 1) // hop  # frame t is centred at sample t * hop
    frames = np.where(valid <= 0, n_frames, frames)
    return np.clip(frames, 1, n_frames)


# --------------------------------------------------------------------------------------------------- CNN


class _ConvBlock(nn.Module):
    """(conv3x3 - BN - ReLU) x 2, then 2x2 average pooling (PANNs' ConvBlock)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        # Pool an axis only while it has >= 2 steps, so short segments and few mel bins still work.
        kernel = (2 if x.shape[2] >= 2 else 1, 2 if x.shape[3] >= 2 else 1)
        return F.avg_pool2d(x, kernel_size=kernel)


def _contiguous_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    # The encoder runs the CNN channels_last; safetensors refuses such strided tensors, so saved copies are packed.
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            if not value.is_contiguous():
                state_dict[key] = value.contiguous()


class AudioCNN(nn.Module):
    """PANNs-style CNN: log-mel ``[B, 1, T, n_mels]`` -> embedding ``[B, embed_dim]``.

    BatchNorm over mel bins -> 4 conv blocks (channels 64, 128, 256, 512; each halves time and frequency)
    -> mean over frequency -> max + mean over (valid) time -> Linear + ReLU.
    """

    def __init__(
        self, n_mels: int = 64, embed_dim: int = 512, channels: Sequence[int] = AUDIO_CNN_CHANNELS
    ) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.embed_dim = embed_dim
        self.channels = tuple(channels)
        self.bn0 = nn.BatchNorm2d(n_mels)
        blocks = []
        in_ch = 1
        for out_ch in self.channels:
            blocks.append(_ConvBlock(in_ch, out_ch))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(in_ch, embed_dim)
        self.reset_parameters()
        self.register_state_dict_post_hook(_contiguous_state_dict)

    def reset_parameters(self) -> None:
        """PANNs' init: Xavier-uniform conv/linear weights, zero biases, identity BatchNorm."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def forward(self, x: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
        x: log-mel ``[B, 1, T, n_mels]``.
        valid_frames: int ``[B]``, leading time frames to pool over (None: all).
        """
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[3] != self.n_mels:
            raise ValueError(f"AudioCNN expects log-mel [B, 1, T, {self.n_mels}], got {tuple(x.shape)}")
        # BatchNorm per mel bin: move mel bins onto the channel axis and back.
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        valid = valid_frames
        for block in self.blocks:
            t_in = x.shape[2]
            x = block(x)
            if valid is not None and x.shape[2] != t_in:
                valid = torch.clamp((valid + 1) // 2, min=1, max=x.shape[2])
        x = x.mean(dim=3)  # [B, C, T']
        t = torch.arange(x.shape[2], device=x.device)
        if valid is None:
            valid = torch.full((x.shape[0],), x.shape[2], device=x.device, dtype=torch.long)
        # One code path with and without a mask, so a segment's embedding does not depend on its batch-mates.
        mask = (t[None, :] < valid.to(x.device)[:, None]).unsqueeze(1)  # [B, 1, T']
        count = mask.sum(dim=2).clamp(min=1).to(x.dtype)
        mean = (x * mask).sum(dim=2) / count
        peak = x.masked_fill(~mask, float("-inf")).amax(dim=2)
        pooled = peak + mean
        return F.relu(self.fc(pooled))


def audio_cnn_channels(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The conv widths an AudioCNN state dict was saved with (AUDIO_CNN_CHANNELS when it does not say)."""
    channels: list[int] = []
    while (w := state_dict.get(f"blocks.{len(channels)}.conv1.weight")) is not None and w.ndim == 4:
        channels.append(int(w.shape[0]))
    return tuple(channels) or AUDIO_CNN_CHANNELS


def _audio_batches(audio: np.ndarray, batch_size: int) -> Any:
    for start in range(0, len(audio), batch_size):
        yield start, audio[start : start + batch_size]


def _check_audio(audio: np.ndarray) -> np.ndarray:
    if audio.ndim != 2:
        raise ValueError(f"audio must be float32 [N, L], got {audio.dtype} {audio.shape}")
    return np.ascontiguousarray(audio, dtype=np.float32)


class AudioEncoder:
    """Log-mel + :class:`AudioCNN` (the ``"cnn"`` kind); cheap to construct and pickle, model built in setup()."""

    def __init__(
        self,
        spec: AudioEncoderSpec,
        *,
        sample_rate_hz: int = AUDIO_RATE_HZ,
        device: str = "cpu",
        batch_size: int = 256,
        threads: int | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        precision: Precision = "auto",
    ) -> None:
        check_precision(precision)
        self.precision: Precision = precision
        if spec.kind != "cnn":
            raise ConfigError(
                f"AudioEncoder is the 'cnn' kind, got spec.kind={spec.kind!r}; use build_audio_encoder"
            )
        if batch_size < 1:
            raise ConfigError(f"audio encoder batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ConfigError(f"audio encoder threads must be >= 1, got {threads}")
        mel_window_samples(spec, sample_rate_hz)  # bad mel settings fail here, on the driver
        self.spec = spec
        self.sample_rate_hz = sample_rate_hz
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._state_dict = dict(state_dict) if state_dict is not None else None
        self._model: AudioCNN | None = None
        self._mel: nn.Module | None = None
        self._torch_device: torch.device | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        state["_mel"] = None
        state["_torch_device"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"AudioEncoder(spec={self.spec!r}, sample_rate_hz={self.sample_rate_hz}, device={self.device!r}, "
            f"batch_size={self.batch_size}, weights={'state_dict' if self._state_dict else 'seeded'}, "
            f"ready={self._model is not None})"
        )

    @property
    def dim(self) -> int:
        return self.spec.embed_dim

    @property
    def hop_samples(self) -> int:
        return mel_window_samples(self.spec, self.sample_rate_hz)[1]

    @property
    def module(self) -> AudioCNN:
        """The AudioCNN (built on first use); its ``state_dict()`` is what bundles store."""
        return self._ready()[0]

    @property
    def mel(self) -> nn.Module:
        """The MelSpectrogram on the encoder's device (built on first use); pair with :func:`log_mel`."""
        return self._ready()[1]

    def setup(self) -> None:
        """Build the MelSpectrogram and the CNN on the device; load the state dict (strict) or seed-init."""
        if self._model is not None:
            return
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        device = torch.device(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            model = AudioCNN(
                n_mels=self.spec.n_mels,
                embed_dim=self.spec.embed_dim,
                channels=audio_cnn_channels(self._state_dict) if self._state_dict else AUDIO_CNN_CHANNELS,
            )
        if self._state_dict is not None:
            try:
                model.load_state_dict(self._state_dict, strict=True)
            except RuntimeError as e:
                raise ConfigError(
                    f"the audio state dict does not fit the audio encoder AudioCNN(n_mels={self.spec.n_mels}, "
                    f"embed_dim={self.spec.embed_dim}, channels={model.channels}): {e}"
                ) from e
        model.eval().requires_grad_(False)
        # channels_last: faster on CUDA and on CPU (oneDNN) alike.
        model = model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._mel = build_mel_spectrogram(self.spec, self.sample_rate_hz).to(device)
        self._torch_device = device
        self._model = model

    def _ready(self) -> tuple[AudioCNN, nn.Module, torch.device]:
        self.setup()
        if self._model is None or self._mel is None or self._torch_device is None:
            raise RuntimeError("AudioEncoder.setup() did not build the model")
        return self._model, self._mel, self._torch_device

    @torch.inference_mode()
    def encode(self, audio: np.ndarray, valid_samples: np.ndarray | None = None) -> np.ndarray:
        """Embed float32 audio ``[N, L]`` (zero-padded segments) -> float32 ``[N, dim]``."""
        audio = _check_audio(audio)
        model, mel, device = self._ready()
        n, length = audio.shape
        n_frames = mel_frames(self.spec, length, self.sample_rate_hz)
        valid = valid_mel_frames(valid_samples, n, n_frames, self.hop_samples)
        on_cuda = device.type == "cuda"
        bf16 = uses_bf16(device, self.precision)
        parts: list[torch.Tensor] = []
        for start, batch in _audio_batches(audio, self.batch_size):
            host = torch.from_numpy(batch)
            if on_cuda:
                host = host.pin_memory()
            x = host.to(device, non_blocking=on_cuda)
            feats = log_mel(x, mel)  # float32, outside autocast
            vf = torch.from_numpy(valid[start : start + len(batch)]).to(device)
            feats = feats.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                emb = model(feats, vf)
            parts.append(emb.float().cpu())
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- classic

_CLASSIC_BLOCKS: tuple[tuple[str, int], ...] = (
    ("mfcc", 20),
    ("chroma", 12),
    ("spectral_centroid_khz", 1),
    ("spectral_bandwidth_khz", 1),
    ("spectral_rolloff_khz", 1),
    ("zero_crossing_rate", 1),
    ("rms", 1),
)


def _classic_names() -> tuple[str, ...]:
    names: list[str] = []
    for block, size in _CLASSIC_BLOCKS:
        for stat in ("mean", "std"):
            names.extend([f"{block}_{stat}"] if size == 1 else [f"{block}{i}_{stat}" for i in range(size)])
    return tuple(names)


CLASSIC_FEATURE_NAMES: tuple[str, ...] = _classic_names()
"""Layout of the classic vector: per block, all means then all stds (mfcc0..19 mean, mfcc0..19 std, chroma
C..B mean, chroma C..B std, then centroid / bandwidth / rolloff in kHz, zero-crossing rate, RMS: mean, std)."""
CLASSIC_AUDIO_DIM = len(CLASSIC_FEATURE_NAMES)  # 74
CHROMA_WINDOW_S = 0.128  # chroma needs finer frequency resolution than the 25 ms mel window gives
CLASSIC_BLOCK_SEGMENTS = 32  # segments per feature computation (memory; values do not depend on it)


class ClassicAudioEncoder:
    """MFCC, chroma and spectral statistics per segment (the ``"classic"`` kind): 74 floats, no torch model,
    always on the CPU.  Each segment's features depend on its own samples only (not on the batch).

    Frames use the spec's window/hop (chroma: a 128 ms FFT, same hop); each frame-level feature is reduced
    to its mean and standard deviation over the valid frames.  ``device``/``threads`` are accepted for a
    uniform interface and ignored.
    """

    def __init__(
        self,
        spec: AudioEncoderSpec,
        *,
        sample_rate_hz: int = AUDIO_RATE_HZ,
        device: str = "cpu",
        batch_size: int = 256,
        threads: int | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        precision: Precision = "auto",  # accepted for a uniform interface; features are float32 (FFTs float64)
    ) -> None:
        check_precision(precision)
        if spec.kind != "classic":
            raise ConfigError(
                f"ClassicAudioEncoder is the 'classic' kind, got spec.kind={spec.kind!r}; use build_audio_encoder"
            )
        if state_dict:
            raise ConfigError(
                "the classic audio encoder has no weights, but a non-empty audio state dict was given"
            )
        if batch_size < 1:
            raise ConfigError(f"audio encoder batch_size must be >= 1, got {batch_size}")
        self.win_samples, self.hop_samples = mel_window_samples(spec, sample_rate_hz)
        self.spec = spec
        self.sample_rate_hz = sample_rate_hz
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        # Largest power of two within CHROMA_WINDOW_S (2048 at 16 kHz), never below the mel window.
        chroma_len = max(self.win_samples, int(CHROMA_WINDOW_S * sample_rate_hz))
        self.chroma_n_fft = 1 << (chroma_len.bit_length() - 1)
        self._ready = False

    def __repr__(self) -> str:
        return (
            f"ClassicAudioEncoder(spec={self.spec!r}, sample_rate_hz={self.sample_rate_hz}, dim={self.dim})"
        )

    @property
    def dim(self) -> int:
        return CLASSIC_AUDIO_DIM

    def setup(self) -> None:
        """Build the filterbanks (cached per process)."""
        classic_audio.mel_filterbank(self.sample_rate_hz, self.win_samples, self.spec.n_mels, self.spec.f_min_hz,
                                     self.spec.f_max_hz)
        classic_audio.chroma_filterbank(self.sample_rate_hz, self.chroma_n_fft)
        self._ready = True

    def encode(self, audio: np.ndarray, valid_samples: np.ndarray | None = None) -> np.ndarray:
        """Features of float32 audio ``[N, L]`` -> float32 ``[N, 74]``."""
        audio = _check_audio(audio)
        if not self._ready:
            self.setup()
        n, length = audio.shape
        n_frames = 1 + length // self.hop_samples
        valid = valid_mel_frames(valid_samples, n, n_frames, self.hop_samples)
        out = np.zeros((n, self.dim), dtype=np.float32)
        # Each segment stands alone, so blocks change no value; small blocks bound the FFTs' memory
        # (the 128 ms chroma FFT in float64: ~3.4 MB per segment).
        for start, batch in _audio_batches(audio, min(self.batch_size, CLASSIC_BLOCK_SEGMENTS)):
            out[start : start + len(batch)] = self._features(batch, valid[start : start + len(batch)])
        return out

    def _features(self, y: np.ndarray, valid_frames: np.ndarray) -> np.ndarray:
        frames = classic_audio.frame_features(
            y, sample_rate_hz=self.sample_rate_hz, win=self.win_samples, hop=self.hop_samples,
            chroma_n_fft=self.chroma_n_fft, n_mels=self.spec.n_mels, f_min_hz=self.spec.f_min_hz,
            f_max_hz=self.spec.f_max_hz,
        )
        # near-silent frames normalise by ~0 in places (chroma, centroid): silence stays finite (zeros)
        return classic_audio.segment_statistics(frames, valid_frames)


def build_audio_encoder(spec: AudioEncoderSpec, **kwargs: Any) -> AudioEncoder | ClassicAudioEncoder:
    """The encoder for ``spec.kind`` (``"cnn"`` or ``"classic"``); kwargs as the encoders' constructors."""
    if spec.kind == "cnn":
        return AudioEncoder(spec, **kwargs)
    if spec.kind == "classic":
        return ClassicAudioEncoder(spec, **kwargs)
    raise ConfigError(f"unknown audio encoder kind {spec.kind!r}; choose one of: cnn, classic")
