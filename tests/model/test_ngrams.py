"""SamplingParams.no_repeat_ngram_size: the banned tokens are those of transformers'
NoRepeatNGramLogitsProcessor (the prompt counted), and the engine's greedy answers equal
transformers' generate(no_repeat_ngram_size=n) on each request alone, whatever the batch and loop."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.ngrams import NGrams
from tests.model.test_engine import overlap, setup  # noqa: F401  (tiny checkpoints, the reference)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_banned_tokens_are_the_references(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = random.Random(n)
    processor = NoRepeatNGramLogitsProcessor(n)
    for length in (0, 1, 2, 3, 5, 9, 30, 80):
        ids = [rng.randrange(6) for _ in range(length)]
        if not ids:
            continue
        scores = processor(torch.tensor([ids]), torch.zeros(1, 6))
        want = [t for t in range(6) if scores[0, t] == float("-inf")]
        grown = NGrams(n, ids[:length // 2])
        grown.extend(ids[length // 2:])
        assert NGrams(n, ids).banned() == grown.banned() == want, (ids, n)


def reference(ref, request, n: int) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=request.sampling.max_new_tokens, do_sample=False, no_repeat_ngram_size=n)
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_answers_without_repeated_ngrams_equal_the_references(setup, overlap, n):
    ours, requests, expected, _, ref = setup
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=12, no_repeat_ngram_size=n if i % 4 else 0))
             for i, r in enumerate(requests)]
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(asked)
    changed = 0
    for request, result in zip(asked, results):
        k = request.sampling.no_repeat_ngram_size
        assert result.token_ids == reference(ref, request, k), request.request_id
        changed += k and result.token_ids[:len(expected[request.request_id])] != expected[request.request_id]
    assert changed                               # the bans changed some answers (random weights repeat)


def test_bans_apply_with_a_constraint_and_refuse_bad_sizes(setup):
    ours, requests, _, tokenizer, _ = setup
    from processing import Tokenizer

    engine = LLMEngine(ours, Tokenizer(tokenizer), max_batch_size=2)
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=16, regex="[a-z ]+", no_repeat_ngram_size=2))
             for r in requests[:2]]
    for result in engine.generate(asked):
        ids = asked[0].prompt_ids if result.request_id == asked[0].request_id else asked[1].prompt_ids
        seq = ids + result.token_ids
        grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert all(grams.count(g) == 1 for g in grams[len(ids) - 1:])      # no answer bigram seen before
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        SamplingParams(no_repeat_ngram_size=-1)
