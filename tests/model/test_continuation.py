"""Request.continuation_ids: tokens after the prompt scored from the prefill (a caption's likelihood):
each one's log p equals transformers' forward pass over prompt + continuation; the answer after them
equals the reference's generate on prompt + continuation; max_new_tokens 0 scores without answering;
requests about one image still share its features, and a shared prefix never swallows the scored
tokens."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import _reference, overlap, setup  # noqa: F401  (tiny checkpoints, the reference)


def reference_log_softmax(ref, request, continuation: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the prompt's last position and each continuation token's."""
    ids = torch.tensor([request.prompt_ids + continuation])
    kwargs = {}
    if request.pixel_values is not None:
        kwargs = dict(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0].float()
    return logits[len(request.prompt_ids) - 1:].log_softmax(-1)


def reference_logprobs(ref, request, continuation: list[int]) -> list[float]:
    log_p = reference_log_softmax(ref, request, continuation)
    return [log_p[i, t].item() for i, t in enumerate(continuation)]


def continuations(requests) -> list[list[int]]:
    return [[(37 * i + 11 * k) % 200 + 5 for k in range(3 + i % 4)] for i in range(len(requests))]


@pytest.mark.parametrize("chunk", [256, 2], ids=["one-chunk", "chunks-of-2"])
def test_continuation_logprobs_and_the_answer_after_them_equal_the_reference(setup, overlap, chunk, monkeypatch):
    from model.engine.runner import ModelRunner

    monkeypatch.setattr(ModelRunner._scored_logprobs, "__defaults__", (chunk,))    # the LM head a chunk at a time
    ours, requests, _, _, ref = setup
    tails = continuations(requests)
    asked = [replace(r, continuation_ids=tail, sampling=SamplingParams(max_new_tokens=4 if i % 3 else 0))
             for i, (r, tail) in enumerate(zip(requests, tails))]
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate(asked)
    for request, tail, result in zip(asked, tails, results):
        assert result.continuation_logprobs == pytest.approx(reference_logprobs(ref, request, tail), abs=2e-4)
        assert result.num_prompt_tokens == len(request.prompt_ids) + len(tail)
        if request.sampling.max_new_tokens == 0:
            assert (result.token_ids, result.finish_reason) == ([], "length")
        else:
            whole = replace(request, prompt_ids=request.prompt_ids + tail, continuation_ids=None)
            assert result.token_ids == _reference(ref, whole)
            assert result.continuation_logprobs is not None


def test_requests_about_one_image_share_it_but_run_their_scored_tokens(setup):
    """Several texts scored against one image (captions to rank): the image is encoded once, its
    prompt's K/V are copied, but each text's tokens run in the prefill that scores them."""
    ours, requests, _, _, ref = setup
    base = next(r for r in requests if r.pixel_values is not None)
    tails = [[21, 22, 23], [21, 22, 24, 25], [30], [21, 22, 23]]       # the last: a prompt seen whole before
    asked = [replace(base, request_id=f"t{i}", image_key="one-image", continuation_ids=tail,
                     sampling=SamplingParams(max_new_tokens=0)) for i, tail in enumerate(tails)]
    engine = LLMEngine(ours, max_batch_size=2)
    results = engine.generate(asked[:1]) + engine.generate(asked[1:])
    assert engine.stats["images_encoded"] == 1 and engine.stats["prefix_tokens_reused"] > 0
    for request, tail, result in zip(asked, tails, results):
        assert result.continuation_logprobs == pytest.approx(reference_logprobs(ref, request, tail), abs=2e-4)


def test_a_scored_request_whose_logits_overflow_ends_in_error_and_spoils_no_later_one(setup, overlap):
    """As an answering request's: the slot it wrote NaNs into is wiped before another takes it."""
    ours, requests, expected, _, _ = setup
    r = requests[2]
    bad = replace(r, request_id="bad", pixel_values=r.pixel_values * 1e30, continuation_ids=[5, 6],
                  sampling=SamplingParams(max_new_tokens=0))
    later = [requests[i] for i in (0, 1, 3, 4, 5)]
    results = LLMEngine(ours, max_batch_size=1, overlap=overlap).generate([bad, *later])
    assert results[0].finish_reason == "error" and "at its scored tokens" in results[0].error
    for req, res in zip(later, results[1:]):
        assert (res.token_ids, res.error) == (expected[req.request_id], None), req.request_id


def test_a_scored_slot_left_idle_under_decode_steps_keeps_its_prompt_to_share(setup):
    """A scored request ends after its prefill, its slot free but holding its prompt for others to
    copy; decode steps of the answers in higher slots write every row up to theirs, so that slot's
    idle writes must land past its prompt, not where its last occupant stopped (inside it)."""
    ours, requests, _, _, ref = setup
    short = min(requests, key=lambda r: len(r.prompt_ids))
    scored = max((r for r in requests if r.pixel_values is not None), key=lambda r: len(r.prompt_ids))
    answering = replace(requests[1], sampling=SamplingParams(max_new_tokens=12, min_new_tokens=12))
    engine = LLMEngine(ours, max_batch_size=2)
    engine.generate([replace(short, sampling=SamplingParams(max_new_tokens=2)), answering])   # slot 0 stops early
    first = replace(scored, image_key="k", continuation_ids=[7, 8], sampling=SamplingParams(max_new_tokens=0))
    engine.generate([first, replace(answering, request_id="a2")])      # slot 0 scored, idle under 11 decode steps
    again = replace(first, request_id="again", continuation_ids=[9, 10, 11])
    result = engine.generate([again])[0]                               # copies the prompt from slot 0
    assert engine.stats["prefix_tokens_reused"] > 0
    assert result.continuation_logprobs == pytest.approx(reference_logprobs(ref, again, [9, 10, 11]), abs=2e-4)


def test_requests_that_answer_nothing_need_a_continuation(setup):
    ours, requests, _, _, _ = setup
    with pytest.raises(ValueError, match="max_new_tokens 0 answers nothing"):
        LLMEngine(ours).generate([replace(requests[0], sampling=SamplingParams(max_new_tokens=0))])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        LLMEngine(ours).generate([replace(requests[0], continuation_ids=[10 ** 7])])


def test_image_tokens_without_their_pixels_are_refused(setup):
    """Alone they were read as text; beside a request with an image, the batch counted them among its
    image features and the step failed, taking every request of the batch."""
    ours, requests, _, _, _ = setup
    image_token = ours.config.image_token_id
    with_image = next(r for r in requests if r.pixel_values is not None)
    for bad, where in ((replace(with_image, request_id="bare", pixel_values=None, pixel_attention_mask=None),
                        "in the prompt but no pixel_values"),
                       (replace(requests[0], request_id="tail", continuation_ids=[image_token]), "in continuation_ids")):
        with pytest.raises(ValueError, match=f"request '{bad.request_id}': image tokens {where}"):
            LLMEngine(ours).generate([with_image, bad])


@pytest.mark.parametrize("max_new_tokens", [0, 3])
def test_each_sample_of_a_scored_request_scores_its_continuation(setup, max_new_tokens):
    """n > 1: the other samples were made from the request with its continuation folded into its
    prompt: none scored it, and with max_new_tokens 0 the step failed, taking the batch's other requests."""
    ours, requests, _, _, ref = setup
    tail = continuations(requests)[0]
    scored = replace(requests[0], continuation_ids=tail,
                     sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=3, n=2))
    other = replace(requests[1], sampling=SamplingParams(max_new_tokens=3))
    result, answered = LLMEngine(ours, max_batch_size=4).generate([scored, other])
    expected = pytest.approx(reference_logprobs(ref, scored, tail), abs=2e-4)
    assert [s.continuation_logprobs for s in result.samples] == [expected, expected]
    assert answered.token_ids == _reference(ref, other)
