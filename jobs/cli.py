"""The ``vidpipe`` command line.  Kept apart from the library: it parses flags and reports, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jobs.spec import EXIT_OK, EXIT_USAGE
from pipeline.errors import ConfigError

_EPILOG = """exit status: 0 all inputs done, 3 some inputs failed (see the failures table),
2 usage or configuration error, 1 internal error."""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="label every segment of the input videos and write Parquet",
        description="Decode every input video, encode frames and audio, fuse, label each fixed segment and "
                    "write OUT/segments, OUT/videos and OUT/failures as Parquet. Rerunning the same command "
                    "on the same OUT resumes: finished videos are skipped.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders (searched recursively), glob patterns (quote them), "
                        "manifests (.txt/.csv/.parquet) or s3:// URIs")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory")
    p.add_argument("--model", metavar="BUNDLE", help="model bundle directory (default: the packaged bundle)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="run with an untrained head when no trained bundle exists (labels are meaningless)")
    p.add_argument("--segment-seconds", type=float, metavar="S", help="segment length in seconds (default: bundle's, 1.0)")
    p.add_argument("--frames-per-segment", type=int, metavar="K", help="frames sampled per segment (default: bundle's, 1)")
    p.add_argument("--chunk-seconds", type=float, default=60.0, metavar="S",
                   help="video seconds per chunk moving between stages (bounds memory; default 60)")
    p.add_argument("--address", metavar="ADDR", help="an existing Ray cluster (default: start an embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the models run")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels kept per segment (default 5)")
    p.add_argument("--embeddings", action="store_true", help="also write the fused per-segment embedding")
    p.add_argument("--retry-failed", action="store_true", help="redo videos that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress line")


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="SQL over a job's output (DuckDB views: segments, videos, failures)",
        description="Run SQL over OUT with DuckDB. Views: segments, videos, failures (committed data only).",
        epilog='example: vidpipe query out "SELECT label, count(*) n FROM segments GROUP BY 1 ORDER BY n DESC"')
    p.add_argument("out", metavar="OUT", help="the --out directory of a run")
    p.add_argument("sql", metavar="SQL", help="the query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown in table format (default 100)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidpipe", description="Batch audio-visual video analysis on Ray.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run(sub)
    _add_query(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.runner import JobRunner
    from jobs.spec import JobSpec

    spec = JobSpec(inputs=args.inputs, out=args.out, model=args.model, allow_untrained=args.allow_untrained,
                   segment_seconds=args.segment_seconds, frames_per_segment=args.frames_per_segment,
                   chunk_seconds=args.chunk_seconds, address=args.address, device=args.device, top_k=args.top_k,
                   with_embedding=args.embeddings, retry_failed=args.retry_failed, progress=not args.no_progress)
    result = JobRunner(spec).run()
    print(f"done: {result.videos_done} videos ok, {result.videos_failed} failed, {result.videos_skipped} skipped "
          f"(already finished); {result.segments_written} segments; {result.video_seconds:,.1f} video-s in "
          f"{result.wall_s:,.1f} s ({result.video_seconds / max(result.wall_s, 1e-9):,.2f} video-s/s); "
          f"model {result.model_id}; output {args.out}")
    if result.model_id == "untrained":
        print("WARNING: these labels come from an UNTRAINED model and mean nothing.", file=sys.stderr)
    if result.videos_failed:
        print(f"{result.videos_failed} inputs failed: vidpipe query {args.out} \"SELECT * FROM failures\"",
              file=sys.stderr)
    return result.exit_code


def _cmd_query(args: argparse.Namespace) -> int:
    from jobs.query import format_table, run_query

    table = run_query(args.out, args.sql)
    sys.stdout.write(format_table(table, args.format, max_rows=args.max_rows))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": _cmd_run, "query": _cmd_query}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"vidpipe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vidpipe: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
