"""SamplingParams.top_logprobs: each generated token's log p and each step's k likeliest tokens'
(ids and log p of the raw logits, as vLLM's logprobs) equal transformers' generate(output_logits=True)
on each request alone, whatever the batch, the loop, and the neighbours that ask for none or fewer."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import overlap, reference_steps, setup  # noqa: F401  (tiny checkpoints, the reference)


def test_each_steps_top_tokens_equal_the_references(setup, overlap):
    ours, requests, _, _, ref = setup
    asked = [replace(r, sampling=replace(r.sampling, top_logprobs=[5, 0, 2, 20][i % 4], logprobs=i % 3 == 0))
             for i, r in enumerate(requests)]
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(asked)
    checked = 0
    for request, result in zip(asked, results):
        k = request.sampling.top_logprobs
        if not k:
            assert result.top_logprobs is None and result.token_logprobs is None
            continue
        tokens, chosen, top = reference_steps(ref, request, k)
        assert result.token_ids == tokens
        assert result.token_logprobs == pytest.approx(chosen, abs=2e-4)
        assert len(result.top_logprobs) == len(tokens) and all(len(step) == k for step in result.top_logprobs)
        for got, want in zip(result.top_logprobs, top):
            assert [i for i, _ in got] == [i for i, _ in want]
            assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=2e-4)
        if request.sampling.logprobs:
            assert result.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-3)
        checked += 1
    assert checked >= 5


def test_sampled_tokens_are_scored_as_drawn_and_samples_get_their_own(setup):
    """A sampled token need not be among the top k; its own log p is kept either way."""
    ours, requests, _, _, _ = setup
    hot = [replace(r, sampling=SamplingParams(max_new_tokens=6, temperature=2.0, seed=3, top_logprobs=1, n=2))
           for r in requests[:3]]
    for result in LLMEngine(ours, max_batch_size=6).generate(hot):
        for sample in result.samples:
            assert len(sample.token_logprobs) == len(sample.top_logprobs) == len(sample.token_ids)
            for token, chosen, (best, best_p) in zip(sample.token_ids, sample.token_logprobs,
                                                     (step[0] for step in sample.top_logprobs)):
                assert chosen <= best_p + 1e-6 and (token != best or chosen == pytest.approx(best_p))


@pytest.mark.parametrize("k", [-1, 21, 2.0])
def test_top_logprobs_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="top_logprobs must be an integer in"):
        SamplingParams(top_logprobs=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_top_logprobs_and_scored_continuations_as_on_cpu(setup):
    """On CUDA the top tokens come through pinned buffers with the step's tokens (overlapped,
    compiled, in CUDA graphs), and continuations are scored by the same prefill: as on the CPU."""
    import copy

    ours, requests, _, _, _ = setup
    model = copy.deepcopy(ours).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    asked = [replace(r, sampling=replace(r.sampling, top_logprobs=4), continuation_ids=[5, 6, 7] if i % 2 else None)
             for i, r in enumerate(requests)]
    on_cpu = LLMEngine(ours, max_batch_size=3).generate(asked)
    on_gpu = LLMEngine(model, max_batch_size=3).generate(asked)
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.token_ids == cpu.token_ids
        assert [[i for i, _ in step] for step in gpu.top_logprobs] == [[i for i, _ in step] for step in cpu.top_logprobs]
        assert gpu.token_logprobs == pytest.approx(cpu.token_logprobs, abs=1e-3)
        assert (gpu.continuation_logprobs is None) == (cpu.continuation_logprobs is None)
        if cpu.continuation_logprobs is not None:
            assert gpu.continuation_logprobs == pytest.approx(cpu.continuation_logprobs, abs=1e-3)
