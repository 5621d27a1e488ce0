"""JobRunner: stream the inputs in waves through the Ray Data stages into the ResultWriter.

How a job over an archive runs (see also ``jobs/output.py`` for the commit protocol):

- **Discovery streams.**  Inputs are enumerated lazily (folders, globs, manifests, S3 prefixes); each
  video's URI is checked against the *done-set* (URIs in committed ``videos``/``failures`` files,
  kept as 16-byte digests, see :mod:`jobs.idset`) and the rest is cut into *waves*.  Only one wave's
  videos are Python objects on the driver at a time.  A second thread counts the inputs (an
  independent pass) so that progress and ``vidpipe status`` know the total.
- **One Ray Data execution per wave.**  Waves start at ``8 x`` the decode pool (so the first
  results commit early; at least 4 videos per core, see ``jobs/plan.py``; a job of up to three such
  waves runs as one) and grow (up to 8x per wave) toward five minutes per wave, up to 16384
  videos: the cost of starting a wave's model actor pools (3.7 s to a ready model worker on a 2-core
  machine: a new process, Ray Data's and torch's imports, the models; decode runs in Ray's pooled
  worker processes, which keep their decoder between waves, see ``workers/ray_adapter.py``) and of
  its tail (the last videos finishing while workers idle) stays a small fraction.  ``--wave-size``
  fixes the size.
- **Only the driver writes.**  Workers on any node return head rows through the dataset iterator;
  the driver assembles complete videos and commits them.  So outputs of many nodes land in one
  consistent OUT, and a node's death cannot leave a partial file.
- **Failures.**  A bad file is a failure row from its stage.  A decoder that crashes or hangs on a
  file takes only its own child process down: the decode worker records that video
  (``worker_crashed`` / ``timeout``, see ``workers/decode_stage.py``) and goes on.  A worker process
  that dies itself (OOM kill, node lost) has its task retried once by Ray Data; if that also dies,
  the task's block is dropped (``max_errored_blocks = -1``) and the wave ends without those videos.
  A wave's execution can also fail as a whole (an object lost with its node, ...): the driver
  catches that.  Either way the wave's *unfinished* videos are run again, split in halves while more
  than one is left (bisection), until a video that keeps killing workers runs alone; after
  ``max_attempts`` runs (the last alone) it becomes one ``worker_crashed`` failure row (stage
  ``worker``) with its ``attempts``.  Innocent videos that shared a dead task finish in their half.
  Chunks a dead task had already delivered are discarded (or, for repeats of a finished video,
  ignored) by the writer.  A wave that a lost node leaves waiting (actors restarted where there is no room
  for them) is ended by ``_WaveWatch`` and its unfinished videos run again as one group, planned anew.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TextIO

import pyarrow.compute as pc
from pyarrow import fs as pafs

from jobs import stopping
from jobs.discover import VideoRef, check_inputs, count_videos, discover
from jobs.fs import shown
from jobs.idset import IdSet
from jobs.manifest import ManifestRowError
from jobs.models import bundle_fingerprint, is_untrained, resolve_bundle, with_sampling
from jobs.output import JOB, OutputDir, ResultWriter, new_run_id, sized
from jobs.plan import VIDEOS_PER_CORE_FOR_ONE_THREAD, Node, cluster_nodes, job_precision, plan_for_cluster
from jobs.progress import Progress, ProgressFile, RunStatus, count_of
from jobs.spec import EXIT_OK, EXIT_SOME_FAILED, JobSpec, check_address, runs_here
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError
from pipeline.inputs import local_path, missing_local_file
from pipeline.media import Failure
from pipeline.precision import emulated_bf16_warning, pick_device
from pipeline.s3 import bucket_missing
from pipeline.schema import TABLES
from workers.build import PipelinePlan, build_stages, chunking_for
from workers.decode_stage import DecodeStage
from workers.rows import iter_rows

log = logging.getLogger(__name__)

MAX_WAVE = 16_384
TARGET_WAVE_S = 300.0
_MAX_ROWS_PER_BLOCK = 8
_TARGET_BLOCK_BYTES = 1 << 20
# A wave that brings no batch for this long after the cluster lost CPUs or GPUs is ended and its unfinished
# videos planned again for the nodes left (VIDPIPE_STALL_S overrides it: tests).
STALL_S = 60.0
_WATCH_EVERY_S = 2.0


@dataclass
class JobResult:
    videos_total: int
    videos_skipped: int
    videos_done: int
    videos_failed: int
    segments_written: int
    video_seconds: float
    wall_s: float
    model_id: str
    stage_metrics: dict | None = None  # per-stage busy seconds / peak RSS (see workers.metrics)
    videos_failed_before: int = 0  # of the skipped inputs, those an earlier run recorded as failed
    videos_changed: int = 0  # of the skipped inputs, finished ones whose file's size changed since (not relabelled)
    changed_examples: list[str] = field(default_factory=list)  # the first few of them
    videos_audio_undecodable: int = 0  # labelled without audio: FFmpeg has no decoder for their audio tracks

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.videos_failed or self.videos_failed_before else EXIT_OK


def _utf8_entrypoint(ray: Any) -> None:
    """Ray records the driver's command line as the job's entrypoint, as UTF-8: an input path that is not UTF-8
    (``bad\\xffname.mp4``) made ``ray.init`` fail.  Record it with such bytes escaped instead."""
    utils = ray._private.utils
    original = getattr(utils.get_entrypoint_name, "__wrapped__", utils.get_entrypoint_name)

    def entrypoint() -> str:
        return shown(original())

    entrypoint.__wrapped__ = original  # type: ignore[attr-defined]
    utils.get_entrypoint_name = entrypoint


class _TokenNoticeFilter(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster" at an embedded start (README, Limits)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_NOTICE = _TokenNoticeFilter()  # one: addFilter adds the same filter once


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, set inside a Ray job) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    show_logs = os.environ.get("VIDPIPE_RAY_LOGS") == "1"
    given = address
    address = address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the process's SIGTERM handler with one that exits at once (status 15, the run
    # "failed"); the CLI's own handler stops like Ctrl-C, committing what is finished, so it is put back
    in_main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if in_main else None
    _utf8_entrypoint(ray)
    try:
        os.getcwd().encode("utf-8")
    except UnicodeEncodeError:  # Ray gives its workers the driver's folder, as UTF-8, and fails on it
        raise ConfigError(f"the current folder {os.getcwd()!r} has a name that is not UTF-8, which Ray cannot "
                          "start from; run vidpipe from another folder (inputs and OUT may stay where they are)"
                          ) from None
    # Ray sets that handler first thing, before it starts the node's processes, and a SIGTERM that met it as Ray
    # forked one was swallowed there with logging's lock held (jobs/stopping.py): the CLI's handler stays.
    ray_utils = ray._private.utils
    set_handler = ray_utils.set_sigterm_handler
    try:
        if callable(on_sigterm):
            ray_utils.set_sigterm_handler = lambda handler: None
        if address:
            _check_reachable(address, from_env=address != given)
            _check_token(address)
            try:
                ray.init(address=address, log_to_driver=show_logs, configure_logging=False)  # starts no process
            except ConnectionError as exc:  # reachable, yet Ray would not join it (after its own retries)
                if address == "auto":
                    raise ConfigError(f"--address auto: could not join a Ray cluster running on this machine ({exc}); "
                                      "start one with 'ray start --head', give a cluster's HOST:PORT, or leave "
                                      "--address out to run on an embedded Ray") from None
                raise _cannot_join(address, exc) from None
        else:
            if not show_logs:  # Ray's notice that a new local cluster takes a token: nothing for the user to do
                logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_NOTICE)
            with stopping.deferred("Ray's start"):  # it forks its processes: a stop in there hangs (jobs/stopping.py)
                # "local": a new Ray of its own, even where 'ray start' left a cluster on this machine, which
                # ray.init() would join (and then refuse num_cpus: a ValueError traceback, nothing run)
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=show_logs, configure_logging=False)
    except SystemExit as exc:
        # a SIGTERM that met a handler of Ray's after all (sys.exit(15); another Ray version): stop as ours would
        if callable(on_sigterm) and exc.code == signal.SIGTERM:
            from jobs.supervise import stop_reason

            raise KeyboardInterrupt(stop_reason(signal.SIGTERM)) from None
        raise
    finally:
        ray_utils.set_sigterm_handler = set_handler
        if callable(on_sigterm):
            # Always, even where Python still names ours: Ray's core worker put abseil's failure handler under
            # it at the C level, which prints a crash trace on SIGTERM and aborts the process 3 s later
            # (SIGABRT: a stop whose commit and Ray's shutdown took longer died, recorded as failed)
            signal.signal(signal.SIGTERM, on_sigterm)
            signal.alarm(0)  # a SIGTERM that met abseil's handler in ray.init's last steps armed that alarm


def _check_reachable(address: str, *, from_env: bool = False) -> None:
    """Fail in seconds, naming the address, where ray.init would retry connecting for minutes."""
    import socket

    where = check_address(address)
    if where is None:
        return
    try:
        conn = socket.create_connection(where, timeout=10)
    except OSError as exc:
        given = "unset RAY_ADDRESS (it is set here)" if from_env else "leave --address out"
        raise ConfigError(f"cannot reach a Ray cluster at {address}{' (RAY_ADDRESS)' if from_env else ''} "
                          f"({exc.strerror or exc}); check the address ('ray start --head' prints it) and that the "
                          f"cluster is up, or {given} to run on this machine") from None
    # A web server there (the dashboard and job server, http://HEAD:8265, is the address users meet first): ray.init
    # retried "Failed to connect to GCS" until killed.  The GCS speaks gRPC (HTTP/2) and answers no HTTP/1 request.
    try:
        with conn:
            conn.settimeout(2)
            conn.sendall(b"GET / HTTP/1.0\r\nHost: vidpipe\r\n\r\n")
            answer = conn.recv(16)
    except OSError:
        return
    if answer.startswith(b"HTTP/"):
        raise ConfigError(f"{address}{' (RAY_ADDRESS)' if from_env else ''} answers as a web server, not as a Ray "
                          "cluster's GCS: that is the dashboard and job server's port, which 'vidpipe submit' and "
                          "'status --job' take as http://HEAD:8265; give run the GCS address, HOST:PORT as 'ray "
                          "start --head' prints it (port 6379 unless --port said otherwise)")


def _cannot_join(address: str, exc: Exception) -> ConfigError:
    """The error for a cluster that is reachable yet would not let this process join (its token, most often)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        how = ("RAY_AUTH_MODE=token is set here, so the cluster may have refused this token: put the cluster's "
               "token (~/.ray/auth_token on its head node) in RAY_AUTH_TOKEN or in ~/.ray/auth_token here")
    else:
        how = ("A cluster started by 'ray start' asks for its authentication token: set RAY_AUTH_MODE=token here, "
               "with the cluster's token in RAY_AUTH_TOKEN or in ~/.ray/auth_token (where 'ray start' wrote it on "
               "the head node)")
    return ConfigError(f"cannot join the Ray cluster at {address} ({exc}). {how}; otherwise check that the "
                       "address is the cluster's GCS address ('ray start --head' prints it)")


def _check_token(address: str, wait_s: float = 5.0) -> None:
    """Ask the GCS at ``address`` once whether it takes this process's token: a refusal is said at once, where
    ray.init retries it for ~20 s.  Anything else (no answer within ``wait_s``, another error) is left to ray.init."""
    if check_address(address) is None:
        return
    import ray
    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    refused: list[Exception] = []

    def probe() -> None:
        try:
            GcsClient(address=address)  # asks the GCS for its cluster id: the first call that carries the token
        except ray.exceptions.AuthenticationError as exc:
            refused.append(exc)
        except Exception:  # noqa: BLE001 - not ours to judge: ray.init connects and says what it finds
            pass

    # A thread: on a port that is no GCS the client waits ~40 s; ray.init's own connect then takes over
    prober = threading.Thread(target=probe, name="vidpipe-token-probe", daemon=True)
    prober.start()
    prober.join(wait_s)
    if refused:
        raise _cannot_join(address, refused[0]) from None


def _check_env_address(address: str) -> None:
    """An unreachable HOST:PORT in RAY_ADDRESS, named before OUT is made; any other form is left to Ray."""
    try:
        check_address(address)
    except ConfigError:
        return
    _check_reachable(address, from_env=True)  # returns at once for "auto" (no HOST:PORT to try)


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    if os.environ.get("VIDPIPE_RAY_LOGS") != "1":
        # "execution finished in N seconds" per wave is Ray Data's bookkeeping, not the user's; its
        # warnings and errors (a dropped block, ...) still show
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # vidpipe prints its own progress line; Ray Data's notice that its bars are off is noise
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def warm_ray_data() -> None:
    """Start Ray Data's per-session pieces (its imports, its stats and autoscaling-coordinator actors) now.

    The first dataset of a Ray session otherwise pays them (about 1 s on 2 cores) while the job's
    own workers start.  ``vidpipe bench`` calls this before its clock, as it starts Ray before it.
    """
    import ray.data

    _quiet_ray_data()
    ray.data.range(1).materialize()


_LATER_KEYS = frozenset({"precision"})  # identity keys that older job.json files lack


def check_job_identity(out: OutputDir, bundle: ModelBundle, spec: JobSpec, precision: str) -> None:
    """Record what defines the job's rows; refuse to mix another bundle or sampling into the same OUT.
    ``precision``: the encoders' precision the job runs at ("bf16" or "fp32", ``job_precision``)."""
    # top_k as the rows hold it: a --top-k past the bundle's labels gives all of them, whatever its value
    n_labels = len(bundle.labels)
    identity = {"bundle_fingerprint": bundle_fingerprint(bundle), "model_id": bundle.model_id,
                "sampling": bundle.sampling.to_dict(), "top_k": min(spec.top_k, n_labels),
                "with_embedding": spec.with_embedding, "precision": precision}
    old = out.read_json("_job/job.json")
    if old is None:
        _check_rows_identity(out, bundle, spec)
    else:
        if isinstance(old.get("top_k"), int):  # recorded unclamped before 2026-12-02
            old = old | {"top_k": min(old["top_k"], n_labels)}
        # a job.json from before "precision" was recorded, or that recorded the flag "auto", does not say which
        # precision its runs used: not compared
        known = {k for k in old if not (k == "precision" and old[k] == "auto")}
        mismatch = [k for k in identity if (k in known or k not in _LATER_KEYS) and old.get(k) != identity[k]]
        if not mismatch:
            if "precision" not in known:  # from now on this job's runs keep to one precision
                log.warning("%s: _job/job.json recorded no precision (written before 2026-12-01): recorded %s, this "
                            "run's, as the job's", spec.out, precision)
                out.write_json("_job/job.json", old | {"precision": precision})
            return
        if out.commits():
            if "model_id" in mismatch and "bundle_fingerprint" in mismatch:  # another model: its id says it
                mismatch.remove("bundle_fingerprint")
            said = [f"{k} {old.get(k)!r} there, {identity[k]!r} now" if k in ("top_k", "with_embedding", "precision")
                    else "the model's encoders, head, labels or sampling" if k == "bundle_fingerprint"  # not jargon
                    else k for k in mismatch]
            if "model_id" in mismatch and "top_k" in mismatch:  # another model: its labels may make it, not a flag
                said[mismatch.index("top_k")] += " (at most each model's number of labels)"
            raise ConfigError(
                f"{spec.out} already holds results of another job (differs in: {'; '.join(said)}; "
                f"it has model {old.get('model_id')} with sampling {old.get('sampling')}). "
                "Use a new --out directory, or rerun with the same settings (model, sampling, --top-k, --embeddings, "
                "--precision) to resume.")
        # no result committed yet (the first run stopped before its first commit): nothing to mix with
    out.write_json("_job/job.json", identity | {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # which bundle, as the command named it ("vidpipe train", its meta's source, named every trained one)
        "bundle": spec.model or ("untrained" if spec.allow_untrained else "default"),
        "inputs": list(spec.inputs)})


def _check_rows_identity(out: OutputDir, bundle: ModelBundle, spec: JobSpec) -> None:
    """Without ``_job/job.json`` (removed by hand) but with committed results: refuse to mix in rows of
    another model, segment length, ``--top-k`` or embedding setting, as committed segments show them."""
    found: dict[str, Any] = {}
    for rel in out.committed_rel("segments")[:10]:  # a few files show it; not every one of a long job
        if "model_id" not in found:
            found["embeddings"] = "embedding" in out.store.read_schema(rel).names
        rows = out.store.read_table(rel, columns=["model_id", "segment_index", "start_s", "topk_labels"])
        if rows.num_rows:
            found |= {"model_id": rows.column("model_id")[0].as_py(),
                      "top_k": len(rows.column("topk_labels")[0].as_py())}
        later = pc.greater(rows.column("segment_index"), 0)
        if pc.any(later).as_py():
            i = pc.index(later, True).as_py()
            found["segment_seconds"] = round(rows.column("start_s")[i].as_py() / rows.column("segment_index")[i].as_py(),
                                             6)
        if "model_id" in found and "segment_seconds" in found:
            break
    if "model_id" not in found:
        return  # no segment committed yet: nothing to mix with
    wanted = {"model_id": bundle.model_id, "embeddings": spec.with_embedding,
              "top_k": min(spec.top_k, len(bundle.labels)), "segment_seconds": round(bundle.sampling.segment_seconds, 6)}
    differ = [k for k in wanted if k in found and found[k] != wanted[k]]
    if differ:
        raise ConfigError(
            f"{spec.out} holds results of another job ({', '.join(f'{k} {found[k]}' for k in differ)}; this run: "
            f"{', '.join(f'{k} {wanted[k]}' for k in differ)}), and its _job/job.json, which records the job, is "
            "gone. Use a new --out directory, or rerun with the settings of those results to resume.")
    log.warning("%s had no _job/job.json (removed?): recorded this run's settings as the job's; its committed "
                "rows show the same %s (frames per segment and image size cannot be read from them: pass those "
                "of the earlier runs)", out.uri, ", ".join(found))


def _inside_another_out(out: OutputDir) -> str | None:
    """Where ``out`` lies in another OUT's own folders (its tables, ``_job``): a run there wrote data files that
    the other OUT cannot account for, and it refused to run (or repair) until they were moved."""
    parts = PurePosixPath(out.store.root).parts
    for i in range(1, len(parts)):  # parts[0] is "/" or the bucket (an OUT at a bucket's root is one too)
        if parts[i] in (JOB, *TABLES):
            parent = str(PurePosixPath(*parts[:i])).rstrip("/")
            if out.store.fs.get_file_info(f"{parent}/{JOB}").type != pafs.FileType.NotFound:
                return f"{parent}/{parts[i]}" if out.local else f"s3://{parent}/{parts[i]}"
    return None


def _open_output(uri: str) -> OutputDir:
    try:
        out = OutputDir(uri)
        if (where := _inside_another_out(out)) is not None:
            outer = where.rsplit("/", 1)[0] or "/"
            raise ConfigError(f"it lies in {where}, a folder of the vidpipe output {outer}, whose "
                              "files the other output must account for (a run there made that output refuse to run); "
                              "give a directory outside it")
        if out.local:
            out.store.makedirs("")  # a file in the way, a read-only or missing parent: fail here, named
        elif bucket_missing(out.store.fs, out.store.root):
            bucket = out.store.root.split("/", 1)[0]
            raise ConfigError(f"there is no bucket {bucket!r}: create it, or check the name and AWS_ENDPOINT_URL")
        out.is_output()  # reaches the bucket: bad credentials or endpoint fail here, before any work
    except ConfigError as exc:  # says what to do in its own words ('s3://' without a bucket)
        raise ConfigError(f"cannot use --out {shown(uri)}: {exc}") from None
    except (OSError, ValueError) as exc:
        why = "it is a file, not a directory" if isinstance(exc, FileExistsError) else str(exc)
        if uri.startswith("s3://"):  # an endpoint or credentials problem, not a folder to create
            raise ConfigError(f"cannot use --out {uri}: {why}; check AWS credentials, region and AWS_ENDPOINT_URL "
                              "(and that this identity may read and write the bucket)") from None
        raise ConfigError(f"cannot use --out {shown(uri)}: {why}; pass a directory that can be created "
                          "(or an earlier run's --out to resume it)") from None
    return out


class WaveFeeder:
    """Pulls videos lazily from discovery, skips the finished ones, hands out waves of a given size.

    ``fail_at_once``, where given, is asked of each video before it joins a wave: True where it has recorded the
    video's failure itself (a local file that is not there), which then joins none.  A manifest row that names no
    video ends the inputs there, kept in ``input_error`` for the runner to say."""

    def __init__(self, refs: Iterator[VideoRef], done: IdSet, failed: IdSet | None = None,
                 sizes: IdSet | None = None, fail_at_once: Callable[[VideoRef], bool] | None = None) -> None:
        self._refs = refs
        self._fail_at_once = fail_at_once
        self.input_error: ManifestRowError | None = None
        self._back: deque[VideoRef] = deque()  # handed out, then given back (unread): they come first
        self._end = False
        self.done = done
        self.failed = failed if failed is not None else IdSet()  # of ``done``, the failed ones
        self.sizes = sizes  # the finished videos' sizes when labelled (OutputDir.finished_uris), if checked
        self.discovered = 0
        self.skipped = 0
        self.skipped_failed = 0
        self.changed = 0  # of the skipped finished videos, those whose file's size is not what was labelled
        self.changed_examples: list[str] = []

    @property
    def exhausted(self) -> bool:
        """Whether every video has been handed out (and none given back since)."""
        return self._end and not self._back

    def next_wave(self, size: int) -> list[VideoRef]:
        wave: list[VideoRef] = []
        while self._back and len(wave) < size:
            wave.append(self._back.popleft())
        while len(wave) < size and not self._end:
            try:
                ref = next(self._refs, None)
            except ManifestRowError as exc:  # discovery ends there: no video after it is handed out
                self.input_error, ref = exc, None
            if ref is None:
                self._end = True
                break
            self.discovered += 1
            if ref.uri in self.done:
                self.skipped += 1
                failed = ref.uri in self.failed
                self.skipped_failed += failed
                if not failed and self.sizes is not None:
                    self._check_size(ref)
            elif self._fail_at_once is None or not self._fail_at_once(ref):
                wave.append(ref)
        return wave

    def _check_size(self, ref: VideoRef) -> None:
        """Count a finished video whose file now has another size than when it was labelled (re-encoded or
        replaced in place: its rows describe the old file).  The size is the listing's (an S3 prefix) or a
        local file's stat; a video named otherwise (an S3 manifest line), or whose size was not recorded, or
        whose file is gone, is not checked."""
        assert self.sizes is not None
        size = ref.size_bytes
        if size is None and (path := local_path(ref.uri)) is not None:
            try:
                size = os.stat(path).st_size
            except OSError:
                return
        if size is None or sized(ref.uri, size) in self.sizes or sized(ref.uri, None) in self.sizes:
            return
        self.changed += 1
        if len(self.changed_examples) < 5:
            self.changed_examples.append(f"{ref.uri} (now {size:,} bytes)")

    def at_end(self) -> bool:
        """Whether no video is left to hand out (discovery is read one video ahead to know)."""
        if not self._back and not self._end:
            self._back.extend(self.next_wave(1))
        return self.exhausted

    def unread(self, refs: list[VideoRef]) -> None:
        """Give back videos handed out but not run: the next wave starts with them."""
        self._back.extendleft(reversed(refs))


def _infrastructure_error(exc: BaseException) -> bool:
    """Whether a failed execution is the cluster's doing (a process, node or object lost), not a bug.

    A stage whose setup raises (its actor's creation task failed) is a configuration problem: the
    job stops with it rather than marking every video as crashed.
    """
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.NodeDiedError,
            rex.OutOfMemoryError, rex.LocalRayletDiedError, rex.RaySystemError, rex.ObjectStoreFullError)
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, rex.RayActorError) and e.actor_init_failed:
            return False
        if isinstance(e, lost):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False


class _WaveWatch:
    """Ends a wave that a lost node left waiting without end.

    Ray restarts an actor of a lost node elsewhere and its task waits for the restart; where the nodes left
    cannot hold the plan's actors (a 2-CPU head and a 1-CPU node, the node lost: 0.75-CPU actors pending on
    0.5 free CPU), Ray Data waits for them forever.  A thread looks at the cluster every few seconds; once it
    has fewer CPUs or GPUs than when the wave started and no batch came for ``stall_s`` since, it shuts the
    wave's execution down (its actors, the pending ones too, are killed): the wave's iterator ends, and the
    runner plans its unfinished videos again for the nodes left.  Nothing is ended while batches come.
    """

    def __init__(self, ds: Any, nodes: list[Node], stall_s: float) -> None:
        self._ds = ds
        self._cpus, self._gpus = sum(n[0] for n in nodes), sum(n[1] for n in nodes)
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._lost_since: float | None = None
        self.ended: str | None = None  # why the wave was ended, for the run's output
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vidpipe-wave-watch", daemon=True)
        self._thread.start()

    def batch(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_EVERY_S):
            try:
                nodes = cluster_nodes()
            except Exception:  # noqa: BLE001 - the GCS busy or gone: the execution itself says so
                continue
            cpus, gpus = sum(n[0] for n in nodes), sum(n[1] for n in nodes)
            if cpus >= self._cpus and gpus >= self._gpus:  # never lost, or a node came in its place
                self._lost_since = None
                continue
            now = time.monotonic()
            if self._lost_since is None:
                self._lost_since = now
            if now - max(self._last, self._lost_since) < self._stall_s:
                continue
            executor = getattr(self._ds, "_current_executor", None)  # Ray Data's own handle (not public)
            if executor is None:
                log.warning("a wave stalled after the cluster lost a node, and this Ray Data gives no handle to "
                            "end it: stop the run (Ctrl-C) and rerun it to resume")
                return
            gone = [f"{self._cpus - cpus:g} of {self._cpus:g} CPUs"] + (
                [f"{self._gpus - gpus:g} of {self._gpus:g} GPUs"] if gpus < self._gpus else [])
            self.ended = (f"the cluster lost {' and '.join(gone)} during a wave, which then brought nothing for "
                          f"{now - max(self._last, self._lost_since):.0f} s (its actors wait for room that is gone)")
            executor.shutdown(force=True)
            return


class JobRunner:
    """Runs one JobSpec to completion on Ray Data (embedded local Ray unless an address is given)."""

    def __init__(self, spec: JobSpec, *, stream: TextIO | None = None) -> None:
        self.spec = spec
        self.stream = stream or sys.stderr
        self.plan: PipelinePlan | None = None  # the largest wave's (bench reports its pool sizes)
        self._plan_videos = 0
        self._input_error: ConfigError | None = None  # a bad manifest row that counting found ahead of the waves
        self._said_emulated = False  # whether the run said its encoders ran bf16 emulated (_say_emulated)
        self._progress: Progress | None = None  # the running waves' progress line (a terminal shows it in place)
        self.precision: str = spec.precision  # what it means for this job ("bf16" or "fp32"), set when it runs

    def run(self) -> JobResult:
        spec = self.spec
        started = time.monotonic()
        here = runs_here(spec.address)
        bundle = with_sampling(resolve_bundle(spec.model, allow_untrained=spec.allow_untrained, local=here),
                               spec.segment_seconds, spec.frames_per_segment)
        check_inputs(spec.inputs)
        # a wrong --address is named before OUT is made (Ray is joined later, when there is work)
        if spec.address == "auto":
            init_ray(spec.address)  # the cluster 'ray start' started on this machine, or an error saying none is
        elif spec.address:
            _check_reachable(spec.address)
            _check_token(spec.address)  # a refused token is said before OUT is made, as an unreachable address is
        elif os.environ.get("RAY_ADDRESS"):
            _check_env_address(os.environ["RAY_ADDRESS"])
        if here:
            pick_device(spec.device)  # --device cuda without a GPU: refused before OUT is made
        out = _open_output(spec.out)
        if not out.is_output():
            out.refuse_unrecorded([])  # another tool's (or a stripped output's) files: refuse before making _job/
            out.refuse_occupied_tables()
        run_id = new_run_id()
        with out.lock(run_id):
            out.create()
            out.recover()  # first: a refusal (files no commit names, committed ones gone) leaves no job.json behind
            self.precision = self._job_precision(out, bundle)
            # said once: here at the start, or when a worker first reports emulated bf16 (see _say_emulated)
            if here and spec.precision == "bf16" and (slow := emulated_bf16_warning("bf16", spec.device)):
                self._say(slow)
                self._said_emulated = True
            check_job_identity(out, bundle, spec, self.precision)
            sizes = IdSet()
            done, failed_before = out.finished_uris(include_failed=not spec.retry_failed, sizes=sizes)
            if is_untrained(bundle):
                self._say("WARNING: running an UNTRAINED model (--allow-untrained): labels are meaningless, "
                          "rows carry model_id 'untrained'. Train a bundle with 'vidpipe train'.")
            failed_note = f"{len(failed_before)} of them failed; " if len(failed_before) else ""
            self._say(f"vidpipe: {count_of(len(done), 'video')} already finished in {out.uri} ({failed_note}done-set "
                      f"{(done.nbytes + sizes.nbytes) / 1e6:.1f} MB); model {bundle.model_id}; run {run_id}")
            embedding_dim = 2 * bundle.head.lstm_hidden if spec.with_embedding else None
            writer = ResultWriter(out, model_id=bundle.model_id, labels=list(bundle.labels),
                                  embedding_dim=embedding_dim, flush_seconds=spec.commit_seconds, run_id=run_id)
            status = RunStatus(run_id=run_id)
            # on an embedded Ray the workers see this machine's files: one that is not there fails here, in a
            # stat, where a decode task would take ~40 ms of Ray's to say the same
            fail_at_once = (lambda ref: self._fail_if_missing(ref, writer)) if here else None
            feeder = WaveFeeder(discover(spec.inputs), done, failed_before, sizes, fail_at_once)
            self._count_inputs(status, done)  # ``done`` is only read from here on: the thread may share it
            with ProgressFile(out, status) as progress_file:
                try:
                    self._run_waves(bundle, feeder, writer, status, progress_file)
                    writer.flush()
                    status.state = "finished"
                except BaseException as exc:
                    if self._progress is not None:  # what is said of the stop starts on a line of its own
                        self._progress.break_line()
                    stopped = isinstance(exc, KeyboardInterrupt)
                    # a usage error says what to do in its own words; anything else is named by its kind
                    said = str(exc) if stopped or isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                    try:
                        # first: on S3 a state that says the run ended releases OUT to the next run, whose
                        # recovery deletes staged files that no commit names yet (this flush's)
                        self._flush_what_is_complete(writer)
                    finally:
                        status.state = "interrupted" if stopped else "failed"
                        status.message = (said or "stopped")[:500]
                    raise
                finally:
                    self._sync(status, writer, feeder)
        wall = time.monotonic() - started
        return JobResult(videos_total=feeder.discovered, videos_skipped=feeder.skipped,
                         videos_failed_before=feeder.skipped_failed, videos_changed=feeder.changed,
                         changed_examples=feeder.changed_examples,
                         videos_done=writer.videos_done, videos_failed=writer.videos_failed,
                         segments_written=writer.segments_written, video_seconds=writer.video_seconds_done,
                         videos_audio_undecodable=writer.videos_audio_undecodable,
                         wall_s=wall, model_id=bundle.model_id, stage_metrics=writer.meter.to_dict())

    @staticmethod
    def _fail_if_missing(ref: VideoRef, writer: ResultWriter) -> bool:
        """Record a local input that is not there as the decode stage would (the same failures row), and say so."""
        missing = missing_local_file(ref.uri)
        if missing is None:
            return False
        writer.add_failure(Failure(uri=ref.uri, video_id=ref.video_id, stage=DecodeStage.name,
                                   error_kind=missing.error_kind, message=missing.message))
        writer.maybe_flush()
        return True

    def _job_precision(self, out: OutputDir, bundle: ModelBundle) -> str:
        """The encoders' precision of this run: as given; for ``auto``, the job's own where it has committed
        rows (a resumed job goes on in its precision wherever it runs now), else what auto means here for
        ``bundle`` (fp32 for a bundle whose training found bf16 scoring it lower)."""
        spec = self.spec
        if spec.precision != "auto":
            return spec.precision
        recorded = (out.read_json("_job/job.json") or {}).get("precision")
        if recorded in ("bf16", "fp32") and out.commits():
            mine = job_precision("auto", spec.device, spec.address, bundle) if runs_here(spec.address) else recorded
            if mine != recorded:
                why = ("the model's bf16 check, made when it was trained, asks for fp32" if bundle.fp32_reason()
                       else "this machine has no GPU and no CPU with native bf16: slower here" if recorded == "bf16"
                       else "bf16 would be faster here")
                self._say(f"vidpipe: --precision auto: resuming in the job's precision, {recorded} ({why}); a new "
                          f"--out starts a job in {mine}")
            return recorded
        reason = bundle.fp32_reason()
        if reason:
            self._say(f"vidpipe: --precision auto: {reason}")
        return job_precision(spec.precision, spec.device, spec.address, bundle)

    # -- waves -----------------------------------------------------------------------------------------
    def _run_waves(self, bundle: ModelBundle, feeder: WaveFeeder, writer: ResultWriter, status: RunStatus,
                   progress_file: ProgressFile) -> None:
        spec = self.spec
        retry: deque[list[VideoRef]] = deque()
        wave_size = spec.wave_size or 0
        progress = self._progress = Progress(None, self.stream, enabled=spec.progress)
        ray_started = False
        while True:
            stopping.check()
            if (error := self._input_error or feeder.input_error) is not None:
                # the count reads the inputs ahead of the waves; the waves meet the row first where the videos
                # before it fail at once (missing files)
                finished = writer.videos_done + writer.videos_failed
                said = (f"the {finished} videos this run finished are committed: fix it and rerun the same command "
                        "to resume" if finished else "no video had been run yet: fix it and rerun")
                where = ("while counting the inputs, ahead of the videos being run" if error is self._input_error
                         else "as the run reached it")
                raise ConfigError(f"{error} (found {where}; {said})")
            if retry:
                group, fresh = retry.popleft(), False
                status.retry_groups += 1
            else:
                group, fresh = feeder.next_wave(wave_size or 16), True
                self._sync(status, writer, feeder)
                if feeder.input_error is not None:
                    continue  # said at the loop's start: the videos read before the row do not run
                if not group:
                    break
            first = not ray_started
            if first:
                init_ray(spec.address)
                _quiet_ray_data()
                ray_started = True
            nodes = cluster_nodes()  # per wave: nodes come and go
            if first and not runs_here(spec.address):  # '--address auto' joined whatever cluster runs here: say which
                import ray

                self._say(f"vidpipe: joined the Ray cluster at {ray.get_runtime_context().gcs_address} "
                          f"({len(nodes)} nodes, {sum(n[0] for n in nodes):g} CPUs, {sum(n[1] for n in nodes):g} "
                          "GPUs)")
            if spec.device == "cuda" and not any(n[1] >= 1 for n in nodes):  # else it ran on the CPUs, unsaid
                raise ConfigError(f"--device cuda: the Ray cluster has no GPU ({len(nodes)} nodes, "
                                  f"{sum(n[0] for n in nodes):g} CPUs, 0 GPUs); use --device auto (the GPU where "
                                  "there is one) or --device cpu")
            if not wave_size:
                # enough videos for a decoder per core (jobs/plan.py) on every core count
                wave_size = max(16, 8 * plan_for_cluster(nodes, device=spec.device).decode.pool_size,
                                VIDEOS_PER_CORE_FOR_ONE_THREAD * int(sum(n[0] for n in nodes)))
                if fresh and len(group) < wave_size and not feeder.exhausted:
                    group += feeder.next_wave(wave_size - len(group))
                if fresh and not feeder.at_end():
                    # a job of up to three first waves runs as one: a second wave would cost more in its
                    # actor pools' start than the early first commit is worth (48 clips of 15 s on 2 cores:
                    # 18.0-18.5 s in one wave, 21.7-22.8 s in two)
                    more = feeder.next_wave(2 * wave_size)
                    if feeder.at_end():
                        group += more
                    else:
                        feeder.unread(more)
            plan = plan_for_cluster(nodes, device=spec.device, videos=len(group))  # decoders split cores by it
            if self.plan is None or len(group) >= self._plan_videos:
                self.plan, self._plan_videos = plan, len(group)
            status.wave_size = max(wave_size, len(group))
            progress.total, progress.skipped = status.inputs_total, feeder.skipped
            t0 = time.monotonic()
            lost, node_lost = self._run_group(bundle, plan, nodes, group, writer, status, feeder, progress)
            status.waves += 1
            self._say_emulated(writer)
            elapsed = time.monotonic() - t0
            if fresh and spec.wave_size is None and len(group) >= wave_size and elapsed < TARGET_WAVE_S:
                # grow toward TARGET_WAVE_S per wave (at most 8x at a time: early waves are mostly start-up)
                wave_size = min(MAX_WAVE, int(wave_size * min(8.0, TARGET_WAVE_S / max(elapsed, 1.0))))
            if node_lost:  # not the videos' doing: no attempt counted, no halves; the next wave plans anew
                if lost:
                    retry.appendleft(lost)
            else:
                self._requeue(group, lost, writer, retry)
            self._sync(status, writer, feeder)
            progress_file.write()
        progress.total, progress.skipped = status.inputs_total or feeder.discovered, feeder.skipped
        progress.finish(writer)

    def _say_emulated(self, writer: ResultWriter) -> None:
        """Say once when workers ran bf16 encoders emulated, on a CPU without native bf16: a node that joined a bf16
        job after its start, or ``--precision bf16`` on such a cluster.  The job stays in its precision (its rows
        must agree), so the way out is a cluster without such nodes, or a new OUT in fp32."""
        n = writer.meter.bf16_emulated_chunks
        if not n or self._said_emulated:
            return
        self._said_emulated = True
        self._say(f"WARNING: {n} chunk{'s' if n != 1 else ''} of this run {'were' if n != 1 else 'was'} encoded in "
                  "bf16 on a node whose CPU has no native bf16 (AVX512-BF16 or AMX; or oneDNN capped below it by "
                  "ONEDNN_MAX_CPU_ISA): emulated there, several times slower than fp32. The job goes on in bf16, "
                  "its precision; run it on nodes with native bf16 (or GPUs), or start a new --out with "
                  "--precision fp32")

    def _run_group(self, bundle: ModelBundle, plan: PipelinePlan, nodes: list[Node],
                   group: list[VideoRef], writer: ResultWriter, status: RunStatus, feeder: WaveFeeder,
                   progress: Progress) -> tuple[list[VideoRef], bool]:
        """Run ``group`` through one Ray Data execution on ``nodes`` (the cluster when it was planned); return
        the videos that did not come back, and whether the wave was ended for a node lost (_WaveWatch)."""
        writer.begin_wave()
        finished_before = writer.videos_done + writer.videos_failed
        ds = self._dataset(bundle, plan, group)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        watch = _WaveWatch(ds, nodes, float(os.environ.get("VIDPIPE_STALL_S", STALL_S)))  # tests shorten it
        try:
            self._take_batches(batches, watch, group, writer, status, feeder, progress, finished_before)
        finally:
            watch.stop()
        del batches
        writer.discard_incomplete()
        status.in_flight = 0
        lost = [r for r in group if not writer.is_closed(r.video_id)]
        if watch.ended is not None and lost:  # (ended as the last batch came: nothing to say)
            self._say(f"vidpipe: {watch.ended}: its {count_of(len(lost), 'unfinished video')} run again, planned "
                      "for the nodes left")
        return lost, watch.ended is not None

    def _take_batches(self, batches: Iterator[Any], watch: _WaveWatch, group: list[VideoRef], writer: ResultWriter,
                      status: RunStatus, feeder: WaveFeeder, progress: Progress, finished_before: int) -> None:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:
                if not _infrastructure_error(exc):
                    raise
                # broad on purpose, then narrowed: whatever the cluster lost, the unfinished videos run again
                log.warning("a wave's execution failed (%s: %s); re-running its unfinished videos",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                break
            watch.batch()
            for row in iter_rows(batch):
                writer.add_row(row)
            stopping.check()  # a stop noted in a commit that then ended with an error, handled since
            status.in_flight = len(group) - (writer.videos_done + writer.videos_failed - finished_before)
            self._sync(status, writer, feeder)
            progress.total, progress.skipped = status.inputs_total, feeder.skipped
            progress.update(writer)

    def _requeue(self, group: list[VideoRef], lost: list[VideoRef], writer: ResultWriter,
                 retry: deque[list[VideoRef]]) -> None:
        """Bisect the videos a wave lost until one that keeps killing workers is alone, then record it."""
        if not lost:
            return
        for ref in lost:
            writer.attempts[ref.video_id] = writer.attempts.get(ref.video_id, 0) + 1
        if len(group) == 1:
            ref = lost[0]
            attempts = writer.attempts[ref.video_id]
            if attempts >= self.spec.max_attempts:
                self._say(f"vidpipe: {ref.uri} took down its worker in {attempts} runs (the last alone); "
                          "recorded as worker_crashed")
                writer.add_failure(Failure(
                    uri=ref.uri, video_id=ref.video_id, stage="worker", error_kind="worker_crashed",
                    message=f"the worker processing this video died in {attempts} runs, the last with this video "
                            "alone: a crash of the worker process itself (decoders run in processes of their own), "
                            "an out-of-memory kill or its node lost; see the Ray worker logs",
                    attempts=attempts))
                writer.maybe_flush()
            else:
                retry.appendleft([ref])
            return
        if len(lost) == 1:
            retry.appendleft(lost)
            return
        half = (len(lost) + 1) // 2
        log.warning("%d videos of a group of %d did not come back; re-running them in halves", len(lost), len(group))
        retry.appendleft(lost[half:])
        retry.appendleft(lost[:half])

    # -- Ray Data --------------------------------------------------------------------------------------
    def _dataset(self, bundle: ModelBundle, plan: PipelinePlan, group: list[VideoRef]) -> Any:
        import ray.data

        from workers.ray_adapter import add_stage

        spec = self.spec
        chunking = chunking_for(bundle, spec.chunk_seconds)
        stages = build_stages(bundle, bundle.sampling, chunking, plan, top_k=spec.top_k,
                              with_embedding=spec.with_embedding, decode_device=spec.decode_device,
                              precision=self.precision, video_timeout_s=spec.video_timeout_s,
                              crash_attempts=spec.max_attempts)
        # A few videos per input block amortise Ray's per-task cost (videos that fail at once, e.g.
        # missing files, cost milliseconds); small waves keep one video per block for isolation.
        per_block = max(1, min(_MAX_ROWS_PER_BLOCK, len(group) // (4 * plan.decode.pool_size)))
        ds: ray.data.Dataset = ray.data.from_items([{"uri": r.uri, "video_id": r.video_id} for r in group],
                                                   override_num_blocks=-(-len(group) // per_block))
        for stage, stage_plan in stages:
            ds = add_stage(ds, stage, stage_plan)
        ds.context.max_errored_blocks = -1  # a block whose task died twice is dropped; its videos run again
        # Each chunk a stage yields leaves as its own block: Ray Data's default (128 MiB) would gather a
        # whole video's chunks before the next stage saw the first, so decode and models never overlapped.
        ds.context.target_max_block_size = _TARGET_BLOCK_BYTES
        return ds

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _count_inputs(self, status: RunStatus, done: IdSet) -> None:
        def count() -> None:
            try:
                status.inputs_total, status.inputs_finished = count_videos(self.spec.inputs, done)
            except ManifestRowError as exc:  # hours of waves ahead of the run: stop at the next wave's start
                self._input_error = exc
            except Exception as exc:  # noqa: BLE001 - only the progress display loses its total
                log.warning("could not count the inputs: %s", exc)

        threading.Thread(target=count, name="vidpipe-count-inputs", daemon=True).start()

    @staticmethod
    def _sync(status: RunStatus, writer: ResultWriter, feeder: WaveFeeder) -> None:
        status.discovered = feeder.discovered
        status.skipped = feeder.skipped
        status.done = writer.videos_done
        status.failed = writer.videos_failed
        status.video_seconds = writer.video_seconds_done
        status.note_results()
        if feeder.exhausted and status.inputs_total is None:
            status.inputs_total = feeder.discovered

    @staticmethod
    def _flush_what_is_complete(writer: ResultWriter) -> None:
        # Stopping (Ctrl-C, SIGTERM, an error): keep the videos that are complete; a rerun does the rest.
        try:
            writer.flush()
        except Exception as exc:  # noqa: BLE001 - the original error matters more; a rerun redoes these
            log.warning("could not commit the finished videos while stopping: %s", exc)

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.break_line()
        self.stream.write(f"{text}\n")  # one write: a stop between text and newline glued the next line on
        self.stream.flush()
