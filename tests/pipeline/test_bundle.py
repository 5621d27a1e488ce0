"""ModelBundle: save/load round trip, content-hash model_id, and clear errors for bad bundles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from pipeline.bundle import BUNDLE_FORMAT_VERSION, UNTRAINED_MODEL_ID, ModelBundle
from pipeline.errors import ConfigError
from pipeline.head import HeadRunner, build_head
from pipeline.media import SamplingSpec
from pipeline.specs import AudioEncoderSpec, HeadSpec, ImageEncoderSpec

torch.set_num_threads(1)

IMAGE_DIM, AUDIO_DIM = 12, 10


def trained_bundle(fusion: str = "concat", *, with_audio: bool = True) -> ModelBundle:
    head = HeadSpec(fusion=fusion, image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, n_labels=3, proj_dim=8,  # type: ignore[arg-type]
                    lstm_hidden=6, window_segments=4, context_segments=2)
    g = torch.Generator().manual_seed(3)
    tensors = {f"head.{k}": v + 0.1 * torch.randn(v.shape, generator=g) for k, v in build_head(head).state_dict().items()}
    if with_audio:
        tensors["audio.conv.weight"] = torch.randn(4, 1, 3, 3, generator=g)
    return ModelBundle(sampling=SamplingSpec(segment_seconds=0.96),
                       image=ImageEncoderSpec(name="resnet18", grid=2), audio=AudioEncoderSpec(n_mels=32),
                       head=head, labels=["speech", "music", "noise"], trained=True, tensors=tensors,
                       meta={"training": {"epochs": 3}, "metrics": {"acc": 0.9}})


def head_outputs(bundle: ModelBundle) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = 23
    image = rng.standard_normal((n, bundle.head.image_dim), dtype=np.float32)
    audio = rng.standard_normal((n, bundle.head.audio_dim), dtype=np.float32)
    grid = rng.standard_normal((n, 4, bundle.head.image_dim), dtype=np.float32)
    out = HeadRunner(bundle.head, bundle.head_state()).label(image, audio, grid, first_segment=0, core_start=0,
                                                             core_end=n, is_last=True, return_embedding=True)
    assert out.embedding is not None
    return np.concatenate([out.probs, out.embedding], axis=1)


def rewrite_json(directory: Path, **changes: object) -> None:
    doc = json.loads((directory / "bundle.json").read_text())
    doc.update(changes)
    (directory / "bundle.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("fusion", ["concat", "weighted", "attention"])
def test_round_trip_gives_bit_identical_outputs(tmp_path: Path, fusion: str) -> None:
    bundle = trained_bundle(fusion)
    path = bundle.save(tmp_path / "b")
    assert path == (tmp_path / "b").absolute()
    assert sorted(p.name for p in path.iterdir()) == ["bundle.json", "weights.safetensors"]
    loaded = ModelBundle.load(path)
    assert loaded.model_id == bundle.model_id != UNTRAINED_MODEL_ID
    assert len(loaded.model_id) == 16
    assert (loaded.sampling, loaded.image, loaded.audio, loaded.head) == (bundle.sampling, bundle.image, bundle.audio,
                                                                          bundle.head)
    assert loaded.labels == bundle.labels and loaded.trained
    assert loaded.meta["metrics"] == {"acc": 0.9} and "created_at" in loaded.meta
    assert set(loaded.tensors) == set(bundle.tensors)
    for k in bundle.tensors:
        assert torch.equal(loaded.tensors[k], bundle.tensors[k])
    audio_state = loaded.audio_state()
    assert audio_state is not None and set(audio_state) == {"conv.weight"}
    np.testing.assert_array_equal(head_outputs(loaded), head_outputs(bundle))
    doc = json.loads((path / "bundle.json").read_text())
    assert doc["format_version"] == BUNDLE_FORMAT_VERSION
    assert "torch" in doc["versions"] and "python" in doc["versions"]
    # Loading by the bundle.json path works too.
    assert ModelBundle.load(path / "bundle.json").model_id == bundle.model_id


def test_model_id_is_stable_and_tracks_content(tmp_path: Path) -> None:
    a = trained_bundle()
    id1 = ModelBundle.load(a.save(tmp_path / "one")).model_id
    id2 = ModelBundle.load(trained_bundle().save(tmp_path / "two")).model_id
    assert id1 == id2  # meta's created_at and the versions do not enter the id
    changed = trained_bundle()
    changed.tensors["head.classifier.bias"] = changed.tensors["head.classifier.bias"].clone()
    changed.tensors["head.classifier.bias"][0] += 1e-3
    assert ModelBundle.load(changed.save(tmp_path / "three")).model_id != id1
    relabelled = trained_bundle()
    relabelled.labels = ["a", "b", "c"]
    relabelled.save(tmp_path / "four")
    assert relabelled.model_id != id1


def test_tampered_trained_bundle_is_rejected(tmp_path: Path) -> None:
    path = trained_bundle().save(tmp_path / "b")
    tensors = safetensors.torch.load_file(str(path / "weights.safetensors"))
    tensors["head.classifier.weight"][0, 0] += 0.5
    safetensors.torch.save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(ConfigError, match="model_id") as err:
        ModelBundle.load(path)
    assert str(path) in str(err.value)
    # what to do (it said "re-save the bundle", which no command does; a helper)
    assert "restore the bundle's files from where they came, or train it again (vidpipe train --out DIR)" in str(
        err.value)


def test_tampered_spec_is_rejected(tmp_path: Path) -> None:
    path = trained_bundle().save(tmp_path / "b")
    doc = json.loads((path / "bundle.json").read_text())
    doc["sampling"]["segment_seconds"] = 2.0
    (path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="model_id"):
        ModelBundle.load(path)


def test_untrained_bundle(tmp_path: Path) -> None:
    b = ModelBundle.untrained(image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, fusion="weighted")
    assert b.model_id == UNTRAINED_MODEL_ID and not b.trained
    assert b.labels == [f"untrained_{i}" for i in range(8)] and b.head.n_labels == 8
    assert b.audio_state() is None
    again = ModelBundle.untrained(image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, fusion="weighted")
    for k in b.tensors:  # seeded: the same random head every time
        assert torch.equal(b.tensors[k], again.tensors[k])
    loaded = ModelBundle.load(b.save(tmp_path / "u"))
    assert loaded.model_id == UNTRAINED_MODEL_ID
    np.testing.assert_array_equal(head_outputs(loaded), head_outputs(b))
    custom = ModelBundle.untrained(image_dim=4, audio_dim=4, labels=["x", "y"], window_segments=8, context_segments=3)
    assert custom.head.n_labels == 2 and custom.head.window_segments == 8 and custom.head.context_segments == 3


def test_save_refuses_to_clobber_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.mkdir()  # an empty directory is fine
    first = trained_bundle()
    first.save(target)
    with pytest.raises(ConfigError, match="not empty"):
        first.save(target)
    other = ModelBundle.untrained(image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM)
    other.save(target, overwrite=True)
    assert ModelBundle.load(target).model_id == UNTRAINED_MODEL_ID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directories left behind


def _unpickle_marker(path: str) -> None:
    Path(path).write_text("unpickled!")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_unpickle_marker, (self.marker,))


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save"])
def test_pickle_named_safetensors_is_refused_and_never_unpickled(tmp_path: Path, kind: str) -> None:
    path = trained_bundle().save(tmp_path / "b")
    marker = tmp_path / "marker"
    if kind == "raw_pickle":
        (path / "weights.safetensors").write_bytes(pickle.dumps({"head.x": _Evil(marker)}))
    else:
        torch.save({"head.x": _Evil(marker)}, path / "weights.safetensors")
    with pytest.raises(ConfigError, match="not a valid safetensors file") as err:
        ModelBundle.load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("break_it", "match"),
    [
        (lambda p: (p / "bundle.json").unlink(), "bundle.json is missing"),
        (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors is missing"),
        (lambda p: (p / "bundle.json").write_text("{not json"), "not readable JSON"),
        (lambda p: (p / "bundle.json").write_text("[1, 2]"), "JSON object"),
        (lambda p: rewrite_json(p, format_version=2), "format_version is 2.*newer vidpipe"),
        (lambda p: rewrite_json(p, format_version=None), "format_version is None"),
        (lambda p: rewrite_json(p, format_version=0), r"older vidpipe: train it again with this one \(vidpipe train"),
        # read by --precision auto as bf16 without a word (a helper)
        (lambda p: rewrite_json(p, meta={"bf16_check": {"auto_precision": "fp16"}}),
         r"meta.bf16_check.auto_precision is 'fp16': it must be \"fp32\" or \"bf16\""),
        (lambda p: rewrite_json(p, labels=["a", "b"]), "2 labels but the head has n_labels=3"),
        (lambda p: rewrite_json(p, labels=["a", "a", "b"]), "unique"),
        (lambda p: rewrite_json(p, head={"fusion": "gated"}), "unknown fusion 'gated'"),
        (lambda p: rewrite_json(p, image={"name": "resnet18", "colour": 1}), "unknown keys"),
        (lambda p: rewrite_json(p, trained=False), "untrained bundle must have model_id"),
    ],
)
def test_broken_bundles_give_clear_config_errors(tmp_path: Path, break_it, match: str) -> None:  # type: ignore[no-untyped-def]
    path = trained_bundle().save(tmp_path / "b")
    break_it(path)
    with pytest.raises(ConfigError, match=match) as err:
        ModelBundle.load(path)
    assert str(path) in str(err.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        ModelBundle.load(tmp_path / "nope")


def _save_with_tensors(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """An untrained bundle whose weights file is replaced (untrained: no model_id check gets in the way)."""
    path = ModelBundle.untrained(image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM).save(tmp_path / "b")
    safetensors.torch.save_file(tensors, str(path / "weights.safetensors"))
    return path


def test_head_tensors_must_fit_the_spec(tmp_path: Path) -> None:
    good = ModelBundle.untrained(image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM).tensors
    wrong_shape = dict(good)
    wrong_shape["head.classifier.weight"] = torch.zeros(8, 5)
    with pytest.raises(ConfigError, match="do not fit the head spec"):
        ModelBundle.load(_save_with_tensors(tmp_path / "1", wrong_shape))
    missing = {k: v for k, v in good.items() if k != "head.classifier.bias"}
    with pytest.raises(ConfigError, match="do not fit the head spec"):
        ModelBundle.load(_save_with_tensors(tmp_path / "2", missing))
    stray = dict(good, **{"optimizer.step": torch.zeros(1)})
    with pytest.raises(ConfigError, match="not named head"):
        ModelBundle.load(_save_with_tensors(tmp_path / "3", stray))
    nan = dict(good)
    nan["head.classifier.bias"] = torch.full((8,), float("nan"))
    with pytest.raises(ConfigError, match="NaN"):
        ModelBundle.load(_save_with_tensors(tmp_path / "4", nan))


def test_in_memory_checks() -> None:
    b = trained_bundle()
    with pytest.raises(ConfigError, match="labels"):
        ModelBundle(sampling=b.sampling, image=b.image, audio=b.audio, head=b.head, labels=["one"], trained=True,
                    tensors=b.tensors)
    with pytest.raises(ConfigError, match="head.\\* or audio"):
        ModelBundle(sampling=b.sampling, image=b.image, audio=b.audio, head=b.head, labels=b.labels, trained=True,
                    tensors={"lstm.weight": torch.zeros(1)})
    assert b.model_id == b.compute_model_id() and len(b.model_id) == 16
    assert "tensors=" in repr(b) and "tensor(" not in repr(b)


def test_fp32_reason_reads_the_bf16_check_and_takes_any_edit_of_it():
    """A hand-edited check ('bf16': [1, 2]) made run and eval end with an AttributeError traceback (exit 1)."""
    b = ModelBundle.untrained(image_dim=4, audio_dim=4)
    assert b.fp32_reason() is None  # no check (bundles trained before 2026-12-02): auto as before
    check = {"on": "validation", "videos": 2, "segments": 24, "segments_alike": 21, "auto_precision": "fp32",
             "fp32": {"accuracy": 1.0, "macro_f1": 1.0}, "bf16": {"accuracy": 0.875, "macro_f1": 0.9625}}
    b.meta["bf16_check"] = check
    assert b.fp32_reason() == (
        "model untrained: at training, bf16 encoders labelled 21 of its 24 validation segments as float32 ones did "
        "and scored them lower (accuracy 1.000 -> 0.875, macro-F1 1.000 -> 0.963), so --precision auto runs its "
        "encoders in fp32 (--precision bf16 overrides)")
    for auto in ("bf16", "FP32", ["fp32"], None):
        b.meta["bf16_check"] = {**check, "auto_precision": auto}
        assert b.fp32_reason() is None
    for scores in ([1, 2], 5, "x", None, {"accuracy": True, "macro_f1": float("nan")}, {"accuracy": 1e308}):
        b.meta["bf16_check"] = {**check, "bf16": scores}
        reason = b.fp32_reason()
        assert reason is not None and "accuracy 1.000 -> ?, macro-F1 1.000 -> ?" in reason
    b.meta["bf16_check"] = ["fp32"]
    assert b.fp32_reason() is None
    # "fp32" written over a check whose figures say bf16 did as well: it said bf16 "scored them lower (accuracy 1.000
    # -> 1.000 ...)" (a helper)
    b.meta["bf16_check"] = {**check, "bf16": check["fp32"]}
    assert b.fp32_reason() == ('model untrained: its bundle.json asks for fp32 encoders (meta.bf16_check.auto_precision '
                               '"fp32"), so --precision auto runs its encoders in fp32 (--precision bf16 overrides)')
