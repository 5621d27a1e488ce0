"""The decoder process of a decode worker (``python -m workers.decode_child REQUEST_FD RESULT_FD``).

It reads a :class:`~workers.decode_stage.DecodeConfig`, answers ``("ready", pid)``, then serves
``("decode", uri, video_id)`` requests one at a time, streaming back

- ``("row", chunk_row, busy_s, peak_rss_mb)`` per chunk (``busy_s``: time spent producing it),
- then ``("end", peak_rss_mb)``, or ``("media_error", kind, message)`` / ``("internal_error", text)``.

Results go out from a sender thread, so the decoder works on the next chunk while the last one is
in the pipe (the hand-off of a 64-row chunk, ~14 MB, took ~35 ms of the decoder's time when sent
inline).  At most one result waits for the sender: the decoder runs at most two chunks ahead of
the worker.  ``None`` or a closed request pipe ends the process; so does a closed result pipe (the worker
is gone), and so does the worker's death, noticed within a second even while a decode is stuck.
Anything worse (a segfault, a kill) is seen by the worker as the result pipe closing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection


class _Sender:
    """Sends results in order from a thread; ``send`` blocks while one result already waits.

    A result pipe that breaks means the worker is gone: the process ends at once.  Any other failure
    to send (a row that cannot be pickled, no memory for its bytes) ends it too, with the error in
    the log: the worker sees the decoder die and retries the video in a fresh one, as after a crash
    (the results after a lost one could not be trusted to belong where the worker would put them).
    """

    def __init__(self, results: Connection) -> None:
        import queue
        import threading

        self._results = results
        self._queue: queue.Queue[object] = queue.Queue(maxsize=1)
        threading.Thread(target=self._run, name="result-sender", daemon=True).start()

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            try:
                self._results.send(message)
            except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
                os._exit(0)
            except BaseException:  # noqa: BLE001 - see the class docstring
                logging.getLogger(__name__).exception("could not send a result to the decode worker")
                logging.shutdown()
                os._exit(70)
            finally:
                self._queue.task_done()

    def send(self, message: object) -> None:
        self._queue.put(message)

    def flush(self) -> None:
        """Wait until everything given to ``send`` is in the pipe."""
        self._queue.join()


def serve(requests: Connection, results: Connection) -> None:
    from pipeline.errors import MediaError
    from workers.decode_stage import Decoding, keep_large_buffers_out_of_the_heap
    from workers.rows import peak_rss_mb

    keep_large_buffers_out_of_the_heap()
    try:
        decoding = Decoding(requests.recv())
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which stops with it
        results.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    results.send(("ready", os.getpid()))
    sender = _Sender(results)
    while True:
        try:
            request = requests.recv()
        except EOFError:
            break
        if request is None:
            break
        _, uri, video_id = request
        try:
            started = time.perf_counter()
            for row in decoding.rows(uri, video_id):
                busy = time.perf_counter() - started
                sender.send(("row", row, busy, peak_rss_mb()))
                started = time.perf_counter()
            sender.send(("end", peak_rss_mb()))
        except MediaError as exc:
            sender.send(("media_error", exc.error_kind, exc.message))
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file fails that file
            logging.getLogger(__name__).exception("unexpected error decoding %s", uri)
            sender.send(("internal_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
    sender.flush()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process when the worker that started it is gone (even while it is stuck in a decoder)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m workers.decode_child REQUEST_FD RESULT_FD (started by a decode worker)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="decoder %(process)d: %(levelname)s %(message)s")
    _exit_with_parent()
    requests = Connection(int(argv[0]), writable=False)
    results = Connection(int(argv[1]), readable=False)
    try:
        serve(requests, results)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
