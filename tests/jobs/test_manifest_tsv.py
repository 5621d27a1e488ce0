"""TSV manifests: a header row and one entry a line, tab-separated, read with the CSV manifest's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.discover import check_inputs, discover
from jobs.manifest import check_manifest, read_manifest
from pipeline.errors import ConfigError


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_tsv_manifest_entries_resolve_like_csv(tmp_path):
    """Relative to the manifest's folder, absolute, file:// and remote URIs; a comma belongs to the path."""
    lists = tmp_path / "lists"
    rel = _touch(tmp_path / "v" / "a, take 2.mp4")  # a comma: only a TSV reads this as one field
    absolute = _touch(tmp_path / "elsewhere" / "b.mp4")
    rows = ["id\tURI\tnote", f"1\t../v/{rel.name}\tx", f"2\t{absolute}\t", f"3\tfile://{absolute}\t",
            "4\ts3://bucket/k/c.mp4\t", "", "\t \t"]  # a blank line and a row of blank cells: skipped
    (lists / "list.tsv").parent.mkdir()
    (lists / "list.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")  # with a byte-order mark
    check_manifest(lists / "list.tsv")
    refs = list(read_manifest(lists / "list.tsv"))
    assert [r.uri for r in refs] == [str(rel.resolve()), str(absolute.resolve()), str(absolute.resolve()),
                                     "s3://bucket/k/c.mp4"]
    # the same entries as a CSV give the same videos, ids included
    csv_rows = ["id,uri,note", f'1,"../v/{rel.name}",x', f"2,{absolute},", f"3,file://{absolute},",
                "4,s3://bucket/k/c.mp4,"]
    (lists / "list.csv").write_text("\n".join(csv_rows) + "\n")
    assert list(read_manifest(lists / "list.csv")) == refs
    # a row with an id but a blank URI is not skipped in silence: its video would never run
    (lists / "list.tsv").write_text("\n".join([*rows, "5\t \tblank entry"]) + "\n")
    with pytest.raises(ConfigError, match=r"list\.tsv line 8: the 'URI' cell is empty"):
        list(read_manifest(lists / "list.tsv"))


def test_tsv_manifest_takes_the_first_uri_column_in_order(tmp_path):
    a, b = _touch(tmp_path / "a.mp4"), _touch(tmp_path / "b.mp4")
    (tmp_path / "m.tsv").write_text(f"file\tvideo\n{a.name}\t{b.name}\n")
    assert [r.uri for r in read_manifest(tmp_path / "m.tsv")] == [str(b.resolve())]  # video before file


def test_tsv_manifest_errors_name_the_file_and_what_to_do(tmp_path):
    (tmp_path / "nocol.tsv").write_text("name\tsize\nx.mp4\t3\n")
    with pytest.raises(ConfigError, match=r"nocol\.tsv: no column named one of uri, path, video, url, file "
                                          r"in header \['name', 'size'\]; add a 'uri' column"):
        check_manifest(tmp_path / "nocol.tsv")
    # a comma-separated file named .tsv has one column "uri,note": no uri column
    (tmp_path / "commas.tsv").write_text("uri,note\na.mp4,x\n")
    with pytest.raises(ConfigError, match=r"commas\.tsv: no column named one of"):
        list(read_manifest(tmp_path / "commas.tsv"))
    (tmp_path / "short.tsv").write_text("note\turi\nx\ta.mp4\ny\n")
    with pytest.raises(ConfigError, match=r"short\.tsv line 3: missing the 'uri' column"):
        list(read_manifest(tmp_path / "short.tsv"))
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"unknown manifest type '\.json'; use \.txt, \.csv, \.tsv or \.parquet"):
        check_manifest(tmp_path / "m.json")


def test_a_tsv_input_is_a_manifest(tmp_path):
    clip = _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "list.tsv").write_text("uri\nv/a.mp4\n")
    check_inputs([str(tmp_path / "list.tsv")])
    assert [r.uri for r in discover([str(tmp_path / "list.tsv")])] == [str(clip.resolve())]


def test_bytes_that_are_not_utf8_and_nul_bytes_are_named_by_their_line(tmp_path):
    """Both stopped the whole manifest with a message naming no line ("embedded null byte")."""
    from jobs.manifest import ManifestRowError

    a = _touch(tmp_path / "a.mp4")
    (tmp_path / "m.txt").write_bytes(b"a.mp4\n# caf\xc3\xa9 is fine\n\ncaf\xe9.mp4\n")
    (tmp_path / "m.csv").write_bytes(b"uri,note\r\na.mp4,x\r\nb\x00.mp4,y\r\n")
    (tmp_path / "mac.csv").write_bytes(b"uri,note\ra.mp4,x\rcaf\xe9.mp4,y\r")  # CR-only lines (Mac spreadsheets)
    for manifest, line, what in (("m.txt", 4, "not UTF-8 text"), ("m.csv", 3, "the entry holds a NUL byte"),
                                 ("mac.csv", 3, "not UTF-8 text")):
        with pytest.raises(ManifestRowError, match=f"manifest .*{manifest} line {line}: {what}"):
            list(read_manifest(tmp_path / manifest))
    (tmp_path / "mac.csv").write_bytes(b"uri,note\ra.mp4,x\r")
    assert [r.uri for r in read_manifest(tmp_path / "mac.csv")] == [str(a.resolve())]
