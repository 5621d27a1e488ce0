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
    n_decode = max(1, int(cpus // 2))
    decode_cpus = cpus / 2 / n_decode
    n_image = max(1, int(cpus // 4))
    image_cpus = cpus * 0.375 / n_image
    return PipelinePlan(
        decode=StagePlan(Resources(num_cpus=decode_cpus), pool_size=n_decode, threads=max(1, round(decode_cpus * 2))),
        image=StagePlan(Resources(num_cpus=image_cpus), pool_size=n_image, threads=max(1, round(image_cpus * 2))),
        audio=StagePlan(Resources(num_cpus=cpus * 0.0625), pool_size=1, threads=max(1, int(cpus * 0.0625))),
        head=StagePlan(Resources(num_cpus=cpus * 0.0625), pool_size=1, threads=1),
    )
