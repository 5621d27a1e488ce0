"""JobSpec: everything that defines one ``vidpipe run``."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

DeviceChoice = Literal["auto", "cpu", "cuda"]

# Exit statuses of the CLI (documented in the README).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM: stopped, the finished videos committed (as a shell's 128 + SIGINT)

# Shorter segments than this are not a labelling of video any more (and would sample each frame many
# times); the audio encoders' log-mel windows are 25 ms.
MIN_SEGMENT_S = 0.1
# Longer ones hold too much in memory: a chunk holds a head window of segments (16 by default) and each segment its
# audio (64 kB a second): 10 minutes make 0.6 GB; 1e6 s asked numpy for 60 GiB (a helper).
MAX_SEGMENT_S = 600.0
MAX_VIDEO_TIMEOUT_S = 1_000_000  # --video-timeout


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse, before any work, a folder ``flag`` names that cannot be made or written (one under a file)."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory; choose another {flag}")
    above = next(p for p in (folder, *folder.parents) if p.exists())
    if not above.is_dir():
        raise ConfigError(f"{flag} {path}: {above} is a file, not a directory; choose another {flag}")
    if not os.access(above, os.W_OK):
        raise ConfigError(f"{flag} {path}: {above} is not writable; choose another {flag}")


def check_segment_seconds(value: float) -> None:
    """``--segment-seconds`` (of run, bench, eval and train): a number of seconds from :data:`MIN_SEGMENT_S` to
    :data:`MAX_SEGMENT_S`."""
    if not MIN_SEGMENT_S <= value <= MAX_SEGMENT_S:
        raise ConfigError(f"--segment-seconds must be a number of seconds >= {MIN_SEGMENT_S:g} and at most "
                          f"{MAX_SEGMENT_S:g}, got {value}")


def check_device(value: str) -> None:
    """``--device`` (of run and bench): where the models run."""
    if value not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be one of auto, cpu, cuda; got {value!r}")


def check_chunk_seconds(value: float) -> None:
    """``--chunk-seconds`` (of run and bench): a finite number of seconds > 0."""
    if not 0 < value < math.inf:
        raise ConfigError(f"--chunk-seconds must be a number of seconds > 0, got {value}")


def runs_here(address: str | None) -> bool:
    """The job's workers run on this machine (an embedded Ray), not on the nodes of the cluster that
    ``--address`` (or ``$RAY_ADDRESS``, set inside a Ray job) names."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def check_address(address: str) -> tuple[str, int] | None:
    """``--address`` as ``(host, port)`` (None for ``auto``); a ConfigError for what Ray cannot join."""
    if address == "auto":
        return None
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: run joins a cluster by its GCS address HOST:PORT (what "
                          "'ray start --head' prints, port 6379 by default); http://HEAD:8265 is the job "
                          "server's, for 'vidpipe submit' and 'vidpipe status --job'")
    if address.startswith("ray://"):
        raise ConfigError(f"--address {address}: Ray Client (ray://) is not supported; give the GCS address "
                          "HOST:PORT from a machine of the cluster, or use 'vidpipe submit'")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379)")
    return host.strip("[]"), int(port)


@dataclass
class JobSpec:
    """A job: inputs, output, model and sampling.  Validated on construction (bad config fails fast)."""

    inputs: list[str]
    out: str
    model: str | None = None
    allow_untrained: bool = False
    segment_seconds: float | None = None  # None: the bundle's
    frames_per_segment: int | None = None  # None: the bundle's
    chunk_seconds: float = 60.0
    address: str | None = None
    device: DeviceChoice = "auto"
    decode_device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # encoders: bf16 on CUDA and bf16-capable CPUs
    top_k: int = 5
    with_embedding: bool = False
    retry_failed: bool = False
    progress: bool = True
    # Archives and failures (none of these changes a result row; not part of the job's identity):
    video_timeout_s: float | None = 600.0  # decode may work this long without producing a chunk; None: no limit
    max_attempts: int = 3  # tries of a video whose decoder (or worker) died before it is recorded as worker_crashed
    wave_size: int | None = None  # videos per Ray Data execution; None: start small, grow to ~5-minute waves
    commit_seconds: float = 60.0  # commit finished videos at least this often (the most a crash can lose)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no INPUT given; name video files, folders, globs or manifests")
        if not self.out:
            raise ConfigError("no output directory given; pass --out OUT")
        if self.segment_seconds is not None:
            check_segment_seconds(self.segment_seconds)
        if self.frames_per_segment is not None and self.frames_per_segment < 1:
            raise ConfigError(f"--frames-per-segment must be >= 1, got {self.frames_per_segment}")
        check_chunk_seconds(self.chunk_seconds)
        check_device(self.device)
        if self.decode_device not in ("cpu", "cuda"):
            raise ConfigError(f"--decode-device must be cpu or cuda; got {self.decode_device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16; got {self.precision!r}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {self.top_k}")
        if self.video_timeout_s is not None and not 0 < self.video_timeout_s <= MAX_VIDEO_TIMEOUT_S:
            # the decoder's wait (a poll in milliseconds, a C int) overflowed past ~24.8 days: every video of
            # the run failed as internal_error, recorded as failed for later runs too
            raise ConfigError(f"--video-timeout must be a number of seconds > 0 and at most {MAX_VIDEO_TIMEOUT_S:,} "
                              f"(11.6 days: a decode that makes no progress that long is not going to), got "
                              f"{self.video_timeout_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        if self.wave_size is not None and self.wave_size < 1:
            raise ConfigError(f"--wave-size must be >= 1, got {self.wave_size}")
        if not self.commit_seconds > 0:
            raise ConfigError(f"--commit-seconds must be > 0, got {self.commit_seconds}")
        if self.address is not None:
            check_address(self.address)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
