"""vidpipe train / eval end to end on small generated corpora, on a real local Ray.

Three corpora of short real videos (H.264 + AAC written by PyAV) whose per-segment label depends on
the audio only (tone / noise / silence), on the picture only (red / blue frames), or on both (XOR of
colour and sound).  The trained head must label held-out videos far above chance, and ``--ablate``
must show the dependence: zeroing the decisive modality drops accuracy to about chance.

The held-out sets are balanced so that a head that ignores the decisive modality scores chance whatever it
learned: each drawn video comes with the variants that change the decisive modality's classes and keep the
other's (and the XOR task's with either flipped).  With random held-out videos, 13 of the XOR task's 18 halves
could be labelled from colour alone, and whether the audio-ablated head happened to do so hung on the CPU's
last float bits (0.72 on an AMD EPYC, under 0.7 on a Xeon with AMX).
"""

from __future__ import annotations

import dataclasses
import json
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.annotations import read_annotations
from jobs.cli import main
from jobs.evaluate import evaluate, score
from jobs.features import FeatureCache, FeatureSpec, extract_features
from jobs.train import TrainSpec, train
from pipeline.bundle import ModelBundle
from pipeline.media import SamplingSpec
from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec

pytestmark = pytest.mark.slow

RATE = 16_000
SECONDS = 8  # two 4 s halves with independent labels
FPS = 5
SIZE = 48
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
SOUNDS = ("tone", "noise", "silence")
N_TRAIN = 24
N_TEST_DRAWN = {"audio": 3, "visual": 5, "both": 3}  # each with its variants: 9, 10, 12 videos


def _sound(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * RATE)
    if kind == "tone":
        t = np.arange(n) / RATE
        return (0.4 * np.sin(2 * np.pi * rng.uniform(300, 900) * t)).astype(np.float32)
    if kind == "noise":
        return rng.uniform(-0.3, 0.3, n).astype(np.float32)
    return np.zeros(n, np.float32)


def write_clip(path: Path, colours: list[tuple[int, int, int]], audio: np.ndarray) -> None:
    """A real H.264 + AAC file: one solid (slightly noisy) colour per second, the given 16 kHz mono audio."""
    rng = np.random.default_rng(len(str(path)))
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18"})
        v.width = v.height = SIZE
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=RATE)
        a.layout = "mono"
        for i in range(len(colours) * FPS):
            img = np.empty((SIZE, SIZE, 3), np.uint8)
            img[:] = colours[i // FPS]
            img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        for off in range(0, len(audio), 1024):
            frame = av.AudioFrame.from_ndarray(audio[None, off: off + 1024], format="fltp", layout="mono")
            frame.sample_rate = RATE
            frame.pts = off
            frame.time_base = Fraction(1, RATE)
            c.mux(a.encode(frame))
        c.mux(a.encode(None))


def _label(kind: str, colour: str, sound: str) -> str:
    if kind == "audio":
        return sound
    if kind == "visual":
        return colour
    return "same" if (colour == "red") == (sound == "tone") else "different"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``root/videos`` with every clip, and per task kind a train and a test annotation CSV."""
    root = tmp_path_factory.mktemp("corpus")
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(7)
    test_rng = np.random.default_rng(8)
    files = {}
    for kind in ("audio", "visual", "both"):
        sounds = _sounds(kind)
        for split in ("train", "test"):
            draw = rng if split == "train" else test_rng
            halves = [[(str(draw.choice(list(COLOURS))), str(draw.choice(sounds))) for _ in range(2)]
                      for _ in range(N_TRAIN if split == "train" else N_TEST_DRAWN[kind])]
            if split == "test":
                halves = [variant for drawn in halves for variant in _variants(kind, drawn)]
            lines = ["video,start_s,end_s,label,comment"]
            for i, video in enumerate(halves):
                name = f"{kind}_{split}_{i:02d}.mp4"
                colours, audio = [], []
                for half, (colour, sound) in enumerate(video):
                    colours += [COLOURS[colour]] * (SECONDS // 2)
                    audio.append(_sound(sound, SECONDS / 2, draw))
                    lines.append(f"{name},{half * SECONDS // 2},{(half + 1) * SECONDS // 2},"
                                 f"{_label(kind, colour, sound)},x")
                write_clip(videos / name, colours, np.concatenate(audio))
            path = root / f"{kind}_{split}.csv"
            path.write_text("\n".join(lines) + "\n")
            files[(kind, split)] = path
    return root, videos, files


def _sounds(kind: str) -> tuple[str, ...]:
    """The sounds a task's videos draw from: the XOR task only uses tone/noise so that the label is balanced."""
    return SOUNDS if kind != "both" else ("tone", "noise")


def _variants(kind: str, drawn: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A held-out video's variants: given the ablated modality's classes in both halves, the labels are spread
    evenly, so any labelling from the other modality alone is right for exactly 1 in (number of classes)."""
    def flip_colour(c: str) -> str:
        return "blue" if c == "red" else "red"

    def next_sound(s: str) -> str:
        ring = _sounds(kind)
        return ring[(ring.index(s) + 1) % len(ring)]

    if kind == "audio":  # sounds turned round: 3 variants
        return [drawn, [(c, next_sound(s)) for c, s in drawn],
                [(c, next_sound(next_sound(s))) for c, s in drawn]]
    if kind == "visual":
        return [drawn, [(flip_colour(c), s) for c, s in drawn]]
    # XOR: flipping either modality flips the label, flipping both keeps it
    return [drawn, [(flip_colour(c), s) for c, s in drawn], [(c, next_sound(s)) for c, s in drawn],
            [(flip_colour(c), next_sound(s)) for c, s in drawn]]


# classic audio (the default bundle's): the audio CNN took 65-80 ms per segment on a core of this VM (beside other
# tests), and ~11x that in the bf16 passes where bf16 is emulated; test_cli_train_eval_and_run_with_the_bundle
# trains with the CNN
SMALL = dict(image_encoder="resnet18", image_weights="none", image_size=32, audio_encoder="classic", window_segments=4,
             context_segments=2, epochs=40, patience=10, proj_dim=32, lstm_hidden=32, val_fraction=0.25)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory, ray_session):
    """A bundle per task kind, trained with one feature cache.  The three trainings' features are extracted
    first in two passes (float32 of every training video, bf16 of the validation videos the bf16 floor and
    check use) instead of six (each pass starts its encoder actors: ~5 s here); train reads them all from the
    cache (that train fills its cache itself: test_cli_train_eval_and_run_with_the_bundle)."""
    from jobs.train import split_videos

    root, videos, files = corpus
    cache = tmp_path_factory.mktemp("cache")
    kinds = ("audio", "visual", "both")
    specs = {kind: TrainSpec(annotations=str(files[(kind, "train")]), videos=str(videos),
                             out=str(tmp_path_factory.mktemp("bundles") / kind), cache=str(cache),
                             **SMALL)  # type: ignore[arg-type]
             for kind in kinds}
    spec = specs["audio"]
    fspec = FeatureSpec(sampling=spec.sampling(), image=spec.image_spec(), audio=spec.audio_spec())
    every, held_out = [], []
    for kind in kinds:
        ann = read_annotations(files[(kind, "train")], videos)
        _, val = split_videos(ann.videos, ann, SMALL["val_fraction"], spec.seed)
        every += [(v.uri, v.video_id) for v in ann.videos]
        held_out += [(v.uri, v.video_id) for v in val]
    for videos_, fs in ((every, fspec), (held_out, dataclasses.replace(fspec, precision="bf16"))):
        assert not extract_features(videos_, fs, cache, say=lambda _: None).failures
    results = {}
    for kind in kinds:
        lines: list[str] = []
        results[kind] = (train(specs[kind], say=lines.append), lines)
        assert not any(line.startswith("extracting features") for line in lines), lines  # all read from the cache
    return results, cache


CHANCE = {"audio": 1 / 3, "visual": 1 / 2, "both": 1 / 2}


@pytest.mark.parametrize("kind", ["audio", "visual", "both"])
def test_trained_head_beats_chance_and_needs_the_decisive_modality(kind, trained, corpus, ray_session):
    root, videos, files = corpus
    results, cache = trained
    result, _ = results[kind]
    bundle = ModelBundle.load(result.path)
    assert bundle.trained and bundle.model_id == result.bundle.model_id and bundle.model_id != "untrained"
    test = str(files[(kind, "test")])
    full = evaluate(bundle, test, str(videos), cache=str(cache), say=lambda _: None).metrics
    no_audio = evaluate(bundle, test, str(videos), cache=str(cache), ablate="audio", say=lambda _: None).metrics
    no_visual = evaluate(bundle, test, str(videos), cache=str(cache), ablate="visual", say=lambda _: None).metrics
    chance = CHANCE[kind]
    assert full.accuracy >= 0.9, (kind, full.accuracy)
    assert full.macro_f1 >= 0.85
    if kind == "audio":
        assert no_audio.accuracy < chance + 0.2 and no_visual.accuracy >= 0.85
    elif kind == "visual":
        assert no_visual.accuracy < chance + 0.2 and no_audio.accuracy >= 0.85
    else:
        assert no_audio.accuracy < chance + 0.2 and no_visual.accuracy < chance + 0.2


def test_bundle_round_trip_gives_identical_outputs(trained, corpus, tmp_path):
    root, videos, files = corpus
    results, cache = trained
    result, _ = results["both"]
    loaded = ModelBundle.load(result.path)
    again = ModelBundle.load(loaded.save(tmp_path / "copy"))
    assert again.model_id == loaded.model_id == result.bundle.model_id
    ann = read_annotations(files[("both", "test")], videos)
    spec = FeatureSpec(sampling=loaded.sampling, image=loaded.image, audio=loaded.audio)
    feats = extract_features([(v.uri, v.video_id) for v in ann.videos], spec, cache, say=lambda _: None).features
    a = score(result.bundle, ann, feats)
    b = score(again, ann, feats)
    assert a.to_dict() == b.to_dict()
    meta = loaded.meta
    assert meta["source"] == "vidpipe train" and meta["train_videos"] + meta["val_videos"] == N_TRAIN
    assert 0 < meta["best_epoch"] <= meta["epochs_run"] and "val_macro_f1" in meta


def test_second_train_hits_the_feature_cache_and_is_deterministic(trained, corpus, tmp_path):
    root, videos, files = corpus
    results, cache = trained
    first, _ = results["audio"]
    spec = TrainSpec(annotations=str(files[("audio", "train")]), videos=str(videos), out=str(tmp_path / "b"),
                     cache=str(cache), **SMALL)  # type: ignore[arg-type]
    lines: list[str] = []
    again = train(spec, say=lines.append)
    assert again.feature_cache_hits == N_TRAIN
    assert any(line.startswith(f"feature cache hit: {N_TRAIN} of {N_TRAIN} videos") for line in lines)
    assert not any(line.startswith("extracting features") for line in lines)
    # same seed, same data, CPU: the same weights, so the same content-hashed model id
    assert again.bundle.model_id == first.bundle.model_id


def test_a_training_that_diverges_writes_no_bundle(trained, corpus, tmp_path, monkeypatch):
    """--lr 1e30 trained to NaN losses and saved the NaN weights, exit 0 (found by a helper; --lr is now at most
    1). Whatever makes a training loss stop being a number, nothing is saved and the message says what to do."""
    from jobs import train as train_mod
    from pipeline.errors import ConfigError

    root, videos, files = corpus
    _, cache = trained
    monkeypatch.setattr(train_mod._Trainer, "epoch", lambda self: float("nan"))
    spec = TrainSpec(annotations=str(files[("audio", "train")]), videos=str(videos), out=str(tmp_path / "b"),
                     cache=str(cache), **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^training diverged in epoch 1 \(training loss nan\): no bundle is written; "
                                          r"train again with a smaller --lr \(it was 0\.\d+; the default is 2e-3\)$"):
        train(spec, say=lambda _: None)
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_cli_train_eval_and_run_with_the_bundle(corpus, trained, tmp_path, capsys):
    root, videos, files = corpus
    results, cache = trained
    bundle_dir = tmp_path / "cli_bundle"
    code = main(["train", "--annotations", str(files[("visual", "train")]), "--videos", str(videos), "--out",
                 str(bundle_dir), "--image-encoder", "resnet18", "--image-size", "32", "--window-segments", "4",
                 "--context-segments", "2", "--epochs", "3", "--task", "multilabel", "--fusion", "weighted"])
    assert code == 0
    err = capsys.readouterr().err
    assert "epoch   1/3" in err and "saved model" in err
    # the cache lives in the bundle's work dir
    assert f"extracting features of {N_TRAIN} videos (image resnet18/none, audio cnn, fp32) into {bundle_dir / 'work'}" \
        f"/features/" in err, err
    bundle = ModelBundle.load(bundle_dir)
    assert bundle.head.task == "multilabel" and len(bundle.head.thresholds) == len(bundle.labels)
    # the annotations cover every segment: a multilabel head gets no background label no segment has
    assert bundle.labels == ["blue", "red"]

    # retraining into the same directory keeps (and hits) its feature cache, and keeps a README
    (bundle_dir / "README.md").write_text("my notes")
    code = main(["train", "--annotations", str(files[("visual", "train")]), "--videos", str(videos), "--out",
                 str(bundle_dir), "--image-encoder", "resnet18", "--image-size", "32", "--window-segments", "4",
                 "--context-segments", "2", "--epochs", "1"])
    assert code == 0 and "feature cache hit" in capsys.readouterr().err
    assert ModelBundle.load(bundle_dir).head.task == "multiclass"
    assert (bundle_dir / "README.md").read_text() == "my notes"

    code = main(["eval", "--model", str(results["visual"][0].path), "--annotations", str(files[("visual", "test")]),
                 "--videos", str(videos), "--cache", str(cache), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] >= 0.9 and set(report["per_class"]) == {"background", "blue", "red"}
    assert report["confusion"]["labels"] == ["blue", "red", "background"]
    code = main(["eval", "--model", str(results["visual"][0].path), "--annotations", str(files[("visual", "test")]),
                 "--videos", str(videos), "--cache", str(cache), "--ablate", "visual"])
    out = capsys.readouterr().out
    assert code == 0 and "visual features zeroed" in out and "confusion matrix" in out


def test_multilabel_bundle_writes_active_labels(corpus, trained, tmp_path, ray_session, capsys):
    root, videos, files = corpus
    _, cache = trained
    # overlapping labels: the whole clip is "clip" and each half has its colour
    ann = tmp_path / "ml.csv"
    rows = ["video,start_s,end_s,label"]
    for line in files[("visual", "train")].read_text().splitlines()[1:]:
        name, start, end, label, _ = line.split(",")
        rows.append(f"{name},{start},{end},{label}")
        if start == "0":
            rows.append(f"{name},0,{SECONDS},clip")
    ann.write_text("\n".join(rows) + "\n")
    spec = TrainSpec(annotations=str(ann), videos=str(videos), out=str(tmp_path / "ml"), task="multilabel",
                     cache=str(cache), **{**SMALL, "epochs": 25})  # type: ignore[arg-type]
    result = train(spec, say=lambda _: None)
    assert result.bundle.labels == ["blue", "clip", "red"]  # every segment annotated: no background

    out = tmp_path / "run"
    clip = sorted(videos.glob("visual_test_*.mp4"))[0]
    assert main(["run", str(clip), "--out", str(out), "--model", str(result.path), "--no-progress"]) == 0
    table = pq.read_table(sorted((out / "segments").glob("*.parquet"))[0]).to_pylist()
    assert len(table) == SECONDS
    truth = {int(r.split(",")[1]): r.split(",")[3] for r in files[("visual", "test")].read_text().splitlines()[1:]
             if r.startswith(clip.name)}
    for row in table:
        colour = truth[0 if row["start_s"] < SECONDS // 2 else SECONDS // 2]
        assert set(row["active_labels"]) == {"clip", colour}, row
        assert row["label"] in row["active_labels"] and row["model_id"] == result.bundle.model_id
    # read back as a user does: query, status and a rerun called the file damaged ("its footer names a column
    # vidpipe does not write ('active_labels')"), and 'repair' dropped it, to be written the same again
    from jobs.query import run_query

    queried = run_query(out, "SELECT segment_index, active_labels FROM segments ORDER BY 1").to_pylist()
    assert queried == [{"segment_index": r["segment_index"], "active_labels": r["active_labels"]}
                       for r in sorted(table, key=lambda r: r["segment_index"])]
    assert main(["status", str(out)]) == 0
    assert main(["run", str(clip), "--out", str(out), "--model", str(result.path), "--no-progress"]) == 0
    assert "0 videos ok, 0 failed, 1 skipped" in capsys.readouterr().out


def test_cache_key_depends_on_encoders():
    base = FeatureSpec(sampling=SamplingSpec(), image=ImageEncoderSpec(), audio=AudioEncoderSpec())
    assert base.key == FeatureSpec(sampling=SamplingSpec(), image=ImageEncoderSpec(), audio=AudioEncoderSpec()).key
    others = [FeatureSpec(sampling=SamplingSpec(image_size=112), image=ImageEncoderSpec(), audio=AudioEncoderSpec()),
              FeatureSpec(sampling=SamplingSpec(), image=ImageEncoderSpec(weights="default"), audio=AudioEncoderSpec()),
              FeatureSpec(sampling=SamplingSpec(), image=ImageEncoderSpec(), audio=AudioEncoderSpec(kind="classic")),
              FeatureSpec(sampling=SamplingSpec(), image=ImageEncoderSpec(), audio=AudioEncoderSpec(),
                          audio_weights="abc")]
    assert len({base.key, *(o.key for o in others)}) == 5
    assert FeatureCache("/x", base).dir.name == base.key


def _two_clips(tmp_path: Path, *, seed: int) -> tuple[Path, Path]:
    """Two 4 s clips (red + tone, blue + noise) and annotations giving each one label for its whole length."""
    rng = np.random.default_rng(seed)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, colour, sound in (("a.mp4", "red", "tone"), ("b.mp4", "blue", "noise")):
        write_clip(videos / name, [COLOURS[colour]] * 4, _sound(sound, 4, rng))
    ann = tmp_path / "whole.csv"
    ann.write_text("video,start_s,end_s,label\na.mp4,0,4,bunny\nb.mp4,0,4,bike\n")
    return videos, ann


def test_validation_of_labels_absent_from_training_has_a_finite_loss(tmp_path, ray_session):
    """Two videos, one label each: the by-video split leaves the validation video a label no training segment has."""
    videos, ann = _two_clips(tmp_path, seed=3)
    # and a span too short to label a segment on each (0.2 s of a 1-s segment): only "no training segment has the
    # labels" was said of it (a helper)
    ann.write_text("video,start_s,end_s,label\na.mp4,0,1,bunny\na.mp4,2.1,2.3,tiny\nb.mp4,0,1,bike\n"
                   "b.mp4,2.1,2.3,tiny\n")
    lines: list[str] = []
    spec = TrainSpec(annotations=str(ann), videos=str(videos), out=str(tmp_path / "model"),
                     **{**SMALL, "epochs": 2, "val_fraction": 0.5})  # type: ignore[arg-type]
    result = train(spec, say=lines.append)
    missing = [line for line in lines if line.startswith("warning: no training segment has the labels")]
    assert len(missing) == 1 and "'tiny'" in missing[0], lines
    assert re.search(r"\(their spans on lines [35] are shorter than half a segment, 0\.5 s: a segment takes a label "
                     r"that covers at least half of it\)$", missing[0]), missing
    # background, which no line of the file names, is said as what it is (multilabel training may drop it)
    assert any("3 labels (bike, bunny, tiny) and 'background' for the segments no annotation covers" in line
               for line in lines), lines[:2]
    meta = json.loads((result.path / "bundle.json").read_text(), parse_constant=_not_json)["meta"]
    assert meta["train_videos"] == meta["val_videos"] == 1 and meta["val_segments"] == 4
    losses = [h["val_loss"] for h in meta["history"]] + [meta["val_loss"]]
    assert all(np.isfinite(loss) and loss > 0 for loss in losses), losses
    assert ModelBundle.load(result.path).model_id == result.bundle.model_id


def _not_json(constant: str) -> None:
    raise AssertionError(f"the bundle's meta holds {constant}, which is not JSON")


def test_a_bundle_knows_the_content_of_its_image_weights_file(tmp_path, ray_session, monkeypatch):
    """--image-weights file:W lives outside the bundle. Changed in place, it gave other labels under the same
    model_id, and a second train read the first file's features from the cache."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from jobs.models import resolve_bundle
    from pipeline.errors import ConfigError

    videos, ann = _two_clips(tmp_path, seed=5)
    weights = tmp_path / "w.safetensors"
    state = torchvision.models.resnet18(weights=None).state_dict()
    save_file(state, str(weights))

    def trained(out: str) -> tuple[ModelBundle, int]:
        spec = TrainSpec(annotations=str(ann), videos=str(videos), out=str(tmp_path / out), cache=str(tmp_path / "c"),
                         **{**SMALL, "epochs": 2, "val_fraction": 0.0,  # type: ignore[arg-type]
                            "image_weights": f"file:{weights.name}"})  # relative to the current folder
        result = train(spec, say=lambda _: None)
        return result.bundle, result.feature_cache_hits

    monkeypatch.chdir(tmp_path)
    first, hits = trained("m1")
    assert hits == 0 and len(first.image.weights_sha256) == 64
    assert first.image.weights == f"file:{weights}"  # absolute: the bundle runs from any folder
    assert resolve_bundle(str(tmp_path / "m1"), allow_untrained=False).model_id == first.model_id
    torch.manual_seed(0)
    save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
              str(weights))  # the same path, other weights
    with pytest.raises(ConfigError, match=rf"--model {tmp_path / 'm1'}: image encoder 'resnet18': weights file "
                                          rf"'{weights}' .*is not the file the bundle was trained with"):
        resolve_bundle(str(tmp_path / "m1"), allow_untrained=False)
    second, hits = trained("m2")
    assert hits == 0  # features of the new weights, not the cached ones of the old
    assert second.image.weights_sha256 != first.image.weights_sha256 and second.model_id != first.model_id
    weights.rename(tmp_path / "elsewhere.safetensors")  # gone: each actor failed with a traceback (exit 1)
    with pytest.raises(ConfigError, match=rf"--model {tmp_path / 'm2'}: image encoder 'resnet18': weights file "
                                          rf"'{weights}' .*does not exist"):
        resolve_bundle(str(tmp_path / "m2"), allow_untrained=False)
    resolve_bundle(str(tmp_path / "m2"), allow_untrained=False, local=False)  # a cluster's workers may hold it


def test_eval_scores_the_labels_run_writes_and_says_what_it_could_not_score(corpus, trained, tmp_path, capsys):
    """eval extracted float32 features while run (--precision auto) used bf16 here: its counts were not run's.
    A video that failed still gave exit 0; spans past the end and nothing scored read as a result."""
    import torch

    from jobs.query import run_query
    from pipeline.precision import encoder_precision

    root, videos, files = corpus
    results, cache = trained
    bundle = str(results["audio"][0].path)
    test_ann = files[("audio", "test")]
    out = tmp_path / "run"
    assert main(["run", str(videos / "audio_test_*.mp4"), "--out", str(out), "--model", bundle, "--no-progress"]) == 0
    written = {r["label"]: r["n"] for r in run_query(out, "SELECT label, count(*) n FROM segments GROUP BY 1").to_pylist()}
    capsys.readouterr()
    assert main(["eval", "--model", bundle, "--annotations", str(test_ann), "--videos", str(videos), "--cache",
                 str(cache), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # what run used: auto, unless the bundle's bf16 check asks for fp32
    assert report["precision"] == ("fp32" if results["audio"][0].bundle.fp32_reason() else
                                   encoder_precision("auto", "auto"))
    assert report["n_segments"] == sum(written.values()) == 3 * N_TEST_DRAWN["audio"] * SECONDS  # 3 variants each
    assert {k: c["predicted"] for k, c in report["per_class"].items() if c["predicted"]} == written

    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    with_broken = tmp_path / "with_broken.csv"
    with_broken.write_text(test_ann.read_text() + f"{broken},0,1,tone,x\n")
    assert main(["eval", "--model", bundle, "--annotations", str(with_broken), "--videos", str(videos), "--cache",
                 str(cache), "--precision", "fp32"]) == 3  # some inputs failed
    assert f"{3 * N_TEST_DRAWN['audio']} decoded videos, 1 failed to decode" in capsys.readouterr().out

    past = tmp_path / "past.csv"
    name = sorted(videos.glob("audio_test_*.mp4"))[0].name
    past.write_text(f"video,start_s,end_s,label\n{name},100,200,tone\n")
    args = ["eval", "--model", bundle, "--annotations", str(past), "--videos", str(videos), "--cache", str(cache),
            "--precision", "fp32"]
    assert main([*args, "--device", "cuda"]) == (0 if torch.cuda.is_available() else 2)  # it ran on the CPU
    assert "--device cuda: this machine has no CUDA GPU" in capsys.readouterr().err or torch.cuda.is_available()
    assert main([*args, "--unlabeled", "ignore"]) == 2
    err = capsys.readouterr().err
    assert f"warning: annotations {past}: 1 span starts after the video's end" in err
    assert "no segment of the 1 decoded video has a label to score" in err
    assert main([*args, "--json"]) == 0  # its segments scored as background: the report says what was left out
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith(f"warning: annotations {past}: 1 span starts after the video's end") for n in notes), notes
    assert main(args) == 0
    report = capsys.readouterr().out  # the text report says it as stderr did (it said "note: warning: …")
    assert f"\nwarning: annotations {past}: 1 span starts" in report and "note: warning" not in report


@pytest.mark.parametrize("kind", ["audio", "both"])
def test_the_bf16_check_scores_the_validation_videos_as_eval_does_at_each_precision(kind, corpus, trained, tmp_path):
    """A head trained on float32 features could score lower under run's bf16 encoders, unchecked (a helper's
    multilabel bundle: exact-match 1.000 with fp32 encoders, 0.792 with bf16).  train now labels its validation
    videos both ways: its figures must be eval's at --precision fp32 and bf16 on the same videos."""
    from jobs.train import BF16_TOLERANCE, split_videos

    root, videos, files = corpus
    results, cache = trained
    result, lines = results[kind]
    check = result.bundle.meta["bf16_check"]
    ann_file = files[(kind, "train")]
    annotated = read_annotations(ann_file, videos)
    _, val = split_videos(annotated.videos, annotated, SMALL["val_fraction"], 0)
    assert (check["on"], check["videos"], check["segments"]) == ("validation", len(val), len(val) * SECONDS)
    assert 0 <= check["segments_alike"] <= check["segments"]
    said = next(line for line in lines if "bf16 check on the" in line)
    assert f"bf16 encoders label {check['segments_alike']} of {check['segments']} segments" in said

    names = {Path(v.uri).name for v in val}
    val_ann = tmp_path / "val.csv"
    rows = ann_file.read_text().splitlines()
    val_ann.write_text("\n".join([rows[0], *(r for r in rows[1:] if r.split(",")[0] in names)]) + "\n")
    for precision in ("fp32", "bf16"):
        report = evaluate(result.bundle, str(val_ann), str(videos), cache=str(cache), precision=precision,
                          say=lambda _: None)
        assert report.precision == precision and report.metrics.n_segments == check["segments"]
        assert (round(report.metrics.accuracy, 4), round(report.metrics.macro_f1, 4)) == \
            (check[precision]["accuracy"], check[precision]["macro_f1"])
    lower = any(check["bf16"][k] < check["fp32"][k] - BF16_TOLERANCE for k in ("accuracy", "macro_f1"))
    assert check["auto_precision"] == ("fp32" if lower else "bf16")
    assert (result.bundle.fp32_reason() is not None) == lower


def test_where_bf16_is_emulated_the_floor_and_check_use_a_few_held_out_videos(corpus, trained, tmp_path,
                                                                              monkeypatch):
    """Emulated bf16 (no GPU, no native bf16: ~11x float32's cost with oneDNN held to AVX2) made the bf16 pass
    over every held-out video the dearest part of training there: it now takes EMULATED_BF16_VIDEOS of them."""
    import jobs.train
    import pipeline.precision

    root, videos, files = corpus
    _, cache = trained
    monkeypatch.setattr(pipeline.precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(jobs.train, "EMULATED_BF16_VIDEOS", 2)
    lines: list[str] = []
    spec = TrainSpec(annotations=str(files[("audio", "train")]), videos=str(videos), out=str(tmp_path / "m"),
                     cache=str(cache), device="cpu", **{**SMALL, "epochs": 2})  # type: ignore[arg-type]
    result = train(spec, say=lines.append)
    said = [line for line in lines if "bf16 is emulated here" in line]
    assert said == ["bf16 is emulated here (the encoders run on a CPU without native bf16, ~11x slower than "
                    "float32): bf16's floor and check use 2 of the 6 validation videos"]
    # one read of the fp32 features, one of the bf16 ones (the floor's; the check reuses them)
    assert sum(line.startswith(("feature cache hit", "extracting features of")) for line in lines) == 2, lines
    check = result.bundle.meta["bf16_check"]
    assert (check["videos"], check["segments"]) == (2, 2 * SECONDS)


def test_a_bundle_whose_bf16_check_asks_for_fp32_runs_auto_in_fp32(corpus, trained, tmp_path, capsys):
    """Where train found bf16 encoders scoring a bundle lower, run, eval and bench with --precision auto must run its
    encoders in fp32 and say why; --precision bf16 still gives bf16.  (Which footage trips the check depends on the
    data: without the standardisation floor, 7 of 9 generated solid-colour sets did; the record is set here.)"""
    import io
    import shutil

    from jobs.bench import bench, format_report

    root, videos, files = corpus
    results, cache = trained
    bundle_dir = tmp_path / "asks_fp32"
    shutil.copytree(results["audio"][0].path, bundle_dir)
    doc = json.loads((bundle_dir / "bundle.json").read_text())
    doc["meta"]["bf16_check"] = {"on": "validation", "videos": 2, "segments": 16, "segments_alike": 13,
                                 "fp32": {"accuracy": 1.0, "macro_f1": 1.0},
                                 "bf16": {"accuracy": 0.8125, "macro_f1": 0.9}, "auto_precision": "fp32"}
    (bundle_dir / "bundle.json").write_text(json.dumps(doc))
    bundle = ModelBundle.load(bundle_dir)  # meta is not part of model_id: the same model
    assert bundle.model_id == results["audio"][0].bundle.model_id
    reason = bundle.fp32_reason()
    assert reason == (f"model {bundle.model_id}: at training, bf16 encoders labelled 13 of its 16 validation segments "
                      "as float32 ones did and scored them lower (accuracy 1.000 -> 0.812, macro-F1 1.000 -> 0.900), "
                      "so --precision auto runs its encoders in fp32 (--precision bf16 overrides)")
    clips = sorted(videos.glob("audio_test_0[01].mp4"))
    capsys.readouterr()
    for flag, expected in (("auto", "fp32"), ("bf16", "bf16")):
        out = tmp_path / f"run_{flag}"
        assert main(["run", str(clips[0]), "--out", str(out), "--model", str(bundle_dir), "--no-progress",
                     "--precision", flag]) == 0
        assert json.loads((out / "_job" / "job.json").read_text())["precision"] == expected
        assert (f"--precision auto: {reason}" in capsys.readouterr().err) == (flag == "auto")
    # a bf16 job resumed with auto goes on in bf16 (one precision per job), and says why auto would differ
    assert main(["run", *map(str, clips), "--out", str(tmp_path / "run_bf16"), "--model", str(bundle_dir),
                 "--no-progress"]) == 0
    assert ("--precision auto: resuming in the job's precision, bf16 (the model's bf16 check, made when it was "
            "trained, asks for fp32); a new --out starts a job in fp32") in capsys.readouterr().err
    lines: list[str] = []
    report = evaluate(bundle, str(files[("audio", "test")]), str(videos), cache=str(cache), say=lines.append)
    assert report.precision == "fp32" and f"--precision auto: {reason}" in lines
    assert report.to_dict()["fp32_reason"] == reason
    measured = bench([str(clips[0])], model=str(bundle_dir), skip_naive=True)
    assert (measured["precision"], measured["sample_precision"], measured["fp32_reason"]) == ("auto", "fp32", reason)
    printed = io.StringIO()
    format_report(measured, printed)
    assert "encoder precision auto (fp32: the model's bf16 check asks for it)" in printed.getvalue()
    assert f"--precision auto: {reason}" in printed.getvalue()
    assert measured["fp32_label_agreement"] == 1.0  # fp32 against itself


def test_ave_training_decodes_its_train_and_validation_videos_only(tmp_path, ray_session):
    """Training on AVE's Annotations.txt decoded its test videos too (eval's, never used by training), and a video
    in none of the split files was decoded and left out without a word."""
    rng = np.random.default_rng(5)
    videos = tmp_path / "videos"
    videos.mkdir()
    ids = {"tr1": ("red", "tone"), "tr2": ("blue", "noise"), "va1": ("red", "tone"), "te1": ("blue", "noise"),
           "none1": ("red", "tone")}
    for vid, (colour, sound) in ids.items():
        write_clip(videos / f"{vid}.mp4", [COLOURS[colour]] * 3, _sound(sound, 3, rng))
    ave = tmp_path / "AVE"
    ave.mkdir()
    header = "Category&VideoID&Quality&StartTime&EndTime\n"

    def rows(names: list[str]) -> str:
        return header + "".join(f"{'Red' if ids[n][0] == 'red' else 'Blue'}&{n}&good&0&3\n" for n in names)

    (ave / "Annotations.txt").write_text(rows(list(ids)))
    (ave / "trainSet.txt").write_text(rows(["tr1", "tr2"]))
    (ave / "valSet.txt").write_text(rows(["va1"]))
    (ave / "testSet.txt").write_text(rows(["te1"]))
    spec = TrainSpec(annotations=str(ave / "Annotations.txt"), videos=str(videos), out=str(tmp_path / "m"),
                     **{**SMALL, "epochs": 2})  # type: ignore[arg-type]
    lines: list[str] = []
    train(spec, say=lines.append)
    assert "AVE split: 3 train and validation videos; 1 test video left for 'vidpipe eval'" in lines
    warning = next(line for line in lines if line.startswith("warning: 1 annotated video is in none of the split"))
    assert str(ave / "Annotations.txt") in warning and warning.endswith(str(videos / "none1.mp4"))
    assert any(line.startswith("extracting features of 3 videos") for line in lines), lines


def test_a_validation_split_with_nothing_to_score_is_said_and_not_used(tmp_path, ray_session):
    """Every epoch scored 'val acc 0.000' on no segment and the bundle kept epoch 1, with no warning."""
    from jobs.train import split_videos

    rng = np.random.default_rng(4)
    videos = tmp_path / "videos"
    videos.mkdir()
    names = ["a.mp4", "b.mp4", "c.mp4"]
    for name, colour, sound in zip(names, ("red", "blue", "red"), ("tone", "noise", "tone"), strict=True):
        write_clip(videos / name, [COLOURS[colour]] * 4, _sound(sound, 4, rng))
    ann = tmp_path / "ann.csv"
    ann.write_text("video,start_s,end_s,label\n" + "".join(f"{n},0,4,{n[0]}\n" for n in names))
    spec = TrainSpec(annotations=str(ann), videos=str(videos), out=str(tmp_path / "m"), unlabeled="ignore",
                     **{**SMALL, "epochs": 6, "patience": 2, "val_fraction": 0.34})  # type: ignore[arg-type]
    annotated = read_annotations(ann, videos, unlabeled="ignore")
    _, (val,) = split_videos(annotated.videos, annotated, spec.val_fraction, spec.seed)
    name = Path(val.uri).name
    ann.write_text("video,start_s,end_s,label\n" + "".join(f"{n},0,4,{n[0]}\n" for n in names if n != name)
                   + f"{name},50,60,{name[0]}\n")  # the validation video's only span is past its end
    lines: list[str] = []
    result = train(spec, say=lines.append)
    assert any(line.startswith("warning: the 1 validation video has no segment with a label") for line in lines)
    assert any("1 span starts after the video's end" in line for line in lines)
    assert any("train(no val) loss" in line for line in lines) and not any(" val loss" in line for line in lines)
    assert result.val_metrics is None
    # The bundle's meta said val_videos 0 (one was held out) and carried the training set's figures, up to
    # 1.0, under the val_* names: validation figures that do not exist are null, the watched ones train_*.
    meta = json.loads((result.path / "bundle.json").read_text(), parse_constant=_not_json)["meta"]
    assert (meta["val_videos"], meta["val_segments"], meta["early_stopping_on"]) == (1, 0, "training")
    assert meta["val_accuracy"] is meta["val_macro_f1"] is meta["val_loss"] is None
    for h in meta["history"]:
        assert h["val_loss"] is h["val_accuracy"] is h["val_macro_f1"] is None
        assert 0 <= h["train_accuracy"] <= 1 and 0 <= h["train_macro_f1"] <= 1 and h["train_eval_loss"] > 0


def test_multilabel_thresholds_maximise_validation_f1_the_lowest_of_ties():
    """The rule (kept after trying the middle of a tied range: jobs/train.py says what was measured)."""
    from jobs.train import tune_thresholds

    truth = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, -1], [0, 0, 1]], np.float32)  # row 3 unlabeled: left out
    probs = np.array([[0.99, 0.01, 0.97], [0.95, 0.02, 0.31], [0.03, 0.99, 0.30], [0.9, 0.9, 0.9],
                      [0.01, 0.03, 0.96]], np.float32)
    # labels 0, 1: every threshold separates (0.05); label 2: negatives up to 0.31, positives from 0.96 (0.35)
    assert tune_thresholds(probs, truth) == (0.05, 0.05, 0.35)
    # F1 1 only at 0.40 and 0.45 (lower takes the negative 0.38, higher drops the positive 0.47); none -> 0.5
    probs = np.array([[0.62], [0.38], [0.47]], np.float32)
    assert tune_thresholds(probs, np.array([[1], [0], [1]], np.float32)) == (0.4,)
    assert tune_thresholds(probs, np.zeros((3, 1), np.float32)) == (0.5,)


def test_standardisation_takes_no_std_below_bf16s_rounding():
    """A feature that hardly varies in training (std 1e-4) was divided by its std, so bf16's rounding of it
    (RMS 1e-3 here) reached the head as 10 stds: the std is now at least NOISE_FLOOR times that rounding."""
    import dataclasses

    from jobs.features import VideoFeatures
    from jobs.train import NOISE_FLOOR, _Norm, bf16_noise

    rng = np.random.default_rng(0)
    n = 400

    def feats(uri: str, image: np.ndarray, audio: np.ndarray) -> VideoFeatures:
        times = np.arange(len(image), dtype=np.float64)
        return VideoFeatures(uri=uri, video_id=uri, start_s=times, end_s=times + 1, image=image.astype(np.float32),
                             audio=audio.astype(np.float32), has_audio=True)

    # image features: varied (std 1), nearly constant (std 1e-4), constant; audio: varied
    image = np.stack([rng.normal(0, 1, n), 5 + rng.normal(0, 1e-4, n), np.full(n, 2.0)], axis=1)
    audio = rng.normal(0, 0.5, (n, 1))
    fp32 = feats("a", image, audio)
    rounding = np.array([1e-3, 1e-3, 1e-3])
    bf16 = feats("a", image + rounding * rng.choice([-1.0, 1.0], (n, 3)), audio)
    noise = bf16_noise([fp32, feats("not-in-bf16", image, audio)], {"a": bf16, "other": bf16})
    assert noise is not None
    np.testing.assert_allclose(noise[0], rounding, rtol=1e-3)  # RMS of bf16 - fp32; the pair without bf16 left out
    np.testing.assert_allclose(noise[1], [0.0], atol=1e-9)
    plain, floored = _Norm.fit([fp32]), _Norm.fit([fp32], noise)
    np.testing.assert_allclose(plain.image_std, [image[:, 0].std(), image[:, 1].std(), 1.0], rtol=1e-3)
    # the constant feature keeps std 1 (a floor below it lowered it to 3e-3 at first: a review found it) ...
    np.testing.assert_allclose(floored.image_std, [image[:, 0].std(), NOISE_FLOOR * 1e-3, 1.0], rtol=1e-3)
    assert floored.floored == (1, 0) and plain.floored == (0, 0)
    # ... unless bf16's rounding of it is larger still
    big = _Norm.fit([fp32], (np.array([1e-3, 1e-3, 0.5]), noise[1]))
    np.testing.assert_allclose(big.image_std[2], NOISE_FLOOR * 0.5)
    assert big.floored == (2, 0)
    np.testing.assert_allclose(floored.audio_std, plain.audio_std)  # no rounding: as before
    # bf16's rounding of the nearly constant feature: ~10 stds unfloored, at most 1 / NOISE_FLOOR now
    moved = lambda norm: np.abs(norm.apply(bf16, np.zeros(n, np.int64)).image - norm.apply(fp32, np.zeros(n, np.int64)).image)  # noqa: E731
    assert moved(plain)[:, 1].max() > 5 and float(moved(floored)[:, 1].max()) <= 1.01 / NOISE_FLOOR
    assert bf16_noise([fp32], {}) is None
    # --image-grid: the regions are standardised like the pooled features, and round more: the larger counts
    grid = np.repeat(image[:, None, :], 4, axis=1)
    with_grid = dataclasses.replace(fp32, grid=grid.astype(np.float32))
    bf16_grid = dataclasses.replace(bf16, grid=(grid + 5e-3 * rng.choice([-1.0, 1.0], grid.shape)).astype(np.float32))
    noise = bf16_noise([with_grid], {"a": bf16_grid})
    assert noise is not None
    np.testing.assert_allclose(noise[0], [5e-3] * 3, rtol=2e-3)


def test_the_bf16_check_asks_for_fp32_where_bf16_features_score_lower_and_checks_nothing_unscored():
    """The check's rule on a real (seeded) head: bf16 features far from the float32 ones that move the labels
    off the truth ask for fp32; the same features alike keep bf16; nothing to score (--unlabeled ignore) is
    said to be unchecked, not passed with accuracy 0.000 -> 0.000 (a review found that)."""
    from jobs.annotations import AnnotatedVideo
    from jobs.evaluate import decide, predict_video
    from jobs.features import VideoFeatures
    from jobs.train import bf16_check
    from pipeline.head import HeadRunner

    bundle = ModelBundle.untrained(image_dim=8, audio_dim=4, labels=["a", "b", "c"], window_segments=4,
                                   context_segments=2)
    rng = np.random.default_rng(1)
    n = 12
    times = np.arange(n, dtype=np.float64)

    def feats(image: np.ndarray, audio: np.ndarray) -> VideoFeatures:
        return VideoFeatures(uri="v", video_id="v", start_s=times, end_s=times + 1, image=image.astype(np.float32),
                             audio=audio.astype(np.float32), has_audio=True)

    fp32 = feats(rng.normal(0, 1, (n, 8)), rng.normal(0, 1, (n, 4)))
    truth = decide(predict_video(HeadRunner(bundle.head, bundle.head_state(), precision="fp32"), fp32), bundle)
    video = AnnotatedVideo(uri="v", video_id="v", annotations=())
    lines: list[str] = []
    same = bf16_check(bundle, [(video, fp32, truth)], {"v": fp32}, on="validation", say=lines.append)
    assert (same["auto_precision"], same["segments_alike"], same["fp32"]["accuracy"]) == ("bf16", n, 1.0)
    assert lines[-1].endswith("--precision auto may use bf16 for this model")
    far = feats(fp32.image + rng.normal(0, 50, (n, 8)), fp32.audio + rng.normal(0, 50, (n, 4)))
    moved = bf16_check(bundle, [(video, fp32, truth)], {"v": far}, on="validation", say=lines.append)
    assert moved["auto_precision"] == "fp32" and moved["bf16"]["accuracy"] < 1.0 and moved["segments_alike"] < n
    assert lines[-1].startswith("warning: bf16 check on the 1 validation video: bf16 encoders label ")
    nothing = bf16_check(bundle, [(video, fp32, np.full(n, -1))], {"v": far}, on="validation", say=lines.append)
    assert nothing == {"on": "validation", "videos": 1, "auto_precision": "bf16"}
    assert lines[-1].startswith("bf16 check: no segment with a label could be labelled")


def test_labels_holding_commas_are_quoted_in_messages():
    from jobs.annotations import label_list

    assert label_list(["dog, barking", "música", "speech"]) == "'dog, barking', música, speech"


def test_train_stopped_inside_an_import_of_its_feature_extraction_says_so(tmp_path):
    """Found by CI (6ab8235, where this test fails): a SIGTERM landed inside feature extraction's `import av`,
    with Ray imported; `train` said "interrupted", then its cleanup's import of the runner met the half-made PyAV
    package and the command ended with a traceback, status 1. The stop waits for those imports (9c36d47), and
    the cleanup imports nothing heavy (jobs/raystop.py; tested alone in test_run.py)."""
    from tests.jobs.conftest import stop_inside_an_import

    videos, ann = _two_clips(tmp_path, seed=6)
    r = stop_inside_an_import("av.container", ["train", "--annotations", str(ann), "--videos", str(videos),
                                               "--out", str(tmp_path / "m"), "--epochs", "2"])
    assert r.returncode == 130, r.stderr[-2000:]
    # (it said "the features extracted so far are cached" where none had been: a helper)
    assert r.stderr.endswith("vidpipe: interrupted (stopped by SIGTERM); rerun the same command to go on: the "
                             "features of the videos already extracted are read from the cache (training starts "
                             "over)\n")
    assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.3, 1.5])
def test_train_stopped_by_sigterm_as_ray_starts_says_so_and_writes_no_bundle(tmp_path, delay_s):
    """SIGTERM (a scheduler's stop) ended `train` with status 15 and Ray's raw trace; stopping like Ctrl-C
    then hung once in CI, the stop landing in logging's at-fork handler as Ray started (jobs/stopping.py)."""
    import signal
    import subprocess
    import sys
    import time

    videos, ann = _two_clips(tmp_path, seed=6)
    exe = Path(sys.executable).with_name("vidpipe")
    proc = subprocess.Popen([str(exe), "train", "--annotations", str(ann), "--videos", str(videos), "--out",
                             str(tmp_path / "m"), "--epochs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    said = []
    try:
        for line in proc.stderr:  # extraction, and Ray's start, begin
            said.append(line)
            if line.startswith("extracting features"):
                break
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(said) + err
    assert proc.returncode == 130, err[-2000:]
    assert ("vidpipe: interrupted (stopped by SIGTERM); rerun the same command to go on: the features of the "
            "videos already extracted are read from the cache (training starts over)") in err
    assert "Exception ignored" not in err
    assert not (tmp_path / "m" / "bundle.json").exists()


_STOP_DURING_THE_SAVE = """
import os, signal, sys
from jobs import cli
from pipeline.bundle import ModelBundle

real_save = ModelBundle.save

def save(self, *args, **kwargs):  # SIGTERM as the save begins: the stop lands inside its deferred block
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save(self, *args, **kwargs)

ModelBundle.save = save
sys.argv = ["vidpipe", *sys.argv[1:]]
sys.exit(cli._command())
"""


def test_a_stop_during_the_save_of_the_bundle_lets_it_finish_and_says_so(corpus, trained, tmp_path):
    """A stop during the save waited for its end (as designed), then said "interrupted; rerun the same command to
    resume" with exit 130, while the new bundle had replaced the old: the user took the old one to be in place."""
    from tests.jobs.conftest import run_script

    root, videos, files = corpus
    _, cache = trained
    out = tmp_path / "m"
    r = run_script(_STOP_DURING_THE_SAVE, ["train", "--annotations", str(files[("audio", "train")]), "--videos",
                                           str(videos), "--out", str(out), "--cache", str(cache), "--image-encoder",
                                           "resnet18", "--image-weights", "none", "--image-size", "32",
                                           "--audio-encoder", "classic", "--window-segments", "4",
                                           "--context-segments", "2", "--val-fraction",
                                           "0.25", "--epochs", "2"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    bundle = ModelBundle.load(out)
    assert ("vidpipe: a stop (stopped by SIGTERM) came during the save of the bundle, which was finished first\n"
            f"saved model {bundle.model_id} to {out}") in r.stderr
    assert "interrupted" not in r.stderr and "Traceback" not in r.stderr


def test_a_positional_given_to_eval_or_train_is_named_by_the_command_with_the_flag_it_wants(tmp_path, capsys):
    bundle = str(Path(__file__).parents[2] / "pipeline" / "bundles" / "default")
    with pytest.raises(SystemExit) as stop:
        main(["eval", bundle, "--annotations", str(tmp_path / "a.csv")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "vidpipe eval: error: unrecognized arguments" in err
    assert f"is a model bundle: give it as --model {bundle}" in err
    with pytest.raises(SystemExit):
        main(["eval", "--annotations", str(tmp_path / "a.csv"), str(tmp_path)])
    assert "eval takes no positional argument: --annotations FILE, --videos DIR, --model BUNDLE" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--annotations", "a.csv", "--out", str(tmp_path / "b"), bundle])
    assert "train writes one with --out BUNDLE, eval and run read one with --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--bogus"])
    assert "vidpipe run: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_and_eval_write_each_progress_line_with_its_newline_in_one_write(monkeypatch):
    # print() writes a line and its newline apart; a SIGINT between them glued "vidpipe: interrupted" onto the line
    from jobs import cli

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Recorder())
    cli._say("extracting features of 3 videos into /tmp/cache")
    assert writes == ["extracting features of 3 videos into /tmp/cache\n"]
