"""build_processor(config) -> (Dataset -> Dataset), as `ray.data.llm.build_processor`.

    read -> blocks of batch_size rows -> Preprocess (CPU actor pool) -> Generate (replica pool) -> write

Small blocks keep every stage streaming: each model call answers one block, and each answered
block is written (and checkpointed) as soon as it is done, so a killed job loses at most the
blocks in flight.
"""
from __future__ import annotations

from typing import Callable

import ray
import ray.data
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import PipelineConfig
from .generate import Generate
from .preprocess import Preprocess


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def on_gpu(config: PipelineConfig) -> bool:
    return config.device.startswith("cuda") if config.device else cluster_has_gpus()


def cpu_share(config: PipelineConfig) -> float:
    """1, or less when the actors would take every CPU of a small cluster (a laptop, a 2-core CI box):
    the read and write tasks and Ray's checkpoint filter need CPUs too, or the job waits forever."""
    if not ray.is_initialized():
        return 1.0
    total = ray.cluster_resources().get("CPU", 0)
    demand = config.cpu_workers * config.cpus_per_worker
    if not on_gpu(config):
        demand += config.replicas * config.cpus_per_replica * config.tensor_parallel_size
    free_for_actors = max(total - 2, 0.5)   # one CPU for tasks, one for the checkpoint filter actor
    return min(1.0, free_for_actors / demand)


def replica_resources(config: PipelineConfig, share: float = 1.0) -> dict:
    """Ray Data args of the model stage: GPUs per replica, or a STRICT_PACK placement group for TP."""
    gpu, tp = on_gpu(config), config.tensor_parallel_size
    cpus = config.cpus_per_replica * share
    if tp == 1:
        return {"num_gpus": 1 if gpu else 0, "num_cpus": cpus}
    bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": cpus}
    # The actor itself takes no device: its TP workers claim the bundles of its placement group.
    return {"num_gpus": 0, "num_cpus": 0, "ray_remote_args_fn": lambda: _tp_strategy(bundle, tp)}


def _tp_strategy(bundle: dict, tp: int) -> dict:
    group = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def build_processor(config: PipelineConfig) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    def process(ds: ray.data.Dataset) -> ray.data.Dataset:
        share = cpu_share(config)
        ds = ds.repartition(target_num_rows_per_block=config.batch_size)
        ds = ds.map_batches(Preprocess, fn_constructor_args=(config,), batch_size=config.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.cpu_workers),
                            num_cpus=config.cpus_per_worker * share)
        rank_cpus = 1.0 if on_gpu(config) else config.cpus_per_replica * share
        return ds.map_batches(Generate, fn_constructor_args=(config, rank_cpus), batch_size=config.batch_size,
                              batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.replicas),
                              **replica_resources(config, share))
    return process
