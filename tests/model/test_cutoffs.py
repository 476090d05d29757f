"""typical_p, epsilon_cutoff and eta_cutoff (SamplingParams, generate()): the tokens transformers'
TypicalLogitsWarper, EpsilonLogitsWarper and EtaLogitsWarper keep, and no other is ever drawn."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.sampler import SamplingState, drop_atypical, drop_below_epsilon, drop_below_eta, sample_rows
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference)
from tests.model.test_generation import mixed_batch, pair  # noqa: F401

CASES = [("typical_p", 0.2), ("typical_p", 0.6), ("typical_p", 0.95), ("epsilon_cutoff", 3e-4),
         ("epsilon_cutoff", 0.01), ("epsilon_cutoff", 0.2), ("eta_cutoff", 3e-4), ("eta_cutoff", 0.01),
         ("eta_cutoff", 0.3)]


def _warper(name: str, value: float):
    from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper, TypicalLogitsWarper

    return {"typical_p": TypicalLogitsWarper, "epsilon_cutoff": EpsilonLogitsWarper,
            "eta_cutoff": EtaLogitsWarper}[name](value)


def _scores(rows: int = 8, vocab: int = 500) -> torch.Tensor:
    """Rows from peaked to flat, a few tokens already dropped (-inf) by an earlier warper."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 6.0, rows)[:, None]
    return scores.masked_fill(torch.rand(rows, vocab, generator=g) < 0.1, float("-inf"))


@pytest.mark.parametrize("name,value", CASES)
def test_the_kept_tokens_are_the_references(name, value):
    scores = _scores()
    want = torch.isfinite(_warper(name, value)(None, scores.clone()))
    ours = {"typical_p": drop_atypical, "epsilon_cutoff": drop_below_epsilon, "eta_cutoff": drop_below_eta}[name]
    got = torch.isfinite(ours(scores, torch.full((len(scores),), value)))
    assert torch.equal(got, want)
    kept = want.sum(-1)
    assert (kept >= 1).all() and (kept < torch.isfinite(scores).sum(-1)).any()     # some drop, none empties
    neutral = {"typical_p": 1.0}.get(name, 0.0)
    assert torch.equal(ours(scores, torch.full((len(scores),), neutral)), scores)


@pytest.mark.parametrize("top_k", [0, 40])
def test_no_token_outside_the_kept_set_is_drawn(top_k):
    """The engine's sampler, rows of different settings side by side (top-k's candidates path and
    the whole-vocabulary one): each draw lies in the set the reference's warpers keep for its row,
    and over many draws, the cut tokens would have been drawn without the cutoff."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    logits = _scores()
    logits = torch.where(torch.isfinite(logits), logits, -30.0)
    settings = [dict(typical_p=0.5), dict(epsilon_cutoff=0.01), dict(eta_cutoff=0.02),
                dict(typical_p=0.9, eta_cutoff=3e-3), dict(epsilon_cutoff=0.003, typical_p=0.7), dict(),
                dict(eta_cutoff=0.1), dict(typical_p=0.3)]
    params = [SamplingParams(temperature=1.3, top_k=top_k, **s) for s in settings]
    state = SamplingState.empty(8, 500, "cpu")
    kept = []
    for row, (p, s) in enumerate(zip(params, settings)):
        state.assign(row, p.temperature, p.top_k, p.top_p, 1000 + row, 0, [], 1.0, (), 0.0,
                     p.typical_p, p.epsilon_cutoff, p.eta_cutoff)
        scores = TemperatureLogitsWarper(1.3)(None, logits[row:row + 1].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        for name in ("typical_p", "epsilon_cutoff", "eta_cutoff"):        # the reference's order
            if name in s:
                scores = _warper(name, s[name])(None, scores)
        kept.append(torch.isfinite(scores[0]))
    kept = torch.stack(kept)
    seen = torch.zeros_like(kept)
    for step in range(300):
        state.step.fill_(step)
        tokens = sample_rows(logits, state, torch.arange(8), params, compiled=False)
        seen[torch.arange(8), tokens] = True
    assert not (seen & ~kept).any()
    assert (seen.sum(-1) > 1).all()                     # sampled, not greedy
    cut = [row for row, s in enumerate(settings) if s]
    assert (kept[cut].sum(-1) < (top_k or 500)).sum() >= len(cut) - 2     # the cutoffs cut (row 5 has none)


def test_generate_with_typical_p_tiny_is_the_references(pair):  # noqa: F811
    """typical_p near 0 keeps only the most typical token: sampling is then deterministic, so our
    tokens must be the reference's exactly (which differ from greedy's)."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=0, typical_p=1e-6)
    expected = ref.generate(**inputs, **kwargs)
    assert not torch.equal(expected, ref.generate(**inputs, max_new_tokens=8, do_sample=False))
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)
    greedy = ours.generate(**inputs, max_new_tokens=8, do_sample=False, typical_p=1e-6, eta_cutoff=0.5)
    assert torch.equal(greedy, ref.generate(**inputs, max_new_tokens=8, do_sample=False))   # greedy ignores them


@pytest.mark.parametrize("cutoffs", [dict(typical_p=0.8), dict(epsilon_cutoff=4e-3), dict(eta_cutoff=0.5),
                                     dict(typical_p=0.9, epsilon_cutoff=3e-3, eta_cutoff=0.4)])
def test_generate_scores_are_the_reference_warpers(pair, cutoffs):  # noqa: F811
    """generate(output_scores=True) while sampling with cutoffs: each step's scores are the
    reference's warpers (temperature, top-k, top-p, then the cutoffs, in its order) on its logits."""
    from transformers.generation import (EpsilonLogitsWarper, EtaLogitsWarper, LogitsProcessorList,
                                         TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                         TypicalLogitsWarper)

    path, ours, _ = pair
    inputs = mixed_batch(path)
    torch.manual_seed(2)
    # the tiny models' distributions are nearly flat: a low temperature spreads them
    out = ours.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.3, top_k=200, top_p=0.99,
                        return_dict_in_generate=True, output_scores=True, output_logits=True, **cutoffs)
    warpers = [TemperatureLogitsWarper(0.3), TopKLogitsWarper(200), TopPLogitsWarper(0.99)]
    if "typical_p" in cutoffs:
        warpers.append(TypicalLogitsWarper(cutoffs["typical_p"]))
    if "epsilon_cutoff" in cutoffs:
        warpers.append(EpsilonLogitsWarper(cutoffs["epsilon_cutoff"]))
    if "eta_cutoff" in cutoffs:
        warpers.append(EtaLogitsWarper(cutoffs["eta_cutoff"]))
    start, cut = inputs["input_ids"].shape[1], 0
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        expected = LogitsProcessorList(warpers)(out.sequences[:, :start + step], logits.clone())
        assert torch.equal(torch.isinf(scores), torch.isinf(expected)), step
        torch.testing.assert_close(scores, expected)
        unwarped = LogitsProcessorList(warpers[:3])(out.sequences[:, :start + step], logits.clone())
        cut += int(torch.isfinite(unwarped).sum() - torch.isfinite(expected).sum())
    assert cut > 0, "the cutoffs dropped nothing"


def test_engine_with_typical_p_tiny_is_the_references(setup):  # noqa: F811
    """Through the engine (every request in one batch, slots shared): each answer is the reference's
    for that request alone with the same setting."""
    ours, requests, _, _, ref = setup
    asked = [replace(r, sampling=SamplingParams(max_new_tokens=r.sampling.max_new_tokens, temperature=1.2,
                                                typical_p=1e-6, seed=i)) for i, r in enumerate(requests)]
    results = LLMEngine(ours, max_batch_size=8).generate(asked)
    for r, res in zip(asked, results):
        ids = torch.tensor([r.prompt_ids])
        kwargs = dict(max_new_tokens=r.sampling.max_new_tokens, do_sample=True, temperature=1.2, top_k=0,
                      typical_p=1e-6)
        if r.pixel_values is not None:
            kwargs.update(pixel_values=r.pixel_values[None], pixel_attention_mask=r.pixel_attention_mask[None])
        want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()
        assert res.token_ids == want, r.request_id


@pytest.mark.parametrize("setting", [dict(typical_p=0.0), dict(typical_p=1.5), dict(epsilon_cutoff=1.0),
                                     dict(eta_cutoff=-0.1), dict(eta_cutoff=float("nan"))])
def test_out_of_range_is_refused_by_the_engine_and_by_generate_as_by_the_reference(pair, setting):  # noqa: F811
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} must be in"):
        SamplingParams(temperature=1.0, **setting)
    path, ours, _ = pair
    if setting != dict(typical_p=0.0):
        return          # generate() takes them as the reference does: test_top_p_zero_...
    with pytest.raises(ValueError, match=f"{name} must be in"):
        ours.generate(**mixed_batch(path, counts=(0,)), max_new_tokens=2, do_sample=True, **setting)
    with pytest.raises(ValueError, match="top_p must be in"):
        ours.generate(**mixed_batch(path, counts=(0,)), max_new_tokens=2, do_sample=True, top_p=-0.1)


@pytest.mark.parametrize("setting", [dict(), dict(typical_p=1.5), dict(epsilon_cutoff=1.0), dict(eta_cutoff=-0.1),
                                     dict(eta_cutoff=float("nan"))])
def test_top_p_zero_keeps_the_likeliest_and_cutoffs_out_of_range_are_none(pair, setting):  # noqa: F811
    """generate(do_sample=True, top_p=0.0) with scores answered token 0 at every step (every token
    dropped); cutoffs outside the reference's ranges were refused where the reference leaves them out."""
    path, ours, ref = pair
    inputs = mixed_batch(path)
    kwargs = dict(max_new_tokens=4, do_sample=True, top_p=0.0, return_dict_in_generate=True, output_scores=True,
                  **setting)
    got, want = ours.generate(**inputs, **kwargs), ref.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(torch.isfinite(s).sum(-1), torch.ones(len(s), dtype=torch.long)) for s in got.scores)
