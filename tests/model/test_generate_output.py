"""generate(return_dict_in_generate=True, output_scores / output_logits): the reference's outputs
(scores, logits, beam search's sequences_scores and beam_indices) and compute_transition_scores."""
from __future__ import annotations

import pytest
import torch

from tests.model.test_generation import _likely_eos, mixed_batch, pair  # noqa: F401  (the fixture)

torch.set_num_threads(1)

DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


def assert_steps_close(ours: tuple, theirs: tuple) -> None:
    """Step for step, -inf where the reference's are (a dropped token), else within float32 noise."""
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


def test_greedy_scores_and_logits_are_the_references(pair):
    """Scores after the processors (penalty, n-gram bans, bad words, min_new_tokens' barred eos),
    raw logits, and the transition scores read from them, on a left-padded mixed batch."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    eos = _likely_eos(ref, inputs, 2, 1)
    kwargs = dict(max_new_tokens=10, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2,
                  min_new_tokens=2, bad_words_ids=[[7], [11, 12]], eos_token_id=eos, pad_token_id=0, **DICT)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert_steps_close(got.scores, expected.scores)
    assert_steps_close(got.logits, expected.logits)
    assert torch.isinf(got.scores[0][:, 7]).all()                       # a bad word, barred
    assert got.beam_indices is None and got.sequences_scores is None
    for normalize in (False, True):
        torch.testing.assert_close(
            ours.compute_transition_scores(got.sequences, got.scores, normalize_logits=normalize),
            ref.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=normalize),
            rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.generate(**inputs, **{**kwargs, "return_dict_in_generate": False}), got.sequences)


def test_sampled_scores_are_the_warpers_on_the_logits(pair):
    """Sampling: the scores are the reference's warpers (temperature, top-k, top-p, min-p) applied
    to the logits returned, each drawn token is among the kept ones, and asking for the scores does
    not change the answers (same seed)."""
    from transformers.generation import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper)

    path, ours, _ = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=30, top_p=0.9, min_p=0.02,
                  num_return_sequences=2)
    torch.manual_seed(5)
    plain = ours.generate(**inputs, **kwargs)
    torch.manual_seed(5)
    got = ours.generate(**inputs, **kwargs, **DICT)
    assert torch.equal(got.sequences, plain)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(30), TopPLogitsWarper(0.9),
                                   MinPLogitsWarper(0.02)])
    start = inputs["input_ids"].shape[1]
    for step, (scores, logits) in enumerate(zip(got.scores, got.logits)):
        expected = warpers(got.sequences[:, :start + step], logits.clone())
        assert torch.equal(torch.isinf(scores), torch.isinf(expected)), step
        torch.testing.assert_close(scores, expected)
        drawn = got.sequences[:, start + step]
        assert torch.isfinite(scores.gather(1, drawn[:, None])).all()
        assert (torch.isfinite(scores).sum(-1) <= 30).all()
    assert torch.isfinite(ours.compute_transition_scores(got.sequences, got.scores)).all()


@pytest.mark.parametrize("setting", [dict(num_beams=3), dict(num_beams=2, length_penalty=-0.5, early_stopping=True),
                                     dict(num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=2)],
                         ids=["3", "2-early", "3-processors"])
def test_beam_outputs_are_the_references(pair, setting):
    """Beam search: every hypothesis's sequences_scores and beam_indices, each step's processed log p
    and logits (a row a beam, from the first step on), and the transition scores, which sum to each
    hypothesis's log p; searches that end at different steps."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    eos = _likely_eos(ref, inputs, 3, 4)
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                  num_return_sequences=setting["num_beams"], **setting, **DICT)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.beam_indices, expected.beam_indices)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)
    assert_steps_close(got.scores, expected.scores)
    assert_steps_close(got.logits, expected.logits)
    transitions = ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices)
    torch.testing.assert_close(transitions, ref.compute_transition_scores(
        expected.sequences, expected.scores, expected.beam_indices), rtol=1e-4, atol=1e-4)
    if setting.get("length_penalty", 1.0) == 1.0:       # sequences_scores = log p / length
        lengths = (got.beam_indices >= 0).sum(-1)
        torch.testing.assert_close(transitions.sum(-1) / lengths, got.sequences_scores, rtol=1e-4, atol=1e-4)
    brief = ours.generate(**inputs, **{**kwargs, "output_scores": False, "output_logits": False})
    assert brief.scores is None and brief.logits is None and brief.sequences_scores is None
    assert torch.equal(brief.beam_indices, got.beam_indices)


@pytest.mark.parametrize("beams", [1, 2])
def test_output_has_the_references_fields_in_its_order(pair, beams):
    """attentions / hidden_states / cache were missing (AttributeError), `in` was always
    False, and a beam search output put scores, not sequences_scores, second."""
    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(1, 0))
    kwargs = dict(max_new_tokens=3, num_beams=beams, do_sample=False, **DICT)
    got, expected = ours.generate(**inputs, **kwargs), ref.generate(**inputs, **kwargs)
    assert list(got.keys()) == [k for k in expected.keys() if k != "cache"]      # its cache is not ours to give
    assert got.attentions is got.hidden_states is got.cache is got.past_key_values is None
    assert "scores" in got and "attentions" not in got and list(got) == list(got.keys())
    assert torch.equal(got[0], expected[0]) and type(got[1]) is type(expected[1]) and len(got[1]) == len(expected[1])
    assert dict(got).keys() == dict(got.items()).keys()


def test_output_reads_by_key_and_position(pair):
    path, ours, _ = pair
    inputs = mixed_batch(path, counts=(1, 0))
    out = ours.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert out.keys() == ["sequences", "scores"]
    assert out["sequences"] is out.sequences and out[0] is out.sequences and out[1] is out.scores
    assert len(out.scores) == 3 and out.scores[0].shape == (2, ours.config.text_config.vocab_size)
    assert torch.is_tensor(ours.generate(**inputs, max_new_tokens=3, output_scores=True))   # no dict asked
    with pytest.raises(ValueError, match="does not implement output_attentions=True"):
        ours.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True)


def test_forward_outputs_read_by_position_as_the_references(pair):  # noqa: F811
    """`model(**inputs)[0]` (common in older code) was a TypeError: the first set field, as transformers'."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)      # image labels left out too:
    labels = labels.masked_fill(labels == ours.config.image_token_id, -100)           # the documented difference
    with torch.no_grad():
        for extra in ({}, {"labels": labels}):
            got, want = ours(**inputs, **extra), ref(**inputs, **extra)
            torch.testing.assert_close(got[0], want[0])
            assert got.keys() == ["loss"] * bool(extra) + ["logits"] + ["image_hidden_states"]
            torch.testing.assert_close(got[int(bool(extra))], want.logits)
            assert len(got.to_tuple()) == len(got.keys()) and got["logits"] is got.logits
