"""The classic audio features in numpy: MFCC, chroma and spectral statistics of each segment on its own.

These are librosa's definitions (librosa 0.11: ``stft`` with a periodic Hann window, centred and
zero-padded; ``filters.mel`` on the Slaney scale with Slaney area normalisation; ``power_to_db`` with
``ref=1``, ``amin=1e-10``, ``top_db=80``; ``mfcc`` as the orthonormal DCT-II; ``filters.chroma`` and
``chroma_stft`` with ``tuning=0``; spectral centroid, bandwidth (p = 2) and 85 % roll-off on the
magnitude spectrum; zero-crossing rate on edge-padded frames; RMS on zero-padded frames), written out
here for two reasons:

* **Each segment stands alone.** ``librosa.power_to_db`` clips at 80 dB below the maximum of the whole
  array it is given; fed a batch of segments, a quiet segment's MFCCs depended on the loudest segment
  beside it, so the same second of audio got different features in different chunks (measured on a
  10-minute film: 556 of 789 segments differed, by up to 157).  Here the 80 dB floor is per segment.
* **No librosa at run time.** Importing librosa (SciPy's signal package, numba) took 2.4 s of each model
  worker's start-up on 2 cores, and its per-call overhead ~2.6 ms per segment.

The tests check every block against librosa itself, called one segment at a time.  Arrays are
``[segments, frames, bins]``; each frame-level feature is float32 like librosa's, except that the FFTs
run in float64 (as librosa's do) before the float32 cast.
"""

from __future__ import annotations

import functools
import math

import numpy as np

AMIN = 1e-10  # power_to_db's floor
TOP_DB = 80.0  # power_to_db's dynamic range, per segment
N_MFCC = 20
N_CHROMA = 12
ROLL_PERCENT = 0.85
ZCR_THRESHOLD = 1e-10  # |y| at or below this counts as zero (zero counts as positive)
_TINY32 = float(np.finfo(np.float32).tiny)  # librosa's normalisation threshold for float32 input


# ----------------------------------------------------------------------------------------------- frames


def _frames(y: np.ndarray, n_fft: int, hop: int, mode: str) -> np.ndarray:
    """Centred frames ``[B, 1 + L // hop, n_fft]`` of ``y [B, L]`` (padding ``n_fft // 2`` per side)."""
    pad = n_fft // 2
    padded = np.pad(y, ((0, 0), (pad, pad)), mode=mode)  # type: ignore[call-overload]
    n_frames = 1 + (padded.shape[1] - n_fft) // hop
    view = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)
    return view[:, : (n_frames - 1) * hop + 1 : hop, :]


@functools.cache
def hann_window(n: int) -> np.ndarray:
    """Periodic (DFT-even) Hann window of length ``n``, float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def magnitude_spectrum(y: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """``|STFT|`` as float32 ``[B, frames, 1 + n_fft // 2]`` (Hann window of ``n_fft``, zero-padded centre)."""
    frames = _frames(y, n_fft, hop, "constant")
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=-1)
    return np.abs(spectrum.astype(np.complex64))


# ------------------------------------------------------------------------------------------ filterbanks


def fft_frequencies(sample_rate_hz: int, n_fft: int) -> np.ndarray:
    return np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz)


_SLANEY_F_SP = 200.0 / 3  # Hz per mel below the break
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_F_SP
    log = _SLANEY_BREAK_MEL + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOGSTEP
    return np.where(hz >= _SLANEY_BREAK_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_F_SP
    log = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOGSTEP * (np.maximum(mel, _SLANEY_BREAK_MEL) - _SLANEY_BREAK_MEL))
    return np.where(mel >= _SLANEY_BREAK_MEL, log, linear)


@functools.cache
def mel_filterbank(sample_rate_hz: int, n_fft: int, n_mels: int, f_min_hz: float, f_max_hz: float) -> np.ndarray:
    """Triangular mel filters ``[n_mels, 1 + n_fft // 2]`` float32, each scaled to unit area (Slaney)."""
    freqs = fft_frequencies(sample_rate_hz, n_fft)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(f_min_hz)), hz_to_mel(np.array(f_max_hz)), n_mels + 2))
    widths = np.diff(edges)
    rising = (freqs[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - freqs[None, :]) / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


@functools.cache
def chroma_filterbank(sample_rate_hz: int, n_fft: int, n_chroma: int = N_CHROMA) -> np.ndarray:
    """Chroma filters ``[n_chroma, 1 + n_fft // 2]`` float32 (librosa's ``filters.chroma``, tuning 0, C first).

    Each FFT bin votes for the pitch classes near its pitch with a Gaussian as wide as the bin (at least
    one chroma bin); columns are L2-normalised, then weighted by a Gaussian over octaves centred on
    octave 5 (two octaves wide).
    """
    freqs = np.linspace(0, sample_rate_hz, n_fft, endpoint=False)[1:]
    octs = np.log2(freqs / (440.0 / 16))  # octaves above A0/16 ... as in librosa.hz_to_octs
    bins = n_chroma * octs
    bins = np.concatenate(([bins[0] - 1.5 * n_chroma], bins))  # the 0 Hz bin: 1.5 octaves below bin 1
    width = np.concatenate((np.maximum(np.diff(bins), 1.0), [1.0]))
    half = round(n_chroma / 2)
    dist = bins[None, :] - np.arange(n_chroma, dtype=np.float64)[:, None]
    dist = np.remainder(dist + half + 10 * n_chroma, n_chroma) - half
    weights = np.exp(-0.5 * (2 * dist / width[None, :]) ** 2)
    norms = np.sqrt((weights**2).sum(axis=0, keepdims=True))
    weights = weights / np.where(norms < np.finfo(np.float64).tiny, 1.0, norms)
    weights *= np.exp(-0.5 * ((bins / n_chroma - 5.0) / 2.0) ** 2)[None, :]
    weights = np.roll(weights, -3 * (n_chroma // 12), axis=0)  # start at C, not A
    return np.ascontiguousarray(weights[:, : 1 + n_fft // 2], dtype=np.float32)


@functools.cache
def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Orthonormal DCT-II ``[n_out, n_in]`` (the first ``n_out`` rows), float64."""
    n = np.arange(n_in)
    k = np.arange(n_out)[:, None]
    m = np.cos(np.pi * k * (2 * n[None, :] + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m


# --------------------------------------------------------------------------------------------- features


def _l1_normalised(s: np.ndarray) -> np.ndarray:
    total = s.sum(axis=-1, keepdims=True)
    return s / np.where(total < _TINY32, 1.0, total).astype(s.dtype)


def mfcc(power: np.ndarray, sample_rate_hz: int, n_fft: int, n_mels: int, f_min_hz: float,
         f_max_hz: float) -> np.ndarray:
    """``[B, T, 20]`` MFCCs of the power spectrum, with the 80 dB floor taken per segment."""
    mel = power @ mel_filterbank(sample_rate_hz, n_fft, n_mels, f_min_hz, f_max_hz).T  # [B, T, M] float32
    db = (10.0 * np.log10(np.maximum(np.float32(AMIN), mel))).astype(np.float32)
    db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - np.float32(TOP_DB))
    return (db @ dct_matrix(N_MFCC, n_mels).T).astype(np.float32)


def chroma(y: np.ndarray, sample_rate_hz: int, n_fft: int, hop: int) -> np.ndarray:
    """``[B, T, 12]`` chroma of the power spectrum, each frame scaled to a maximum of 1."""
    power = magnitude_spectrum(y, n_fft, hop) ** 2
    raw = power @ chroma_filterbank(sample_rate_hz, n_fft).T
    peak = np.abs(raw).max(axis=-1, keepdims=True)
    return raw / np.where(peak < _TINY32, 1.0, peak).astype(raw.dtype)


def spectral_shape(mag: np.ndarray, sample_rate_hz: int, n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame ``[B, T]``: centroid, bandwidth (p = 2) and 85 % roll-off frequency in Hz."""
    freqs = fft_frequencies(sample_rate_hz, n_fft)
    weights = _l1_normalised(mag)
    centroid = weights @ freqs
    deviation = np.abs(freqs[None, None, :] - centroid[..., None])
    bandwidth = np.sqrt((weights * deviation**2).sum(axis=-1))
    energy = np.cumsum(mag, axis=-1)
    reached = energy >= ROLL_PERCENT * energy[..., -1:]
    rolloff = freqs[np.argmax(reached, axis=-1)]  # the first bin that reaches it (always one: the last)
    return centroid, bandwidth, rolloff


def zero_crossing_rate(y: np.ndarray, frame_length: int, hop: int) -> np.ndarray:
    """``[B, T]`` fraction of sign changes per edge-padded centred frame (|y| <= 1e-10 counts as 0, 0 as +)."""
    negative = np.signbit(np.where(np.abs(y) <= ZCR_THRESHOLD, 0.0, y))
    frames = _frames(negative, frame_length, hop, "edge")
    return (frames[..., 1:] != frames[..., :-1]).sum(axis=-1) / frame_length


def rms(y: np.ndarray, frame_length: int, hop: int) -> np.ndarray:
    """``[B, T]`` root mean square of each zero-padded centred frame (float32, as librosa)."""
    frames = _frames(y, frame_length, hop, "constant")
    return np.sqrt(np.mean(frames**2, axis=-1, dtype=np.float32))


def frame_features(y: np.ndarray, *, sample_rate_hz: int, win: int, hop: int, chroma_n_fft: int, n_mels: int,
                   f_min_hz: float, f_max_hz: float) -> list[np.ndarray]:
    """The frame-level features of float32 ``y [B, L]``, each ``[B, T, k]``: mfcc (20), chroma (12),
    centroid, bandwidth, roll-off (kHz), zero-crossing rate, RMS (1 each); ``T = 1 + L // hop``."""
    # A non-finite sample (corrupt float PCM) would spread NaN over its segment's every MFCC frame (via
    # the 80 dB floor) and its statistics: it counts as silence instead.
    y = np.nan_to_num(np.asarray(y, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    mag = magnitude_spectrum(y, win, hop)
    centroid, bandwidth, rolloff = spectral_shape(mag, sample_rate_hz, win)
    return [
        mfcc(mag**2, sample_rate_hz, win, n_mels, f_min_hz, f_max_hz),
        chroma(y, sample_rate_hz, chroma_n_fft, hop),
        (centroid / 1000.0)[..., None],
        (bandwidth / 1000.0)[..., None],
        (rolloff / 1000.0)[..., None],
        zero_crossing_rate(y, win, hop)[..., None],
        rms(y, win, hop)[..., None],
    ]


def segment_statistics(features: list[np.ndarray], valid_frames: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of each feature over each segment's first ``valid_frames`` frames:
    float32 ``[B, sum(2 k)]``, per block all means then all standard deviations."""
    n_t = features[0].shape[1]
    mask = (np.arange(n_t)[None, :] < np.minimum(valid_frames, n_t)[:, None]).astype(np.float64)[..., None]
    count = mask.sum(axis=1)
    stats: list[np.ndarray] = []
    for feat in features:
        f = feat[:, :n_t].astype(np.float64)
        mean = (f * mask).sum(axis=1) / count
        std = np.sqrt((((f - mean[:, None, :]) * mask) ** 2).sum(axis=1) / count)
        stats.extend([mean, std])
    out = np.concatenate(stats, axis=1).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
