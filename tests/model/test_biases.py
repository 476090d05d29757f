"""SamplingParams.sequence_bias, suppress_tokens and begin_suppress_tokens: the biases are
transformers' SequenceBiasLogitsProcessor's, and each engine answer (greedy, beam search, slots
reused, steps overlapped) is the reference's for its request alone."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.biases import bias_tensor, biases_after
from tests.model.test_bad_words import reference_answer
from tests.model.test_engine import overlap, setup  # noqa: F401  (tiny checkpoints, the reference)


def test_biases_are_the_references_processors():
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    rng = random.Random(0)
    for _ in range(200):
        vocab = 12
        entries = {tuple(rng.randrange(4) for _ in range(rng.randint(0, 3))) + (rng.randrange(vocab),):
                   float(rng.choice([-3.5, -1.0, 0.5, 2.25])) for _ in range(rng.randint(1, 6))}
        ids = [rng.randrange(4) for _ in range(rng.randint(1, 9))]      # small ids: prefixes match often
        pairs = [[list(k), v] for k, v in entries.items()]
        want = SequenceBiasLogitsProcessor(pairs)(torch.tensor([ids]), torch.zeros(1, vocab))
        got = bias_tensor([(0, biases_after(ids, SamplingParams(sequence_bias=pairs).sequence_bias))], 1, vocab, "cpu")
        torch.testing.assert_close(torch.zeros(1, vocab) if got is None else got, want, rtol=0, atol=1e-6)


def settings_of(expected: dict, requests) -> list[dict]:
    """Settings that change greedy answers: a bias against a row's second token and one towards another
    after its first; its third token suppressed; its first token kept from starting the answer."""
    answers = [expected[r.request_id] for r in requests]
    return [dict(sequence_bias={(answers[0][1],): -5.0, (answers[0][0], 7): 8.0}),
            dict(suppress_tokens=(answers[1][2],)),
            dict(begin_suppress_tokens=(answers[2][0],), sequence_bias={(answers[2][3],): 2.0})]


def reference_of(setting: dict) -> dict:
    bias = setting.get("sequence_bias")
    return {**setting, **({"sequence_bias": [[list(k), v] for k, v in bias.items()]} if bias else {})}


def test_each_answer_is_the_references_alone(setup, overlap):
    ours, requests, expected, _, ref = setup
    settings = settings_of(expected, requests)
    asked = [replace(r, sampling=replace(r.sampling, **settings[i % 4])) if i % 4 < 3 else r
             for i, r in enumerate(requests)]
    engine = LLMEngine(ours, max_batch_size=3, overlap=overlap)
    eos = sorted(engine.stop_ids)
    changed = 0
    for i, (request, result) in enumerate(zip(asked, engine.generate(asked))):
        if i % 4 == 3:
            assert result.token_ids == expected[request.request_id]
            continue
        want = reference_answer(ref, request, None, eos_token_id=eos, **reference_of(settings[i % 4]))
        assert result.token_ids == want, (request.request_id, settings[i % 4])
        changed += want != expected[request.request_id]
    assert changed >= 3


def test_beam_searches_follow_them_as_the_reference(setup):
    from tests.model.test_beam_search import reference_beams

    ours, requests, expected, _, ref = setup
    settings = settings_of(expected, requests)
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens, num_beams=3, n=2,
                                                **settings[i % 3])) for i, r in enumerate(requests[:3])]
    engine = LLMEngine(ours, max_batch_size=8)
    for i, (request, result) in enumerate(zip(asked, engine.generate(asked))):
        want = reference_beams(ref, request, engine.stop_ids, **reference_of(settings[i]))[0]
        assert [s.token_ids for s in result.samples] == want, (request.request_id, settings[i])


def test_suppressed_stop_ids_are_suppressed_too(setup):
    """Unlike a bad word, a suppressed stop id is never taken (as transformers'): the answer runs on."""
    ours, requests, expected, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=4)
    stopping = [replace(r, sampling=replace(r.sampling, stop_token_ids=(expected[r.request_id][1],)))
                for r in requests[:4]]
    stopped = engine.generate(stopping)
    assert all(result.finish_reason == "stop" and result.num_generated_tokens <= 2 for result in stopped)
    asked = [replace(r, sampling=replace(r.sampling, suppress_tokens=r.sampling.stop_token_ids)) for r in stopping]
    for request, before, result in zip(asked, stopped, engine.generate(asked)):
        assert result.num_generated_tokens > before.num_generated_tokens
        assert request.sampling.stop_token_ids[0] not in result.token_ids


def test_settings_that_are_not_token_ids_are_refused(setup):
    ours, requests, _, _, _ = setup
    for bad in ([[5]], {(): 1.0}, {5: float("nan")}, {5: float("inf")}, {-1: 1.0}, {5: "x"}):
        with pytest.raises(ValueError, match="sequence_bias"):
            SamplingParams(sequence_bias=bad)
    with pytest.raises(ValueError, match="suppress_tokens must be token ids"):
        SamplingParams(suppress_tokens=[1, "a"])
    assert SamplingParams(sequence_bias={"7": -1}).sequence_bias == (((7,), -1.0),)     # a JSON object's keys
    vocab = ours.config.text_config.vocab_size
    for sampling in (SamplingParams(sequence_bias={(1, vocab): 1.0}), SamplingParams(begin_suppress_tokens=[vocab])):
        with pytest.raises(ValueError, match=f"request 'r0': .* token id {vocab}, outside"):
            LLMEngine(ours).generate([replace(requests[0], sampling=sampling)])
