"""--min-p: sampled answers draw no token below min_p times the likeliest; min_p 1 answers as
transformers' greedy generate, at any temperature; a row may set its own."""
import json

import pytest

from pipeline import PipelineConfig
from tests.pipeline.helpers import good_rows
from tests.pipeline.test_row_settings import answered


def test_min_p_one_answers_greedily_at_any_temperature(checkpoint, oracle):
    rows = [dict(r, settings=None) for r in good_rows(3)]
    rows[2]["settings"] = json.dumps({"min_p": 0.0, "seed": 1})      # this row samples freely
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, temperature=3.0, min_p=1.0, seed=5,
                            sampling_column="settings", logprobs=True)
    out, _ = answered(config, rows)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 10) for r in rows]
    assert [(out[r["id"]]["answer"], out[r["id"]]["num_generated_tokens"]) for r in rows[:2]] == want[:2]
    greedy, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=10, logprobs=True), rows)
    assert [out[f"row-{i}"]["answer_logprob"] for i in range(2)] == \
        pytest.approx([greedy[f"row-{i}"]["answer_logprob"] for i in range(2)], abs=1e-5)
    assert out["row-2"]["answer_logprob"] < greedy["row-2"]["answer_logprob"] - 0.5     # drawn, not greedy


def test_a_min_p_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="min_p must be in"):
        PipelineConfig(model="m", min_p=1.5)
