"""DecodeStage: one input video row in, a stream of chunk rows out (or one failure row).

The decoding itself runs in a child process of the decode worker (:mod:`workers.decode_child`), so
that nothing one file does can take the worker, and with it the job's execution, down:

- a *transient* read error (an S3 read failing, a network file system hiccup): the video is decoded
  again from the start, up to ``read_attempts`` times with a short back-off; the failure row then says
  ``read_error`` and how many attempts were made (in its ``info_json``);
- a *hang*: the worker waits for each chunk at most ``video_timeout_s`` seconds of the decoder's own
  time (time spent waiting for downstream stages does not count); past it the child is killed and the
  video becomes a ``timeout`` failure;
- a *crash* of the decoder (a segfault in FFmpeg on corrupt data, an out-of-memory kill): the child
  dies, the worker notices the closed pipe, starts a fresh child and tries the video again, up to
  ``crash_attempts`` times; then the video becomes a ``worker_crashed`` failure with its attempts.

Videos already delivered are not affected, and the worker process itself never runs decoder code.
A worker that dies anyway (its node is lost, it is OOM-killed) is Ray's and the runner's business
(``jobs/runner.py``).  ``isolate=False`` decodes in the calling process instead (no time limit, no
crash isolation: for in-process tools and tests).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.decode import VideoDecoder
from pipeline.errors import MediaError
from pipeline.inputs import TRANSIENT_ERROR_KINDS, open_input
from pipeline.media import ChunkingSpec, Failure, SamplingSpec
from workers.rows import Batch, Row, chunk_row, failure_row, iter_rows, to_batch
from workers.stage import Stage

log = logging.getLogger(__name__)

FAULTS_ENV = "VIDPIPE_TEST_FAULTS"
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
_CHILD_START_TIMEOUT_S = 120.0


@functools.cache
def keep_large_buffers_out_of_the_heap(threshold: int = 1 << 20) -> None:
    """Allocate buffers of ``threshold`` bytes or more with mmap, so that freeing returns them at once.

    glibc otherwise raises its mmap threshold to the size of the first large buffers freed (a chunk's
    frames, ~10 MB) and serves later ones from the heap, whose fragments make a process's peak RSS
    creep up over a long video (measured: decoder +23 MB from a 3- to a 27-minute video, +6 MB with
    this).  A no-op where mallopt does not exist.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL("libc.so.6" if sys.platform.startswith("linux") else ctypes.util.find_library("c"))
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; also turns off glibc's dynamic threshold
    except (OSError, AttributeError):
        pass


class VideoTimeout(Exception):
    """The decoder made no progress on one video for longer than the time limit."""


class DecoderCrashed(Exception):
    """The decoder's child process died while it worked on a video."""


@dataclass(frozen=True)
class DecodeConfig:
    """What a decoder process needs (pickled to the child)."""

    sampling: SamplingSpec
    chunking: ChunkingSpec
    threads: int = 0
    hwaccel: str | None = None
    faults: tuple[tuple[str, str], ...] = ()


class Decoding:
    """Decodes one video at a time into chunk rows, in whichever process it lives (worker or child)."""

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.decoder = VideoDecoder(config.sampling, config.chunking, threads=config.threads, hwaccel=config.hwaccel)
        self._faulted_once: set[str] = set()

    def rows(self, uri: str, video_id: str) -> Iterator[Row]:
        wrap = self._inject(uri)
        with open_input(uri, wrap=wrap) as source:
            try:
                for chunk in self.decoder.chunks(source.file, uri=uri, video_id=video_id,
                                                 size_bytes=source.size_bytes):
                    yield chunk_row(chunk)
            except Exception as exc:
                if source.io_errors:  # FFmpeg's error was caused by the bytes not arriving: worth a retry
                    raise MediaError(uri, "read_error", f"reading failed: {source.io_errors[-1]} "
                                                        f"({type(exc).__name__}: {exc})") from exc
                raise

    # -- test-only fault injection ---------------------------------------------------------------------
    def _inject(self, uri: str) -> Any:
        if not self.config.faults:
            return None
        name = uri.rsplit("/", 1)[-1]
        hit = {kind for kind, pattern in self.config.faults if fnmatch.fnmatch(name, pattern)}
        if "crash" in hit:
            log.warning("test fault: killing this decoder process on %s", uri)
            os.kill(os.getpid(), signal.SIGKILL)
        if "segfault" in hit:
            import ctypes

            log.warning("test fault: a segmentation fault in this decoder process on %s", uri)
            ctypes.string_at(0)  # reads address 0: SIGSEGV, as a decoder bug would
        if "hang" in hit:
            time.sleep(10**7)
        once = "ioerror_once" in hit and uri not in self._faulted_once
        if "ioerror" in hit or once:
            self._faulted_once.add(uri)
            if not uri.startswith("s3://"):
                raise MediaError(uri, "read_error", "injected read error (test fault)")
            return _FailingReads
        return None


class DecoderProcess:
    """The worker's handle on its decoder child: start it, stream one video's rows, kill it when stuck."""

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._requests: Connection | None = None
        self._results: Connection | None = None
        self.peak_rss_mb = 0.0  # the largest peak RSS any of this worker's decoder children reported

    def start(self) -> None:
        """Start a child and wait until it has imported PyAV and built its decoder."""
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the worker's imports, whatever set them
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "workers.decode_child", str(req_r), str(res_w)],
                pass_fds=(req_r, res_w), stdin=subprocess.DEVNULL, env=env, close_fds=True)
        finally:
            os.close(req_r)
            os.close(res_w)
        self._requests = Connection(req_w, readable=False)
        self._results = Connection(res_r, writable=False)
        self._requests.send(self.config)
        if not self._results.poll(_CHILD_START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"the decoder process did not start within {_CHILD_START_TIMEOUT_S:g} s")
        try:
            kind, *rest = self._results.recv()
        except EOFError:
            code = self.kill()
            raise RuntimeError(f"the decoder process failed to start ({_exit_text(code)}); its error is in "
                               "this worker's log") from None
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"the decoder process failed to start: {rest[0] if rest else kind}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> int | None:
        """Stop the child (SIGKILL: it may be stuck in C code) and return its exit status."""
        for conn in (self._requests, self._results):
            if conn is not None:
                conn.close()
        self._requests = self._results = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def close(self) -> None:
        if self._requests is not None and self.alive():
            try:
                self._requests.send(None)  # asks the child to exit
                assert self._proc is not None
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def decode(self, uri: str, video_id: str, timeout_s: float | None) -> Iterator[tuple[Row, float]]:
        """Yield ``(chunk row, decoder busy seconds)``; raise MediaError, VideoTimeout or DecoderCrashed."""
        if not self.alive():
            if self._proc is not None:
                self.kill()
            self.start()
        assert self._requests is not None and self._results is not None
        results = self._results
        finished = False
        try:
            self._requests.send(("decode", uri, video_id))
            chunks = 0
            while True:
                if not results.poll(timeout_s):
                    self.kill()
                    raise VideoTimeout(f"the decoder made no progress for {timeout_s:g} s (after {chunks} chunks; "
                                       "--video-timeout); its process was killed")
                try:
                    kind, *rest = results.recv()
                except (EOFError, OSError):
                    code = self.kill()
                    raise DecoderCrashed(f"the decoder process died ({_exit_text(code)}) after {chunks} chunks") \
                        from None
                if kind == "row":
                    row, busy_s, rss = rest
                    self.peak_rss_mb = max(self.peak_rss_mb, rss)
                    chunks += 1
                    yield row, busy_s
                elif kind == "end":
                    self.peak_rss_mb = max(self.peak_rss_mb, rest[0])
                    finished = True
                    return
                elif kind == "media_error":
                    finished = True
                    raise MediaError(uri, rest[0], rest[1])
                else:  # "internal_error"
                    finished = True
                    raise RuntimeError(rest[0])
        finally:
            if not finished and self._proc is not None:
                self.kill()  # stopped mid-video (the consumer went away): the child's state is unknown


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class DecodeStage(Stage):
    """Decode whole videos with PyAV into chunk rows; a bad file becomes a failure row.

    Args:
        hwaccel: ``"cuda"`` decodes on the GPU (NVDEC), see :class:`~pipeline.decode.VideoDecoder`.
        video_timeout_s: longest the decoder may work without producing the next chunk (None: no limit).
        read_attempts: tries per video when reading fails transiently.
        crash_attempts: tries per video when the decoder process dies.
        isolate: decode in a child process (default); False decodes in this process (no time limit and
            no crash isolation).
        faults: test-only fault injection, ``kind=glob[;kind=glob...]`` matched against the input's file
            name; kinds ``crash`` (SIGKILL the decoder process), ``segfault`` (a real SIGSEGV in it),
            ``hang`` (sleep forever), ``ioerror``
            (every read fails) and ``ioerror_once`` (the first try's reads fail).  Defaults to
            ``$VIDPIPE_TEST_FAULTS`` of the process that builds the stage (the driver).
    """

    name = "decode"
    runs_as_task = True

    def __init__(self, sampling: SamplingSpec, chunking: ChunkingSpec, *, threads: int = 0,
                 hwaccel: str | None = None, video_timeout_s: float | None = None, read_attempts: int = 3,
                 crash_attempts: int = 3, isolate: bool = True, faults: str | None = None) -> None:
        self.sampling = sampling
        self.chunking = chunking
        self.threads = threads
        self.hwaccel = hwaccel
        self.video_timeout_s = video_timeout_s
        self.read_attempts = max(1, read_attempts)
        self.crash_attempts = max(1, crash_attempts)
        self.isolate = isolate
        self.faults = _parse_faults(os.environ.get(FAULTS_ENV, "") if faults is None else faults)
        self._local: Decoding | None = None
        self._child: DecoderProcess | None = None

    def _config(self) -> DecodeConfig:
        return DecodeConfig(self.sampling, self.chunking, threads=self.threads, hwaccel=self.hwaccel,
                            faults=tuple(self.faults.items()))

    def setup(self) -> None:
        keep_large_buffers_out_of_the_heap()
        if self.isolate:
            if self._child is None:
                self._child = DecoderProcess(self._config())
                self._child.start()
        elif self._local is None:
            self._local = Decoding(self._config())

    def close(self) -> None:
        """Stop the decoder process (also happens when the worker exits: the child sees its pipe close)."""
        if self._child is not None:
            self._child.close()
            self._child = None

    def __getstate__(self) -> dict[str, Any]:
        # the stage is pickled to workers before setup; a set-up copy ships without its process
        return self.__dict__ | {"_local": None, "_child": None}

    def empty_outputs(self) -> Row:
        s, k, n = self.sampling.image_size, self.sampling.frames_per_segment, self.sampling.samples_per_segment
        return {
            "start_s": np.zeros(0, np.float64),
            "end_s": np.zeros(0, np.float64),
            "frames": np.zeros((0, k, s, s, 3), np.uint8),
            "audio": np.zeros((0, n), np.float32),
            "audio_valid_samples": np.zeros(0, np.int32),
        }

    def process_batch(self, batch: Batch) -> Iterator[Batch]:
        # chunks stream on one by one; failure rows (often many and instant: missing files) go in one batch
        failed: list[Row] = []
        for row in iter_rows(batch):
            started = time.perf_counter()
            for out in self.decode_video(str(row["uri"]), str(row["video_id"])):
                # busy time: the decoder's own time on this chunk (not the time the consumer holds us
                # suspended at the yield, nor the hand-off)
                busy = out.pop("_busy_s", None)
                self.account([out], time.perf_counter() - started if busy is None else busy)
                if out.get("error_kind"):
                    failed.append(out)
                else:
                    yield to_batch([out])
                started = time.perf_counter()
        if failed:
            yield to_batch(failed)

    @property
    def decoder_peak_rss_mb(self) -> float:
        """Peak RSS of this worker's decoder processes so far (0 when decoding in this process)."""
        return self._child.peak_rss_mb if self._child is not None else 0.0

    def account(self, rows: list[Row], busy_s: float) -> None:
        super().account(rows, busy_s)
        for r in rows:  # the worker's memory is its own plus its decoder process's
            r[f"rss_{self.name}_mb"] += self.decoder_peak_rss_mb

    def decode_video(self, uri: str, video_id: str) -> Iterator[Row]:
        """Yield the chunk rows of one video, or a single failure row (after chunk rows, the caller drops them).

        A retried video yields its chunks again from the first; they are the same rows (decoding is
        deterministic) and the writer keeps one of each.
        """
        self.setup()
        read_tries = crashes = 0
        while True:
            attempt = read_tries + crashes + 1
            try:
                yield from self._attempt(uri, video_id)
                return
            except MediaError as exc:
                read_tries += 1
                if exc.error_kind in TRANSIENT_ERROR_KINDS and read_tries < self.read_attempts:
                    log.warning("transient error reading %s (attempt %d of %d): %s", uri, read_tries,
                                self.read_attempts, exc.message)
                    time.sleep(_BACKOFF_S[min(read_tries - 1, len(_BACKOFF_S) - 1)])
                    continue
                yield self._failure(uri, video_id, exc.error_kind, exc.message, attempt)
                return
            except VideoTimeout as exc:
                yield self._failure(uri, video_id, "timeout", str(exc), attempt)
                return
            except DecoderCrashed as exc:
                crashes += 1
                if crashes < self.crash_attempts:
                    log.warning("%s on %s (attempt %d of %d); trying again in a new decoder process", exc, uri,
                                crashes, self.crash_attempts)
                    continue
                yield self._failure(
                    uri, video_id, "worker_crashed",
                    f"{exc}, in each of {crashes} tries: a crash in the decoder (e.g. a segfault on corrupt data) "
                    "or an out-of-memory kill; see the worker's log", attempt)
                return
            except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must fail that file, not the job
                log.exception("unexpected error decoding %s", uri)
                yield self._failure(uri, video_id, "internal_error",
                                    f"unexpected {type(exc).__name__} while decoding: {exc}", attempt)
                return

    def _attempt(self, uri: str, video_id: str) -> Iterator[Row]:
        if self._child is None:
            assert self._local is not None
            yield from self._local.rows(uri, video_id)
            return
        for row, busy_s in self._child.decode(uri, video_id, self.video_timeout_s):
            row["_busy_s"] = busy_s
            yield row

    def _failure(self, uri: str, video_id: str, kind: str, message: str, attempts: int) -> Row:
        row = failure_row(Failure(uri=uri, video_id=video_id, stage=self.name, error_kind=kind, message=message,
                                  attempts=attempts), self.empty_outputs())
        row["info_json"] = json.dumps({"attempts": attempts})  # failure rows carry no VideoInfo: the count rides here
        return row


class _FailingReads:
    """Test fault: a remote file whose reads fail after the first 4 KiB."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        if self._read > 4096:
            raise OSError("injected read error (test fault): connection reset")
        data = self._inner.read(n)
        self._read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


def _parse_faults(spec: str) -> dict[str, str]:
    faults = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, pattern = part.partition("=")
        if kind not in ("crash", "segfault", "hang", "ioerror", "ioerror_once") or not pattern:
            raise ValueError(f"{FAULTS_ENV}: bad entry {part!r}; use kind=glob with kind crash, segfault, hang, "
                             "ioerror or ioerror_once")
        faults[kind] = pattern
    return faults
