"""One prepared GPU check, stages in-process (no Ray): correctness on CUDA vs CPU, and the figures that matter.

Run on a GPU machine::

    python -m jobs.gpu_check VIDEO --out report.json

It prints and writes: CPU decode-only throughput (1 core, all cores), NVDEC decode throughput
(1 and 8 streams), encoder throughput on the device, CUDA-vs-CPU agreement (labels equal,
embeddings within bf16 tolerance), the in-process pipeline's video-seconds per second with all
cores decoding into the GPU models, and a naive baseline — with the ratios the performance issue
asks for.  Every section is timed and guarded, so a failure in one still reports the others.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import traceback
from typing import Any

import numpy as np

from jobs.bench import _decode_only, _DecodeJob, naive_baseline
from pipeline.media import ChunkingSpec, SamplingSpec

log = logging.getLogger("vidpipe.gpu_check")
REPORT: dict[str, Any] = {}
N_IMAGES = 2048
DEVICE = "cuda"  # --device cpu runs the same script here, to check it before spending GPU time


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _section(name: str, out_path: str | None):
    """Decorator: run a section, record its result or its error, write the report so far."""
    def wrap(fn):
        def run(*args, **kwargs):
            t = time.time()
            try:
                REPORT[name] = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a broken section must not lose the others' figures
                REPORT[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            REPORT[name + "_section_s"] = round(time.time() - t, 2)
            print(f"== {name}: {json.dumps(REPORT[name], default=str)[:1500]}", flush=True)
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(REPORT, f, indent=2, default=str)
            return REPORT[name]
        return run
    return wrap


def _bundle():
    from jobs.models import default_bundle_path, untrained_bundle
    from pipeline.bundle import ModelBundle

    path = default_bundle_path()
    return ModelBundle.load(path) if path is not None else untrained_bundle()


def decode_cpu(video: str, sampling: SamplingSpec, processes: int, copies: int, skip: bool) -> dict[str, Any]:
    jobs = [_DecodeJob(video, sampling, ChunkingSpec(64, 8), 1, skip) for _ in range(copies)]
    with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("fork")) as pool:
        list(pool.map(int, range(processes)))
        results = list(pool.map(_decode_only, jobs))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    video_s = sum(r["video_s"] for r in results)
    return {"processes": processes, "copies": copies, "skip_unsampled": skip, "wall_s": wall,
            "video_s_per_s": video_s / wall, "fps_equiv": video_s * _fps(video) / wall}


def _fps(video: str) -> float:
    import av

    with av.open(video) as c:
        return float(c.streams.video[0].average_rate or 25)


def decode_nvdec(video: str, sampling: SamplingSpec, streams: int) -> dict[str, Any]:
    from pipeline.decode import VideoDecoder

    records: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Catch()
    logging.getLogger("pipeline.decode").addHandler(handler)

    def one(_: int) -> float:
        n = 0.0
        for chunk in VideoDecoder(sampling, ChunkingSpec(64, 8), hwaccel="cuda").chunks(video):
            if chunk.info:
                n = chunk.info.duration_s
        return n

    one(0)  # warm-up: CUDA context, NVDEC session
    t = time.time()
    with cf.ThreadPoolExecutor(streams) as pool:
        video_s = sum(pool.map(one, range(streams)))
    wall = time.time() - t
    logging.getLogger("pipeline.decode").removeHandler(handler)
    return {"streams": streams, "wall_s": wall, "video_s_per_s": video_s / wall,
            "fps_equiv": video_s * _fps(video) / wall, "fallback_warnings": sorted(set(records))[:3]}


def encoders(device: str) -> dict[str, Any]:

    from pipeline.audio_encoder import AudioEncoder
    from pipeline.image_encoder import ImageEncoder
    from pipeline.specs import AudioEncoderSpec, ImageEncoderSpec

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (N_IMAGES, 1, 224, 224, 3), dtype=np.uint8)
    for name in ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"):
        weights = "default" if name == "efficientnet_lite0" else "none"  # the default bundle's encoder
        enc = ImageEncoder(ImageEncoderSpec(name=name, weights=weights), device=device, batch_size=256)
        enc.setup()
        enc.encode(frames[: N_IMAGES // 4])
        _sync()
        t = time.time()
        enc.encode(frames)
        _sync()
        out[f"image_{name}_img_per_s"] = len(frames) / (time.time() - t)
        del enc
    audio = rng.standard_normal((2 * N_IMAGES, 16000)).astype(np.float32) * 0.1
    aenc = AudioEncoder(AudioEncoderSpec(), device=device, batch_size=512)
    aenc.setup()
    aenc.encode(audio[: N_IMAGES // 4])
    _sync()
    t = time.time()
    aenc.encode(audio)
    _sync()
    out["audio_cnn_seg_per_s"] = len(audio) / (time.time() - t)
    from pipeline.audio_encoder import ClassicAudioEncoder

    classic = ClassicAudioEncoder(AudioEncoderSpec(kind="classic"))
    t = time.time()
    classic.encode(audio[:256])
    out["audio_classic_seg_per_s_one_core"] = 256 / (time.time() - t)
    return out


def _models(bundle, device: str):
    from pipeline.audio_encoder import build_audio_encoder
    from pipeline.head import HeadRunner
    from pipeline.image_encoder import ImageEncoder

    img = ImageEncoder(bundle.image, device=device, batch_size=256)
    aud = build_audio_encoder(bundle.audio, sample_rate_hz=bundle.sampling.audio_rate_hz, device=device,
                              state_dict=bundle.audio_state())
    head = HeadRunner(bundle.head, bundle.head_state(), device=device, precision="fp32")
    return img, aud, head


def correctness(video: str, bundle) -> dict[str, Any]:
    from pipeline.decode import VideoDecoder
    from pipeline.head import topk

    chunk = next(iter(VideoDecoder(bundle.sampling, ChunkingSpec(48, 0)).chunks(video)))
    results = {}
    for device in ("cpu", DEVICE):
        img, aud, head = _models(bundle, device)
        f = img.encode(chunk.frames)
        a = aud.encode(chunk.audio, chunk.audio_valid_samples)
        n = chunk.core_end
        lab = head.label(f.pooled, a, f.grid, first_segment=0, core_start=0, core_end=n, is_last=chunk.is_last)
        results[device] = (f.pooled, a, topk(lab.probs, 1)[0][:, 0], lab.probs)

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        num = (x * y).sum(1)
        den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12
        return float((num / den).min())

    c, g = results["cpu"], results[DEVICE]
    return {"segments": int(len(c[2])), "labels_equal_fraction": float((c[2] == g[2]).mean()),
            "image_emb_min_cosine": cos(c[0], g[0]), "audio_emb_min_cosine": cos(c[1], g[1]),
            "max_abs_prob_diff": float(np.abs(c[3] - g[3]).max()), "model_id": bundle.model_id}


_CHUNKS: Any = None  # in a decode worker: the queue its chunks go to


def _warm_worker(audio_spec: Any, rate_hz: int, chunks: Any = None) -> None:
    """Pool initializer: keep the chunk queue; build the CPU audio features (filterbanks, first FFTs) before the clock."""
    global _CHUNKS
    _CHUNKS = chunks
    if audio_spec is not None:
        from pipeline.audio_encoder import build_audio_encoder

        build_audio_encoder(audio_spec, sample_rate_hz=rate_hz).encode(np.zeros((2, rate_hz), np.float32))


def _decode_to_queue(job: _DecodeJob, index: int, audio_spec: Any = None) -> int:
    """Decode one video, sending each chunk on as soon as it is ready; a CPU audio encoder (the classic
    kind) runs here too, beside its decoder.  A final ``(index, None, None)`` says the video is done."""
    from pipeline.audio_encoder import build_audio_encoder
    from pipeline.decode import VideoDecoder

    enc = build_audio_encoder(audio_spec, sample_rate_hz=job.sampling.audio_rate_hz) if audio_spec else None
    for c in VideoDecoder(job.sampling, job.chunking, threads=job.threads).chunks(job.path):
        _CHUNKS.put((index, c, enc.encode(c.audio, c.audio_valid_samples) if enc is not None else None))
    _CHUNKS.put((index, None, None))
    return index


def pipeline_inprocess(video: str, bundle, processes: int, copies: int) -> dict[str, Any]:
    """All cores decode (processes) and stream chunks to the main process, which runs the models on the GPU.

    The same processes and copies as the decode ceiling, so both see the same waves of videos.
    """
    import queue as queue_mod

    chunking = ChunkingSpec(64, bundle.head.context_segments)
    img, aud, head = _models(bundle, DEVICE)
    img.setup()
    aud.setup()
    head.setup()
    jobs = [_DecodeJob(video, bundle.sampling, chunking, 1) for _ in range(copies)]
    video_s = 0.0
    segments = 0
    gpu_busy = 0.0
    cpu_audio = bundle.audio if bundle.audio.kind == "classic" else None
    # spawn: the parent holds a CUDA context and torch threads, which forked children must not inherit
    ctx = mp.get_context("spawn")
    chunks = ctx.Queue(maxsize=4 * processes)  # bounded: decoders wait rather than pile chunks up
    with cf.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_warm_worker,
                                initargs=(cpu_audio, bundle.sampling.audio_rate_hz, chunks)) as pool:
        list(pool.map(time.sleep, [0.5] * processes))  # every worker started and warmed before the clock
        t0 = time.time()
        futures = [pool.submit(_decode_to_queue, j, i, cpu_audio) for i, j in enumerate(jobs)]
        done = 0
        while done < copies:
            try:
                _, chunk, a_cpu = chunks.get(timeout=1.0)
            except queue_mod.Empty:
                for fut in futures:
                    if fut.done() and fut.exception() is not None:
                        raise RuntimeError(f"a decode worker failed: {fut.exception()!r}") from fut.exception()
                continue
            if chunk is None:
                done += 1
                continue
            g = time.time()
            f = img.encode(chunk.frames)
            a = a_cpu if a_cpu is not None else aud.encode(chunk.audio, chunk.audio_valid_samples)
            head.label(f.pooled, a, f.grid, first_segment=chunk.first_segment, core_start=chunk.core_start,
                       core_end=chunk.core_end, is_last=chunk.is_last)
            _sync()
            gpu_busy += time.time() - g
            segments += chunk.core_end - chunk.core_start
            if chunk.info:
                video_s += chunk.info.duration_s
        wall = time.time() - t0
    return {"processes": processes, "copies": copies, "wall_s": wall, "video_s_per_s": video_s / wall,
            "segments": segments, "gpu_model_busy_fraction": gpu_busy / wall,
            "model_segments_per_busy_s": segments / gpu_busy if gpu_busy else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="a 720p H.264 video with audio")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--copies", type=int, default=32, help="copies of the video for the multi-process runs")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    p.add_argument("--images", type=int, default=2048, help="images per encoder throughput run")
    args = p.parse_args(argv)
    global DEVICE, N_IMAGES
    DEVICE, N_IMAGES = args.device, args.images
    import torch

    cpus = os.cpu_count() or 1
    REPORT["machine"] = {"cpus": cpus, "cuda": torch.cuda.is_available(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         "torch": torch.__version__}
    print(REPORT["machine"], flush=True)
    bundle = _bundle()
    sampling = bundle.sampling
    out = args.out
    _section("decode_cpu_1core", out)(decode_cpu)(args.video, sampling, 1, 1, True)
    _section("decode_cpu_1core_noskip", out)(decode_cpu)(args.video, sampling, 1, 1, False)
    ceiling = _section("decode_cpu_all_cores", out)(decode_cpu)(args.video, sampling, cpus, args.copies, True)
    _section("decode_nvdec_1", out)(decode_nvdec)(args.video, sampling, 1)
    _section("decode_nvdec_8", out)(decode_nvdec)(args.video, sampling, 8)
    _section("encoders_cuda", out)(encoders)(DEVICE)
    _section("correctness_cuda_vs_cpu", out)(correctness)(args.video, bundle)
    pipe = _section("pipeline_inprocess", out)(pipeline_inprocess)(args.video, bundle, cpus, args.copies)
    naive = _section("naive_baseline_gpu", out)(_naive)(args.video, bundle)
    try:
        REPORT["ratios"] = {"pipeline_over_decode_ceiling": pipe["video_s_per_s"] / ceiling["video_s_per_s"],
                            "pipeline_over_naive": pipe["video_s_per_s"] / naive["video_s_per_s"]}
    except (KeyError, TypeError, ZeroDivisionError) as e:
        REPORT["ratios"] = {"error": str(e)}
    print("== ratios:", REPORT["ratios"], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(REPORT, f, indent=2, default=str)
    return 0


def _naive(video: str, bundle) -> dict[str, Any]:
    return naive_baseline([video], bundle, os.cpu_count() or 1, device=DEVICE)


if __name__ == "__main__":
    sys.exit(main())
