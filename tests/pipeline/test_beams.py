"""--num-beams K: every row's answer is transformers' generate(num_beams=K) on that row alone; with
--samples N the N best beams fill the samples columns; a row may ask its own search
(--sampling-column); a resume with another search is refused."""
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet
from tests.pipeline.test_samples import answered, stage_requests


def test_the_model_stage_searches_as_the_reference(checkpoint, oracle):
    from model.engine import LLMEngine

    rows = good_rows(4)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, num_beams=3, samples=2, length_penalty=0.5,
                            early_stopping=True, logprobs=True)
    table, stage = answered(config, rows)
    stop = sorted(stage.engine.stop_ids)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, num_beams=3, length_penalty=0.5,
                          early_stopping=True, eos_token_id=stop) for r in rows]
    got = table.to_pylist()
    assert [(r["answer"], r["num_generated_tokens"]) for r in got] == want
    assert want != [oracle.answer(r["image"], r["question"] or config.prompt, 12, eos_token_id=stop) for r in rows]
    requests = stage_requests(stage, config, rows)
    engine = LLMEngine(stage.engine.model, stage.engine.tokenizer, max_batch_size=3, share_prefixes=False)
    for row in got:
        alone = engine.generate([requests[row["id"]]])[0]
        assert row["samples"] == [s.text.strip() for s in alone.samples]
        assert row["samples_logprob"] == pytest.approx([s.cumulative_logprob for s in alone.samples], abs=1e-5)
        assert (row["samples"][0], row["samples_logprob"][0]) == (row["answer"], row["answer_logprob"])


def test_a_row_may_ask_its_own_search(checkpoint, oracle):
    rows = good_rows(3)
    for row, own in zip(rows, ['{"num_beams": 3}', None, '{"num_beams": 2, "length_penalty": -1.0}']):
        row["settings"] = own
    table, stage = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=10, sampling_column="settings"), rows)
    stop = sorted(stage.engine.stop_ids)
    settings = [dict(num_beams=3), {}, dict(num_beams=2, length_penalty=-1.0)]
    want = [oracle.answer(r["image"], r["question"] or PipelineConfig.prompt, 10, eos_token_id=stop, **s)
            for r, s in zip(rows, settings)]
    assert [(r["answer"], r["num_generated_tokens"]) for r in table.to_pylist()] == want


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_searches_every_row(ray_cluster, tmp_path):
    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:6]
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question")} for r in rows])
    output = str(tmp_path / "out")
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=24, batch_size=3, num_beams=3, samples=3)
    summary = run_job(str(tmp_path / "in.parquet"), output, config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    answers = read_output(output).to_pylist()
    assert len(answers) == 6 and all(r["finish_reason"] == "stop" for r in answers)
    assert all(r["samples"][0] == r["answer"] and len(set(r["samples"])) == 3 for r in answers)
    assert summary["generated_tokens_this_run"] == sum(sum(r["samples_num_generated_tokens"]) for r in answers)
    with pytest.raises(ValueError, match="cannot resume .*num_beams"):
        run_job(str(tmp_path / "in.parquet"), output, replace(config, num_beams=4), resume=True)


@pytest.mark.parametrize("settings,message", [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, early_stopping="soon"), "early_stopping must be True, False or 'never'"),
    (dict(num_beams=2, samples=3), "samples=3 > num_beams=2"),
    (dict(num_beams=2, temperature=0.7), "with temperature > 0"),
    (dict(num_beams=2, choices=["a", "b"]), "with choices"),
    (dict(num_beams=2, choices_column="options"), "with choices"),
    (dict(num_beams=80), "num_beams=80 beams take as many of the engine's max_batch_size=64"),
    (dict(num_beams=2, score_column="caption"), "num_beams is about generating")])
def test_searches_a_run_cannot_make_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)


def test_searches_end_on_stop_strings_as_the_reference(checkpoint, oracle):
    rows = good_rows(3)
    plain, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=12, num_beams=2), rows)
    stop = [plain.column("answer").to_pylist()[0][2:4]]
    # a negative length penalty: the short hypotheses that end on the stop string win
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, num_beams=2, stop=stop, length_penalty=-1.0)
    table, stage = answered(config, rows)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, num_beams=2, stop_strings=stop,
                          length_penalty=-1.0, tokenizer=oracle.processor.tokenizer,
                          eos_token_id=sorted(stage.engine.stop_ids)) for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in table.to_pylist()] == want
    assert "stop" in table.column("finish_reason").to_pylist()
