"""Stops asked by signals: raised where the command can take them (jobs/stopping.py), with real signals."""

import os
import signal
import threading

import pytest

from jobs import stopping


@pytest.fixture
def handlers(monkeypatch):
    """The stop handlers installed in this (the main) thread, as `vidpipe run` does; pytest's put back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(stopping, "_taken", [])
    monkeypatch.setattr(stopping, "_depth", 0)
    monkeypatch.setattr(stopping, "_pending", None)
    monkeypatch.setattr(stopping, "_what", [])
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    stopping.install()
    yield clock
    for s, h in saved.items():
        signal.signal(s, h)


def _signal(sig):
    signal.raise_signal(sig)  # a real signal; its Python handler has run when this returns


def test_a_stop_outside_a_deferred_block_is_raised_at_once(handlers):
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
        _signal(signal.SIGTERM)


def test_a_stop_inside_a_deferred_block_is_raised_where_the_block_ends(handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt, match=r"stopped by SIGHUP \(its terminal closed\)"):
        with stopping.deferred("a step"):
            with stopping.deferred("a step"):  # nested: the outermost block's end
                _signal(signal.SIGHUP)
                steps.append("inner block finished")
            steps.append("outer block finished")
    assert steps == ["inner block finished", "outer block finished"]
    stopping.check()  # raised once


def test_a_block_ending_with_an_error_gives_the_error_and_check_raises_the_stop_later(handlers):
    with pytest.raises(OSError, match="disk full"):
        with stopping.deferred("a step"):
            _signal(signal.SIGTERM)
            raise OSError("disk full")
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
        stopping.check()


def test_a_block_ending_inside_an_except_block_does_not_raise_the_stop_the_command_is_already_taking(handlers):
    try:
        raise RuntimeError("a wave failed")
    except RuntimeError:
        with stopping.deferred("a step"):  # the stop's own commit
            _signal(signal.SIGTERM)
    stopping.check()  # nothing left: the command is stopping


def test_a_second_ctrl_c_breaks_off_a_stop_but_not_a_deferred_block_where_it_says_what_it_waits_for(handlers, capfd):
    clock = handlers
    with pytest.raises(KeyboardInterrupt, match=r"stopped by Ctrl-C \(SIGINT\)"):
        with stopping.deferred("Ray's start"):
            _signal(signal.SIGINT)
            clock[0] += 0.2
            _signal(signal.SIGINT)  # the same Ctrl-C again, through the supervisor: dropped
            _signal(signal.SIGTERM)  # a second stop of another kind: dropped
            assert capfd.readouterr().err == ""
            clock[0] += 1.5
            _signal(signal.SIGINT)  # the user insists: Ray's start is not broken off (a fork may be under way)
            assert capfd.readouterr().err == (f"vidpipe: stopping once Ray's start has ended ('kill -9 {os.getpid()}' "
                                              "ends it at once)\n")
    stopping.check()  # taken once
    clock[0] += 1.5
    with pytest.raises(KeyboardInterrupt, match=r"Ctrl-C"):  # outside: the stop itself is broken off at once
        _signal(signal.SIGINT)


def test_a_deferred_block_in_another_thread_does_not_hold_the_main_threads_stop(handlers):
    entered, release = threading.Event(), threading.Event()

    def worker():
        with stopping.deferred("a step"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    entered.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
            _signal(signal.SIGTERM)
    finally:
        release.set()
        t.join(10)
