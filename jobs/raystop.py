"""Stop this process's Ray as a command ends: what ``vidpipe``'s cleanup runs after any command.

This module imports nothing of vidpipe's stack (torch, PyAV, pyarrow, Ray Data) and not even Ray: the
cleanup runs after a stop that may have landed inside an import, and a package left half-imported
(``import av`` broken off by a SIGTERM) fails every later import that meets it, which turned a stopped
command (exit 130) into a traceback (exit 1). Ray is only looked up where this process has it already.
"""

from __future__ import annotations

import sys
from typing import Any


def shutdown_ray() -> None:
    """Stop this process's Ray as it is about to exit: disconnect from a cluster, or stop the embedded one
    ``jobs.runner.init_ray`` started.

    Ray's autoscaler monitor answers SIGTERM by reporting its own end through the GCS, which
    ``ray.shutdown`` has stopped just before, so it always sat out the whole 1-s grace period before
    being killed (Ray 2.60: 1.0 of the 1.4 s a shutdown took).  An embedded node's monitor has nothing
    to save, so it is killed first; should Ray's internals differ, the plain shutdown still runs.

    An embedded node that is going down already (one of its processes has ended: a signal to the whole
    process group, as ``timeout`` and ``kill -TERM -PGID`` send, or a crash) is killed instead of shut down:
    the driver's disconnect waits for the dying GCS and raylet (6-7 s after a process group's SIGTERM, 15 s
    once they are gone; measured on 2 cores), and the process leaves right after (``os._exit``).
    """
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)  # absent where `import ray` itself was broken off
    if is_initialized is None or not is_initialized():
        return
    node = _embedded_node_processes()
    every = [proc for procs in node.values() for proc in procs]
    if any(proc.poll() is not None for proc in every):
        _kill_all(every)
        return  # no ray.shutdown: Ray stays "initialized" in a process that is about to exit
    _kill_all(node.get("monitor", []))
    ray.shutdown()  # type: ignore[union-attr]
    # Worker processes end on their own within a second or two (the model worker's teardown) and free
    # their memory, GPU memory included, long before another command loads its models; waiting for them
    # here cost 2-3 s per command.


def _embedded_node_processes() -> dict[str, list[Any]]:
    """The processes of the Ray node this process started (by kind: ``raylet``, ``gcs_server``, ...; Popen
    objects), or nothing when it joined a cluster (or Ray's internals differ)."""
    try:
        from ray._private import worker as ray_worker  # imported by ray itself, which is initialized here

        node: Any = ray_worker._global_node
        if node is None or not node.head:
            return {}
        return {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    except (AttributeError, ImportError):
        return {}


def _kill_all(processes: list[Any]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
    for proc in processes:
        proc.wait(timeout=10)
