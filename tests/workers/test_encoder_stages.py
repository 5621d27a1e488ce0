"""The encoder stages on real decoded chunks: reusing the chunks' overlap changes no number."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jobs.models import resolve_bundle
from pipeline.decode import VideoDecoder
from pipeline.image_encoder import IMAGE_ENCODER_DIMS
from pipeline.media import ChunkingSpec
from workers.encoder_stages import AudioEncoderStage, ImageEncoderStage
from workers.rows import Row, chunk_row, keys_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle():
    return resolve_bundle(None, allow_untrained=False)


@pytest.fixture(scope="module")
def chunk_rows(shared_media, bundle) -> dict[str, list[Row]]:
    """Three real clips (one without sound) in chunks of 8 segments with 4 context segments each side.  Frames
    at 112 px, not the bundle's 224: what is reused does not depend on the size, and bf16, emulated on a CPU
    without native bf16, took 141 s for one test at 224 (AMD EPYC, 2026-12-02)."""
    chunking = ChunkingSpec(core_segments=8, context_segments=4)
    sampling = dataclasses.replace(bundle.sampling, image_size=112)
    out = {}
    for name in ("bbb_5s_51.mp4", "bikes_noaudio.mp4", "bbb_clip_720p.mp4"):
        chunks = VideoDecoder(sampling, chunking, threads=2).chunks(str(shared_media / name), video_id=name)
        out[name] = [chunk_row(c) for c in chunks]
    return out


def _stages(bundle, precision: str) -> tuple[ImageEncoderStage, AudioEncoderStage]:
    image = ImageEncoderStage(bundle.image, threads=1, precision=precision)
    audio = AudioEncoderStage(bundle.audio, sample_rate_hz=bundle.sampling.audio_rate_hz, state_dict=bundle.audio_state(),
                              threads=1, image_dim=IMAGE_ENCODER_DIMS[bundle.image.name], precision=precision)
    image.setup()
    audio.setup()
    return image, audio


def _no_reuse(*stages) -> None:
    """Make set-up stages encode every segment, as on CUDA (a fresh encoder each time)."""
    for stage in stages:
        stage._overlap.enabled = False


def _encode(stages, row: Row) -> Row:
    """One chunk row through both stages, as ``Stage.process_batch`` hands it on (key columns kept)."""
    image, audio = stages
    between = keys_of(row) | image.process_rows([row])[0]
    return between | audio.process_rows([between])[0]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_overlap_reuse_gives_the_embeddings_of_a_fresh_encoder(bundle, chunk_rows, precision):
    """Chunks of three videos, interleaved, through one pair of stages (which reuses the overlaps) and each
    through a fresh pair (which encodes every segment): the same embeddings, bit for bit."""
    torch.set_num_threads(1)
    reusing = _stages(bundle, precision)
    fresh = _stages(bundle, precision)
    videos = list(chunk_rows.values())
    order = [row for i in range(max(map(len, videos))) for rows in videos for row in rows[i : i + 1]]
    assert len({r["video_id"] for r in order[:3]}) == 3  # interleaved, as several decode workers feed one model worker
    segments = 0
    for row in order:
        got = _encode(reusing, row)
        _no_reuse(*fresh)  # a fresh encoder: nothing to reuse
        want = _encode(fresh, row)
        for col in ("image_emb", "audio_emb"):
            assert got[col].shape == want[col].shape == (len(row["start_s"]), want[col].shape[1])
            assert np.array_equal(got[col], want[col]), (row["video_id"], row["chunk_index"], col)
        segments += len(row["start_s"])
    image, audio = reusing
    assert image._overlap is not None and audio._overlap is not None
    # every segment that two consecutive chunks of a video share was encoded once
    def span(r: Row) -> set[int]:
        return set(range(int(r["first_segment"]), int(r["first_segment"]) + len(r["start_s"])))

    expected = sum(len(span(a) & span(b)) for rows in videos for a, b in zip(rows, rows[1:], strict=False))
    assert expected >= 8 * 5
    assert image._overlap.reused == audio._overlap.reused == expected
    assert not image._overlap._kept and not audio._overlap._kept  # every video ended: nothing held


def test_overlap_is_not_reused_across_different_videos_or_out_of_order(bundle, chunk_rows):
    torch.set_num_threads(1)
    image, _ = _stages(bundle, "bf16")
    rows = chunk_rows["bbb_clip_720p.mp4"]
    image.process_rows([rows[3]])
    other = dict(rows[4], video_id="another video")  # same segments, another video: nothing reused
    image.process_rows([other])
    assert image._overlap is not None and image._overlap.reused == 0
    image.process_rows([rows[1]])  # an earlier chunk after a later one: segments 4..20 vs 24..40: no overlap
    assert image._overlap.reused == 0
    image.process_rows([rows[2]])  # the chunk right after rows[1]: its first 8 rows are known
    assert image._overlap.reused == 8


def test_several_chunks_of_one_video_in_one_batch(bundle, chunk_rows):
    """A batch may hold consecutive chunks of a video (larger batches): each is merged with what was kept
    before the batch, and the result is still the fresh encoder's."""
    torch.set_num_threads(1)
    reusing, _ = _stages(bundle, "bf16")
    fresh, _ = _stages(bundle, "bf16")
    _no_reuse(fresh)
    rows = chunk_rows["bbb_clip_720p.mp4"]
    reusing.process_rows([rows[1]])  # keeps segments 12..20
    batch = [rows[2], rows[3], rows[1]]  # a retried video yields its chunks again, from the first
    got = reusing.process_rows(batch)
    want = fresh.process_rows(batch)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g["image_emb"], w["image_emb"])
    assert reusing._overlap is not None and reusing._overlap.reused == 8 + 8  # rows[2] and rows[1] each reuse 12..20


def test_overlap_is_not_reused_where_the_input_changed(bundle, chunk_rows):
    """A chunk may go out before its right context's audio has arrived (audio lagging the video in the
    file); the next chunk then has that audio, and its embeddings must be computed from it."""
    torch.set_num_threads(1)
    image, audio = _stages(bundle, "bf16")
    fresh = _stages(bundle, "bf16")
    rows = chunk_rows["bbb_clip_720p.mp4"]
    early = dict(rows[1])
    early["audio"] = np.array(early["audio"], copy=True)
    early["audio_valid_samples"] = np.array(early["audio_valid_samples"], copy=True)
    early["audio"][-4:] = 0.0  # its right context (4 segments) without audio yet
    early["audio_valid_samples"][-4:] = 0
    _encode((image, audio), early)
    got = _encode((image, audio), rows[2])
    _no_reuse(*fresh)
    want = _encode(fresh, rows[2])
    assert np.array_equal(got["audio_emb"], want["audio_emb"])
    assert np.array_equal(got["image_emb"], want["image_emb"])
    assert audio._overlap is not None and image._overlap is not None
    assert audio._overlap.reused == 4 and image._overlap.reused == 8  # the frames were the same all along
