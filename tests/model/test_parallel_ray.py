"""The tensor-parallel group as Ray actors (one per rank) in a STRICT_PACK placement group."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from model import Idefics3ForConditionalGeneration
from model.engine import Request
from model.parallel.ray_group import RayTPGroup
from tests.model.parallel_cases import reference_tokens, requests
from tests.pipeline.helpers import own_cluster

ray = pytest.importorskip("ray")
torch.set_num_threads(1)
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def cluster():
    with own_cluster(num_cpus=2, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}}):
        yield


def test_ray_group_matches_tp1(cluster, checkpoint):
    from ray.util.placement_group import placement_group, remove_placement_group

    path = checkpoint("tp_mqa")
    plain = Idefics3ForConditionalGeneration.from_pretrained(path)
    reqs = requests(path)
    want = reference_tokens(plain, reqs)
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready())
    tp = RayTPGroup(path, 2, placement_group=group, cpu_threads=1, timeout_s=120, batches_in_flight=2)
    try:
        assert [r.token_ids for r in tp.generate(reqs)] == want
        stats = tp.shard_stats()
        assert [s["rank"] for s in stats] == [0, 1]
        assert stats[0]["last_tokens"] == stats[1]["last_tokens"] == want
        # Two batches awaited side by side (the pipeline's model stage): rank 0 streams them together.
        long, short = requests(path, max_new_tokens=40), requests(path, max_new_tokens=4)
        alone = [reference_tokens(plain, part) for part in (long, short)]

        async def both():
            return await asyncio.gather(*(tp.answer(dict(enumerate(part))) for part in (long, short)))

        steps = tp.shard_stats()[0]["decode_steps"]
        outcomes = asyncio.run(both())
        assert [[out[i].token_ids for i in range(len(out))] for out in outcomes] == alone
        one_after_the_other = sum(max(map(len, tokens)) - 1 for tokens in alone)   # the prefill gives a token
        assert tp.shard_stats()[0]["decode_steps"] - steps < one_after_the_other
        # A row the engine refuses is its own error: no wait for a follower's death (2 s a batch with one)
        waits, check_alive = [], tp._check_alive
        tp._check_alive = lambda ray_, wait_s: (waits.append(wait_s), check_alive(ray_, wait_s))[1]
        outcomes = asyncio.run(tp.answer({"empty": Request("empty", []), 0: short[0]}))
        assert isinstance(outcomes["empty"], ValueError) and outcomes[0].token_ids == alone[1][0]
        assert waits == [0.0]
    finally:
        tp.close()
        remove_placement_group(group)


class Replica:
    """What the pipeline's model stage does: an actor in a capturing placement group builds the group."""

    def __init__(self, path):
        self.group = RayTPGroup(path, 2, cpu_threads=1, timeout_s=120)

    def generate(self, reqs):
        return [r.token_ids for r in self.group.generate(reqs)]

    def close(self):
        self.group.close()


def test_ray_group_built_inside_a_capturing_actor(cluster, checkpoint):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    path = checkpoint("idefics3")
    reqs = requests(path)
    want = reference_tokens(Idefics3ForConditionalGeneration.from_pretrained(path), reqs)
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready())
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    replica = ray.remote(Replica).options(num_cpus=0, scheduling_strategy=strategy).remote(path)
    try:
        assert ray.get(replica.generate.remote(reqs)) == want
        ray.get(replica.close.remote())
    finally:
        ray.kill(replica)
        remove_placement_group(group)


@pytest.mark.timeout(90, method="thread")     # a hang in ray.get: no signal reaches it
def test_ranks_that_no_node_can_hold_are_an_error_not_a_wait_for_ever(cluster, checkpoint):
    """A group rebuilt in its placement group after that group's node was lost, where no node left had room:
    its ranks waited for creation for ever, the run with them (a multi-node audit). The group is never
    placed here (bundles of 8 CPUs on a cluster of 2)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 8}, {"CPU": 8}], strategy="STRICT_PACK")
    try:
        with pytest.raises(RuntimeError, match=r"^the 2 ranks of a tensor-parallel replica did not start within 3s: "
                                               r"no node could hold them \(cluster resources: "):
            RayTPGroup(checkpoint("idefics3"), 2, placement_group=group, cpu_threads=1, timeout_s=3)
    finally:
        remove_placement_group(group)
