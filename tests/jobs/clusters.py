"""Test helpers: Ray clusters of real processes on 127.0.0.1, and the processes of a Ray session.

Every cluster lives in its own ``--temp-dir`` with its own ports, is started in its own process
groups, and is stopped by killing exactly those groups (and the workers of its raylets): never a
``ray stop``, which would also stop the test session's own Ray and other users' clusters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
_used_ports: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens, held for the block: bound, not listening, so connections to it
    are refused and no other process (pytest's other worker, a Ray) can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port the kernel hands out for ``bind(0)`` (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_WORKER_PORTS = 150
_used_worker_ranges: set[int] = set()


def worker_port_base() -> int:
    """The start of a worker-port range of its own, below the kernel's ephemeral ports.

    Ray binds its agents to the ports :func:`free_port` returns, which come from the ephemeral range; a
    worker range inside it can contain one of them and ``ray start`` then refuses to start.
    """
    slots = max(1, (_ephemeral_low() - 20000) // _WORKER_PORTS)
    while True:
        slot = int.from_bytes(os.urandom(2), "big") % slots
        if slot not in _used_worker_ranges or len(_used_worker_ranges) >= slots:
            _used_worker_ranges.add(slot)
            return 20000 + slot * _WORKER_PORTS


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment for ``ray``/``vidpipe`` subprocesses: this venv first on PATH, no token auth, quiet."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # loopback-only test clusters
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@dataclass
class Node:
    pgid: int
    cpus: int
    log: Path
    killed: bool = False  # its group was SIGKILLed: its number may since lead another's group (pytest's other worker)


@dataclass
class LocalCluster:
    """A Ray cluster started with ``ray start`` on loopback: one head (optionally with the job server)."""

    root: Path
    head_cpus: int = 1
    dashboard: bool = False
    env: dict[str, str] = field(default_factory=cluster_env)
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def _node_ports(self) -> list[str]:
        base = worker_port_base()
        return ["--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--min-worker-port={base}", f"--max-worker-port={base + _WORKER_PORTS - 1}",
                "--object-store-memory=300000000", "--disable-usage-stats"]

    def _start(self, args: list[str], cpus: int, name: str, env: dict[str, str] | None = None) -> Node:
        log = self.root / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(BIN / "ray"), "start", *args, f"--num-cpus={cpus}", *self._node_ports()],
                                    stdout=f, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True)
            node = Node(pgid=proc.pid, cpus=cpus, log=log)
            self.nodes.append(node)
            if proc.wait(timeout=180) != 0:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        return node

    def start(self, attempts: int = 2) -> LocalCluster:
        """Start the head; a head that fails to start (under load its GCS can time out) is cleared and tried again.

        Each try has fresh ports and a fresh temp dir, and everything the failed try started is killed first.
        """
        self.root.mkdir(parents=True, exist_ok=True)

        def head(attempt: int) -> Node:
            self.gcs_port = free_port()
            self.dashboard_port = free_port()
            args = ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                    f"--ray-client-server-port={free_port()}"]
            if self.dashboard:
                args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
            else:
                args += ["--include-dashboard=false"]
            return self._start(args, self.head_cpus, "head" if attempt == 1 else f"head-try{attempt}")

        def clear() -> None:
            self.stop()
            self.nodes.clear()
            shutil.rmtree(self.temp_dir, ignore_errors=True)

        _tried(head, clear, attempts, "ray start --head")
        return self

    def add_node(self, cpus: int = 1, env: dict[str, str] | None = None, attempts: int = 2) -> Node:
        """Start a worker node; ``env``: its own environment (its workers inherit it), else the cluster's.

        A node that fails to start (a port handed to it was taken meanwhile: other processes bind ports too) is
        killed and started again on fresh ports.
        """
        return _tried(lambda attempt: self._start([f"--address={self.address}"], cpus, f"node{len(self.nodes)}", env),
                      lambda: _killpg(self.nodes.pop().pgid), attempts, "ray start of a node")

    def wait_for_cpus(self, cpus: float, timeout_s: float = 120) -> None:
        script = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                  "print(ray.cluster_resources().get('CPU', 0))")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", script, self.address], capture_output=True, text=True,
                                 env=self.env, timeout=120)
            if out.returncode == 0 and float(out.stdout.strip().splitlines()[-1]) >= cpus:
                return
            time.sleep(1)
        raise TimeoutError(f"cluster at {self.address} did not reach {cpus} CPUs")

    def raylets(self, node: Node | None = None) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd.split(" ")[0] and str(self.temp_dir) in cmd:
                try:
                    if node is None or os.getpgid(p.pid) == node.pgid:
                        out.append(p)
                except ProcessLookupError:
                    pass
        return out

    def kill_node(self, node: Node) -> None:
        """SIGKILL a node: its raylet's process group and every worker under its raylet."""
        victims = []
        for raylet in self.raylets(node):
            victims += raylet.children(recursive=True)
        _killpg(node.pgid)
        node.killed = True
        for p in victims:
            _kill(p.pid)

    def stop(self) -> None:
        victims = []
        for raylet in self.raylets():
            victims += raylet.children(recursive=True)
        for node in self.nodes:
            if not node.killed:
                _killpg(node.pgid)
                node.killed = True
        for p in victims:
            _kill(p.pid)
        for p in psutil.process_iter(["cmdline"]):  # anything else that names our temp dir
            if str(self.temp_dir) in " ".join(p.info["cmdline"] or []):
                _kill(p.pid)


def _tried(start: Callable[[int], Node], undo: Callable[[], None], attempts: int, what: str) -> Node:
    """``start(attempt)`` up to ``attempts`` times; after a try that fails, ``undo()`` clears what it left."""
    for attempt in range(1, attempts + 1):
        try:
            return start(attempt)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            undo()
            if attempt == attempts:
                raise
            print(f"{what} failed (try {attempt} of {attempts}), trying again: {str(e)[-500:]}", file=sys.stderr)
    raise AssertionError("unreachable")


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def session_workers(title: str) -> list[psutil.Process]:
    """Live worker processes of *this* process's Ray session whose title contains ``title``."""
    import ray

    node = ray._private.worker._global_node  # the session started by this process (tests/conftest.py)
    session_dir = node.get_session_dir_path()
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd.split(" ")[0] and session_dir in cmd:
            out += [c for c in p.children(recursive=True) if title in " ".join(_cmdline(c))]
    return out


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
