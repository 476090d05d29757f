"""--sampling-column: each row's own decoding settings (a struct column, or JSON text) override the
job's for that row, as ray.data.llm's per-row sampling_params: answers equal the reference's (greedy)
or the engine's (sampled) under the row's settings; a row's constraint replaces the job's; a bad
setting is that row's error; a column of unknown or mistyped settings is refused before any work."""
import asyncio
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet
from tests.pipeline.test_samples import stage_requests

SETTINGS = pa.struct([("max_new_tokens", pa.int64()), ("temperature", pa.float64()), ("seed", pa.int64()),
                      ("regex", pa.string()), ("stop", pa.list_(pa.string()))])
OWN = [{"max_new_tokens": 3}, {"temperature": 0.9, "seed": 4}, {"regex": "[a-z]+ [a-z]+"}, None,
       {"temperature": -1.0}, {"stop": ["e"]}]


def answered(config: PipelineConfig, rows: list[dict], schema: pa.Schema | None = None):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    stage = Generate(config)
    table = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows, schema=schema))))
    stage.loop.close()
    return {r["id"]: r for r in table.to_pylist()}, stage


@pytest.mark.parametrize("form", ["struct", "json"])
def test_each_row_is_answered_under_its_own_settings(checkpoint, oracle, form):
    from model.engine import LLMEngine

    rows = [dict(r, settings=s) for r, s in zip(good_rows(len(OWN)), OWN)]
    schema = None
    if form == "json":
        rows = [dict(r, settings=None if s is None else json.dumps(s)) for r, s in zip(rows, OWN)]
    else:
        schema = pa.Table.from_pylist(good_rows(1)).schema.append(pa.field("settings", SETTINGS))
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, sampling_column="settings")
    out, stage = answered(config, rows, schema)
    ask = lambda r, n, **kw: oracle.answer(r["image"], r["question"] or config.prompt, n, **kw)  # noqa: E731
    assert (out["row-0"]["answer"], out["row-0"]["num_generated_tokens"]) == ask(rows[0], 3)
    assert (out["row-3"]["answer"], out["row-3"]["num_generated_tokens"]) == ask(rows[3], 10)   # null: the job's
    request = stage_requests(stage, config, rows[1:2])["row-1"]
    assert (request.sampling.temperature, request.sampling.seed) == (0.9, 4)
    alone = LLMEngine(stage.engine.model, stage.engine.tokenizer, max_batch_size=1).generate([request])[0]
    assert out["row-1"]["answer"] == alone.text.strip()
    assert out["row-4"]["error"] == "prepare: ValueError: temperature must be >= 0, got -1.0"
    stopped = PipelineConfig(model=str(checkpoint), max_new_tokens=10, stop=["e"])
    assert out["row-5"]["answer"] == answered(stopped, rows[5:6])[0]["row-5"]["answer"]
    # A row's own constraint replaces the job's; the others keep the job's.
    chosen, _ = answered(replace(config, choices=["red", "blue"]), rows, schema)
    patterned = PipelineConfig(model=str(checkpoint), max_new_tokens=10, regex="[a-z]+ [a-z]+")
    assert chosen["row-2"]["answer"] == answered(patterned, rows[2:3])[0]["row-2"]["answer"]
    assert regex.fullmatch("[a-z]+ [a-z]+", chosen["row-2"]["answer"], partial=chosen["row-2"]["finish_reason"] == "length")
    assert chosen["row-3"]["answer"] in ("red", "blue")


def test_bad_json_settings_are_that_rows_error(checkpoint):
    rows = [dict(r, settings=s) for r, s in zip(good_rows(3), ['{"temprature": 1}', "[1]", "{nope"])]
    out, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=2, sampling_column="settings"), rows)
    assert out["row-0"]["error"].startswith("prepare: RowError: the row's settings name 'temprature', not one a row")
    assert out["row-1"]["error"] == "prepare: RowError: the row's settings must be a JSON object, got list"
    assert out["row-2"]["error"].startswith("prepare: RowError: the row's settings are not JSON")


@pytest.mark.parametrize("setting, message", [
    ('{"temperature": "0.7"}', "'temperature' must be a number within float32's range, got '0.7'"),
    ('{"stop": 5}', "'stop' must be a text or a list of texts, got 5"),
    ('{"temperature": 1.0, "seed": 1267650600228229401496703205376}', "'seed' must be an integer of 64 bits"),
    ('{"temperature": 1e308}', "'temperature' must be a number within float32's range, got 1e+308"),
    ('{"max_new_tokens": true}', "'max_new_tokens' must be an integer of 64 bits, got True")])
def test_a_setting_of_the_wrong_kind_is_that_rows_error_naming_it(checkpoint, setting, message):
    """JSON text holds anything (a number quoted from CSV): the step failed naming no setting, or the
    batch failed and was run again one row at a time."""
    rows = [dict(r, settings=s) for r, s in zip(good_rows(2), [setting, '{"max_new_tokens": 1}'])]
    out, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=2, sampling_column="settings"), rows)
    assert out["row-0"]["error"].startswith(f"prepare: RowError: the row's setting {message}")
    assert out["row-1"]["error"] is None and out["row-1"]["num_generated_tokens"] == 1


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_answers_each_row_under_its_settings(ray_cluster, tmp_path):
    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:8]
    shapes = ["circle", "square", "triangle"]
    own = [{"choices": shapes} if r["question"].startswith("What shape") else {"max_new_tokens": 2} for r in rows]
    write_parquet(tmp_path / "in.parquet", [{"id": r["id"], "image": r["image"], "question": r["question"],
                                             "settings": s} for r, s in zip(rows, own)])
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=12, batch_size=4, sampling_column="settings")
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    out = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for row, settings in zip(rows, own):
        if "choices" in settings:
            assert out[row["id"]]["answer"] == row["answers"][0] and out[row["id"]]["answer"] in shapes
        else:
            assert out[row["id"]]["num_generated_tokens"] <= 2
    assert any("choices" in s for s in own) and any("max_new_tokens" in s for s in own)
    with pytest.raises(ValueError, match="cannot resume .*sampling_column"):
        run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), replace(config, sampling_column=None), resume=True)


@pytest.mark.parametrize("settings,message", [
    (pa.array([{"temprature": 1.0}]), "has 'temprature', which is not a setting a row may set"),
    (pa.array([{"max_new_tokens": "ten"}]), "holds string for 'max_new_tokens', not integer"),
    (pa.array([{"stop": "."}]), "holds string for 'stop', not texts"),
    (pa.array([3]), "holds int64, not structs of settings"),
])
def test_a_column_of_settings_no_row_may_set_is_refused_before_any_work(checkpoint, tmp_path, settings, message):
    from pipeline.job import prepare_job

    table = pa.Table.from_pylist(good_rows(1)).append_column("settings", settings)
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=message):
        prepare_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"),
                    PipelineConfig(model=str(checkpoint), sampling_column="settings"))
    with pytest.raises(ValueError, match="no `other` column of decoding settings"):
        prepare_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"),
                    PipelineConfig(model=str(checkpoint), sampling_column="other"))
