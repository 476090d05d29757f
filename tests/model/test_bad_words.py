"""SamplingParams.bad_words_ids / generate(bad_words_ids=...): the tokens banned each step are
transformers' NoBadWordsLogitsProcessor's, and answers (greedy, beam search, left-padded batches)
are the reference's."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.bad_words import banned_by_bad_words, usable_bad_words
from tests.model.test_engine import overlap, setup  # noqa: F401  (tiny checkpoints, the reference)
from tests.model.test_generation import mixed_batch, pair  # noqa: F401


def test_bans_are_the_references_processors():
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    rng = random.Random(0)
    for _ in range(200):
        vocab, eos = 12, [rng.randrange(12)]
        words = [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
        ids = [rng.randrange(4) for _ in range(rng.randint(1, 9))]      # small ids: prefixes match often
        words = [[t % 4 for t in w[:-1]] + [w[-1]] for w in words]
        scores = NoBadWordsLogitsProcessor(words, eos)(torch.tensor([ids]), torch.zeros(1, vocab))
        want = sorted(torch.isinf(scores[0]).nonzero()[:, 0].tolist())
        assert banned_by_bad_words(ids, usable_bad_words(words, eos)) == want, (ids, words, eos)


def bad_words_of(expected: dict, requests) -> list[list[int]]:
    """Words the greedy answers hold: a first token, and two- and three-token runs from their middles."""
    answers = [expected[r.request_id] for r in requests]
    return [answers[0][:1], answers[1][1:3], answers[2][2:5], [requests[0].prompt_ids[-1], answers[0][0]]]


def reference_answer(ref, request, bad_words, **settings) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False, bad_words_ids=bad_words) | settings
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()


def test_each_answer_is_the_references_alone(setup, overlap):
    ours, requests, expected, _, ref = setup
    words = bad_words_of(expected, requests)
    asked = [replace(r, sampling=replace(r.sampling, bad_words_ids=words if i % 3 else ()))
             for i, r in enumerate(requests)]
    engine = LLMEngine(ours, max_batch_size=4, overlap=overlap)
    eos = sorted(engine.stop_ids)
    changed = 0
    for request, result in zip(asked, engine.generate(asked)):
        if not request.sampling.bad_words_ids:
            assert result.token_ids == expected[request.request_id]
            continue
        want = reference_answer(ref, request, words, eos_token_id=eos)
        assert result.token_ids == want, request.request_id
        changed += want != expected[request.request_id]
    assert changed >= 2


def test_beam_searches_avoid_them_as_the_reference(setup):
    from tests.model.test_beam_search import reference_beams

    ours, requests, expected, _, ref = setup
    words = bad_words_of(expected, requests)
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens, num_beams=3, n=2,
                                                bad_words_ids=words)) for r in requests[:4]]
    engine = LLMEngine(ours, max_batch_size=8)
    for request, result in zip(asked, engine.generate(asked)):
        want = reference_beams(ref, request, engine.stop_ids, bad_words_ids=words)[0]
        assert [s.token_ids for s in result.samples] == want, request.request_id


def test_generate_avoids_them_as_the_reference(pair):  # noqa: F811
    path, ours, ref = pair
    inputs = mixed_batch(path)
    start = inputs["input_ids"].shape[1]
    greedy = ref.generate(**inputs, max_new_tokens=10, do_sample=False)[:, start:].tolist()
    words = [greedy[0][:1], greedy[1][2:4], greedy[2][1:4], [inputs["input_ids"][0, -1].item(), greedy[0][0]]]
    for settings in (dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2, no_repeat_ngram_size=2)):
        kwargs = dict(max_new_tokens=10, do_sample=False, bad_words_ids=words, **settings)
        expected = ref.generate(**inputs, **kwargs)
        assert torch.equal(ours.generate(**inputs, **kwargs), expected), settings
    assert expected[:, start:].tolist() != greedy


def test_bad_words_that_are_not_token_ids_are_refused(setup):
    ours, requests, _, _, _ = setup
    with pytest.raises(ValueError, match="bad_words_ids holds"):
        SamplingParams(bad_words_ids=[[1, 2], []])
    with pytest.raises(ValueError, match="bad_words_ids holds"):
        SamplingParams(bad_words_ids=[[1, "a"]])
    vocab = ours.config.text_config.vocab_size
    bad = replace(requests[0], sampling=SamplingParams(bad_words_ids=[[1], [vocab]]))
    with pytest.raises(ValueError, match=f"request 'r0': bad_words_ids holds \\({vocab},\\)"):
        LLMEngine(ours).generate([bad])
