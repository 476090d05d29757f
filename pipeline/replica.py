"""A model replica's set-up: its device, dtype and CPU threads, the placement group of a
tensor-parallel one (its ranks on one node), and its engine (in the replica's actor, or a group of
rank actors)."""
from __future__ import annotations

from functools import partial

from .checkpoint import local_checkpoint
from .config import PipelineConfig

PLACEMENT_TIMEOUT_S = 600.0   # an autoscaling cluster may need minutes to add a node that fits a replica


def pick_device(config: PipelineConfig) -> str:
    import torch

    if config.device:
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


GROUP_PREFIX = "idefics3-tp"


def group_name_prefix(job_id: str) -> str:
    return f"{GROUP_PREFIX}-{job_id}-"


def replica_placement_group(bundle: dict, tp: int, timeout_s: float = PLACEMENT_TIMEOUT_S):
    """One bundle per rank, all on one node (STRICT_PACK), reserved by the replica itself. Not through
    Ray Data's ray_remote_args_fn: Ray Data also calls that to inspect the args (its issue detectors),
    and each call would reserve one more group, until the reserved CPUs starve the read tasks and the
    job hangs. Ray keeps a group until both its creator and the creator's job are gone, so the group is
    named after the job and the replica (a restarted replica keeps its actor id): a restarted replica
    first removes its predecessor's group, and the driver removes the job's groups at the end
    (release_replica_groups)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    context = ray.get_runtime_context()
    name = group_name_prefix(context.get_job_id()) + (context.get_actor_id() or "driver")
    try:
        remove_placement_group(ray.util.get_placement_group(name))
    except ValueError:   # no predecessor
        pass
    group = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=name)
    if not ray.wait([group.ready()], timeout=timeout_s)[0]:
        remove_placement_group(group)
        raise RuntimeError(f"tensor_parallel_size {tp}: no node could hold {tp} bundles of {bundle} within "
                           f"{timeout_s:.0f}s (cluster resources: {ray.cluster_resources()})")
    return group


def release_replica_groups() -> int:
    """Driver side, after a run: remove the placement groups this job's tp > 1 replicas reserved (Ray
    Data ends its actors, but their groups would live as long as the driver). Returns how many."""
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import remove_placement_group

    if not ray.is_initialized():      # the run failed before Ray started: nothing was reserved
        return 0
    prefix = group_name_prefix(ray.get_runtime_context().get_job_id())
    removed = 0
    for entry in placement_group_table().values():
        if entry["name"].startswith(prefix) and entry["state"] != "REMOVED":
            remove_placement_group(ray.util.get_placement_group(entry["name"]))
            removed += 1
    return removed


def replica_dtype(config: PipelineConfig, device: str):
    """`dtype`, else the device's own (model.loading.compute_dtype: float16 on GPUs without fast
    bfloat16). A tp > 1 replica's actor holds no GPU to ask: its ranks ask theirs (DEVICE_DTYPE)."""
    import torch

    from model.loading import DEVICE_DTYPE, compute_dtype

    if config.dtype:
        return getattr(torch, config.dtype)
    if config.tensor_parallel_size > 1 and device.startswith("cuda"):
        return DEVICE_DTYPE
    return compute_dtype(device)


def replica_kind(engine, device: str, tp: int) -> str:
    """How a loaded replica runs, as a run's summary counts its replicas: its device (a GPU's name),
    its dtype (a dtype left to the device is only known here) and its ranks: "cuda NVIDIA A10G
    bfloat16", "cpu float32", "cuda float16, 2 ranks". Never fails a replica: what it cannot tell, it says."""
    try:
        if tp > 1:
            return f"{device.split(':')[0]} {engine.shard_stats()[0]['dtype']}, {tp} ranks"
        import torch

        gpu = f" {torch.cuda.get_device_name(engine.device)}" if engine.device.type == "cuda" else ""
        return f"{engine.device.type}{gpu} {str(engine.dtype).removeprefix('torch.')}"
    except Exception as e:      # noqa: BLE001 (a count, not worth a replica)
        return f"{device} (dtype not known: {type(e).__name__})"


def cpu_threads(rank: dict) -> int:
    """A CPU replica's (or rank's) torch threads: its CPUs. Ray sets OMP_NUM_THREADS to them only
    where the environment has not (a cluster's OMP_NUM_THREADS=1 would leave a 30-CPU replica one)."""
    return max(1, int(rank.get("CPU", 1)))


def load_engine(config: PipelineConfig, device: str, tokenizer, rank: dict, placement=None, folder: str | None = None):
    """The engine of one replica: in this actor (tp 1, from `folder`, this node's copy of the
    checkpoint), or a RayTPGroup of one actor per rank, rank r taking bundle r (`rank`: its
    resources) of `placement`, this replica's placement group."""
    dtype, tp = replica_dtype(config, device), config.tensor_parallel_size
    threads = cpu_threads(rank) if device == "cpu" else None
    if tp > 1:
        from model.parallel.ray_group import RayTPGroup

        # Each rank copies a checkpoint named by URL to its own node (the ranks' node may not be this one's).
        fetch = partial(local_checkpoint, storage_options=config.storage_options)
        return RayTPGroup(config.model, tp, dtype=dtype, device_type=device.split(":")[0], tokenizer=tokenizer,
                          fetch=fetch, adapter=config.adapter,
                          placement_group=placement, num_cpus=rank["CPU"], cpu_threads=threads,
                          batches_in_flight=calls_in_flight(config), max_batch_size=config.max_batch_size,
                          step_timeout_s=config.step_timeout_s, compile=config.compile_decode)
    from model import Idefics3ForConditionalGeneration
    from model.engine import LLMEngine

    if threads:
        import torch

        torch.set_num_threads(threads)
    folder = folder or local_checkpoint(config.model, config.storage_options)
    adapter = config.adapter and local_checkpoint(config.adapter, config.storage_options)
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device, adapter=adapter)
    return LLMEngine(model, tokenizer=tokenizer, max_batch_size=config.max_batch_size, compile=config.compile_decode)


def calls_in_flight(config: PipelineConfig) -> int:
    """Batches a streaming replica takes at once: by default enough to refill every engine slot, and one more."""
    return config.batches_in_flight or -(-config.max_batch_size // config.batch_size) + 1
