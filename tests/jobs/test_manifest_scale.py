"""A manifest of 100,000 entries: driver memory and per-video overhead.  A measurement: it prints figures
and asserts only correctness (every entry accounted for, memory bounded), never timings.

``python -m tests.jobs.test_manifest_scale [N]`` runs the whole pipeline over N entries (default 100,000).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs.conftest import RUN_FLAGS, VIDPIPE, vidpipe_env
from tests.media_factory import make_video

pytestmark = pytest.mark.slow

N = 100_000
REAL_EVERY = 500  # one entry in 500 is a real (tiny) video; the rest are missing files (fail at once)
SLICE = 501  # the entries the test runs end to end: two real videos (all 100,000: 64 s, python -m ...)


def write_manifest(root: Path, n: int, *, real_every: int = REAL_EVERY) -> Path:
    """``n`` entries: hard links to 4 tiny real clips under distinct names (distinct URIs and ids), and missing paths."""
    clips = [make_video(root / f"clip{k}.mp4", duration_s=1.0, fps=5, size=(64, 48), audio="tone" if k % 2 else None,
                        seed=k) for k in range(4)]
    (root / "real").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        if i % real_every == 0:
            link = root / "real" / f"v{i:07d}.mp4"
            os.link(clips[(i // real_every) % 4], link)
            lines.append(f"real/v{i:07d}.mp4")
        else:
            lines.append(f"missing/shard{i % 97:02d}/v{i:07d}.mp4")
    manifest = root / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def driver_side(manifest: Path, done_fraction: float = 0.5) -> dict:
    """Discovery + done-set + waves alone (no Ray): the driver's cost per entry, in this process."""
    from jobs.discover import discover
    from jobs.idset import IdSet
    from jobs.runner import WaveFeeder

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    every = round(1 / done_fraction)
    done = IdSet(ref.uri for k, ref in enumerate(discover([str(manifest)])) if k % every == 0)  # as a resume loads it
    t_done = time.perf_counter() - t0
    feeder = WaveFeeder(discover([str(manifest)]), done)
    t1 = time.perf_counter()
    peak, waves, todo = 0, 0, 0
    while wave := feeder.next_wave(4096):
        waves += 1
        todo += len(wave)
        peak = max(peak, proc.memory_info().rss)
    t_feed = time.perf_counter() - t1
    return {"entries": feeder.discovered, "skipped": feeder.skipped, "to_do": todo, "waves": waves,
            "done_set_members": len(done), "done_set_mb": round(done.nbytes / 1e6, 2),
            "done_set_bytes_per_id": round(done.nbytes / max(len(done), 1), 1),
            "build_done_set_us_per_entry": round(t_done / feeder.discovered * 1e6, 2),
            "discover_and_feed_us_per_entry": round(t_feed / feeder.discovered * 1e6, 2),
            "driver_rss_growth_mb": round((peak - rss0) / 1e6, 1)}


def end_to_end(manifest: Path, out: Path) -> dict:
    """``vidpipe run`` over the manifest in a subprocess, its RSS sampled; then a rerun that skips everything."""
    figures = {}
    for label in ("run", "rerun_all_done"):
        peak = [0]
        started = time.perf_counter()
        proc = subprocess.Popen([str(VIDPIPE), "run", str(manifest), "--out", str(out), *RUN_FLAGS],
                                env=vidpipe_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watcher = threading.Thread(target=_sample_rss, args=(proc, peak), daemon=True)
        watcher.start()
        stdout, stderr = proc.communicate(timeout=7200)
        wall = time.perf_counter() - started
        watcher.join()
        if proc.returncode not in (0, 3):
            raise RuntimeError(stderr[-3000:])
        figures[label] = {"wall_s": round(wall, 1), "driver_peak_rss_mb": round(peak[0] / 1e6, 1),
                          "summary": stdout.strip().splitlines()[-1]}
    n = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    figures["entries"] = n
    figures["per_video_overhead_ms"] = round(figures["run"]["wall_s"] / n * 1e3, 3)
    return figures


def _sample_rss(proc: subprocess.Popen, peak: list[int]) -> None:
    """The peak RSS of the driver: 'vidpipe run' itself, or the child it runs the driver in (jobs.supervise)."""
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak[0] = max([peak[0], p.memory_info().rss, *(c.memory_info().rss for c in p.children())])
        except psutil.Error:
            pass
        time.sleep(0.2)


def test_manifest_of_100k_entries_driver_memory_and_overhead(tmp_path, capsys):
    manifest = write_manifest(tmp_path, N)
    figures = {"driver_side": driver_side(manifest)}
    d = figures["driver_side"]
    assert d["entries"] == N and d["skipped"] + d["to_do"] == N
    assert d["done_set_bytes_per_id"] <= 16.0 + 1e-9
    # the whole pipeline over a slice of it (the full 100k: python -m tests.jobs.test_manifest_scale)
    small = tmp_path / "slice.txt"
    small.write_text("".join(manifest.read_text().splitlines(keepends=True)[:SLICE]))
    figures[f"end_to_end_{SLICE}"] = end_to_end(small, tmp_path / "out")
    with capsys.disabled():
        print("\nmanifest scale figures:", json.dumps(figures, indent=2))
    assert "2 videos ok, 499 failed" in figures[f"end_to_end_{SLICE}"]["run"]["summary"]
    assert f"{SLICE} skipped" in figures[f"end_to_end_{SLICE}"]["rerun_all_done"]["summary"]


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else N
    with tempfile.TemporaryDirectory() as tmp:
        m = write_manifest(Path(tmp), n)
        result = {"driver_side": driver_side(m), "end_to_end": end_to_end(m, Path(tmp) / "out")}
        print(json.dumps(result, indent=2))
