"""Size the stages' actor pools to the cluster: every stage runs at once, even on 2 CPU cores."""

from __future__ import annotations

from workers.stage import PipelinePlan, Resources, StagePlan


def plan_for(cpus: float, gpus: float, *, device: str = "auto") -> PipelinePlan:
    """A plan for a cluster with ``cpus`` CPU cores and ``gpus`` GPUs.

    CPU only: half the cores decode, the rest run the encoders and head (the image model is a real
    share of the work there).  With GPUs: nearly every core decodes and the models share the GPUs in
    fractions, since decoding is the ceiling.
    """
    use_gpu = gpus >= 1 and device != "cpu"
    cpus = max(cpus, 1.0)
    if use_gpu:
        n_gpu = int(gpus)
        n_decode = max(1, int(cpus) - 2)
        return PipelinePlan(
            decode=StagePlan(Resources(num_cpus=1.0), pool_size=n_decode, threads=1),
            image=StagePlan(Resources(num_cpus=0.5, num_gpus=0.5), pool_size=n_gpu, batch_size=8, device="cuda",
                            threads=1),
            audio=StagePlan(Resources(num_cpus=0.25, num_gpus=0.25), pool_size=n_gpu, batch_size=8, device="cuda",
                            threads=1),
            head=StagePlan(Resources(num_cpus=0.25, num_gpus=0.25), pool_size=n_gpu, batch_size=8, device="cuda",
                           threads=1),
        )
    # CPU only: the model stages share one pool (one process and torch import per worker, no hand-offs).
    # Both pools get threads for all their cores' share; decode and models overlap across chunks.
    n_decode = max(1, int(cpus // 2))
    decode_cpus = cpus / 2 / n_decode
    n_models = max(1, int(cpus // 8))
    models_cpus = cpus / 2 / n_models
    models = StagePlan(Resources(num_cpus=models_cpus), pool_size=n_models, threads=max(1, round(models_cpus * 2)))
    return PipelinePlan(
        decode=StagePlan(Resources(num_cpus=decode_cpus), pool_size=n_decode, threads=max(1, round(decode_cpus * 2))),
        image=models, audio=models, head=models, models=models,
    )
