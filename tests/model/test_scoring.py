"""SamplingParams.choice_logprobs: each choice's log-probability equals transformers' forward pass
over the prompt and the choice's tokens (each spelling: as written and after one space), plus any
stop token after them; the answer itself is what the request answers without scores."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from processing import Tokenizer
from tests.model.test_continuation import reference_log_softmax
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)

CHOICES = ("red circle", "red", "blue square", "zebra crossing")


def reference_scores(ref, tokenizer, request, stop_ids) -> dict[str, float]:
    """log p(spelling, then a stop token) from one forward pass each, summed over both spellings."""
    scores = {}
    for choice in request.sampling.choices:
        spellings = []
        for text in (choice, " " + choice):
            forced = tokenizer.encode(text, add_special_tokens=False)
            log_p = reference_log_softmax(ref, request, forced)
            spelled = sum(log_p[i, t].item() for i, t in enumerate(forced))
            spellings.append(spelled + log_p[len(forced), sorted(stop_ids)].logsumexp(-1).item())
        scores[choice] = math.log(sum(math.exp(s) for s in spellings))
    return scores


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_choice_scores_equal_the_reference_and_leave_the_answer_alone(setup, overlap):
    ours, requests, expected, tokenizer, ref = setup
    tokenizer = Tokenizer(tokenizer)
    engine = LLMEngine(ours, tokenizer, max_batch_size=4, overlap=overlap)
    stop_ids = frozenset(engine.stop_ids)
    mixed = []
    for i, r in enumerate(requests):
        sampling = replace(r.sampling, max_new_tokens=12, choices=CHOICES[i % 2:], choice_logprobs=i % 3 != 2)
        mixed.append(replace(r, sampling=sampling) if i % 4 != 3 else r)
    results = engine.generate(mixed)
    plain = LLMEngine(ours, tokenizer, max_batch_size=4).generate(
        [replace(r, sampling=replace(r.sampling, choice_logprobs=False)) for r in mixed if r.sampling.choices])
    assert [r.token_ids for r, q in zip(results, mixed) if q.sampling.choices] == [r.token_ids for r in plain]
    scored = 0
    for request, result in zip(mixed, results):
        if not request.sampling.choice_logprobs:
            assert result.choice_logprobs is None
            continue
        want = reference_scores(ref, tokenizer, request, stop_ids)
        assert result.choice_logprobs.keys() == want.keys()
        for choice, score in want.items():
            assert result.choice_logprobs[choice] == pytest.approx(score, abs=2e-4), choice
        scored += 1
    assert scored >= 4
    assert [r.request_id for r in results] == [r.request_id for r in mixed]


def test_streamed_results_wait_for_their_scores(setup):
    """step() returns a scored request once, when its answer and all its scores are done, and
    never the sequences that score it."""
    ours, requests, _, tokenizer, _ = setup
    engine = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=3)
    chosen = [replace(r, sampling=SamplingParams(max_new_tokens=4, choices=("red", "blue square and more"),
                                                 choice_logprobs=True)) for r in requests[:3]]
    engine.add_requests(chosen)
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    assert sorted(r.request_id for r in seen) == sorted(r.request_id for r in chosen)
    assert all(set(r.choice_logprobs) == {"red", "blue square and more"} for r in seen)
    assert all(all(v is not None and v < 0 for v in r.choice_logprobs.values()) for r in seen)


def test_choice_scores_need_choices():
    with pytest.raises(ValueError, match="give some"):
        SamplingParams(choice_logprobs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_choice_scores_as_on_cpu(setup):
    """CUDA's defaults (compiled step in graphs, overlapped steps) with scored rows among others."""
    import copy

    ours, requests, _, tokenizer, _ = setup
    torch.backends.cuda.matmul.allow_tf32 = False
    chosen = [replace(r, sampling=replace(r.sampling, max_new_tokens=8, choices=CHOICES, choice_logprobs=True))
              if i % 2 else r for i, r in enumerate(requests)]
    on_cpu = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=3).generate(chosen)
    on_gpu = LLMEngine(copy.deepcopy(ours).to("cuda"), Tokenizer(tokenizer), max_batch_size=3).generate(chosen)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert (gpu.choice_logprobs is None) == (cpu.choice_logprobs is None)
        assert gpu.choice_logprobs is None or gpu.choice_logprobs == pytest.approx(cpu.choice_logprobs, abs=1e-3)


def test_a_choice_a_set_kv_budget_cannot_score_scores_none_and_fails_nothing(setup):
    """With kv_cache_tokens set, a choice whose prompt and spelling outgrow one slot scores None, as one
    past the context; it failed the step of every request beside it."""
    ours, requests, _, tokenizer, _ = setup
    tokenizer = Tokenizer(tokenizer)
    long = " ".join(["zebra crossing"] * 8)
    assert len(requests[1].prompt_ids) < 250
    prompt = requests[1].prompt_ids + [5] * (250 - len(requests[1].prompt_ids))
    asked = replace(requests[1], request_id="scored", prompt_ids=prompt,
                    sampling=SamplingParams(max_new_tokens=3, choices=(long, "red"), choice_logprobs=True))
    engine = LLMEngine(ours, tokenizer, max_batch_size=4, kv_cache_tokens=256)
    engine.check_request(asked)
    scored, other = engine.generate([asked, requests[2]])
    assert scored.error is None and scored.choice_logprobs[long] is None and scored.choice_logprobs["red"] < 0
    assert other.token_ids == LLMEngine(ours, tokenizer, max_batch_size=4).generate([requests[2]])[0].token_ids
