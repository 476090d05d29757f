"""Every engine feature at once: sampled and greedy rows, repetition penalties, logprobs, stop
strings, min_new_tokens, questions sharing an image (features and prompt prefixes), streamed in a
random order into few or many slots; each answer equals that request run alone (whose answers the
other engine tests check against transformers, feature by feature)."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, Request, SamplingParams
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)

torch.set_num_threads(1)


def mixed_requests(base: list[Request], image_token_id: int, rng: random.Random) -> list[Request]:
    """Three requests a base row: its prompt, and two other questions about its image (if any)."""
    out = []
    for i, r in enumerate(base):
        for j in range(3):
            ids, key = list(r.prompt_ids), None
            if r.pixel_values is not None:
                key = f"image-{i}"
                end = max(k for k, t in enumerate(ids) if t == image_token_id) + 2
                ids = ids[:end] + base[rng.randrange(len(base))].prompt_ids[-rng.randint(3, 9):] if j else ids
            greedy = rng.random() < 0.5
            params = SamplingParams(max_new_tokens=rng.randint(1, 14),
                                    temperature=0.0 if greedy else rng.choice([0.7, 1.3]),
                                    top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.8]), seed=rng.randrange(1000),
                                    repetition_penalty=rng.choice([1.0, 1.3, 0.8]), logprobs=rng.random() < 0.5,
                                    presence_penalty=rng.choice([0.0, 0.0, 1.5]),
                                    frequency_penalty=rng.choice([0.0, 0.0, 0.7]))
            params = replace(params, min_new_tokens=rng.randint(0, params.max_new_tokens // 2))
            out.append(Request(f"r{i}-{j}", ids, r.pixel_values, r.pixel_attention_mask, params, image_key=key))
    return out


def alone(model, tokenizer, request: Request):
    return LLMEngine(model, tokenizer, max_batch_size=1, share_prefixes=False).generate([request])[0]


def with_stop_strings(requests, answers, model, tokenizer, rng):
    """Some requests get a stop string cut from their own answer (so that it ends early)."""
    out = []
    for r in requests:
        text = tokenizer.decode(answers[r.request_id].token_ids, skip_special_tokens=False)
        if rng.random() < 0.4 and len(text) > 4:
            start = rng.randrange(len(text) - 2)
            r = replace(r, sampling=replace(r.sampling, stop=(text[start:start + rng.randint(1, 3)],)))
            answers[r.request_id] = alone(model, tokenizer, r)
        out.append(r)
    return out


def streamed(engine: LLMEngine, requests: list[Request], rng: random.Random) -> dict:
    got, pending = {}, list(requests)
    while pending or engine.has_unfinished():
        if pending and (not engine.has_unfinished() or rng.random() < 0.3):
            n = rng.randint(1, 5)
            engine.add_requests(pending[:n])
            pending = pending[n:]
        got.update({r.request_id: r for r in engine.step()})
    return got


@pytest.mark.parametrize("seed", [0])
def test_every_feature_streamed_in_any_order_answers_as_alone(setup, seed):
    model, base, _, tokenizer, _ = setup
    rng = random.Random(seed)
    requests = mixed_requests(base, model.config.image_token_id, rng)
    answers = {r.request_id: alone(model, tokenizer, r) for r in requests}
    requests = with_stop_strings(requests, answers, model, tokenizer, rng)
    assert any(a.finish_reason == "stop" for a in answers.values())
    for slots, overlap, batched, budget in [(3, True, False, 64), (16, False, True, 8192)]:
        order = rng.sample(requests, len(requests))
        engine = LLMEngine(model, tokenizer, max_batch_size=slots, overlap=overlap, batched_prefill=batched,
                           max_prefill_tokens=budget)
        got = streamed(engine, order, rng)
        for rid, want in answers.items():
            have = got[rid]
            assert (have.token_ids, have.finish_reason) == (want.token_ids, want.finish_reason), (slots, rid)
            if want.cumulative_logprob is not None:
                assert have.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3), (slots, rid)
        assert engine.stats["prefix_tokens_reused"] > 0
