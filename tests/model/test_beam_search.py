"""SamplingParams.num_beams: each request's beam search gives transformers' generate(num_beams=...)
hypotheses on that request alone, whatever its neighbours (greedy, sampled, other searches), the
slots free and the decode loop; its beams' K/V rows follow their parents."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import overlap, setup  # noqa: F401  (tiny checkpoints, the reference)


def reference_beams(ref, request, stop_ids, **settings) -> tuple[list[list[int]], list[float]]:
    """transformers' hypotheses for `request` alone (best first), and their scores."""
    p = request.sampling
    ids = torch.tensor([request.prompt_ids])
    kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=False, num_beams=p.num_beams,
                  num_return_sequences=p.n, eos_token_id=sorted(stop_ids), length_penalty=p.length_penalty,
                  early_stopping=p.early_stopping, min_new_tokens=p.min_new_tokens,
                  repetition_penalty=float(p.repetition_penalty), no_repeat_ngram_size=p.no_repeat_ngram_size,
                  return_dict_in_generate=True, output_scores=True) | settings
    if request.pixel_values is not None:
        kwargs.update(pixel_values=request.pixel_values[None], pixel_attention_mask=request.pixel_attention_mask[None])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    lengths = (out.beam_indices != -1).sum(-1).tolist()
    start = ids.shape[1]
    return [out.sequences[i, start:start + n].tolist() for i, n in enumerate(lengths)], out.sequences_scores.tolist()


def hypotheses(result) -> list[list[int]]:
    return [s.token_ids for s in result.samples] if result.samples else [result.token_ids]


def searched(requests, widths=(3, 1, 2, 4), returned=(2, 1, 1, 3), **settings) -> list:
    """Requests of beam search (and some greedy ones, width 1), cycling through the widths."""
    return [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens,
                                               num_beams=widths[i % len(widths)], n=returned[i % len(returned)],
                                               **settings))
            for i, r in enumerate(requests)]


@pytest.mark.parametrize("slots", [7, 16])
def test_each_search_is_the_references_alone(setup, overlap, slots):
    """Beam searches beside greedy requests, queued where 7 slots cannot hold every beam at once."""
    ours, requests, expected, tokenizer, ref = setup
    asked = searched(requests, logprobs=True)
    engine = LLMEngine(ours, tokenizer, max_batch_size=slots, overlap=overlap)
    results = engine.generate(asked)
    assert [r.request_id for r in results] == [r.request_id for r in asked]
    for request, result in zip(asked, results):
        p = request.sampling
        if p.num_beams == 1:
            assert result.token_ids == expected[request.request_id]
            continue
        want, scores = reference_beams(ref, request, engine.stop_ids)
        assert hypotheses(result) == want, request.request_id
        assert [s.request_id for s in result.samples or [result]] == [request.request_id] * p.n
        for sample, score in zip(result.samples or [result], scores):
            assert sample.cumulative_logprob / len(sample.token_ids) == pytest.approx(score, abs=1e-4)
            assert sample.num_generated_tokens == len(sample.token_ids)
            assert sample.finish_reason == ("stop" if sample.token_ids[-1] in engine.stop_ids else "length")
            assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    assert not engine.has_unfinished() and not engine._scheduler.running


@pytest.mark.parametrize("settings", [dict(length_penalty=-0.7, early_stopping=True),
                                      dict(length_penalty=2.0, early_stopping="never"),
                                      dict(min_new_tokens=3, repetition_penalty=1.8, no_repeat_ngram_size=2)],
                         ids=["short", "never", "processors"])
def test_search_settings_are_the_references(setup, settings):
    ours, requests, expected, _, ref = setup
    asked = searched(requests[:5], widths=(3, 2), returned=(3, 1), **settings)
    engine = LLMEngine(ours, max_batch_size=6)
    stops = frozenset(engine.stop_ids) | {t for r in requests for t in expected[r.request_id][1:4]}  # ends early
    asked = [replace(r, sampling=replace(r.sampling, stop_token_ids=tuple(sorted(stops)))) for r in asked]
    for request, result in zip(asked, engine.generate(asked)):
        assert hypotheses(result) == reference_beams(ref, request, stops)[0], request.request_id


def test_a_beams_slot_is_not_shared_as_another_prompts_prefix(setup):
    """A beam takes a slot whose rows held an earlier prompt, remembered for prefix sharing: once
    the beam writes its own prompt there, a later request naming the earlier image must not copy them."""
    ours, requests, expected, _, ref = setup
    named = [replace(r, image_key=f"image-{r.request_id}") for r in requests]
    earlier = [named[0], named[3]]
    beams = searched([named[2]], widths=(4,), returned=(1,))[0]
    engine = LLMEngine(ours, max_batch_size=4)
    assert [r.token_ids for r in engine.generate(earlier)] == [expected[r.request_id] for r in earlier]
    assert hypotheses(engine.generate([beams])[0]) == reference_beams(ref, beams, engine.stop_ids)[0]
    again = [replace(r, request_id=f"{r.request_id}-again") for r in earlier]
    assert [r.token_ids for r in engine.generate(again)] == [expected[r.request_id] for r in earlier]
    assert engine.stats["prefix_tokens_reused"] == 0       # their slots hold the beams now


def test_streamed_searches_join_a_running_batch(setup):
    ours, requests, expected, _, ref = setup
    asked = searched(requests, widths=(2, 1, 3), returned=(2, 1, 1))
    engine = LLMEngine(ours, max_batch_size=5)
    results, pending = {}, list(asked)
    engine.add_requests(pending[:3])
    del pending[:3]
    while engine.has_unfinished() or pending:
        if pending and len(results) % 2 == 0:
            engine.add_requests([pending.pop(0)])
        results.update((r.request_id, r) for r in engine.step())
    for request in asked:
        got = results[request.request_id]
        if request.sampling.num_beams == 1:
            assert got.token_ids == expected[request.request_id]
        else:
            assert hypotheses(got) == reference_beams(ref, request, engine.stop_ids)[0]


@pytest.mark.parametrize("settings,match", [(dict(temperature=0.7), "beam sampling"), (dict(n=5), "n=5 > num_beams=4"),
                                            (dict(choices=("a", "b")), "choices"),
                                            (dict(top_logprobs=2), "top_logprobs"),
                                            (dict(presence_penalty=1.0), "presence_penalty"),
                                            (dict(early_stopping="soon"), "early_stopping"),
                                            (dict(max_new_tokens=0), "max_new_tokens=0")])
def test_settings_a_search_cannot_take_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{"num_beams": 4, "max_new_tokens": 8} | settings)
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1"):
        SamplingParams(num_beams=0)


def test_more_beams_than_slots_is_refused_before_any_work(setup):
    ours, requests, _, _, _ = setup
    engine = LLMEngine(ours, max_batch_size=3)
    asked = searched(requests[:2], widths=(2, 4), returned=(1,))
    with pytest.raises(ValueError, match="'r1': num_beams=4 takes as many slots.*max_batch_size=3"):
        engine.generate(asked)
    assert not engine.has_unfinished()
    wide = replace(requests[0], sampling=SamplingParams(num_beams=3, stop_token_ids=tuple(range(200))))
    with pytest.raises(ValueError, match="'r0': num_beams=3 keeps more candidates a step than the vocabulary"):
        engine.generate([wide])


def test_a_search_whose_logits_overflow_ends_in_error_and_spoils_no_later_one(setup, overlap):
    """Pixels that overflow the vision tower make a search's logits NaN: it ends in error at once,
    its beams' slots wiped, and the requests that take them after it answer as the reference."""
    from model.engine import Request

    ours, requests, expected, _, _ = setup
    r = requests[2]
    bad = Request("bad", r.prompt_ids, r.pixel_values * 1e30, r.pixel_attention_mask,
                  SamplingParams(max_new_tokens=5, num_beams=3))
    later = [requests[i] for i in (0, 1, 3, 4, 5)]
    results = LLMEngine(ours, max_batch_size=3, overlap=overlap).generate([bad, *later])
    assert (results[0].finish_reason, results[0].token_ids, results[0].samples) == ("error", [], None)
    assert results[0].error.startswith("NonFiniteLogitsError: ")
    for request, result in zip(later, results[1:]):
        assert (result.token_ids, result.error) == (expected[request.request_id], None), request.request_id


def test_a_search_the_cache_has_no_room_for_ends_in_error_alone(setup):
    """A KV cache budget of two slots: a search of three beams could never be admitted; it ends in
    error, naming why, and the requests beside it answer."""
    ours, requests, expected, _, _ = setup
    asked = searched(requests[:3], widths=(1, 3, 1), returned=(1,))
    length = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in asked)
    engine = LLMEngine(ours, max_batch_size=4, kv_cache_tokens=2 * (-(-length // 256) * 256))
    results = engine.generate(asked)
    assert engine.slots == 2
    assert results[1].finish_reason == "error" and "3 beams need as many slots" in results[1].error
    assert [results[i].token_ids for i in (0, 2)] == [expected[requests[i].request_id] for i in (0, 2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_searches_match_eager_bf16(setup):
    """The CUDA defaults (graphs, compiled and overlapped decode, bf16): beam searches beside greedy
    requests give the hypotheses of the eager, step-by-step engine."""
    import copy

    ours, requests, _, _, _ = setup
    model = copy.deepcopy(ours).to("cuda", torch.bfloat16)
    asked = searched(requests, bad_words_ids=((5, 6), (7,)))
    graphed = LLMEngine(model, max_batch_size=7).generate(asked)
    eager = LLMEngine(model, max_batch_size=7, use_cuda_graphs=False, compile=False, overlap=False).generate(asked)
    assert [hypotheses(r) for r in graphed] == [hypotheses(r) for r in eager]


def test_searches_with_stop_strings_are_the_references(setup):
    """A candidate whose token completes a stop string ends (as transformers' StopStringCriteria in
    its beam search); those hypotheses finish with reason "stop"."""
    from transformers import AutoTokenizer

    ours, requests, expected, tokenizer, ref = setup
    reference_tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path)
    texts = [tokenizer.decode(expected[r.request_id], skip_special_tokens=False) for r in requests[:4]]
    stops = tuple(dict.fromkeys(t[3:5] for t in texts if len(t) >= 5))
    asked = searched(requests[:4], widths=(3, 2), returned=(3, 2), stop=stops)
    engine = LLMEngine(ours, tokenizer, max_batch_size=6)
    ended = 0
    for request, result in zip(asked, engine.generate(asked)):
        want = reference_beams(ref, request, engine.stop_ids, stop_strings=list(stops),
                               tokenizer=reference_tokenizer)[0]
        assert hypotheses(result) == want, request.request_id
        ended += sum(s.finish_reason == "stop" and s.token_ids[-1] not in engine.stop_ids for s in result.samples)
    assert ended


def test_a_search_beside_a_longer_request_waits_for_a_cache_with_room_for_its_beams(setup):
    """A set budget: the cache sized for a long request has one slot, a short request's three beams
    fit one sized for it alone. The search ended in error when the long one was queued beside it; it
    now waits for a cache of its size, and both answer as alone."""
    ours, requests, _, _, _ = setup
    search = searched(requests[1:2], widths=(3,), returned=(1,))[0]
    long = replace(requests[0], request_id="long", prompt_ids=requests[0].prompt_ids + [5] * 300,
                   sampling=SamplingParams(max_new_tokens=4))
    budget = 800            # 512 positions: one slot; 256: three
    assert len(search.prompt_ids) + search.sampling.max_new_tokens + 1 <= 256
    alone = [LLMEngine(ours, max_batch_size=8, kv_cache_tokens=budget).generate([r])[0] for r in (search, long)]
    together = LLMEngine(ours, max_batch_size=8, kv_cache_tokens=budget).generate([search, long])
    for a, b in zip(alone, together):
        assert (b.error, b.token_ids, b.finish_reason) == (None, a.token_ids, a.finish_reason)
    streamed = LLMEngine(ours, max_batch_size=8, kv_cache_tokens=budget)
    streamed.add_requests([long])
    streamed.add_requests([search])
    done = {}
    while streamed.has_unfinished():
        done |= {r.request_id: r for r in streamed.step()}
    assert [done[r.request_id].token_ids for r in (search, long)] == [a.token_ids for a in alone]
