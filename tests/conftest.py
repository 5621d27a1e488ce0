"""Shared fixtures: the real sample media, one Ray runtime for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = REPO.parent / "shared" / "media"
SAMPLES = REPO / "jobs" / "samples"


def pytest_configure(config: pytest.Config) -> None:
    """Before pytest's workers start (tests run in two, see pyproject.toml): Ray's authentication token.

    The first Ray started on a machine writes ~/.ray/auth_token (Ray 2.60 turns token authentication on by
    default); two workers starting their first Rays at once on a fresh machine would each write one, and a
    process could hold the token the file no longer has.  Made here once, as Ray makes it, where it is missing.
    """
    if hasattr(config, "workerinput") or (Path.home() / ".ray" / "auth_token").exists():  # where Ray writes it
        return
    import subprocess
    import sys

    subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                   capture_output=True, timeout=120, check=True)


# Test files that take minutes (their tests' and fixtures' time on the 2-core VM), heaviest first.  pytest-xdist
# hands whole files to its two workers in collection order (--dist loadfile, --no-loadscope-reorder in
# pyproject.toml); by default it orders them by their number of tests, which put the cluster tests (4 tests, ~8
# minutes) near the end, where the other worker, done with its files, waited for them.
HEAVY_FILES_FIRST = ("jobs/test_supervise.py", "jobs/test_cluster.py", "jobs/test_train.py", "jobs/test_s3.py",
                     "jobs/test_run.py", "jobs/test_resume_kill.py", "jobs/test_train_default_bundle.py",
                     "jobs/test_train_labels.py", "jobs/test_decode_memory.py", "pipeline/test_encoders.py",
                     "workers/test_encoder_stages.py", "jobs/test_train_encoder_weights.py", "jobs/test_faults.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavy files first, in HEAVY_FILES_FIRST's order; the rest after them in their own order (stable)."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, name in enumerate(HEAVY_FILES_FIRST) if path.endswith(name)), len(HEAVY_FILES_FIRST))

    items.sort(key=rank)


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not (SHARED_MEDIA / "bbb_clip_720p.mp4").is_file():
        raise FileNotFoundError(f"real test media missing: {SHARED_MEDIA} (the checkout's sibling shared/media)")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for every test that needs Ray (started once, stopped at the end)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    from jobs.raystop import shutdown_ray

    shutdown_ray()
