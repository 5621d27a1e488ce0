"""``vidpipe status``: how far a job is: videos done / failed / pending, video-seconds, rate and ETA.

Done and failed come from the committed tables (the truth); the total, the rate and whether a run
is alive come from ``OUT/_job/progress.json``, which the running driver rewrites every few seconds.
With ``--job`` the Ray job's own state is shown as well.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from jobs.output import wrong_progress_field
from pipeline.errors import ConfigError

_ALIVE_S = 30.0  # a running driver rewrites progress.json every 5 s


@dataclass
class JobStatus:
    out: str
    done: int
    failed: int
    video_seconds: float
    total: int | None
    pending: int | None
    run_state: str | None  # running / finished / failed / interrupted, or dead (a run that stopped writing)
    run_id: str | None
    updated_at: str | None
    videos_per_s: float | None
    video_seconds_per_s: float | None
    eta_s: float | None
    ray_job: dict[str, Any] | None = None
    message: str = ""  # why the last run failed or stopped, as it recorded it
    rate_since_first_result: bool = False  # the rates leave out the run's start (Ray, models, first latency)
    finished_uncommitted: int = 0  # of the pending, videos the live run has finished and will commit
    failed_retried: int = 0  # of the failed, videos whose every failure was transient: a rerun tries them again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(out_uri: str) -> JobStatus:
    """Status of the job whose output is ``out_uri`` (local or ``s3://``)."""
    from jobs.query import open_output, run_query

    out = open_output(out_uri)
    # one query, with run_query's retry (a running job moves files into place) and its damaged-file message; it
    # checks the footers of every table, segments too, as 'run' does at its start
    from pipeline.inputs import TRANSIENT_ERROR_KINDS

    transient = ", ".join(f"'{k}'" for k in sorted(TRANSIENT_ERROR_KINDS))
    counts = run_query(out_uri, "SELECT (SELECT count(DISTINCT video_id) FROM videos) AS done, "
                                "(SELECT coalesce(sum(duration_s), 0) FROM videos) AS seconds, "
                                "(SELECT count(*) FROM failures) AS failed, "  # failed now
                                # of those, the ones a rerun tries again (every failure transient: finished_uris)
                                "(SELECT count(*) FROM (SELECT uri FROM failures_log WHERE uri NOT IN "
                                "(SELECT uri FROM videos) GROUP BY uri HAVING bool_and(error_kind IN "
                                f"({transient})))) AS retried", check_all=True).to_pylist()[0]
    done, seconds, failed = counts["done"], counts["seconds"], counts["failed"]
    why: str | None = None  # why progress.json is damaged
    try:  # only the run's heartbeat and rates: the counts above come from the tables
        progress = out.read_json("_job/progress.json") or {}
    except ConfigError:  # it said "no run recorded", as if no run had been
        progress, why = {}, ""
    if (wrong := wrong_progress_field(progress)) is not None:  # a traceback (a helper): said as damaged
        progress, why = {}, f" ({wrong})"
    damaged = "" if why is None else (
        f"{out.store.uri_of('_job/progress.json')}, the last run's record, is damaged{why}: its state is unknown "
        "(the counts come from the tables); the next 'vidpipe run' into this OUT rewrites it")
    state = progress.get("state")
    heartbeat = float(progress.get("heartbeat") or 0)
    alive = state == "running" and time.time() - heartbeat < _ALIVE_S and not _gone(progress)
    if state == "running" and not alive:
        state = "dead"  # killed without a word: rerun the same command to resume
    total = progress.get("inputs_total")
    pending = left = None
    if total is not None:
        # the run's own commits (their names start with its id): progress.json lags them by up to a heartbeat
        run_id = progress.get("run_id")
        committed = sum(c.n_videos + c.n_failures for c in out.commits() if run_id and c.name.startswith(f"{run_id}-"))
        pending = _pending(progress, int(total), int(done) + int(failed), committed)
        left = _left_to_run(progress, int(total)) if alive else None
    # a live run's rate from its first result on, once there is a second one: the start (Ray, models, the
    # first videos' latency) made the average, and so an early ETA, several times too slow; a run that has
    # ended shows its average, start included
    steady = alive and bool(progress.get("steady_videos_per_s"))
    per_s = (progress.get("steady_videos_per_s") if steady else progress.get("videos_per_s")) or None
    per_video_s = progress.get("steady_video_seconds_per_s" if steady else "video_seconds_per_s") or None
    # a live run's ETA: the videos it has not finished, committed or not (a run of short clips finishes
    # many between its commits, 60 s apart, and the committed count made the ETA several times too long)
    to_go = left if left is not None and pending is not None and left < pending else pending
    eta = to_go / per_s if alive and per_s and to_go is not None else None
    uncommitted = pending - to_go if pending is not None and to_go is not None else 0
    return JobStatus(out=out.uri, done=int(done), failed=int(failed), failed_retried=int(counts["retried"]),
                     video_seconds=float(seconds),
                     total=None if total is None else int(total), pending=pending, run_state=state,
                     run_id=progress.get("run_id"), updated_at=progress.get("updated_at"),
                     videos_per_s=per_s, video_seconds_per_s=per_video_s,
                     eta_s=eta, message=str(progress.get("message") or damaged), rate_since_first_result=steady,
                     finished_uncommitted=uncommitted)


def _pending(progress: dict[str, Any], total: int, finished_in_out: int, committed_by_run: int = 0) -> int:
    """Of the last run's ``total`` input videos, how many no run has finished.

    Two lower bounds: the tables' count (OUT may also hold videos that other inputs named), and the
    run's own: its inputs finished before it (counted with the total, or, once it has read them all, the
    ones it skipped) and the ones it finished (those not committed when it was killed, or dropped by
    'vidpipe repair' since, still count there; where its progress.json, written before its last commits,
    counts fewer than its commit records, ``committed_by_run``, those).  The larger is the closer.  Before
    the run has counted or read all its inputs its own count is no bound (the unread ones may be finished
    already).
    """
    pending = total - finished_in_out
    before = _finished_before(progress, total)
    if before is not None:
        by_run = max(committed_by_run, _finished_by_run(progress))
        pending = max(pending, total - before - by_run)
    return max(pending, 0)


def _finished_before(progress: dict[str, Any], total: int) -> int | None:
    """Of the run's ``total`` inputs, how many earlier runs had finished; None before the run knows."""
    before = progress.get("inputs_finished")
    if before is None and int(progress.get("discovered") or 0) >= total:
        before = progress.get("skipped")
    return None if before is None else int(before)


def _finished_by_run(progress: dict[str, Any]) -> int:
    return sum(int(progress.get(k) or 0) for k in ("done", "failed"))


def _left_to_run(progress: dict[str, Any], total: int) -> int | None:
    """Of its ``total`` inputs, how many the (live) run has not finished by its own count; None before it knows."""
    before = _finished_before(progress, total)
    return None if before is None else max(total - before - _finished_by_run(progress), 0)


def _gone(progress: dict[str, Any]) -> bool:
    """Whether the run's driver is known to have ended: a SIGKILL leaves progress.json saying "running".

    Only a process seen from the same pid namespace on the same host can be looked up (a container with
    the host's name has pids of its own), and only as the same process (its start time: pids are
    reused); otherwise the heartbeat has to age.
    """
    from jobs.progress import pid_ended, recorded_here

    # the driver, or the 'vidpipe run' process it runs under (its end kills the driver)
    return recorded_here(progress) and any(pid_ended(progress.get(p), progress.get(s)) for p, s in
                                           (("pid", "pid_started"), ("supervisor_pid", "supervisor_started")))


def ray_job_info(address: str, job_id: str) -> dict[str, Any]:
    """The Ray job's state, message and the OUT it was submitted with."""
    from jobs.submit import _client, job_exit_code, job_info

    info = job_info(_client(address), address, job_id)
    status = str(getattr(info.status, "value", info.status))
    d: dict[str, Any] = {"job_id": job_id, "status": status, "message": info.message or "",
                         "out": (info.metadata or {}).get("vidpipe_out")}
    if status in ("SUCCEEDED", "FAILED", "STOPPED"):
        d["exit_status"] = job_exit_code(status, info.message or "")
    return d


def format_job_line(j: dict[str, Any]) -> str:
    """The Ray job's line of ``status --job``: its state, and the job server's message."""
    extra = " (some inputs failed; see the failures table)" if j.get("exit_status") == 3 else ""
    return f"ray job {j['job_id']}: {j['status']}{extra}" + (f" — {j['message']}" if j["message"] and not extra
                                                              else "")


def format_status(s: JobStatus) -> str:
    lines = []
    if s.ray_job:
        lines.append(format_job_line(s.ray_job))
    lines.append(f"output {s.out}")
    retried = (f" ({s.failed_retried:,} of them only with read errors, which a rerun tries again)"
               if s.failed_retried else "")
    soon = f" ({s.finished_uncommitted:,} of them finished, to be committed)" if s.finished_uncommitted else ""
    if s.total is None or s.pending is None:  # "? pending of the last run's ? input videos" (a helper)
        of_run = "; the last run's inputs are not counted yet" if s.run_state == "running" else (
            "; the last run's input count is not recorded")
    else:
        of_run = f"; {s.pending:,} pending{soon} of the last run's {s.total:,} input videos"
    lines.append(f"videos: {s.done:,} done, {s.failed:,} failed{retried}{of_run}")
    lines.append(f"video-seconds done: {s.video_seconds:,.1f}")
    run = s.run_state or s.message or "no run recorded"
    if s.run_state == "dead":
        run = ("stopped without recording why (killed, or its OUT out of reach as it ended); rerun the same "
               "command to resume")
    if s.run_state in ("failed", "interrupted") and s.message:
        run = f"{run}: {s.message}"
    lines.append(f"last run {s.run_id or '-'}: {run}" + (f", updated {s.updated_at}" if s.updated_at else ""))
    if s.video_seconds_per_s is not None:
        which = "rate" if s.run_state == "running" else "rate of the last run"
        since = " (since its first video finished)" if s.rate_since_first_result else ""
        # videos/s counts the failed too (they took their turn: the ETA is of all inputs); video-s/s only the labelled
        lines.append(f"{which}: {s.video_seconds_per_s:,.2f} video-s/s, {s.videos_per_s or 0:,.3f} videos/s done or "
                     f"failed{since}")
    elif s.run_state == "running":  # 0.00 video-s/s read as a stalled run
        lines.append("rate: not known yet (no video finished)")
    if s.eta_s is not None:
        lines.append(f"ETA: {_duration(s.eta_s)}")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"
