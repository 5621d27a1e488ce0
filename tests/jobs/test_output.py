"""The commit protocol: complete videos only, exactly once, recovery after a crash at any step."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.output import OutputDir, ResultWriter
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
    # A crash before the commit record: a data file no commit names.
    (out.table_dir("segments") / "part-orphan.parquet").write_bytes(b"partial")
    (out.staging_dir / "part-orphan2.parquet").write_bytes(b"partial")
    # Readers already see exactly the committed rows (staged files of committed flushes included).
    assert run_query(out.root, "SELECT count(*) n FROM segments").column("n")[0].as_py() == 5
    out.recover()
    assert not (out.table_dir("segments") / "part-orphan.parquet").exists()
    assert list(out.staging_dir.iterdir()) == []
    assert all((out.table_dir(t) / n).exists() for t, n in commit.files.items())
    rows = run_query(out.root, "SELECT video_id, count(*) n FROM segments GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"video_id": "v1", "n": 3}, {"video_id": "v2", "n": 2}]


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
    with pytest.raises(ConfigError, match="not a vidpipe output"):
        connect(tmp_path / "elsewhere")


def test_format_table_csv_json():
    import pyarrow as pa

    t = pa.table({"label": ["a", "b"], "score": [0.5, 0.25], "topk": [["a", "b"], ["b"]]})
    text = format_table(t, "table")
    assert "label" in text.splitlines()[0] and "(2 rows)" in text
    assert format_table(t, "csv").splitlines()[0] == "label,score,topk"
    assert json.loads(format_table(t, "json").splitlines()[1])["label"] == "b"


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


def test_damaged_job_files_are_named_errors_not_tracebacks(tmp_path):
    """A commit record or job.json changed by something else: query and run say which file; a damaged
    heartbeat (progress.json) only loses the run's rates."""
    from jobs.status import read_status
    from pipeline.errors import ConfigError

    out, w = writer_for(tmp_path)
    w.add_row(head_row("v1", 0, 0, 3, is_last=True, n_total=3))
    w.flush()
    out.write_json("_job/job.json", {"model_id": "m1"})
    (out.job_dir / "progress.json").write_text("{not json")
    assert read_status(str(out.root)).done == 1
    (out.job_dir / "job.json").write_text("")
    with pytest.raises(ConfigError, match=r"job\.json is damaged"):
        out.read_json("_job/job.json")
    record = sorted(out.commits_dir.glob("*.json"))[0]
    record.write_text("")
    with pytest.raises(ConfigError, match=f"{record.name} is damaged .*a commit record names the files"):
        run_query(out.root, "SELECT count(*) FROM segments")


def test_csv_keeps_floats_exact_and_lists_unambiguous():
    """CSV is for export: 1234567.891 was written as 1.23457e+06, and a label with a comma could not be told
    from two labels (found by QA)."""
    import csv
    import io

    import pyarrow as pa

    t = pa.table({"start_s": [1234567.891], "topk": [["rock, pop", 'say "hi"']]})
    row = list(csv.reader(io.StringIO(format_table(t, "csv"))))[1]
    assert float(row[0]) == 1234567.891 and json.loads(row[1]) == ["rock, pop", 'say "hi"']
