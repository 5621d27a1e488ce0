"""The decoder process's result sender, in a real child process."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest


def _send_then_fail(conn) -> None:
    from workers.decode_child import _Sender

    sender = _Sender(conn)
    sender.send(("row", 1))
    sender.send(("row", lambda: 0))  # cannot be pickled
    for i in range(2, 5):
        sender.send(("row", i))  # would block for ever behind a dead sender
    time.sleep(60)


def test_a_result_that_cannot_be_sent_ends_the_decoder_process():
    """The worker must see the decoder die (and retry the video), not wait for results that never come."""
    ctx = mp.get_context("spawn")
    results, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_then_fail, args=(child_end,))
    proc.start()
    child_end.close()
    try:
        assert results.poll(30) and results.recv() == ("row", 1)
        assert results.poll(30)
        with pytest.raises(EOFError):
            results.recv()  # nothing after the failed one: the pipe closes with the process
        proc.join(30)
        assert proc.exitcode == 70
    finally:
        if proc.is_alive():
            proc.kill()
