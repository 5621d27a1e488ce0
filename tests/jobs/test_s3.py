"""Videos read from S3 and results written to S3 (moto's server on loopback), then queried and resumed."""

from __future__ import annotations

import json
import re
import signal

import pytest

from jobs.output import MissingCommitted, OutputDir, ResultWriter
from jobs.query import run_query
from jobs.runner import JobRunner
from jobs.spec import JobSpec
from pipeline.errors import ConfigError
from tests.jobs.conftest import (
    RUN_FLAGS,
    duplicate_keys,
    make_archive,
    run_vidpipe,
    segment_rows,
    vidpipe_env,
)
from tests.jobs.test_output import LABELS, head_row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    client = boto3.client("s3")
    for bucket in ("vidpipe-in", "vidpipe-out"):
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="module")
def s3_archive(s3, tmp_path_factory):
    """Three small videos under s3://vidpipe-in/videos/, and a manifest beside them that adds a missing one."""
    local = make_archive(tmp_path_factory.mktemp("s3src"), 3, duration_s=2.0)
    for path in sorted(local.rglob("*.mp4")):
        s3.upload_file(str(path), "vidpipe-in", f"videos/{path.relative_to(local).as_posix()}")
    manifest = "a/clip001.mp4\ns3://vidpipe-in/videos/b/clip000.mp4\nnot/there.mp4\n"
    s3.put_object(Bucket="vidpipe-in", Key="lists/m.txt",
                  Body=manifest.replace("a/clip001.mp4", "../videos/a/clip001.mp4").encode())
    s3.put_object(Bucket="vidpipe-in", Key="videos/list.txt", Body=manifest.encode())
    return local


def _all_objects(s3, bucket: str) -> dict[str, bytes]:  # noqa: ANN001
    # (keys ending in "/" are the empty "folder" markers pyarrow leaves when it deletes a folder's last file)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_read_from_s3_write_to_s3_query_and_status(s3, s3_archive, s3_server, tmp_path, ray_session):
    out = "s3://vidpipe-out/run1"
    r = run_vidpipe(["run", "s3://vidpipe-in/videos/", "s3://vidpipe-in/videos/list.txt", "--out", out, *RUN_FLAGS],
                    env=vidpipe_env(**s3_server))
    assert r.returncode == 3, r.stderr[-3000:]  # one manifest entry does not exist
    assert "3 videos ok, 1 failed" in r.stdout
    failures = run_query(out, "SELECT uri, error_kind FROM failures").to_pylist()
    assert failures == [{"uri": "s3://vidpipe-in/videos/not/there.mp4", "error_kind": "not_found"}]
    videos = run_query(out, "SELECT uri, n_segments, size_bytes FROM videos ORDER BY uri").to_pylist()
    assert [v["uri"] for v in videos] == ["s3://vidpipe-in/videos/a/clip001.mp4",
                                          "s3://vidpipe-in/videos/b/clip000.mp4",
                                          "s3://vidpipe-in/videos/b/clip002.mp4"]
    assert all(v["size_bytes"] > 1000 for v in videos)
    # the same labels as the same files read from the local disk
    local_out = tmp_path / "local"
    JobRunner(JobSpec(inputs=[str(s3_archive)], out=str(local_out), allow_untrained=True, segment_seconds=1.0,
                      chunk_seconds=16, progress=False)).run()

    def by_name(o: str) -> list[tuple]:
        rows = run_query(o, "SELECT v.uri, s.segment_index, s.label, s.score FROM segments s JOIN videos v "
                            "USING (video_id) ORDER BY v.uri, s.segment_index").to_pylist()
        return [(x["uri"].rsplit("/", 2)[-2:], x["segment_index"], x["label"], x["score"]) for x in rows]

    assert by_name(out) == by_name(str(local_out))
    assert duplicate_keys(out) == 0
    # status over S3
    st = run_vidpipe(["status", out, "--json"], env=vidpipe_env(**s3_server))
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert (status["done"], status["failed"], status["total"], status["pending"]) == (3, 1, 4, 0)
    assert status["run_state"] == "finished"
    # nothing secret in anything written
    for key, body in _all_objects(s3, "vidpipe-out").items():
        assert s3_server["AWS_SECRET_ACCESS_KEY"].encode() not in body, key
        assert s3_server["AWS_ACCESS_KEY_ID"].encode() not in body, key
    # a manifest's relative entries are relative to its own prefix; files finished under another input
    # (the prefix above) are skipped: the done-set is by URI
    r2 = run_vidpipe(["run", "s3://vidpipe-in/lists/m.txt", "--out", out, *RUN_FLAGS], env=vidpipe_env(**s3_server))
    assert r2.returncode == 3 and "0 videos ok, 1 failed, 2 skipped" in r2.stdout, r2.stdout + r2.stderr[-2000:]
    assert run_query(out, "SELECT count(*) n FROM failures WHERE uri = 's3://vidpipe-in/lists/not/there.mp4'"
                     ).column("n")[0].as_py() == 1
    # an object replaced since it was labelled is named by the rerun (by the listing's size), not relabelled
    original = (s3_archive / "b" / "clip002.mp4").read_bytes()
    s3.put_object(Bucket="vidpipe-in", Key="videos/b/clip002.mp4", Body=original + b"\0" * 100)
    try:
        r3 = run_vidpipe(["run", "s3://vidpipe-in/videos/", "--out", out, *RUN_FLAGS], env=vidpipe_env(**s3_server))
        # and named on its own (its size is read as the input is checked)
        r4 = run_vidpipe(["run", "s3://vidpipe-in/videos/b/clip002.mp4", "--out", out, *RUN_FLAGS],
                         env=vidpipe_env(**s3_server))
    finally:
        s3.put_object(Bucket="vidpipe-in", Key="videos/b/clip002.mp4", Body=original)
    assert r3.returncode == 0 and "0 videos ok, 0 failed, 3 skipped" in r3.stdout, r3.stdout + r3.stderr[-2000:]
    assert r4.returncode == 0 and "0 videos ok, 0 failed, 1 skipped" in r4.stdout, r4.stdout + r4.stderr[-2000:]
    for r in (r3, r4):
        assert (f"WARNING: 1 finished video changed size since it was labelled (s3://vidpipe-in/videos/b/clip002.mp4 "
                f"(now {len(original) + 100:,} bytes))") in r.stderr, r.stderr[-2000:]


def test_driver_killed_between_commit_record_and_copies_on_s3(s3, s3_archive, s3_server):
    """On S3 a move is copy + delete; the commit record alone decides what is visible."""
    out = "s3://vidpipe-out/run2"
    args = ["run", "s3://vidpipe-in/videos/", "--out", out, *RUN_FLAGS, "--commit-seconds", "0.01"]
    r = run_vidpipe(args, env=vidpipe_env(VIDPIPE_TEST_CRASH_AT="recorded:1", **s3_server))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    staged = [k for k in _all_objects(s3, "vidpipe-out") if k.startswith("run2/_job/staging/")]
    assert staged  # committed, not yet copied into place
    partial = segment_rows(out)  # read from staging, exactly the committed videos
    assert partial and duplicate_keys(out) == 0
    # the killed run's lease (progress.json, renewed every 5 s) is waited out: 2 s here instead of 30
    r = run_vidpipe(args, env=vidpipe_env(VIDPIPE_S3_LEASE_S="2", **s3_server))
    assert r.returncode == 0, r.stderr[-3000:]
    final = segment_rows(out)
    assert duplicate_keys(out) == 0 and all(row in final for row in partial)
    per_video = run_query(out, "SELECT v.n_segments, count(*) n FROM segments s JOIN videos v USING (video_id) "
                               "GROUP BY v.video_id, v.n_segments").to_pylist()
    assert len(per_video) == 3 and all(r["n"] == r["n_segments"] for r in per_video)
    assert len(final) == sum(r["n"] for r in per_video)
    assert not [k for k in _all_objects(s3, "vidpipe-out") if k.startswith("run2/_job/staging/")]


def _two_commits_on_s3(uri: str):
    """An S3 OUT with two commits (v1: 3 segments, v2: 2); the second commit."""
    out = OutputDir(uri)
    out.create()
    w = ResultWriter(out, model_id="m1", labels=LABELS)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    w.add_row(head_row("v2", 0, 0, 2, is_last=True, n_total=2))
    return out, w.flush()


def test_commit_protocol_on_s3_every_crash_state(s3):
    """Unit level, on the real S3 API: staged+recorded, copied-not-deleted, orphans; recovery and readers."""
    out, commit = _two_commits_on_s3("s3://vidpipe-out/unit")
    assert commit is not None
    store = out.store
    # crash after the record, before any copy: files back in staging
    for table, name in commit.files.items():
        store.move(f"{table}/{name}", f"_job/staging/{name}")
    # crash between the copy and the delete of one file: it is in both places
    seg = commit.files["segments"]
    store.fs.copy_file(store.full(f"_job/staging/{seg}"), store.full(f"segments/{seg}"))
    # crash before a record: an orphan in staging
    store.write_atomic("_job/staging/part-orphan.parquet", b"partial")
    rows = run_query(out.uri, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]
    assert out.finished_video_ids() == {"v1", "v2"}
    out.recover()
    assert store.list_names("_job/staging") == []
    assert all(store.is_file(f"{t}/{n}") for t, n in commit.files.items())
    assert run_query(out.uri, "SELECT count(*) n FROM videos").column("n")[0].as_py() == 2
    # a data file no record names is not a run's (they stage first): named and kept, not deleted
    store.write_atomic("videos/part-other.parquet", b"someone's")
    with pytest.raises(ConfigError, match=r"cannot account for \(s3://.*/videos/part-other.parquet\)"):
        out.recover()
    assert store.is_file("videos/part-other.parquet")
    store.delete("videos/part-other.parquet")
    # a committed file deleted by hand: named (exit 2 in the CLI); 'repair' drops its commit whole
    store.delete(f"segments/{seg}")
    with pytest.raises(MissingCommitted, match=rf"s3://.*/segments/{seg} is missing"):
        run_query(out.uri, "SELECT count(*) FROM segments")
    assert [c.name for c, _ in out.forget_missing()] == [commit.name]
    assert run_query(out.uri, "SELECT count(*) n FROM videos").column("n")[0].as_py() == 1
    assert store.list_names("_job/staging") == [] and not store.is_file(f"videos/{commit.files['videos']}")


def test_a_query_whose_file_the_job_moves_out_of_staging_meanwhile_lists_again_on_s3(s3, monkeypatch):
    """The job's move of a committed file out of staging, after query made its views: pyarrow's scan failed on the
    missing key, and query with it, where it lists the files again."""
    import jobs.query

    out, commit = _two_commits_on_s3("s3://vidpipe-out/moved")
    seg = commit.files["segments"]
    out.store.move(f"segments/{seg}", f"_job/staging/{seg}")  # recorded, not moved yet
    views, moves = jobs.query.connect, []

    def connect(out_dir, **kw):  # noqa: ANN001, ANN003, ANN202
        con = views(out_dir, **kw)
        if not moves:
            moves.append(seg)
            out.store.move(f"_job/staging/{seg}", f"segments/{seg}")
        return con

    monkeypatch.setattr(jobs.query, "connect", connect)
    rows = run_query(out.uri, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
    assert moves and rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


def test_a_committed_file_copied_over_another_on_s3_stops_query_and_status(s3, capsys):
    """On S3, query read no footer before the scan: a committed object that another of OUT's was copied over read
    whole, and segments held v2's rows twice and none of v1's (exit 0); status called OUT healthy."""
    from jobs.cli import EXIT_USAGE, main

    out, second = _two_commits_on_s3("s3://vidpipe-out/copied")
    first = next(c for c in out.commits() if c.name != second.name)
    replaced, other = (f"segments/{c.files['segments']}" for c in (first, second))
    out.store.fs.copy_file(out.store.full(other), out.store.full(replaced))
    for argv in (["query", out.uri, "SELECT video_id, count(*) FROM segments GROUP BY 1"], ["status", out.uri]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert (f"is damaged: {out.store.uri_of(replaced)} cannot be read (it holds the rows of "
                f"{second.files['segments']}, another file copied over it)") in err, err


def test_an_out_in_a_bucket_that_does_not_exist_is_a_usage_error(s3_server, shared_media):
    r = run_vidpipe(["run", str(shared_media / "bbb_5s_51.mp4"), "--out", "s3://no-such-bucket/x", *RUN_FLAGS],
                    env=vidpipe_env(**s3_server))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot use --out s3://no-such-bucket/x: there is no bucket 'no-such-bucket'" in r.stderr
    assert "check AWS credentials" not in r.stderr  # the bucket is what to see to, said once (a helper)


def test_a_named_object_that_is_not_there_is_a_failure_row_a_missing_prefix_a_usage_error(s3, s3_archive):
    """As locally: a named video that does not exist becomes a not_found row; the job goes on."""
    from jobs.discover import check_inputs, discover
    from pipeline.errors import MediaError
    from pipeline.inputs import open_input

    named = "s3://vidpipe-in/videos/nope.mp4"
    check_inputs([named, "s3://vidpipe-in/videos/"])
    assert [r.uri for r in discover([named])] == [named]
    with pytest.raises(MediaError) as err, open_input(named):
        pass
    assert err.value.error_kind == "not_found"
    for missing in ("s3://vidpipe-in/no/such/prefix/", "s3://no-such-bucket/videos/a.mp4"):
        with pytest.raises(ConfigError, match=f"input {missing} does not exist"):
            check_inputs([missing])


def test_keys_that_pyarrow_cannot_address_are_listed_once_and_fail_saying_why(s3, s3_archive):
    """A key with '//' under a prefix made the walk recurse without end (a listing of 'odd' names 'odd//' as 'odd'
    itself): the run ended in a RecursionError, nothing labelled.  One with '/./' was read as another key and
    recorded not_found; a manifest line naming a prefix failed as read_error, tried again on every rerun (found by a
    helper).  Now each such key is listed once and fails as unsupported_uri, and a prefix as unreadable."""
    from jobs.discover import discover
    from pipeline.errors import MediaError
    from pipeline.inputs import open_input

    body = (s3_archive / "a" / "clip001.mp4").read_bytes()
    odd = ["odd//lead.mp4", "odd/dbl//v.mp4", "odd/dot/./w.mp4", "odd/up/../y.mp4", "odd/ok/x//z.mp4"]
    for key in [*odd, "odd/ok/fine.mp4"]:
        s3.put_object(Bucket="vidpipe-in", Key=key, Body=body)
    found = [r.uri for r in discover(["s3://vidpipe-in/odd/"])]
    assert sorted(found) == sorted(f"s3://vidpipe-in/{k}" for k in [*odd, "odd/ok/fine.mp4"])  # each once
    for uri in found:
        if uri.endswith("fine.mp4"):
            with open_input(uri) as opened:
                assert opened.size_bytes == len(body)
            continue
        with pytest.raises(MediaError) as err, open_input(uri):
            pass
        assert err.value.error_kind == "unsupported_uri", err.value
        assert "which the S3 client (pyarrow) cannot address as written" in err.value.message
    with pytest.raises(MediaError) as err, open_input("s3://vidpipe-in/odd/ok/"):
        pass
    assert err.value.error_kind == "unreadable" and "names an S3 prefix (a folder), not an object" in err.value.message


def test_an_s3_manifest_and_its_prefix_give_the_same_ids(s3, s3_archive):
    """As a local manifest and its folder do: a full URI of an object under the manifest's prefix was slugged
    bucket__prefix__name (vidpipe-in__videos__b__clip000.mp4), the walk of the prefix b__clip000.mp4."""
    from jobs.discover import discover

    walked = {r.uri: r.video_id for r in discover(["s3://vidpipe-in/videos/"])}
    listed = {r.uri: r.video_id for r in discover(["s3://vidpipe-in/videos/list.txt"])}
    assert listed.pop("s3://vidpipe-in/videos/not/there.mp4").startswith("not__there.mp4-")
    assert listed == {uri: walked[uri] for uri in listed} and len(listed) == 2
    assert listed["s3://vidpipe-in/videos/b/clip000.mp4"].startswith("b__clip000.mp4-")
    # an entry outside the manifest's prefix keeps its path as given
    other = {r.uri: r.video_id for r in discover(["s3://vidpipe-in/lists/m.txt"])}
    assert other["s3://vidpipe-in/videos/a/clip001.mp4"].startswith("videos__a__clip001.mp4-")
    assert other["s3://vidpipe-in/videos/b/clip000.mp4"].startswith("vidpipe-in__videos__b__clip000.mp4-")


def test_s3_inputs_and_outs_that_name_nothing_to_run_are_usage_errors(s3, s3_archive, capsys):
    """'run s3://' ran every video of every bucket the credentials could list; status, query and repair of
    's3://' were tracebacks (exit 1); a prefix holding no video ran nothing and exited 0; an S3 glob was taken
    for one key (a not_found row); an entry in a bucket that does not exist said 'no such object'."""
    from jobs.cli import EXIT_USAGE, main
    from jobs.discover import check_inputs
    from pipeline.errors import MediaError
    from pipeline.inputs import open_input

    for uri in ("s3://", "s3:///videos/"):
        with pytest.raises(ConfigError, match="names no bucket; give s3://BUCKET or s3://BUCKET/PREFIX"):
            check_inputs([uri])
    for args in (["status", "s3://"], ["query", "s3://", "SELECT 1"], ["repair", "s3://"], ["status", "s3:///x"]):
        assert main(args) == EXIT_USAGE, args
        err = capsys.readouterr().err
        assert "names no bucket" in err and "Traceback" not in err, err
    s3.put_object(Bucket="vidpipe-in", Key="docs/readme.txt", Body=b"notes")
    s3.put_object(Bucket="vidpipe-in", Key="docs/sub/meta.json", Body=b"{}")
    with pytest.raises(ConfigError, match="input s3://vidpipe-in/docs/ holds no video files"):
        check_inputs(["s3://vidpipe-in/docs/"])
    with pytest.raises(ConfigError, match="glob patterns are read for local paths only; give the S3 prefix"):
        check_inputs(["s3://vidpipe-in/videos/*.mp4"])
    with pytest.raises(MediaError, match="there is no bucket 'no-such-bucket'") as err, \
            open_input("s3://no-such-bucket/a.mp4"):
        pass
    assert err.value.error_kind == "not_found"
    with pytest.raises(MediaError, match="names no bucket") as err, open_input("s3:///a.mp4"):
        pass
    s3.put_object(Bucket="vidpipe-out", Key="fresh/videos/", Body=b"")  # a console's "Create folder"
    OutputDir("s3://vidpipe-out/fresh").refuse_occupied_tables()
    s3.put_object(Bucket="vidpipe-out", Key="fresh/videos/a.mp4", Body=b"x")
    with pytest.raises(ConfigError, match="its videos/ already holds files"):
        OutputDir("s3://vidpipe-out/fresh").refuse_occupied_tables()
    assert main(["status", "s3://no-such-bucket/out"]) == EXIT_USAGE  # said: not a vidpipe output directory
    assert "there is no bucket 'no-such-bucket'" in capsys.readouterr().err


def test_an_s3_out_inside_another_outs_tables_or_job_is_a_usage_error(s3):
    """As locally: a run there wrote data files the other OUT could not account for, and that OUT then refused run."""
    from jobs.runner import _open_output

    s3.put_object(Bucket="vidpipe-out", Key="outer/_job/job.json", Body=b"{}")
    for inner, folder in (("outer/segments/nested", "segments"), ("outer/videos", "videos"),
                          ("outer/_job/x", "_job")):
        with pytest.raises(ConfigError, match=re.escape(
                f"cannot use --out s3://vidpipe-out/{inner}: it lies in s3://vidpipe-out/outer/{folder}, a folder of "
                "the vidpipe output s3://vidpipe-out/outer,")):
            _open_output(f"s3://vidpipe-out/{inner}")
    _open_output("s3://vidpipe-out/outer/segments_2026")  # a name that only begins like a table's is no table
    s3.create_bucket(Bucket="vidpipe-root")
    s3.put_object(Bucket="vidpipe-root", Key="_job/job.json", Body=b"{}")  # an OUT at a bucket's root
    with pytest.raises(ConfigError, match=re.escape("it lies in s3://vidpipe-root/segments, a folder of the vidpipe "
                                                    "output s3://vidpipe-root,")):
        _open_output("s3://vidpipe-root/segments/nested")
    _open_output("s3://vidpipe-out/other/segments/nested")  # no OUT above it


def test_an_s3_out_that_cannot_be_reached_says_to_check_the_s3_settings(s3_server, monkeypatch):
    """It said "pass a directory that can be created", as for a local folder."""
    from jobs.query import open_output
    from jobs.runner import _open_output
    from tests.jobs.clusters import closed_port

    with closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
        with pytest.raises(ConfigError, match=r"cannot use --out s3://vidpipe-out/x: .*; check AWS credentials, "
                                              r"region and AWS_ENDPOINT_URL"):
            _open_output("s3://vidpipe-out/x")
        with pytest.raises(ConfigError, match=r"cannot read s3://vidpipe-out/x: .*; check AWS credentials"):
            open_output("s3://vidpipe-out/x")


def test_a_read_from_an_endpoint_that_is_gone_asks_once(s3_server, monkeypatch):
    """A JSON read is tried again where it may have met a rewrite (read_json), and a failed read asks whether the
    key was deleted (Store.read_bytes): against an endpoint that is gone each request is the client's own retries
    (~1.8 s), and reading progress.json as a run whose S3 OUT went away let go of it took 17 s."""
    from tests.jobs.clusters import closed_port

    with closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
        out = OutputDir("s3://vidpipe-out/gone")
        real, asked = out.store.fs, []

        class Counted:
            def __getattr__(self, name: str):  # noqa: ANN204
                method = getattr(real, name)

                def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                    asked.append(name)
                    return method(*args, **kwargs)
                return call

        out.store.fs = Counted()  # type: ignore[assignment]
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            out.read_json("_job/progress.json")
        assert asked == ["open_input_stream"]


def test_a_read_cut_off_mid_transfer_is_tried_again(s3_server, monkeypatch):
    """The client calls a connection reset or a body cut short NETWORK_CONNECTION too: the endpoint is there, so
    such a read is tried again (only a connection that could not be made is not).  A real HTTP server on loopback
    whose first three answers to GET (one read: the client's own three tries) stop after 9 bytes of the body."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body, gets = b'{"state": "finished"}', []

    class CutShort(BaseHTTPRequestHandler):
        def _head(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", "Thu, 03 Dec 2026 08:00:00 GMT")
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802
            self._head()

        def do_GET(self) -> None:  # noqa: N802
            gets.append(self.path)
            self._head()
            self.wfile.write(body if len(gets) > 3 else body[:9])
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert OutputDir("s3://cut/o").read_json("_job/progress.json") == {"state": "finished"}
    finally:
        server.shutdown()
        server.server_close()
    assert len(gets) == 4


def test_a_holder_that_keeps_no_progress_gives_the_last_runs_back(s3):
    """'vidpipe repair' holds an S3 OUT's lease, but keeps no progress of its own: left as 'running', its
    lease made 'status' report a live run and the next run wait it out."""
    out = OutputDir("s3://vidpipe-out/lease")
    out.create()
    last = {"run_id": "r1", "state": "finished", "heartbeat": 1.0, "inputs_total": 3}
    out.write_json("_job/progress.json", last)
    with out.lock("repair-1", keepalive=True):
        assert out.last_progress()["state"] == "running"
    assert out.last_progress() == last
    out.store.delete("_job/progress.json")
    with out.lock("repair-2"):
        pass
    assert out.last_progress() == {}


_RACER = """
import json, sys, time
from jobs.output import OutputDir
out = OutputDir(sys.argv[1])
start_at = float(sys.argv[2])
while time.time() < start_at:
    pass
with out.lock(sys.argv[3], wait_s=120):
    held = time.time()
    time.sleep(1.5)
    print(json.dumps([held, time.time()]))
"""


def test_runs_that_start_together_on_an_s3_out_hold_it_one_at_a_time(s3, tmp_path):
    """Two runs that found an S3 OUT free at the same moment both took its lease (progress.json, read then
    written) and both wrote every row: 64 duplicate segment keys over 8 videos."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    out = "s3://vidpipe-out/race"
    OutputDir(out).create()
    start_at = time.time() + 10  # every racer imported and waiting, then all at once
    env = vidpipe_env(VIDPIPE_S3_LEASE_S="6")
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, out, str(start_at), f"run-{i}"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    held = []
    for r in racers:
        stdout, stderr = r.communicate(timeout=200)
        assert r.returncode == 0, stderr[-3000:]
        held.append(json.loads(stdout))
    held.sort()
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:], strict=False)), held  # one at a time
    assert OutputDir(out).store.list_names("_job/claims") == []  # each let go of its claim



def test_a_read_of_a_deleted_key_is_not_found_whatever_the_wording_of_its_error(s3):
    """A key deleted between pyarrow's size request and its read fails the read with an AWS error whose text
    depends on pyarrow; vidpipe tells it by that text (NO_SUCH_KEY) and, where the text says something else, by
    asking for the key again. An error on a key that is there stays what it is."""
    from jobs.fs import Store

    store = Store("s3://vidpipe-out/wording")
    store.write_atomic("here.json", b"{}")
    real = store.fs

    class OtherWording:  # another pyarrow: the same failures, in other words
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(real, name)

        def open_input_stream(self, path: str):  # noqa: ANN201
            raise OSError("AWS Error UNKNOWN (HTTP status 404) during GetObject operation: the key is gone")

    store.fs = OtherWording()  # type: ignore[assignment]
    with pytest.raises(FileNotFoundError, match="wording/gone.json"):
        store.read_bytes("gone.json")
    with pytest.raises(OSError, match="HTTP status 404") as err:
        store.read_bytes("here.json")  # there when asked again: not a deletion
    assert not isinstance(err.value, FileNotFoundError)


def test_a_progress_file_read_while_it_is_rewritten_is_read_whole_or_not_at_all(s3):
    """A run's progress.json, rewritten every 5 s, read by a rival run's lock or by `status` at that moment:
    the read took one version's size and another's bytes, and came back cut off, padded or not UTF-8 (called
    damaged, or a UnicodeDecodeError), or failed with a bare AWS error where the key had just been deleted.
    CI met it once: a racer of the test above failed on "Failed to flush response stream"."""
    import threading
    import time

    out = OutputDir("s3://vidpipe-out/rewritten")
    out.create()
    stop = threading.Event()

    def rewrite() -> None:
        writer = OutputDir("s3://vidpipe-out/rewritten")
        i = 0
        while not stop.is_set():
            i += 1  # versions of two sizes, and now and then none
            writer.write_json("_job/progress.json", {"run_id": "r", "n": i, "pad": "x" * (3000 if i % 2 else 10)})
            if i % 5 == 0:
                writer.store.delete("_job/progress.json")
            # a run rewrites it every 5 s; these two rewrite it up to 40 times a second, which tears ~1 try in 10
            # (moto, 2026-12-04). Unpaced, a loaded CI machine met all five tries of a read torn once (2026-12-03);
            # paced at 0.01 s, once more (2026-12-04, with five tries then)
            stop.wait(0.05)

    writers = [threading.Thread(target=rewrite) for _ in range(2)]
    for w in writers:
        w.start()
    seen = {"whole": 0, "none": 0}
    torn_tries = 0
    read_text = out.store.read_text

    def counting_read_text(rel: str) -> str:  # the reader's tries that came back torn, to show the race is met
        nonlocal torn_tries
        try:
            text = read_text(rel)
            json.loads(text)
            return text
        except (UnicodeDecodeError, ValueError):
            torn_tries += 1
            raise

    out.store.read_text = counting_read_text  # type: ignore[method-assign]
    try:
        deadline = time.time() + 8
        while time.time() < deadline:
            got = out.read_json("_job/progress.json")
            if got is None:
                seen["none"] += 1
            else:
                assert got["run_id"] == "r" and len(got["pad"]) in (10, 3000), got
                seen["whole"] += 1
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert seen["whole"] >= 20 and seen["none"] >= 1, seen
    assert torn_tries >= 1, "the writers met no read: the test proves nothing"


def test_a_claim_counts_while_its_run_may_live_and_not_once_its_run_said_it_ended(s3, caplog):
    """A driver killed by force leaves its claim behind; its supervisor marks the run failed, and the next run
    must not wait out the claim (the lease is released at once). A fresh claim of a run that said nothing yet
    (a rival claiming at this moment) makes a run wait."""
    import time

    out = OutputDir("s3://vidpipe-out/claims")
    out.create()
    now = time.time()
    out.write_json("_job/claims/r1.json", {"run_id": "r1", "heartbeat": now, "host": "h", "pid": 1})
    with pytest.raises(ConfigError, match="another vidpipe run is writing to s3://vidpipe-out/claims \\(run r1"):
        with out.lock("r2", wait_s=1):
            pass
    assert out.store.list_names("_job/claims") == ["r1.json"]  # r2 let go of its own claim
    out.write_json("_job/progress.json", {"run_id": "r1", "state": "failed", "heartbeat": now})
    caplog.clear()
    with out.lock("r3", wait_s=60):
        pass
    assert not [r for r in caplog.records if "waiting for run" in r.getMessage()]  # not a live claim's 30 s
    assert out.store.list_names("_job/claims") == []  # r1's was dropped, r3's let go


def test_a_holder_busy_longer_than_a_lease_before_its_progress_beats_keeps_out(s3, monkeypatch):
    """A run's claim was written once: while the run recovered a large OUT (its progress.json not beating yet)
    for longer than a lease, another run took the claim for dead and went on beside it."""
    import threading
    import time

    monkeypatch.setenv("VIDPIPE_S3_LEASE_S", "6")  # its claim beats every 2 s: room for a loaded machine
    out = OutputDir("s3://vidpipe-out/busy")
    out.create()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with out.lock("holder"):  # no progress of its own: only the lock's beat says it lives
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        time.sleep(7)  # more than a lease
        with pytest.raises(ConfigError, match="another vidpipe run is writing to s3://vidpipe-out/busy"):
            with out.lock("newcomer", wait_s=3):
                pass
    finally:
        release.set()
        t.join()
    with out.lock("newcomer", wait_s=30):  # let go: the next run goes on
        pass


_STALLER = """
import sys, time
from jobs.output import OutputDir, ResultWriter
from pipeline.errors import ConfigError
from tests.jobs.test_output import LABELS, head_row
out = OutputDir(sys.argv[1])
with out.lock("run-a"):
    writer = ResultWriter(out, model_id="m1", labels=LABELS, run_id="run-a")
    writer.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    print("held", flush=True)
    sys.stdin.readline()  # stopped (SIGSTOP) and let go on (SIGCONT) meanwhile; then commits
    try:
        writer.flush()
    except ConfigError as exc:
        print("refused:", exc, flush=True)
        sys.exit(2)
    print("committed", flush=True)
"""


def test_a_run_stalled_past_its_lease_commits_nothing_after_another_took_over(s3, monkeypatch):
    """A run stopped (SIGSTOP, a suspended machine) for longer than the lease lost OUT to another run, then went
    on and committed the same videos: every row twice, and 'repair' found nothing to drop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    monkeypatch.setenv("VIDPIPE_S3_LEASE_S", "2")
    out = OutputDir("s3://vidpipe-out/stall")
    out.create()
    a = subprocess.Popen([sys.executable, "-c", _STALLER, out.uri], cwd=REPO, env=vidpipe_env(VIDPIPE_S3_LEASE_S="2"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "held"
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(3)  # more than the lease: its claim and progress look dead
        with out.lock("run-b", wait_s=30):  # takes over, as the rerun of a job would
            writer = ResultWriter(out, model_id="m1", labels=LABELS, run_id="run-b")
            writer.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
            writer.flush()
            os.kill(a.pid, signal.SIGCONT)
            a.stdin.write("\n")
            a.stdin.flush()
            stdout, stderr = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
    assert a.returncode == 2, stdout + stderr[-3000:]
    assert "refused: another run took over s3://vidpipe-out/stall" in stdout
    assert [c.name.split("-0")[0] for c in out.commits()] == ["run-b"]  # run-a committed nothing
    assert run_query(out.uri, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 2


def test_an_s3_out_lost_mid_run_ends_the_run_saying_what_to_check(s3_server, tmp_path):
    """The endpoint going away mid-run ended the run with pyarrow's error alone; `status` then guessed
    "driver killed?" and the rerun waited for a lease without a word of why."""
    import socket
    import subprocess

    import boto3
    from moto.server import ThreadedMotoServer

    from tests.jobs.clusters import free_port
    from tests.jobs.conftest import VIDPIPE, wait_for

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = vidpipe_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="lost")
        archive = make_archive(tmp_path / "in", 8, duration_s=3.0)  # four waves: the endpoint goes mid-run
        proc = subprocess.Popen([str(VIDPIPE), "run", str(archive), "--out", "s3://lost/o", *RUN_FLAGS,
                                 "--commit-seconds", "1", "--wave-size", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_for(lambda: any(o["Key"].startswith("o/_job/commits/")
                                 for o in client.list_objects_v2(Bucket="lost").get("Contents", [])),
                     240, "a first commit")
        finally:
            server.stop()  # the endpoint goes away
            # its port held, bound and not listening (refused, as a port nothing has): no other process takes it
            hold = socket.socket()
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.bind(("127.0.0.1", port))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert ("check that the S3 endpoint is reachable (AWS_ENDPOINT_URL, the network) and the credentials still "
            "valid. Its end may not be recorded in OUT: a rerun from another machine waits out the run's lease "
            "(30 s); on this one it goes ahead at once") in err, err[-3000:]
    assert err.rstrip().endswith("the videos committed before it are kept; rerun the same command to resume")
    # the endpoint back (moto keeps its buckets in this process): the rerun here sees the driver gone and does not
    # wait out its lease (30 s) and claim, which nothing could mark ended
    hold.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        again = subprocess.run([str(VIDPIPE), "run", str(archive), "--out", "s3://lost/o", *RUN_FLAGS],
                               capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.stop()
    assert again.returncode == 0 and "waiting for run" not in again.stderr, again.stderr[-3000:]
    counts = re.search(r"done: (\d+) videos? ok, 0 failed, (\d+) skipped", again.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 8 and int(counts[2]) >= 1, again.stdout
