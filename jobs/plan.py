"""Size the stages' actor pools to the cluster: every stage runs at once, even on 2 CPU cores."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from workers.stage import PipelinePlan, Resources, StagePlan

if TYPE_CHECKING:
    from pipeline.bundle import ModelBundle

# CPU only: a wave with at least this many videos per core decodes them one thread per video, one
# decoder per core; with fewer (one long film), FFmpeg's frame threads split each video over two cores.
VIDEOS_PER_CORE_FOR_ONE_THREAD = 4
# ... where the node has this much of Ray's memory per core: a decode worker and its decoder process
# peak at ~430-530 MiB here, and one decoder per core doubles their number
MEMORY_PER_CORE_FOR_ONE_THREAD = 1 << 30

log = logging.getLogger(__name__)

Node = tuple[float, float, float]  # an alive node's CPUs, GPUs and Ray memory (bytes)


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster: (CPUs, GPUs, memory bytes) each."""
    import ray

    return [(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)),
             float(n["Resources"].get("memory", 0.0))) for n in ray.nodes() if n.get("Alive")]


def job_precision(precision: str, device: str, address: str | None, bundle: ModelBundle | None = None) -> str:
    """What ``--precision P --device D`` means for a whole job, decided once at its start: "bf16" or "fp32".

    ``auto`` is fp32 for a ``bundle`` whose training found that bf16 encoders score it lower
    (``ModelBundle.fp32_reason``; the callers say so).

    ``auto`` is bf16 where the encoders compute it natively: on GPUs, and on CPUs with native bf16 (on a
    cluster, only when every node's CPU has it).  Each worker deciding for itself mixed bf16 and float32
    rows on a cluster of mixed CPUs (4 of the film's 597 labels differ between them), and a resumed job
    on another machine went on in the other precision.  ``address``: the job's cluster; for ``auto`` it is
    joined and each node is asked (on the embedded Ray, this machine decides).
    """
    from jobs.spec import runs_here
    from pipeline.precision import encoder_precision

    if precision == "auto" and bundle is not None and bundle.fp32_reason():
        return "fp32"
    local = runs_here(address)
    if precision != "auto" or local:
        return encoder_precision(precision, device, here=local)
    from jobs.runner import init_ray

    init_ray(address)
    nodes = cluster_nodes()
    if device == "cuda" or (device != "cpu" and any(n[1] >= 1 for n in nodes)):
        return "bf16"  # the encoders run on the GPUs (plan_for)
    answers = _nodes_native_bf16()
    if answers and all(answers):
        return "bf16"
    if None in answers or not answers:
        late = sum(a is None for a in answers)
        log.warning("--precision auto: %s; the job's encoders run in fp32 (give --precision bf16 to choose bf16)",
                    f"{late} of the cluster's nodes did not say in time whether their CPUs have native bf16"
                    if late else "the cluster has no node with CPUs to ask")
    return "fp32"


def _nodes_native_bf16(timeout_s: float = 60.0) -> list[bool | None]:
    """Whether each alive node's CPU computes bf16 natively; None for a node that does not answer in time (a
    node that dies while asked runs nothing of this job and is left out)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.precision import node_has_native_bf16

    probe = ray.remote(num_cpus=0, max_retries=0)(node_has_native_bf16)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0.0) > 0]
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers: list[bool | None] = []
    for ref in ready:
        try:
            answers.append(bool(ray.get(ref)))
        except Exception:  # noqa: BLE001 - the node died while asked
            continue
    return answers + [None] * len(late)


def plan_for(cpus: float, gpus: float, *, device: str = "auto", videos: int | None = None) -> PipelinePlan:
    """A plan for a cluster with ``cpus`` CPU cores and ``gpus`` GPUs, for a wave of ``videos`` videos
    (None: unknown).

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
    # A model worker gets as many threads as cores it holds, never more: torch's OpenMP threads spin,
    # and oversubscribed cores cost more than the threads bring (measured on 2 cores with the default
    # bundle: models and decoder on 2 threads each 23.1 s, 1 + 1 threads 16.1 s for a 10-minute film).
    # Decoding is the critical path, though, and the models leave most of their cores idle (on 2 cores
    # 17.6 ms of decoding against ~6 ms of models per segment), so the decoders' FFmpeg frame threads
    # add up to all the cores: one long video uses the models' idle time.  Frame threads block while
    # they wait (no spinning) and cost ~5 % more CPU than one thread (the film decoded alone: 15.3 ->
    # 16.0-16.4 CPU-ms per segment, 1.43x faster).  Through the pipeline on 2 cores, three alternating
    # pairs each: the 12-minute film 12.9-13.4 s instead of 14.0-14.4 s, the 10-minute film 11.7-12.0 s
    # instead of 12.2-13.4 s, four 150 s cuts 12.5-12.8 s instead of 13.0-13.2 s (two pairs); 40 short
    # 320x180 clips unchanged (11.3 / 11.7 s against 10.9 / 12.0 s).
    #
    # Many videos (at least 4 per core) are decoded one per core with one thread each instead: frame
    # threads cost more per video (thread start, the pipeline's fill and drain at every file) and stall
    # whenever one of them waits for a core, while whole videos in parallel do not.  48 clips of 11-16 s
    # (720p24 + AAC) on 2 cores, alternating pairs: 16.8 / 17.4 s against 18.0 / 19.0 s; decoded alone,
    # 16 CPU-s on one thread against 17.2-18.2 on two.
    if videos is not None and videos >= VIDEOS_PER_CORE_FOR_ONE_THREAD * max(1, int(cpus)):
        n_decode, decode_threads = max(1, int(cpus)), 1
    else:
        n_decode = max(1, int(cpus // 2))
        decode_threads = max(1, int(cpus) // n_decode)
    decode_cpus = cpus / 2 / n_decode
    n_models = max(1, int(cpus // 8))
    models_cpus = cpus / 2 / n_models
    models = StagePlan(Resources(num_cpus=models_cpus), pool_size=n_models, threads=max(1, round(models_cpus)))
    return PipelinePlan(
        decode=StagePlan(Resources(num_cpus=decode_cpus), pool_size=n_decode, threads=decode_threads),
        image=models, audio=models, head=models, models=models,
    )


def plan_for_cluster(nodes: Sequence[tuple[float, ...]], *, device: str = "auto", videos: int | None = None
                     ) -> PipelinePlan:
    """A plan for a cluster of ``nodes`` (CPUs, GPUs and optionally Ray memory of each alive node), where every
    actor fits on one node, for a wave of ``videos`` videos (None: unknown).

    Sizing by the cluster's total alone can ask for actors larger than any node (1.5 CPUs on a cluster
    of 1-CPU nodes), which Ray never places: the job would wait forever.  Identical nodes get the
    single-node plan once per node; mixed nodes get the total's plan with each actor cut down to the
    smallest node (more actors, the same total).
    """
    alive = [n for n in nodes if n[0] > 0]
    if any(len(n) > 2 and n[2] < MEMORY_PER_CORE_FOR_ONE_THREAD * n[0] for n in alive):
        videos = None  # too little memory for a decoder per core: frame threads
    sizes = [(n[0], n[1]) for n in alive]
    if len(sizes) <= 1:
        cpus, gpus = sizes[0] if sizes else (1.0, 0.0)
        return plan_for(cpus, gpus, device=device, videos=videos)
    if len(set(sizes)) == 1:
        per_node = None if videos is None else videos // len(sizes)
        base = plan_for(*sizes[0], device=device, videos=per_node)
        return _map_stages(base, lambda sp: dataclasses.replace(sp, pool_size=sp.pool_size * len(sizes)))
    # mixed nodes: Ray Data spreads actors over the nodes, so small decoders everywhere could leave no node
    # room for a model worker cut to the smallest node; they keep the frame-thread plan
    base = plan_for(sum(c for c, _ in sizes), sum(g for _, g in sizes), device=device)
    smallest = min(c for c, _ in sizes)
    return _map_stages(base, lambda sp: _cap(sp, smallest))


def _cap(sp: StagePlan, max_cpus: float) -> StagePlan:
    if sp.resources.num_cpus <= max_cpus:
        return sp
    total = sp.resources.num_cpus * sp.pool_size
    n = math.ceil(total / max_cpus)
    per = total / n
    return dataclasses.replace(sp, resources=dataclasses.replace(sp.resources, num_cpus=per), pool_size=n,
                               threads=max(1, round(per)))


def _map_stages(plan: PipelinePlan, f: Callable[[StagePlan], StagePlan]) -> PipelinePlan:
    done: dict[int, StagePlan] = {}  # the model stages may share one StagePlan (one fused pool): map it once

    def once(sp: StagePlan) -> StagePlan:
        if id(sp) not in done:
            done[id(sp)] = f(sp)
        return done[id(sp)]

    return dataclasses.replace(plan, decode=once(plan.decode), image=once(plan.image), audio=once(plan.audio),
                               head=once(plan.head), models=once(plan.models) if plan.models is not None else None)
