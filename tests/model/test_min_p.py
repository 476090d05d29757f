"""SamplingParams.min_p / generate(min_p=...): tokens less probable than min_p times the likeliest
(after temperature) are never drawn, as transformers' MinPLogitsWarper removes them."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.sampler import drop_below_min_p
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)
from tests.model.test_generation import mixed_batch, pair  # noqa: F401


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_the_kept_tokens_are_the_references(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    scores = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 3
    want = torch.isfinite(MinPLogitsWarper(min_p)(None, scores.clone()))
    got = torch.isfinite(drop_below_min_p(scores, torch.full((6,), math.log(min_p))))
    assert torch.equal(got, want) and 1 < int(want.sum()) < want.numel()


def test_generate_with_min_p_one_is_the_references_greedy(pair):  # noqa: F811
    """min_p 1 keeps only the likeliest token: sampling at any temperature answers greedily, for
    the reference and for us."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    greedy = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.7, top_k=0, min_p=1.0)
    assert torch.equal(ref.generate(**inputs, **kwargs), greedy)
    assert torch.equal(ours.generate(**inputs, **kwargs), greedy)


def test_engine_draws_no_token_below_min_p(setup):
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=8)
    params = dict(temperature=1.5, seed=7, top_logprobs=1)     # the tiny models' tokens lie within ~1.5 nats

    def gaps(**settings) -> list[float]:
        """Each drawn token's log p less the step's likeliest, over every request's answer."""
        asked = [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens, **params, **settings))
                 for r in requests]
        return [chosen - top[0][1] for res in engine.generate(asked)
                for chosen, top in zip(res.token_logprobs, res.top_logprobs)]

    bound = 1.5 * math.log(0.7)             # min_p compares probabilities after temperature
    assert min(gaps()) < bound              # without it, unlikely tokens are drawn
    kept = gaps(min_p=0.7)
    assert bound - 1e-4 <= min(kept) < -1e-3        # within the bound, and not only the likeliest
    greedy = [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens, temperature=2.0, min_p=1.0,
                                                 seed=3)) for r in requests]
    assert [r.token_ids for r in engine.generate(greedy)] == [expected[r.request_id] for r in requests]
    with pytest.raises(ValueError, match="min_p must be in"):
        SamplingParams(min_p=1.5)
