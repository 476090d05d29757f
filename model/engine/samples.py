"""Several answers to one request (SamplingParams.n, as vLLM's n and transformers'
num_return_sequences): for data generation, best-of-n reranking, self-consistency votes.

The engine answers a request of n samples with n sequences: the request's own and n - 1 siblings,
which share its image's features and its prompt's K/V (the image cache and the prefix cache copy
them: a sibling prefills one token) and sample with seeds of their own. Sample i's seed depends on
the request's seed and i only, so each sample is the answer that one request of that seed would
get, whatever the batch; sample 0 is the answer of the request with n = 1.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Callable

from .continuation import unfolded
from .scheduler import Sequence
from .types import Request, Result

SAMPLE_ID = "\x1fsample"


def sample_seed(seed: int | None, index: int) -> int | None:
    """Sample `index`'s seed: the request's for sample 0; None (drawn at admission) where it has none."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def sample_requests(request: Request) -> list[Request]:
    """The requests of samples 1..n-1 of `request` (its image named, so that they share its
    features and prompt prefix)."""
    p = request.sampling
    return [replace(request, request_id=f"{request.request_id}{SAMPLE_ID}{i}",
                    sampling=replace(p, n=1, seed=sample_seed(p.seed, i), choice_logprobs=False))
            for i in range(1, p.n)]


def add_samples(seq: Sequence, make_sequence: Callable[[Request], Sequence]) -> list[Sequence]:
    """The sequences of `seq`'s other samples, made by `make_sequence`."""
    for request in sample_requests(unfolded(seq.request, seq.scored)):    # each scores the continuation too
        sibling = make_sequence(request)
        sibling.parent = seq
        seq.samples.append(sibling)
    return seq.samples


def with_samples(result: Result, siblings: list[Result]) -> Result:
    """`result` holding every sample's answer, its own first, each named after the request."""
    own = replace(result, choice_logprobs=None)
    result.samples = [own, *(replace(s, request_id=result.request_id) for s in siblings)]
    return result
