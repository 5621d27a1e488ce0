"""FusionHead, window_plan, HeadRunner and topk, with real torch on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.head import ChunkLabels, FusionHead, HeadRunner, Window, build_head, topk, window_plan
from pipeline.specs import HeadSpec

torch.set_num_threads(1)

FUSIONS = ("concat", "weighted", "attention")
IMAGE_DIM, AUDIO_DIM, N_LABELS, REGIONS = 12, 10, 5, 4


def tiny_spec(fusion: str = "concat", **kw: object) -> HeadSpec:
    args: dict[str, object] = dict(fusion=fusion, image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, n_labels=N_LABELS,
                                   proj_dim=8, lstm_hidden=6, window_segments=16, context_segments=8, dropout=0.1)
    args.update(kw)
    return HeadSpec(**args)  # type: ignore[arg-type]


def toy_batch(b: int = 4, t: int = 10, regions: int = REGIONS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, t, IMAGE_DIM, generator=g)
    audio = torch.randn(b, t, AUDIO_DIM, generator=g)
    grid = torch.randn(b, t, regions, IMAGE_DIM, generator=g)
    # Labels that depend on both modalities, so fitting them needs the fusion to work.
    target = ((image[..., 0] > 0).long() + 2 * (audio[..., 0] > 0).long()) % N_LABELS
    return image, audio, grid, target


# ---------------------------------------------------------------- FusionHead


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_shapes(fusion: str) -> None:
    spec = tiny_spec(fusion)
    head = build_head(spec).eval()
    assert isinstance(head, FusionHead) and head.embedding_dim == 2 * spec.lstm_hidden
    image, audio, grid, _ = toy_batch(3, 7)
    logits = head(image, audio, grid)
    assert logits.shape == (3, 7, N_LABELS)
    logits2, emb = head(image, audio, grid, return_embedding=True)
    assert emb.shape == (3, 7, 2 * spec.lstm_hidden)
    torch.testing.assert_close(logits, logits2)
    # No grid: attention falls back to the pooled vector as one region; the others ignore grid anyway.
    assert head(image, audio, None).shape == (3, 7, N_LABELS)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_training_step_reduces_loss_and_grads_flow(fusion: str) -> None:
    head = build_head(tiny_spec(fusion, dropout=0.0))
    image, audio, grid, target = toy_batch()
    opt = torch.optim.Adam(head.parameters(), lr=0.02)

    def loss_fn() -> torch.Tensor:
        logits = head(image, audio, grid)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, N_LABELS), target.reshape(-1))

    first = loss_fn()
    first.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    opt.step()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first.item()


def test_weighted_modality_weights_are_learnable() -> None:
    head = build_head(tiny_spec("weighted", dropout=0.0))
    torch.testing.assert_close(head.modality_weights(), torch.tensor([0.5, 0.5]))
    assert head.modality_logits.requires_grad
    image, audio, grid, target = toy_batch()
    opt = torch.optim.SGD([head.modality_logits], lr=1.0)
    logits = head(image, audio, grid)
    torch.nn.functional.cross_entropy(logits.reshape(-1, N_LABELS), target.reshape(-1)).backward()
    assert head.modality_logits.grad is not None and head.modality_logits.grad.abs().sum() > 0
    opt.step()
    w = head.modality_weights()
    assert not torch.allclose(w, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weighted"):
        build_head(tiny_spec("concat")).modality_weights()


def test_attention_weights_sum_to_one_over_regions() -> None:
    head = build_head(tiny_spec("attention"))
    image, audio, grid, _ = toy_batch(2, 5, regions=7)
    w = head.region_weights(audio, grid)
    assert w.shape == (2, 5, 7)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    # Different audio queries attend differently over the same regions.
    w2 = head.region_weights(torch.randn_like(audio), grid)
    assert not torch.allclose(w, w2)
    # The attended vector, not the pooled image, feeds attention fusion when a grid is given.
    head.eval()
    torch.testing.assert_close(head(image, audio, grid), head(torch.randn_like(image), audio, grid))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_head(tiny_spec("attention"))
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    b = build_head(tiny_spec("attention"))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb)
    c = build_head(tiny_spec("attention", seed=1))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_bad_input_shapes_raise() -> None:
    head = build_head(tiny_spec("attention"))
    image, audio, grid, _ = toy_batch(2, 5)
    with pytest.raises(ValueError, match="image"):
        head(image[..., :-1], audio, grid)
    with pytest.raises(ValueError, match="audio"):
        head(image, audio[:, :4], grid)
    with pytest.raises(ValueError, match="grid"):
        head(image, audio, grid[..., :-1])


# ---------------------------------------------------------------- window_plan


def test_window_plan_covers_core_exactly() -> None:
    spec = tiny_spec(window_segments=16, context_segments=8)
    # Chunk [24, 72) with core [32, 64): two full windows with full context.
    plan = window_plan(24, 48, 32, 64, spec)
    assert plan == [Window(24, 56, 32, 48), Window(40, 72, 48, 64)]
    # Video start: no left context exists, none is needed.
    assert window_plan(0, 40, 0, 32, spec)[0] == Window(0, 24, 0, 16)
    # Video end inside the last window: a short window, context clipped at the video end.
    plan = window_plan(88, 62, 96, 150, spec, video_n_segments=150)
    assert [(w.out_lo, w.out_hi) for w in plan] == [(96, 112), (112, 128), (128, 144), (144, 150)]
    assert plan[-1] == Window(136, 150, 144, 150)
    assert plan[-2] == Window(120, 150, 128, 144)
    assert window_plan(0, 10, 0, 10, spec, video_n_segments=10) == [Window(0, 10, 0, 10)]
    assert window_plan(16, 8, 20, 20, spec) == []


def test_window_plan_right_edge_may_be_the_video_end() -> None:
    spec = tiny_spec(window_segments=16, context_segments=8)
    # A chunk that is not the last but whose right context stops at the video's end (150): legit.
    plan = window_plan(88, 62, 96, 144, spec)
    assert plan[-1] == Window(120, 150, 128, 144)
    # With the video's length known, the same short right edge is missing context.
    with pytest.raises(ValueError, match="right context"):
        window_plan(88, 62, 96, 144, spec, video_n_segments=200)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((0, 64, 8, 40), {}, "core_start 8 is not a multiple"),
        ((0, 64, 16, 40), {}, "core_end 40 is neither"),
        ((0, 64, 16, 40), {"video_n_segments": 64}, "core_end 40 is neither"),
        ((10, 54, 16, 48), {}, "missing left context"),
        ((24, 40, 32, 64), {"video_n_segments": 100}, "missing right context"),
        ((0, 64, 0, 70), {}, "not inside the chunk"),
        ((0, 64, 0, 64), {"video_n_segments": 60}, "past the video's end"),
    ],
)
def test_window_plan_rejects(args: tuple[int, int, int, int], kw: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        window_plan(*args, tiny_spec(window_segments=16, context_segments=8), **kw)


# ---------------------------------------------------------------- HeadRunner: chunk invariance


def video_features(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, IMAGE_DIM), dtype=np.float32),
            rng.standard_normal((n, AUDIO_DIM), dtype=np.float32),
            rng.standard_normal((n, REGIONS, IMAGE_DIM), dtype=np.float32))


def label_in_chunks(runner: HeadRunner, feats: tuple[np.ndarray, np.ndarray, np.ndarray], core: int,
                    context: int, *, embedding: bool = False) -> ChunkLabels:
    """Label a video cut exactly as the decoder cuts it: chunk j covers [max(0, jC - X), min(n, (j+1)C + X))."""
    image, audio, grid = feats
    n = len(image)
    probs, embs = [], []
    for j in range(-(-n // core)):
        lo, hi = max(0, j * core - context), min(n, (j + 1) * core + context)
        core_start, core_end = j * core, min(n, (j + 1) * core)
        out = runner.label(image[lo:hi], audio[lo:hi], grid[lo:hi], first_segment=lo, core_start=core_start,
                           core_end=core_end, is_last=core_end == n, return_embedding=embedding)
        assert out.probs.shape == (core_end - core_start, N_LABELS)
        probs.append(out.probs)
        if embedding:
            assert out.embedding is not None
            embs.append(out.embedding)
    return ChunkLabels(np.concatenate(probs), np.concatenate(embs) if embedding else None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_labels_do_not_depend_on_chunking(fusion: str) -> None:
    spec = tiny_spec(fusion, window_segments=16, context_segments=8)
    # A trained-like head: perturb the seeded state so the test does not rely on init symmetries.
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in build_head(spec).state_dict().items()}
    runner = HeadRunner(spec, state, threads=1)
    runner.setup()
    n = 150
    feats = video_features(n)
    whole = runner.label(*feats, first_segment=0, core_start=0, core_end=n, is_last=True, return_embedding=True)
    assert whole.probs.shape == (n, N_LABELS) and whole.probs.dtype == np.float32
    assert whole.embedding is not None and whole.embedding.shape == (n, 2 * spec.lstm_hidden)
    np.testing.assert_allclose(whole.probs.sum(1), 1.0, rtol=1e-5)
    assert len(set(whole.probs.argmax(1).tolist())) > 1  # labels are not trivially constant
    for core in (16, 32, 48):
        cut = label_in_chunks(runner, feats, core, spec.context_segments, embedding=True)
        np.testing.assert_array_equal(cut.probs.argmax(1), whole.probs.argmax(1))
        np.testing.assert_allclose(cut.probs, whole.probs, rtol=0, atol=1e-5)
        assert cut.embedding is not None
        np.testing.assert_allclose(cut.embedding, whole.embedding, rtol=0, atol=1e-5)
    # More chunk context than the head needs changes nothing either.
    wide = label_in_chunks(runner, feats, 32, spec.context_segments + 5)
    np.testing.assert_allclose(wide.probs, whole.probs, rtol=0, atol=1e-5)


def test_context_is_used_so_the_window_contract_matters() -> None:
    """A segment's probabilities depend on its context, so labelling without it would be chunk-dependent."""
    spec = tiny_spec("concat", window_segments=4, context_segments=4)
    image, audio, grid = video_features(40)
    runner = HeadRunner(spec, None)
    base = runner.label(image, audio, grid, first_segment=0, core_start=0, core_end=40, is_last=True)
    image2 = image.copy()
    image2[22] += 5.0  # inside the right context of window [16, 20)
    changed = runner.label(image2, audio, grid, first_segment=0, core_start=0, core_end=40, is_last=True)
    assert not np.allclose(base.probs[16:20], changed.probs[16:20])
    # ... and not beyond the context: window [4, 8) sees segments [0, 12) only.
    np.testing.assert_allclose(base.probs[:8], changed.probs[:8], rtol=0, atol=1e-6)


def test_runner_rejects_missing_context_and_wrong_dims() -> None:
    spec = tiny_spec("concat", window_segments=16, context_segments=8)
    runner = HeadRunner(spec, None)
    image, audio, grid = video_features(64)
    with pytest.raises(ValueError, match="missing left context"):
        runner.label(image[28:], audio[28:], None, first_segment=28, core_start=32, core_end=64, is_last=True)
    with pytest.raises(ValueError, match="not a multiple"):
        runner.label(image, audio, None, first_segment=0, core_start=8, core_end=64, is_last=True)
    with pytest.raises(ConfigError, match="image features of dim"):
        runner.label(image[:, :5], audio, None, first_segment=0, core_start=0, core_end=64, is_last=True)
    with pytest.raises(ConfigError, match="audio features of dim"):
        runner.label(image, audio[:, :5], None, first_segment=0, core_start=0, core_end=64, is_last=True)
    with pytest.raises(ConfigError, match="task"):
        HeadRunner(spec, None, task="multilabel")  # type: ignore[arg-type]
    empty = runner.label(image, audio, None, first_segment=0, core_start=16, core_end=16, is_last=False)
    assert empty.probs.shape == (0, N_LABELS) and empty.embedding is None


def test_runner_seeded_state_equals_explicit_state_and_keeps_rng() -> None:
    spec = tiny_spec("weighted")
    image, audio, grid = video_features(20)
    torch.manual_seed(5)
    expected_draw = torch.rand(2)
    torch.manual_seed(5)
    a = HeadRunner(spec, None).label(image, audio, grid, first_segment=0, core_start=0, core_end=20, is_last=True)
    torch.testing.assert_close(torch.rand(2), expected_draw)
    b = HeadRunner(spec, build_head(spec).state_dict()).label(image, audio, grid, first_segment=0, core_start=0,
                                                               core_end=20, is_last=True)
    np.testing.assert_array_equal(a.probs, b.probs)


# ---------------------------------------------------------------- topk


def test_topk_orders_and_breaks_ties_by_lower_index() -> None:
    probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25], [0.0, 0.2, 0.7, 0.1]], np.float32)
    idx, scores = topk(probs, 3)
    assert idx.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, [[1, 3, 0], [0, 1, 2], [2, 1, 3]])
    np.testing.assert_array_equal(scores, np.array([[0.4, 0.4, 0.1], [0.25, 0.25, 0.25], [0.7, 0.2, 0.1]], np.float32))
    idx, scores = topk(probs, 10)  # capped at the number of labels
    assert idx.shape == scores.shape == (3, 4)
    idx, _ = topk(np.zeros((0, 4), np.float32), 2)
    assert idx.shape == (0, 2)
    with pytest.raises(ValueError):
        topk(probs, 0)
    with pytest.raises(ValueError):
        topk(probs[0], 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_matches_cpu_and_fp32_is_chunk_invariant(fusion: str) -> None:
    spec = tiny_spec(fusion)
    feats = video_features(150)
    cpu = HeadRunner(spec, None).label(*feats, first_segment=0, core_start=0, core_end=150, is_last=True)
    for precision, atol in (("bf16", 1e-2), ("fp32", 1e-4)):
        runner = HeadRunner(spec, None, device="cuda", precision=precision)  # type: ignore[arg-type]
        whole = runner.label(*feats, first_segment=0, core_start=0, core_end=150, is_last=True)
        np.testing.assert_allclose(whole.probs, cpu.probs, rtol=0, atol=atol)
        if precision == "fp32":
            for core in (16, 32, 48):
                cut = label_in_chunks(runner, feats, core, spec.context_segments)
                np.testing.assert_array_equal(cut.probs.argmax(1), whole.probs.argmax(1))
                np.testing.assert_allclose(cut.probs, whole.probs, rtol=0, atol=1e-5)
