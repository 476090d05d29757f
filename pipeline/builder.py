"""build_processor(config) -> (Dataset -> Dataset), as `ray.data.llm.build_processor`.

    read -> blocks of batch_size rows -> Preprocess (CPU actor pool) -> Generate (replica pool) -> write

A replica (one device, or a tensor-parallel group) takes several blocks at once and streams their
rows through one engine (Generate).

Small blocks keep every stage streaming: each model call answers one block, and each answered
block is written (and checkpointed) as soon as it is done, so a killed job loses at most the
blocks in flight.
"""
from __future__ import annotations

from typing import Callable

import ray
import ray.data

from .config import PipelineConfig
from .generate import Generate
from .generation_defaults import resolved as resolved_generation_config
from .preprocess import Preprocess
from .replica import calls_in_flight


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def on_gpu(config: PipelineConfig) -> bool:
    return config.device.startswith("cuda") if config.device else cluster_has_gpus()


RESERVED_CPUS = 2      # one CPU for the read and write tasks, one for the checkpoint filter actor


def node_cpus() -> list[float]:
    """CPUs of each alive node of the cluster."""
    if not ray.is_initialized():
        return [1.0]
    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] or \
        [ray.cluster_resources().get("CPU", 0.0)]


def fitting_cpus(nodes: list[float], replicas: int, tp: int, reserve: float) -> int:
    """The most CPUs each rank of `replicas` replicas can hold, a replica's `tp` ranks on one node
    (their placement group packs them), with `reserve` CPUs of the cluster left over; at least 1."""
    for cpus in range(int(max(nodes)) // tp, 1, -1):
        fits = sum(int(n // (cpus * tp)) for n in nodes) >= replicas
        if fits and cpus * tp * replicas <= sum(nodes) - reserve:
            return cpus
    return 1


def replica_cpu_count(config: PipelineConfig) -> float:
    """CPUs of a model replica (of each rank of a tensor-parallel one): `cpus_per_replica`, else 1
    beside a GPU, and on a CPU-only run the most that its replicas can hold with one preprocessing
    actor's CPU and Ray Data's reserved ones left: on CPUs the model is the work (~20x a row's
    preprocessing), and its torch runs a thread a CPU (replica.cpu_threads)."""
    if config.cpus_per_replica is not None:
        return config.cpus_per_replica
    if on_gpu(config):
        return 1.0
    reserve = RESERVED_CPUS + config.cpus_per_worker
    return float(fitting_cpus(node_cpus(), replica_count(config), config.tensor_parallel_size, reserve))


def replica_nodes(nodes: list[float]) -> int:
    """CPU-only: the nodes that hold a replica each, those of at least half the largest's CPUs (a
    small head node would otherwise shrink every replica to its size: fitting_cpus is uniform)."""
    return sum(n >= max(nodes) / 2 for n in nodes)


def replica_count(config: PipelineConfig) -> int:
    """`replicas`, else one per `tensor_parallel_size` GPUs of the cluster (all of them), or on a
    CPU-only cluster one a node (replica_nodes)."""
    if config.replicas is not None:
        return config.replicas
    if not on_gpu(config):
        return replica_nodes(node_cpus())
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return max(1, int(gpus // config.tensor_parallel_size))


def replica_cpus(config: PipelineConfig) -> float:
    """CPUs the model replicas claim; on GPU nodes they are not counted (those have CPUs to spare)."""
    return 0.0 if on_gpu(config) else replica_count(config) * replica_cpu_count(config) * config.tensor_parallel_size


def cpu_worker_range(config: PipelineConfig) -> tuple[int, int]:
    """(min, max) preprocessing actors: `cpu_workers` exactly, else from 1 up to what the cluster's
    CPUs allow after the replicas and the reserved ones; Ray Data adds actors while the pool is busy
    with rows waiting, so one slow image decoder does not starve a fast GPU."""
    if config.cpu_workers is not None:
        return config.cpu_workers, config.cpu_workers
    total = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    spare = total - replica_cpus(config) - RESERVED_CPUS
    return 1, max(1, int(spare // config.cpus_per_worker))


def cpu_share(config: PipelineConfig) -> float:
    """1, or less when the actors would take every CPU of a small cluster (a laptop, a 2-core CI box):
    the read and write tasks and Ray's checkpoint filter need CPUs too, or the job waits forever."""
    if not ray.is_initialized():
        return 1.0
    total = ray.cluster_resources().get("CPU", 0)
    demand = cpu_worker_range(config)[1] * config.cpus_per_worker + replica_cpus(config)
    free_for_actors = max(total - RESERVED_CPUS, 0.5)
    return min(1.0, free_for_actors / demand)


def replica_resources(config: PipelineConfig, share: float = 1.0) -> dict:
    """Ray Data args of the model stage. A tp > 1 replica takes no device itself: its rank actors claim
    the bundles of the placement group it makes (replica.replica_placement_group). Ray Data restarts
    a dead replica and retries its batch there by default (max_restarts and max_task_retries -1;
    passing them is deprecated: tests/pipeline/test_replica_restart.py fails if that default changes)."""
    if config.tensor_parallel_size > 1:
        return {"num_gpus": 0, "num_cpus": 0}
    return {"num_gpus": 1 if on_gpu(config) else 0, "num_cpus": replica_cpu_count(config) * share}


def build_processor(config: PipelineConfig, stats: str | None = None, *,
                    checkpoint_defaults: bool = True) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """The CPU stage then the model stage; `stats`: the run's counter the replicas report to (pipeline.run_stats).
    checkpoint_defaults: the checkpoint's generation_config.json decides the settings the config leaves
    at their defaults (pipeline.generation_defaults; run_job's config has them already)."""
    if checkpoint_defaults:
        config, _ = resolved_generation_config(config)

    def process(ds: ray.data.Dataset) -> ray.data.Dataset:
        share = cpu_share(config)
        fewest, most = cpu_worker_range(config)
        ds = ds.repartition(target_num_rows_per_block=config.batch_size)
        ds = ds.map_batches(Preprocess, fn_constructor_args=(config,), batch_size=config.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=fewest, max_size=most),
                            num_cpus=config.cpus_per_worker * share)
        rank = {"GPU": 1, "CPU": 1} if on_gpu(config) else {"CPU": replica_cpu_count(config) * share}
        pool = ray.data.ActorPoolStrategy(size=replica_count(config),
                                          max_concurrent_calls_per_actor=calls_in_flight(config))
        return ds.map_batches(Generate, fn_constructor_args=(config, rank, stats), batch_size=config.batch_size,
                              batch_format="pyarrow", compute=pool, **replica_resources(config, share))
    return process
