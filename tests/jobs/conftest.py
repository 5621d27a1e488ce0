"""Fixtures for the archive tests: a folder of small generated videos, a loopback S3, result comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.media_factory import make_video

VIDPIPE = Path(sys.executable).with_name("vidpipe")
# Small and fast, yet several chunks, both with and without audio.
RUN_FLAGS = ["--allow-untrained", "--segment-seconds", "1", "--chunk-seconds", "16", "--no-progress"]
SEGMENT_COLUMNS = ["video_id", "segment_index", "start_s", "end_s", "label", "score", "topk_labels", "topk_scores",
                   "has_audio", "model_id"]


def make_archive(root: Path, n: int, *, duration_s: float = 3.0) -> Path:
    """``n`` small real videos (96x64, 10 fps; two of three with a tone) in two folders."""
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        make_video(sub / f"clip{i:03d}.mp4", duration_s=duration_s + (i % 4) * 0.5, fps=10, size=(96, 64),
                   audio="tone" if i % 3 else None, tone_hz=200.0 + 40 * i, seed=i)
    return root


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory) -> Path:
    """20 videos of 3-4.5 s: the archive of the kill tests."""
    return make_archive(tmp_path_factory.mktemp("archive20"), 20)


def segment_rows(out: str | Path) -> list[dict]:
    """Every committed segment row, in key order (what must match between interrupted and clean runs)."""
    from jobs.query import run_query

    cols = ", ".join(SEGMENT_COLUMNS)
    return run_query(out, f"SELECT {cols} FROM segments ORDER BY video_id, segment_index").to_pylist()


def videos_ok(n: int) -> str:
    """How the summary line of 'vidpipe run' counts its finished videos: ``1 video ok``, ``3 videos ok``."""
    return f"{n} video{'' if n == 1 else 's'} ok"


def duplicate_keys(out: str | Path) -> int:
    from jobs.query import run_query

    return run_query(out, "SELECT count(*) n FROM (SELECT video_id, segment_index FROM segments "
                          "GROUP BY 1, 2 HAVING count(*) > 1)").column("n")[0].as_py()


@pytest.fixture(scope="session")
def baseline(small_archive, tmp_path_factory, ray_session) -> list[dict]:
    """The uninterrupted run's segments of ``small_archive`` (in-process, on the session's Ray)."""
    from jobs.runner import JobRunner
    from jobs.spec import JobSpec

    out = tmp_path_factory.mktemp("baseline") / "out"
    spec = JobSpec(inputs=[str(small_archive)], out=str(out), allow_untrained=True, segment_seconds=1.0,
                   chunk_seconds=16, progress=False)
    result = JobRunner(spec).run()
    assert result.videos_done == 20 and result.videos_failed == 0
    # a job of up to three first waves (16 videos or more each) runs as one wave
    assert json.loads((out / "_job" / "progress.json").read_text())["waves"] == 1
    return segment_rows(out)


def vidpipe_env(**extra: str) -> dict[str, str]:
    """The environment of a ``vidpipe`` subprocess: embedded Ray, quiet, no uv hooks."""
    env = dict(os.environ)
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


# -- a loopback S3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 at a free port; yields the environment that points AWS clients at it."""
    from moto.server import ThreadedMotoServer

    from tests.jobs.clusters import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process's pyarrow/boto3 (uploads, queries); subprocesses get them too
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def run_vidpipe(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VIDPIPE), *args], capture_output=True, text=True, env=env or vidpipe_env(),
                          timeout=timeout)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie waiting for its parent has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):  # noqa: ANN001
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out waiting for {what}")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_STOP_INSIDE_AN_IMPORT = """
import os, signal, sys
from jobs import cli

module = sys.argv[1]

class StopThere:  # SIGTERM as a module is found, before it loads: the stop lands inside the import chain
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, StopThere())
sys.argv = ["vidpipe", *sys.argv[2:]]
sys.exit(cli._command())  # the command, then the cleanup every command ends with (Ray's stop)
"""


def run_script(script: str, argv: list[str], timeout: float = 300, env_extra: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    """Run ``python -c SCRIPT ARGV...`` in this checkout, in a ``vidpipe`` subprocess's environment."""
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], env=vidpipe_env(**(env_extra or {})), timeout=timeout,
                          **kwargs)


def stop_inside_an_import(module: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    """Run ``vidpipe ARGS`` in this checkout with a SIGTERM sent to it as ``module`` is being imported."""
    return run_script(_STOP_INSIDE_AN_IMPORT, [module, *args], **kwargs)
