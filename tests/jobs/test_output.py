"""The commit protocol: complete videos only, exactly once, recovery after a crash at any step."""

import json
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.output import MissingCommitted, OutputDir, ResultWriter
from jobs.query import connect, format_table, run_query
from pipeline.errors import ConfigError
from pipeline.media import VideoInfo

LABELS = ["a", "b", "c"]


def head_row(video_id, chunk_index, seg_lo, seg_hi, *, is_last, n_total=None):
    n = seg_hi - seg_lo
    probs = np.tile(np.array([[0.2, 0.7, 0.1]], np.float32), (n, 1))
    info = ""
    if is_last:
        info = json.dumps(VideoInfo(uri=f"/v/{video_id}.mp4", video_id=video_id, duration_s=n_total - 0.5,
                                    n_segments=n_total, video_codec="h264", width=64, height=48, fps=25.0,
                                    rotation_deg=0, has_audio=True).to_dict())
    return {
        "video_id": video_id, "uri": f"/v/{video_id}.mp4", "chunk_index": chunk_index, "is_last": is_last,
        "first_segment": seg_lo, "core_start": seg_lo, "core_end": seg_hi, "has_audio": True, "info_json": info,
        "error_stage": "", "error_kind": "", "error_message": "",
        "segment_index": np.arange(seg_lo, seg_hi, dtype=np.int32),
        "start_s": np.arange(seg_lo, seg_hi, dtype=np.float64),
        "end_s": np.minimum(np.arange(seg_lo, seg_hi) + 1.0, (n_total or 1e9) - 0.5),
        "topk_idx": np.tile(np.array([[1, 0]], np.int32), (n, 1)),
        "topk_scores": probs[:, [1, 0]],
    }


def writer_for(tmp_path, **kw):
    out = OutputDir(tmp_path / "out")
    out.create()
    return out, ResultWriter(out, model_id="m1", labels=LABELS, **kw)


def test_only_complete_videos_are_committed(tmp_path):
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 1, 4, 6, is_last=True, n_total=6))  # out of order: chunk 1 before chunk 0
    w.add_row(head_row("v2", 0, 0, 4, is_last=False))
    assert w.flush() is None  # nothing complete yet
    w.add_row(head_row("v1", 0, 0, 4, is_last=False))
    commit = w.flush()
    assert commit is not None and commit.n_videos == 1 and commit.n_segments == 6
    seg = run_query(out.root, "SELECT * FROM segments ORDER BY segment_index")
    assert seg.column("segment_index").to_pylist() == list(range(6))
    assert seg.column("label").to_pylist() == ["b"] * 6
    assert seg.column("topk_labels").to_pylist()[0] == ["b", "a"]
    assert seg.column("end_s").to_pylist()[-1] == 5.5
    assert pq.read_schema(out.committed_files("segments")[0]).metadata[b"vidpipe.schema_version"] == b"1"
    assert w.pending_videos == 1
    assert out.finished_video_ids() == {"v1"}


def test_whether_a_video_has_audio_is_taken_from_its_end(tmp_path):
    """Chunks are sent before the decoder knows whether the audio track gives any sound; the video's info
    (with its last chunk) says, and its segments take that."""
    out, w = writer_for(tmp_path)
    last = head_row("v1", 1, 4, 6, is_last=True, n_total=6)
    info = json.loads(last["info_json"]) | {"has_audio": False}
    w.add_row(head_row("v1", 0, 0, 4, is_last=False))  # has_audio True, as sent
    w.add_row(last | {"info_json": json.dumps(info)})
    w.flush()
    assert run_query(out.root, "SELECT DISTINCT has_audio FROM segments").to_pylist() == [{"has_audio": False}]
    assert run_query(out.root, "SELECT has_audio FROM videos").to_pylist() == [{"has_audio": False}]


def test_failure_row_discards_partial_chunks(tmp_path):
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 4, is_last=False))
    w.add_row({"video_id": "v1", "uri": "/v/v1.mp4", "error_stage": "decode", "error_kind": "decode_error",
               "error_message": "broken at 4.0 s", "chunk_index": -1, "is_last": True})
    w.flush()
    assert run_query(out.root, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 0
    f = run_query(out.root, "SELECT * FROM failures").to_pylist()
    assert f[0]["error_kind"] == "decode_error" and f[0]["attempts"] == 1 and f[0]["stage"] == "decode"
    assert out.finished_video_ids() == {"v1"} and out.finished_video_ids(include_failed=False) == set()


def test_recover_deletes_uncommitted_and_rolls_committed_forward(tmp_path):
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    # A crash after the commit record but before the renames: files still in staging.
    w.add_row(head_row("v2", 0, 0, 2, is_last=True, n_total=2))
    commit = w.flush()
    for table, name in commit.files.items():
        os.replace(out.table_dir(table) / name, out.staging_dir / name)
    # A crash before the commit record: a staged file no commit names.
    (out.staging_dir / "part-orphan2.parquet").write_bytes(b"partial")
    # Readers already see exactly the committed rows (staged files of committed flushes included).
    assert run_query(out.root, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 5
    out.recover()
    assert list(out.staging_dir.iterdir()) == []
    assert all((out.table_dir(t) / n).exists() for t, n in commit.files.items())
    rows = run_query(out.root, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


def test_a_data_file_no_commit_names_is_refused_not_deleted(tmp_path):
    """A run never leaves one in a table folder (it stages, records, then moves): someone else's file, or one
    whose record was removed. Deleting it as 'uncommitted' lost data; now nothing is touched."""
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    commit = w.flush()
    stray = out.table_dir("segments") / "part-mine.parquet"
    stray.write_bytes(b"someone's data")
    with pytest.raises(ConfigError, match=r"holds data files that vidpipe cannot account for \(.*part-mine.parquet\)"
                                          r".*no commit record.*Nothing was deleted"):
        out.recover()
    assert stray.read_bytes() == b"someone's data"
    # the same with the commit records gone: every part is then unaccounted for, and kept
    for f in out.commits_dir.iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match="cannot account for") as e:
        out.recover()
    assert all(name in str(e.value) for name in commit.files.values())
    assert all((out.table_dir(t) / n).exists() for t, n in commit.files.items()) and stray.exists()


def test_run_into_a_folder_of_other_parquet_files_is_refused_before_anything(tmp_path, capsys):
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    folder = tmp_path / "mine"
    (folder / "segments").mkdir(parents=True)
    (folder / "segments" / "part-0.parquet").write_bytes(b"not vidpipe's")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert main(["run", str(clip), "--out", str(folder), "--allow-untrained"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{folder / 'segments' / 'part-0.parquet'}" in err and "it has no _job/ folder" in err
    assert "Traceback" not in err and "Nothing was deleted" in err
    assert sorted(p.name for p in folder.rglob("*")) == ["part-0.parquet", "segments"]  # no _job/ made


def _two_commits(tmp_path):
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    first = w.flush()
    w.add_row(head_row("v2", 0, 0, 2, is_last=True, n_total=2))
    w.add_row({"video_id": "v3", "uri": "/v/v3.mp4", "error_stage": "decode", "error_kind": "decode_error",
               "error_message": "broken", "chunk_index": -1, "is_last": True})
    second = w.flush()
    return out, first, second


def test_a_deleted_committed_file_is_named_not_read_around(tmp_path):
    """Reading around it gave a query with holes and a rerun that skipped the lost videos as finished."""
    out, _, second = _two_commits(tmp_path)
    lost = out.table_dir("segments") / second.files["segments"]
    lost.unlink()
    for read in (lambda: run_query(out.root, "SELECT count(*) FROM segments"), out.recover,
                 lambda: out.committed_files("segments")):
        with pytest.raises(MissingCommitted, match=rf"{lost} is missing: committed \(with the results of 1 video and 1 failure\) "
                                                   r"but in neither segments/ nor _job/staging/.*vidpipe repair"):
            read()
    assert out.finished_video_ids() == {"v1", "v2", "v3"}  # the other tables are whole: no error reading them
    # a file of a committed flush still in staging (its move not done yet) is not missing
    os.replace(out.table_dir("videos") / second.files["videos"], out.staging_dir / second.files["videos"])
    assert len(out.committed_files("videos")) == 2


@pytest.mark.parametrize("checkpointed", [False, True])
def test_forget_missing_drops_the_whole_commit_and_nothing_else(tmp_path, monkeypatch, checkpointed):
    import jobs.output

    out, first, second = _two_commits(tmp_path)
    if checkpointed:  # the records folded into a checkpoint, as a long job's are
        monkeypatch.setattr(jobs.output, "COMPACT_AT", 1)
        out.recover()
        assert [f.name for f in out.commits_dir.iterdir()] == [f"checkpoint-{second.name}.json"]
    (out.table_dir("videos") / second.files["videos"]).unlink()
    assert [(c.name, m) for c, m in out.missing_files()] == [(second.name, [f"videos/{second.files['videos']}"])]
    dropped = out.forget_missing()
    assert [c.name for c, _ in dropped] == [second.name]
    assert [c.name for c in out.commits()] == [first.name]
    assert out.finished_video_ids() == {"v1"}  # v2 and v3 are done again by the next run
    assert sorted(p.name for t in ("segments", "videos", "failures") for p in out.table_dir(t).iterdir()) == sorted(
        first.files.values())
    assert list(out.staging_dir.iterdir()) == []
    assert run_query(out.root, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 3
    assert out.forget_missing() == []


def test_forget_missing_with_a_file_no_commit_names_changes_nothing(tmp_path):
    """Its final recovery would refuse the stray half-way through (records gone, files staged)."""
    out, first, second = _two_commits(tmp_path)
    (out.table_dir("segments") / second.files["segments"]).unlink()
    (out.table_dir("videos") / "part-stray.parquet").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="part-stray.parquet.*Nothing was deleted"):
        out.forget_missing()
    assert [c.name for c in out.commits()] == [first.name, second.name]
    assert list(out.staging_dir.iterdir()) == []
    assert [(c.name, m) for c, m in out.missing_files()] == [(second.name, [f"segments/{second.files['segments']}"])]


def test_flush_by_size_gives_few_files(tmp_path):
    out, w = writer_for(tmp_path, flush_segments=10)
    for i in range(8):
        w.add_row(head_row(f"v{i}", 0, 0, 4, is_last=True, n_total=4))
    w.flush()
    assert len(out.committed_files("segments")) == 3  # 12 + 12 + 8 segments, not 8 files
    assert run_query(out.root, "SELECT count(DISTINCT video_id) n FROM videos").column("n")[0].as_py() == 8


def test_query_empty_output_and_errors(tmp_path):
    out, _ = writer_for(tmp_path)
    t = run_query(out.root, "SELECT * FROM failures")
    assert t.num_rows == 0 and "error_kind" in t.column_names
    with pytest.raises(ConfigError, match="query failed"):
        run_query(out.root, "SELECT nope FROM segments")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="not a vidpipe output"):
        connect(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'typo'} does not exist; pass the --out directory"):
        connect(tmp_path / "typo")  # was "not a vidpipe output directory (no _job/ inside)"


def test_format_table_csv_json():
    import pyarrow as pa

    t = pa.table({"label": ["a", "b"], "score": [0.5, 0.25], "topk": [["a", "b"], ["b"]]})
    text = format_table(t, "table")
    assert "label" in text.splitlines()[0] and "(2 rows)" in text
    assert format_table(t, "csv").splitlines()[0] == "label,score,topk"
    assert json.loads(format_table(t, "json").splitlines()[1])["label"] == "b"
    # a label holding ', ' read as two in the table's list: [beep, high, background] (a helper)
    listed = format_table(pa.table({"topk": [["beep, high", "background", " x"]]}), "table")
    assert "['beep, high', background, ' x']" in listed


def test_columns_of_the_same_name_each_show_their_own_values(tmp_path, capsys):
    """`SELECT a.start_s, b.start_s` over a join showed the last one's values in both columns (rows were dicts
    by name), and JSON dropped one; found by a helper. JSON keys are made unique."""
    from jobs.cli import main

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    sql = ("SELECT a.segment_index, a.start_s, b.start_s, 0 AS start_s_1 FROM segments a JOIN segments b "
           "ON a.video_id = b.video_id AND b.segment_index = a.segment_index + 1 ORDER BY 1")
    assert main(["query", str(out.root), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out == "segment_index,start_s,start_s,start_s_1\n0,0.0,1.0,0\n1,1.0,2.0,0\n"
    assert main(["query", str(out.root), sql, "--format", "json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"segment_index": i, "start_s": float(i), "start_s_2": i + 1.0, "start_s_1": 0} for i in (0, 1)]
    assert main(["query", str(out.root), sql]) == 0
    assert capsys.readouterr().out.splitlines()[2:4] == ["0             | 0       | 1       | 0        ",
                                                         "1             | 1       | 2       | 0        "]


def test_the_table_keeps_one_line_per_row_and_aligns_wide_characters():
    import pyarrow as pa

    t = pa.table({"uri": ["a\nb.mp4", "漢字.mp4", "e\u0301.mp4", "c\u2028d\x85e.mp4", "x\u202evom.mp4", "नमस्ते"],
                  "n": [1, 2, 3, 4, 5, 6]})
    lines = format_table(t, "table").splitlines()
    assert lines[2:8] == ["a\\nb.mp4          | 1", "漢字.mp4          | 2", "e\u0301.mp4             | 3",
                          "c\\u2028d\\x85e.mp4 | 4", "x\\u202evom.mp4    | 5", "नमस्ते              | 6"]
    assert len(lines) == 9


def test_json_and_csv_output_is_strict_for_any_value_sql_can_give(tmp_path, capsys):
    """NaN and infinities were written as NaN/Infinity (not JSON), bytes as b'...'; empty SQL printed nothing
    with status 0 and --max-rows -1 was taken."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 1, is_last=True, n_total=1))
    w.flush()
    sql = ("SELECT 'nan'::DOUBLE AS n, 'inf'::DOUBLE AS i, [1.5, '-inf'::DOUBLE] AS l, "
           "'\\xAA\\x00'::BLOB AS b, 0.1 AS x, MAP {'k': 'nan'::DOUBLE} AS m, "
           "sum(segment_index) + 9007199254740993 AS s, true AS t FROM segments")
    assert main(["query", str(out.root), sql, "--format", "json"]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) == {
        "n": None, "i": None, "l": [1.5, None], "b": "qgA=", "x": 0.1, "m": [["k", None]], "s": 9007199254740993, "t": True}
    assert main(["query", str(out.root), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == 'NaN,inf,"[1.5, null]",qgA=,0.1,"[[""k"", null]]",9007199254740993,true'
    for argv, said in ((["  "], "the SQL is empty"), (["SELECT 1", "--max-rows", "-1"], "--max-rows must be >= 1"),
                       ([";"], "the SQL ';' returns no rows to print"),
                       (["-- a comment"], "returns no rows to print")):
        assert main(["query", str(out.root), *argv]) == EXIT_USAGE
        assert said in capsys.readouterr().err


def test_embeddings_are_fixed_size_arrays_in_queries(tmp_path):
    """As on an s3:// OUT (Arrow), so array functions work on a local one too (DuckDB's Parquet reader
    alone gives a variable-size list)."""
    out, w = writer_for(tmp_path, embedding_dim=4)
    row = head_row("v1", 0, 0, 3, is_last=True, n_total=3)
    row["embedding"] = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    w.add_row(row)
    w.flush()
    sims = run_query(out.root, "SELECT array_cosine_similarity(embedding, embedding) AS s, typeof(embedding) AS t "
                               "FROM segments").to_pylist()
    assert [r["t"] for r in sims] == ["FLOAT[4]"] * 3
    assert [r["s"] for r in sims] == pytest.approx([1.0] * 3)


def test_damaged_job_files_are_named_errors_not_tracebacks(tmp_path, capsys):
    """A commit record or job.json changed by something else: query and run say which file; a damaged
    heartbeat (progress.json) only loses the run's rates."""
    from jobs.status import read_status
    from pipeline.errors import ConfigError

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    out.write_json("_job/job.json", {"model_id": "m1"})
    (out.job_dir / "progress.json").write_text("{not json")
    status = read_status(str(out.root))
    assert status.done == 1 and status.run_state is None
    from jobs.status import format_status

    # it said "last run -: no run recorded", as of an OUT no run had written
    assert (f"last run -: {out.job_dir}/progress.json, the last run's record, is damaged: its state is unknown (the "
            "counts come from the tables); the next 'vidpipe run' into this OUT rewrites it") in \
        format_status(status)
    (out.job_dir / "job.json").write_text('{"model_id": "x"')
    with pytest.raises(ConfigError, match=r"job\.json is damaged .*or move it out of OUT and rerun the job's own "
                                          r"command: the run records the job again"):
        out.read_json("_job/job.json")
    # repair said "every committed file is in place; nothing to drop" and exited 0 (a helper): a run refuses OUT
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    assert main(["repair", str(out.root)]) == EXIT_USAGE
    # a job.json that parses but records nothing: run said "another job (model None with sampling None)" and
    # repair called OUT sound; repair also said "nothing to drop" before the error (found by a helper)
    (out.job_dir / "job.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"job\.json is damaged \(it does not say the job's model_id or sampling\)"):
        out.read_json("_job/job.json")
    capsys.readouterr()
    assert main(["repair", str(out.root)]) == EXIT_USAGE
    said = capsys.readouterr()
    # then "every committed file is in place" and exit 2 read as a contradiction (another helper)
    assert "nothing to drop" not in said.out and said.out.startswith(
        f"{out.root}: every committed file is in place (--verify also reads every data page), but a run refuses OUT "
        "until the problem below is mended\n")
    assert "vidpipe repair: error: " in said.err and "does not say the job's model_id or sampling" in said.err
    record = sorted(out.commits_dir.glob("*.json"))[0]
    record.write_text("")
    with pytest.raises(ConfigError, match=f"{record.name} is damaged .*a commit record names the files"):
        run_query(out.root, "SELECT count(*) FROM segments")


def test_repair_dry_run_does_not_call_an_out_with_files_in_the_way_sound(tmp_path, capsys):
    """A deleted commit record leaves its data files named by nothing: 'repair --dry-run' said "every committed file
    is in place; nothing to drop" and then that they are in the way (a helper)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    for record in out.commits_dir.glob("*.json"):
        record.unlink()
    assert main(["repair", str(out.root), "--dry-run"]) == EXIT_USAGE
    said = capsys.readouterr()
    assert "nothing to drop" not in said.out and "but a run refuses OUT until the problem below is mended" in said.out
    assert re.search(r"^vidpipe repair: error: \d+ data files? that no commit names (is|are) in the way: move "
                     r"(it|them) out of ", said.err, re.M), said


def test_csv_keeps_floats_exact_and_lists_unambiguous():
    """CSV is for export: 1234567.891 was written as 1.23457e+06, and a label with a comma could not be told
    from two labels (found by QA)."""
    import csv
    import io

    import pyarrow as pa

    t = pa.table({"start_s": [1234567.891], "topk": [["rock, pop", 'say "hi"']]})
    row = list(csv.reader(io.StringIO(format_table(t, "csv"))))[1]
    assert float(row[0]) == 1234567.891 and json.loads(row[1]) == ["rock, pop", 'say "hi"']


def test_status_pending_counts_the_last_runs_inputs_not_the_whole_output(tmp_path):
    """OUT holds v1..v4, v3 and v4 named by other inputs; the last run named v1, v2, v5, v6 and was stopped
    before v5 and v6: 2 pending, where the tables' count (4 done of 4) said 0."""
    from jobs.status import format_status, read_status

    out, w = writer_for(tmp_path)
    for v in ("v1", "v2", "v3", "v4"):
        w.add_row(head_row(v, 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    last = {"run_id": "r2", "state": "interrupted", "heartbeat": 1.0, "inputs_total": 4, "discovered": 4,
            "skipped": 2, "done": 0, "failed": 0}
    out.write_json("_job/progress.json", last)
    s = read_status(str(out.root))
    assert (s.done, s.total, s.pending) == (4, 4, 2)
    assert "4 done, 0 failed; 2 pending of the last run's 4 input videos" in format_status(s)
    # a run killed before it counted its inputs, or progress.json deleted: "? pending of the last run's ? input
    # videos" (a helper)
    out.write_json("_job/progress.json", {k: v for k, v in last.items() if k != "inputs_total"})
    assert "videos: 4 done, 0 failed; the last run's input count is not recorded\n" in format_status(
        read_status(str(out.root)))
    out.write_json("_job/progress.json", {k: v for k, v in last.items() if k != "inputs_total"} | {
        "state": "running", "heartbeat": time.time()})
    assert "videos: 4 done, 0 failed; the last run's inputs are not counted yet\n" in format_status(
        read_status(str(out.root)))
    # still reading its inputs: the unread ones may be finished already, so the tables give the estimate
    out.write_json("_job/progress.json", last | {"state": "running", "inputs_total": 10, "discovered": 3,
                                                 "skipped": 3})
    assert read_status(str(out.root)).pending == 6


def test_status_pending_of_a_killed_run_counts_what_it_did_not_commit(tmp_path):
    """The run named v1, v2, v5, v6 (v1, v2 finished before); killed after finishing v5 and v6, v6 not yet
    committed: its own count says 0 pending, the tables 1 (the larger lower bound is right)."""
    from jobs.status import read_status

    out, w = writer_for(tmp_path)
    for v in ("v1", "v2", "v5"):
        w.add_row(head_row(v, 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    out.write_json("_job/progress.json", {"run_id": "r2", "state": "running", "heartbeat": 1.0, "inputs_total": 4,
                                          "discovered": 4, "skipped": 2, "done": 2, "failed": 0})
    s = read_status(str(out.root))
    assert (s.run_state, s.done, s.pending) == ("dead", 3, 1)


def test_status_pending_of_a_run_killed_after_a_commit_its_progress_file_does_not_count_yet(tmp_path):
    """Killed between a commit and its next progress.json: 1 of 5 committed, progress.json still saying 0
    done; status said 5 pending (the run's own count, which lagged, was taken as the larger bound)."""
    from jobs.status import read_status

    out, w = writer_for(tmp_path, run_id="r3")
    w.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    out.write_json("_job/progress.json", {"run_id": "r3", "state": "running", "heartbeat": 1.0, "inputs_total": 5,
                                          "inputs_finished": 0, "done": 0, "failed": 0})
    s = read_status(str(out.root))
    assert (s.run_state, s.done, s.pending) == ("dead", 1, 4)


def test_status_pending_of_a_run_stopped_early_on_other_inputs(tmp_path):
    """OUT held 3 videos of other inputs; a run over 5 new ones was stopped after its first: 4 pending (the
    tables alone said 1). Counting its inputs at the start also counts which of them were finished."""
    from jobs.status import read_status

    out, w = writer_for(tmp_path)
    for v in ("o1", "o2", "o3", "n1"):
        w.add_row(head_row(v, 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    out.write_json("_job/progress.json", {"run_id": "r2", "state": "interrupted", "heartbeat": 1.0,
                                          "inputs_total": 5, "inputs_finished": 0, "discovered": 2, "skipped": 0,
                                          "done": 1, "failed": 0})
    assert read_status(str(out.root)).pending == 4


@pytest.mark.parametrize("table", ["segments", "videos"])
def test_a_damaged_committed_file_is_named_and_repair_drops_its_commit(tmp_path, capsys, table):
    """A committed file emptied by hand: query and status failed with DuckDB's traceback (exit 1) and repair
    said nothing was wrong."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, first, second = _two_commits(tmp_path)
    assert main(["query", str(out.root), f"SELECT * FROM read_parquet('{out.root}/segments/typo.parquet')"]) == \
        EXIT_USAGE
    err = capsys.readouterr().err
    assert "query failed" in err and "is damaged" not in err  # the SQL's own file, not a committed one
    damaged = out.table_dir(table) / second.files[table]
    damaged.write_bytes(b"")
    if table == "videos":  # a rerun's done-set reads it: an error naming it (an ArrowInvalid traceback before)
        with pytest.raises(ConfigError, match=rf"is damaged: {damaged} cannot be read .*vidpipe repair"):
            out.finished_uris()
    video = tmp_path / "v4.mp4"  # a rerun would have skipped v2 and v3 as finished, the damage left for a query
    run = ["run", str(video), "--out", str(out.root), "--allow-untrained", "--no-progress"]
    for argv in (run, ["query", str(out.root), f"SELECT count(*) FROM {table}"], ["status", str(out.root)]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert f"a committed file of {out.root} is damaged: {damaged} cannot be read" in err, err
        assert f"vidpipe repair {out.root}" in err and "LINE 1" not in err
        assert "Traceback" not in err
    assert main(["repair", str(out.root), "--dry-run"]) == 0
    assert f"would drop commit {second.name}" in capsys.readouterr().out and damaged.exists()
    assert main(["repair", str(out.root)]) == 0
    assert f"missing or damaged: {damaged}" in capsys.readouterr().out
    assert not damaged.exists() and [c.name for c in out.commits()] == [first.name]
    assert main(["query", str(out.root), "SELECT count(*) n FROM segments", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "3"]


def test_a_committed_file_copied_over_another_is_damage_that_repair_drops(tmp_path, capsys):
    """Another of OUT's files copied over a committed one reads whole: run, repair and repair --verify called
    OUT healthy while segments held the copied videos' rows twice and none of the replaced ones' (a helper)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, w = writer_for(tmp_path)
    commits = []
    for vid in ("v1", "v2"):  # the same number of rows in each: a count in the record would not tell them apart
        w.add_row(head_row(vid, 0, 0, 3, is_last=True, n_total=3))
        commits.append(w.flush())
    first, second = (out.table_dir("segments") / c.files["segments"] for c in commits)
    first.write_bytes(second.read_bytes())
    for argv in (["repair", str(out.root), "--dry-run"], ["repair", str(out.root), "--dry-run", "--verify"]):
        assert main(argv) == 0
        assert f"would drop commit {commits[0].name}" in capsys.readouterr().out
    run = ["run", str(tmp_path / "v9.mp4"), "--out", str(out.root), "--allow-untrained", "--no-progress"]
    assert main(run) == EXIT_USAGE
    err = capsys.readouterr().err
    assert (f"a committed file of {out.root} is damaged: {first} cannot be read (it holds the rows of "
            f"{second.name}, another file copied over it); restore it, or run 'vidpipe repair {out.root}'") in err
    # query counted v2's rows twice and none of v1's, and status called OUT healthy
    for argv in (["query", str(out.root), "SELECT video_id, count(*) FROM segments GROUP BY 1"],
                 ["status", str(out.root)]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert f"is damaged: {first} cannot be read (it holds the rows of {second.name}" in err, err
    assert main(["repair", str(out.root)]) == 0
    capsys.readouterr()
    assert [c.name for c in out.commits()] == [commits[1].name] and not first.exists()
    assert main(["query", str(out.root), "SELECT video_id, count(*) n FROM segments GROUP BY 1", "--format",
                 "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["video_id,n", "v2,3"]


def test_an_export_copied_over_a_committed_file_is_damage_by_its_row_count(tmp_path, capsys):
    """A user's export (COPY (SELECT * FROM segments) TO ...) names no file in its footer, like a file of before
    2026-12-02: copied over a committed file it was read whole, and every row it held was counted again (a helper:
    18 rows, 10 keys, exit 0; repair --verify said every file is in place).  Its commit record says how many."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, w = writer_for(tmp_path)
    commits = []
    for vid, n in (("v1", 3), ("v2", 2)):
        w.add_row(head_row(vid, 0, 0, n, is_last=True, n_total=n))
        commits.append(w.flush())
    export = tmp_path / "export.parquet"
    assert main(["query", str(out.root), f"COPY (SELECT * FROM segments) TO '{export}'"]) == 0
    victim = out.table_dir("segments") / commits[1].files["segments"]
    victim.write_bytes(export.read_bytes())
    capsys.readouterr()
    for argv in (["query", str(out.root), "SELECT count(*) FROM segments"], ["status", str(out.root)]):
        assert main(argv) == EXIT_USAGE, argv
        assert (f"is damaged: {victim} cannot be read (it holds 5 rows where its commit record says 2: another file "
                "copied over it)") in capsys.readouterr().err
    assert main(["repair", str(out.root), "--verify"]) == 0
    assert f"missing or damaged: {victim}" in capsys.readouterr().out
    assert main(["query", str(out.root), "SELECT video_id, count(*) n FROM segments GROUP BY 1", "--format",
                 "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["video_id,n", "v1,3"]


@pytest.mark.parametrize(("field", "value", "why"), [
    ("files", "x", "its 'files' is not a table → file name mapping"),
    ("name", 7, "its 'name' is 7, not a commit's name"),
    ("n_videos", None, "its 'n_videos' is None, not a count"),
    ("n_segments", "one", "its 'n_segments' is 'one', not a count"),
])
def test_a_commit_record_with_a_field_of_the_wrong_kind_is_damaged(tmp_path, capsys, field, value, why):
    """A record that parses but holds a field of another kind was read, and query, status and run failed later
    with an AttributeError or TypeError traceback (exit 1), or status alone did (a helper)."""
    import json

    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    commit = w.flush()
    record = out.commits_dir / f"{commit.name}.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), field: value}))
    for argv in (["query", str(out.root), "SELECT count(*) FROM segments"], ["status", str(out.root)]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert f"{record} is damaged ({why}); it was changed by something other than vidpipe" in err, err
    assert main(["repair", str(out.root)]) == 0
    assert out.commits() == []


def test_a_progress_file_with_a_field_of_the_wrong_kind_is_said_damaged(tmp_path):
    """"inputs_total": "four" or "heartbeat": "x" in progress.json was a ValueError traceback of status (a helper);
    a progress.json that does not parse was already said to be damaged."""
    import json

    from jobs.status import format_status, read_status

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    for field, value, why in (("inputs_total", "four", 'its \'inputs_total\' is "four", not a whole number'),
                              ("heartbeat", "x", 'its \'heartbeat\' is "x", not a number')):
        (out.job_dir / "progress.json").write_text(json.dumps({"state": "running", "heartbeat": 1.0, field: value}))
        status = read_status(str(out.root))
        assert status.done == 1 and status.run_state is None
        assert (f"is damaged ({why}): its state is unknown (the counts come from the tables)"
                in format_status(status)), format_status(status)
        assert out.last_progress() == {}  # the S3 lease read it too: float("x") was a traceback of run


def test_repair_that_drops_a_retried_video_s_success_says_its_old_failure_needs_retry_failed(tmp_path, capsys):
    """v1 failed, and a later --retry-failed run finished it; repair dropped that commit (its file deleted) and said
    "rerun the job's command to do those videos again", but v1's old failure was back and a plain rerun skipped it
    (a helper)."""
    from jobs.cli import main
    from pipeline.media import Failure

    out, w = writer_for(tmp_path)
    w.add_failure(Failure(uri="/v/v1.mp4", video_id="v1", stage="decode", error_kind="invalid_data", message="x"))
    w.flush()
    retrying = ResultWriter(out, model_id="m1", labels=LABELS)  # the --retry-failed run's writer
    retrying.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    retried = retrying.flush()
    (out.table_dir("segments") / retried.files["segments"]).unlink()
    capsys.readouterr()
    assert main(["repair", str(out.root)]) == 0
    said = capsys.readouterr().out
    assert (f"1 video of {out.root} is recorded as failed (some may be videos whose later success was dropped here): "
            f"a plain rerun skips it, add --retry-failed to try it again (vidpipe query {out.root} \"SELECT * FROM "
            "failures\" lists it)") in said, said


def test_the_commands_a_message_gives_are_quoted_for_the_shell(tmp_path, capsys):
    """An OUT with a space: "run 'vidpipe repair /x/my out'" pasted was two arguments (a helper)."""
    import shlex

    from jobs.cli import main

    out = OutputDir(tmp_path / "my out")
    out.create()
    w = ResultWriter(out, model_id="m1", labels=LABELS)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    commit = w.flush()
    (out.table_dir("segments") / commit.files["segments"]).unlink()
    assert main(["query", str(out.root), "SELECT count(*) FROM segments"]) == 2
    err = capsys.readouterr().err
    given = re.search(r"or run '(vidpipe repair .*)' to drop those", err)
    assert given is not None and shlex.split(given.group(1)) == ["vidpipe", "repair", str(out.root)], err


def test_a_file_with_a_commit_s_name_but_not_the_one_its_record_names_is_said_to_be_it_renamed(tmp_path, capsys):
    """A record naming part-<commit>-...Z.parquet beside part-<commit>-...b.parquet: query named the one missing and
    sent the user to repair, which refused the other as a file it cannot account for, connecting neither (a
    helper)."""
    import json

    from jobs.cli import main

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    commit = w.flush()
    real = commit.files["segments"]
    record = out.commits_dir / f"{commit.name}.json"
    d = json.loads(record.read_text())
    d["files"]["segments"] = real[:-9] + "Z.parquet"
    record.write_text(json.dumps(d))
    assert main(["repair", str(out.root)]) == 2
    err = capsys.readouterr().err
    assert (f"{out.table_dir('segments') / real} has the name of a file of commit {commit.name}, whose record names "
            f"segments/{d['files']['segments']}: if it is that file renamed, give it that name back.") in err, err


def test_past_the_kept_footers_a_query_reads_them_again(tmp_path, monkeypatch):
    """Footers kept for the scan cost ~40 kB each in memory (430 MB against 285 MB for 3,000 commits, a review):
    past _KEPT_FOOTERS files a table they are checked and let go, and the scan reads them again."""
    import jobs.query

    out, _, _ = _two_commits(tmp_path)
    for kept in (1, 500):
        monkeypatch.setattr(jobs.query, "_KEPT_FOOTERS", kept)
        rows = run_query(out.root, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
        assert rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


@pytest.mark.parametrize("mask", [0xFF, 0x01])
def test_a_damaged_column_name_in_a_footer_is_named_not_read_as_nulls(tmp_path, capsys, mask):
    """A byte flipped in a column's name in the footer: query read that file as lacking the column (its
    video_ids null, exit 0) where the name stayed UTF-8 ('video_ie'), and since 24931c3 also where it did not
    (a review)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, _, second = _two_commits(tmp_path)
    damaged = out.table_dir("segments") / second.files["segments"]
    data = bytearray(damaged.read_bytes())
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    at = data.index(b"video_id", footer) + 7  # its last 'd', in the footer's schema
    data[at] ^= mask
    damaged.write_bytes(bytes(data))
    for argv in (["query", str(out.root), "SELECT video_id, count(*) FROM segments GROUP BY 1"],
                 ["status", str(out.root)],
                 ["run", str(tmp_path / "v9.mp4"), "--out", str(out.root), "--allow-untrained", "--no-progress"]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert f"is damaged: {damaged} cannot be read" in err and "vidpipe repair" in err, err
    assert main(["repair", str(out.root)]) == 0
    capsys.readouterr()
    assert main(["query", str(out.root), "SELECT video_id, count(*) n FROM segments GROUP BY 1", "--format",
                 "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["video_id,n", "v1,3"]


def test_damaged_pages_behind_a_whole_footer_are_named_and_repair_verify_drops_them(tmp_path, capsys):
    """Bytes flipped inside a committed file, its footer whole: query said "query failed: don't know what type"
    naming no file, and repair found nothing to drop (status, which reads no page of segments, is right)."""
    import struct

    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, first, second = _two_commits(tmp_path)
    damaged = out.table_dir("segments") / second.files["segments"]
    data = bytearray(damaged.read_bytes())
    footer = struct.unpack("<I", data[-8:-4])[0]
    for i in range(4, len(data) - footer - 8):  # every byte between the magic and the footer
        data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))
    assert main(["query", str(out.root), "SELECT * FROM segments"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"a committed file of {out.root} is damaged: {damaged} cannot be read" in err, err
    assert f"or run 'vidpipe repair {out.root} --verify' to drop its results" in err, err  # plain repair: see below
    assert main(["repair", str(out.root)]) == 0  # the footer is whole: only reading the pages finds it
    assert "nothing to drop (--verify also reads every data page)" in capsys.readouterr().out
    assert main(["repair", str(out.root), "--verify", "--dry-run"]) == 0
    assert f"would drop commit {second.name}" in capsys.readouterr().out and damaged.exists()
    assert main(["repair", str(out.root), "--verify"]) == 0
    assert f"missing or damaged: {damaged}" in capsys.readouterr().out
    assert [c.name for c in out.commits()] == [first.name]
    assert main(["repair", str(out.root), "--verify"]) == 0
    assert "every committed file is in place and reads whole; nothing to drop" in capsys.readouterr().out
    assert main(["query", str(out.root), "SELECT count(*) n FROM segments", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "3"]


def test_a_damaged_page_that_query_meets_is_named_with_repair_verify(tmp_path, capsys):
    """A few bytes damaged in one data page (footer whole): query said to run plain 'repair', which found nothing
    to drop (only --verify reads pages), or gave DuckDB's raw error with no advice (a helper)."""
    import pyarrow.parquet as pq

    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, first, second = _two_commits(tmp_path)
    damaged = out.table_dir("segments") / second.files["segments"]
    meta = pq.ParquetFile(damaged).metadata.row_group(0)
    page = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == "score")
    data = bytearray(damaged.read_bytes())
    for i in range(page.data_page_offset + 8, page.data_page_offset + 12):
        data[i] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert main(["query", str(out.root), "SELECT * FROM segments"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"a committed file of {out.root} is damaged: {damaged} cannot be read" in err, err
    assert f"or run 'vidpipe repair {out.root} --verify' to drop its results" in err, err
    assert main(["repair", str(out.root), "--verify"]) == 0
    assert [c.name for c in out.commits()] == [first.name]


def test_a_query_whose_file_a_running_job_moves_into_place_meanwhile_lists_again(tmp_path, monkeypatch):
    """A committed file still in staging, moved into its table folder by the running job after query had listed
    it (a real job's flush does so right after its record): query listed again, not failed."""
    out, first, second = _two_commits(tmp_path)
    name = second.files["segments"]
    os.replace(out.table_dir("segments") / name, out.staging_dir / name)  # recorded, not moved yet
    import jobs.query

    views = jobs.query.connect
    moves = []

    def connect(out_dir, **kw):  # noqa: ANN001, ANN003, ANN202
        con = views(out_dir, **kw)
        if not moves:  # the job's move, right after query made its views of the files where they were
            moves.append(name)
            os.replace(out.staging_dir / name, out.table_dir("segments") / name)
        return con

    monkeypatch.setattr(jobs.query, "connect", connect)
    table = run_query(out.root, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1")
    assert moves and table.to_pylist() == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


def test_a_flipped_bit_that_reads_back_as_another_score_is_refused_not_answered(tmp_path, capsys):
    """One bit flipped inside a data page (footer whole): DuckDB's own reader, which query used, gave another
    avg(score) with exit 0. The pages' CRCs are checked as query reads them now."""
    import duckdb
    import pyarrow.parquet as pq

    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, first, second = _two_commits(tmp_path)
    damaged = out.table_dir("segments") / second.files["segments"]
    whole = damaged.read_bytes()
    sql = f"SELECT avg(score) FROM read_parquet('{damaged}')"
    right = duckdb.sql(sql).fetchall()
    meta = pq.ParquetFile(damaged).metadata.row_group(0)
    chunk = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == "score")
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)

    def wrong_read(i: int, bit: int) -> bool:  # the file with one bit flipped reads without error, another value
        data = bytearray(whole)
        data[i] ^= bit
        damaged.write_bytes(bytes(data))
        try:
            return duckdb.sql(sql).fetchall() != right
        except duckdb.Error:
            return False

    flip = next(((i, b) for i in range(start, start + chunk.total_compressed_size) for b in (1, 16, 128)
                 if wrong_read(i, b)), None)
    assert flip is not None, "no single flipped bit reads back as another score"  # the file left damaged by it
    for argv in (["query", str(out.root), "SELECT avg(score) FROM segments"],
                 ["query", str(out.root), "SELECT label, avg(score) FROM segments GROUP BY 1"]):
        assert main(argv) == EXIT_USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"a committed file of {out.root} is damaged: {damaged} cannot be read" in captured.err, captured.err
        assert f"vidpipe repair {out.root} --verify" in captured.err
    assert main(["query", str(out.root), "SELECT count(*) n FROM videos", "--format", "csv"]) == 0  # other tables
    assert capsys.readouterr().out.splitlines() == ["n", "2"]
    assert main(["repair", str(out.root), "--verify"]) == 0
    assert [c.name for c in out.commits()] == [first.name]


def test_a_data_file_in_a_subfolder_of_a_table_is_refused_too(tmp_path):
    """Another tool's partitioned files (segments/year=2024/...) were taken as no concern of the run's, and a
    reader of segments/** then got both."""
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    nested = out.table_dir("segments") / "year=2024" / "part-0.parquet"
    nested.parent.mkdir()
    nested.write_bytes(b"theirs")
    assert out.unrecorded_parts() == ["segments/year=2024/part-0.parquet"]
    with pytest.raises(ConfigError, match=r"cannot account for \(.*segments/year=2024/part-0.parquet\)"):
        out.recover()
    with pytest.raises(ConfigError, match="Move those files out of it, then run 'vidpipe repair' again"):
        out.forget_missing()
    assert nested.read_bytes() == b"theirs"


def test_query_and_status_say_what_they_do_not_count(tmp_path, capsys):
    from jobs.cli import main

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    (out.table_dir("videos") / "part-x.parquet").write_bytes(b"theirs")
    for argv in (["query", str(out.root), "SELECT count(*) FROM videos"], ["status", str(out.root)]):
        assert main(argv) == 0
        assert "1 data files in" in capsys.readouterr().err


def test_a_garbled_footer_is_damage_and_a_file_out_of_reach_is_not(tmp_path, monkeypatch):
    out, first, _ = _two_commits(tmp_path)
    rel = f"segments/{first.files['segments']}"
    path = out.table_dir("segments") / first.files["segments"]
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[-8:-4], "little")
    data[-8 - size:-8] = b"\xab" * size  # the footer's thrift, overwritten
    path.write_bytes(bytes(data))
    assert not out.readable_parquet(rel)

    def unreachable(rel: str) -> None:
        raise OSError(f"AWS Error ACCESS_DENIED during GetObject operation: {rel}")

    monkeypatch.setattr(out.store, "read_metadata", unreachable)
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # repair must stop, not drop the commit as damaged
        out.missing_files()


def test_intervals_print_as_duckdb_writes_them(tmp_path, capsys):
    """INTERVAL values came out as Python's MonthDayNano(...) repr (table, csv) or a list of three integers (json)."""
    import duckdb

    from jobs.cli import main

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 1, is_last=True, n_total=1))
    w.flush()
    values = ["INTERVAL 90 MINUTE", "INTERVAL '1 year 3 months 2 days 3.5 seconds'", "INTERVAL '-1 day -2 hours'",
              "INTERVAL 0 SECOND", "INTERVAL '-14 months 1 microsecond'"]
    duckdb_text = duckdb.sql("SELECT " + ", ".join(f"({v})::VARCHAR" for v in values)).fetchall()[0]
    sql = "SELECT " + ", ".join(f"{v} AS c{i}" for i, v in enumerate(values)) + " FROM segments"
    assert main(["query", str(out.root), sql, "--format", "json"]) == 0
    assert list(json.loads(capsys.readouterr().out).values()) == list(duckdb_text)
    assert main(["query", str(out.root), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == ",".join(duckdb_text)
    assert main(["query", str(out.root), sql]) == 0
    assert capsys.readouterr().out.splitlines()[2].split(" | ")[0].strip() == "01:30:00"


def test_job_identity_records_precision_and_follows_a_run_while_nothing_is_committed(tmp_path):
    """An OUT whose first run stopped before its first commit refused a rerun with other settings; bf16 and
    fp32 rows could be mixed in one OUT (--precision was not part of the job's identity)."""
    import dataclasses

    from jobs.models import resolve_bundle
    from jobs.runner import check_job_identity
    from jobs.spec import JobSpec

    out, w = writer_for(tmp_path)
    bundle = resolve_bundle(None, allow_untrained=True)
    spec = JobSpec(inputs=["x.mp4"], out=str(out.root), allow_untrained=True, top_k=2)
    check_job_identity(out, bundle, spec, "bf16")
    check_job_identity(out, bundle, dataclasses.replace(spec, top_k=3), "bf16")  # nothing committed: the new run's
    assert out.read_json("_job/job.json")["top_k"] == 3
    assert out.read_json("_job/job.json")["bundle"] == "untrained"  # it said "default" (a helper)
    other_out, _ = writer_for(tmp_path / "other")
    check_job_identity(other_out, bundle, dataclasses.replace(spec, model="bundles/mine", allow_untrained=False), "bf16")
    assert other_out.read_json("_job/job.json")["bundle"] == "bundles/mine"  # it said "vidpipe train" for any trained
    w.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    for other, named in ((dataclasses.replace(spec, top_k=2), "top_k 3 there, 2 now"),
                         (dataclasses.replace(spec, top_k=3, precision="fp32"), "precision 'bf16' there, 'fp32' now")):
        with pytest.raises(ConfigError, match=f"already holds results of another job \\(differs in: {named};"):
            check_job_identity(out, bundle, other, other.precision if other.precision != "auto" else "bf16")
    # a job.json written before precision was recorded, or that recorded the flag "auto", does not say which: the
    # same command resumes, and the job keeps to this run's precision from then on
    job = out.read_json("_job/job.json")
    for recorded, now in ((None, "fp32"), ("auto", "bf16")):
        if recorded is None:
            del job["precision"]
        else:
            job["precision"] = recorded
        out.write_json("_job/job.json", job)
        check_job_identity(out, bundle, dataclasses.replace(spec, top_k=3, precision=now), now)
        assert out.read_json("_job/job.json")["precision"] == now
        other = "bf16" if now == "fp32" else "fp32"
        with pytest.raises(ConfigError, match=f"precision '{now}' there, '{other}' now"):
            check_job_identity(out, bundle, dataclasses.replace(spec, top_k=3, precision=other), other)


def test_another_models_top_k_is_said_to_follow_its_labels(tmp_path):
    """The default bundle's job (4 labels: top_k 4), rerun with --allow-untrained and no --top-k, was refused as
    differing in "bundle_fingerprint; model_id; top_k 4 there, 5 now": a flag the user never passed, as it read."""
    import dataclasses

    from jobs.models import resolve_bundle
    from jobs.runner import check_job_identity
    from jobs.spec import JobSpec

    out, w = writer_for(tmp_path)
    default = resolve_bundle(None, allow_untrained=False)
    spec = JobSpec(inputs=["x.mp4"], out=str(out.root))
    check_job_identity(out, default, spec, "fp32")
    assert out.read_json("_job/job.json")["top_k"] == len(default.labels) < spec.top_k
    w.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    untrained = resolve_bundle(None, allow_untrained=True)
    assert len(untrained.labels) >= spec.top_k
    for top_k in (spec.top_k, 3):
        with pytest.raises(ConfigError, match=re.escape(
                f"(differs in: model_id; top_k 4 there, {top_k} now (at most each model's number "
                "of labels); it has model ")):
            check_job_identity(out, untrained, dataclasses.replace(spec, allow_untrained=True, top_k=top_k), "fp32")
    with pytest.raises(ConfigError, match=re.escape("(differs in: top_k 4 there, 3 now; it has model ")):
        check_job_identity(out, default, dataclasses.replace(spec, top_k=3), "fp32")  # the same model: a flag


def test_a_top_k_past_the_bundles_labels_is_the_same_job_whatever_its_value(tmp_path):
    """--top-k 10 and then the default 5, with a bundle of 4 labels, give the same rows (all 4 labels): the rerun
    was refused as another job ("top_k 10 there, 5 now")."""
    import dataclasses

    from jobs.models import resolve_bundle
    from jobs.runner import check_job_identity
    from jobs.spec import JobSpec

    out, w = writer_for(tmp_path)
    bundle = resolve_bundle(None, allow_untrained=True)
    n = len(bundle.labels)
    spec = JobSpec(inputs=["x.mp4"], out=str(out.root), allow_untrained=True, top_k=n + 2)
    check_job_identity(out, bundle, spec, "bf16")
    w.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    for top_k in (n, n + 6, n + 16):
        check_job_identity(out, bundle, dataclasses.replace(spec, top_k=top_k), "bf16")
    with pytest.raises(ConfigError, match=f"top_k {n} there, {n - 1} now"):
        check_job_identity(out, bundle, dataclasses.replace(spec, top_k=n - 1), "bf16")
    out.write_json("_job/job.json", out.read_json("_job/job.json") | {"top_k": n + 6})  # recorded as given, before
    check_job_identity(out, bundle, dataclasses.replace(spec, top_k=n + 16), "bf16")


def test_a_job_resumed_where_precision_auto_means_another_goes_on_in_the_jobs_precision(tmp_path, monkeypatch):
    """job.json recorded the flag 'auto': a job begun on a bf16 machine went on in float32 on another (4 of the
    film's 597 labels differ between them), mixing both in one OUT."""
    import pipeline.precision as precision
    from jobs.models import resolve_bundle
    from jobs.runner import JobRunner, check_job_identity
    from jobs.spec import JobSpec

    out, w = writer_for(tmp_path)
    spec = JobSpec(inputs=["x.mp4"], out=str(out.root), allow_untrained=True, device="cpu")
    said: list[str] = []
    runner = JobRunner(spec)
    runner._say = said.append  # type: ignore[method-assign]
    bundle = resolve_bundle(None, allow_untrained=True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert runner._job_precision(out, bundle) == "bf16"  # a new job: this machine's
    check_job_identity(out, bundle, spec, "bf16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # resumed on a machine without it
    assert runner._job_precision(out, bundle) == "fp32"  # nothing committed yet: the new run's own
    w.add_row(head_row("v1", 0, 0, 2, is_last=True, n_total=2))
    w.flush()
    assert runner._job_precision(out, bundle) == "bf16"
    assert said == ["vidpipe: --precision auto: resuming in the job's precision, bf16 (this machine has no GPU and "
                    "no CPU with native bf16: slower here); a new --out starts a job in fp32"]


def test_precision_auto_is_decided_once_for_a_job_from_every_node(monkeypatch):
    """Each worker decided 'auto' for itself: a cluster of CPUs with and without native bf16 wrote both."""
    import jobs.plan as plan
    import jobs.runner as runner
    from pipeline.precision import cpu_has_native_bf16

    here = "bf16" if cpu_has_native_bf16() else "fp32"
    assert plan.job_precision("auto", "cpu", None) == here
    assert plan.job_precision("fp32", "auto", None) == "fp32"
    assert plan.job_precision("bf16", "cpu", "10.0.0.5:6379") == "bf16"  # as given: no node is asked
    for answers, nodes, device, expected in (([True, True], [(2.0, 0.0, 0.0)] * 2, "auto", "bf16"),
                                             ([True, False], [(2.0, 0.0, 0.0)] * 2, "auto", "fp32"),
                                             ([], [], "auto", "fp32"),
                                             ([True, False], [(2.0, 1.0, 0.0), (2.0, 0.0, 0.0)], "auto", "bf16"),
                                             ([True, False], [(2.0, 1.0, 0.0), (2.0, 0.0, 0.0)], "cpu", "fp32"),
                                             ([True, None], [(2.0, 0.0, 0.0)] * 2, "auto", "fp32"),  # one late
                                             ([], [(0.0, 0.0, 0.0)], "cuda", "bf16")):  # GPUs to come
        monkeypatch.setattr(plan, "_nodes_native_bf16", lambda answers=answers: answers)
        monkeypatch.setattr(plan, "cluster_nodes", lambda nodes=nodes: nodes)
        monkeypatch.setattr(runner, "init_ray", lambda address: None)  # the cluster's nodes are the ones above
        assert plan.job_precision("auto", device, "10.0.0.5:6379") == expected, (answers, nodes, device)


def test_an_error_that_quotes_a_damage_word_in_a_name_or_the_sql_is_not_damage(tmp_path, monkeypatch):
    """An S3 network error quoting a bucket named 'corrupt-media' read as damage (repair would drop the commit);
    a typo in SQL naming a column 'checksum' made query read every page of OUT."""
    from jobs.output import looks_damaged

    key, bucket = "out/segments/part-1.parquet", "corrupt-media-lab"
    names = (f"{bucket}/{key}", f"s3://{bucket}/{key}", "segments/part-1.parquet", key, bucket)
    network = f"When reading information for key '{key}' in bucket '{bucket}': AWS Error NETWORK_CONNECTION"
    assert not looks_damaged(network, names)
    assert not looks_damaged(f"Could not open Parquet input source '{bucket}/{key}': slow down", names)
    assert looks_damaged(f"Could not open Parquet input source '{bucket}/{key}': Couldn't deserialize thrift: x",
                         names)
    out, _, _ = _two_commits(tmp_path)

    footers = OutputDir.damaged_files  # every query reads the footers; a SQL error must not make it read the pages

    def scanned(self, rels, *, pages=False):  # noqa: ANN001, ANN202
        assert not pages, "a SQL error made query read the committed files' pages"
        return footers(self, rels)

    monkeypatch.setattr(OutputDir, "damaged_files", scanned)
    with pytest.raises(ConfigError, match=r'query failed: Binder Error: .*"checksum"'):
        run_query(out.root, "SELECT checksum FROM segments")


def test_a_new_out_whose_table_folders_hold_other_files_is_refused(tmp_path):
    """'--out s3://archive' (or a local archive folder) wrote Parquet files beside the archive's own videos/*.mp4
    and segments/*.mp4: only Parquet files no commit names were refused."""
    from jobs.runner import JobRunner
    from jobs.spec import JobSpec
    from tests.conftest import SAMPLES

    archive = tmp_path / "archive"
    (archive / "videos").mkdir(parents=True)
    (archive / "videos" / "a.mp4").write_bytes(b"not ours")
    spec = JobSpec(inputs=[str(SAMPLES)], out=str(archive), allow_untrained=True, progress=False)
    with pytest.raises(ConfigError, match=r"cannot use --out .*archive: it is not a vidpipe output, and its videos/ "
                                          r"already holds files"):
        JobRunner(spec).run()
    assert sorted(p.name for p in archive.rglob("*")) == ["a.mp4", "videos"]  # nothing written, no _job/
    (archive / "videos" / "a.mp4").unlink()  # empty table folders are a new output's, hidden files do not count
    (archive / "videos" / ".DS_Store").write_bytes(b"x")
    OutputDir(archive).refuse_occupied_tables()


def test_a_rerun_tries_again_a_video_whose_every_failure_was_transient(tmp_path):
    """A cluster whose workers lacked the S3 settings failed every video with read_error ('Could not resolve
    host'); every later run skipped the whole archive as failed until --retry-failed."""
    out, w = writer_for(tmp_path)

    def fail(video_id, kind):  # noqa: ANN001, ANN202
        return {"video_id": video_id, "uri": f"/v/{video_id}.mp4", "error_stage": "decode", "error_kind": kind,
                "error_message": "x", "chunk_index": 0, "is_last": True}

    w.add_row(head_row("ok", 0, 0, 2, is_last=True, n_total=2))
    for video_id, kind in (("net", "read_error"), ("bad", "invalid_data"), ("both", "read_error")):
        w.add_row(fail(video_id, kind))
    w.flush()
    w2 = ResultWriter(out, model_id="m1", labels=LABELS)
    w2.add_row(fail("both", "invalid_data"))  # a later run found its bytes bad: that failure is the video's
    w2.add_row(fail("net", "read_error"))  # failed transiently again: still tried by the next rerun
    w2.flush()
    done, failed = out.finished_uris()
    assert sorted(u for u in ("/v/ok.mp4", "/v/net.mp4", "/v/bad.mp4", "/v/both.mp4") if u in done) == [
        "/v/bad.mp4", "/v/both.mp4", "/v/ok.mp4"]
    assert sorted(u for u in ("/v/net.mp4", "/v/bad.mp4", "/v/both.mp4") if u in failed) == ["/v/bad.mp4",
                                                                                           "/v/both.mp4"]
    assert len(out.finished_uris(include_failed=False)[0]) == 1
    from jobs.status import format_status, read_status

    status = read_status(str(out.root))  # as the rerun will see them
    assert (status.failed, status.failed_retried) == (3, 1)
    assert "3 failed (1 of them only with read errors, which a rerun tries again)" in format_status(status)


def test_a_failing_run_says_it_ended_only_after_its_last_commit(tmp_path, monkeypatch):
    """The run's state said 'failed' while it still committed what it had finished: on S3 that state releases
    OUT, and the next run's recovery deleted the staged files of the commit being written."""
    import jobs.runner as runner
    from jobs.progress import RunStatus
    from jobs.spec import JobSpec
    from tests.conftest import SAMPLES

    made: list[RunStatus] = []

    class Recorded(RunStatus):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            made.append(self)

    seen: list[str] = []

    def boom(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise RuntimeError("a wave failed")

    monkeypatch.setattr(runner, "RunStatus", Recorded)
    monkeypatch.setattr(runner.JobRunner, "_run_waves", boom)
    monkeypatch.setattr(runner.JobRunner, "_flush_what_is_complete", staticmethod(lambda w: seen.append(made[0].state)))
    spec = JobSpec(inputs=[str(SAMPLES)], out=str(tmp_path / "o"), allow_untrained=True, progress=False)
    with pytest.raises(RuntimeError, match="a wave failed"):
        runner.JobRunner(spec).run()
    assert seen == ["running"] and made[0].state == "failed"


def test_a_second_run_on_a_local_out_is_refused_naming_the_run_that_holds_it(tmp_path):
    # The holder's progress.json comes seconds after its lock: a run refused in between named the
    # previous run's progress ("run old-run") or, on a new OUT, "run None, pid None on None".
    out = OutputDir(tmp_path / "out")
    out.store.makedirs("_job")
    out.write_json("_job/progress.json", {"run_id": "old-run", "pid": 1, "host": "elsewhere"})
    with out.lock("new-run"):
        with pytest.raises(ConfigError, match=rf"writing to .*\(run new-run, pid {os.getpid()} on "):
            with OutputDir(tmp_path / "out").lock("third-run"):
                pass
    with OutputDir(tmp_path / "out").lock("third-run"):  # let go: the next run takes it
        pass


def test_status_rate_and_eta_leave_out_the_runs_start(tmp_path, monkeypatch):
    """25 s into a run whose first 15 s went to Ray and the models, then 2 videos finished per second: the
    average since the start (1.6 videos/s) gave an ETA far too long; the rate since the first result is 2."""
    import jobs.progress as progress_mod
    from jobs.progress import RunStatus
    from jobs.status import format_status, read_status

    clock = [1000.0]

    class Clock:  # the progress module's clock only
        time = staticmethod(lambda: clock[0])

    monkeypatch.setattr(progress_mod, "time", Clock)
    run = RunStatus("r1", inputs_total=140, inputs_finished=0, started=1000.0)
    clock[0] += 15.0
    run.done, run.video_seconds = 0, 0.0
    run.note_results()
    assert run.first_result_at is None  # nothing yet
    out, _ = writer_for(tmp_path)
    out.write_json("_job/progress.json", run.to_dict() | {"heartbeat": time.time()})
    s = read_status(str(out.root))
    # text said "rate: 0.00 video-s/s, 0.000 videos/s" where JSON said null (a helper)
    assert (s.videos_per_s, s.video_seconds_per_s, s.eta_s) == (None, None, None)
    assert "rate: not known yet (no video finished)" in format_status(s)
    run.done, run.video_seconds = 1, 4.0
    run.note_results()
    assert "steady_videos_per_s" not in run.to_dict()  # one result says nothing of the rate yet
    clock[0] += 10.0
    run.done, run.video_seconds = 21, 84.0
    run.note_results()
    run.heartbeat = clock[0]
    out.write_json("_job/progress.json", run.to_dict() | {"heartbeat": time.time()})  # (real clock) alive now
    s = read_status(str(out.root))
    assert (s.videos_per_s, s.video_seconds_per_s) == (2.0, 8.0)
    # 21 finished, none committed yet (a commit every 60 s): the ETA is for the 119 left, not the 140 pending
    assert (s.pending, s.finished_uncommitted) == (140, 21) and s.eta_s == pytest.approx(119 / 2.0)
    said = format_status(s)
    assert "140 pending (21 of them finished, to be committed) of the last run's 140 input videos" in said
    assert "videos/s done or failed (since its first video finished)" in said
    # once the run has ended its rate is its average, start included: 2 videos finished 0.03 s apart at the
    # end of a 13-s run said "34.312 videos/s (since its first video finished)"
    out.write_json("_job/progress.json", run.to_dict() | {"state": "finished"})
    s = read_status(str(out.root))
    assert (s.videos_per_s, s.rate_since_first_result) == (pytest.approx(21 / 25), False)


@pytest.mark.parametrize("fails", [OSError("the connection dropped"), KeyboardInterrupt("stopped by SIGTERM")])
def test_a_flush_broken_off_after_its_commit_record_is_not_committed_twice(tmp_path, monkeypatch, fails):
    """A flush that broke off while moving its files into place (an S3 error; a stop arriving there) left
    its videos ready, and the stop's own flush committed them a second time: every row twice."""
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    moves = []
    real_move = out.store.move

    def move(src, dst):  # noqa: ANN001, ANN202
        moves.append(src)
        if len(moves) == 1:
            raise fails
        return real_move(src, dst)

    monkeypatch.setattr(out.store, "move", move)
    with pytest.raises(type(fails)):
        w.flush()
    assert w.flush() is None  # what the runner does on its way out: nothing is left to commit
    assert len(out.commits()) == 1
    assert run_query(out.root, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 3
    assert w.segments_written == 3 and w.videos_done == 1
    out.recover()  # the next run moves the staged file into place
    assert run_query(out.root, "SELECT count(*) n, count(DISTINCT segment_index) k FROM segments").to_pylist() == [
        {"n": 3, "k": 3}]


@pytest.mark.parametrize("lands", ["at once", "never", "late"])
def test_a_commit_record_whose_write_broke_off_is_written_again_under_its_own_name(tmp_path, monkeypatch, lands):
    """A record's write that raised may land all the same, even after the retry (an S3 PUT timing out on the
    client): the stop's flush wrote the same videos under a second record, and every row came out twice. The
    record is written again under its own name, before the videos that finished since."""
    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    real_write = out.store.write_atomic
    late = []

    def write_atomic(rel, data):  # noqa: ANN001, ANN202
        if lands == "at once":
            real_write(rel, data)
        elif lands == "late":
            late.append((rel, data))
        raise OSError("the request timed out")

    monkeypatch.setattr(out.store, "write_atomic", write_atomic)
    with pytest.raises(OSError):
        w.flush()
    w.add_row(head_row("v2", 0, 0, 2, is_last=True, n_total=2))  # finished meanwhile
    monkeypatch.setattr(out.store, "write_atomic", real_write)
    again = w.flush()  # what the runner does on its way out
    for rel, data in late:  # the first write lands now
        real_write(rel, data)
    assert again is not None and again.n_videos == 1
    assert [c.n_videos for c in out.commits()] == [1, 1]
    assert w.segments_written == 5 and w.flush() is None
    out.recover()  # the next run
    rows = run_query(out.root, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


def test_a_claim_whose_read_fails_as_its_run_deletes_it_is_read_again(tmp_path, monkeypatch):
    """Three runs racing for an S3 OUT: one's claim, deleted while another read it, failed the read with
    moto's INTERNAL_FAILURE, and the reading run ended with a traceback (exit 1) instead of waiting."""
    out = OutputDir(tmp_path / "out")
    out.create()
    out.store.makedirs("_job/claims")
    out.store.write_atomic("_job/claims/run-b.json", json.dumps({"heartbeat": time.time()}).encode())
    out.store.write_atomic("_job/claims/run-c.json", json.dumps({"heartbeat": time.time()}).encode())
    real_read = out.store.read_text
    reads = []

    def read_text(rel):  # noqa: ANN001, ANN202
        reads.append(rel)
        if rel.endswith("run-b.json") and reads.count(rel) == 1:
            os.remove(out.store.full(rel))  # its run lets go as the read runs
            raise OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream")
        return real_read(rel)

    monkeypatch.setattr(out.store, "read_text", read_text)
    assert out._live_claims("run-a", {}, 30.0) == ["run-c"]


def test_a_driver_is_judged_ended_only_where_its_record_names_a_process_of_this_boot_and_pid_namespace(monkeypatch):
    """An S3 OUT's rerun takes over at once from a run whose driver is gone; it must never take a live run's OUT,
    whatever a record from another machine (its host name may be ours) or an older vidpipe holds, or where /proc
    does not show another user's processes (hidepid: a review found a live driver judged ended there)."""
    import subprocess
    import sys

    import jobs.progress
    from jobs.progress import driver_ended, process_start, this_process

    me = this_process()
    assert not driver_ended(me)  # alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = me | {"pid": child.pid, "pid_started": process_start(child.pid)}
    assert not driver_ended(record)
    with monkeypatch.context() as m:  # its /proc/PID/stat unreadable, as hidepid makes another user's
        m.setattr(jobs.progress, "process_start", lambda pid: None)
        assert not driver_ended(record)
        child.kill()
        child.wait()
        assert driver_ended(record)  # gone: kill(pid, 0) says so without /proc
    assert driver_ended(record)  # the same pid and start time are gone
    assert driver_ended(me | {"pid_started": -1})  # the pid now names another process (reused)
    for other in ({"boot_id": "another-boot"}, {"boot_id": None}, {"pid_ns": 1}, {"host": "elsewhere"},
                  {"pid_started": None}):
        assert not driver_ended(record | other), other  # cannot be known from here: the lease is waited out


def _three_commits(tmp_path):  # noqa: ANN001, ANN202
    out = OutputDir(tmp_path / "out")
    out.create()
    w = ResultWriter(out, model_id="m1", labels=LABELS)
    for i, n in enumerate((3, 2, 4)):
        w.add_row(head_row(f"v{i}", 0, 0, n, is_last=True, n_total=n))
        w.flush()
    return out, out.commits()


@pytest.mark.parametrize("damaged", ["a record", "a checkpoint"])
def test_repair_drops_a_damaged_commit_record_with_the_files_it_named(tmp_path, capsys, damaged):
    """A damaged commit record (bytes changed by hand or by a disk) made run, query and repair refuse OUT with
    "restore it from a backup": without one, the whole output was lost. repair now drops it with the files it named
    (their names carry its commit's name; a checkpoint's, every commit up to its last that no other record names),
    and a rerun does their videos again; the other commits stay."""
    from jobs.cli import main

    out, (c0, c1, c2) = _three_commits(tmp_path)
    commits = out.root / "_job" / "commits"
    if damaged == "a record":
        record, gone, kept = commits / f"{c1.name}.json", [c1], [c0, c2]
    else:  # as _compact folds records: the checkpoint first, then the records it holds go
        record, gone, kept = commits / f"checkpoint-{c1.name}.json", [c0, c1], [c2]
        out._write_checkpoint(record.name, [json.loads(c.to_json()) for c in (c0, c1)])
        for c in (c0, c1):
            (commits / f"{c.name}.json").unlink()
    record.write_bytes(record.read_bytes()[:-7] + b"\xff\x00garbage")  # not even UTF-8
    with pytest.raises(ConfigError, match="is damaged .*run 'vidpipe repair .*' to drop it with the files it named") as e:
        out.commits()
    assert f"run 'vidpipe repair {out.uri}'" in str(e.value)  # the OUT, not the word (a helper)
    files = sorted(f"{t}/{n}" for c in gone for t, n in c.files.items())
    before = sorted(str(p.relative_to(out.root)) for p in out.root.rglob("*.parquet"))

    assert main(["repair", str(out.root), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert f"would drop the damaged commit record {record} and the {len(files)} data files it named" in said, said
    assert sorted(str(p.relative_to(out.root)) for p in out.root.rglob("*.parquet")) == before  # nothing changed
    assert all(str(out.root / f) in said for f in files)

    assert main(["repair", str(out.root)]) == 0
    assert f"dropped the damaged commit record {record}" in capsys.readouterr().out
    assert [c.name for c in out.commits()] == [c.name for c in kept]
    assert sorted(str(p.relative_to(out.root)) for p in out.root.rglob("*.parquet")) == \
        sorted(set(before) - set(files))
    assert out.finished_video_ids() == {f"v{i}" for i, c in enumerate((c0, c1, c2)) if c in kept}
    out.recover()  # what a rerun does first: nothing left to refuse
    assert run_query(out.root, "SELECT count(*) AS n FROM segments").to_pylist() == [
        {"n": sum(c.n_segments for c in kept)}]
    assert main(["repair", str(out.root)]) == 0 and "nothing to drop" in capsys.readouterr().out


def test_tables_read_by_a_query_are_those_it_names():
    from jobs.query import tables_read_by

    assert tables_read_by("SELECT 1") == set()
    assert tables_read_by("SELECT label, count(*) FROM Segments GROUP BY 1") == {"segments"}
    assert tables_read_by('SELECT * FROM "videos" v JOIN segments s USING (video_id)') == {"segments", "videos"}
    assert tables_read_by("SELECT * FROM failures") == {"failures", "videos"}  # the view leaves finished ones out
    assert tables_read_by("SELECT count(*) FROM failures_log") == {"failures"}
    assert tables_read_by("SELECT 'segments' AS s -- videos") == {"segments", "videos"}  # more read, never fewer
    assert tables_read_by("SELECT * FROM my_segments_2, videos_x") == set()


def test_a_query_reads_the_footers_of_the_tables_it_names_only_and_names_a_missing_file_of_any(tmp_path, capsys):
    """A query read every committed footer of all three tables, whatever it asked (on S3 a GET each: `SELECT 1`
    over 100 commits took 419 requests); now those of the tables it reads. A committed file that is gone is still
    named whatever the query (a listing), and status, a look at OUT's health, still reads every footer."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, first, second = _two_commits(tmp_path)
    damaged = out.table_dir("segments") / second.files["segments"]
    damaged.write_bytes(b"")
    assert run_query(out.root, "SELECT count(*) AS n FROM videos").to_pylist() == [{"n": 2}]
    assert run_query(out.root, "SELECT 1 AS one").to_pylist() == [{"one": 1}]
    for argv in (["query", str(out.root), "SELECT count(*) FROM segments"], ["status", str(out.root)]):
        assert main(argv) == EXIT_USAGE, argv
        assert f"is damaged: {damaged} cannot be read" in capsys.readouterr().err
    damaged.unlink()
    assert main(["query", str(out.root), "SELECT count(*) FROM videos"]) == EXIT_USAGE
    assert str(damaged) in capsys.readouterr().err


def test_repair_of_damaged_records_refuses_foreign_files_first_and_drops_overlapping_records_once(tmp_path, capsys):
    """A review found repair dropping a damaged record, then refusing OUT for a file no commit names ("Nothing was
    deleted"); and a damaged checkpoint with a damaged record it had folded (a crash in the fold) both naming one
    file, whose second move failed (exit 1)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    out, (c0, c1, c2) = _three_commits(tmp_path)
    commits = out.root / "_job" / "commits"
    out._write_checkpoint(f"checkpoint-{c1.name}.json", [json.loads(c.to_json()) for c in (c0, c1)])
    (commits / f"{c0.name}.json").unlink()  # the fold stopped here: c1's record is still there
    for record in (commits / f"checkpoint-{c1.name}.json", commits / f"{c1.name}.json"):
        record.write_bytes(b"{\"commits\": [")
    foreign = out.table_dir("segments") / "theirs.parquet"
    foreign.write_bytes(b"another tool's")
    def files() -> list[tuple[str, bytes]]:  # the data files and records, where they are, with their bytes
        return sorted((str(p.relative_to(out.root)), p.read_bytes()) for p in out.root.rglob("*")
                      if p.suffix in (".parquet", ".json") and p.name != "progress.json")

    before = files()
    assert main(["repair", str(out.root)]) == EXIT_USAGE
    assert f"holds data files that vidpipe cannot account for ({foreign})" in capsys.readouterr().err
    assert files() == before  # nothing changed
    foreign.unlink()
    assert main(["repair", str(out.root), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert said.count(out.table_dir("segments").name + "/" + c1.files["segments"]) == 1, said  # listed once
    assert "would drop 2 damaged commit records; run without --dry-run" in said
    assert main(["repair", str(out.root)]) == 0
    assert "dropped 2 damaged commit records; rerun" in capsys.readouterr().out
    assert [c.name for c in out.commits()] == [c2.name] and out.finished_video_ids() == {"v2"}
