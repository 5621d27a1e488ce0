"""Image and audio encoders: real torchvision / torchaudio / librosa components, no mocks, no downloads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from pipeline.audio_encoder import (
    CLASSIC_AUDIO_DIM,
    CLASSIC_FEATURE_NAMES,
    LOG_MEL_EPS,
    AudioCNN,
    AudioEncoder,
    ClassicAudioEncoder,
    build_audio_encoder,
    build_mel_spectrogram,
    log_mel,
    mel_frames,
    mel_window_samples,
)
from pipeline.errors import ConfigError, WeightsNotFoundError
from pipeline.image_encoder import (
    IMAGE_ENCODER_DIMS,
    ImageEncoder,
    ImageFeatures,
    _Backbone,
    _build_full_model,
    resolve_image_weights,
)
from pipeline.specs import IMAGE_ENCODER_NAMES, AudioEncoderSpec, ImageEncoderSpec

SR = 16_000
IMG = 64  # small frames keep CPU tests fast; every backbone still ends in a 2x2 map


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (TORCH_HOME) for this test."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def _frames(n: int, k: int, seed: int = 0, size: int = IMG) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, k, size, size, 3), dtype=np.uint8)


def _seeded_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None).state_dict()


def _hub_file(home: Path, name: str, member: str) -> Path:
    url = torchvision.models.get_model_weights(name)[member].url
    return home / "hub" / "checkpoints" / os.path.basename(url)


def _tone(freq_hz: float, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _noise(seconds: float = 1.0, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


# ------------------------------------------------------------------------------------------ image encoder


@pytest.mark.parametrize("name", IMAGE_ENCODER_NAMES)
def test_image_encoder_shapes(name):
    enc = ImageEncoder(ImageEncoderSpec(name=name, grid=2), batch_size=4)
    assert enc.dim == IMAGE_ENCODER_DIMS[name]
    assert not enc.is_setup  # constructing and asking the dim builds nothing
    d = enc.dim

    three = enc.encode(_frames(2, 3))
    assert three.pooled.shape == (2, d) and three.pooled.dtype == np.float32
    assert three.grid is not None and three.grid.shape == (2, 3 * 2 * 2, d)
    assert np.isfinite(three.pooled).all() and np.isfinite(three.grid).all()
    # A 64 px frame ends in a 2x2 map, so the 2x2 grid cells average back to the pooled vector.
    np.testing.assert_allclose(three.grid.mean(axis=1), three.pooled, rtol=1e-4, atol=1e-5)

    one = enc.encode(_frames(2, 3).reshape(6, 1, IMG, IMG, 3))
    assert one.pooled.shape == (6, d) and one.grid is not None and one.grid.shape == (6, 4, d)
    # A segment's pooled vector is the mean over its K frames.
    np.testing.assert_allclose(one.pooled.reshape(2, 3, d).mean(axis=1), three.pooled, rtol=1e-4, atol=1e-5)
    assert "pooled=(6," in repr(one)


@pytest.mark.parametrize("name", IMAGE_ENCODER_NAMES)
def test_folded_batch_norms_compute_the_same_features(name):
    """Inference folds every BatchNorm into its convolution; the features stay those of the model as trained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = _build_full_model(name)
        for m in full.modules():  # trained-looking statistics, so that folding has something to fold
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        x = torch.randn(3, 3, IMG, IMG)
    reference = _Backbone(full, name).eval()
    folded = _Backbone(pickle.loads(pickle.dumps(full)), name).eval()
    folded.fold_batch_norms()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    with torch.inference_mode():
        want, got = reference(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    enc = ImageEncoder(ImageEncoderSpec(name=name))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.module.modules())


def test_image_encoder_without_grid_and_empty():
    enc = ImageEncoder(ImageEncoderSpec(name="mobilenet_v3_large"))
    feats = enc.encode(_frames(3, 1))
    assert feats.grid is None and feats.pooled.shape == (3, 960)
    empty = enc.encode(np.zeros((0, 1, IMG, IMG, 3), dtype=np.uint8))
    assert empty.pooled.shape == (0, 960) and empty.grid is None
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(_frames(1, 1).astype(np.float32))
    with pytest.raises(ValueError, match="pooled"):
        ImageFeatures(pooled=np.zeros((2, 3), dtype=np.float64))


def test_image_encoder_deterministic_and_leaves_global_rng_alone():
    frames = _frames(2, 1, seed=1)
    rng_before = torch.random.get_rng_state()
    a = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=0)).encode(frames).pooled
    b = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=0)).encode(frames).pooled
    c = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=1)).encode(frames).pooled
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_image_encoder_pickles_without_its_model():
    enc = ImageEncoder(ImageEncoderSpec(name="resnet18"), batch_size=2)
    frames = _frames(3, 1)
    before = enc.encode(frames).pooled
    blob = pickle.dumps(enc)
    assert len(blob) < 10_000  # config only, not 45 MB of weights
    again = pickle.loads(blob)
    assert not again.is_setup
    np.testing.assert_array_equal(again.encode(frames).pooled, before)


def test_image_weights_file_round_trip(tmp_path):
    state = _seeded_state_dict("resnet18", seed=3)
    st_path = tmp_path / "r18.safetensors"
    pth_path = tmp_path / "r18.pth"
    save_file(state, str(st_path))
    torch.save(state, str(pth_path))
    frames = _frames(2, 1, seed=2)

    from_st = ImageEncoder(ImageEncoderSpec(name="resnet18", weights=f"file:{st_path}")).encode(frames).pooled
    from_pth = (
        ImageEncoder(ImageEncoderSpec(name="resnet18", weights=f"file:{pth_path}")).encode(frames).pooled
    )
    seeded = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=3)).encode(frames).pooled
    other = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=0)).encode(frames).pooled
    np.testing.assert_array_equal(from_st, from_pth)
    np.testing.assert_array_equal(from_st, seeded)  # the file really was loaded: same weights, same output
    assert not np.allclose(from_st, other)


def test_image_weights_from_hub_cache(torch_home):
    frames = _frames(2, 1, seed=4)
    r18 = _hub_file(torch_home, "resnet18", "IMAGENET1K_V1")
    r18.parent.mkdir(parents=True)
    torch.save(_seeded_state_dict("resnet18", seed=7), str(r18))
    assert resolve_image_weights(ImageEncoderSpec(name="resnet18", weights="default")) == r18
    by_default = ImageEncoder(ImageEncoderSpec(name="resnet18", weights="default")).encode(frames).pooled
    by_member = ImageEncoder(ImageEncoderSpec(name="resnet18", weights="IMAGENET1K_V1")).encode(frames).pooled
    seeded = ImageEncoder(ImageEncoderSpec(name="resnet18", seed=7)).encode(frames).pooled
    np.testing.assert_array_equal(by_default, by_member)
    np.testing.assert_array_equal(by_default, seeded)

    # mobilenet_v3_large's DEFAULT is IMAGENET1K_V2: that file serves "default"; V1 is still missing.
    mnv3 = _hub_file(torch_home, "mobilenet_v3_large", "IMAGENET1K_V2")
    torch.save(_seeded_state_dict("mobilenet_v3_large", seed=7), str(mnv3))
    m_default = (
        ImageEncoder(ImageEncoderSpec(name="mobilenet_v3_large", weights="default")).encode(frames).pooled
    )
    m_seeded = ImageEncoder(ImageEncoderSpec(name="mobilenet_v3_large", seed=7)).encode(frames).pooled
    np.testing.assert_array_equal(m_default, m_seeded)
    with pytest.raises(WeightsNotFoundError, match="IMAGENET1K_V1"):
        ImageEncoder(ImageEncoderSpec(name="mobilenet_v3_large", weights="IMAGENET1K_V1")).setup()


def test_image_weights_missing_from_hub_cache(torch_home):
    enc = ImageEncoder(ImageEncoderSpec(name="efficientnet_b0", weights="default"))  # cheap: no error yet
    with pytest.raises(WeightsNotFoundError) as err:
        enc.setup()
    msg = str(err.value)
    expected = _hub_file(torch_home, "efficientnet_b0", "IMAGENET1K_V1")
    assert "efficientnet_b0" in msg and "'default'" in msg
    assert str(expected) in msg
    assert "file:" in msg and "'none'" in msg and "copy it" in msg
    assert not enc.is_setup


def test_image_weights_errors(tmp_path):
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2") as err:
        ImageEncoder(ImageEncoderSpec(name="resnet50", weights="IMAGENET22K")).setup()
    assert "none, default" in str(err.value)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        ImageEncoder(ImageEncoderSpec(name="resnet18", weights=f"file:{missing}")).setup()

    wrong = tmp_path / "r18.safetensors"
    save_file(_seeded_state_dict("resnet18", seed=0), str(wrong))
    with pytest.raises(ConfigError, match="image encoder 'mobilenet_v3_large'"):
        ImageEncoder(ImageEncoderSpec(name="mobilenet_v3_large", weights=f"file:{wrong}")).setup()

    # A pickled module (not a plain state dict) is refused, never unpickled.
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), str(pickled))
    with pytest.raises(ConfigError, match="weights_only"):
        ImageEncoder(ImageEncoderSpec(name="resnet18", weights=f"file:{pickled}")).setup()

    odd = tmp_path / "r18.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=".safetensors, .pt or .pth"):
        ImageEncoder(ImageEncoderSpec(name="resnet18", weights=f"file:{odd}")).setup()


# ------------------------------------------------------------------------------------------ audio (cnn)


def test_mel_parameters():
    spec = AudioEncoderSpec(n_mels=64, win_ms=25.0, hop_ms=10.0)
    assert mel_window_samples(spec, SR) == (400, 160)
    assert mel_frames(spec, SR, SR) == 101  # 1 s, centred frames: 1 + 16000 // 160
    mel = build_mel_spectrogram(spec, SR)
    feats = log_mel(torch.zeros(2, SR), mel)
    assert feats.shape == (2, 1, 101, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, torch.full_like(feats, float(np.log(LOG_MEL_EPS))))
    # The encoder uses the same transform on its device.
    enc = AudioEncoder(spec)
    assert log_mel(torch.zeros(1, SR), enc.mel).shape == (1, 1, 101, 64)
    with pytest.raises(ConfigError, match="Nyquist"):
        AudioEncoder(AudioEncoderSpec(f_max_hz=8000.0), sample_rate_hz=8000)


def test_audio_cnn_shapes_and_silence():
    enc = AudioEncoder(AudioEncoderSpec(embed_dim=128), batch_size=2)
    assert enc.dim == 128
    audio = np.stack([_tone(440.0), _noise(), np.zeros(SR, np.float32)])
    emb = enc.encode(audio)
    assert emb.shape == (3, 128) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    silent = enc.encode(np.zeros((2, SR), np.float32), valid_samples=np.zeros(2, np.int32))
    assert np.isfinite(silent).all()
    np.testing.assert_allclose(silent[0], emb[2], rtol=1e-5, atol=1e-6)  # no audio track == silence
    assert enc.encode(np.zeros((0, SR), np.float32)).shape == (0, 128)
    # Short segments and few mel bins still pass through all four pooling blocks.
    short = AudioEncoder(AudioEncoderSpec(n_mels=8, embed_dim=16)).encode(np.zeros((1, 400), np.float32))
    assert short.shape == (1, 16) and np.isfinite(short).all()


def test_audio_cnn_tone_and_noise_differ():
    enc = AudioEncoder(AudioEncoderSpec())
    emb = enc.encode(np.stack([_tone(440.0), _noise()]))
    assert not np.allclose(emb[0], emb[1], rtol=1e-3, atol=1e-3)
    assert _cos(emb[0], emb[1]) < 0.999


def test_audio_cnn_deterministic_and_batch_independent():
    audio = np.stack([_tone(440.0), _noise(seed=1), _tone(1000.0), _noise(seed=2)])
    rng_before = torch.random.get_rng_state()
    a = AudioEncoder(AudioEncoderSpec(seed=0), batch_size=4).encode(audio)
    b = AudioEncoder(AudioEncoderSpec(seed=0), batch_size=1).encode(audio)
    c = AudioEncoder(AudioEncoderSpec(seed=1)).encode(audio)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, c)
    enc = AudioEncoder(AudioEncoderSpec(seed=0))
    np.testing.assert_array_equal(enc.encode(audio), enc.encode(audio))


def test_audio_valid_samples_mask_time_pooling():
    enc = AudioEncoder(AudioEncoderSpec())
    half = np.concatenate([_noise(0.5), np.zeros(SR // 2, np.float32)])[None]
    full = enc.encode(half)
    np.testing.assert_array_equal(enc.encode(half, valid_samples=np.array([SR])), full)
    masked = enc.encode(half, valid_samples=np.array([SR // 2]))
    assert np.isfinite(masked).all() and not np.allclose(masked, full)
    with pytest.raises(ValueError, match="valid_samples"):
        enc.encode(half, valid_samples=np.array([1, 2]))


def test_audio_state_dict_round_trip(tmp_path):
    audio = np.stack([_tone(440.0), _noise()])
    trained = AudioEncoder(AudioEncoderSpec(seed=11))
    want = trained.encode(audio)
    path = tmp_path / "audio.safetensors"
    save_file(trained.module.state_dict(), str(path))  # channels_last weights are packed for safetensors
    loaded = AudioEncoder(AudioEncoderSpec(seed=0), state_dict=load_file(str(path)))
    np.testing.assert_array_equal(loaded.encode(audio), want)
    assert not np.allclose(AudioEncoder(AudioEncoderSpec(seed=0)).encode(audio), want)

    # A smaller CNN saved elsewhere (e.g. by training) loads too: widths come from the state dict.
    small = AudioCNN(n_mels=64, embed_dim=512, channels=(8, 16, 32, 64))
    small_enc = AudioEncoder(AudioEncoderSpec(), state_dict=small.state_dict())
    assert small_enc.module.channels == (8, 16, 32, 64) and small_enc.encode(audio).shape == (2, 512)

    with pytest.raises(ConfigError, match=r"AudioCNN\(n_mels=64, embed_dim=256"):
        AudioEncoder(AudioEncoderSpec(embed_dim=256), state_dict=load_file(str(path))).setup()


def test_audio_encoder_pickles_and_builds_by_kind():
    enc = AudioEncoder(AudioEncoderSpec())
    audio = _tone(440.0)[None]
    want = enc.encode(audio)
    again = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(again.encode(audio), want)
    assert isinstance(build_audio_encoder(AudioEncoderSpec(kind="cnn")), AudioEncoder)
    assert isinstance(build_audio_encoder(AudioEncoderSpec(kind="classic")), ClassicAudioEncoder)
    with pytest.raises(ConfigError, match="classic"):
        AudioEncoder(AudioEncoderSpec(kind="classic"))
    with pytest.raises(ConfigError, match="no weights"):
        build_audio_encoder(AudioEncoderSpec(kind="classic"), state_dict={"x": torch.zeros(1)})


# -------------------------------------------------------------------------------------- audio (classic)


@pytest.fixture(scope="module")
def classic() -> ClassicAudioEncoder:
    return ClassicAudioEncoder(AudioEncoderSpec(kind="classic"), batch_size=8)


def _real_audio(media: Path, seconds: int = 5) -> np.ndarray:
    """``[seconds, SR]`` float32: the sound track of a real clip, decoded and resampled to 16 kHz mono by PyAV."""
    import av

    out = []
    with av.open(str(media / "bbb_5s_51.mp4")) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
        for frame in c.decode(audio=0):
            out.extend(o.to_ndarray().reshape(-1) for o in resampler.resample(frame))
    samples = np.concatenate(out)[: seconds * SR]
    assert len(samples) == seconds * SR
    return samples.reshape(seconds, SR)


def _librosa_frame_features(y: np.ndarray, enc: ClassicAudioEncoder) -> list[np.ndarray]:
    """librosa's own frame-level features of one segment, as the classic encoder defines them: ``[T, k]`` each."""
    librosa = pytest.importorskip("librosa")
    sr, win, hop, n_fft, spec = SR, enc.win_samples, enc.hop_samples, enc.chroma_n_fft, enc.spec
    mag = np.abs(librosa.stft(y, n_fft=win, hop_length=hop, win_length=win, center=True, pad_mode="constant"))
    mel = librosa.feature.melspectrogram(S=mag**2, sr=sr, n_fft=win, n_mels=spec.n_mels, fmin=spec.f_min_hz,
                                         fmax=spec.f_max_hz)
    chroma_power = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, center=True, pad_mode="constant")) ** 2
    feats = [
        librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=20),
        librosa.feature.chroma_stft(S=chroma_power, sr=sr, n_fft=n_fft, tuning=0.0, n_chroma=12),
        librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=win) / 1000.0,
        librosa.feature.spectral_bandwidth(S=mag, sr=sr, n_fft=win) / 1000.0,
        librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=win) / 1000.0,
        librosa.feature.zero_crossing_rate(y, frame_length=win, hop_length=hop, center=True),
        librosa.feature.rms(y=y, frame_length=win, hop_length=hop, center=True, pad_mode="constant"),
    ]
    return [f.T for f in feats]


def test_classic_features_are_librosas_computed_per_segment(classic, shared_media):
    """Our numpy features against librosa itself, one segment at a time: real sound, tones, noise, silence."""
    from pipeline import classic_audio

    rng = np.random.default_rng(3)
    audio = np.concatenate([
        _real_audio(shared_media),
        np.stack([_tone(440.0), _noise(), np.zeros(SR, np.float32),
                  (1e-7 * rng.standard_normal(SR)).astype(np.float32),  # below the zero-crossing threshold
                  np.concatenate([_tone(220.0, 0.3), np.zeros(SR - int(0.3 * SR), np.float32)])]),
    ])
    blocks = ("mfcc", "chroma", "centroid", "bandwidth", "rolloff", "zero crossing rate", "rms")
    ours = classic_audio.frame_features(
        audio, sample_rate_hz=SR, win=classic.win_samples, hop=classic.hop_samples,
        chroma_n_fft=classic.chroma_n_fft, n_mels=classic.spec.n_mels, f_min_hz=classic.spec.f_min_hz,
        f_max_hz=classic.spec.f_max_hz)
    for i, y in enumerate(audio):
        for name, theirs, mine in zip(blocks, _librosa_frame_features(y, classic), ours, strict=True):
            assert mine[i].shape == theirs.shape, name
            scale = max(float(np.abs(theirs).max()), 1e-3)
            assert np.abs(mine[i] - theirs).max() <= 1e-5 * scale, f"{name}, segment {i}"


def test_classic_features_take_non_finite_samples_as_silence(classic):
    tone = _tone(440.0)
    broken = tone.copy()
    broken[[100, 5000, 9000]] = [np.nan, np.inf, -np.inf]
    cleaned = tone.copy()
    cleaned[[100, 5000, 9000]] = 0.0
    got = classic.encode(np.stack([broken, tone]))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], classic.encode(cleaned[None])[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], classic.encode(tone[None])[0], rtol=1e-6, atol=1e-6)


def test_classic_features_of_a_segment_do_not_depend_on_its_neighbours(classic, shared_media):
    """A quiet second gets the same features alone, beside loud ones, in any batch: chunking cannot change
    them.  (librosa's power_to_db on a batch floors every segment 80 dB below the loudest one.)"""
    quiet = (1e-4 * _tone(330.0)).astype(np.float32)
    loud = (0.9 * _noise()).astype(np.float32)
    alone = classic.encode(quiet[None])
    for batch in (np.stack([loud, quiet]), np.stack([quiet, loud, loud]), np.concatenate([_real_audio(shared_media), quiet[None]])):
        where = next(i for i, row in enumerate(batch) if np.array_equal(row, quiet))
        np.testing.assert_allclose(classic.encode(batch)[where], alone[0], rtol=1e-5, atol=1e-6)


def test_classic_dims_and_silence(classic):
    assert classic.dim == CLASSIC_AUDIO_DIM == len(CLASSIC_FEATURE_NAMES) == 74
    audio = np.stack([np.zeros(SR, np.float32), _tone(440.0), _noise(), np.zeros(SR, np.float32)])
    feats = classic.encode(audio, valid_samples=np.array([0, SR, SR, 10]))
    assert feats.shape == (4, 74) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert np.isfinite(classic.encode(np.zeros((2, SR), np.float32))).all()


def test_classic_chroma_pitch_class(classic):
    chroma_mean = [CLASSIC_FEATURE_NAMES.index(f"chroma{i}_mean") for i in range(12)]
    feats = classic.encode(np.stack([_tone(440.0), _tone(261.63), _tone(392.0)]))
    assert list(np.argmax(feats[:, chroma_mean], axis=1)) == [9, 0, 7]  # A, C, G


def test_classic_uses_valid_samples_only(classic):
    rms_mean = CLASSIC_FEATURE_NAMES.index("rms_mean")
    full = classic.encode(_tone(440.0)[None])
    half = np.concatenate([_tone(440.0, 0.5), np.zeros(SR // 2, np.float32)])[None]
    padded = classic.encode(half)
    valid = classic.encode(half, valid_samples=np.array([SR // 2]))
    assert abs(valid[0, rms_mean] - full[0, rms_mean]) < 0.05 * full[0, rms_mean]
    assert padded[0, rms_mean] < 0.7 * full[0, rms_mean]


# ------------------------------------------------------------------------------------------------- gpu


def _bn_calibrated_state_dict(name: str, seed: int, size: int = 224) -> dict[str, torch.Tensor]:
    """Random weights with BatchNorm statistics measured on random images, so activations have unit scale.

    Freshly initialised mobilenet_v3 / efficientnet collapse to ~1e-9 features (identity BatchNorm after
    many layers), which makes bf16-vs-float32 comparisons meaningless; trained weights do not do that.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the calibration passes
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(8, 3, size, size))
    return model.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_float32(tmp_path):
    frames = _frames(4, 2, seed=5, size=224)
    for name in ("resnet18", "mobilenet_v3_large"):
        path = tmp_path / f"{name}.safetensors"
        save_file(_bn_calibrated_state_dict(name, seed=0), str(path))
        spec = ImageEncoderSpec(name=name, weights=f"file:{path}", grid=2)
        cpu = ImageEncoder(spec).encode(frames)
        gpu = ImageEncoder(spec, device="cuda").encode(frames)
        assert gpu.pooled.dtype == np.float32 and gpu.grid is not None and cpu.grid is not None
        assert _cos(cpu.pooled, gpu.pooled).min() > 0.99, name
        assert _cos(cpu.grid, gpu.grid).min() > 0.99, name
    audio = np.stack([_tone(440.0), _noise(), _tone(1000.0) + _noise(seed=3, amp=0.05)])
    valid = np.array([SR, SR // 2, SR])
    cpu_a = AudioEncoder(AudioEncoderSpec()).encode(audio, valid_samples=valid)
    gpu_a = AudioEncoder(AudioEncoderSpec(), device="cuda").encode(audio, valid_samples=valid)
    assert gpu_a.dtype == np.float32
    assert _cos(cpu_a, gpu_a).min() > 0.99


def test_a_onednn_cap_below_bf16_means_no_native_bf16(monkeypatch):
    """oneDNN capped by ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) below AVX512_CORE_BF16 emulates bf16 whatever the
    CPU's flags say: auto must be fp32 there (bf16 measured at 289 ms per image against 26 in fp32 with AVX2)."""
    from pipeline import precision

    def native(**env: str) -> bool:
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        precision.cpu_has_native_bf16.cache_clear()
        return precision.cpu_has_native_bf16()

    try:
        flags = native()  # this CPU's own answer
        for cap in ("AVX2", "avx512_core_vnni", "AVX512_CORE", "SSE41"):
            assert native(ONEDNN_MAX_CPU_ISA=cap) is False, cap
        assert native(DNNL_MAX_CPU_ISA="AVX2") is False
        assert native(ONEDNN_MAX_CPU_ISA="ALL", DNNL_MAX_CPU_ISA="AVX2") is flags  # the newer name wins
        assert native(ONEDNN_MAX_CPU_ISA="AVX2") is False and precision.encoder_precision("auto", "cpu") == "fp32"
        assert precision.runs_emulated_bf16(torch.device("cpu"), "bf16")
        assert not precision.runs_emulated_bf16(torch.device("cpu"), "fp32")
        for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", "DEFAULT"):
            assert native(ONEDNN_MAX_CPU_ISA=cap) is flags, cap
    finally:
        monkeypatch.undo()
        precision.cpu_has_native_bf16.cache_clear()
