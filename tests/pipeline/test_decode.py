"""VideoDecoder against real files: the shared sample clips and media written by tests/media_factory."""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.decode as decode_mod
from pipeline.decode import VideoDecoder, count_segments
from pipeline.errors import ConfigError, MediaError
from pipeline.frame_skip import LOOKAHEAD_PACKETS
from pipeline.media import Chunk, ChunkingSpec, SamplingSpec
from tests import media_factory as mf

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"
needs_media = pytest.mark.skipif(not MEDIA.is_dir(), reason=f"shared sample media not found at {MEDIA}")

ONE_CHUNK = ChunkingSpec(core_segments=10_000, context_segments=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


def decode(
    source, sampling: SamplingSpec | None = None, chunking: ChunkingSpec = ONE_CHUNK, **kw
) -> list[Chunk]:
    return list(VideoDecoder(sampling or SamplingSpec(), chunking).chunks(source, **kw))


def core_rows(chunks: list[Chunk]) -> dict[str, np.ndarray]:
    """Every segment's row, taken from the chunk whose core holds it, in segment order."""
    out: dict[str, list[np.ndarray]] = {}
    for c in chunks:
        for name in ("start_s", "end_s", "frames", "frame_pts_s", "audio", "audio_valid_samples"):
            out.setdefault(name, []).append(getattr(c, name)[c.core_slice])
    return {k: np.concatenate(v) for k, v in out.items()}


def rows_sampled_at(path: Path, duration_s: float, first_frame_s: list[float]) -> dict[str, np.ndarray]:
    """Decode ``path``; check its duration, one segment per listed time and each segment's first frame's time."""
    chunks = decode(path)
    info = chunks[-1].info
    assert info is not None and info.duration_s == pytest.approx(duration_s)
    assert info.n_segments == len(first_frame_s)
    rows = core_rows(chunks)
    np.testing.assert_allclose(rows["frame_pts_s"][:, 0], first_frame_s)
    return rows


def rms(audio: np.ndarray) -> np.ndarray:
    return np.sqrt((audio.astype(np.float64) ** 2).mean(axis=-1))


def targets_s(start_s: float, end_s: float, k: int) -> list[float]:
    return [start_s + (slot + 0.5) * (end_s - start_s) / k for slot in range(k)]


def check_stamps(rows: dict[str, np.ndarray], frame_times_s: list[float]) -> None:
    """Each sampled picture is the frame shown at its target time, and frame_pts_s says so."""
    n, k = rows["frame_pts_s"].shape
    for i in range(n):
        for slot, t in enumerate(targets_s(rows["start_s"][i], rows["end_s"][i], k)):
            expected = mf.frame_shown_at(frame_times_s, t)
            got = mf.read_stamp(rows["frames"][i, slot])
            assert got == expected, f"segment {i} slot {slot} (t={t:.3f}s): frame {got}, expected {expected}"
            assert rows["frame_pts_s"][i, slot] == pytest.approx(frame_times_s[expected], abs=1e-6)


# --- the factory's own stamp ---------------------------------------------------------------------


def test_stamp_round_trip_and_rejects_rotated_pictures() -> None:
    for number in (0, 1, 77, mf.STAMP_MAX):
        img = mf.stamped_image(320, 240, number)
        assert mf.read_stamp(img) == number
        for turns in (1, 2, 3):
            with pytest.raises(mf.StampNotFoundError):
                mf.read_stamp(np.ascontiguousarray(np.rot90(img, turns)))
        with pytest.raises(mf.StampNotFoundError):
            mf.read_stamp(np.ascontiguousarray(img[:, ::-1]))


# --- shared sample clips ---------------------------------------------------------------------------

SHARED = [
    # name, frames, fps, audio channels (None: no audio), audio rate
    pytest.param("bbb_5s_51.mp4", 132, 25, 6, 48_000, id="bbb_5s_51"),
    pytest.param("bikes_noaudio.mp4", 250, 25, None, None, id="bikes_noaudio"),
    pytest.param("bbb_clip_720p.mp4", 1441, 24, 2, 44_100, id="bbb_clip_720p", marks=pytest.mark.slow),
]


@needs_media
@pytest.mark.parametrize(("name", "n_frames", "fps", "channels", "rate_hz"), SHARED)
def test_shared_media_segments_audio_and_info(name, n_frames, fps, channels, rate_hz) -> None:
    path = MEDIA / name
    chunks = decode(path, video_id="v1", chunking=ChunkingSpec(core_segments=16, context_segments=2))
    info = chunks[-1].info
    duration_s = n_frames / fps
    n = math.ceil(duration_s - 1e-3)
    assert info is not None and info.duration_s == pytest.approx(duration_s, abs=1e-6)
    assert info.n_segments == n and info.n_frames_decoded + info.n_frames_skipped == n_frames
    assert (info.video_codec, info.fps, info.rotation_deg, info.video_id) == ("h264", fps, 0, "v1")
    assert info.size_bytes == path.stat().st_size and info.uri == str(path)
    rows = core_rows(chunks)
    np.testing.assert_allclose(rows["start_s"], np.arange(n, dtype=float))
    np.testing.assert_allclose(rows["end_s"], np.minimum(np.arange(1, n + 1), duration_s))
    assert rows["frames"].shape == (n, 1, 224, 224, 3) and rows["frames"].dtype == np.uint8
    # Frames vary (not a constant fill) and are the ones shown at each centre.
    assert rows["frames"].std() > 10
    for i in range(n):
        t = targets_s(rows["start_s"][i], rows["end_s"][i], 1)[0]
        assert rows["frame_pts_s"][i, 0] == pytest.approx(math.floor(t * fps + 1e-6) / fps, abs=1e-6)
    if channels is None:
        assert not info.has_audio and info.audio_codec is None
        assert all(not c.has_audio for c in chunks)
        assert not rows["audio"].any() and not rows["audio_valid_samples"].any()
    else:
        assert info.has_audio and all(c.has_audio for c in chunks)
        assert (info.audio_codec, info.audio_channels, info.audio_rate_hz) == ("aac", channels, rate_hz)
        # The film has sound throughout; the (5.1 or stereo) downmix carries it.
        level = rms(rows["audio"][:-1])
        assert (level > 1e-5).all() and np.median(level) > 1e-3
        assert (rows["audio_valid_samples"][:-1] == 16_000).all()
        assert 0 < rows["audio_valid_samples"][-1] <= 16_000


# --- frame sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment_s", "k"), [(1.0, 1), (1.0, 3), (0.4, 2), (0.1, 1)], ids=["1s-k1", "1s-k3", "0.4s-k2", "0.1s-k1"]
)
def test_sampled_frames_are_those_shown_at_target_times(media_dir: Path, segment_s: float, k: int) -> None:
    # 3.4 s: the last segment is partial and must be sampled within its true end.
    path = mf.make_video(media_dir / "cfr.mp4", duration_s=3.4, fps=25)
    chunks = decode(path, SamplingSpec(segment_seconds=segment_s, frames_per_segment=k))
    rows = core_rows(chunks)
    n = count_segments(3.4, segment_s)
    assert chunks[-1].info is not None and chunks[-1].info.n_segments == n == len(rows["start_s"])
    assert rows["end_s"][-1] == pytest.approx(3.4)
    # segments tile the video: each ends exactly where the next starts (0.1 s ones overlapped by 1e-16 s, so a
    # lookup `start_s <= t < end_s` found two segments)
    np.testing.assert_array_equal(rows["end_s"][:-1], rows["start_s"][1:])
    # the decimal borders: 3 x 0.1 s starts at 0.3, which a query's `start_s = 0.3` finds (not 0.30000000000000004)
    assert rows["start_s"].tolist() == [float(f"{i * segment_s:.9f}") for i in range(n)]
    check_stamps(rows, [i / 25 for i in range(85)])


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_variable_frame_rate_is_sampled_by_presentation_time(media_dir: Path, suffix: str) -> None:
    times = mf.vfr_frame_times(4.3, intervals_s=(0.02, 0.25, 0.04, 0.5, 0.11))
    path = mf.make_video(media_dir / f"vfr.{suffix}", frame_times_s=times, fps=25)
    chunks = decode(path, SamplingSpec(frames_per_segment=3))
    info = chunks[-1].info
    assert info is not None and info.n_frames_decoded + info.n_frames_skipped == len(times)
    # The last frame lasts a container-dependent time; the duration ends after its start.
    assert times[-1] < info.duration_s <= times[-1] + 0.5
    rows = core_rows(chunks)
    assert len(rows["start_s"]) == count_segments(info.duration_s, 1.0)
    assert rows["end_s"][-1] == pytest.approx(info.duration_s)
    check_stamps(rows, times)


def test_short_last_segment_without_a_duration_in_the_header(media_dir: Path, monkeypatch) -> None:
    """Without an announced end the short last segment was sampled from the frames at hand (3.24 s for the
    targets at 3.1 and 3.3 s): the open segment's frames are now held (unconverted) to the end."""
    path = mf.make_video(media_dir / "noend.mkv", duration_s=3.4, fps=25)
    monkeypatch.setattr(decode_mod._VideoRun, "_estimated_end_s", lambda self: None)
    rows = core_rows(decode(path, SamplingSpec(frames_per_segment=2)))
    assert len(rows["start_s"]) == 4 and rows["end_s"][-1] == pytest.approx(3.4)
    check_stamps(rows, [i / 25 for i in range(85)])


class _NoSeek(io.RawIOBase):
    """A file written as a pipe or a live recorder writes it: no seeking back, so no duration in the header."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        return self.f.write(b)


def _write_live_and_whole(media_dir: Path, codec: str, fmt: str, n_frames: int) -> list[Path]:
    """The same 25-fps stream (an IDR every second) muxed live (no duration) and to a seekable file."""
    paths = []
    for live in (True, False):
        path = media_dir / f"{'live' if live else 'whole'}.{fmt}"
        with open(path, "wb") as raw:
            out = av.open(_NoSeek(raw) if live else raw, "w", format=fmt)
            stream = out.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            if codec == "libx264":
                stream.options = {"x264-params": "keyint=25:min-keyint=25:scenecut=0"}
            for i in range(n_frames):
                picture = np.full((120, 160, 3), (i * 7) % 255, np.uint8)
                picture[:8, : i % 160] = 255  # each frame its own
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
            out.close()
        paths.append(path)
    with av.open(str(paths[0])) as c:
        assert c.duration is None and c.streams.video[0].duration is None
    return paths


@pytest.mark.parametrize("codec,fmt", [("libx264", "matroska"), ("libvpx-vp9", "webm")])
def test_a_file_written_live_without_a_duration_is_sampled_as_one_with_it(media_dir: Path, codec: str,
                                                                           fmt: str) -> None:
    """A Matroska/WebM file written live (a browser's MediaRecorder, a pipe) has no duration: its short last
    segment was sampled from the frames at hand, and its H.264 frames were not skipped at all."""
    paths = _write_live_and_whole(media_dir, codec, fmt, 182)  # 7.28 s: a short last segment
    for sampling in (SamplingSpec(frames_per_segment=2, image_size=32),
                     SamplingSpec(segment_seconds=2.5, frames_per_segment=2, image_size=32)):
        live, whole = (decode(p, sampling) for p in paths)
        live_rows, whole_rows = core_rows(live), core_rows(whole)
        np.testing.assert_array_equal(live_rows["frames"], whole_rows["frames"])
        np.testing.assert_array_equal(live_rows["frame_pts_s"], whole_rows["frame_pts_s"])
        assert live[-1].info.duration_s == whole[-1].info.duration_s == pytest.approx(7.28)
        if codec == "libx264":
            assert live[-1].info.n_frames_skipped > 0
            full = core_rows(list(VideoDecoder(sampling, ONE_CHUNK, skip_unsampled=False).chunks(paths[0])))
            np.testing.assert_array_equal(live_rows["frames"], full["frames"])


def test_a_file_written_live_skips_frames_in_segments_longer_than_10_s(media_dir: Path) -> None:
    """Frames in the first seconds of a segment longer than 10 s were all decoded in a file without a duration
    (the end of their segment lay more than 10 s ahead, too far for a later frame to count as proof)."""
    live, whole = _write_live_and_whole(media_dir, "libx264", "matroska", 1000)  # 40 s
    sampling = SamplingSpec(segment_seconds=12.0, frames_per_segment=1, image_size=32)
    chunks = decode(live, sampling)
    rows = core_rows(chunks)
    np.testing.assert_array_equal(rows["frames"], core_rows(decode(whole, sampling))["frames"])
    np.testing.assert_array_equal(rows["frame_pts_s"][:, 0], [6.0, 18.0, 30.0, 38.0])
    # decoded: each target's IDR and, of the GOP before it, the reference frames up to the frame shown until the
    # target's time; the GOP ending at 36 s (its last frame may be shown at 36 s, in the last segment) and the last
    # segment's frames, 35.0 to 39.96 s (before: 332 frames)
    assert chunks[-1].info.n_frames_decoded <= 3 * 25 + 125


def test_only_sampled_frames_are_converted(long_video: Path, monkeypatch) -> None:
    converters: list[decode_mod._Converter] = []

    class RecordingConverter(decode_mod._Converter):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            converters.append(self)

    monkeypatch.setattr(decode_mod, "_Converter", RecordingConverter)
    chunks = decode(long_video, SamplingSpec(image_size=32))
    assert chunks[-1].info is not None and chunks[-1].info.n_frames_decoded + chunks[-1].info.n_frames_skipped == 135
    # 14 sampled frames, plus every frame of the last few seconds (kept so that a short last
    # segment can be sampled at its true end): far fewer than the 135 decoded.
    assert converters[0].n_converted <= 14 + 10 * (2 + 1) + 2


# --- codecs, sizes, rotation -----------------------------------------------------------------------

VIDEO_CODECS = [
    ("mp4", "libx264", "h264"),
    ("mkv", "libx265", "hevc"),
    ("webm", "libvpx", "vp8"),
    ("webm", "libvpx-vp9", "vp9"),
    ("ts", "mpeg2video", "mpeg2video"),  # MPEG-TS starts at 1.4 s: checks the time origin
    ("mpg", "mpeg2video", "mpeg2video"),
]


@pytest.mark.parametrize(
    ("suffix", "codec", "codec_name"), VIDEO_CODECS, ids=[f"{c[1]}.{c[0]}" for c in VIDEO_CODECS]
)
def test_video_codecs_and_containers(media_dir: Path, suffix: str, codec: str, codec_name: str) -> None:
    path = mf.make_video(media_dir / f"codec_{codec}.{suffix}", codec=codec, duration_s=2.6, size=(192, 144))
    chunks = decode(path, SamplingSpec(frames_per_segment=2))
    info = chunks[-1].info
    assert info is not None
    assert (info.video_codec, info.width, info.height, info.n_frames_decoded + info.n_frames_skipped) == (codec_name, 192, 144, 65)
    assert info.duration_s == pytest.approx(2.6, abs=1e-3) and info.n_segments == 3
    rows = core_rows(chunks)
    assert rows["frame_pts_s"][0, 0] == pytest.approx(0.24)  # relative to the video's first frame
    check_stamps(rows, [i / 25 for i in range(65)])


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_time_origin_is_the_first_frame_in_avi_with_b_frames(media_dir: Path, codec: str) -> None:
    # AVI stores decode times: with B-frames the first frame's pts is one frame after the stream's
    # start time (its first decode time).  Taking the start time for t = 0 made 3 s of video 3.04 s
    # long, with a fourth segment holding only the last frame, and sampled every segment 40 ms early.
    path = mf.make_video(media_dir / f"bframes_{codec}.avi", codec=codec, duration_s=3.0, size=(96, 96),
                         audio="tone", audio_codec="libmp3lame", video_options={"bf": "2"})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert next(container.decode(stream)).pts == stream.start_time + 1  # the case in point
    rows = rows_sampled_at(path, 3.0, [0.48, 1.48, 2.48])
    # H.264 in AVI: FFmpeg's guessed pts come out on the wrong frames (1, 2, 4, 3, 6, 5, ...), which sampled
    # frames 11 and 61 at 0.5 s and 2.5 s; put back in order, the frames are those shown then
    check_stamps(rows, [i / 25 for i in range(75)])
    with av.open(str(path)) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    assert (codec == "libx264") == (pts != sorted(pts))  # the case in point
    assert rows["audio_valid_samples"][:2].tolist() == [16_000, 16_000]  # the audio ends 40 ms before the video


@pytest.mark.parametrize("suffix", ["mkv", "webm", "mp4"])
def test_short_last_segment_is_sampled_at_its_centre_when_the_audio_outlasts_the_video(
    media_dir: Path, suffix: str
) -> None:
    # 2.48 s of video, 3.3 s of audio (less than 1 s more: the video's end is the end).  Matroska gives no per-track
    # duration, only the file's (the audio's); taken for the video's end (with 10 s of audio, before audio that runs
    # on made the video longer), it left the short last segment [2, 2.48) sampled from the frames at hand (the last,
    # 2.44) instead of the one shown at its centre (2.24).
    path = mf.make_video(media_dir / f"long_audio.{suffix}", duration_s=2.48, size=(96, 96), audio="tone",
                         audio_duration_s=3.3)
    check_stamps(rows_sampled_at(path, 2.48, [0.48, 1.48, 2.24]), [i / 25 for i in range(62)])


@pytest.mark.parametrize(("suffix", "n_frames"), [("mp4", 1), ("mkv", 1), ("mp4", 62), ("webm", 62)])
def test_audio_that_runs_on_past_the_video_is_labelled_with_the_last_frame_on_screen(
    media_dir: Path, suffix: str, n_frames: int
) -> None:
    # A still image over a song (`ffmpeg -i cover.jpg -i song.mp3 out.mp4` writes one frame): players show the last
    # frame while the audio plays.  It made one segment of the frame's 0.04 s, and past 600 s of audio the rest was
    # called damaged ("an audio frame's time is damaged"); 62 frames (2.48 s) stopped at 3 segments.
    path = mf.make_video(media_dir / f"still_{n_frames}.{suffix}", duration_s=n_frames / 25, size=(96, 96),
                         audio="tone", audio_duration_s=10.0)
    chunks = decode(path, chunking=ChunkingSpec(core_segments=4, context_segments=1))
    info = chunks[-1].info
    # 10 s and the codec's padding of its last audio frame (AAC, Vorbis: tens of ms), which makes no segment
    assert info is not None and info.duration_s == pytest.approx(10.0) and info.n_segments == 10
    assert info.n_frames_decoded == n_frames
    rows = core_rows(chunks)
    check_stamps(rows, [i / 25 for i in range(n_frames)])  # past the last frame, the last frame
    assert (rows["audio_valid_samples"] == 16_000).all() and (rms(rows["audio"]) > 0.3).all()
    # rounded down to a whole segment, the end is the decimal the segments' borders are (6.9, not
    # 6.8999999999999995, at 0.3-s segments: a review)
    short = mf.make_video(media_dir / f"still_{n_frames}_69.{suffix}", duration_s=n_frames / 25, size=(96, 96),
                          audio="tone", audio_duration_s=6.9)
    chunks = decode(short, SamplingSpec(segment_seconds=0.3, image_size=32))
    info = chunks[-1].info
    assert info is not None and info.duration_s == 6.9 and info.n_segments == 23 and chunks[-1].end_s[-1] == 6.9


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "webm"])
def test_a_video_that_has_ended_sends_the_audio_that_runs_on_as_it_comes(
    media_dir: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    # One frame over 90 s of audio: the audio past the frame was held to the file's end (~0.16 MB per second: 685 MB
    # for an hour).  An MP4's index says when the video's packets are all read, a Matroska track's DURATION tag where
    # the video ends: past that, and 30 s of audio on, the decoder is drained and chunks go out with the audio, the
    # same chunks.  (Matroska held it all until 2026-12-04: 661 MB for an hour.)
    path = mf.make_video(media_dir / f"still_90s.{suffix}", duration_s=0.04, size=(96, 96), audio="tone",
                         audio_duration_s=90.0)
    held: list[int] = []
    ensure = decode_mod._AudioTimeline._ensure

    def recording(self, end: int) -> None:  # noqa: ANN001
        ensure(self, end)
        held.append(len(self.buf))

    monkeypatch.setattr(decode_mod._AudioTimeline, "_ensure", recording)
    spec = SamplingSpec(image_size=32)
    chunking = ChunkingSpec(core_segments=4, context_segments=1)
    sent = core_rows(decode(path, spec, chunking))
    most_held_s = max(held) / spec.audio_rate_hz
    held.clear()
    # no context, and cores that end where the audio's padding is rounded off (90 s = 18 x 5): the chunk sent with
    # the audio as it came, ending at 90, was not the last, and no last one followed (a review)
    bare = decode(path, spec, ChunkingSpec(core_segments=5, context_segments=0))
    monkeypatch.setattr(decode_mod, "_RUN_ON_DRAIN_S", math.inf)  # as before: the audio waits for the end
    waited = core_rows(decode(path, spec, chunking))
    assert max(held) / spec.audio_rate_hz > 85 and most_held_s < 45, most_held_s
    assert sent["start_s"].size == 90 and bare[-1].info.n_segments == 90
    for name, values in sent.items():
        np.testing.assert_array_equal(values, waited[name], err_msg=name)
    assert [c.is_last for c in bare] == [False] * 17 + [True] and bare[-1].info is not None
    for name, values in core_rows(bare).items():
        np.testing.assert_array_equal(values, waited[name], err_msg=name)


def test_a_gap_in_audio_that_runs_on_is_no_damaged_time(media_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audio far past the video (here 20 s, as 600 s in the code) that went on after a gap of more than 10 s was
    dropped as damaged times, frame after frame, and failed the video as decode_error (a review): where the track's
    audio has got to counts as reached."""
    monkeypatch.setattr(decode_mod, "_AUDIO_FAR_AHEAD_S", 20.0)
    path = media_dir / "audio_gap.mkv"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=25)
        v.width = v.height = 96
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=44100)
        a.layout = "mono"
        picture = av.VideoFrame.from_ndarray(mf.stamped_image(96, 96, 0), format="rgb24")
        picture.pts = 0
        out.mux(v.encode(picture))
        out.mux(v.encode(None))
        tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(1024) / 44100)).astype(np.float32)[None]
        for start_s, end_s in ((0.0, 25.0), (40.0, 45.0)):
            for first in range(int(start_s * 44100), int(end_s * 44100), 1024):
                frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 44100, first, Fraction(1, 44100)
                out.mux(a.encode(frame))
        out.mux(a.encode(None))
    chunks = decode(path, SamplingSpec(image_size=32))
    info = chunks[-1].info
    assert info is not None and info.n_segments == 45
    heard = core_rows(chunks)["audio_valid_samples"] > 0
    assert heard[:25].all() and not heard[26:39].any() and heard[40:].all()  # (AAC's priming: 39.98 s on)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_video_packets_past_those_the_index_lists_are_decoded_after_a_drain(
    media_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, suffix: str
) -> None:
    """Not seen in a valid file, so made here: an MP4 index that lists 10 of the 20 video packets (a Matroska track
    tagged as ending after 10 frames), the other 10 coming after 35 s of audio.  The decoder, drained after the 10th,
    is reset and decodes them: the frames are those of a decode that never drained (the 11th frame, an IDR, starts
    afresh; no B-frames, and no encoder delay that would write packets of the 35-s frames among the first ones)."""
    times = [i / 25 for i in range(10)] + [35 + i / 25 for i in range(10)]
    path = mf.make_video(media_dir / f"late_video_packets.{suffix}", frame_times_s=times, size=(96, 96), audio="tone",
                         audio_duration_s=36.0, video_options={"tune": "zerolatency",
                                                               "x264-params": "keyint=10:min-keyint=10:scenecut=0"})
    with av.open(str(path)) as probed:  # the file as meant: ten video packets, then 35 s of audio
        kinds = [p.stream.type for p in probed.demux() if p.size]
        assert kinds.index("video", kinds.index("audio", 30) + 1) > 1_000 and kinds[:30].count("video") == 10
    spec, chunking = SamplingSpec(image_size=32), ChunkingSpec(core_segments=4, context_segments=1)
    whole = core_rows(decode(path, spec, chunking))
    setup = decode_mod._VideoRun._setup

    def listing_ten(self) -> None:  # noqa: ANN001
        setup(self)
        if suffix == "mp4":
            self.video_packets_left = 10
        else:
            assert self.video_tagged_end_s == pytest.approx(35.4)  # the track's own end, as FFmpeg tags it
            self.video_tagged_end_s = 0.4

    monkeypatch.setattr(decode_mod._VideoRun, "_setup", listing_ten)
    monkeypatch.setattr(decode_mod._VideoRun, "_estimated_end_s", lambda self: None)  # the track's 35.4 s unsaid
    monkeypatch.setattr(decode_mod, "_RUN_ON_DRAIN_S", 5.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.decode"):
        drained = core_rows(decode(path, spec, chunking))
    listed = "the 20 its index lists" if suffix == "mp4" else "the end its track's DURATION tag gives (0.4 s)"
    assert f"the video has packets past {listed}; decoding them after 0.4 s" in caplog.text, caplog.text
    check_stamps(drained, times)
    for name, values in drained.items():
        np.testing.assert_array_equal(values, whole[name], err_msg=name)


def test_matroska_duration_tags_as_ffmpeg_names_them() -> None:
    tag = decode_mod._duration_tag_s
    assert tag({"DURATION": "00:00:02.480000000"}) == pytest.approx(2.48)
    assert tag({"ENCODER": "x", "DURATION-eng": "01:02:03.5"}) == pytest.approx(3723.5)  # a tag with a language
    assert tag({}) is tag({"DURATION": "n/a"}) is tag({"DURATION": "00:00:00.000"}) is None


@pytest.mark.parametrize(("suffix", "codec"), [("mp4", "libx264"), ("webm", "libvpx-vp9")])
def test_odd_frame_size(media_dir: Path, suffix: str, codec: str) -> None:
    path = mf.make_video(media_dir / f"odd_{codec}.{suffix}", codec=codec, duration_s=2.0, size=(317, 239))
    chunks = decode(path, SamplingSpec(image_size=97))
    info = chunks[-1].info
    assert info is not None and (info.width, info.height) == (317, 239)
    rows = core_rows(chunks)
    assert rows["frames"].shape == (2, 1, 97, 97, 3)
    check_stamps(rows, [i / 25 for i in range(50)])


@pytest.mark.parametrize("rotation_deg", [90, -90, 180])
def test_rotation_is_applied_so_frames_are_upright(media_dir: Path, rotation_deg: int) -> None:
    # Coded 320x240; the factory stores the picture turned so that a player shows the stamp upright.
    path = mf.make_video(
        media_dir / f"rot{rotation_deg}.mp4", duration_s=2.0, size=(320, 240), rotation_deg=rotation_deg
    )
    chunks = decode(path)
    info = chunks[-1].info
    assert info is not None and info.rotation_deg == rotation_deg
    assert (info.width, info.height) == (320, 240)  # coded size, before rotation
    check_stamps(core_rows(chunks), [i / 25 for i in range(50)])


MIRRORS = [(deg, hflip, vflip) for deg in (0, 90, 180, -90) for hflip in (False, True) for vflip in (False, True)
           if hflip or vflip]


@pytest.mark.parametrize(("rotation_deg", "hflip", "vflip"), MIRRORS, ids=[f"{d}-h{int(h)}-v{int(v)}" for d, h, v in MIRRORS])
def test_mirrored_display_matrix_is_shown_as_ffmpeg_players_show_it(
    media_dir: Path, rotation_deg: int, hflip: bool, vflip: bool
) -> None:
    # A front camera's recording: the display matrix mirrors as well as turns.  The factory stores
    # the picture so that FFmpeg's players (their autorotate filters) show the stamp upright and
    # unmirrored; the stamp's ring reads back only so.  Before, a mirror was ignored or taken for a
    # half turn, and the picture came out mirrored or upside down.
    path = mf.make_video(media_dir / f"mirror{rotation_deg}{hflip:d}{vflip:d}.mp4", duration_s=1.0, size=(320, 240),
                         rotation_deg=rotation_deg, hflip=hflip, vflip=vflip)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        written = frame.side_data.get("DISPLAYMATRIX")
        matrix = np.frombuffer(bytes(written), dtype=np.int32).tolist() if written else mf.display_matrix(0)
    assert matrix == mf.display_matrix(rotation_deg, hflip, vflip)  # the factory knows the matrix it wrote
    chunks = decode(path)
    info = chunks[-1].info
    assert info is not None and (info.width, info.height) == (320, 240)
    check_stamps(core_rows(chunks), [i / 25 for i in range(25)])


# --- audio -----------------------------------------------------------------------------------------

AUDIO_CASES = [
    ("mp4", "aac", 1),
    ("mp4", "aac", 6),
    ("mkv", "libmp3lame", 2),
    ("webm", "libopus", 6),
    ("mkv", "libopus", 1),
    ("ts", "aac", 2),
    ("mpg", "mp2", 2),
]


@pytest.mark.parametrize(
    ("suffix", "audio_codec", "channels"), AUDIO_CASES, ids=[f"{c[1]}-{c[2]}ch.{c[0]}" for c in AUDIO_CASES]
)
def test_audio_windows_are_aligned(media_dir: Path, suffix: str, audio_codec: str, channels: int) -> None:
    path = mf.make_video(
        media_dir / f"tone_{audio_codec}_{channels}.{suffix}",
        duration_s=4.0,
        size=(96, 96),
        audio="tone",
        audio_codec=audio_codec,
        audio_channels=channels,
        tone_start_s=2.0,
    )
    chunks = decode(path, chunking=ChunkingSpec(core_segments=1, context_segments=1))
    info = chunks[-1].info
    assert info is not None and info.has_audio and info.audio_channels == channels
    rows = core_rows(chunks)
    assert rows["audio"].shape == (4, 16_000) and rows["audio"].dtype == np.float32
    level = rms(rows["audio"])
    assert level[0] < 1e-4, level  # long before the tone
    assert level[1] < 0.01, level  # just before it (codec pre-echo is tiny)
    assert (level[2:] > 0.2).all(), level
    assert (rows["audio_valid_samples"][:3] == 16_000).all()
    assert rows["audio_valid_samples"][3] >= 15_900


def test_audio_is_placed_by_its_timestamps(media_dir: Path) -> None:
    # The audio track starts 1.5 s after the video: nothing before, tone after.
    path = mf.make_video(
        media_dir / "late.mkv", duration_s=4.0, size=(96, 96), audio="tone", audio_start_s=1.5
    )
    rows = core_rows(decode(path))
    valid = rows["audio_valid_samples"]
    assert valid[0] == 0 and abs(valid[1] - 8_000) <= 16 and (valid[2:] == 16_000).all()
    assert not rows["audio"][0].any() and not rows["audio"][1, :7_980].any()
    assert rms(rows["audio"][1, 8_020:]) > 0.3 and (rms(rows["audio"][2:]) > 0.3).all()


@pytest.mark.parametrize("video_start_s", [3.0, 8.0])
def test_video_that_starts_long_after_the_audio_starts_the_timeline(media_dir: Path, video_start_s: float) -> None:
    # MPEG-TS whose video starts 8 s after its audio: past FFmpeg's probe window (~7 s), so the stream gets the
    # container's start time and its time base (90,000) for a rate; t = 0 is still the video's first frame.
    frame_times = [i / 25 for i in range(50)]
    path = mf.make_video(media_dir / f"video_from_{video_start_s:g}s.ts", frame_times_s=[video_start_s + t for t in
                         frame_times], size=(96, 96), codec="libx264", audio="tone", audio_codec="aac",
                         audio_duration_s=video_start_s + 2.0,
                         tone_start_s=video_start_s)
    with av.open(str(path)) as probed:  # the case: FFmpeg's probe saw no frame of the 8 s one
        assert (probed.streams.video[0].codec_context.width == 0) == (video_start_s > 7)
    rows = rows_sampled_at(path, 2.0, [0.48, 1.48])
    check_stamps(rows, frame_times)
    assert (rows["audio_valid_samples"] == 16_000).all() and (rms(rows["audio"]) > 0.3).all()  # the tone, from 0
    info = decode(path)[-1].info
    assert info is not None and info.fps == pytest.approx(25) and (info.width, info.height) == (96, 96)
    # the audio running on 5 s past it: the frame rate is of the video's 2 s, not 50 frames over 7 s (a review)
    longer = mf.make_video(media_dir / f"video_from_{video_start_s:g}s_audio_on.ts", frame_times_s=[
        video_start_s + t for t in frame_times], size=(96, 96), codec="libx264", audio="tone", audio_codec="aac",
        audio_duration_s=video_start_s + 7.0, tone_start_s=video_start_s)
    info = decode(longer)[-1].info
    assert info is not None and info.duration_s == pytest.approx(7.0, abs=0.05) and info.fps == pytest.approx(25)


def _write_pcm_with_jumps(path: Path, jumps: dict[int, int], duration_s: float = 4.0) -> Path:
    """25 fps video + 48 kHz stereo PCM in 1024-sample blocks; block i starts jumps[i] samples late (or early)."""
    import av

    rate, block = 48_000, 1024
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=rate)
        audio.layout = "stereo"
        pts, i = 0, 0
        blocks = []
        while pts < (duration_s + 0.5) * rate:
            pts += jumps.get(i, 0)
            blocks.append(pts)
            pts, i = pts + block, i + 1
        for n in range(int(duration_s * 25)):
            while blocks and blocks[0] <= n * rate // 25:
                data = rng.integers(-8000, 8000, (1, 2 * block), dtype=np.int16)
                frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
                frame.sample_rate, frame.pts = rate, blocks.pop(0)
                out.mux(audio.encode(frame))
            picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), n, dtype=np.uint8), format="rgb24")
            picture.pts = n
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        for pts in blocks:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 2 * block), dtype=np.int16), format="s16", layout="stereo")
            frame.sample_rate, frame.pts = rate, pts
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def test_audio_timestamp_jumps_over_10ms_leave_a_gap_smaller_ones_do_not(media_dir: Path) -> None:
    # +-5 ms (240 samples at 48 kHz) are absorbed: frames are laid back to back; +0.5 s is a real gap.
    path = _write_pcm_with_jumps(media_dir / "jumps.mkv", {10: 240, 20: -240, 100: 24_000})
    rows = core_rows(decode(path))
    valid = rows["audio_valid_samples"]
    assert (valid[[0, 1, 3]] == 16_000).all(), valid
    # Block 100 starts 0.5 s late, at 2.14 s (Matroska rounds timestamps to 1 ms: +-16 samples).
    assert abs(valid[2] - 8_000) <= 16, valid
    # The silence is where the gap is: the longest run of zeros, from 100 * 1024 / 3 - 32_000 on
    # (less the resampler's filter delay, 16 samples).
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (rows["audio"][2] == 0).astype(np.int8), [0]])))
    runs = edges.reshape(-1, 2)
    start, end = runs[np.argmax(runs[:, 1] - runs[:, 0])]
    assert abs(start - (100 * 1024 / 3 - 32_000)) <= 32 and abs(end - start - 8_000) <= 16, (start, end)


def test_resampled_audio_is_read_without_its_padding() -> None:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
    rng = np.random.default_rng(1)
    frames = []
    for n in (1024, 1000, 7, 4096, 333):
        src = av.AudioFrame.from_ndarray(rng.uniform(-1, 1, (2, n)).astype(np.float32), format="fltp", layout="stereo")
        src.sample_rate = 48_000
        frames += resampler.resample(src)
    frames += resampler.resample(None)
    padded = 0
    for frame in frames:
        samples = decode_mod._mono_samples(frame)
        expected = frame.to_ndarray().reshape(-1)
        assert samples.dtype == np.float32 and samples.shape == (frame.samples,)
        np.testing.assert_array_equal(samples, expected)
        padded += frame.planes[0].buffer_size > 4 * frame.samples
    assert padded  # FFmpeg aligns its buffers: the plane is longer than the samples
    # Anything but packed float mono falls back to to_ndarray.
    stereo = av.AudioFrame.from_ndarray(np.arange(8, dtype=np.float32).reshape(1, 8), format="flt", layout="stereo")
    np.testing.assert_array_equal(decode_mod._mono_samples(stereo), np.arange(8, dtype=np.float32))


def test_silent_audio_track_is_audio(media_dir: Path) -> None:
    path = mf.make_video(media_dir / "silence.mp4", duration_s=2.0, size=(96, 96), audio="silence")
    chunks = decode(path)
    assert chunks[0].has_audio and chunks[0].info is not None and chunks[0].info.has_audio
    assert np.abs(chunks[0].audio).max() < 1e-4 and (chunks[0].audio_valid_samples == 16_000).all()


# --- chunking and memory ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_video(media_dir: Path) -> Path:
    # 13.5 s at 10 fps: many segments, cheap to decode; audio is noise so every window differs.
    return mf.make_video(media_dir / "long.mp4", duration_s=13.5, fps=10, size=(128, 96), audio="noise")


@pytest.mark.parametrize(("core", "context"), [(3, 2), (1, 0), (4, 1), (2, 5)])
def test_many_chunks_equal_one_chunk(long_video: Path, core: int, context: int) -> None:
    sampling = SamplingSpec(frames_per_segment=2, image_size=64)
    single = decode(long_video, sampling)
    many = decode(long_video, sampling, ChunkingSpec(core_segments=core, context_segments=context))
    assert len(single) == 1
    n = 14
    assert single[0].info is not None and single[0].info.n_segments == n
    assert len(many) == math.ceil(n / core)
    one = {
        name: getattr(single[0], name)
        for name in ("start_s", "end_s", "frames", "frame_pts_s", "audio", "audio_valid_samples")
    }
    for j, c in enumerate(many):
        core_start, core_end = j * core, min((j + 1) * core, n)
        first, end = max(0, core_start - context), min(n, core_end + context)
        assert (c.chunk_index, c.core_start, c.core_end, c.first_segment) == (j, core_start, core_end, first)
        assert c.n_segments == end - first
        assert c.is_last == (j == len(many) - 1) and (c.info is not None) == c.is_last
        # Every row, context included, equals the single-chunk decode of that segment.
        for name, ref in one.items():
            np.testing.assert_array_equal(getattr(c, name), ref[first:end], err_msg=f"chunk {j} {name}")
    assert many[-1].info == single[0].info
    check_stamps(core_rows(many), [i / 10 for i in range(135)])


class _ReadTracker(io.BytesIO):
    """An in-memory file that remembers how far it has been read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.max_pos = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.max_pos = max(self.max_pos, self.tell())
        return out


def test_chunks_stream_with_memory_bounded_by_the_chunk(media_dir: Path, monkeypatch) -> None:
    # IDR every 2 s: the frame-skip gate holds a GOP's packets until the next IDR
    path = mf.make_video(media_dir / "stream.mkv", duration_s=30.0, fps=10, size=(128, 96), audio="noise",
                         video_options={"x264-params": "keyint=20:min-keyint=20:scenecut=0"})
    stores: list[decode_mod._SegmentStore] = []

    class RecordingStore(decode_mod._SegmentStore):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            stores.append(self)

    monkeypatch.setattr(decode_mod, "_SegmentStore", RecordingStore)
    for core, context in ((3, 1), (5, 3)):
        source = _ReadTracker(path.read_bytes())
        size = len(source.getvalue())
        read_at_chunk = []
        dec = VideoDecoder(
            SamplingSpec(image_size=32), ChunkingSpec(core_segments=core, context_segments=context)
        )
        for _ in dec.chunks(source):
            read_at_chunk.append(source.max_pos / size)
        assert len(read_at_chunk) == math.ceil(30 / core)
        # Chunk j is handed out once about (j + 1) * core + context seconds are read, not at the end
        # (+5 s: FFmpeg reads the file in blocks of a few seconds of this video; + the frame-skip
        # gate's look-ahead to the next IDR, 2 s, and B-frame reordering).
        slack_s = 5 + 2 + LOOKAHEAD_PACKETS / 10
        for j, fraction in enumerate(read_at_chunk[:-2]):
            assert fraction < ((j + 1) * core + context + slack_s) / 30, (j, read_at_chunk)
        # Segments held at once: the core and its context on both sides, never the whole video.
        assert stores[-1].max_retained <= core + 2 * context


def test_badly_interleaved_audio_is_still_placed(media_dir: Path) -> None:
    # All video handed to the muxer before any audio: audio lags the video by up to ~20 s in file order.
    path = mf.make_video(
        media_dir / "lagging.mkv", duration_s=24.0, fps=5, size=(96, 96), audio="noise", interleave=False
    )
    sampling = SamplingSpec(image_size=32)
    single = decode(path, sampling)[0]
    rows = core_rows(decode(path, sampling, ChunkingSpec(core_segments=2, context_segments=1)))
    np.testing.assert_array_equal(rows["audio"], single.audio)
    assert (rows["audio_valid_samples"] == 16_000).all()


def test_file_objects_decode_like_paths(long_video: Path) -> None:
    sampling = SamplingSpec(image_size=64)
    chunking = ChunkingSpec(core_segments=5, context_segments=1)
    by_path = decode(long_video, sampling, chunking)
    with open(long_video, "rb") as f:
        by_file = decode(f, sampling, chunking)
    by_bytes = decode(
        io.BytesIO(long_video.read_bytes()), sampling, chunking, uri="s3://bucket/long.mp4", size_bytes=7
    )
    for a, b, c in zip(by_path, by_file, by_bytes, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.audio, c.audio)
    assert by_file[-1].uri == str(long_video)  # a real file object's name
    last = by_bytes[-1]
    assert last.uri == "s3://bucket/long.mp4" and last.info is not None and last.info.size_bytes == 7


def test_stopping_early_closes_the_container(long_video: Path, monkeypatch) -> None:
    opened = []
    real_open = decode_mod._open

    class Spy:
        def __init__(self, container) -> None:
            self.container, self.closed = container, False

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.closed = True
            self.container.close()

    def spy_open(source, uri, hwaccel=None):
        opened.append(Spy(real_open(source, uri, hwaccel)))
        return opened[-1]

    monkeypatch.setattr(decode_mod, "_open", spy_open)
    gen = VideoDecoder(SamplingSpec(image_size=32), ChunkingSpec(core_segments=2, context_segments=1)).chunks(
        long_video
    )
    first = next(gen)
    assert first.chunk_index == 0 and not first.is_last and not opened[0].closed
    gen.close()
    assert opened[0].closed


def test_gpu_decoding_where_no_gpu_decoder_can_open_falls_back_to_the_same_chunks(shared_media, caplog) -> None:
    """``--decode-device cuda`` on a machine whose FFmpeg has CUDA but no usable GPU (this one): each file is
    decoded in software, with a warning naming it, into the very chunks a CPU decode gives."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a usable GPU decodes with NVDEC: compared with software decoding by jobs.gpu_check")
    path = shared_media / "bbb_5s_51.mp4"
    sampling, chunking = SamplingSpec(), ChunkingSpec(core_segments=4, context_segments=1)
    cpu = list(VideoDecoder(sampling, chunking).chunks(path))
    with caplog.at_level(logging.WARNING, logger="pipeline.decode"):
        cuda = list(VideoDecoder(sampling, chunking, hwaccel="cuda").chunks(path))
    assert len(cuda) == len(cpu) == 2
    for a, b in zip(cpu, cuda, strict=True):
        for name in ("start_s", "end_s", "frames", "frame_pts_s", "audio", "audio_valid_samples"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.first_segment, a.core_start, a.core_end, a.is_last) == (b.first_segment, b.core_start, b.core_end,
                                                                        b.is_last)
    assert any("decoding in software" in r.getMessage() for r in caplog.records), caplog.text


# --- errors ------------------------------------------------------------------------------------------


def expect_error(source, kind: str) -> MediaError:
    with pytest.raises(MediaError) as info:
        decode(source)
    assert info.value.error_kind == kind, info.value
    assert info.value.message and str(source) in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    err = expect_error(tmp_path / "nope.mp4", "not_found")
    assert "no such file" in err.message


def test_a_link_to_a_missing_file_says_so(tmp_path: Path) -> None:
    """A dangling link said "no such file", while `ls` shows the name (found by a helper)."""
    from pipeline.errors import MediaError
    from pipeline.inputs import open_input

    (tmp_path / "clip.mp4").symlink_to(tmp_path / "gone" / "clip.mp4")
    with pytest.raises(MediaError) as info, open_input(str(tmp_path / "clip.mp4")):
        pass
    assert info.value.error_kind == "not_found"
    assert info.value.message == (f"a symbolic link to {str(tmp_path / 'gone' / 'clip.mp4')!r}, which does not "
                                  "exist; restore the file or fix the link")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    expect_error(tmp_path, "unreadable")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_permission_denied(media_dir: Path, tmp_path: Path) -> None:
    path = mf.make_video(tmp_path / "locked.mp4", duration_s=1.0, size=(96, 96))
    path.chmod(0)
    try:
        expect_error(path, "unreadable")
    finally:
        path.chmod(0o600)


def test_permission_error_is_unreadable(monkeypatch) -> None:
    # Also runs as root (where chmod cannot take read access away).
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode_mod.av, "open", denied)
    err = expect_error("/data/locked.mp4", "unreadable")
    assert "permission" in err.message


@pytest.mark.parametrize("kind, error_kind", [("garbage", "invalid_data"), ("empty", "invalid_data"),
                                              ("truncated", "truncated")])
def test_not_a_media_file(media_dir: Path, tmp_path: Path, kind: mf.CorruptKind, error_kind: str) -> None:
    source = mf.make_video(media_dir / "to_truncate.mp4", duration_s=1.0, size=(96, 96), audio="tone")
    path = mf.make_corrupt(tmp_path / f"{kind}.mp4", kind=kind, source=source)
    err = expect_error(path, error_kind)
    # an empty file is said to be one (it read as FFmpeg's 'Invalid data found', as for garbage)
    assert ("the file is empty (0 bytes)" in err.message) == (kind == "empty")
    if kind == "empty":
        with open(path, "rb") as f:  # as S3 objects are read: a file object
            with pytest.raises(MediaError, match=r"the file is empty \(0 bytes\)"):
                decode_mod._open(f, str(path))


@pytest.mark.parametrize("suffix", ["m4a", "mp3"])
def test_audio_only_file_has_no_video_stream(tmp_path: Path, suffix: str) -> None:
    path = mf.make_audio(tmp_path / f"song.{suffix}", duration_s=1.0)
    err = expect_error(path, "no_video_stream")
    assert "audio-only" in err.message


def test_an_mp4_whose_index_is_damaged_is_invalid_data_not_a_file_without_video(tmp_path: Path) -> None:
    """The moov box's content zeroed: FFmpeg opens the file and finds no track at all.  That read as
    no_video_stream, "a file without a video track", where the file is damaged."""
    path = mf.make_video(tmp_path / "clip.mp4", duration_s=1.0, size=(96, 96), audio="tone")
    data = bytearray(path.read_bytes())
    at = data.find(b"moov") - 4
    size = int.from_bytes(data[at:at + 4], "big")
    data[at + 8:at + size] = bytes(size - 8)
    path.write_bytes(bytes(data))
    err = expect_error(path, "invalid_data")
    assert "found no track at all in this file: it is damaged (an MP4's index, its moov box, unreadable)" in \
        err.message, err.message


def dominant_hz(chunks: list[Chunk], rate_hz: int = SamplingSpec().audio_rate_hz) -> float:
    audio = core_rows(chunks)["audio"].ravel().astype(np.float64)
    return float(np.argmax(np.abs(np.fft.rfft(audio))) * rate_hz / len(audio))


def test_a_video_codec_without_a_decoder_is_unsupported_codec(media_dir: Path, tmp_path: Path) -> None:
    """A video track FFmpeg has no decoder for failed as internal_error, a Python traceback for message
    (found by a helper)."""
    source = mf.make_video(media_dir / "to_relabel.mp4", duration_s=2.0, audio="tone")
    err = expect_error(mf.without_decoder(tmp_path / "unknown_video.mp4", source, "video"), "unsupported_codec")
    assert "its video track has a codec this FFmpeg build" in err.message and "ffmpeg -i IN" in err.message
    assert "Traceback" not in err.message


def test_an_audio_track_without_a_decoder_is_left_out(media_dir: Path, tmp_path: Path, caplog) -> None:
    """AC-4 or MPEG-H audio (broadcast formats this FFmpeg build cannot decode) failed the whole video as
    internal_error; the picture is labelled, without audio, and a warning names the track."""
    source = mf.make_video(media_dir / "to_relabel.mp4", duration_s=2.0, audio="tone")
    path = mf.without_decoder(tmp_path / "ac4.mp4", source, "audio")
    with caplog.at_level(logging.WARNING, logger="pipeline.decode"):
        chunks = decode(path)
    info = chunks[-1].info
    assert info is not None and info.n_segments == 2 and not info.has_audio
    assert info.audio_codec == "(no decoder)" and info.audio_rate_hz is None
    assert not any(c.has_audio for c in chunks) and not core_rows(chunks)["audio"].any()
    assert f"{path}: audio stream 1 has a codec this FFmpeg build cannot decode; labelled without audio" in caplog.text


def test_the_first_audio_track_ffmpeg_can_decode_is_used(media_dir: Path, tmp_path: Path) -> None:
    source = mf.make_video(media_dir / "to_relabel.mp4", duration_s=2.0, audio="tone", tone_hz=440)
    second = mf.make_audio(tmp_path / "second.m4a", duration_s=2.0, tone_hz=1000)
    both = mf.combine_streams(tmp_path / "two_tracks.mp4", source, second)
    assert dominant_hz(decode(both)) == pytest.approx(440, abs=5)  # the first track, as before
    chunks = decode(mf.without_decoder(tmp_path / "ac4_first.mp4", both, "audio"))
    info = chunks[-1].info
    assert info is not None and info.has_audio and info.audio_codec == "aac"
    assert dominant_hz(chunks) == pytest.approx(1000, abs=5)


def test_one_program_with_two_audio_tracks_takes_the_first(tmp_path: Path) -> None:
    """A TS of one service with two audio tracks (a low-rate one first): the first, as before (a review found
    FFmpeg's own choice, which ranks by bitrate, would have changed it)."""
    tv = mf.make_video(tmp_path / "tv.mp4", duration_s=2.0, audio="tone", tone_hz=440)
    second = mf.make_audio(tmp_path / "second.mp2", duration_s=2.0, tone_hz=1000, codec="mp2", rate_hz=48_000)
    both = mf.combine_streams(tmp_path / "one_service.ts", tv, second)
    chunks = decode(both)
    assert dominant_hz(chunks) == pytest.approx(440, abs=5)


def test_a_broadcast_multiplex_gives_the_video_its_own_programs_audio(tmp_path: Path) -> None:
    """In an MPEG-TS of several services (a radio station's listed first) the TV picture got the radio's sound:
    the first audio track of the file, not of its program (found by a helper)."""
    radio = mf.make_audio(tmp_path / "radio.m4a", duration_s=3.0, channels=2, rate_hz=48_000, tone_hz=1000)
    tv = mf.make_video(tmp_path / "tv.mp4", duration_s=3.0, audio="tone", audio_rate_hz=44_100, tone_hz=440)
    mux = mf.make_multiprogram_ts(tmp_path / "multiplex.ts", radio, tv)
    with av.open(str(mux)) as c:
        assert [s.type for s in c.streams] == ["audio", "video", "audio"]
    chunks = decode(mux)
    info = chunks[-1].info
    assert info is not None and info.n_segments == 3
    assert (info.audio_channels, info.audio_rate_hz) == (1, 44_100)
    assert dominant_hz(chunks) == pytest.approx(440, abs=5)
    # a TV service without sound gets none, not the radio's
    silent_tv = mf.make_video(tmp_path / "silent_tv.mp4", duration_s=3.0)
    info = decode(mf.make_multiprogram_ts(tmp_path / "silent.ts", radio, silent_tv))[-1].info
    assert info is not None and not info.has_audio and info.audio_codec is None


def test_a_raw_dv_tape_capture_gives_its_frame_rate(tmp_path: Path) -> None:
    """FFmpeg's DV demuxer gives the stream's time base (60,000) as its average frame rate: videos.fps said
    60000 for an NTSC tape capture (found by a helper)."""
    from fractions import Fraction

    path = tmp_path / "tape.dv"
    rate = Fraction(30000, 1001)
    with av.open(str(path), "w", format="dv") as out:
        stream = out.add_stream("dvvideo", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 720, 480, "yuv411p"
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(mf.stamped_image(720, 480, i), format="rgb24").reformat(format="yuv411p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == 60000  # FFmpeg's, as found
    chunks = decode(path)
    info = chunks[-1].info
    assert info is not None and info.fps == pytest.approx(29.97, abs=0.01)
    assert info.duration_s == pytest.approx(2.002) and info.n_segments == 3
    check_stamps(core_rows(chunks), [float(i / rate) for i in range(60)])


@pytest.mark.parametrize(("codec", "pix_fmt", "name"), [("png", "rgb24", "PNG"), ("mjpeg", "yuvj420p", "JPEG"),
                                                    ("libwebp", "yuv420p", "WEBP")])
def test_a_still_image_named_as_a_video_is_not_one(tmp_path: Path, codec: str, pix_fmt: str, name: str) -> None:
    """A PNG or JPEG renamed .mp4 was labelled as a video of 0.04 s (found by a helper)."""
    path = tmp_path / "poster.mp4"
    with av.open(str(path), "w", format="image2pipe") as out:
        stream = out.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        frame = av.VideoFrame.from_ndarray(mf.stamped_image(64, 48, 3), format="rgb24").reformat(format=pix_fmt)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    err = expect_error(path, "no_video_stream")
    assert err.message == f"no video stream: this is a still image ({name}), not a video"


def _gif(path: Path, n_frames: int) -> Path:
    with av.open(str(path), "w", format="gif") as out:
        stream = out.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb8"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(mf.stamped_image(64, 48, i), format="rgb24").reformat(format="rgb8")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_a_one_frame_gif_is_a_still_image_and_an_animated_one_a_video(tmp_path: Path) -> None:
    """A one-frame GIF (an image in an archive's folder) was labelled as a video of 0.1 s (found by a helper)."""
    err = expect_error(_gif(tmp_path / "logo.gif", 1), "no_video_stream")
    assert err.message == "no video stream: this is a still image (GIF), not a video"
    chunks = decode(_gif(tmp_path / "animated.gif", 25))
    info = chunks[-1].info
    assert info is not None and info.n_segments == 3 and info.duration_s == pytest.approx(2.5)
    check_stamps(core_rows(chunks), [i / 10 for i in range(25)])


def _h264_and_aac_tracks(out: av.container.OutputContainer) -> tuple[av.VideoStream, av.AudioStream]:
    """A 64x48 H.264 track and a mono AAC track, for a test that writes their packets itself."""
    video = out.add_stream("libx264", rate=25)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    audio = out.add_stream("aac", rate=44_100)
    audio.layout = "mono"
    return video, audio


def test_an_audio_track_without_packets_is_no_audio(tmp_path: Path) -> None:
    """A Matroska file whose audio track holds no packet said has_audio = true (its audio all zeros; found by a
    helper). The chunks, sent before the end, cannot know; the video's info, which the driver writes, does."""
    path = tmp_path / "silent_track.mkv"
    with av.open(str(path), "w") as out:
        video, audio = _h264_and_aac_tracks(out)
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(mf.stamped_image(64, 48, i), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1
    info = decode(path)[-1].info
    assert info is not None and info.n_segments == 2 and not info.has_audio and info.audio_codec is None
    with_sound = mf.make_video(tmp_path / "with_sound.mkv", duration_s=2.0, audio="tone")
    info = decode(with_sound)[-1].info
    assert info is not None and info.has_audio


def test_video_stream_without_frames(tmp_path: Path) -> None:
    import av

    # A video track that never receives a packet, next to an audio track (so the file is written).
    path = tmp_path / "empty_track.mkv"
    with av.open(str(path), "w") as out:
        video, audio = _h264_and_aac_tracks(out)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 4096), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = 44_100, 0
        out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    expect_error(path, "no_frames")


def test_scattered_corrupt_packets_in_a_long_recording_are_concealed(shared_media, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """More than 10 corrupt packets failed any video: a broadcast capture of 60 s that lost 0.1 % of its MPEG-TS
    packets had 14 (found by a helper).  Now more than 1 % of the packets decoded must be corrupt as well."""
    source = shared_media / "bbb_clip_720p.mp4"
    with av.open(str(source)) as c:
        n_video = sum(1 for p in c.demux(video=0) if p.size)
    every = n_video // 13  # 13 damaged packets, 0.9 % (every frame decoded: skipping could leave some undecoded)
    scattered = mf.make_corrupt(tmp_path / "scattered.mkv", kind="bad_packets", source=source,
                                bad_packets=range(every, n_video, every))
    every_frame = VideoDecoder(SamplingSpec(segment_seconds=10.0), ONE_CHUNK, skip_unsampled=False)
    info = list(every_frame.chunks(scattered))[-1].info
    assert info is not None and info.duration_s > 60 and info.n_segments == 7
    monkeypatch.setattr(decode_mod, "MAX_BAD_FRACTION", 0.0)  # the rule before: more than 10 fail it
    with pytest.raises(MediaError, match=r"^.*: 13 corrupt packets in \d+ \(first near "):
        list(every_frame.chunks(scattered))
    monkeypatch.undo()
    dense = mf.make_corrupt(tmp_path / "dense.mkv", kind="bad_packets", source=source,
                            bad_packets=range(every, n_video, every // 4))  # ~4 % of the packets
    err = expect_error(dense, "decode_error")
    assert re.search(r"^\d+ corrupt packets in \d+ \(first near \d+\.\d s: .*\): more than 10 and more than 1% of "
                     r"them; the file is damaged", err.message), err.message


def test_a_video_track_corrupt_from_some_point_on_fails_there(shared_media, tmp_path: Path) -> None:
    """Its audio intact, a video track damaged from 5 s on was read to the end before it failed: the audio's
    packets kept the share of corrupt ones under a half (found by a review), and waited in memory for frames."""
    source = shared_media / "bbb_clip_720p.mp4"
    video = mf.make_corrupt(tmp_path / "video.mkv", kind="bad_packets", source=source, bad_packets=range(120, 1441))
    damaged = mf.combine_streams(tmp_path / "damaged.mkv", video, mf.make_audio(tmp_path / "a.m4a", duration_s=60))
    err = expect_error(damaged, "decode_error")
    assert re.search(r"^\d+ corrupt packets, (5[1-9]|[6-9]\d) of the last 100 of the video track \(first near 5\.0 s",
                     err.message), err.message


def test_a_few_corrupt_packets_are_tolerated_many_fail(media_dir: Path, tmp_path: Path) -> None:
    source = mf.make_video(media_dir / "to_damage.mkv", duration_s=2.0, size=(96, 96))
    few = mf.make_corrupt(tmp_path / "few.mkv", kind="bad_packets", source=source, bad_packets=[5, 20, 33])
    chunks = decode(few)
    assert chunks[-1].info is not None and chunks[-1].info.n_segments == 2
    many = mf.make_corrupt(
        tmp_path / "many.mkv", kind="bad_packets", source=source, bad_packets=range(10, 50)
    )
    err = expect_error(many, "decode_error")
    assert "corrupt packets" in err.message


def test_a_frame_timestamp_far_past_the_announced_end_is_damage_not_a_gap(media_dir: Path, tmp_path: Path) -> None:
    # A damaged MP4 index gave a 60-s video frames at 140,400 s: every segment up to there was filled with
    # the frame before (the one on screen through a gap) and held in memory, and bench took 21 GB before the
    # kernel killed it.  Such a frame is now dropped as corrupt: one is concealed, many fail the video.
    source = mf.make_video(media_dir / "to_retime.mp4", duration_s=4.0, size=(96, 96), video_options={"bf": "0"})

    def retimed(name: str, packets: set[int]) -> Path:
        dest = tmp_path / name
        with av.open(str(source)) as src, av.open(str(dest), "w") as out:
            stream = src.streams.video[0]
            out_stream = out.add_stream_from_template(stream)
            for index, packet in enumerate(p for p in src.demux(stream) if p.size):
                if index in packets:
                    packet.pts += int(100_000 / stream.time_base)  # the decode times (the MP4 index) stay
                packet.stream = out_stream
                out.mux(packet)
        return dest

    chunks = decode(retimed("one.mp4", {30}))
    info = chunks[-1].info
    assert info is not None and (info.duration_s, info.n_segments) == (pytest.approx(4.0), 4)
    with pytest.raises(MediaError) as failed:
        decode(retimed("many.mp4", set(range(30, 50))))
    assert failed.value.error_kind == "decode_error"
    assert "100,001.2 s, past the video's end the header announces (4.0 s)" in failed.value.message


@pytest.mark.parametrize("skip", [True, False], ids=["skipping", "every_frame"])
def test_where_the_damage_starts_is_said_from_the_packet(media_dir: Path, tmp_path: Path, skip: bool) -> None:
    # Audio damaged from 1.5 s on, in a 4-s GOP: skipping holds the GOP's packets until its end, so
    # no frame was decoded when the first bad packet came, and the place came out as "near 0.0 s"
    # (every frame decoded: "near 1.4 s", the last frame before it).  The same file, the same message.
    source = mf.make_video(media_dir / "to_damage_audio.mp4", duration_s=4.0, size=(96, 96), audio="tone",
                           video_options={"x264-params": "keyint=100"})
    with av.open(str(source)) as container:
        first_bad_s = [float(p.pts * p.time_base) for p in container.demux(audio=0) if p.size][65]
    assert 1.45 < first_bad_s < 1.55
    damaged = mf.make_corrupt(tmp_path / "audio_damaged.mp4", kind="bad_packets", source=source,
                              bad_packets=range(65, 110), bad_stream="audio")
    with pytest.raises(MediaError) as info:
        list(VideoDecoder(SamplingSpec(), ChunkingSpec(64, 8), skip_unsampled=skip).chunks(damaged))
    assert info.value.error_kind == "decode_error"
    assert "corrupt packets in " in info.value.message and "(first near 1.5 s:" in info.value.message


@needs_media
@pytest.mark.parametrize("name", [p.values[0] for p in SHARED],
                         ids=["bbb_5s_51", "bikes_noaudio", "bbb_clip_720p"])
def test_frame_threads_change_nothing_in_the_output(name) -> None:
    """A wave's plan decodes with one thread or two FFmpeg frame threads (jobs/plan.py): the same chunks,
    byte for byte (only the count of frames decoded before the decoder's first output may differ)."""
    chunking = ChunkingSpec(core_segments=16, context_segments=2)
    one, two = (list(VideoDecoder(SamplingSpec(), chunking, threads=t).chunks(MEDIA / name)) for t in (1, 2))
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        for field in ("frames", "frame_pts_s", "audio", "audio_valid_samples", "start_s", "end_s"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert (a.chunk_index, a.first_segment, a.core_start, a.core_end, a.is_last, a.has_audio) == \
            (b.chunk_index, b.first_segment, b.core_start, b.core_end, b.is_last, b.has_audio)
    info_one, info_two = (dict(c[-1].info.to_dict()) for c in (one, two))
    for counts in (info_one, info_two):
        counts.pop("n_frames_decoded"), counts.pop("n_frames_skipped")
    assert info_one == info_two


# --- configuration -----------------------------------------------------------------------------------


def test_decoder_is_cheap_and_picklable() -> None:
    dec = VideoDecoder(SamplingSpec(segment_seconds=2.0), ChunkingSpec(core_segments=8), threads=2)
    clone = pickle.loads(pickle.dumps(dec))
    assert (clone.sampling, clone.chunking, clone.threads) == (dec.sampling, dec.chunking, 2)
    with pytest.raises(ConfigError, match="threads"):
        VideoDecoder(SamplingSpec(), ChunkingSpec(), threads=-1)


def test_count_segments_tolerance() -> None:
    assert count_segments(3.0, 1.0) == 3
    assert count_segments(3.0009, 1.0) == 3  # under 1 ms left over: no extra segment
    assert count_segments(3.002, 1.0) == 4
    assert count_segments(0.04, 1.0) == 1
    assert count_segments(0.0, 1.0) == 0


def _remux(src: Path, dst: Path, **options: str) -> Path:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dst


def _trim_video_edit_list(path: Path, keep_s: float) -> Path:
    """Shorten the first track's edit list to ``keep_s`` (a trim without re-encoding, as editors do)."""
    import struct

    data = bytearray(path.read_bytes())

    def boxes(start: int, end: int):  # noqa: ANN202
        while start + 8 <= end:
            size, kind = struct.unpack(">I4s", data[start:start + 8])
            yield kind, start, size
            if kind in (b"moov", b"trak", b"edts"):
                yield from boxes(start + 8, start + size)
            start += size

    found: dict[bytes, int] = {}
    for kind, off, _ in boxes(0, len(data)):
        found.setdefault(kind, off)  # the first: the movie header, the first (video) track's edit list
    timescale = struct.unpack(">I", data[found[b"mvhd"] + 20:found[b"mvhd"] + 24])[0]
    elst = found[b"elst"]
    entries = struct.unpack(">I", data[elst + 12:elst + 16])[0]
    struct.pack_into(">I", data, elst + 16 + 12 * (entries - 1), int(keep_s * timescale))  # the last edit's length
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix, options, box", [
    (".mp4", {"movflags": "faststart"}, "mdat"),  # the index first: FFmpeg reads up to the cut
    (".mkv", {}, "Segment"),
])
def test_a_file_cut_short_is_a_truncated_failure_not_a_shorter_video(media_dir: Path, suffix: str,
                                                                        options: dict[str, str], box: str) -> None:
    """An interrupted download: FFmpeg reads up to the cut without an error; the container's sizes tell."""
    src = mf.make_video(media_dir / f"whole{suffix}.mp4", duration_s=8.0, fps=10, size=(96, 64), audio="tone")
    whole = _remux(src, media_dir / f"whole{suffix}", **options)
    assert core_rows(decode(whole))["start_s"].size == 8
    data = whole.read_bytes()
    cut = media_dir / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    for source in (cut, io.BytesIO(cut.read_bytes())):
        with pytest.raises(MediaError) as err:
            decode(source)
        assert err.value.error_kind == "truncated"
        assert f"its {box} ends at byte {len(data):,} but the file has {len(data) // 2:,} bytes" in err.value.message


def test_edited_files_whose_headers_promise_more_are_not_truncated(media_dir: Path) -> None:
    """Legitimate files that a check of frame counts or durations took for cut ones (a review found them)."""
    src = mf.make_video(media_dir / "edit_src.mp4", duration_s=8.0, fps=10, size=(96, 64), audio="tone",
                        video_options={"g": "10"})
    # an edit list that trims the last 3 s: the index still lists all 80 frames, FFmpeg returns 50
    trimmed = _trim_video_edit_list(_remux(src, media_dir / "trimmed.mp4"), 5.0)
    assert core_rows(decode(trimmed))["frame_pts_s"].max() == pytest.approx(4.9)  # the 8-s audio runs on (its 8 s)
    # Matroska whose timestamps start at 3 s (a piece of a split recording): its duration counts from 0
    import av

    late = media_dir / "late_start.mkv"
    with av.open(str(src)) as inp, av.open(str(late), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                shift = int(3 / packet.time_base)
                packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    assert core_rows(decode(late))["start_s"].size == 8
    # audio that runs past the video's end
    longer = mf.make_video(media_dir / "longer_audio.mkv", duration_s=4.0, fps=10, size=(96, 64), audio="tone",
                           audio_duration_s=7.0)
    assert core_rows(decode(longer))["start_s"].size >= 4


def test_container_sizes_are_read_only_where_they_are_known() -> None:
    from pipeline.truncation import cut_short

    def reader(data: bytes):  # noqa: ANN202
        return lambda offset, n: data[offset:offset + n]

    def box(kind: bytes, payload: int, size: int | None = None) -> bytes:
        return (size if size is not None else 8 + payload).to_bytes(4, "big") + kind + b"\0" * payload

    whole = box(b"ftyp", 8) + box(b"moov", 40) + box(b"mdat", 100)
    assert cut_short(reader(whole), len(whole)) is None
    assert "its mdat ends at byte 172 but the file has 120 bytes, at least 52 bytes are missing" in (
        cut_short(reader(whole[:120]), 120) or "")
    # a fragmented MP4 cut in its first fragment: how much is missing past it is not known, nor said as a share
    fragmented = box(b"ftyp", 8) + box(b"moov", 40) + (box(b"moof", 20) + box(b"mdat", 100)) * 4
    said = cut_short(reader(fragmented[:150]), 150) or ""
    assert "its mdat ends at byte 200 but the file has 150 bytes, at least 50 bytes are missing" in said, said
    assert "%" not in said
    to_end = box(b"ftyp", 8) + box(b"mdat", 100, size=0)  # size 0: the box runs to the end of the file
    assert cut_short(reader(to_end), len(to_end)) is None
    large = box(b"ftyp", 8) + (1).to_bytes(4, "big") + b"mdat" + (16 + 50).to_bytes(8, "big") + b"\0" * 50
    assert cut_short(reader(large), len(large)) is None and cut_short(reader(large[:60]), 60) is not None
    trailing = whole + b"\xff\xff\xff\xffjunk-appended-by-a-tool"  # not a box: not judged
    assert cut_short(reader(trailing), len(trailing)) is None
    assert cut_short(reader(b"\x47" * 400), 400) is None  # MPEG-TS: sizes unknown, not judged
    ebml = b"\x1a\x45\xdf\xa3" + b"\x84" + b"\0" * 4  # EBML header, 4 bytes of payload
    segment = b"\x18\x53\x80\x67" + b"\x82" + b"\0" * 2  # Segment of 2 bytes
    mkv = ebml + segment
    assert cut_short(reader(mkv), len(mkv)) is None and cut_short(reader(mkv[:-1]), len(mkv) - 1) is not None
    live = ebml + b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size: written live
    assert cut_short(reader(live), len(live)) is None


@pytest.mark.parametrize("skip_unsampled", [True, False])
@pytest.mark.parametrize("suffix", ["mp4", "mov", "mkv"])
def test_a_variable_rate_video_with_b_frames_ends_with_its_last_frame(media_dir: Path, suffix: str,
                                                                      skip_unsampled: bool) -> None:
    """A screen recording: 25 fps, then pauses, the last frame at 2.96 s shown 40 ms; x264's B-frames.  An MP4/MOV
    frame's duration is its step to the next frame in decode order, so the 2.92-s frame's reached to 3.22 s: the
    video came out 3.22 s long with a fourth segment re-showing the last frame (a helper).  It ends at 3.00 s."""
    times = [round(i * 0.04, 3) for i in range(50)] + [2.3, 2.6, 2.8, 2.92, 2.96]
    path = mf.make_video(media_dir / f"screen.{suffix}", frame_times_s=times, size=(96, 96), audio="tone",
                         audio_duration_s=3.0)
    with av.open(str(path)) as probed:  # B-frames, and a frame whose decode-order step reaches past the end
        packets = [(p.pts, p.duration) for p in probed.demux(video=0) if p.size]
        tb = probed.streams.video[0].time_base
        assert any(p[0] != d for p, d in zip(packets, sorted(p[0] for p in packets), strict=True))
        if suffix != "mkv":
            assert max(float((t + d) * tb) for t, d in packets) > 3.1
    chunks = list(VideoDecoder(SamplingSpec(image_size=32), ChunkingSpec(core_segments=2, context_segments=1),
                               skip_unsampled=skip_unsampled).chunks(path))
    info = chunks[-1].info
    assert info is not None and (info.duration_s, info.n_segments) == (3.0, 3)


def test_a_video_s_duration_is_a_clean_decimal(media_dir: Path) -> None:
    # ten frames at 25 fps: 0.36 + 0.04 was 0.39999999999999997, and WHERE duration_s = 0.4 found nothing (a helper)
    path = mf.make_video(media_dir / "ten_frames.mp4", duration_s=0.4, fps=25, size=(96, 96))
    info = decode(path, SamplingSpec(image_size=32))[-1].info
    assert info is not None and info.duration_s == 0.4 and info.n_segments == 1
