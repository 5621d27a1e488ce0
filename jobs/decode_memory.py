"""Peak memory of one decode worker on a short and a long video (``python -m jobs.decode_memory``).

A decode worker must hold a bounded amount of a video, whatever its length: chunks stream on, the
frame and audio buffers keep only the current chunk and its context.  This makes videos of the given
lengths (cached), decodes each in a fresh process through the job's decode stage (its decoder child
process included) with the default bundle's sampling, and reports both processes' peak RSS.

With ``--source FILE`` the videos are FILE's packets cut or repeated end to end without re-encoding
(a 2-hour 720p video from a 10-minute film takes seconds); without it they are synthetic H.264 + AAC
(640x360, a few minutes to write for 2 hours).

    python -m jobs.decode_memory --minutes 1 120 --source bbb_film.mp4   # the figures in the README
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.media import ChunkingSpec, SamplingSpec

DEFAULT_CACHE = Path.home() / ".cache" / "vidpipe" / "media"


def make_long_video(path: Path, minutes: float, *, size: tuple[int, int] = (640, 360), fps: int = 24,
                    audio_rate: int = 44_100) -> Path:
    """Write ``minutes`` of H.264 (moving pattern) + AAC (stereo tone) quickly: few distinct frames, cycled."""
    import av
    import numpy as np

    w, h = size
    n_frames = int(round(minutes * 60 * fps))
    tmp = path.with_name(path.name + ".partial")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    frames = []
    for i in range(48):  # a block that moves across a noisy background: real motion for the encoder
        img = base.copy()
        x = (i * w) // 48
        img[h // 4: h // 2, x: x + w // 8] = (255, 64, 0)
        frames.append(img)
    with av.open(str(tmp), mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "30", "g": str(2 * fps)})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = out.add_stream("aac", rate=audio_rate, layout="stereo")
        samples_per_frame = audio_rate // fps
        t = np.arange(samples_per_frame) / audio_rate
        tone = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        audio_block = np.stack([tone, tone])  # planar stereo, fltp
        video_frames = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in frames]
        for i in range(n_frames):
            vf = video_frames[i % len(video_frames)]
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            for packet in vs.encode(vf):
                out.mux(packet)
            af = av.AudioFrame.from_ndarray(audio_block, format="fltp", layout="stereo")
            af.sample_rate = audio_rate
            af.pts = i * samples_per_frame
            af.time_base = Fraction(1, audio_rate)
            for packet in aus.encode(af):
                out.mux(packet)
        for stream in (vs, aus):
            for packet in stream.encode(None):
                out.mux(packet)
    tmp.replace(path)
    return path


def remux_long_video(source: Path, path: Path, minutes: float) -> Path:
    """``minutes`` of ``source``'s own packets: cut at ``minutes`` or repeated with shifted timestamps."""
    import av

    target_s = minutes * 60.0
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(source)) as probe:
        length_s = float(probe.duration or 0) / av.time_base
        streams = [s for s in probe.streams if s.type in ("video", "audio")]
        if length_s <= 0 or not streams:
            raise ValueError(f"{source}: no duration or no audio/video streams to repeat")
    with av.open(str(tmp), mode="w", format="mp4") as out:
        done_s = 0.0
        repeat = 0
        while done_s < target_s:
            with av.open(str(source)) as src:
                ins = [s for s in src.streams if s.type in ("video", "audio")]
                if repeat == 0:
                    outs = {s.index: out.add_stream_from_template(s) for s in ins}
                for packet in src.demux(ins):
                    if packet.pts is None or packet.dts is None:
                        continue
                    tb = packet.time_base
                    t = float(packet.pts * tb)
                    if done_s + t >= target_s:
                        continue  # past the end: drop (audio of other streams may still come)
                    shift = int(round(done_s / tb))
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = outs[packet.stream.index]
                    out.mux(packet)
            done_s += length_s
            repeat += 1
    tmp.replace(path)
    return path


def measure(path: str, sampling: SamplingSpec, chunking: ChunkingSpec, threads: int) -> dict[str, Any]:
    """Decode ``path`` through a DecodeStage in this (fresh) process; return peak RSS of it and its decoder."""
    from workers.decode_stage import DecodeStage
    from workers.rows import peak_rss_mb

    stage = DecodeStage(sampling, chunking, threads=threads, video_timeout_s=600)
    stage.setup()
    started = time.perf_counter()
    segments, chunks, failure = 0, 0, None
    for row in stage.decode_video(path, "memcheck"):
        if row.get("error_kind"):
            failure = f"{row['error_kind']}: {row['error_message']}"
            break
        chunks += 1
        segments += int(row["core_end"]) - int(row["core_start"])
    wall = time.perf_counter() - started
    child_peak = stage.decoder_peak_rss_mb
    stage.close()
    return {"segments": segments, "chunks": chunks, "wall_s": wall, "failure": failure,
            "worker_peak_rss_mb": peak_rss_mb(), "decoder_peak_rss_mb": child_peak}


def run(minutes: list[float], *, cache: Path = DEFAULT_CACHE, size: tuple[int, int] = (640, 360),
        source: Path | None = None, chunk_seconds: float = 60.0, threads: int = 1,
        say: Any = print) -> list[dict[str, Any]]:
    from jobs.models import resolve_bundle
    from workers.build import chunking_for

    bundle = resolve_bundle(None, allow_untrained=False)
    chunking = chunking_for(bundle, chunk_seconds)
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for m in minutes:
        if source is not None:
            path = cache / f"{source.stem}_{m:g}min.mp4"
        else:
            path = cache / f"synthetic_{m:g}min_{size[0]}x{size[1]}.mp4"
        if not path.exists():
            say(f"writing {path} ({m:g} min) ...")
            t = time.perf_counter()
            if source is not None:
                remux_long_video(source, path, m)
            else:
                make_long_video(path, m, size=size)
            say(f"  written in {time.perf_counter() - t:.0f} s")
        # a fresh process per video, so that one's peak cannot hide in the other's
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            r = pool.submit(measure, str(path), bundle.sampling, chunking, threads).result()
        results.append({"minutes": m, "file": str(path), "size_mb": path.stat().st_size / 1e6} | r)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.decode_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 120.0])
    ap.add_argument("--source", type=Path, help="make the videos from this file's packets (no re-encoding)")
    ap.add_argument("--size", default="640x360", help="frame size of synthetic videos, WxH")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--chunk-seconds", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    w, _, h = args.size.partition("x")
    results = run(args.minutes, cache=args.cache, size=(int(w), int(h)), source=args.source,
                  chunk_seconds=args.chunk_seconds,
                  say=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'video':>10} {'file MB':>8} {'segments':>9} {'chunks':>7} {'wall s':>7} {'worker peak MiB':>16} "
          f"{'decoder peak MiB':>17}")
    for r in results:
        print(f"{r['minutes']:>8g} m {r['size_mb']:>8.1f} {r['segments']:>9} {r['chunks']:>7} {r['wall_s']:>7.1f} "
              f"{r['worker_peak_rss_mb']:>16.0f} {r['decoder_peak_rss_mb']:>17.0f}"
              + (f"  FAILED {r['failure']}" if r["failure"] else ""))
    if len(results) >= 2:
        first, last = results[0], results[-1]
        print(f"decoder peak RSS, {last['minutes']:g} min vs {first['minutes']:g} min: "
              f"{last['decoder_peak_rss_mb'] - first['decoder_peak_rss_mb']:+.0f} MiB "
              f"(x{last['decoder_peak_rss_mb'] / first['decoder_peak_rss_mb']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
