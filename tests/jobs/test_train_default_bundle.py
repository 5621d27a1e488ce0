"""The packaged default bundle: trained, loads offline, and is what ``vidpipe run`` uses without --model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.models import DEFAULT_BUNDLE_DIR, default_bundle_path, resolve_bundle
from jobs.output import OutputDir
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError
from pipeline.image_encoder import resolve_image_weights
from tests.conftest import SAMPLES


def test_default_bundle_is_trained_documented_and_small():
    assert default_bundle_path() == DEFAULT_BUNDLE_DIR
    bundle = ModelBundle.load(DEFAULT_BUNDLE_DIR)
    assert bundle.trained and bundle.model_id not in ("", "untrained")
    assert bundle.model_id == bundle.compute_model_id()
    assert "background" in bundle.labels and len(bundle.labels) >= 3
    assert bundle.meta["source"] == "vidpipe train" and "val_macro_f1" in bundle.meta
    # the image encoder's weights come from an installed package, not from a download
    assert resolve_image_weights(bundle.image) is not None or bundle.image.weights == "none"
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    readme = (DEFAULT_BUNDLE_DIR / "README.md").read_text()
    for word in ("CC-BY-SA", "CC0", "Blender Foundation", "macro-F1", *bundle.labels):
        assert word in readme, word
    assert not (DEFAULT_BUNDLE_DIR / "work").exists()


def test_resolve_bundle_default_and_explicit_untrained():
    assert resolve_bundle(None, allow_untrained=False).model_id == ModelBundle.load(DEFAULT_BUNDLE_DIR).model_id
    assert resolve_bundle(None, allow_untrained=True).model_id == "untrained"
    # both: the flag was ignored (a trained head ran where an untrained one was asked for)
    with pytest.raises(ConfigError, match="--model .* and --allow-untrained ask for two models"):
        resolve_bundle(str(DEFAULT_BUNDLE_DIR), allow_untrained=True)


def test_a_model_that_is_not_a_bundle_directory_says_what_it_is(tmp_path):
    """'--model nope' and '--model B/bundle.json' both said "no bundle.json there" (a helper)."""
    default = ModelBundle.load(DEFAULT_BUNDLE_DIR).model_id
    assert resolve_bundle(str(DEFAULT_BUNDLE_DIR / "bundle.json"), allow_untrained=False).model_id == default
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    for given, said in (("nope", "no such directory"), ("empty", "no bundle.json there"),
                        ("weights.bin", "a file, not a bundle's directory")):
        with pytest.raises(ConfigError, match=f"--model {tmp_path / given}: {said}; pass a directory written by"):
            resolve_bundle(str(tmp_path / given), allow_untrained=False)


@pytest.mark.slow
def test_run_without_model_uses_the_default_bundle(tmp_path, ray_session, capsys):
    out = tmp_path / "o"
    code = main(["run", str(SAMPLES), "--out", str(out), "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "UNTRAINED" not in captured.err
    bundle = ModelBundle.load(DEFAULT_BUNDLE_DIR)
    rows = [r for f in OutputDir(out).committed_files("segments") for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 6 + 10  # bbb_5s_51 (5.3 s) and bikes_noaudio (10 s)
    assert {r["model_id"] for r in rows} == {bundle.model_id}
    assert {r["label"] for r in rows} <= set(bundle.labels)
    job = json.loads((out / "_job" / "job.json").read_text())
    assert job["model_id"] == bundle.model_id


def test_without_a_default_bundle_run_needs_model_or_allow_untrained(tmp_path, monkeypatch, capsys):
    import jobs.models

    monkeypatch.setattr(jobs.models, "DEFAULT_BUNDLE_DIR", tmp_path / "no_bundle")
    code = main(["run", str(SAMPLES / "bikes_noaudio.mp4"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--allow-untrained" in capsys.readouterr().err
