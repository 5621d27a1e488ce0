"""DecodeStage: one input video row in, a stream of chunk rows out (or one failure row).

Three things can go wrong with one video besides bad bytes, and none may stop the job:

- a *transient* read error (an S3 read failing, a network file system hiccup): the video is decoded
  again from the start, up to ``read_attempts`` times with a short back-off, in this worker; the
  failure row then says ``read_error`` and how many attempts were made (in its ``info_json``);
- a *hang*: the decode runs in a helper thread and the stage waits for each chunk at most
  ``video_timeout_s`` seconds of the decoder's own time (time spent waiting for downstream stages
  does not count); past it the video becomes a ``timeout`` failure and the stuck thread is left
  behind (the worker is discarded at the end of the wave).  If the stuck code holds the GIL so that
  not even this can run, a C-level watchdog (``faulthandler``) ends the process a minute later,
  which the runner treats as a crash;
- a *crash* of the worker process (segfault, OOM kill): nothing here can catch it; Ray Data retries
  the task and the runner isolates a video that keeps crashing workers (see ``jobs/runner.py``).
"""

from __future__ import annotations

import faulthandler
import fnmatch
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
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
_HARD_TIMEOUT_GRACE_S = 60.0
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)


class VideoTimeout(Exception):
    """The decoder made no progress on one video for longer than the time limit."""


class DecodeStage(Stage):
    """Decode whole videos with PyAV into chunk rows; a bad file becomes a failure row.

    Args:
        hwaccel: ``"cuda"`` decodes on the GPU (NVDEC), see :class:`~pipeline.decode.VideoDecoder`.
        video_timeout_s: longest the decoder may work without producing the next chunk (None: no limit).
        read_attempts: tries per video when reading fails transiently.
        faults: test-only fault injection, ``kind=glob[;kind=glob...]`` matched against the input's file
            name; kinds ``crash`` (SIGKILL the worker), ``hang`` (sleep forever), ``ioerror`` (every read
            fails) and ``ioerror_once`` (the first try's reads fail).  Defaults to ``$VIDPIPE_TEST_FAULTS``
            of the process that builds the stage (the driver).
    """

    name = "decode"

    def __init__(self, sampling: SamplingSpec, chunking: ChunkingSpec, *, threads: int = 0,
                 hwaccel: str | None = None, video_timeout_s: float | None = None, read_attempts: int = 3,
                 faults: str | None = None) -> None:
        self.sampling = sampling
        self.chunking = chunking
        self.threads = threads
        self.hwaccel = hwaccel
        self.video_timeout_s = video_timeout_s
        self.read_attempts = max(1, read_attempts)
        self.faults = _parse_faults(os.environ.get(FAULTS_ENV, "") if faults is None else faults)
        self._decoder: VideoDecoder | None = None
        self._faulted_once: set[str] = set()

    def setup(self) -> None:
        self._decoder = VideoDecoder(self.sampling, self.chunking, threads=self.threads, hwaccel=self.hwaccel)

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
                # busy time excludes the time the consumer holds us suspended at the yield
                self.account([out], time.perf_counter() - started)
                if out.get("error_kind"):
                    failed.append(out)
                else:
                    yield to_batch([out])
                started = time.perf_counter()
        if failed:
            yield to_batch(failed)

    def decode_video(self, uri: str, video_id: str) -> Iterator[Row]:
        """Yield the chunk rows of one video, or a single failure row (after chunk rows, the caller drops them)."""
        if self._decoder is None:
            self.setup()
        for attempt in range(1, self.read_attempts + 1):
            try:
                yield from self._watched(uri, video_id)
                return
            except MediaError as exc:
                if exc.error_kind in TRANSIENT_ERROR_KINDS and attempt < self.read_attempts:
                    log.warning("transient error reading %s (attempt %d of %d): %s", uri, attempt,
                                self.read_attempts, exc.message)
                    time.sleep(_BACKOFF_S[min(attempt - 1, len(_BACKOFF_S) - 1)])
                    continue
                yield self._failure(uri, video_id, exc.error_kind, exc.message, attempt)
                return
            except VideoTimeout as exc:
                yield self._failure(uri, video_id, "timeout", str(exc), attempt)
                return
            except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must fail that file, not the job
                log.exception("unexpected error decoding %s", uri)
                yield self._failure(uri, video_id, "internal_error",
                                    f"unexpected {type(exc).__name__} while decoding: {exc}", attempt)
                return

    def _failure(self, uri: str, video_id: str, kind: str, message: str, attempts: int) -> Row:
        row = failure_row(Failure(uri=uri, video_id=video_id, stage=self.name, error_kind=kind, message=message,
                                  attempts=attempts), self.empty_outputs())
        row["info_json"] = json.dumps({"attempts": attempts})  # failure rows carry no VideoInfo: the count rides here
        return row

    # -- one attempt, under the watchdog ---------------------------------------------------------------
    def _watched(self, uri: str, video_id: str) -> Iterator[Row]:
        if self.video_timeout_s is None:
            yield from self._decode_once(uri, video_id)
            return
        handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        cancelled = threading.Event()

        def put(item: tuple[str, Any]) -> bool:
            while not cancelled.is_set():
                try:
                    handoff.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for row in self._decode_once(uri, video_id):
                    if not put(("row", row)):
                        return
                put(("end", None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which raises it
                put(("error", exc))

        thread = threading.Thread(target=produce, name=f"decode:{video_id}", daemon=True)
        thread.start()
        timeout = float(self.video_timeout_s)
        chunks = 0
        try:
            while True:
                faulthandler.dump_traceback_later(timeout + _HARD_TIMEOUT_GRACE_S, exit=True)
                try:
                    kind, item = handoff.get(timeout=timeout)
                except queue.Empty:
                    raise VideoTimeout(
                        f"the decoder made no progress for {timeout:g} s (after {chunks} chunks; "
                        "--video-timeout); it was abandoned") from None
                finally:
                    faulthandler.cancel_dump_traceback_later()
                if kind == "row":
                    chunks += 1
                    yield item
                elif kind == "end":
                    return
                else:
                    raise item
        finally:
            cancelled.set()

    def _decode_once(self, uri: str, video_id: str) -> Iterator[Row]:
        assert self._decoder is not None
        wrap = self._inject(uri)
        with open_input(uri, wrap=wrap) as source:
            try:
                for chunk in self._decoder.chunks(source.file, uri=uri, video_id=video_id,
                                                  size_bytes=source.size_bytes):
                    yield chunk_row(chunk)
            except Exception as exc:
                if source.io_errors:  # FFmpeg's error was caused by the bytes not arriving: worth a retry
                    raise MediaError(uri, "read_error", f"reading failed: {source.io_errors[-1]} "
                                                        f"({type(exc).__name__}: {exc})") from exc
                raise

    # -- test-only fault injection ---------------------------------------------------------------------
    def _inject(self, uri: str) -> Any:
        if not self.faults:
            return None
        name = uri.rsplit("/", 1)[-1]
        hit = {kind for kind, pattern in self.faults.items() if fnmatch.fnmatch(name, pattern)}
        if "crash" in hit:
            import signal

            log.warning("test fault: killing this worker on %s", uri)
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in hit:
            time.sleep(10**7)
        once = "ioerror_once" in hit and uri not in self._faulted_once
        if "ioerror" in hit or once:
            self._faulted_once.add(uri)
            if not uri.startswith("s3://"):
                raise MediaError(uri, "read_error", "injected read error (test fault)")
            return _FailingReads
        return None


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
        if kind not in ("crash", "hang", "ioerror", "ioerror_once") or not pattern:
            raise ValueError(f"{FAULTS_ENV}: bad entry {part!r}; use kind=glob with kind crash, hang, ioerror "
                             "or ioerror_once")
        faults[kind] = pattern
    return faults
