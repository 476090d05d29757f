"""--samples N: every row gets N sampled answers in list columns, the first of which is the row's
answer exactly as a run without --samples gives it; each sample is what the engine answers that
sample's seed; JSON samples are parsed; the summary counts every sample's tokens; a resume with
another count is refused."""
import asyncio
import json
from dataclasses import replace

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet
from tests.pipeline.test_patterns import SCHEMA

SAMPLING = dict(temperature=1.3, top_k=40, seed=5)


def answered(config: PipelineConfig, rows: list[dict]):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    stage = Generate(config)
    table = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows))))
    stage.loop.close()
    return table, stage


def test_the_first_sample_is_the_answer_without_samples_and_each_is_its_seeds(checkpoint):
    from model.engine import LLMEngine
    from model.engine.samples import sample_seed

    rows = good_rows(4)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, samples=3, logprobs=True, **SAMPLING)
    table, stage = answered(config, rows)
    assert {"samples", "samples_finish_reason", "samples_num_generated_tokens", "samples_logprob"} <= set(table.schema.names)
    assert "samples_json" not in table.schema.names
    single, _ = answered(replace(config, samples=1), rows)
    assert "samples" not in single.schema.names
    columns = ["answer", "finish_reason", "num_generated_tokens", "answer_logprob"]
    assert table.select(["id", *columns]).to_pylist() == single.select(["id", *columns]).to_pylist()
    requests = stage_requests(stage, config, rows)
    engine = LLMEngine(stage.engine.model, stage.engine.tokenizer, max_batch_size=1, share_prefixes=False)
    for row in table.to_pylist():
        request = requests[row["id"]]
        assert len(row["samples"]) == len(row["samples_finish_reason"]) == len(row["samples_logprob"]) == 3
        assert (row["samples"][0], row["samples_finish_reason"][0], row["samples_num_generated_tokens"][0],
                row["samples_logprob"][0]) == (row["answer"], row["finish_reason"], row["num_generated_tokens"],
                                                row["answer_logprob"])
        for k in range(3):
            p = replace(request.sampling, n=1, seed=sample_seed(request.sampling.seed, k))
            alone = engine.generate([replace(request, sampling=p)])[0]
            assert (row["samples"][k], row["samples_num_generated_tokens"][k]) == (alone.text.strip(),
                                                                                  alone.num_generated_tokens)
    assert any(len(set(r["samples"])) > 1 for r in table.to_pylist())


def stage_requests(stage, config, rows) -> dict:
    """The engine requests the model stage makes of these rows, by row id."""
    from pipeline.groups import IMAGE_FIELDS, ungroup
    from pipeline.preprocess import Preprocess

    groups = Preprocess(config)(pa.Table.from_pylist(rows))
    batch, group_of = ungroup(groups)
    prepared, _, requests = stage.prepare(batch, groups.select(list(IMAGE_FIELDS)).to_pylist(), group_of)
    return {prepared[i]["id"]: request for i, request in requests.items()}


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_writes_every_sample_and_counts_their_tokens(ray_cluster, tmp_path):
    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:8]
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question")} for r in rows])
    output = str(tmp_path / "out")
    schema = {**SCHEMA, "properties": {k: v for k, v in SCHEMA["properties"].items() if k != "count"}}
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=48, json_schema=json.dumps(schema), batch_size=4,
                            samples=3, temperature=0.8, seed=1)
    summary = run_job(str(tmp_path / "in.parquet"), output, config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    answers = read_output(output).to_pylist()
    assert summary["generated_tokens_this_run"] == sum(sum(r["samples_num_generated_tokens"]) for r in answers)
    assert summary["generated_tokens_this_run"] > sum(r["num_generated_tokens"] for r in answers)
    assert sum(reason == "stop" for r in answers for reason in r["samples_finish_reason"]) >= len(answers)
    for row in answers:
        assert row["samples"][0] == row["answer"] and row["samples_json"][0] == row["answer_json"]
        for text, reason, parsed in zip(row["samples"], row["samples_finish_reason"], row["samples_json"]):
            if reason == "stop":
                jsonschema.validate(json.loads(text), schema)
                assert parsed == json.loads(text)
            else:
                assert parsed is None
    with pytest.raises(ValueError, match="cannot resume .*samples"):
        run_job(str(tmp_path / "in.parquet"), output, replace(config, samples=2), resume=True)


@pytest.mark.parametrize("settings,message", [(dict(samples=0), "samples must be >= 1"),
                                              (dict(samples=2), "greedy answers would all be the same")])
def test_sample_counts_a_run_cannot_keep_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)
