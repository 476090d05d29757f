"""generate(prefix_allowed_tokens_fn=..., logits_processor=..., stopping_criteria=...): the caller's
own rules, as transformers' generate runs them (greedy, sampled answers, beam search), so that
constrained-decoding libraries written for transformers plug in."""
from __future__ import annotations

import pytest
import torch

from tests.model.test_generation import mixed_batch, pair  # noqa: F401  (the fixture)

torch.set_num_threads(1)


def allowed_by_parity(batch_id: int, ids: torch.Tensor) -> list[int]:
    """Tokens of the parity of the ids so far plus the prompt's index: different per row and step."""
    return list(range((len(ids) + batch_id) % 2, 400, 2))


def processor_class():
    from transformers import LogitsProcessor

    class FavourNextId(LogitsProcessor):
        """Raises the token after each row's last one (depends on the ids, so a rule the reference and
        we must both feed the right rows)."""
        def __call__(self, input_ids, scores):
            bonus = torch.zeros_like(scores)
            bonus[torch.arange(len(scores)), (input_ids[:, -1] + 1) % scores.shape[-1]] = 3.0
            return scores + bonus

    return FavourNextId


def criteria_class():
    from transformers import StoppingCriteria

    class StopAtThirds(StoppingCriteria):
        """Ends a row whose last token is a multiple of 3 (a third of the steps, at random) or repeats
        the one before (the random smolvlm model's loops)."""
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -1] % 3 == 0) | (input_ids[:, -1] == input_ids[:, -2])

    return StopAtThirds


SETTINGS = [dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=1, num_return_sequences=2),
            dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=2)]


@pytest.mark.parametrize("setting", SETTINGS, ids=["greedy", "beams", "sampled", "processors"])
def test_prefix_allowed_tokens_fn_is_the_references(pair, setting):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=8, prefix_allowed_tokens_fn=allowed_by_parity, **setting)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, ref.generate(**inputs, **setting, max_new_tokens=8))


@pytest.mark.parametrize("setting", SETTINGS, ids=["greedy", "beams", "sampled", "processors"])
def test_logits_processor_and_stopping_criteria_are_the_references(pair, setting):
    """The caller's processor after generate's own and before the warpers (output_scores show it),
    their stopping criteria ending rows (and beam candidates) as the reference's."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    favour, stop = processor_class(), criteria_class()
    kwargs = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, **setting)
    expected = ref.generate(**inputs, **kwargs, logits_processor=[favour()])
    got = ours.generate(**inputs, **kwargs, logits_processor=[favour()])
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = ref.generate(**inputs, **kwargs)
    assert not torch.equal(plain.sequences, expected.sequences)          # the processor changed the answers
    stopped = ref.generate(**inputs, **kwargs, stopping_criteria=[stop()])
    assert torch.equal(ours.generate(**inputs, **kwargs, stopping_criteria=[stop()]).sequences, stopped.sequences)
    ended = stopped.sequences.shape[1]          # rows ended early (then padded), or all of them
    assert ended < plain.sequences.shape[1] or not torch.equal(stopped.sequences, plain.sequences)
    both = dict(logits_processor=[favour()], stopping_criteria=[stop()], prefix_allowed_tokens_fn=allowed_by_parity)
    expected = ref.generate(**inputs, **kwargs, **both).sequences
    assert torch.equal(ours.generate(**inputs, **kwargs, **both).sequences, expected)


def test_an_unsatisfiable_prefix_rule_and_bad_rules_are_named(pair):
    path, ours, _ = pair
    inputs = mixed_batch(path, counts=(0, 0))
    with pytest.raises(ValueError, match="allowed no token for batch_id 0"):
        ours.generate(**inputs, max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, ids: [])
    with pytest.raises(ValueError, match="logits_processor must be callables"):
        ours.generate(**inputs, max_new_tokens=3, logits_processor=["not a processor"])


class Recorder:
    """A streamer (transformers' BaseStreamer protocol) that keeps what it is given."""
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("setting", [dict(), dict(do_sample=True, top_k=1, num_return_sequences=2)])
def test_a_streamer_gets_what_the_references_gets(pair, setting):
    """The prompt's ids, then each step's tokens (a finished row's padding too), then end()."""
    from transformers import TextStreamer

    path, ours, ref = pair
    inputs = mixed_batch(path, counts=(1,))
    theirs, mine = Recorder(), Recorder()
    kwargs = dict(max_new_tokens=6, eos_token_id=[5], **setting)
    expected = ref.generate(**inputs, **kwargs, streamer=theirs)
    assert torch.equal(ours.generate(**inputs, **kwargs, streamer=mine), expected)
    assert len(mine.puts) == len(theirs.puts) == 7 and (mine.ended, theirs.ended) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(mine.puts, theirs.puts))
    with pytest.raises(ValueError, match="streamer cannot follow beam search"):
        ours.generate(**inputs, max_new_tokens=2, num_beams=2, streamer=TextStreamer(None))
