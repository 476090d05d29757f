"""--min-new-tokens N: no answer ends before N tokens (transformers' min_new_tokens), each row's
answer that of transformers' generate on it alone; a row may set its own."""
import json

import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig
from tests.pipeline.helpers import Oracle
from tests.pipeline.test_row_settings import answered


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_answers_run_on_past_where_they_would_end():
    """The trained demo model answers in a few tokens; held to at least 8, it answers as the reference."""
    heldout = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:3]
    rows = [{k: r[k] for k in ("id", "image", "question")} for r in heldout]
    rows = [dict(r, settings=None) for r in rows]
    rows[2]["settings"] = json.dumps({"min_new_tokens": 0})                  # this row may end at once
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=12, min_new_tokens=8, sampling_column="settings")
    out, stage = answered(config, rows)
    oracle = Oracle(DEMO_MODEL)
    stop = sorted(stage.engine.stop_ids)
    want = [oracle.answer(r["image"], r["question"], 12, min_new_tokens=m, eos_token_id=stop)
            for r, m in zip(rows, (8, 8, 0))]
    assert [(out[r["id"]]["answer"], out[r["id"]]["num_generated_tokens"]) for r in rows] == want
    assert want[0][1] >= 8 and want[2][1] < 8                # held on; and the free row ended early
    short = [oracle.answer(r["image"], r["question"], 12, eos_token_id=stop) for r in rows[:2]]
    assert all(n < 8 for _, n in short)                      # without it, they would have ended


@pytest.mark.parametrize("settings,message", [
    (dict(min_new_tokens=70), "min_new_tokens must be in \\[0, max_new_tokens=64\\]"),
    (dict(min_new_tokens=-1), "min_new_tokens must be in"),
    (dict(min_new_tokens=2, choices=["a", "b"]), "min_new_tokens cannot be combined with choices")])
def test_a_minimum_a_run_cannot_keep_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)
