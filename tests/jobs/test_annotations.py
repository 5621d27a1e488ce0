"""Annotation files: formats, the segment labelling rule, and the errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.annotations import BACKGROUND, read_annotations, segment_targets, warn_spans_past_the_end
from jobs.train import split_videos
from pipeline.errors import ConfigError


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.mp4", "-5cWp3PP2fA.mp4", "xyz.mp4"):
        (root / name).write_bytes(b"not decoded here")
    return root


def _csv(tmp_path: Path, text: str, name: str = "ann.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _segments(n: int, seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    start = np.arange(n) * seconds
    return start, start + seconds


def test_csv_with_extra_columns_relative_and_absolute_paths(tmp_path, videos):
    ann = _csv(tmp_path, "clip,video,start_s,end_s,label,who\n"
                         f"1,a.mp4,0,2,dog,me\n2,sub/c.mp4,1.5,3,cat,you\n3,{videos / 'b.mp4'},0,1,dog,x\n")
    s = read_annotations(ann, videos)
    assert [Path(v.uri).name for v in s.videos] == ["a.mp4", "c.mp4", "b.mp4"]
    assert s.labels == ["cat", "dog", BACKGROUND]
    assert s.videos[1].annotations[0].line == 3
    ids = {v.video_id for v in s.videos}
    assert len(ids) == 3 and all("/" not in i for i in ids)
    ignore = read_annotations(ann, videos, unlabeled="ignore")
    assert ignore.labels == ["cat", "dog"]


def test_parquet_annotations(tmp_path, videos):
    path = tmp_path / "ann.parquet"
    pq.write_table(pa.table({"Video": ["a.mp4", "b.mp4"], "start_s": [0.0, 1.0], "end_s": [1.0, 2.0],
                             "label": ["x", "y"], "extra": [1, 2]}), path)
    s = read_annotations(path, videos)
    assert s.labels == ["x", "y", BACKGROUND] and len(s.videos) == 2
    pq.write_table(pa.table({"video": ["a.mp4"], "start_s": [2.0], "end_s": [1.0], "label": ["x"]}), path)
    with pytest.raises(ConfigError, match=r"ann\.parquet row 1: end_s 1 <= start_s 2"):
        read_annotations(path, videos)
    for second in ("Video", "video"):  # the same name twice made pyarrow's reader fail: "not a readable Parquet file"
        twice = pa.table([pa.array(["nope.mp4"]), pa.array(["a.mp4"]), pa.array([0.0]), pa.array([1.0]),
                          pa.array(["x"])], names=["video", second, "start_s", "end_s", "label"])
        pq.write_table(twice, path)
        with pytest.raises(ConfigError, match=r"ann\.parquet: columns video appear more than once") as info:
            read_annotations(path, videos)
        assert "not a readable Parquet file" not in str(info.value)
    # a column of numbers said "empty video" of 0; binary strings (no UTF-8 annotation) were unknown videos
    # "b'a.mp4'" (found by a helper)
    pq.write_table(pa.table({"video": [0, 1], "start_s": [0.0, 1.0], "end_s": [1.0, 2.0], "label": ["x", "y"]}), path)
    with pytest.raises(ConfigError, match=r"ann\.parquet row 1: the 'video' column holds int values, not paths or "
                                          r"URIs; write them as strings"):
        read_annotations(path, videos)
    pq.write_table(pa.table({"video": pa.array([b"a.mp4", b"b.mp4"], pa.binary()), "start_s": [0.0, 1.0],
                             "end_s": [1.0, 2.0], "label": pa.array([b"x", b"y"], pa.binary())}), path)
    s = read_annotations(path, videos)
    assert [Path(v.uri).name for v in s.videos] == ["a.mp4", "b.mp4"] and s.labels == ["x", "y", BACKGROUND]
    # duration columns: "datetime.timedelta(seconds=2) is not a number of seconds" (a helper)
    pq.write_table(pa.table({"video": ["a.mp4"], "start_s": pa.array([500_000], pa.duration("us")),
                             "end_s": pa.array([2_000], pa.duration("ms")), "label": ["x"]}), path)
    (span,) = read_annotations(path, videos).videos[0].annotations
    assert (span.start_s, span.end_s) == (0.5, 2.0)
    # a readable file with a column missing was "not a readable Parquet file (...); write it with a Parquet
    # writer" (the check's own error re-wrapped; found by a helper)
    pq.write_table(pa.table({"Video": ["a.mp4"], "start_s": [0.0], "end_s": [4.0]}), path)
    with pytest.raises(ConfigError) as info:
        read_annotations(path, videos)
    assert str(info.value) == (f"annotations {path}: missing columns ['label']; need video, start_s, end_s, label "
                               "(has ['Video', 'start_s', 'end_s'])")


def test_labelling_rule_half_coverage_and_background():
    from jobs.annotations import AnnotatedVideo, Annotation

    video = AnnotatedVideo("u", "u", (Annotation("u", 0.5, 2.4, "dog", 2), Annotation("u", 3.0, 3.4, "cat", 3)))
    start, end = _segments(5)
    labels = ["cat", "dog", BACKGROUND]
    t = segment_targets(video, start, end, labels, task="multiclass", unlabeled="background")
    # [0,1): half covered -> dog; [1,2) dog; [2,3): 0.4 s -> background; [3,4): 0.4 s -> background
    assert t.tolist() == [1, 1, 2, 2, 2]
    t = segment_targets(video, start, end, labels[:2], task="multiclass", unlabeled="ignore")
    assert t.tolist() == [1, 1, -1, -1, -1]
    # a short last segment: [4, 4.3) is covered 0.2 s of 0.3 s -> most of it
    video2 = AnnotatedVideo("u", "u", (Annotation("u", 4.1, 9.0, "cat", 2),))
    start = np.array([3.0, 4.0])
    end = np.array([4.0, 4.3])
    assert segment_targets(video2, start, end, labels, task="multiclass", unlabeled="background").tolist() == [2, 0]


def test_multilabel_targets_allow_overlap(tmp_path, videos):
    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,4,music\na.mp4,1,3,speech\n")
    with pytest.raises(ConfigError, match=r"ann\.csv line 3: .*overlaps line 2.*a multilabel one: 'vidpipe train --task multilabel'"):
        read_annotations(ann, videos)
    s = read_annotations(ann, videos, task="multilabel")
    start, end = _segments(5)
    t = segment_targets(s.videos[0], start, end, s.labels, task="multilabel", unlabeled="background")
    assert s.labels == ["music", "speech", BACKGROUND]
    assert t.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]]
    t = segment_targets(s.videos[0], start, end, s.labels, task="multilabel", unlabeled="ignore")
    assert t[4].tolist() == [-1, -1, -1]


def test_a_multilabel_vocabulary_without_background_scores_uncovered_segments_as_no_label(tmp_path, videos):
    """What eval does with a multilabel bundle trained on annotations that covered every segment."""
    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,2,music\na.mp4,1,3,speech\n")
    s = read_annotations(ann, videos, task="multilabel", labels=["music", "speech"])
    assert s.labels == ["music", "speech"] and s.unlabeled == "background"
    start, end = _segments(4)
    t = segment_targets(s.videos[0], start, end, s.labels, task="multilabel", unlabeled="background")
    assert t.tolist() == [[1, 0], [1, 1], [0, 1], [0, 0]]  # [3, 4): nothing active, scored as such
    t = segment_targets(s.videos[0], start, end, s.labels, task="multilabel", unlabeled="ignore")
    assert t[3].tolist() == [-1, -1]
    # multiclass has to pick a class for such a segment: without background it cannot be scored
    with pytest.raises(ConfigError, match="no 'background' label.*--unlabeled ignore"):
        read_annotations(_csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,2,music\n", "mc.csv"), videos,
                         labels=["music", "speech"])


def test_same_label_may_overlap_in_multiclass(tmp_path, videos):
    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,4,music\na.mp4,1,3,music\na.mp4,4,5,x\n")
    assert len(read_annotations(ann, videos).videos[0].annotations) == 3


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_overlapping_spans_of_one_label_cover_their_union_once(tmp_path, videos, task):
    """[0, 0.3) and [0.1, 0.4) cover 0.4 s of [0, 1), under half: they labelled it, each counted whole."""
    rows = "a.mp4,0,0.3,music\na.mp4,0.1,0.4,music\na.mp4,0,0.3,speech\na.mp4,0,0.3,speech\na.mp4,1.2,1.6,music\n"
    rows += "a.mp4,1.6,1.8,music\n"  # touching spans: 0.6 s of [1, 2)
    s = read_annotations(_csv(tmp_path, "video,start_s,end_s,label\n" + rows), videos, task=task) \
        if task == "multilabel" else None
    if s is None:  # multiclass: one label a time; the same rows without speech
        s = read_annotations(_csv(tmp_path, "video,start_s,end_s,label\n" + rows.replace("speech", "music")),
                             videos)
    start, end = _segments(2)
    t = segment_targets(s.videos[0], start, end, s.labels, task=task, unlabeled="background")
    bg, music = s.labels.index(BACKGROUND), s.labels.index("music")
    if task == "multiclass":
        assert t.tolist() == [bg, music]
    else:
        assert t.tolist() == [[1 if i == bg else 0 for i in range(len(s.labels))],
                              [1 if i == music else 0 for i in range(len(s.labels))]]


@pytest.mark.parametrize(("text", "match"), [
    ("video,start_s,end_s,label\na.mp4,0,1,x\nnope.mp4,0,1,x\n", r"ann\.csv line 3: unknown video 'nope\.mp4'"),
    ("video,start_s,end_s,label\na.mp4,2,2,x\n", r"ann\.csv line 2: end_s 2 <= start_s 2"),
    ("video,start_s,end_s,label\na.mp4,0,1,x\na.mp4,zero,1,x\n", r"ann\.csv line 3: start_s 'zero' is not a number"),
    ("video,start_s,end_s,label\na.mp4,0,1,\n", r"ann\.csv line 2: empty label"),
    ("video,start,end,label\na.mp4,0,1,x\n", r"ann\.csv line 1: missing columns \['start_s', 'end_s'\]"),
    ("video,start_s,end_s,label\na.mp4,0,1\n", r"ann\.csv line 2: 3 fields"),
    # an unquoted comma in a label: 'noise, loud' was trained as 'noise' (found by a helper)
    ("video,start_s,end_s,label\na.mp4,0,1,noise, loud\n",
     r'ann\.csv line 2: 5 fields, the header has 4; a value holding a comma must be quoted \("noise, loud"\)'),
    ("video,start_s,end_s,label\na.mp4,0,2,x\na.mp4,1,3,y\n", r"ann\.csv line 3: \[1, 3\) 'y' overlaps line 2"),
    ("video,start_s,end_s,label\na.mp4,-1,2,x\n", r"ann\.csv line 2: start_s must be"),
    ("video,start_s,end_s,label\na.mp4,0,1_0,x\n", r"ann\.csv line 2: end_s '1_0' is not a number"),  # float(): 10
    ("", r"ann\.csv: the file is empty"),
    ("video,Video,start_s,end_s,label\nnope.mp4,a.mp4,0,1,x\n", r"ann\.csv line 1: the header names video more than once"),
    # a quote not closed on its line took the next rows into one label, 'x\na.mp4,1,2,y' (found by a helper); the line
    # numbers after a quoted value with line breaks are the file's
    ('video,start_s,end_s,label\na.mp4,0,1,x\na.mp4,1,2,"y\na.mp4,2,3,z\na.mp4,3,4,w"\na.mp4,4,5,v\n',
     r'ann\.csv line 3: a quoted value runs on to line 5: a quote \(\"\) opened on this line is not closed on it'),
    # what users got wrong, now said (a helper): a folder, Windows separators, ';' cells in a .csv
    ("video,start_s,end_s,label\nsub,0,1,x\n", r"ann\.csv line 2: unknown video 'sub': a directory, not a video file"),
    ("video,start_s,end_s,label\nsub\\c.mp4,0,1,x\n",
     r"unknown video 'sub\\\\c\.mp4': no such file .*; write folders with '/' \(a '\\' is part of a file's name here\)"),
    ("video;start_s;end_s;label\na.mp4;0;1;x\n",
     r"its cells are separated by ';', a \.csv by commas: save it with commas \(\.csv\) or tabs \(\.tsv\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, videos, text, match):
    with pytest.raises(ConfigError, match=match):
        read_annotations(_csv(tmp_path, text), videos)


def test_spans_past_the_end_or_far_past_it_are_named(tmp_path, videos):
    """Times in milliseconds ('0,1500' on a 4-s clip) label the whole video without a word unless the span starts
    after the end (a helper): a span that ends more than twice the video's length and 10 s past it is named too."""
    from types import SimpleNamespace

    ann = read_annotations(_csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,1500,x\nxyz.mp4,3,4,y\nb.mp4,0,12,x\n"
                                          "b.mp4,9,10,y\nsub/c.mp4,0,4,x\n"), videos, task="multilabel")
    ends = {"a.mp4": 4.0, "b.mp4": 4.0, "c.mp4": 4.0, "xyz.mp4": 4.0}
    features = {v.uri: SimpleNamespace(end_s=np.array([ends[Path(v.uri).name]])) for v in ann.videos}
    said: list[str] = []
    notes = warn_spans_past_the_end("ann.csv", ann.videos, features, said.append)
    assert notes == said == [
        "warning: annotations ann.csv: 1 span starts after the video's end and labels no segment: line 5: 9-10 s 'y', "
        "the video ends at 4.0 s; check the times (seconds) and the video paths",
        "warning: annotations ann.csv: 1 span ends far past the video's end (more than twice its length): line 2: "
        "0-1500 s 'x', the video ends at 4.0 s; check the times: seconds, not milliseconds"]  # 0-12 s: within 10 s


def test_relative_video_needs_videos_dir_and_label_vocabulary(tmp_path, videos):
    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,1,x\n")
    with pytest.raises(ConfigError, match="relative path; pass --videos"):
        read_annotations(ann, None)
    with pytest.raises(ConfigError, match=r"line 2: label 'x' is not one of the model's labels \(y, background\)"):
        read_annotations(ann, videos, labels=["y", "background"])
    with pytest.raises(ConfigError, match=r"labels \('blue, noise', red\)"):  # read as three labels unquoted
        read_annotations(ann, videos, labels=["blue, noise", "red"])
    with pytest.raises(ConfigError, match="no 'background' label.*--unlabeled ignore"):
        read_annotations(ann, videos, labels=["x"])
    assert read_annotations(ann, videos, labels=["x"], unlabeled="ignore").labels == ["x"]


def test_ave_format_and_its_split_files(tmp_path, videos):
    ave = tmp_path / "AVE"
    ave.mkdir()
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    (ave / "Annotations.txt").write_text(header + "Church bell&-5cWp3PP2fA&good&0&10\n"
                                         "Male speech, man speaking&xyz&good&2&7\nDog&a&bad&1&3\n")
    (ave / "trainSet.txt").write_text(header + "Church bell&-5cWp3PP2fA&good&0&10\n")
    (ave / "valSet.txt").write_text(header + "Male speech, man speaking&xyz&good&2&7\n")
    (ave / "testSet.txt").write_text(header + "Dog&a&bad&1&3\n")
    s = read_annotations(ave / "Annotations.txt", videos)
    assert s.labels == ["Church bell", "Dog", "Male speech, man speaking", BACKGROUND]
    assert [Path(v.uri).name for v in s.videos] == ["-5cWp3PP2fA.mp4", "xyz.mp4", "a.mp4"]
    assert sorted(s.splits.values()) == ["test", "train", "val"]
    train, val = split_videos(s.videos, s, 0.5, 0)
    assert [Path(v.uri).name for v in train] == ["-5cWp3PP2fA.mp4"] and [Path(v.uri).name for v in val] == ["xyz.mp4"]
    # a split file is itself an annotation file (e.g. for vidpipe eval on the test set)
    test = read_annotations(ave / "testSet.txt", videos)
    assert [a.label for v in test.videos for a in v.annotations] == ["Dog"] and not test.splits
    (ave / "bad.txt").write_text(header + "Dog&a&good&5\n")
    with pytest.raises(ConfigError, match=r"bad\.txt line 2: expected Category&VideoID"):
        read_annotations(ave / "bad.txt", videos)
    (ave / "bad.txt").write_text(header + "Dog&missing&good&1&5\n")
    with pytest.raises(ConfigError, match=r"bad\.txt line 2: unknown video 'missing\.mp4'"):
        read_annotations(ave / "bad.txt", videos)


def test_split_by_video_is_seeded_and_disjoint(tmp_path, videos):
    ann = _csv(tmp_path, "video,start_s,end_s,label\n" + "".join(
        f"{n},0,1,x\n" for n in ("a.mp4", "b.mp4", "sub/c.mp4", "xyz.mp4", "-5cWp3PP2fA.mp4")))
    s = read_annotations(ann, videos)
    train, val = split_videos(s.videos, s, 0.4, seed=3)
    assert len(val) == 2 and len(train) == 3 and not {v.uri for v in train} & {v.uri for v in val}
    assert split_videos(s.videos, s, 0.4, seed=3) == (train, val)
    assert split_videos(s.videos, s, 0.0, seed=3) == (sorted(s.videos, key=lambda v: v.uri), [])


@pytest.mark.parametrize("flags, said", [
    (["--image-encoder", "resnet18", "--image-weights", "file:/no/such.pth"],
     "--image-weights file:/no/such.pth: image encoder 'resnet18': weights file '/no/such.pth' "),
    (["--patience", "0"], "--patience must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be a positive number at most 1 (AdamW's step; the default is 2e-3), got 0.0"),
    (["--lr", "1e300"], "--lr must be a positive number at most 1"),  # torch's traceback after the extraction
    (["--window-segments", "0"], "--window-segments must be >= 1, got 0"),
    (["--context-segments", "-1"], "--context-segments must be >= 0, got -1"),
    (["--audio-fmax", "100000"], "--audio-fmax 100000: audio f_max_hz=100000.0 is above the Nyquist frequency 8000.0"),
    (["--audio-fmax", "0"], "--audio-fmax 0: invalid mel parameters"),
    (["--audio-fmax", "nan"], "--audio-fmax nan: invalid mel parameters"),  # failed at saving, after training
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),  # failed after feature extraction
    (["--image-grid", "100", "--fusion", "attention"],  # ran, pooling a 7x7 map up to 100x100
     "--image-grid must be in [0, 7] at --image-size 224 (the image encoder's feature map is 7x7), got 100"),
    (["--seed", str(2**70)], f"--seed must be in [0, 2**32), got {2**70}"),
    (["--image-grid", "2"],  # ran, extracting regions that concat fusion does not use
     "--image-grid is for --fusion attention (the regions it attends over); --fusion concat does not use them"),
    (["--frames-per-segment", "0"], "--frames-per-segment must be >= 1, got 0"),  # named frames_per_segment
    (["--out", ""], "--out is empty; give the bundle directory to write"),  # "--out .: the directory holds other files"
])
def test_train_flags_that_cannot_work_are_usage_errors_before_any_work(tmp_path, videos, capsys, flags, said):
    """Before: missing weights failed after Ray started, as actor tracebacks (exit 1); --patience 0 named
    'batch_windows', --window-segments 0 failed after feature extraction with the HeadSpec's repr."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,2,dog\nb.mp4,0,1,cat\n")
    out = tmp_path / "bundle"
    assert main(["train", "--annotations", str(ann), "--videos", str(videos), "--out", str(out), *flags]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert not out.exists()  # nothing extracted, nothing cached


@pytest.mark.parametrize("where", [".", "features"])
def test_a_feature_cache_that_saving_the_bundle_would_delete_is_refused(tmp_path, videos, capsys, where):
    """--cache X --out X trained, and saving the bundle deleted every feature extracted (found by a helper)."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,2,dog\nb.mp4,0,1,cat\n")
    out = tmp_path / "bundle"
    cache = out / where
    code = main(["train", "--annotations", str(ann), "--videos", str(videos), "--out", str(out), "--cache", str(cache)])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    said = "is" if where == "." else "lies in"
    assert (f"--cache {cache.resolve()}: {said} the bundle directory --out {out.resolve()}, which saving the bundle "
            f"replaces (keeping only work and README.md); leave --cache out to cache in {out.resolve() / 'work' / 'features'}"
            ) in err, err
    assert not any(out.rglob("*.npz")) and not any(out.rglob("*.parquet"))


def test_train_outputs_and_annotation_files_that_cannot_work_are_named_before_any_work(tmp_path, videos, capsys):
    """Each of these was a traceback (exit 1), some after training; a retrain deleted the user's own files."""
    from jobs.cli import main
    from jobs.spec import EXIT_USAGE

    ann = _csv(tmp_path, "video,start_s,end_s,label\na.mp4,0,2,dog\nb.mp4,0,1,cat\n")
    (tmp_path / "afile").write_text("x")
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (bundle_dir / "bundle.json").write_text("{}")
    (bundle_dir / "NOTES.txt").write_text("mine")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("video,start_s,end_s,label\na.mp4,0,2,caf\xe9\n".encode("latin-1"))
    fake = tmp_path / "fake.parquet"
    fake.write_text("video,start_s,end_s,label\n")
    for table, out, said in [
        (ann, tmp_path / "afile" / "sub", f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file"),
        (ann, tmp_path / "m", f"--cache {tmp_path / 'afile' / 'c'}: {tmp_path / 'afile'} is a file"),
        (ann, bundle_dir, f"--out {bundle_dir}: the bundle directory also holds NOTES.txt, which retraining would "
                          "delete"),
        (latin, tmp_path / "m", f"annotations {latin} line 2: not UTF-8 text"),
        (fake, tmp_path / "m", f"annotations {fake}: not a readable Parquet file"),
        (tmp_path, tmp_path / "m", f"annotations {tmp_path}: is a directory"),
        (_csv(tmp_path, "[]", "a.json"), tmp_path / "m", "a.json: unknown file type '.json'; use .csv, .tsv or"),
    ]:
        args = ["--annotations", str(table), "--videos", str(videos)]
        if said.startswith("--cache"):
            args += ["--cache", str(tmp_path / "afile" / "c")]
        assert main(["train", *args, "--out", str(out)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
        if table != ann or said.startswith("--cache"):  # eval (the packaged bundle) reads them the same way
            assert main(["eval", *args]) == EXIT_USAGE
            err = capsys.readouterr().err
            assert said in err and "Traceback" not in err, err
    assert (bundle_dir / "NOTES.txt").read_text() == "mine"
