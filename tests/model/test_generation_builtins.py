"""generate()'s remaining transformers settings: suppress_tokens, begin_suppress_tokens,
forced_bos / forced_eos_token_id, min_length, renormalize_logits, max_time, and transformers 5's
default length (20 new tokens): the reference's tokens (and scores) on mixed left-padded batches."""
from __future__ import annotations

import pytest
import torch

from tests.model.test_generation import mixed_batch, pair  # noqa: F401  (the fixture)

torch.set_num_threads(1)
MAX_NEW = 8


def answers(ref, inputs, **kwargs) -> torch.Tensor:
    return ref.generate(**inputs, max_new_tokens=MAX_NEW, **kwargs)[:, inputs["input_ids"].shape[1]:]


def test_suppressed_tokens_are_the_references(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    plain = answers(ref, inputs)
    settings = [dict(suppress_tokens=plain[:, 2].tolist()), dict(begin_suppress_tokens=plain[:, 0].tolist()),
                dict(suppress_tokens=plain[:, 3].tolist(), begin_suppress_tokens=plain[:, 0].tolist(), num_beams=2)]
    for setting in settings:
        expected = ref.generate(**inputs, max_new_tokens=MAX_NEW, **setting)
        assert torch.equal(ours.generate(**inputs, max_new_tokens=MAX_NEW, **setting), expected), setting
        assert not torch.equal(expected[:, inputs["input_ids"].shape[1]:], plain), setting


def test_forced_tokens_are_the_references(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    for setting in (dict(forced_eos_token_id=[5, 9]), dict(forced_eos_token_id=7, num_beams=2)):
        expected = ref.generate(**inputs, max_new_tokens=MAX_NEW, **setting)
        assert torch.equal(ours.generate(**inputs, max_new_tokens=MAX_NEW, **setting), expected), setting
        assert expected[:, -1].tolist() != answers(ref, inputs)[:, -1].tolist()
    one = dict(input_ids=torch.tensor([[1]]), attention_mask=torch.ones(1, 1, dtype=torch.int64))
    forced = ref.generate(**one, max_new_tokens=4, forced_bos_token_id=11)       # a 1-token prompt
    setting = dict(max_new_tokens=4, forced_bos_token_id=11, begin_suppress_tokens=[int(forced[0, 2])])
    expected = ref.generate(**one, **setting)        # the token after the forced one is the first suppressed
    assert forced[0, 1] == expected[0, 1] == 11 and expected[0, 2] != forced[0, 2]
    assert torch.equal(ours.generate(**one, **setting), expected)


def test_min_length_counts_the_prompt_and_min_new_tokens_wins(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    prompt_len = inputs["input_ids"].shape[1]
    stop = answers(ref, inputs)[:, 1].tolist()          # each row's second token ends the answers...
    for setting in (dict(min_length=prompt_len + 4), dict(min_length=prompt_len + 6, min_new_tokens=3),
                    dict(min_length=prompt_len + 4, num_beams=2)):
        expected = ref.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=stop, **setting)
        assert torch.equal(ours.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=stop, **setting),
                           expected), setting
    early = ref.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=stop)
    assert early.shape[1] < expected.shape[1]           # ... unless min_length holds them


@pytest.mark.parametrize("setting", [dict(), dict(num_beams=2, num_return_sequences=2)], ids=["greedy", "beams"])
def test_renormalized_scores_are_the_references(pair, setting):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=6, repetition_penalty=1.5, renormalize_logits=True, return_dict_in_generate=True,
                  output_scores=True, **setting)
    expected, got = ref.generate(**inputs, **kwargs), ours.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for mine, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert torch.logsumexp(got.scores[0], dim=-1).abs().max() < 1e-4          # log p: each row sums to 1
    if setting:
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)


def test_max_time_and_the_default_length_are_the_references(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    expected = ref.generate(**inputs, max_new_tokens=MAX_NEW, max_time=1e-9)      # out of time after a token
    assert expected.shape[1] == inputs["input_ids"].shape[1] + 1
    assert torch.equal(ours.generate(**inputs, max_new_tokens=MAX_NEW, max_time=1e-9), expected)
    beams = dict(max_new_tokens=MAX_NEW, max_time=1e-9, num_beams=2, num_return_sequences=2)
    assert torch.equal(ours.generate(**inputs, **beams), ref.generate(**inputs, **beams))
    expected = ref.generate(**inputs)           # neither max_new_tokens nor max_length: 20 new tokens
    assert expected.shape[1] == inputs["input_ids"].shape[1] + 20
    assert torch.equal(ours.generate(**inputs), expected)


def test_the_default_length_runs_past_the_text_models_positions_as_the_reference(pair):
    """Neither length set: 20 new tokens, where the prompt nearly fills the text model's positions too
    (the reference caps at the top-level config's max_position_embeddings, which Idefics3's has not)."""
    path, ours, ref = pair
    n = ours.config.text_config.max_position_embeddings - 8
    ids = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = ref.generate(**inputs)
    assert expected.shape[1] == n + 20
    assert torch.equal(ours.generate(**inputs), expected)


@pytest.mark.parametrize("setting", [dict(), dict(repetition_penalty=1.7), dict(num_beams=2, num_return_sequences=2)],
                         ids=["greedy", "penalty", "beams"])
def test_sequence_bias_is_the_references(pair, setting):
    """One-token biases, and a two-token one on the token after each row's first answer token
    (left padding in the batch: the reference reads it too); before the repetition penalty."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    plain = answers(ref, inputs, **setting)
    bias = {(int(plain[0, 1]),): -4.0, (int(plain[1, 2]),): 3.5,
            (int(plain[0, 0]), int(plain[0, 1])): -2.5, (int(plain[1, 0]), 9): 6.0}
    kwargs = dict(max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True,
                  sequence_bias=[[list(ids), b] for ids, b in bias.items()], **setting)
    expected, got = ref.generate(**inputs, **kwargs), ours.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert not torch.equal(expected.sequences[:, inputs["input_ids"].shape[1]:], plain)
    for mine, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    as_dict = ours.generate(**inputs, max_new_tokens=MAX_NEW, sequence_bias=bias, **setting)   # the dict form too
    assert torch.equal(as_dict, expected.sequences)


def test_sequence_bias_outside_the_vocabulary_is_refused(pair):
    path, ours, _ = pair
    with pytest.raises(ValueError, match="sequence_bias holds token id 100000"):
        ours.generate(**mixed_batch(path), max_new_tokens=2, sequence_bias={(3, 100000): 1.0})


def test_a_first_step_of_fewer_candidates_than_beams_takes_the_prompts_copies_as_the_reference(pair):
    """The reference starts num_beams copies of the prompt (all but one scored -1e9): where the first
    step allows one token (a forced one, a prefix_allowed_tokens_fn of one), the copies carry it."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    one = dict(input_ids=torch.tensor([[1]]), attention_mask=torch.ones(1, 1, dtype=torch.int64))
    out = dict(return_dict_in_generate=True, output_scores=True)
    for given, setting in ((inputs, dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [40], max_new_tokens=4,
                                          num_beams=3, num_return_sequences=2, **out)),
                           (one, dict(forced_bos_token_id=40, max_new_tokens=3, num_beams=3, num_return_sequences=3,
                                      **out))):
        expected, got = ref.generate(**given, **setting), ours.generate(**given, **setting)
        assert torch.equal(got.sequences, expected.sequences)
        if given is one:        # (the copies tie at -1e9 in float32: which one torch.topk names first is its own)
            assert torch.equal(got.beam_indices, expected.beam_indices)
        for mine, theirs in zip(got.scores, expected.scores):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    placeholder = ours.generate(**one, forced_eos_token_id=223, max_new_tokens=1, num_beams=3,
                                num_return_sequences=3, **out)   # a hypothesis no candidate filled
    assert placeholder.beam_indices[-1].tolist() == [-1]


@pytest.mark.parametrize("setting", [dict(max_new_tokens=0), dict(max_length=4),
                                     dict(do_sample=True, temperature=float("nan")), dict(do_sample=True, top_k=-1),
                                     dict(forced_bos_token_id=28, suppress_tokens=[28]),
                                     dict(do_sample=True, top_h=0.0), dict(prompt_lookup_num_tokens=0)])
def test_settings_the_reference_refuses_are_refused(pair, setting):
    path, ours, ref = pair
    one = dict(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9]]), attention_mask=torch.ones(1, 6, dtype=torch.int64))
    kwargs = setting if "max_length" in setting else dict(max_new_tokens=3) | setting   # (max_new_tokens wins)
    with pytest.raises(ValueError):
        ref.generate(**one, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens|max_length|temperature|top_k|suppress_tokens|top_h|prompt_lookup"):
        ours.generate(**one, **kwargs)


def test_a_negative_ngram_size_is_none_and_more_candidates_than_the_vocabulary_search_on(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    for setting in (dict(no_repeat_ngram_size=-1), dict(num_beams=300)):      # 2 x 300 candidates > 448 tokens
        expected = ref.generate(**inputs, max_new_tokens=3, **setting)
        assert torch.equal(ours.generate(**inputs, max_new_tokens=3, **setting), expected), setting


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram_size", "top_k", "max_new_tokens",
                                  "min_new_tokens", "eos_token_id", "suppress_tokens"])
def test_a_setting_given_as_none_is_off_over_the_checkpoints_value_as_the_references(pair, monkeypatch, name):
    """transformers 5 applies generate's kwargs over the checkpoint's generation_config, a None too: that
    step is off (top_k=None: no top-k; max_new_tokens=None: the default length), not the checkpoint's."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    plain = answers(ref, inputs)
    second = [1] + plain[:, 1].tolist()     # stop ids that end the answers at their second token
    value = {"repetition_penalty": 1.8, "no_repeat_ngram_size": 1, "top_k": 5, "max_new_tokens": 4, "min_new_tokens": 4,
             "eos_token_id": second, "suppress_tokens": plain[:, 0].tolist()}[name]
    monkeypatch.setattr(ours, "generation_config", {**(ours.generation_config or {}), name: value})
    monkeypatch.setattr(ref.generation_config, name, value)
    kwargs = {name: None} if name == "max_new_tokens" else {name: None, "max_new_tokens": 6}
    kwargs |= {"eos_token_id": second} if name == "min_new_tokens" else {}
    if name == "top_k":
        kwargs |= dict(do_sample=True, output_scores=True, return_dict_in_generate=True)
        expected = ref.generate(**inputs, **kwargs).scores[0]
        assert torch.equal(torch.isinf(ours.generate(**inputs, **kwargs).scores[0]), torch.isinf(expected))
        assert not torch.isinf(expected).any()      # every token kept
        return
    expected = ref.generate(**inputs, **kwargs)
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)


def test_stop_ids_given_as_a_tensor_are_the_references(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    stops = torch.tensor([1] + answers(ref, inputs)[:, 1].tolist())
    expected = ref.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=stops)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=stops), expected)
