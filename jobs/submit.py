"""``vidpipe submit``: run ``vidpipe run ...`` as a job on a Ray cluster through the Ray Jobs API.

The cluster runs the same command a user would type on its head node: its driver streams the
inputs, the workers of every node decode and encode, and the driver alone writes OUT (so OUT must
be a place the head node can write: a shared folder or ``s3://``).  Nothing is uploaded or
downloaded for the job (no ``working_dir``, no ``pip``): vidpipe must be installed on the cluster's
nodes.  Only non-secret AWS settings (endpoint, region, profile name) are passed along; credentials
come from the cluster's own environment.  A cluster with token authentication needs the token
here too (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.spec import EXIT_INTERRUPTED
from pipeline.errors import ConfigError

# Settings forwarded to the job (never AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class SubmitOptions:
    address: str
    job_id: str | None = None
    wait: bool = False
    command: str = "vidpipe"


def submit_parser() -> argparse.ArgumentParser:
    """The options of ``submit`` itself; every other argument belongs to ``vidpipe run``."""
    p = argparse.ArgumentParser(prog="vidpipe submit", add_help=False)
    p.add_argument("--address", required=True, metavar="URL",
                   help="the cluster's dashboard / job server, e.g. http://HEAD:8265")
    p.add_argument("--job-id", metavar="ID", help="submission id (default: Ray picks one)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its status")
    p.add_argument("--command", default="vidpipe", metavar="CMD",
                   help="how the head node runs vidpipe (default 'vidpipe'; e.g. '/opt/venv/bin/vidpipe')")
    return p


def split_args(argv: list[str]) -> tuple[SubmitOptions, list[str]]:
    """Separate ``submit``'s own options from the ``run`` arguments (which may come in any order)."""
    ns, rest = submit_parser().parse_known_args(argv)
    return SubmitOptions(address=ns.address, job_id=ns.job_id, wait=ns.wait, command=ns.command), rest


def entrypoint(run_argv: list[str], parse_run: Callable[[list[str]], argparse.Namespace], command: str) -> str:
    """The shell command the cluster runs: ``vidpipe run`` with local paths made absolute.

    Args:
        parse_run: parses ``run`` arguments (the CLI's own parser), so bad flags fail here, not on the cluster.
    """
    args = parse_run(run_argv)
    if getattr(args, "address", None):
        raise ConfigError("give the cluster with 'vidpipe submit --address http://HEAD:8265'; the job's driver "
                          "joins that cluster by itself ('run --address' is not used with submit)")
    paths = {*args.inputs, args.out, *([args.model] if args.model else [])}
    tokens = [absolute(t) if t in paths else t for t in run_argv]
    return " ".join([*shlex.split(command), "run", *(shlex.quote(t) for t in tokens)])


def absolute(value: str) -> str:
    """A local path as the job's command names it (absolute, ``~`` expanded); a URI as it is."""
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.abspath(os.path.expanduser(value))  # keeps glob characters as they are


def check_server_address(address: str) -> None:
    """The job server's address is its URL: Ray took HOST:PORT for a GCS and waited 40 s on it (a traceback)."""
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: the job server is given by its URL, http://HEAD:8265 (the "
                          "dashboard's port, 8265 by default); HOST:PORT is the GCS address that 'vidpipe run "
                          "--address' takes")


def _client(address: str) -> Any:
    check_server_address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # ray without its dashboard extras
        raise ConfigError(f"the Ray Jobs client is not installed ({exc}); pip install 'vidpipe[cluster]'") from None
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray job server at {address}: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ != "AuthenticationError":  # ray.exceptions.AuthenticationError (Ray >= 2.50)
            raise
        if str(exc).startswith("Authentication failed"):  # HTTP 403: a token, not the cluster's
            what = "refused this machine's authentication token: put the cluster's token"
        else:  # HTTP 401: none sent
            what = "wants an authentication token: set RAY_AUTH_MODE=token here, with the cluster's token"
        raise ConfigError(f"the Ray job server at {address} {what} in RAY_AUTH_TOKEN or in ~/.ray/auth_token "
                          "('ray start' wrote it there on the head node)") from None


def _refused(said: str, options: SubmitOptions) -> str:
    """What to do about a job the job server refused (``said``: its answer, often a whole traceback)."""
    reason = next((line.strip() for line in reversed(said.splitlines()) if re.search(r"[^\W\d_]", line)), said)
    if "already exists" in said and options.job_id:
        return (f"--job-id {options.job_id}: the Ray job server at {options.address} already has a job of that id "
                "(a job id names one submission, finished or not; 'ray job list' shows them): give another "
                "--job-id, or leave it out for a new one (a rerun with the same OUT resumes its job)")
    return (f"the Ray job server at {options.address} refused the job: {reason[:300].rstrip('.')}; check the cluster "
            "('ray status' on its head node; the dashboard agent may not have started) and submit again")


def submit(options: SubmitOptions, entry: str, *, out: str, say: Callable[[str], None] = print) -> tuple[str, int]:
    """Submit the job; with ``wait``, follow it to the end.  Returns (job id, exit status)."""
    client = _client(options.address)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    try:
        job_id = client.submit_job(entrypoint=entry, submission_id=options.job_id,
                                   runtime_env={"env_vars": env} if env else None,
                                   metadata={"vidpipe_out": out})
    except RuntimeError as exc:  # the job server's answer: "Request failed with status code 500: ..."
        raise ConfigError(_refused(str(exc), options)) from None
    say(job_id)
    if not options.wait:
        return job_id, 0
    last = None
    try:
        while True:
            info = job_info(client, options.address, job_id)
            status = str(getattr(info.status, "value", info.status))
            if status != last:
                say(f"job {job_id}: {status}")
                last = status
            if status in _TERMINAL:
                break
            time.sleep(2.0)
    except KeyboardInterrupt as exc:
        # only the waiting stops: the job is the cluster's (SIGTERM ended this silently, exit -15; a helper)
        why = f" ({exc})" if str(exc) else ""
        say(f"vidpipe submit: stopped waiting{why}; job {job_id} goes on on the cluster. Follow it with: "
            f"vidpipe status {shlex.quote(out)} --job {job_id} --address {options.address}; stop it with: "
            f"ray job stop {job_id} --address {options.address}")
        return job_id, EXIT_INTERRUPTED
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001 - the status is known; the log tail is a courtesy
        logs = ""
    tail = "\n".join(logs.rstrip().splitlines()[-20:])
    if tail:
        say(tail)
    code = job_exit_code(status, info.message or "")
    if code == 127:  # the shell's "command not found" (dash: "vidpipe: not found"; bash: "No such file or directory")
        say(f"vidpipe submit: the job's command ({command_of(entry)}) was not found on the head node: install "
            "vidpipe there, or give its path there with --command")
    return job_id, code


def command_of(entry: str) -> str:
    """The program an entrypoint runs (its first word, as the shell reads it)."""
    words = shlex.split(entry)
    return words[0] if words else entry


def job_info(client: Any, address: str, job_id: str) -> Any:
    """The job server's record of ``job_id``; a ConfigError that says what to do when it cannot be had."""
    try:
        return client.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001 - requests' and Ray's errors alike: the server cannot answer
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "404" in text:
            raise ConfigError(f"the job server at {address} has no job {job_id!r}; check the id "
                              "(vidpipe submit printed it; 'ray job list' lists them)") from None
        raise ConfigError(f"lost contact with the job server at {address} ({text}); the job may still be "
                          f"running: vidpipe status --job {job_id} --address {address}") from None


def job_exit_code(status: str, message: str) -> int:
    """The ``vidpipe run`` exit status behind a finished Ray job, as the command would have given it.

    Ray reports a failed entrypoint as "... failed with exit code N ..."; a stopped job (``ray job
    stop``: SIGTERM, which the run takes like Ctrl-C) is 130; anything else unexplained is 1.
    """
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_INTERRUPTED
    found = re.search(r"exit code (\d+)", message)
    return int(found.group(1)) if found and int(found.group(1)) != 0 else 1
