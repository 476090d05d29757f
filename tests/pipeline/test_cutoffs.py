"""--typical-p, --epsilon-cutoff, --eta-cutoff: transformers' sampling cutoffs for a job and for a
row of its own; typical_p near 0 keeps one token a step, so sampled answers are transformers' own."""
import json

import pytest

from pipeline import PipelineConfig
from tests.pipeline.helpers import good_rows
from tests.pipeline.test_row_settings import answered


def test_typical_p_near_zero_answers_as_the_reference(checkpoint, oracle):
    rows = [dict(r, settings=None) for r in good_rows(4)]
    rows[2]["settings"] = json.dumps({"typical_p": 1.0, "seed": 1})                          # samples freely
    rows[3]["settings"] = json.dumps({"typical_p": 1.0, "epsilon_cutoff": 0.5, "eta_cutoff": 0.0})  # only the likeliest
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, temperature=1.5, typical_p=1e-6, seed=5,
                            sampling_column="settings", logprobs=True)
    out, _ = answered(config, rows)
    typical = dict(do_sample=True, temperature=1.5, top_k=0, typical_p=1e-6)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 10, **typical) for r in rows[:2]]
    assert [(out[r["id"]]["answer"], out[r["id"]]["num_generated_tokens"]) for r in rows[:2]] == want
    assert want != [oracle.answer(r["image"], r["question"] or config.prompt, 10) for r in rows[:2]]   # not greedy
    greedy, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=10, logprobs=True), rows)
    assert out["row-3"]["answer"] == greedy["row-3"]["answer"]      # epsilon 0.5 of a flat distribution: the top
    assert out["row-2"]["answer_logprob"] < greedy["row-2"]["answer_logprob"] - 0.5     # drawn, not greedy
    assert all(out[r["id"]]["error"] is None for r in rows)


@pytest.mark.parametrize("setting", [dict(typical_p=0.0), dict(epsilon_cutoff=1.0), dict(eta_cutoff=-1.0)])
def test_a_cutoff_out_of_range_is_refused(setting):
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be in"):
        PipelineConfig(model="m", **setting)
