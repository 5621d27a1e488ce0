"""``vidpipe bench``: the decode ceiling, the whole pipeline and a naive baseline, on the same files.

Figures are video-seconds per wall-second; the report's point is the ratios:
pipeline / decode-only (how close to the ceiling), pipeline / naive (what vidpipe buys), and the
orchestration efficiency — the pipeline's throughput over the ideal that the stages' isolated
per-segment costs allow on these cores.  Timing lives here, never in pass/fail tests.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from jobs.discover import check_inputs, discover
from jobs.models import resolve_bundle, with_sampling
from jobs.plan import job_precision
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError, MediaError
from pipeline.inputs import local_path
from pipeline.media import ChunkingSpec, SamplingSpec

STAGES = ("decode", "image_encoder", "audio_encoder", "head")


@dataclass(frozen=True)
class _DecodeJob:
    path: str
    sampling: SamplingSpec
    chunking: ChunkingSpec
    threads: int
    skip_unsampled: bool = True


def _decode_only(job: _DecodeJob) -> dict[str, float]:
    """Decode one file exactly as the pipeline samples it (runs in a worker process)."""
    from pipeline.decode import VideoDecoder

    started = time.time()
    segments, duration = 0, 0.0
    decoder = VideoDecoder(job.sampling, job.chunking, threads=job.threads, skip_unsampled=job.skip_unsampled)
    for chunk in decoder.chunks(job.path):
        segments += chunk.core_end - chunk.core_start
        if chunk.info is not None:
            duration = chunk.info.duration_s
    return {"start": started, "end": time.time(), "segments": segments, "video_s": duration}


def decode_ceiling(paths: list[str], sampling: SamplingSpec, chunking: ChunkingSpec, cpus: int) -> dict[str, float]:
    """(a) Decode-only throughput with the pipeline's sampling, all cores busy."""
    n_proc = max(1, min(cpus, len(paths)))
    threads = max(1, cpus // n_proc)
    jobs = [_DecodeJob(p, sampling, chunking, threads) for p in paths]
    with cf.ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as pool:
        pool.submit(int).result()  # start the workers before the clock (spawn imports are not decoding)
        results = list(pool.map(_decode_only, jobs))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    video_s = sum(r["video_s"] for r in results)
    segments = int(sum(r["segments"] for r in results))
    return {"wall_s": wall, "video_s": video_s, "segments": segments, "video_s_per_s": video_s / wall,
            "processes": n_proc, "threads_per_process": threads}


def _check_decodable(paths: list[str], sampling: SamplingSpec) -> None:
    """Refuse, before any measurement, the files the pipeline cannot open or decode the first segment of."""
    from pipeline.decode import VideoDecoder

    first_segment = VideoDecoder(sampling, ChunkingSpec(core_segments=1, context_segments=0), threads=1)
    bad = []
    for path in paths:
        chunks = first_segment.chunks(path)
        try:
            next(chunks, None)
        except MediaError as e:
            bad.append(e)
        finally:
            chunks.close()
    if bad:
        raise _not_measurable(bad)


def _not_measurable(errors: list[MediaError]) -> ConfigError:
    # vidpipe run records such a file as a failure row; a bench would measure less than it was given.
    what = "; ".join(f"{e.uri} ({e.error_kind}: {e.message})" for e in errors)
    return ConfigError(f"bench input{'s' if len(errors) > 1 else ''} cannot be decoded: {what}; remove "
                       f"{'them' if len(errors) > 1 else 'it'} from the bench inputs (bench measures readable "
                       "videos only)")


def _timed(fn: Any, repeat: int = 2) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def isolated_costs(path: str, bundle: ModelBundle, cpus: int, n_segments: int = 48,
                   precision: str = "auto") -> dict[str, float]:
    """Seconds per segment of each model stage alone on ``cpus`` threads, on real decoded segments.

    Also labels the same segments in float32 and reports how many labels the job's precision
    (bf16 where the hardware has it) agrees on.
    """
    import torch

    from pipeline.decode import VideoDecoder

    chunking = ChunkingSpec(core_segments=n_segments, context_segments=0)
    chunk = next(iter(VideoDecoder(bundle.sampling, chunking, threads=cpus).chunks(path)))
    torch.set_num_threads(cpus)
    costs, labels = _stage_costs(chunk, bundle, cpus, precision)
    _, labels_fp32 = _stage_costs(chunk, bundle, cpus, "fp32", timed=False)
    return costs | {"segments_measured": chunk.n_segments,
                    "fp32_label_agreement": float((labels == labels_fp32).mean()) if len(labels) else 1.0}


def _stage_costs(chunk: Any, bundle: ModelBundle, cpus: int, precision: str,
                 timed: bool = True) -> tuple[dict[str, float], np.ndarray]:
    from pipeline.audio_encoder import build_audio_encoder
    from pipeline.head import HeadRunner
    from pipeline.image_encoder import ImageEncoder

    n = chunk.n_segments
    image = ImageEncoder(bundle.image, threads=cpus, precision=precision)  # type: ignore[arg-type]
    image.setup()
    audio = build_audio_encoder(bundle.audio, sample_rate_hz=bundle.sampling.audio_rate_hz, threads=cpus,
                                state_dict=bundle.audio_state(), precision=precision)
    audio.setup()
    feats = image.encode(chunk.frames)
    aud = audio.encode(chunk.audio, chunk.audio_valid_samples)
    head = HeadRunner(bundle.head, bundle.head_state(), threads=cpus, precision="fp32")
    head.setup()
    w = bundle.head.window_segments
    core_end = n if n < w else (n // w) * w

    def run_head() -> Any:
        return head.label(feats.pooled, aud, feats.grid, first_segment=0, core_start=0, core_end=core_end,
                          is_last=True)

    labels = run_head().probs.argmax(axis=1)
    if not timed:
        return {}, labels
    return {
        "image_encoder": _timed(lambda: image.encode(chunk.frames)) / n,
        "audio_encoder": _timed(lambda: audio.encode(chunk.audio, chunk.audio_valid_samples)) / n,
        "head": _timed(run_head) / max(core_end, 1),
    }, labels


def naive_baseline(paths: list[str], bundle: ModelBundle, cpus: int, batch: int = 32,
                   device: str = "cpu", precision: str = "auto") -> dict[str, float]:
    """(c) What a user would write: one process, every frame to RGB, one kept per segment, same image model."""
    import av
    import torch
    import torch.nn.functional as F

    from pipeline.image_encoder import ImageEncoder

    torch.set_num_threads(cpus)
    encoder = ImageEncoder(bundle.image, threads=cpus, device=device, precision=precision)  # type: ignore[arg-type]
    encoder.setup()
    seg_s, size = bundle.sampling.segment_seconds, bundle.sampling.image_size
    started = time.perf_counter()
    video_s, kept_total = 0.0, 0
    for path in paths:
        kept: list[np.ndarray] = []
        next_t = 0.0
        last_t = 0.0
        first_t: float | None = None
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                # from the first frame, as (a) and (b) count: a clock that starts at 10 s (MPEG-TS) made it keep a
                # frame a segment for 10 s of nothing and count 14 video-s for 4 (a helper)
                t = float(frame.time or 0.0)
                first_t = t if first_t is None else first_t
                t -= first_t
                last_t = t
                if t + 1e-9 >= next_t:
                    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                    kept.append(x[0].permute(1, 2, 0).clamp(0, 255).byte().numpy())
                    next_t += seg_s
                    if len(kept) == batch:
                        encoder.encode(np.stack(kept)[:, None])
                        kept_total += len(kept)
                        kept = []
            if kept:
                encoder.encode(np.stack(kept)[:, None])
                kept_total += len(kept)
            rate = stream.average_rate
            video_s += last_t + (1.0 / float(rate) if rate else 0.0)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "video_s": video_s, "segments": kept_total, "video_s_per_s": video_s / wall}


def run_pipeline(inputs: list[str], bundle_args: dict[str, Any], cpus: int) -> dict[str, Any]:
    """(b) The whole pipeline on Ray into a throw-away OUT.

    Ray and Ray Data start before the clock (once per session; the time is reported apart): a
    long job pays them once, while the job's own start (workers, models) is on the clock.
    """
    import ray

    from jobs.plan import plan_for
    from jobs.runner import JobRunner, init_ray, warm_ray_data
    from jobs.spec import JobSpec

    t0 = time.perf_counter()
    init_ray(bundle_args.get("address"))
    warm_ray_data()
    session_start_s = time.perf_counter() - t0
    out = tempfile.mkdtemp(prefix="vidpipe-bench-")
    try:
        # with its --address: the job's models run on the cluster, so --device and --precision auto are the cluster's
        spec = JobSpec(inputs=inputs, out=out, progress=False, **bundle_args)
        with open(os.devnull, "w") as quiet:
            runner = JobRunner(spec, stream=quiet)
            result = runner.run()
        res = ray.cluster_resources()
        plan = runner.plan or plan_for(res.get("CPU", cpus), res.get("GPU", 0.0), device=spec.device)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    pools = {"decode": plan.decode.pool_size, "image_encoder": plan.image.pool_size,
             "audio_encoder": plan.audio.pool_size, "head": plan.head.pool_size}
    m = result.stage_metrics or {}
    segments = int(m.get("segments", 0))
    stages = {}
    for s in STAGES:
        busy = float(m.get("busy_s", {}).get(s, 0.0))
        stages[s] = {
            "workers": pools[s],
            "busy_s": busy,
            "segments_per_busy_s": segments / busy if busy > 0 else None,
            "busy_fraction": busy / (result.wall_s * pools[s]) if result.wall_s > 0 else None,
            "peak_rss_mb": float(m.get("peak_rss_mb", {}).get(s, 0.0)),
        }
    return {"wall_s": result.wall_s, "video_s": result.video_seconds, "segments": segments,
            "video_s_per_s": result.video_seconds / result.wall_s if result.wall_s > 0 else 0.0,
            "videos_failed": result.videos_failed, "model_id": result.model_id, "stages": stages,
            "bf16_emulated_chunks": int(m.get("bf16_emulated_chunks", 0)), "ray_session_start_s": session_start_s}


def _cpu_model() -> str:
    """This machine's CPU as the kernel names it (Linux), else what Python's platform module knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for row in f:
                if row.lower().startswith(("model name", "hardware", "cpu model")):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measured_on() -> dict[str, Any]:
    """When, where and with what a bench ran: figures are quoted with their date and machine (README)."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA setup only leaves the GPU unnamed here
        gpu = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu": _cpu_model(),
            "cpus": os.cpu_count() or 1, "gpu": gpu,
            "versions": {name: of(name) for name in ("vidpipe", "torch", "torchvision", "torchaudio", "ray", "av")}}


def bench(inputs: list[str], *, model: str | None = None, allow_untrained: bool = False,
          segment_seconds: float | None = None, frames_per_segment: int | None = None, chunk_seconds: float = 60.0,
          address: str | None = None, device: str = "auto", skip_naive: bool = False,
          precision: str = "auto") -> dict[str, Any]:
    """Measure (a) decode-only, (b) the pipeline and (c) the naive baseline on the same local files."""
    from jobs.spec import check_chunk_seconds, check_device, runs_here
    from pipeline.precision import pick_device
    from workers.build import chunking_for

    # flags the pipeline run (b) would refuse, refused before anything is measured (it came after (a), minutes in)
    check_chunk_seconds(chunk_seconds)
    check_device(device)
    if runs_here(address):
        pick_device(device)  # --device cuda without a GPU
    check_inputs(inputs)  # a folder without videos, a glob matching nothing: named
    paths = []
    for ref in discover(inputs):
        p = local_path(ref.uri)
        if p is None:
            raise ConfigError(f"bench input {ref.uri} is not a local file; bench reads local files only")
        if not Path(p).is_file():
            raise ConfigError(f"bench input {ref.uri} does not exist; check the path")
        paths.append(p)
    if not paths:
        raise ConfigError(f"bench inputs {' '.join(inputs)} name no video file; pass video files or folders of them")
    bundle = with_sampling(resolve_bundle(model, allow_untrained=allow_untrained), segment_seconds,
                           frames_per_segment)
    cpus = os.cpu_count() or 1
    chunking = chunking_for(bundle, chunk_seconds)
    report: dict[str, Any] = {"measured": measured_on(), "files": len(paths), "cpus": cpus,
                              "model_id": bundle.model_id,
                              "image_encoder": bundle.image.name, "audio_encoder": bundle.audio.kind,
                              "sampling": bundle.sampling.to_dict()}
    _check_decodable(paths, bundle.sampling)
    try:
        report["decode_only"] = decode_ceiling(paths, bundle.sampling, chunking, cpus)
    except MediaError as e:  # damage past the first segment shows only in the full decode
        raise _not_measurable([e]) from e
    # what the isolated costs and the naive baseline run in on this machine's CPU: the job's own rule, so auto is
    # fp32 for a bundle whose training found bf16 scoring it lower, in the pipeline (b) as here
    models = job_precision(precision, "cpu", None, bundle)
    costs = isolated_costs(paths[0], bundle, cpus, precision=models)
    report["precision"] = precision
    report["sample_precision"] = models
    report["fp32_reason"] = bundle.fp32_reason() if precision == "auto" else None
    report["fp32_label_agreement"] = costs["fp32_label_agreement"]
    report["agreement_segments"] = costs["segments_measured"]
    per_seg_video_s = report["decode_only"]["video_s"] / max(report["decode_only"]["segments"], 1)
    decode_cost = report["decode_only"]["wall_s"] / max(report["decode_only"]["segments"], 1)
    ideal_s_per_segment = decode_cost + costs["image_encoder"] + costs["audio_encoder"] + costs["head"]
    report["isolated_s_per_segment"] = {"decode": decode_cost, **{k: costs[k] for k in STAGES[1:]}}
    report["ideal_video_s_per_s"] = per_seg_video_s / ideal_s_per_segment
    report["pipeline"] = run_pipeline(paths, {
        "model": model, "allow_untrained": allow_untrained, "segment_seconds": segment_seconds,
        "frames_per_segment": frames_per_segment, "chunk_seconds": chunk_seconds, "address": address,
        "device": device, "precision": precision}, cpus)
    if not skip_naive:
        report["naive"] = naive_baseline(paths, bundle, cpus, precision=models)
    b = report["pipeline"]["video_s_per_s"]
    report["ratios"] = {
        "pipeline_over_decode": b / report["decode_only"]["video_s_per_s"],
        "pipeline_over_naive": b / report["naive"]["video_s_per_s"] if "naive" in report else None,
        "orchestration_efficiency": b / report["ideal_video_s_per_s"],
    }
    return report


def format_report(r: dict[str, Any], stream: TextIO) -> None:
    def line(text: str = "") -> None:
        print(text, file=stream)

    line(f"vidpipe bench: {r['files']} file{'s' if r['files'] != 1 else ''}, {r['cpus']} CPUs, model {r['model_id']} "
         f"({r['image_encoder']} + {r['audio_encoder']} audio), segment {r['sampling']['segment_seconds']} s, "
         f"{r['sampling']['frames_per_segment']} frame(s)/segment at {r['sampling']['image_size']} px")
    m = r["measured"]
    versions = ", ".join(f"{name} {v}" for name, v in m["versions"].items() if v)
    machine = m["cpu"] + (f" + {m['gpu']}" if m["gpu"] else "")
    line(f"measured {m['date']} on {machine} ({versions})")
    line()
    line(f"{'run':<34} {'video-s':>9} {'wall s':>8} {'video-s/s':>10} {'segments':>9}")
    rows = [("(a) decode only, same sampling", r["decode_only"]), ("(b) pipeline (Ray, audio + video)", r["pipeline"])]
    if "naive" in r:
        rows.append(("(c) naive baseline (video only)", r["naive"]))
    # the ideal is a rate computed from per-segment costs: it has no run, so no video-s, wall time or segments
    rows.append(("    ideal from isolated stage costs", {"video_s_per_s": r["ideal_video_s_per_s"]}))

    def cell(d: dict[str, Any], key: str, fmt: str) -> str:
        return format(d[key], fmt) if d.get(key) is not None else "-"

    for name, d in rows:
        line(f"{name:<34} {cell(d, 'video_s', '.1f'):>9} {cell(d, 'wall_s', '.2f'):>8} "
             f"{cell(d, 'video_s_per_s', '.2f'):>10} {cell(d, 'segments', ''):>9}")
    line()
    ratios = r["ratios"]
    line(f"pipeline / decode-only     = {ratios['pipeline_over_decode']:.2f}")
    if ratios["pipeline_over_naive"] is not None:
        line(f"pipeline / naive baseline  = {ratios['pipeline_over_naive']:.2f}")
    line(f"orchestration efficiency   = {ratios['orchestration_efficiency']:.2f}  (pipeline / ideal)")
    line("video-s/s: seconds of video per second of wall time, higher is better; (b) near (a) means the pipeline "
         "runs at the decoders' ceiling" + (", (b) over (c) is its speed-up over a plain loop" if "naive" in r else ""))
    line(f"(b) excludes starting Ray and Ray Data ({r['pipeline']['ray_session_start_s']:.1f} s, once per session); "
         "its workers' and models' start is included")
    used = f" ({r['sample_precision']} on this machine's CPU)" if r["precision"] == "auto" else ""
    if r.get("fp32_reason"):
        used = " (fp32: the model's bf16 check asks for it)"
    line(f"encoder precision {r['precision']}{used}: labels agree with float32 on "
         f"{r['fp32_label_agreement'] * 100:.1f} % of {r['agreement_segments']} sample segments of the first file")
    if r.get("fp32_reason"):
        line(f"--precision auto: {r['fp32_reason']}")
    if r["pipeline"].get("bf16_emulated_chunks"):
        line(f"WARNING: (b) encoded {r['pipeline']['bf16_emulated_chunks']} chunks in bf16 on a CPU without native "
             "bf16: emulated, several times slower than fp32 (--precision auto picks fp32 there)")
    line()
    line(f"{'stage':<15} {'workers':>7} {'isolated ms/seg':>15} {'busy s':>8} {'seg/busy-s':>10} {'busy frac':>9} "
         f"{'peak RSS MiB':>12}")
    iso = r["isolated_s_per_segment"]
    for s, d in r["pipeline"]["stages"].items():
        rate = f"{d['segments_per_busy_s']:.1f}" if d["segments_per_busy_s"] else "-"
        frac = f"{d['busy_fraction']:.2f}" if d["busy_fraction"] is not None else "-"
        line(f"{s:<15} {d['workers']:>7} {iso[s] * 1000:>15.2f} {d['busy_s']:>8.2f} {rate:>10} {frac:>9} "
             f"{d['peak_rss_mb']:>12.0f}")
    line("isolated ms/seg: a stage's cost per segment alone on this machine; busy s: the time its workers spent "
         "on segments in (b); busy frac: busy s / ((b)'s wall time x workers); peak RSS: the largest worker's memory")
