"""JobRunner: discover → (skip finished) → Ray Data stages → ResultWriter, with progress."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from jobs.discover import VideoRef, discover
from jobs.models import bundle_fingerprint, is_untrained, resolve_bundle, with_sampling
from jobs.output import OutputDir, ResultWriter, _atomic_write_text
from jobs.plan import plan_for
from jobs.progress import Progress
from jobs.spec import EXIT_OK, EXIT_SOME_FAILED, JobSpec
from pipeline.bundle import ModelBundle
from pipeline.errors import ConfigError
from workers.build import PipelinePlan, build_stages, chunking_for
from workers.rows import iter_rows

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    videos_total: int
    videos_skipped: int
    videos_done: int
    videos_failed: int
    segments_written: int
    video_seconds: float
    wall_s: float
    model_id: str
    stage_metrics: dict | None = None  # per-stage busy seconds / peak RSS (see workers.metrics)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.videos_failed else EXIT_OK


def init_ray(address: str | None) -> None:
    """Connect to ``address`` or start an embedded local Ray (reusing one already started)."""
    import ray

    if ray.is_initialized():
        return
    show_logs = os.environ.get("VIDPIPE_RAY_LOGS") == "1"
    if address:
        ray.init(address=address, log_to_driver=show_logs, configure_logging=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=show_logs,
                 configure_logging=False)


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False


def check_job_identity(out: OutputDir, bundle: ModelBundle, spec: JobSpec) -> None:
    """Record what defines the job's rows; refuse to mix another bundle or sampling into the same OUT."""
    path = out.job_dir / "job.json"
    identity = {"bundle_fingerprint": bundle_fingerprint(bundle), "model_id": bundle.model_id,
                "sampling": bundle.sampling.to_dict(), "top_k": spec.top_k, "with_embedding": spec.with_embedding}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        mismatch = [k for k in identity if old.get(k) != identity[k]]
        if mismatch:
            raise ConfigError(
                f"{spec.out} already holds results of another job (differs in: {', '.join(mismatch)}; "
                f"it has model {old.get('model_id')} with sampling {old.get('sampling')}). "
                "Use a new --out directory, or rerun with the same model and sampling to resume.")
        return
    out.job_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(identity | {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                    "bundle": bundle.meta.get("source", spec.model or "default")},
                                        indent=2, sort_keys=True))


class JobRunner:
    """Runs one JobSpec to completion on Ray Data (embedded local Ray unless an address is given)."""

    def __init__(self, spec: JobSpec, *, stream: TextIO | None = None) -> None:
        self.spec = spec
        self.stream = stream or sys.stderr

    def prepare(self) -> tuple[ModelBundle, OutputDir, list[VideoRef], int]:
        spec = self.spec
        bundle = with_sampling(resolve_bundle(spec.model, allow_untrained=spec.allow_untrained),
                               spec.segment_seconds, spec.frames_per_segment)
        out = OutputDir(spec.out)
        out.create()
        check_job_identity(out, bundle, spec)
        out.recover()
        done = out.finished_video_ids(include_failed=not spec.retry_failed)
        todo, skipped = [], 0
        for ref in discover(spec.inputs):
            if ref.video_id in done:
                skipped += 1
            else:
                todo.append(ref)
        return bundle, out, todo, skipped

    def run(self) -> JobResult:
        spec = self.spec
        started = time.monotonic()
        bundle, out, todo, skipped = self.prepare()
        if is_untrained(bundle):
            self._say("WARNING: running an UNTRAINED model (--allow-untrained): labels are meaningless, "
                      "rows carry model_id 'untrained'. Train a bundle with 'vidpipe train'.")
        self._say(f"vidpipe: {len(todo)} videos to do, {skipped} already finished in {spec.out}; "
                  f"model {bundle.model_id}")
        embedding_dim = 2 * bundle.head.lstm_hidden if spec.with_embedding else None
        writer = ResultWriter(out, model_id=bundle.model_id, labels=list(bundle.labels), embedding_dim=embedding_dim)
        if todo:
            self._run_ray(bundle, todo, writer)
        writer.flush()
        wall = time.monotonic() - started
        return JobResult(videos_total=len(todo) + skipped, videos_skipped=skipped, videos_done=writer.videos_done,
                         videos_failed=writer.videos_failed, segments_written=writer.segments_written,
                         video_seconds=writer.video_seconds_done, wall_s=wall, model_id=bundle.model_id,
                         stage_metrics=writer.meter.to_dict())

    def _run_ray(self, bundle: ModelBundle, todo: list[VideoRef], writer: ResultWriter) -> None:
        import ray

        init_ray(self.spec.address)
        _quiet_ray_data()
        resources = ray.cluster_resources()
        plan = plan_for(resources.get("CPU", 1.0), resources.get("GPU", 0.0), device=self.spec.device)
        ds = self._dataset(bundle, todo, plan)
        progress = Progress(len(todo), self.stream, enabled=self.spec.progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row in iter_rows(batch):
                writer.add_row(row)
            progress.update(writer)
        progress.finish(writer)
        if writer.pending_videos:
            raise RuntimeError(f"{writer.pending_videos} videos did not deliver all their chunks")

    def _dataset(self, bundle: ModelBundle, todo: list[VideoRef], plan: PipelinePlan):  # noqa: ANN202 - ray type
        import ray.data

        from workers.ray_adapter import add_stage

        chunking = chunking_for(bundle, self.spec.chunk_seconds)
        stages = build_stages(bundle, bundle.sampling, chunking, plan, top_k=self.spec.top_k,
                              with_embedding=self.spec.with_embedding)
        ds = ray.data.from_items([{"uri": r.uri, "video_id": r.video_id} for r in todo],
                                 override_num_blocks=max(1, min(len(todo), 1000)))
        for stage, stage_plan in stages:
            ds = add_stage(ds, stage, stage_plan)
        return ds

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
