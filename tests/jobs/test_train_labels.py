"""``vidpipe train``'s label set and segment counts: ``background`` only where segments need it, and the
reported counts are the segments training and validation score.

Four short real clips (PyAV), features extracted once on a real local Ray into a shared cache, one-epoch
trainings: the checks are about labels and counts, not about what the head learns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.annotations import read_annotations
from jobs.evaluate import score
from jobs.features import FeatureSpec, extract_features
from jobs.train import TrainSpec, train
from pipeline.bundle import ModelBundle
from tests.media_factory import make_video

pytestmark = pytest.mark.slow

SECONDS = 6  # 6 one-second segments a clip
NAMES = ("a.mp4", "b.mp4", "c.mp4", "d.mp4")
TINY = dict(image_encoder="resnet18", image_weights="none", image_size=32, window_segments=4, context_segments=2,
            epochs=1, patience=1, proj_dim=8, lstm_hidden=8, val_fraction=0.25)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ray_session) -> tuple[Path, Path]:
    """``(videos folder, feature cache)``; the cache is filled by the first training that runs."""
    root = tmp_path_factory.mktemp("label_clips")
    videos = root / "videos"
    videos.mkdir()
    for i, name in enumerate(NAMES):
        make_video(videos / name, duration_s=SECONDS, fps=5, size=(48, 48), audio="tone", tone_hz=300.0 + 100 * i,
                   seed=i)
    return videos, root / "cache"


def _annotations(path: Path, rows: list[str]) -> Path:
    path.write_text("video,start_s,end_s,label\n" + "\n".join(rows) + "\n")
    return path


def _train(ann: Path, clips: tuple[Path, Path], out: Path, **kw: object) -> tuple[ModelBundle, list[str], dict]:
    videos, cache = clips
    lines: list[str] = []
    spec = TrainSpec(annotations=str(ann), videos=str(videos), out=str(out), cache=str(cache),
                     **{**TINY, **kw})  # type: ignore[arg-type]
    result = train(spec, say=lines.append)
    meta = json.loads((result.path / "bundle.json").read_text())["meta"]
    return ModelBundle.load(result.path), lines, meta


def _every_segment_annotated(path: Path) -> Path:
    """Each whole clip is ``clip``; its halves are ``red`` / ``blue`` (overlapping labels: multilabel)."""
    rows = []
    for i, name in enumerate(NAMES):
        first, second = ("red", "blue") if i % 2 else ("blue", "red")
        rows += [f"{name},0,{SECONDS},clip", f"{name},0,{SECONDS // 2},{first}",
                 f"{name},{SECONDS // 2},{SECONDS},{second}"]
    return _annotations(path, rows)


def test_multilabel_annotations_covering_every_segment_get_no_background_label(clips, tmp_path):
    bundle, lines, meta = _train(_every_segment_annotated(tmp_path / "ml.csv"), clips, tmp_path / "ml",
                                 task="multilabel")
    assert bundle.labels == ["blue", "clip", "red"]
    assert len(bundle.head.thresholds) == 3
    assert "every segment of the annotated videos is annotated: no 'background' label; labels blue, clip, red" in lines
    # said before the videos' lengths are known: no promise the next line takes back
    assert lines[0].endswith("3 labels (blue, clip, red) and 'background' for the segments no annotation covers "
                             "(if there are any), task multilabel")
    assert set(meta["label_counts_train"]) == {"blue", "clip", "red"}
    assert meta["label_counts_train"]["clip"] == meta["train_segments"] == 3 * SECONDS

    # eval's default (--unlabeled background) takes such a bundle: an uncovered segment has no label active
    videos, cache = clips
    test = _annotations(tmp_path / "test.csv", [f"a.mp4,0,{SECONDS // 2},red", f"b.mp4,0,{SECONDS},clip"])
    ann = read_annotations(test, videos, task="multilabel", labels=bundle.labels)
    feats = extract_features([(v.uri, v.video_id) for v in ann.videos],
                             FeatureSpec(sampling=bundle.sampling, image=bundle.image, audio=bundle.audio), cache,
                             say=lambda _: None).features
    metrics = score(bundle, ann, feats)
    assert metrics.n_segments == 2 * SECONDS  # every segment scored, the uncovered half of a.mp4 included
    assert metrics.per_class["red"].support == SECONDS // 2 and metrics.per_class["clip"].support == SECONDS


def test_multilabel_annotations_with_uncovered_segments_keep_background(clips, tmp_path):
    rows = [f"{name},0,{SECONDS - 2},{'x' if i % 2 else 'y'}" for i, name in enumerate(NAMES)]
    rows.append("b.mp4,60,62,x")  # line 6: past the 6-s clip's end (minutes given as seconds?): labels nothing
    ann = _annotations(tmp_path / "ml.csv", rows)
    bundle, lines, meta = _train(ann, clips, tmp_path / "ml", task="multilabel")
    assert (f"warning: annotations {ann}: 1 span starts after the video's end and labels no segment: line 6: 60-62 s "
            f"'x', the video ends at {SECONDS:.1f} s; check the times (seconds) and the video paths") in lines
    assert bundle.labels == ["x", "y", "background"]
    assert meta["label_counts_train"]["background"] == 3 * 2  # the last 2 s of the 3 training clips
    assert not any("background" in line and "warning" in line for line in lines)


def test_multiclass_background_without_training_segments_is_warned_about(clips, tmp_path):
    rows = [f"{name},0,{SECONDS},{'x' if i % 2 else 'y'}" for i, name in enumerate(NAMES)]
    bundle, lines, meta = _train(_annotations(tmp_path / "mc.csv", rows), clips, tmp_path / "mc")
    # multiclass keeps it: scoring a segment no annotation covers (eval's default) needs a class for it
    assert bundle.labels == ["x", "y", "background"] and meta["label_counts_train"]["background"] == 0
    assert ("warning: the label 'background' (for segments no annotation covers) has 0 training segments: every "
            "segment of the training videos is annotated, so the model cannot learn it; pass --unlabeled ignore "
            "to train without it") in lines


def test_labels_that_differ_only_in_case_or_spacing_are_warned_about(clips, tmp_path):
    """'Red Tone' and ' red  tone' became two labels without a word (found by a helper)."""
    rows = [f"{name},0,{SECONDS},{('Red Tone', 'red  tone', 'y', 'y')[i]}" for i, name in enumerate(NAMES)]
    bundle, lines, _ = _train(_annotations(tmp_path / "case.csv", rows), clips, tmp_path / "case",
                              unlabeled="ignore")
    assert bundle.labels == ["Red Tone", "red  tone", "y"]  # still two labels: the file is the user's to mend
    assert ("warning: labels 'Red Tone', 'red  tone' differ only in case or spacing and are trained as different "
            "labels; write them alike in the annotations if they mean the same") in lines
    assert sum("differ only" in line for line in lines) == 1
    # the background label that segments no annotation covers get, against one the file names
    rows[-1] = f"{NAMES[-1]},0,{SECONDS - 2},Background"
    bundle, lines, _ = _train(_annotations(tmp_path / "bg.csv", rows), clips, tmp_path / "bg")
    assert "background" in bundle.labels and "Background" in bundle.labels
    assert any(line.startswith("warning: labels 'Background', 'background' differ only") for line in lines), lines


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_unlabeled_ignore_counts_only_the_labelled_segments(clips, tmp_path, task):
    # the last 2 of each clip's 6 segments are covered by no annotation
    rows = [f"{name},0,{SECONDS - 2},{'x' if i % 2 else 'y'}" for i, name in enumerate(NAMES)]
    ann = _annotations(tmp_path / "part.csv", rows)
    bundle, lines, meta = _train(ann, clips, tmp_path / "ignore", task=task, unlabeled="ignore")
    assert bundle.labels == ["x", "y"]
    labelled = SECONDS - 2
    assert (meta["train_videos"], meta["val_videos"]) == (3, 1)
    assert (meta["train_segments"], meta["val_segments"]) == (3 * labelled, labelled)
    assert meta["unlabeled_segments_left_out"] == {"train": 3 * 2, "val": 2}
    assert sum(meta["label_counts_train"].values()) == meta["train_segments"]
    assert any(f"3 train videos ({3 * labelled} segments, 6 unlabelled left out), 1 validation video "
               f"({labelled} segments, 2 unlabelled left out)" in line for line in lines), lines

    # with background, every segment is a training segment
    _, lines, meta = _train(ann, clips, tmp_path / "background", task=task)
    assert (meta["train_segments"], meta["val_segments"]) == (3 * SECONDS, SECONDS)
    assert meta["unlabeled_segments_left_out"] == {"train": 0, "val": 0}
    assert any(f"3 train videos ({3 * SECONDS} segments), 1 validation video ({SECONDS} segments)" in line
               for line in lines), lines


def test_a_video_that_fails_to_decode_is_left_out_and_named_in_the_bundle(clips, tmp_path):
    """The bundle's meta did not say which annotated videos were left out (a helper): it names them, kind and
    message, beside its counts."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    ann = _annotations(tmp_path / "with_broken.csv", [f"{n},0,{SECONDS // 2},x" for n in NAMES] + [f"{broken},0,1,x"])
    _, lines, meta = _train(ann, clips, tmp_path / "m")
    assert "warning: 1 annotated video could not be decoded and is left out" in lines
    assert meta["videos_failed"] == 1 and len(meta["failed_videos"]) == 1
    (failed,) = meta["failed_videos"]
    assert failed["uri"].endswith("broken.mp4") and failed["error_kind"] == "invalid_data" and failed["message"]
