"""``vidpipe eval``: score a model bundle against annotations, per segment, optionally without one modality.

The bundle runs exactly as in ``vidpipe run`` (its encoders through the Ray stages, then its head
window by window through ``HeadRunner``), on features from the feature cache.  ``ablate`` zeroes one
modality's encoder features before the head, so the report shows what each modality contributes.

Metrics (segments without a target, see ``jobs.annotations``, are left out):

- multiclass: accuracy, macro-F1 (mean F1 over the labels that occur in the truth or the predictions),
  per-label precision / recall / F1 / support, and the confusion matrix (rows: truth, columns: prediction).
- multilabel: a label is predicted when its probability reaches the bundle's threshold for it; per-label
  precision / recall / F1, macro-F1 over labels with support or predictions, micro-F1, and "accuracy" as
  the fraction of segments whose whole label set is right (exact match).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jobs.annotations import (
    AnnotationSet,
    UnlabeledMode,
    read_annotations,
    segment_targets,
    warn_spans_past_the_end,
)
from jobs.features import FeatureSpec, VideoFeatures, extract_features, tensors_digest
from jobs.plan import job_precision
from jobs.progress import count_of
from jobs.spec import check_writable_dir, runs_here
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError
from pipeline.head import HeadRunner
from pipeline.precision import check_precision, emulated_bf16_warning, pick_device

Ablation = Literal["audio", "visual"]
ABLATIONS = ("audio", "visual")


def default_cache_root() -> Path:
    """Where ``vidpipe eval`` keeps features unless ``--cache`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vidpipe" / "features"


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class ClassStats:
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


@dataclass
class Metrics:
    """Per-segment scores of one evaluation (see the module docstring for the definitions)."""

    task: str
    labels: list[str]
    n_segments: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassStats]
    confusion: list[list[int]] | None = None  # multiclass: [truth][prediction]
    micro_f1: float | None = None  # multilabel

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.confusion is not None:
            d["confusion"] = {"labels": self.labels, "rows": "truth", "columns": "prediction",
                              "matrix": self.confusion}
        return d


def multiclass_metrics(truth: np.ndarray, pred: np.ndarray, labels: list[str]) -> Metrics:
    """Metrics of integer predictions against integer truth (entries < 0 in ``truth`` are skipped)."""
    keep = truth >= 0
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    n_labels = len(labels)
    confusion = np.zeros((n_labels, n_labels), np.int64)
    np.add.at(confusion, (t, p), 1)
    per_class: dict[str, ClassStats] = {}
    f1s = []
    for i, name in enumerate(labels):
        tp, n_pred, n_true = int(confusion[i, i]), int(confusion[:, i].sum()), int(confusion[i].sum())
        prec, rec, f1 = _prf(tp, n_pred, n_true)
        per_class[name] = ClassStats(prec, rec, f1, n_true, n_pred)
        if n_true or n_pred:
            f1s.append(f1)
    n = int(keep.sum())
    accuracy = float(np.trace(confusion) / n) if n else 0.0
    return Metrics(task="multiclass", labels=list(labels), n_segments=n, accuracy=accuracy,
                   macro_f1=float(np.mean(f1s)) if f1s else 0.0, per_class=per_class, confusion=confusion.tolist())


def multilabel_metrics(truth: np.ndarray, pred: np.ndarray, labels: list[str]) -> Metrics:
    """Metrics of 0/1 predictions ``[n, L]`` against 0/1 truth (rows of truth < 0 are skipped)."""
    keep = (truth >= 0).all(axis=1)
    t, p = truth[keep] > 0.5, pred[keep] > 0.5
    per_class: dict[str, ClassStats] = {}
    f1s = []
    for i, name in enumerate(labels):
        tp, n_pred, n_true = int((t[:, i] & p[:, i]).sum()), int(p[:, i].sum()), int(t[:, i].sum())
        prec, rec, f1 = _prf(tp, n_pred, n_true)
        per_class[name] = ClassStats(prec, rec, f1, n_true, n_pred)
        if n_true or n_pred:
            f1s.append(f1)
    _, _, micro = _prf(int((t & p).sum()), int(p.sum()), int(t.sum()))
    n = int(keep.sum())
    exact = float((t == p).all(axis=1).mean()) if n else 0.0
    return Metrics(task="multilabel", labels=list(labels), n_segments=n, accuracy=exact,
                   macro_f1=float(np.mean(f1s)) if f1s else 0.0, per_class=per_class, micro_f1=micro)


# ---------------------------------------------------------------------------------------------- running


def ablated(feats: VideoFeatures, ablate: Ablation | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(image, audio, grid)`` of a video with one modality's features zeroed (``ablate``) or as they are."""
    image, audio, grid = feats.image, feats.audio, feats.grid
    if ablate == "visual":
        image = np.zeros_like(image)
        grid = None if grid is None else np.zeros_like(grid)
    elif ablate == "audio":
        audio = np.zeros_like(audio)
    elif ablate is not None:
        raise ConfigError(f"unknown --ablate {ablate!r}; choose one of: {', '.join(ABLATIONS)}")
    return image, audio, grid


def predict_video(runner: HeadRunner, feats: VideoFeatures, ablate: Ablation | None = None) -> np.ndarray:
    """Label probabilities ``[n, L]`` of every segment of one video, as ``vidpipe run`` computes them."""
    image, audio, grid = ablated(feats, ablate)
    n = feats.n_segments
    return runner.label(image, audio, grid, first_segment=0, core_start=0, core_end=n, is_last=True).probs


def decide(probs: np.ndarray, bundle: ModelBundle) -> np.ndarray:
    """Predicted label index ``[n]`` (multiclass) or 0/1 matrix ``[n, L]`` (multilabel, per-label thresholds)."""
    if bundle.head.task == "multilabel":
        return (probs >= np.asarray(bundle.head.label_thresholds(), np.float32)[None, :]).astype(np.float32)
    return probs.argmax(axis=1)


def score(bundle: ModelBundle, ann: AnnotationSet, features: dict[str, VideoFeatures], *,
          ablate: Ablation | None = None, device: str = "cpu") -> Metrics:
    """Run the bundle's head over every annotated video that has features and score it."""
    runner = HeadRunner(bundle.head, bundle.head_state(), device=device, precision="fp32")
    truths, preds = [], []
    for video in ann.videos:
        feats = features.get(video.uri)
        if feats is None:
            continue
        truths.append(segment_targets(video, feats.start_s, feats.end_s, bundle.labels, task=bundle.head.task,
                                      unlabeled=ann.unlabeled))
        preds.append(decide(predict_video(runner, feats, ablate), bundle))
    if not truths:
        raise ConfigError("no annotated video could be decoded; nothing to evaluate")
    truth, pred = np.concatenate(truths), np.concatenate(preds)
    scored = int((truth >= 0).sum()) if truth.ndim == 1 else int((truth >= 0).all(axis=1).sum())
    if not scored:  # accuracy 0.000 of nothing would read as a result
        raise ConfigError(f"annotations {ann.source}: no segment of the {count_of(len(truths), 'decoded video')} has a label to "
                          "score: every segment is outside the annotated spans and --unlabeled ignore leaves such "
                          "segments out; check the times (seconds) and the video paths, or score them as "
                          "background (--unlabeled background)")
    if bundle.head.task == "multilabel":
        return multilabel_metrics(truth, pred, bundle.labels)
    return multiclass_metrics(truth, pred, bundle.labels)


@dataclass
class EvalReport:
    model_id: str
    annotations: str
    ablate: str | None
    n_videos: int
    n_failed: int
    metrics: Metrics
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"  # the encoders' (the head runs in float32, as in `run`)
    fp32_reason: str | None = None  # why --precision auto meant fp32 for this bundle (ModelBundle.fp32_reason)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "annotations": self.annotations, "ablate": self.ablate,
                "precision": self.precision, "fp32_reason": self.fp32_reason, "n_videos": self.n_videos, "n_failed": self.n_failed,
                **self.metrics.to_dict(), "notes": self.notes}


def evaluate(bundle: ModelBundle, annotations: str, videos: str | None, *, ablate: Ablation | None = None,
             unlabeled: UnlabeledMode = "background", cache: str | None = None, address: str | None = None,
             device: str = "auto", precision: str = "auto", say: Callable[[str], None] = print) -> EvalReport:
    """Evaluate ``bundle`` on an annotation file (features extracted with the bundle's own encoders, at the
    precision ``run`` would use with the same ``--precision``)."""
    if ablate is not None and ablate not in ABLATIONS:
        raise ConfigError(f"unknown --ablate {ablate!r}; choose one of: {', '.join(ABLATIONS)}")
    pick_device(device, here=runs_here(address))  # cuda without CUDA: refused
    check_precision(precision)
    reason = bundle.fp32_reason() if precision == "auto" else None
    if reason:
        say(f"--precision auto: {reason}")
    # on a cluster, its nodes say what auto means, as for run
    encoders = job_precision(precision, device, address, bundle)
    if precision == "bf16" and runs_here(address) and (slow := emulated_bf16_warning("bf16", device)):
        say(slow)
    cache_root = cache or default_cache_root()
    check_writable_dir(cache_root, "--cache")
    ann = read_annotations(annotations, videos, task=bundle.head.task, unlabeled=unlabeled, labels=bundle.labels)
    audio_state = bundle.audio_state()
    spec = FeatureSpec(sampling=bundle.sampling, image=bundle.image, audio=bundle.audio,
                       audio_weights=tensors_digest(audio_state), precision=encoders)
    result = extract_features([(v.uri, v.video_id) for v in ann.videos], spec,
                              cache_root, audio_state=audio_state, address=address,
                              device=device, say=say)
    past_the_end = warn_spans_past_the_end(str(annotations), ann.videos, result.features, say)
    metrics = score(bundle, ann, result.features, ablate=ablate)
    notes = [f"{f.uri}: {f.error_kind}: {f.message}" for f in result.failures]
    notes += past_the_end  # the report (JSON or text, often kept in a file) says all that its figures leave out
    return EvalReport(model_id=bundle.model_id, annotations=str(annotations), ablate=ablate,
                      n_videos=len(result.features), n_failed=len(result.failures), metrics=metrics, notes=notes,
                      precision=encoders, fp32_reason=reason)


def format_report(report: EvalReport) -> str:
    """A human-readable report: headline figures, a per-label table, the confusion matrix."""
    m = report.metrics
    lines = [f"model {report.model_id} on {report.annotations}"
             + (f" with {report.ablate} features zeroed (--ablate {report.ablate})" if report.ablate else ""),
             f"{count_of(report.n_videos, 'decoded video')}, {report.n_failed} failed to decode, {m.n_segments} scored segments, "
             f"task {m.task}, encoders {report.precision}",
             f"accuracy {m.accuracy:.3f}" + (" (exact label set)" if m.task == "multilabel" else "")
             + f"   macro-F1 {m.macro_f1:.3f}" + (f"   micro-F1 {m.micro_f1:.3f}" if m.micro_f1 is not None else ""),
             ""]
    width = max([len(x) for x in m.labels] + [5])
    lines.append(f"{'label':<{width}}  precision  recall     f1  support  predicted")
    for name in m.labels:
        c = m.per_class[name]
        lines.append(f"{name:<{width}}  {c.precision:9.3f}  {c.recall:6.3f}  {c.f1:5.3f}  {c.support:7d}  {c.predicted:9d}")
    if m.confusion is not None:
        lines += ["", "confusion matrix (rows: truth, columns: prediction, in label order above)"]
        cell = max(5, *(len(str(x)) for row in m.confusion for x in row))
        for name, row in zip(m.labels, m.confusion, strict=True):
            lines.append(f"{name:<{width}}  " + " ".join(f"{x:>{cell}d}" for x in row))
    for note in report.notes:
        lines.append(note if note.startswith("warning: ") else f"note: {note}")  # not "note: warning: …"
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, as_json: bool, stream: Any = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(report.to_dict(), indent=2) + "\n" if as_json else format_report(report))
