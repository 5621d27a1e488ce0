import re
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.discover import check_inputs, count_videos, discover, make_video_id, slug_source
from jobs.manifest import ManifestRowError, read_manifest
from pipeline.errors import ConfigError
from pipeline.media import ChunkingSpec, SamplingSpec


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_folder_is_searched_recursively_in_sorted_order(tmp_path):
    _touch(tmp_path / "b" / "z.mp4")
    _touch(tmp_path / "a.MKV")
    _touch(tmp_path / "b" / "notes.txt")
    _touch(tmp_path / "b" / ".hidden.mp4")
    refs = list(discover([str(tmp_path)]))
    assert [Path(r.uri).name for r in refs] == ["a.MKV", "z.mp4"]
    assert refs[1].video_id.startswith("b__z.mp4-")


def test_tape_and_camcorder_formats_are_found_in_folders(tmp_path):
    """A folder of DV tape captures or camcorder MPEG-PS files (.dv, .mod, .tod) was said to hold no video file,
    although each named alone was labelled (found by a helper)."""
    names = ["a.dv", "b.m2v", "c.m2p", "d.MOD", "e.tod", "f.asf", "g.f4v", "h.y4m"]
    for name in names:
        _touch(tmp_path / name)
    assert [Path(r.uri).name for r in discover([str(tmp_path)])] == names


def test_each_input_once_and_stable_ids(tmp_path):
    f = _touch(tmp_path / "clip one.mp4")
    refs = list(discover([str(f), str(tmp_path), str(tmp_path / "*.mp4")]))
    assert len(refs) == 1
    assert refs[0].video_id == list(discover([str(f)]))[0].video_id
    assert " " not in refs[0].video_id and "/" not in refs[0].video_id


def test_glob_and_empty_glob(tmp_path):
    _touch(tmp_path / "x1.mp4")
    _touch(tmp_path / "x2.webm")
    assert len(list(discover([str(tmp_path / "x*")]))) == 2
    with pytest.raises(ConfigError, match="matches no files"):
        list(discover([str(tmp_path / "nothing*.mp4")]))


def test_a_glob_of_manifests_reads_them_and_a_glob_of_other_files_is_refused(tmp_path):
    """'lists/*.csv' ran nothing and exited 0, as did a pattern matching only notes."""
    a, b = _touch(tmp_path / "v" / "a.mp4"), _touch(tmp_path / "v" / "b.mp4")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m1.csv").write_text("uri\n../v/a.mp4\n")
    (tmp_path / "lists" / "m2.csv").write_text("uri\n../v/b.mp4\n")
    (tmp_path / "v" / "notes.txt").write_text("not a list of videos\n")
    pattern = str(tmp_path / "lists" / "m*.csv")
    check_inputs([pattern])
    assert [r.uri for r in discover([pattern])] == [str(a.resolve()), str(b.resolve())]
    # a .txt that a pattern for everything matches is a note, not a manifest
    assert [r.uri for r in discover([str(tmp_path / "v" / "*")])] == [str(a.resolve()), str(b.resolve())]
    with pytest.raises(ConfigError, match=r"input pattern '.*notes\*' matches 1 file but no video file .*, and "
                                          "its files are not read as manifests unless the pattern ends in .txt"):
        check_inputs([str(tmp_path / "v" / "notes*")])
    (tmp_path / "v" / "notes.txt").write_text("")  # '*.txt' asks for manifests: an empty one is named, as if named
    with pytest.raises(ConfigError, match=r"manifest .*notes\.txt lists no videos"):
        check_inputs([str(tmp_path / "v" / "*.txt")])


def test_a_glob_that_matches_only_folders_without_videos_is_refused(tmp_path):
    """Such a folder named is refused; matched by a glob it ran a job of nothing and exited 0."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("uri\n../v/a.mp4\n")
    (tmp_path / "lists" / ".hidden").mkdir()
    _touch(tmp_path / "lists" / ".hidden" / "x.mp4")  # hidden: not searched
    for pattern, what in (("em*", "1 folder without video files"), ("*s", "1 folder without video files"),
                          ("*", "2 folders without video files")):
        with pytest.raises(ConfigError, match=f"input pattern '.*{re.escape(pattern)}' matches {what} but no video "
                                              "file .*; check the pattern$"):
            check_inputs([str(tmp_path / pattern)])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match=r"matches 1 file and 2 folders without video files but no video file .*, "
                                          "and its files are not read as manifests"):
        check_inputs([str(tmp_path / "*")])
    clip = _touch(tmp_path / "empty" / "deep" / "a.mp4")  # a video anywhere below a matched folder: it runs
    check_inputs([str(tmp_path / "*")])
    assert [r.uri for r in discover([str(tmp_path / "*")])] == [str(clip.resolve())]


def test_missing_plain_file_is_kept_for_a_failure_row(tmp_path):
    refs = list(discover([str(tmp_path / "gone.mp4")]))
    assert len(refs) == 1 and refs[0].uri.endswith("gone.mp4")


def test_manifests_txt_csv_parquet_relative_to_manifest(tmp_path):
    a = _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "m.txt").write_text("# comment\n\nv/a.mp4\ns3://bucket/k/b.mp4\n")
    refs = list(discover([str(tmp_path / "m.txt")]))
    assert [r.uri for r in refs] == [str(a.resolve()), "s3://bucket/k/b.mp4"]
    (tmp_path / "m.csv").write_text("id,uri\n1,v/a.mp4\n")
    assert [r.uri for r in discover([str(tmp_path / "m.csv")])] == [str(a.resolve())]
    pq.write_table(pa.table({"path": ["v/a.mp4"]}), tmp_path / "m.parquet")
    assert [r.uri for r in discover([str(tmp_path / "m.parquet")])] == [str(a.resolve())]
    pq.write_table(pa.table({"path": pa.array([b"v/a.mp4"], pa.binary())}), tmp_path / "m.parquet")
    assert [r.uri for r in discover([str(tmp_path / "m.parquet")])] == [str(a.resolve())]  # not "b'v/a.mp4'"
    for column, what in ((pa.array(["v/a.mp4", "v/\x00.mp4"]), "the entry holds a NUL byte"),
                         (pa.array([b"v/a.mp4", b"\xff"], pa.binary()), "the 'path' value is bytes that are not UTF-8"),
                         (pa.array([1, 2]), "the 'path' column holds int values")):
        pq.write_table(pa.table({"path": column}), tmp_path / "m.parquet")
        with pytest.raises(ManifestRowError, match=f"manifest .*m.parquet row {1 if 'int' in what else 2}: {what}"):
            list(discover([str(tmp_path / "m.parquet")]))
    for bad, what in ((None, "null"), (" ", "empty")):  # a row without its video is not skipped in silence
        pq.write_table(pa.table({"n": [1, 2], "path": ["v/a.mp4", bad]}), tmp_path / "m.parquet")
        with pytest.raises(ManifestRowError, match=f"manifest .*m.parquet row 2: the 'path' value is {what}; "):
            list(discover([str(tmp_path / "m.parquet")]))
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(ConfigError, match="uri"):
        list(discover([str(tmp_path / "bad.csv")]))


def test_video_id_is_sanitised_and_distinct():
    a = make_video_id("/x/a b/c.mp4", "a b/c.mp4")
    b = make_video_id("/y/a b/c.mp4", "a b/c.mp4")
    assert a != b and a.startswith("a_b__c.mp4-")
    assert ".." not in make_video_id("/x/../../etc", "../../etc")


def test_a_folder_without_videos_is_refused_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "docs" / "sub" / "notes.txt")
    for folder in ("empty", "docs"):
        with pytest.raises(ConfigError, match=f"input folder '.*{folder}' holds no video files"):
            check_inputs([str(tmp_path / "ok.mp4"), str(tmp_path / folder)])
    _touch(tmp_path / "docs" / "sub" / "deep" / "clip.webm")
    check_inputs([str(tmp_path / "docs"), f"file://{tmp_path / 'docs'}"])


def test_manifests_with_a_byte_order_mark(tmp_path):
    """Spreadsheet programs start UTF-8 files with a BOM; it is not part of the first entry or column."""
    clip = _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "list.txt").write_text("v/a.mp4\n", encoding="utf-8-sig")
    (tmp_path / "list.csv").write_text("uri,note\nv/a.mp4,x\n", encoding="utf-8-sig")
    for manifest in ("list.txt", "list.csv"):
        refs = list(discover([str(tmp_path / manifest)]))
        assert [r.uri for r in refs] == [str(clip.resolve())]


def test_a_file_uri_in_a_manifest_is_the_same_video_as_its_path(tmp_path):
    clip = _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "list.txt").write_text(f"file://{clip}\n{tmp_path}/v/../v/a.mp4\n")
    refs = list(discover([str(tmp_path / "list.txt"), str(clip)]))
    assert [r.uri for r in refs] == [str(clip.resolve())]


def test_an_existing_file_whose_name_looks_like_a_pattern_is_itself(tmp_path):
    """'clip[1].mp4' is a file, not the pattern that matches 'clip1.mp4' beside it (QA found the other file
    labelled instead)."""
    from jobs.discover import discover

    (tmp_path / "clip[1].mp4").write_bytes(b"x")
    (tmp_path / "clip1.mp4").write_bytes(b"y")
    refs = list(discover([str(tmp_path / "clip[1].mp4")]))
    assert [Path(r.uri.removeprefix("file://")).name for r in refs] == ["clip[1].mp4"]


def test_manifests_that_list_nothing_or_lack_the_column_say_so(tmp_path):
    """An empty manifest ran nothing with status 0 (and made OUT); a Parquet manifest without a uri column
    was called 'not a readable Parquet file'."""
    empty = tmp_path / "empty.csv"
    empty.write_text("uri,note\n\n")
    (tmp_path / "comments.txt").write_text("# nothing yet\n\n")
    for m in (empty, tmp_path / "comments.txt"):
        with pytest.raises(ConfigError, match=f"manifest {m} lists no videos"):
            check_inputs([str(m)])
    pq.write_table(pa.table({"name": ["a.mp4"]}), tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match=r"m.parquet: no column named one of uri, .*columns are \['name'\]"):
        check_inputs([str(tmp_path / "m.parquet")])


def test_a_dangling_link_in_a_folder_is_recorded_as_itself(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "gone.mp4").symlink_to(tmp_path / "elsewhere" / "target.mp4")
    assert [r.uri for r in discover([str(tmp_path / "v")])] == [str(tmp_path / "v" / "gone.mp4")]


def test_counting_the_inputs_counts_the_finished_ones_too(tmp_path):
    from jobs.idset import IdSet

    a, b = _touch(tmp_path / "v" / "a.mp4"), _touch(tmp_path / "v" / "b.mp4")
    assert count_videos([str(tmp_path / "v"), str(a)]) == (2, 0)
    assert count_videos([str(tmp_path / "v")], IdSet([str(b.resolve()), "/elsewhere/c.mp4"])) == (2, 1)


def test_a_bad_manifest_row_is_named_by_its_line_in_the_file(tmp_path):
    """A quoted field spanning two lines made the row count and the file's line numbers differ."""
    m = tmp_path / "m.csv"
    m.write_text('note,uri\n"two\nlines",a.mp4\nshort\n')
    with pytest.raises(ConfigError, match=r"m\.csv line 4: missing the 'uri' column"):
        list(discover([str(m)]))


def test_an_empty_uri_cell_is_named_and_a_row_of_blank_cells_skipped(tmp_path):
    """A row whose path was left out used to be skipped silently: that video was never run."""
    _touch(tmp_path / "a.mp4")
    m = tmp_path / "m.csv"
    m.write_text("uri,label\na.mp4,x\n,,\n , y\n")
    with pytest.raises(ConfigError, match=r"m\.csv line 4: the 'uri' cell is empty; fill in"):
        list(discover([str(m)]))
    m.write_text("uri,label\na.mp4,x\n,\n \t, \n")  # spreadsheet exports end with rows of empty cells
    assert [r.uri for r in discover([str(m)])] == [str((tmp_path / "a.mp4").resolve())]


def test_file_names_that_are_not_utf8_and_percent_encoded_file_uris(tmp_path, shared_media):
    """A name with a byte that is not UTF-8 stopped the whole job (UnicodeEncodeError hashing its id, exit 1);
    a manifest's file:///a%20b.mp4 (what Path.as_uri() writes) was looked up with the %20 left in."""
    import os
    import shutil

    from pipeline.inputs import local_path
    from workers.decode_stage import DecodeStage

    folder = tmp_path / "v"
    folder.mkdir()
    odd = os.fsdecode(b"bad\xffbyte.mp4")
    shutil.copy(shared_media / "bbb_5s_51.mp4", folder / odd)
    shutil.copy(shared_media / "bbb_5s_51.mp4", folder / "sp ace é.mp4")
    refs = {r.uri: r for r in discover([str(folder)])}
    bad_uri = f"file://{folder.resolve()}/bad%FFbyte.mp4"
    assert sorted(refs) == sorted([bad_uri, str((folder / "sp ace é.mp4").resolve())])
    assert refs[bad_uri].video_id.startswith("bad_byte.mp4-")
    assert local_path(bad_uri) == str((folder / odd).resolve()) and os.path.isfile(local_path(bad_uri))
    # the same files through a manifest of file:// URIs: the same URIs (the done-set's keys)
    (tmp_path / "m.txt").write_text("".join(f"{(folder / n).as_uri()}\n" for n in ("sp ace é.mp4",))
                                    + f"{bad_uri}\n")
    assert {r.uri for r in discover([str(tmp_path / "m.txt")])} == set(refs)
    # a manifest in a folder whose name is not UTF-8, and one named by a percent-encoded file:// URI
    odd_dir = tmp_path / os.fsdecode(b"lists\xfe")
    odd_dir.mkdir()
    shutil.copy(shared_media / "bbb_5s_51.mp4", odd_dir / "c.mp4")
    (odd_dir / "m.txt").write_text("c.mp4\n")
    (uri,) = [r.uri for r in discover([str(odd_dir / "m.txt")])]
    assert uri == f"file://{tmp_path.resolve()}/lists%FE/c.mp4" and os.path.isfile(local_path(uri))
    spaced = tmp_path / "my lists"
    spaced.mkdir()
    (spaced / "m.txt").write_text(f"{bad_uri}\n")
    assert [r.uri for r in discover([spaced.joinpath("m.txt").as_uri()])] == [bad_uri]
    # and the decoder opens it (real PyAV decoding of the file:// URI)
    stage = DecodeStage(SamplingSpec(image_size=16), ChunkingSpec(core_segments=8, context_segments=1), isolate=False)
    rows = list(stage.decode_video(bad_uri, refs[bad_uri].video_id))
    assert rows and not any(r["error_kind"] for r in rows) and rows[-1]["is_last"]


def test_hidden_folders_are_skipped_like_hidden_files_and_a_missing_folder_is_named(tmp_path):
    """.dot.mp4 was skipped but .hidden/h.mp4 was run; 'nosuchdir/' became a not_found failure row (exit 3)."""
    a = _touch(tmp_path / "v" / "a.mp4")
    _touch(tmp_path / "v" / ".dot.mp4")
    _touch(tmp_path / "v" / ".hidden" / "h.mp4")
    _touch(tmp_path / "v" / "sub" / ".thumbs" / "t.mp4")
    assert [r.uri for r in discover([str(tmp_path / "v")])] == [str(a.resolve())]
    _touch(tmp_path / "only_hidden" / ".cache" / "c.mp4")
    with pytest.raises(ConfigError, match="holds no video files .*hidden files and folders"):
        check_inputs([str(tmp_path / "only_hidden")])
    with pytest.raises(ConfigError, match=r"input folder '.*nosuchdir/' does not exist; check the path"):
        check_inputs([str(tmp_path / "nosuchdir") + "/"])
    check_inputs([str(tmp_path / "gone.mp4")])  # a missing file stays a failure row of its own


def test_a_missing_manifest_or_path_without_extension_is_a_usage_error(tmp_path):
    """'vidpipe run nolist.txt' (a typo) started Ray and ran a job of one not_found "video" (exit 3, ~30 s)."""
    for name in ("nolist.txt", "nolist.CSV", "nolist.tsv", "nolist.parquet"):
        with pytest.raises(ConfigError, match=f"manifest '.*{name}' does not exist; check the path"):
            check_inputs([str(tmp_path / name)])
        with pytest.raises(ConfigError, match="does not exist"):
            check_inputs([(tmp_path / name).as_uri()])
    with pytest.raises(ConfigError, match=r"input '.*nodir' does not exist \(no file or folder by that name\)"):
        check_inputs([str(tmp_path / "nodir")])
    noext = _touch(tmp_path / "noext")  # a file named without an extension is run as a video, as before
    check_inputs([str(noext)])
    check_inputs(["http://example.invalid/stream"])  # another scheme: its failure row says it is not supported


def test_a_folder_and_a_manifest_of_the_same_files_give_the_same_ids(tmp_path):
    # A manifest's entries used to make the slug as written: an absolute line gave
    # "tmp__...__arch__x_y_001.mp4", a file:// line kept its percent-escapes ("vid_C3_A9o_20009.mp4"),
    # while the folder run said "x_y_001.mp4" (same hash): joins on video_id missed them.
    arch = tmp_path / "arch"
    names = ["x#y 001.mp4", "sub/vidéo 009.mp4", "sub/deep/c.mkv"]
    for name in names:
        _touch(arch / name)
    folder = {Path(r.uri).name: r.video_id for r in discover([str(arch)])}
    lines = [str(arch / names[0]), (arch / names[1]).as_uri(), "sub/deep/c.mkv", "./sub/../sub/deep/c.mkv"]
    (arch / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    listed = {Path(r.uri).name: r.video_id for r in discover([str(arch / "list.txt")])}
    assert listed == folder
    assert folder["vidéo 009.mp4"].startswith("sub__vidéo_009.mp4-")


def test_a_link_to_a_file_of_the_same_folder_gives_the_file_s_id_whichever_comes_first(tmp_path):
    target = _touch(tmp_path / "arch" / "exact" / "two_s.mp4")
    alone = list(discover([str(tmp_path / "arch")]))
    for link in ("a_link.mp4", "z_link.mp4"):  # walked before the target, and after it
        (tmp_path / "arch" / link).symlink_to(target)
        refs = list(discover([str(tmp_path / "arch")]))
        assert refs == alone and refs[0].video_id.startswith("exact__two_s.mp4-")
        (tmp_path / "arch" / link).unlink()


def test_slugs_keep_letters_of_every_script_in_one_normal_form():
    composed = make_video_id("/a/ünï 日本.mp4", "ünï 日本.mp4")
    assert composed.startswith("ünï_日本.mp4-")
    decomposed = make_video_id("/a/ünï 日本.mp4", unicodedata.normalize("NFD", "ünï 日本.mp4"))
    assert decomposed == composed
    assert make_video_id("/a/हिन्दी.mp4", "हिन्दी.mp4").startswith("हिन्दी.mp4-")  # vowel signs and virama are marks


def test_a_missing_name_that_looks_like_a_pattern_says_so_before_any_work(tmp_path):
    name = str(tmp_path / "[raw] 073.mp4")  # a file name, gone: read as a glob that matches nothing
    for check in (lambda: list(check_inputs([name])), lambda: list(discover([name]))):
        with pytest.raises(ConfigError, match=r"matches no files.*a name holding \*, \? or \[ is read as a pattern"):
            check()


def test_manifest_entries_resolve_as_pathlib_does_with_folders_resolved_once(tmp_path):
    """Entries resolve each folder once (5 lstat calls an entry before): the URIs and ids must be those that
    ``Path.resolve`` and ``Path.relative_to`` give, through folder links, file links, dangling links, ``..``, ``.``,
    folders that do not exist, hidden names and absolute entries."""
    from jobs.manifest import _Base

    root = tmp_path / "lists"
    (root / "real" / "sub").mkdir(parents=True)
    (root / "real" / "sub" / "v.mp4").write_bytes(b"x")
    (root / "real" / ".h.mp4").write_bytes(b"x")
    (root / "dirlink").symlink_to(root / "real")
    (root / "real" / "filelink.mp4").symlink_to(root / "real" / "sub" / "v.mp4")
    (root / "real" / "dangling.mp4").symlink_to(root / "nowhere.mp4")
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (root / "real" / "out.mp4").symlink_to(tmp_path / "outside.mp4")
    entries = ["real/sub/v.mp4", "dirlink/sub/v.mp4", "dirlink/filelink.mp4", "dirlink/dangling.mp4",
               "real/../real/sub/v.mp4", "dirlink/../real/sub/v.mp4", "./real//sub/./v.mp4", "nodir/x/y.mp4",
               "real/.h.mp4", "dirlink/.h.mp4", "dirlink/out.mp4", "../outside.mp4", str(tmp_path / "outside.mp4"),
               f"{root}/dirlink/sub/v.mp4", "real/sub/", "real/sub/.", "real/sub/..", "dirlink"]
    manifest = root / "m.txt"
    manifest.write_text("".join(e + "\n" for e in entries))
    base = _Base(str(manifest))
    for entry in entries * 2:  # the second time from the folders resolved the first
        reference = str((root / entry).resolve())
        assert base.resolve(entry) == reference, entry
        assert slug_source(reference, root, entry) == (str(Path(reference).relative_to(root))
                                                       if Path(reference).is_relative_to(root) else entry), entry
    assert [r.uri for r in read_manifest(manifest)] == [str((root / e).resolve()) for e in entries]
