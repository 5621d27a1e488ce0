"""A multi-node Ray cluster of real processes on 127.0.0.1: ``vidpipe submit`` through the Jobs API,
and a worker node SIGKILLed mid-job."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.jobs.clusters import LocalCluster, cluster_env
from tests.jobs.conftest import RUN_FLAGS, VIDPIPE, duplicate_keys, segment_rows, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    """A head with the dashboard and job server, and two one-CPU worker nodes, all on this machine."""
    # a short root: Ray's unix sockets live under it, and their paths may not exceed 107 bytes
    root = Path(tempfile.mkdtemp(prefix="vpc-", dir="/tmp"))
    c = LocalCluster(root, head_cpus=1, dashboard=True)
    try:
        c.start()
        c.add_node(1)
        c.add_node(1)
        c.wait_for_cpus(3)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _vidpipe(cluster: LocalCluster, args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(VIDPIPE), *args], capture_output=True, text=True, env=cluster.env, timeout=timeout)


def _same_results(rows: list[dict], baseline: list[dict]) -> None:
    # another cluster size sizes the actors' thread pools differently: labels must match, scores to float noise
    assert [(r["video_id"], r["segment_index"], r["label"], r["topk_labels"]) for r in rows] == \
        [(r["video_id"], r["segment_index"], r["label"], r["topk_labels"]) for r in baseline]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in baseline], rel=1e-4, abs=1e-5)


def test_submit_through_the_jobs_api_and_status(cluster, small_archive, baseline, tmp_path):
    out = tmp_path / "out"
    r = _vidpipe(cluster, ["submit", str(small_archive), "--out", str(out), *RUN_FLAGS,
                           "--address", cluster.dashboard_url, "--wait"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id and "SUCCEEDED" in r.stdout
    _same_results(segment_rows(out), baseline)
    st = _vidpipe(cluster, ["status", "--job", job_id, "--address", cluster.dashboard_url, "--json"])
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["ray_job"]["status"] == "SUCCEEDED" and status["out"] == str(out)
    assert (status["done"], status["failed"], status["pending"], status["run_state"]) == (20, 0, 0, "finished")
    # the job's state beside another OUT's progress was printed as one job's, unsaid (a helper)
    other = tmp_path / "other"
    other_run = _vidpipe(cluster, ["run", str(small_archive / "a" / "clip001.mp4"), "--out", str(other), *RUN_FLAGS])
    assert other_run.returncode == 0, other_run.stderr[-3000:]
    st = _vidpipe(cluster, ["status", str(other), "--job", job_id, "--address", cluster.dashboard_url])
    assert st.returncode == 0 and st.stderr == (
        f"vidpipe: warning: ray job {job_id} writes to {out}, not {other}: the lines below are its state and the "
        f"progress of {other}; leave OUT out to see the job's own\n"), st.stderr
    st = _vidpipe(cluster, ["status", str(out), "--job", job_id, "--address", cluster.dashboard_url])
    assert st.returncode == 0 and st.stderr == "", st.stderr
    # SIGTERM to 'submit --wait' (a scheduler ending the client): it ended silently, exit -15 (a helper); it stops
    # the waiting only, says so and how to follow the job, which goes on
    waited = tmp_path / "waited"
    proc = subprocess.Popen([str(VIDPIPE), "submit", str(small_archive / "a"), "--out", str(waited), *RUN_FLAGS,
                             "--address", cluster.dashboard_url, "--wait"], env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    for row in proc.stdout:  # type: ignore[union-attr]
        lines.append(row)
        if row.endswith(": RUNNING\n") or row.endswith(": PENDING\n"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest + stderr
    waited_id = lines[0].strip()
    assert (f"vidpipe submit: stopped waiting (stopped by SIGTERM); job {waited_id} goes on on the cluster. Follow it "
            f"with: vidpipe status {waited} --job {waited_id} --address {cluster.dashboard_url}; stop it with: ray job "
            f"stop {waited_id} --address {cluster.dashboard_url}") in rest, "".join(lines) + rest + stderr
    wait_for(lambda: "SUCCEEDED" in _vidpipe(cluster, ["status", "--job", waited_id, "--address",
                                                       cluster.dashboard_url]).stdout, 300, "the job's end")
    assert len({r["video_id"] for r in segment_rows(waited)}) == 10
    # the same job id again (a job stopped and resubmitted by its name): the server's 500 and traceback were raw
    again = _vidpipe(cluster, ["submit", str(small_archive), "--out", str(out), *RUN_FLAGS,
                               "--address", cluster.dashboard_url, "--job-id", job_id])
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.splitlines()[-1] == (
        f"vidpipe submit: error: --job-id {job_id}: the Ray job server at {cluster.dashboard_url} already has a job "
        "of that id (a job id names one submission, finished or not; 'ray job list' shows them): give another "
        "--job-id, or leave it out for a new one (a rerun with the same OUT resumes its job)")
    # vidpipe not where the head's shell looks: it said only "/bin/sh: 1: vidpipe: not found" (exit 127)
    missing = _vidpipe(cluster, ["submit", str(small_archive), "--out", str(tmp_path / "o2"), *RUN_FLAGS,
                                 "--address", cluster.dashboard_url, "--wait", "--command", "/no/such/vidpipe"])
    assert missing.returncode == 127, missing.stdout[-3000:] + missing.stderr[-3000:]
    assert ("vidpipe submit: the job's command (/no/such/vidpipe) was not found on the head node: install vidpipe "
            "there, or give its path there with --command") in missing.stdout, missing.stdout[-3000:]
    # its OUT was never made: 'status --job' said only "o2 does not exist" (exit 2), the job's FAILED unsaid (a helper)
    failed_id = missing.stdout.splitlines()[0].strip()
    st = _vidpipe(cluster, ["status", "--job", failed_id, "--address", cluster.dashboard_url])
    assert st.returncode == 0, st.stderr[-3000:]
    assert st.stdout.startswith(f"ray job {failed_id}: FAILED"), st.stdout
    assert f"output {tmp_path / 'o2'}: {tmp_path / 'o2'} does not exist" in st.stdout, st.stdout


def test_the_embedded_default_starts_a_ray_of_its_own_beside_a_cluster_started_on_this_machine(cluster, shared_media,
                                                                                               tmp_path):
    """'ray start' writes its address where ray.init() looks first (TMP/ray/ray_current_cluster): a plain
    'vidpipe run' there joined that cluster and failed on its own num_cpus, a ValueError traceback (a helper)."""
    tmp = Path(tempfile.mkdtemp(prefix="vpt-", dir="/tmp"))  # short: the embedded Ray's sockets live under it
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text(cluster.address)
        out = tmp_path / "out"
        r = subprocess.run([str(VIDPIPE), "run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(out), *RUN_FLAGS],
                           capture_output=True, text=True, env=cluster_env(RAY_TMPDIR=str(tmp)), timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "joined the Ray cluster" not in r.stderr and "done: 1 video ok" in r.stdout, r.stdout + r.stderr
        assert len(segment_rows(out)) == 6 and duplicate_keys(out) == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_worker_node_sigkilled_mid_job(cluster, small_archive, baseline, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([str(VIDPIPE), "run", str(small_archive), "--out", str(out), *RUN_FLAGS,
                             "--address", cluster.address, "--wave-size", "10", "--commit-seconds", "0.5"],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = out / "_job" / "commits"
    wait_for(lambda: (commits.is_dir() and any(commits.glob("*.json"))) or proc.poll() is not None, 300,
             "the first commit")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    cluster.kill_node(cluster.nodes[-1])  # its raylet, and every worker it ran
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert "vidpipe: joined the Ray cluster at " in stderr and "(3 nodes, 3 CPUs, 0 GPUs)" in stderr, stderr[-3000:]
    assert "done: 20 videos ok, 0 failed, 0 skipped" in stdout, stdout
    rows = segment_rows(out)
    assert duplicate_keys(out) == 0
    _same_results(rows, baseline)
    # --precision auto was decided once, by asking the cluster's nodes (all on this machine); it was the flag
    from pipeline.precision import cpu_has_native_bf16

    assert json.loads((out / "_job" / "job.json").read_text())["precision"] == ("bf16" if cpu_has_native_bf16()
                                                                                 else "fp32")


def test_a_wave_left_waiting_by_a_lost_node_is_ended_and_its_videos_planned_again(small_archive, baseline, tmp_path):
    """A 2-CPU head and a 1-CPU node, the node lost 2 s into decoding: Ray restarted its actors, which the 2 CPUs
    left could not place beside the head's, and their tasks waited for them; the run waited without end, the
    finished videos uncommitted (a helper, 4 tries of 4).  The wave is ended once nothing comes for the stall
    time after the loss (VIDPIPE_STALL_S), and its unfinished videos run again on the head alone."""
    import psutil

    root = Path(tempfile.mkdtemp(prefix="vpl-", dir="/tmp"))
    c = LocalCluster(root, head_cpus=2)
    try:
        c.start()
        node = c.add_node(1)
        c.wait_for_cpus(3)
        out = tmp_path / "out"
        proc = subprocess.Popen([str(VIDPIPE), "run", str(small_archive), "--out", str(out), *RUN_FLAGS,
                                 "--address", c.address, "--commit-seconds", "0.5"],
                                env={**c.env, "VIDPIPE_STALL_S": "10"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

        def decoding() -> bool:
            for raylet in c.raylets():
                for p in raylet.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "DecodeTask" in " ".join(p.cmdline()):
                            return True
            return proc.poll() is not None

        wait_for(decoding, 300, "a decode task")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(2)
        c.kill_node(node)
        try:
            stdout, stderr = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run still waited 400 s after its node was lost:\n{stderr[-3000:]}")
        assert proc.returncode == 0, stderr[-4000:]
        assert "done: 20 videos ok, 0 failed, 0 skipped" in stdout, stdout
        assert re.search(r"vidpipe: the cluster lost 1 of 3 CPUs during a wave, which then brought nothing for "
                         r"\d+ s \(its actors wait for room that is gone\): its \d+ unfinished videos? run "
                         r"again, planned for the nodes left", stderr), stderr[-3000:]
        assert duplicate_keys(out) == 0
        _same_results(segment_rows(out), baseline)
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_cluster_with_token_authentication_is_joined_with_its_token_and_refused_without(shared_media, tmp_path):
    """Ray 2.60 protects a cluster with a token where ~/.ray/auth_token exists when 'ray start' runs (any
    embedded run writes that file, 'vidpipe run' included), and a client must then say RAY_AUTH_MODE=token.
    Without it a run is a usage error that says so (it was an internal error, "failed to connect"), with a
    wrong token one that says the token may be refused (it said to set RAY_AUTH_MODE=token, already set);
    with the cluster's token the run joins and finishes."""
    home = tmp_path / "home"  # the token file is $HOME/.ray/auth_token: the test's own
    home.mkdir()
    env = cluster_env(HOME=str(home))
    del env["RAY_AUTH_MODE"]  # Ray's defaults
    subprocess.run([str(VIDPIPE.with_name("ray")), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)
    root = Path(tempfile.mkdtemp(prefix="vpt-", dir="/tmp"))
    c = LocalCluster(root, head_cpus=1, env=env)
    try:
        c.start()
        args = ["run", str(shared_media / "bbb_5s_51.mp4"), "--out", str(tmp_path / "o"), *RUN_FLAGS,
                "--address", c.address]
        refused = subprocess.run([str(VIDPIPE), *args], capture_output=True, text=True, env=env, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"cannot join the Ray cluster at {c.address}" in refused.stderr
        assert "set RAY_AUTH_MODE=token here" in refused.stderr
        wrong = subprocess.run([str(VIDPIPE), *args], capture_output=True, text=True, timeout=300,
                               env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef"})
        assert wrong.returncode == 2, wrong.stderr[-3000:]
        assert "the cluster may have refused this token" in wrong.stderr, wrong.stderr[-3000:]
        # said before OUT is made, as an unreachable address is (it left OUT with its _job/lock and empty tables,
        # which status then called "no run recorded": a helper)
        assert not (tmp_path / "o").exists()
        joined = subprocess.run([str(VIDPIPE), *args], capture_output=True, text=True,
                                env=env | {"RAY_AUTH_MODE": "token"}, timeout=300)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert "1 video ok," in joined.stdout
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_node_whose_onednn_has_no_bf16_makes_auto_fp32_and_bf16_on_it_is_said_to_be_emulated(shared_media,
                                                                                                 tmp_path):
    """A node capped below bf16 (ONEDNN_MAX_CPU_ISA=AVX2: oneDNN emulates bf16 there, 289 ms per image against 26 in
    fp32) said it had native bf16 from its CPU flags, so --precision auto chose bf16 for the job; and a job in bf16
    whose encoders ran on such a node (one that joined later, or --precision bf16) ran several times slower, unsaid."""
    root = Path(tempfile.mkdtemp(prefix="vpi-", dir="/tmp"))
    c = LocalCluster(root, head_cpus=0)  # every stage runs on the capped node
    try:
        c.start()
        c.add_node(1, env=cluster_env(ONEDNN_MAX_CPU_ISA="AVX2"))
        c.wait_for_cpus(1)
        clip = str(shared_media / "bbb_5s_51.mp4")
        auto = _vidpipe(c, ["run", clip, "--out", str(tmp_path / "auto"), *RUN_FLAGS, "--address", c.address])
        assert auto.returncode == 0, auto.stderr[-3000:]
        assert json.loads((tmp_path / "auto" / "_job" / "job.json").read_text())["precision"] == "fp32"
        assert "emulated" not in auto.stderr
        bf16 = _vidpipe(c, ["run", clip, "--out", str(tmp_path / "bf16"), *RUN_FLAGS, "--address", c.address,
                            "--precision", "bf16"])
        assert bf16.returncode == 0, bf16.stderr[-3000:]
        assert ("WARNING: 1 chunk of this run was encoded in bf16 on a node whose CPU has no native bf16 (AVX512-BF16 "
                "or AMX; or oneDNN capped below it by ONEDNN_MAX_CPU_ISA): emulated there") in bf16.stderr, \
            bf16.stderr[-3000:]
        assert "1 video ok," in bf16.stdout
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
