"""Per-segment encoder features, extracted once with the job's own Ray stages and cached as Parquet.

Training and evaluation need the image and audio embeddings of every segment, not labels, so they run
the pipeline up to the encoders (decode → image encoder → audio encoder, the same stage classes and
the same ``plan_for`` sizing as ``vidpipe run``) and keep the results:

    <cache root>/<key>/spec.json              what the key stands for (encoders, weights, sampling)
    <cache root>/<key>/<uri hash>.parquet     one file per video: one row per segment

``key`` hashes everything the features depend on: the image encoder spec, the audio encoder spec and
its weights, and the sampling.  A video's file also records the video's size and modification time; a
changed file is extracted again.  A second ``vidpipe train`` with the same encoders reads the cache
("feature cache hit") instead of decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs import stopping
from pipeline.inputs import local_path
from pipeline.media import ChunkingSpec, Failure, SamplingSpec
from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec

log = logging.getLogger(__name__)

# 2: BatchNorm-folded image encoders; 3: classic audio features per segment; 4: decode's t = 0 in AVI, mirrored
# display matrices and a Matroska video's end (2026-12-01); 5: audio that runs on past the video's end makes segments,
# and an MPEG-TS video past FFmpeg's probe starts at its first frame (2026-12-04); 6: an MP4/MOV video ends at its
# track's end where B-frames' decode-order durations reached past it, durations rounded to 1 ns (2026-12-04)
FEATURE_FORMAT_VERSION = 6
# Features do not need head context: chunks of 64 segments without overlap keep memory bounded.
_FEATURE_CHUNKING = ChunkingSpec(core_segments=64, context_segments=0)


def tensors_digest(tensors: dict[str, torch.Tensor] | None) -> str | None:
    """A short content hash of a state dict (None for none)."""
    if not tensors:
        return None
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything per-segment features depend on; ``key`` names their cache directory."""

    sampling: SamplingSpec
    image: ImageEncoderSpec
    audio: AudioEncoderSpec
    audio_weights: str | None = None  # tensors_digest of the audio CNN's state; None: seeded init
    precision: str = "fp32"  # the encoders': "fp32" (train's reference numbers) or "bf16" (eval as run computes)

    def to_dict(self) -> dict[str, Any]:
        d = {"format_version": FEATURE_FORMAT_VERSION, "sampling": self.sampling.to_dict(),
             "image": self.image.to_dict(), "audio": self.audio.to_dict(), "audio_weights": self.audio_weights}
        if self.precision != "fp32":  # fp32 caches keep the keys they had before the field
            d["precision"] = self.precision
        return d

    @property
    def key(self) -> str:
        doc = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(doc).hexdigest()[:16]


@dataclass
class VideoFeatures:
    """The encoder outputs of every segment of one video, in segment order."""

    uri: str
    video_id: str
    start_s: np.ndarray  # float64 [n]
    end_s: np.ndarray  # float64 [n]
    image: np.ndarray  # float32 [n, D]
    audio: np.ndarray  # float32 [n, Da]
    has_audio: bool
    grid: np.ndarray | None = None  # float32 [n, R, D] when the image encoder has a grid

    def __post_init__(self) -> None:
        n = len(self.start_s)
        if len(self.end_s) != n or self.image.shape[0] != n or self.audio.shape[0] != n:
            raise ValueError(f"VideoFeatures of {self.uri}: arrays disagree on the number of segments")
        if self.grid is not None and self.grid.shape[0] != n:
            raise ValueError(f"VideoFeatures of {self.uri}: grid has {self.grid.shape[0]} rows, expected {n}")

    @property
    def n_segments(self) -> int:
        return len(self.start_s)

    def __repr__(self) -> str:
        grid = None if self.grid is None else tuple(self.grid.shape)
        return (f"VideoFeatures(video_id={self.video_id!r}, segments={self.n_segments}, "
                f"image={tuple(self.image.shape)}, audio={tuple(self.audio.shape)}, grid={grid})")


def _file_stamp(uri: str) -> dict[str, int] | None:
    path = local_path(uri)
    if path is None:
        return None  # remote objects are taken as immutable
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class FeatureCache:
    """The Parquet files of one feature key under ``root``."""

    def __init__(self, root: str | os.PathLike[str], spec: FeatureSpec) -> None:
        self.spec = spec
        self.dir = Path(root).expanduser() / spec.key

    def path_for(self, uri: str) -> Path:
        return self.dir / f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}.parquet"

    def load(self, uri: str) -> VideoFeatures | None:
        """The cached features of ``uri``, or None when absent, unreadable or stale."""
        path = self.path_for(uri)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            log.warning("ignoring unreadable feature cache file %s (%s)", path, e)
            return None
        meta = json.loads((table.schema.metadata or {}).get(b"vidpipe.features", b"{}"))
        if meta.get("uri") != uri or meta.get("stamp") != _file_stamp(uri):
            return None
        n = table.num_rows

        def matrix(name: str) -> np.ndarray:
            col = table.column(name).combine_chunks()
            # a writable copy: torch.from_numpy warns on Arrow's read-only buffers
            return np.array(col.values.to_numpy(zero_copy_only=False), np.float32).reshape(n, -1)

        grid = None
        if "grid" in table.column_names:
            grid = matrix("grid").reshape(n, int(meta["grid_cells"]), -1)
        return VideoFeatures(uri=uri, video_id=str(meta["video_id"]),
                             start_s=np.array(table.column("start_s").to_numpy(), np.float64),
                             end_s=np.array(table.column("end_s").to_numpy(), np.float64),
                             image=matrix("image"), audio=matrix("audio"), has_audio=bool(meta["has_audio"]),
                             grid=grid)

    def save(self, feats: VideoFeatures) -> Path:
        """Write one video's features atomically (temporary file + rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.dir / "spec.json"
        if not spec_path.is_file():
            tmp_spec = self.dir / f".spec.{uuid.uuid4().hex}.tmp"
            tmp_spec.write_text(json.dumps(self.spec.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp_spec, spec_path)
        n = feats.n_segments
        cols: dict[str, pa.Array] = {
            "segment_index": pa.array(np.arange(n, dtype=np.int32)),
            "start_s": pa.array(np.asarray(feats.start_s, np.float64)),
            "end_s": pa.array(np.asarray(feats.end_s, np.float64)),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(feats.image.reshape(-1).astype(np.float32)),
                                                       feats.image.shape[1]),
            "audio": pa.FixedSizeListArray.from_arrays(pa.array(feats.audio.reshape(-1).astype(np.float32)),
                                                       feats.audio.shape[1]),
        }
        meta: dict[str, Any] = {"uri": feats.uri, "video_id": feats.video_id, "has_audio": feats.has_audio,
                                "stamp": _file_stamp(feats.uri), "key": self.spec.key}
        if feats.grid is not None:
            cells = feats.grid.shape[1] * feats.grid.shape[2]
            cols["grid"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.grid.reshape(-1).astype(np.float32)), cells)
            meta["grid_cells"] = feats.grid.shape[1]
        table = pa.table(cols).replace_schema_metadata({b"vidpipe.features": json.dumps(meta).encode()})
        path = self.path_for(feats.uri)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        return path


@dataclass
class FeatureResult:
    """Features of the videos that decoded, the failures of those that did not, and how many came from cache."""

    features: dict[str, VideoFeatures]  # uri -> features
    failures: list[Failure]
    cache_hits: int
    extracted: int
    cache_dir: Path


def extract_features(
    videos: list[tuple[str, str]],
    spec: FeatureSpec,
    cache_root: str | os.PathLike[str],
    *,
    audio_state: dict[str, torch.Tensor] | None = None,
    address: str | None = None,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> FeatureResult:
    """Features of ``videos`` (``(uri, video_id)`` pairs): from the cache, else through the Ray stages.

    Args:
        audio_state: the audio CNN's weights (None: seeded init); must match ``spec.audio_weights``.
        say: where progress lines go.
    """
    if tensors_digest(audio_state) != spec.audio_weights:
        raise ValueError("audio_state does not match spec.audio_weights")
    cache = FeatureCache(cache_root, spec)
    found: dict[str, VideoFeatures] = {}
    todo: list[tuple[str, str]] = []
    for uri, video_id in videos:
        cached = cache.load(uri)
        if cached is not None:
            found[uri] = cached
        else:
            todo.append((uri, video_id))
    hits = len(found)
    if hits:
        say(f"feature cache hit: {hits} of {len(videos)} videos read from {cache.dir}")
    failures: list[Failure] = []
    if todo:
        say(f"extracting features of {len(todo)} videos (image {spec.image.name}/{spec.image.weights}, "
            f"audio {spec.audio.kind}, {spec.precision}) into {cache.dir}")
        for feats in _run_stages(todo, spec, audio_state, address=address, device=device, failures=failures,
                                 say=say):
            with stopping.deferred("a feature-cache write"):  # a stop between write and rename would leave a temporary file
                cache.save(feats)
            found[feats.uri] = feats
    return FeatureResult(features=found, failures=failures, cache_hits=hits, extracted=len(todo) - len(failures),
                         cache_dir=cache.dir)


def _run_stages(todo: list[tuple[str, str]], spec: FeatureSpec, audio_state: dict[str, torch.Tensor] | None, *,
                address: str | None, device: str, failures: list[Failure], say: Callable[[str], None]):  # noqa: ANN202
    with stopping.deferred("loading"):  # a stop inside an import leaves a half-made module the cleanup then meets
        import ray
        import ray.data

        from jobs.plan import cluster_nodes, plan_for_cluster
        from jobs.runner import _quiet_ray_data, init_ray
        from pipeline.image_encoder import IMAGE_ENCODER_DIMS
        from workers.decode_stage import DecodeStage
        from workers.encoder_stages import AudioEncoderStage, ImageEncoderStage
        from workers.ray_adapter import add_stage
        from workers.rows import is_failure, iter_rows, row_failure, row_info
        from workers.stage import ChainStage, Stage, StagePlan

    init_ray(address)
    _quiet_ray_data()
    # sized per node like `vidpipe run`'s waves: a plan from the cluster's total could ask for actors no node fits
    plan = plan_for_cluster(cluster_nodes(), device=device, videos=len(todo))
    # fp32 encoders (train): cached features are the reference numbers, the same on every CPU; eval asks for
    # the precision `run` uses
    stages: list[tuple[Stage, StagePlan]] = [
        (DecodeStage(spec.sampling, _FEATURE_CHUNKING, threads=plan.decode.threads or 0), plan.decode),
        (ImageEncoderStage(spec.image, device=plan.image.device, threads=plan.image.threads,
                           precision=spec.precision), plan.image),
        (AudioEncoderStage(spec.audio, sample_rate_hz=spec.sampling.audio_rate_hz, state_dict=audio_state,
                           device=plan.audio.device, threads=plan.audio.threads,
                           image_dim=IMAGE_ENCODER_DIMS[spec.image.name], image_grid=spec.image.grid > 0,
                           precision=spec.precision), plan.audio),
    ]
    if plan.models is not None:  # CPU only: both encoders in one actor pool, as `vidpipe run` does
        stages = [stages[0], (ChainStage([s for s, _ in stages[1:]]), plan.models)]
    ds: ray.data.Dataset = ray.data.from_items([{"uri": uri, "video_id": vid} for uri, vid in todo],
                                               override_num_blocks=max(1, min(len(todo), 1000)))
    for stage, stage_plan in stages:
        ds = add_stage(ds, stage, stage_plan)

    pending: dict[str, dict[str, Any]] = {}
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in iter_rows(batch):
            uri = str(row["uri"])
            if is_failure(row):
                pending.pop(uri, None)
                failures.append(row_failure(row))
                say(f"  failed: {uri}: {row['error_kind']}: {row['error_message']}")
                continue
            entry = pending.setdefault(uri, {"video_id": str(row["video_id"]), "chunks": {}, "n": None})
            first, lo, hi = int(row["first_segment"]), int(row["core_start"]), int(row["core_end"])
            core = slice(lo - first, hi - first)
            grid = row.get("image_grid")
            entry["chunks"][int(row["chunk_index"])] = (
                np.asarray(row["start_s"], np.float64)[core], np.asarray(row["end_s"], np.float64)[core],
                np.asarray(row["image_emb"], np.float32)[core], np.asarray(row["audio_emb"], np.float32)[core],
                None if grid is None else np.asarray(grid, np.float32)[core], bool(row["has_audio"]))
            if bool(row["is_last"]):
                entry["n"] = int(row["chunk_index"]) + 1
                info = row_info(row)
                entry["info_segments"] = info.n_segments if info is not None else None
                entry["info_audio"] = info.has_audio if info is not None else None
            if entry["n"] is not None and len(entry["chunks"]) == entry["n"]:
                del pending[uri]
                parts = [entry["chunks"][i] for i in range(entry["n"])]
                feats = VideoFeatures(
                    uri=uri, video_id=entry["video_id"],
                    start_s=np.concatenate([p[0] for p in parts]), end_s=np.concatenate([p[1] for p in parts]),
                    image=np.concatenate([p[2] for p in parts]), audio=np.concatenate([p[3] for p in parts]),
                    # the video's end knows whether its audio track gave any sound (as the run's output takes it)
                    has_audio=parts[0][5] if entry.get("info_audio") is None else entry["info_audio"],
                    grid=None if parts[0][4] is None else np.concatenate([p[4] for p in parts]))
                expected = entry.get("info_segments")
                if expected is not None and feats.n_segments != expected:
                    raise RuntimeError(f"{uri}: assembled {feats.n_segments} segments, the decoder reported {expected}")
                done += 1
                if done % 25 == 0 or done == len(todo):
                    say(f"  features: {done}/{len(todo)} videos")
                yield feats
    if pending:
        raise RuntimeError(f"{len(pending)} videos did not deliver all their chunks: {sorted(pending)[:3]}")
