"""The corpus builder's composing and writing, on small made-up sources (fetching needs the registries)."""

from __future__ import annotations

import hashlib

import av
import numpy as np

from jobs.annotations import read_annotations, segment_targets
from jobs.corpus import (
    FPS,
    HEIGHT,
    LABELS,
    RATE_HZ,
    VIDEO_SECONDS,
    WIDTH,
    Sources,
    _yuv420p,
    compose,
    write_video,
)


def _sources() -> Sources:
    rng = np.random.default_rng(0)

    def sounds(n: int, seconds: float) -> list[np.ndarray]:
        return [rng.uniform(-0.5, 0.5, int(seconds * RATE_HZ)).astype(np.float32) for _ in range(n)]

    def pictures(n: int) -> list[np.ndarray]:
        # smooth pictures (a colour plus a horizontal ramp), which a lossy coder keeps close
        ramp = np.linspace(0, 60, WIDTH)[None, :, None]
        return [np.broadcast_to(np.clip(rng.integers(0, 190, 3) + ramp, 0, 255), (30, HEIGHT, WIDTH, 3))
                .astype(np.uint8) for _ in range(n)]

    return Sources(speech={"train": sounds(5, 1.0), "test": sounds(2, 1.0)},
                   music={"train": sounds(2, 30.0), "test": sounds(1, 10.0)},
                   animal={"train": sounds(3, 0.7), "test": sounds(1, 2.0)},
                   pictures={"train": pictures(2), "test": pictures(1)})


def test_compose_is_seeded_and_events_do_not_overlap():
    src = _sources()
    frames, audio, events = compose("train", src, np.random.default_rng([0, 0]))
    again = compose("train", src, np.random.default_rng([0, 0]))
    assert np.array_equal(frames, again[0]) and np.array_equal(audio, again[1]) and events == again[2]
    assert frames.shape == (int(VIDEO_SECONDS * FPS), HEIGHT, WIDTH, 3)
    assert audio.shape == (int(VIDEO_SECONDS * RATE_HZ),) and np.abs(audio).max() <= 1.0
    assert events and {label for *_, label in events} <= set(LABELS)
    for (a0, a1, _), (b0, _, _) in zip(events, events[1:], strict=False):
        assert a0 < a1 <= b0  # gaps between events: multiclass annotations never overlap
    assert events[-1][1] <= VIDEO_SECONDS and all(b - a >= 0.99 for a, b, _ in events)


def test_written_video_is_bit_identical_and_annotations_read_back(tmp_path):
    src = _sources()
    frames, audio, events = compose("test", src, np.random.default_rng([0, 1]))
    digests = []
    for name in ("a.mp4", "b.mp4"):
        write_video(tmp_path / name, frames, audio)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with av.open(str(tmp_path / "a.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4" and c.streams.audio[0].rate == RATE_HZ
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    # lossy, but the picture is the one composed
    assert np.abs(first.astype(int) - frames[0].astype(int)).mean() < 6
    (tmp_path / "ann.csv").write_text("video,start_s,end_s,label\n" +
                                      "".join(f"a.mp4,{a:.3f},{b:.3f},{label}\n" for a, b, label in events))
    ann = read_annotations(tmp_path / "ann.csv", tmp_path)
    start = np.arange(int(VIDEO_SECONDS), dtype=np.float64)
    target = segment_targets(ann.videos[0], start, start + 1, ann.labels, task="multiclass", unlabeled="background")
    assert len(target) == VIDEO_SECONDS and (target >= 0).all()


def test_yuv_conversion_of_primaries():
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :2] = (255, 255, 255)
    planes = _yuv420p(rgb)
    assert planes.shape == (3, 4)
    assert planes[:2, :2].tolist() == [[235, 235], [235, 235]] and planes[:2, 2:].tolist() == [[16, 16], [16, 16]]
    assert planes[2].tolist() == [128, 128, 128, 128]  # U then V of the two 2x2 blocks: grey has no colour
