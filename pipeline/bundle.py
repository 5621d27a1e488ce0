"""Model bundle: a directory holding ``bundle.json`` (specs, labels, ids, versions) and ``weights.safetensors``.

Loading reads JSON and safetensors only; nothing in a bundle is ever unpickled.  A trained bundle's
``model_id`` is a content hash, checked on load, so the ``model_id`` written next to every output row
names exactly the model that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from pipeline.errors import ConfigError
from pipeline.head import build_head
from pipeline.media import SamplingSpec
from pipeline.specs import AudioEncoderSpec, FusionKind, HeadSpec, ImageEncoderSpec

BUNDLE_FORMAT_VERSION = 1
UNTRAINED_MODEL_ID = "untrained"
BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
DEFAULT_UNTRAINED_LABELS = [f"untrained_{i}" for i in range(8)]

_TENSOR_PREFIXES = ("head.", "audio.")
# The part of bundle.json that decides what the model computes; ``model_id`` hashes it with the weights.
# ``meta`` and ``versions`` are informational and left out so that re-saving the same model keeps its id.
_HASHED_KEYS = ("format_version", "sampling", "image", "audio", "head", "labels", "trained")
_VERSIONED_PACKAGES = ("vidpipe", "torch", "torchvision", "torchaudio", "safetensors", "numpy")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _content_hash(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """First 16 hex chars of sha256 over the hashed bundle.json keys and every tensor (name, dtype, shape, bytes).

    Tensors are hashed by content rather than by the safetensors file's bytes, so the id does not
    change with the safetensors library's serialisation.
    """
    h = hashlib.sha256()
    h.update(_canonical_json({k: doc.get(k) for k in _HASHED_KEYS}))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(_canonical_json([name, str(t.dtype), list(t.shape)]))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class ModelBundle:
    """Everything the pipeline needs to reproduce a model's outputs.

    ``tensors`` holds ``head.<param>`` and optionally ``audio.<param>`` (the audio CNN's state), on CPU.
    ``model_id`` is ``"untrained"`` for an untrained bundle, else a content hash (see ``compute_model_id``),
    recomputed by ``save``.
    """

    sampling: SamplingSpec
    image: ImageEncoderSpec
    audio: AudioEncoderSpec
    head: HeadSpec
    labels: list[str]
    trained: bool
    tensors: dict[str, torch.Tensor]
    model_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        _check_labels(self.labels, self.head)
        bad = sorted(k for k in self.tensors if not k.startswith(_TENSOR_PREFIXES))
        if bad:
            raise ConfigError(f"bundle tensors must be named head.* or audio.*, got {bad[:5]}")
        self.tensors = {k: v.detach().cpu() for k, v in self.tensors.items()}
        if not self.trained:
            self.model_id = UNTRAINED_MODEL_ID
        elif not self.model_id:
            self.model_id = self.compute_model_id()

    def __repr__(self) -> str:
        return (
            f"ModelBundle(model_id={self.model_id!r}, trained={self.trained}, fusion={self.head.fusion!r}, "
            f"image={self.image.name!r}, audio={self.audio.kind!r}, labels={len(self.labels)}, "
            f"tensors={len(self.tensors)})"
        )

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's state dict (``head.`` prefix stripped)."""
        return {k[len("head.") :]: v for k, v in self.tensors.items() if k.startswith("head.")}

    def audio_state(self) -> dict[str, torch.Tensor] | None:
        """The audio CNN's state dict (``audio.`` prefix stripped), or None when the bundle has none."""
        state = {k[len("audio.") :]: v for k, v in self.tensors.items() if k.startswith("audio.")}
        return state or None

    def fp32_reason(self) -> str | None:
        """Why ``--precision auto`` runs this bundle's encoders in float32 rather than bf16, or None.

        ``vidpipe train`` labels its validation segments (its training ones without a validation set) with bf16
        encoders as well as float32 ones and records the outcome in ``meta["bf16_check"]``; where bf16 scored them lower, ``auto_precision`` is "fp32".  (``meta`` is
        not part of ``model_id``: the check advises how to run the model, it does not change what it computes.)
        """
        check = self.meta.get("bf16_check")
        if not isinstance(check, dict) or check.get("auto_precision") != "fp32":
            return None

        def figure(which: str, key: str) -> str:  # meta is the user's to edit: anything else reads as unknown
            value = score(which, key)
            return "?" if value is None else f"{value:.3f}"

        def score(which: str, key: str) -> float | None:
            scores = check.get(which)
            value = scores.get(key) if isinstance(scores, dict) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            return float(value) if ok else None  # type: ignore[arg-type]

        pairs = [(score("fp32", k), score("bf16", k)) for k in ("accuracy", "macro_f1")]
        read = [(a, b) for a, b in pairs if a is not None and b is not None]
        if read and not any(b < a for a, b in read):  # edited: its own figures say bf16 did as well
            return (f"model {self.model_id}: its bundle.json asks for fp32 encoders (meta.bf16_check.auto_precision "
                    "\"fp32\"), so --precision auto runs its encoders in fp32 (--precision bf16 overrides)")
        return (f"model {self.model_id}: at training, bf16 encoders labelled {check.get('segments_alike', '?')} of "
                f"its {check.get('segments', '?')} {check.get('on', 'validation')} segments as float32 ones did and "
                f"scored them lower (accuracy {figure('fp32', 'accuracy')} -> {figure('bf16', 'accuracy')}, macro-F1 "
                f"{figure('fp32', 'macro_f1')} -> {figure('bf16', 'macro_f1')}), so --precision auto runs its encoders "
                "in fp32 (--precision bf16 overrides)")

    def _document(self) -> dict[str, Any]:
        return {
            "format_version": BUNDLE_FORMAT_VERSION,
            "sampling": self.sampling.to_dict(),
            "image": self.image.to_dict(),
            "audio": self.audio.to_dict(),
            "head": self.head.to_dict(),
            "labels": list(self.labels),
            "trained": bool(self.trained),
        }

    def compute_model_id(self) -> str:
        """``"untrained"``, or the content hash of this bundle's specs, labels and tensors."""
        if not self.trained:
            return UNTRAINED_MODEL_ID
        return _content_hash(self._document(), self.tensors)

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False,
             keep: tuple[str, ...] = ()) -> Path:
        """Write the bundle to ``directory`` atomically and return its path; sets ``self.model_id``.

        The bundle is written to a temporary sibling directory and renamed into place, so a reader
        sees the old bundle, the new one, or (with ``overwrite``, for an instant) none, never a mix.
        An existing non-empty directory is replaced only with ``overwrite=True``.  Entries named in
        ``keep`` (e.g. ``"work"``, the training feature cache) move over from the old directory.
        """
        target = Path(directory).absolute()
        if target.exists() and not target.is_dir():
            raise ConfigError(f"cannot save model bundle to {target}: it exists and is not a directory")
        replacing = target.is_dir() and any(target.iterdir())
        if replacing and not overwrite:
            raise ConfigError(f"cannot save model bundle to {target}: directory is not empty (pass overwrite=True)")
        target.parent.mkdir(parents=True, exist_ok=True)

        self.model_id = self.compute_model_id()
        doc = self._document()
        doc["model_id"] = self.model_id
        doc["versions"] = _package_versions()
        doc["meta"] = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **self.meta}
        try:
            doc_bytes = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot save model bundle to {target}: meta is not plain JSON ({e})") from e
        weights = safetensors.torch.save({k: v.contiguous() for k, v in self.tensors.items()})

        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            _write_file(tmp / WEIGHTS_FILE, weights)
            _write_file(tmp / BUNDLE_JSON, doc_bytes)
            kept = [name for name in keep if replacing and (target / name).exists()]
            for name in kept:
                os.replace(target / name, tmp / name)
            if replacing:
                os.replace(target, old)
            os.replace(tmp, target)  # onto a missing or empty directory: atomic on POSIX
        except BaseException:
            if replacing and old.exists() and not target.exists():
                os.replace(old, target)
            for name in keep:  # put kept entries back where they were
                if (tmp / name).exists() and target.is_dir() and not (target / name).exists():
                    os.replace(tmp / name, target / name)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ModelBundle:
        """Read and check a bundle directory (or its ``bundle.json``); every problem raises ConfigError."""
        path = Path(directory)
        if path.name == BUNDLE_JSON and path.is_file():
            path = path.parent

        def fail(what: str) -> ConfigError:
            return ConfigError(f"model bundle {path}: {what}")

        if not path.is_dir():
            raise fail(
                "no such directory; a model bundle is a directory with bundle.json and weights.safetensors "
                "(write one with ModelBundle.save)"
            )
        json_path, weights_path = path / BUNDLE_JSON, path / WEIGHTS_FILE
        for p in (json_path, weights_path):
            if not p.is_file():
                raise fail(f"{p.name} is missing; a model bundle holds {BUNDLE_JSON} and {WEIGHTS_FILE}")
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail(f"{BUNDLE_JSON} is not readable JSON ({e})") from e
        if not isinstance(doc, dict):
            raise fail(f"{BUNDLE_JSON} must hold a JSON object, got {type(doc).__name__}")

        version = doc.get("format_version")
        if version != BUNDLE_FORMAT_VERSION:
            hint = (
                "it was written by a newer vidpipe; upgrade vidpipe"
                if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION
                else "it was written by an older vidpipe: train it again with this one (vidpipe train --out DIR)"
            )
            raise fail(f"format_version is {version!r}, this vidpipe reads {BUNDLE_FORMAT_VERSION}: {hint}")
        missing = [k for k in (*_HASHED_KEYS, "model_id") if k not in doc]
        if missing:
            raise fail(f"{BUNDLE_JSON} lacks keys {missing}")

        try:
            sampling = SamplingSpec.from_dict(_section(doc, "sampling"))
            image = ImageEncoderSpec.from_dict(_section(doc, "image"))
            audio = AudioEncoderSpec.from_dict(_section(doc, "audio"))
            head = HeadSpec.from_dict(_section(doc, "head"))
        except (ConfigError, TypeError, ValueError) as e:
            raise fail(f"invalid spec in {BUNDLE_JSON}: {e}") from e
        labels, trained, model_id = doc["labels"], doc["trained"], doc["model_id"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise fail("labels must be a list of strings")
        try:
            _check_labels(labels, head)
        except ConfigError as e:
            raise fail(str(e)) from e
        if not isinstance(trained, bool) or not isinstance(model_id, str):
            raise fail("trained must be true/false and model_id a string")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise fail("meta must be a JSON object")
        check = meta.get("bf16_check")
        if isinstance(check, dict) and check.get("auto_precision", "bf16") not in ("bf16", "fp32"):
            # an edit that --precision auto would read as bf16 without a word
            raise fail(f"meta.bf16_check.auto_precision is {check.get('auto_precision')!r}: it must be \"fp32\" or "
                       "\"bf16\" (what --precision auto runs the encoders in)")

        try:
            # From bytes, not a memory map: the bundle may be replaced on disk while tensors live on.
            tensors = safetensors.torch.load(weights_path.read_bytes())
        except (OSError, safetensors.SafetensorError, ValueError, RuntimeError) as e:
            raise fail(f"{WEIGHTS_FILE} is not a valid safetensors file ({e}); bundles never hold pickles") from e
        bad = sorted(k for k in tensors if not k.startswith(_TENSOR_PREFIXES))
        if bad:
            raise fail(f"{WEIGHTS_FILE} holds tensors not named head.* or audio.*: {bad[:5]}")
        if not any(k.startswith("head.") for k in tensors):
            raise fail(f"{WEIGHTS_FILE} holds no head.* tensors")
        if audio.kind != "cnn" and any(k.startswith("audio.") for k in tensors):
            raise fail(f"{WEIGHTS_FILE} holds audio.* tensors but the audio encoder is {audio.kind!r}, which has no weights")
        nonfinite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if nonfinite:
            raise fail(f"{WEIGHTS_FILE} has NaN or infinite values in {nonfinite[:5]}")

        if trained:
            expected = _content_hash(doc, tensors)
            if model_id != expected:
                raise fail(
                    f"model_id {model_id!r} does not match the bundle's content (hash {expected!r}): "
                    f"bundle.json (but for its meta) or weights.safetensors was changed after saving, by an edit or a "
                    "copy that went wrong; restore the bundle's files from where they came, or train it again "
                    "(vidpipe train --out DIR)"
                )
        elif model_id != UNTRAINED_MODEL_ID:
            raise fail(f"an untrained bundle must have model_id {UNTRAINED_MODEL_ID!r}, got {model_id!r}")

        bundle = cls(sampling=sampling, image=image, audio=audio, head=head, labels=labels, trained=trained,
                     tensors=tensors, model_id=model_id, meta=meta)
        try:
            build_head(head, bundle.head_state())
        except RuntimeError as e:  # load_state_dict(strict=True) reports missing/unexpected/mis-shaped tensors
            raise fail(f"head tensors do not fit the head spec ({head}): {e}") from e
        return bundle

    @classmethod
    def untrained(
        cls,
        *,
        sampling: SamplingSpec = SamplingSpec(),  # noqa: B008  (frozen, so a shared default is safe)
        image: ImageEncoderSpec = ImageEncoderSpec(),  # noqa: B008
        audio: AudioEncoderSpec = AudioEncoderSpec(),  # noqa: B008
        fusion: FusionKind = "concat",
        labels: list[str] | None = None,
        image_dim: int,
        audio_dim: int,
        window_segments: int = 16,
        context_segments: int = 8,
    ) -> ModelBundle:
        """A bundle with a seeded random head (``HeadSpec.seed``) and no audio weights; ``model_id`` "untrained".

        ``image_dim`` / ``audio_dim`` are the encoders' output dims (the bundle does not import the encoders).
        """
        labels = list(DEFAULT_UNTRAINED_LABELS if labels is None else labels)
        head = HeadSpec(fusion=fusion, image_dim=image_dim, audio_dim=audio_dim, n_labels=len(labels),
                        window_segments=window_segments, context_segments=context_segments)
        state = build_head(head).state_dict()
        return cls(sampling=sampling, image=image, audio=audio, head=head, labels=labels, trained=False,
                   tensors={f"head.{k}": v.clone() for k, v in state.items()}, model_id=UNTRAINED_MODEL_ID,
                   meta={"note": "untrained: seeded random head, labels are placeholders"})


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _check_labels(labels: list[str], head: HeadSpec) -> None:
    if len(labels) != head.n_labels:
        raise ConfigError(f"{len(labels)} labels but the head has n_labels={head.n_labels}; they must match")
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise ConfigError(f"labels must be unique, repeated: {dupes[:5]}")
