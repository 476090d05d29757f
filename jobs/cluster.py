"""Which Ray cluster a job runs on: the one it is told of or finds, as ray.init() would, else its own."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from jobs.common import stop_on_signals, stops_held

log = logging.getLogger(__name__)
LOCAL_MIN_CPUS = 4


def cluster_to_join() -> str | None:
    """The address of the cluster ray.init() joins unasked: RAY_ADDRESS's (as under `ray job submit`),
    else the last cluster `ray start` made on this machine with Ray's default temp dir (its address
    file); None for a new local cluster (also when RAY_ADDRESS is "local", Ray's way to ask for one)."""
    # Ray's own rule (a private function of the pinned Ray): deciding otherwise than ray.init would
    # start a cluster beside the one ray.init then refuses to size.
    from ray._private.services import get_ray_address_from_environment

    try:
        address = get_ray_address_from_environment(None, None)
    except ConnectionError as e:    # RAY_ADDRESS=auto, and no cluster on the machine
        raise ValueError(f"RAY_ADDRESS=auto: {e}") from None
    if address and address.startswith("ray://"):
        raise ValueError(f"RAY_ADDRESS={address}: a Ray Client address, which a job cannot run through (its "
                         "writes need a driver on the cluster); submit it: ray job submit --address "
                         "http://HEAD:8265 --working-dir . -- python -m jobs.caption ...")
    return None if address in (None, "", "local") else address


def address_from_environment() -> bool:
    """Whether the cluster to join is RAY_ADDRESS's own, not one Ray found on the machine ("auto")."""
    import os

    return os.environ.get("RAY_ADDRESS", "") not in ("", "auto")


def refuse_silent_cluster(address: str, timeout_s: float = 5.0) -> None:
    """ray.init retries an address where no Ray cluster answers for minutes, saying only that the GCS
    timed out, and holds Ctrl-C meanwhile: a head stopped other than by `ray stop` (killed, or its
    container stopped) leaves its address file behind, and a dashboard's port taken for the cluster's
    answers TCP. So: a gRPC channel to it must come up (the GCS speaks gRPC), within timeout_s."""
    import grpc

    if "://" in address:        # an http:// address: Ray's own error names it
        return
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        if address_from_environment():
            raise ValueError(f"RAY_ADDRESS={address}: no Ray cluster answers there within {timeout_s:g} s (the "
                             "head's GCS address is wanted, host:6379 unless `ray start --port` said otherwise)") \
                from None
        from ray._common.utils import get_ray_address_file

        raise ValueError(f"the Ray cluster `ray start` made at {address} does not answer within {timeout_s:g} s: "
                         f"stopped without `ray stop`? Remove its address file {get_ray_address_file(None)}, or "
                         "set RAY_ADDRESS=local for a new cluster") from None
    finally:
        channel.close()


def local_cpus() -> int:
    """Logical CPUs of a cluster the job starts: those the machine gives it, counted as Ray counts them
    (a container's CPU limit, not the host's cores that os.cpu_count() sees: a pod of 6 CPUs on a
    64-core host had CPU replicas of 61 torch threads), at least LOCAL_MIN_CPUS."""
    from ray._private.utils import get_num_cpus

    return max(int(get_num_cpus(override_docker_cpu_warning=True)), LOCAL_MIN_CPUS)


def refuse_more_cpu_workers_than_cpus(workers: int | None, cpus_each: float) -> None:
    """A cluster this job starts has the machine's CPUs and no more: CPU workers beyond them add no speed,
    each is a process, and 50 of them on 4 CPUs stalled the machine (Ray's workers lost their GCS)."""
    cpus = local_cpus()
    if workers is not None and workers * cpus_each > cpus:
        raise ValueError(f"--cpu-workers {workers}: the cluster this job starts has {cpus} CPUs (this machine's, "
                         f"at least {LOCAL_MIN_CPUS}), "
                         f"{workers} workers of {cpus_each:g} CPU would need {workers * cpus_each:g}: use at most "
                         f"{int(cpus // cpus_each)}, or submit the job to a larger cluster (RAY_ADDRESS)")


def local_gpus() -> int | None:
    """GPUs a cluster the job starts would have, counted as Ray counts them (CUDA_VISIBLE_DEVICES
    heeded); None where Ray's private rule is gone (init_ray then asks the started cluster)."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        manager, count = ResourceAndLabelSpec._get_current_node_accelerator(None, {})
    except Exception:       # noqa: BLE001 (a private function of the pinned Ray, or a driver's own failure)
        return None
    return count if manager is not None and manager.get_resource_name() == "GPU" else 0


def refuse_cuda_without_gpus() -> None:
    raise ValueError("--device cuda: this machine has no GPU that Ray sees; use --device cpu, or submit the job to "
                     "a cluster with GPUs (RAY_ADDRESS)")


def check_cluster_fits(cpu_workers: int | None, cpus_per_worker: float = 1.0, device: str | None = None) -> None:
    """What init_ray would refuse about the cluster, asked before the job prepares its output (a fresh
    run's preparation removes an earlier run's answers: a refusal after it had cost them) and before
    a cluster starts (tens of seconds)."""
    import ray

    if not ray.is_initialized() and cluster_to_join() is None:      # a joined cluster may scale up
        refuse_more_cpu_workers_than_cpus(cpu_workers, cpus_per_worker)
        if device == "cuda" and local_gpus() == 0:
            refuse_cuda_without_gpus()


@contextmanager
def rays_sigterm_handler_left_out() -> Iterator[None]:
    """ray.init sets, first thing, a SIGTERM handler that exits without a word (status 15): a SIGTERM
    while it starts or joins the cluster stayed unsaid, and unheld by stops_held. Left out, the job's
    own handler (stop_on_signals) or hold takes it. Ray's private hook: where it is gone, nothing to do."""
    try:
        from ray._private import utils
    except ImportError:
        utils = None
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


@contextmanager
def cluster_out_of_the_jobs_process_group() -> Iterator[None]:
    """The processes of a cluster the job starts run in sessions of their own: a stop sent to the job's
    process group (plain `timeout`, a scheduler, a terminal's hang-up) reached them too, and the job,
    its cluster gone, waited a minute for the GCS and ended in status 1, not its own clean stop.
    They still end with the job: Ray's kernel fate-sharing (a parent-death signal) binds them to it;
    where that is missing Ray's reaper needs them in the job's group, so nothing changes. Ctrl-C is
    unchanged: Ray's processes block SIGINT. Ray's private hook: where it is gone, nothing to do."""
    try:
        from ray._private import services, utils

        popen, shares_fate = services.ConsolePopen, utils.detect_fate_sharing_support()
    except (ImportError, AttributeError):
        popen, shares_fate = None, False
    if popen is None or not shares_fate or sys.platform == "win32":
        yield
        return

    class PopenInOwnSession(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, start_new_session=True)

    services.ConsolePopen = PopenInOwnSession
    try:
        yield
    finally:
        services.ConsolePopen = popen


def init_ray(device: str | None = None) -> None:
    """Join the cluster of RAY_ADDRESS or of a `ray start` on this machine (cluster_to_join), else start
    a local one (its CPU workers checked against it by check_cluster_fits, before the job prepared its output).

    A local cluster gets at least 4 logical CPUs: Ray's read/write tasks, the checkpoint filter and
    the stage actors each hold one, and on a 2-core laptop they would otherwise wait for each other.
    `device` "cuda" on a local cluster without GPUs is refused (its replicas would wait for ever); on a
    joined one, said (an autoscaler may add GPU nodes)."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_to_join()
    if address:
        refuse_silent_cluster(address)
        how = "RAY_ADDRESS" if address_from_environment() else "`ray start`'s; RAY_ADDRESS=local for a new one"
        print(f"joining the Ray cluster at {address} ({how})", file=sys.stderr)
        try:
            # no address: ray.init takes the same, and only then turns on the token a `ray start` head asks for
            with rays_sigterm_handler_left_out():
                ray.init(logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ValueError(f"{e} ({how})") from None
    else:
        try:
            # starting a cluster forks; joining one does not
            with stops_held(), rays_sigterm_handler_left_out(), cluster_out_of_the_jobs_process_group():
                ray.init(address="local", num_cpus=local_cpus(), logging_level=logging.WARNING)
        except Exception as e:      # noqa: BLE001 (Ray's own: "The current node timed out during startup")
            from pipeline.errors import StartFailed

            raise StartFailed(f"the local Ray cluster did not start ({type(e).__name__}: {e}): a busy machine? "
                              "Run the job again, or join a running cluster (RAY_ADDRESS)") from None
    stop_on_signals()
    if device == "cuda" and not ray.cluster_resources().get("GPU", 0):
        if not address:
            ray.shutdown()
            refuse_cuda_without_gpus()
        log.warning("--device cuda: the cluster has no GPU now; the model stage waits for one (an autoscaling "
                    "cluster adds GPU nodes)")
