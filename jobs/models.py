"""Which model bundle a job uses: ``--model DIR``, the packaged default, or (only when asked) untrained."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from jobs.spec import check_segment_seconds
from pipeline.audio_encoder import build_audio_encoder
from pipeline.bundle import UNTRAINED_MODEL_ID, ModelBundle
from pipeline.errors import ConfigError, WeightsNotFoundError
from pipeline.image_encoder import IMAGE_ENCODER_DIMS
from pipeline.media import SamplingSpec
from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec

log = logging.getLogger(__name__)

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "bundles" / "default"


def default_bundle_path() -> Path | None:
    return DEFAULT_BUNDLE_DIR if (DEFAULT_BUNDLE_DIR / "bundle.json").is_file() else None


def untrained_bundle(sampling: SamplingSpec | None = None) -> ModelBundle:
    """A seeded, untrained bundle (resnet18 without weights + audio CNN): it runs, its labels mean nothing."""
    image = ImageEncoderSpec(name="resnet18", weights="none")
    audio = AudioEncoderSpec()
    sampling = sampling or SamplingSpec()
    audio_dim = build_audio_encoder(audio, sample_rate_hz=sampling.audio_rate_hz).dim
    return ModelBundle.untrained(sampling=sampling, image=image, audio=audio,
                                 image_dim=IMAGE_ENCODER_DIMS[image.name], audio_dim=audio_dim)


def resolve_bundle(model: str | None, *, allow_untrained: bool, local: bool = True) -> ModelBundle:
    """Load the bundle a job asked for; refuse to pretend when there is no trained one.

    ``model`` given: that bundle.  Else ``allow_untrained`` (the explicit ``--allow-untrained`` flag): the
    seeded untrained head, rows marked ``model_id = "untrained"``.  Else the packaged default bundle.
    ``local``: the workers run on this machine, so a bundle's image weights file that is not here is a usage
    error now (on a cluster the workers may hold it; each checks it as it loads it).
    """
    if model and allow_untrained:  # the flag was ignored: a trained head ran where an untrained one was asked for
        raise ConfigError(f"--model {model} and --allow-untrained ask for two models: --allow-untrained runs the "
                          "untrained head instead of a bundle; give one of them")
    if model:
        path = Path(model).expanduser()
        if path.is_file() and path.name == "bundle.json":
            path = path.parent  # the bundle's own file named: its directory is meant (ModelBundle.load takes both)
        if not (path / "bundle.json").is_file():
            what = ("no such directory" if not path.exists() else "a file, not a bundle's directory" if path.is_file()
                    else "no bundle.json there")
            raise ConfigError(f"--model {model}: {what}; pass a directory written by 'vidpipe train' (bundle.json + "
                              "weights.safetensors)")
        bundle = ModelBundle.load(path)
        if bundle.image.weights != "none":  # the image weights file lives outside the bundle: there, and the one
            from pipeline.image_encoder import resolve_image_weights  # trained with?

            try:
                resolve_image_weights(bundle.image)
            except WeightsNotFoundError as exc:
                if local:  # else the workers' failure to load it, a traceback from each actor
                    raise ConfigError(f"--model {model}: {exc}") from None
            except ConfigError as exc:
                raise ConfigError(f"--model {model}: {exc}") from None
        return bundle
    if allow_untrained:
        return untrained_bundle()
    default = default_bundle_path()
    if default is not None:
        return ModelBundle.load(default)
    raise ConfigError("no trained model bundle is available: this install ships no default bundle and no "
                      "--model was given. Train one with 'vidpipe train' and pass --model DIR, or pass "
                      "--allow-untrained to run the pipeline with an UNTRAINED head (labels are meaningless; "
                      "rows get model_id 'untrained').")


def with_sampling(bundle: ModelBundle, segment_seconds: float | None, frames_per_segment: int | None) -> ModelBundle:
    """The bundle with the job's sampling overrides; a trained bundle only accepts its own sampling."""
    if segment_seconds is not None:
        check_segment_seconds(segment_seconds)
    if frames_per_segment is not None and frames_per_segment < 1:
        raise ConfigError(f"--frames-per-segment must be >= 1, got {frames_per_segment}")
    sampling = bundle.sampling
    changes: dict[str, Any] = {}
    if segment_seconds is not None and segment_seconds != sampling.segment_seconds:
        changes["segment_seconds"] = segment_seconds
    if frames_per_segment is not None and frames_per_segment != sampling.frames_per_segment:
        changes["frames_per_segment"] = frames_per_segment
    if not changes:
        return bundle
    if bundle.trained:
        raise ConfigError(f"model {bundle.model_id} was trained with segment_seconds={sampling.segment_seconds}, "
                          f"frames_per_segment={sampling.frames_per_segment}; a different sampling "
                          f"({changes}) changes what its head sees. Drop the flags or train a bundle for it.")
    return dataclasses.replace(bundle, sampling=dataclasses.replace(sampling, **changes))


def bundle_fingerprint(bundle: ModelBundle) -> str:
    """Identity of what produces the labels: model id, encoders, head and sampling."""
    content = {"model_id": bundle.model_id, "sampling": bundle.sampling.to_dict(), "image": bundle.image.to_dict(),
               "audio": bundle.audio.to_dict(), "head": bundle.head.to_dict(), "labels": list(bundle.labels)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def is_untrained(bundle: ModelBundle) -> bool:
    return bundle.model_id == UNTRAINED_MODEL_ID
