"""SamplingParams.n: a request's n samples are each the answer that one request of that sample's
seed gets alone (their shared image features and copied prompt K/V change nothing), sample 0 is
the answer with n = 1, and each sample's log p is the reference's over its tokens."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.samples import sample_seed
from processing import Tokenizer
from tests.model.test_engine import overlap, setup  # noqa: F401  (tiny checkpoints, the reference)


def sampled(requests, n: int = 3, **settings) -> list:
    params = dict(max_new_tokens=8, temperature=1.5, top_k=40, seed=11, n=n) | settings
    return [replace(r, sampling=SamplingParams(**{**params, "seed": params["seed"] and params["seed"] + i}))
            for i, r in enumerate(requests)]


def alone(model, request, index: int, **engine) -> list[int]:
    """Sample `index` of `request`, asked as one request of n = 1 with that sample's seed."""
    p = request.sampling
    one = replace(request, sampling=replace(p, n=1, seed=sample_seed(p.seed, index), choice_logprobs=False))
    return LLMEngine(model, max_batch_size=1, share_prefixes=False, **engine).generate([one])[0].token_ids


def test_each_sample_is_the_answer_of_one_request_of_its_seed(setup, overlap):
    ours, requests, _, _, _ = setup
    asked = sampled(requests[:4])
    results = LLMEngine(ours, max_batch_size=5, overlap=overlap).generate(asked)
    assert [r.request_id for r in results] == [r.request_id for r in asked]
    for request, result in zip(asked, results):
        assert [s.request_id for s in result.samples] == [request.request_id] * 3
        assert result.samples[0].token_ids == result.token_ids
        assert [s.token_ids for s in result.samples] == [alone(ours, request, i) for i in range(3)]
        assert all(s.samples is None for s in result.samples)
    assert any(len({tuple(s.token_ids) for s in r.samples}) > 1 for r in results)   # samples differ
    one = LLMEngine(ours, max_batch_size=5).generate([replace(r, sampling=replace(r.sampling, n=1)) for r in asked])
    assert [r.token_ids for r in one] == [r.token_ids for r in results]
    assert all(r.samples is None for r in one)


def test_each_samples_logprob_is_the_references(setup):
    ours, requests, _, _, ref = setup
    asked = sampled(requests[:3], logprobs=True)
    for request, result in zip(asked, LLMEngine(ours, max_batch_size=4).generate(asked)):
        for sample in result.samples:
            ids = torch.tensor([request.prompt_ids + sample.token_ids])
            kwargs = {}
            if request.pixel_values is not None:
                kwargs = dict(pixel_values=request.pixel_values[None],
                              pixel_attention_mask=request.pixel_attention_mask[None])
            with torch.no_grad():
                logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0].float()
            n = len(request.prompt_ids)
            log_p = logits[n - 1:-1].log_softmax(-1)
            want = sum(log_p[i, t].item() for i, t in enumerate(sample.token_ids))
            assert sample.cumulative_logprob == pytest.approx(want, abs=2e-4)


def test_samples_of_choices_are_choices_and_the_request_is_scored_once(setup):
    ours, requests, _, tokenizer, _ = setup
    tokenizer = Tokenizer(tokenizer)
    choices = ("red", "blue square", "zebra")
    asked = sampled(requests[:3], n=4, max_new_tokens=24, choices=choices, choice_logprobs=True)
    results = LLMEngine(ours, tokenizer, max_batch_size=6).generate(asked)
    single = LLMEngine(ours, tokenizer, max_batch_size=6).generate(
        [replace(r, sampling=replace(r.sampling, n=1)) for r in asked])
    for result, one in zip(results, single):
        assert all(s.text.strip() in choices and s.finish_reason == "stop" for s in result.samples)
        assert result.choice_logprobs == pytest.approx(one.choice_logprobs, abs=1e-5)
        assert all(s.choice_logprobs is None for s in result.samples)


def test_streamed_requests_of_samples_come_back_once_with_every_sample(setup):
    ours, requests, _, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=3)
    asked = sampled(requests[:3], seed=None)
    engine.add_requests(asked)
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    assert sorted(r.request_id for r in seen) == sorted(r.request_id for r in asked)
    assert all(len(r.samples) == 3 and all(s.finish_reason in ("stop", "length") for s in r.samples) for r in seen)


def test_a_request_id_asked_again_about_another_image_is_answered_about_that_image(setup):
    """The image name the engine makes for a request's samples and scorers is new each time (a
    name made of the request id would find the first image's features and prompt K/V again)."""
    ours, requests, _, tokenizer, _ = setup
    engine = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=4)
    first = sampled([requests[0]], choices=("red", "blue"), choice_logprobs=True)[0]
    assert first.image_key is None
    engine.generate([first])
    again = replace(first, pixel_values=first.pixel_values.flip(-1))        # the same prompt, another image
    got = engine.generate([again])[0]
    fresh = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=4).generate([again])[0]
    assert [s.token_ids for s in got.samples] == [s.token_ids for s in fresh.samples]
    assert got.choice_logprobs == pytest.approx(fresh.choice_logprobs, abs=1e-6)


@pytest.mark.parametrize("n,temperature,message", [(0, 1.0, "n must be"), (2.0, 1.0, "n must be"),
                                                   (2, 0.0, "greedy answers would all be the same")])
def test_bad_sample_counts_are_refused(n, temperature, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(n=n, temperature=temperature)


def test_sample_seeds_depend_on_the_seed_and_the_index_only():
    assert sample_seed(5, 0) == 5 and sample_seed(None, 3) is None
    seeds = {sample_seed(s, i) for s in range(50) for i in range(1, 20)}
    assert len(seeds) == 50 * 19 and all(0 <= s < 1 << 62 for s in seeds)
