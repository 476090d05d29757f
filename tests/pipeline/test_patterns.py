"""--regex and --json-schema: every whole answer matches; the model stage's answers are
transformers' generate with the same allowed tokens on each row alone; a run on Ray writes the
demo's answers as JSON documents the schema allows, and keeps its schema in the run manifest."""
import asyncio
import json

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.model.test_constraints import as_answered, brute_force_allowed
from tests.pipeline.helpers import good_rows, write_parquet

SCHEMA = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                                           "colour": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
                                           "count": {"type": "integer"}},
          "required": ["shape", "colour"]}


@pytest.mark.parametrize("constraint", [dict(regex=r"[a-z]{2,6}( [a-z]{2,6})?\."), dict(json_schema=SCHEMA)],
                         ids=["regex", "json"])
def test_the_model_stage_answers_as_the_reference_with_the_same_allowed_tokens(checkpoint, oracle, constraint):
    from model.engine.json_schema import json_schema_pattern
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(4)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=40, **constraint)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    stop_ids = sorted(stage.engine.stop_ids)
    backend = oracle.processor.tokenizer.backend_tokenizer
    pattern = constraint.get("regex") or json_schema_pattern(SCHEMA)
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 40, eos_token_id=stop_ids,
                          allowed=lambda generated: brute_force_allowed(backend, generated, pattern, stop_ids))
            for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    for row in answered:
        assert regex.fullmatch(as_answered(pattern), row["answer"], partial=row["finish_reason"] == "length")
    assert any(row["finish_reason"] == "stop" for row in answered)


@pytest.mark.parametrize("constraint", [dict(regex=r"\n[a-z]{1,3}[ ]{2}\n"), dict(choices=("yes ", " no"))],
                         ids=["regex", "choices"])
def test_a_constrained_answer_is_kept_whole_with_its_spaces(checkpoint, constraint):
    """The output's answer was stripped: a pattern's spaces and newlines went, and no answer matched."""
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, **constraint)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(good_rows(3))))).to_pylist()
    stage.loop.close()
    assert all(row["finish_reason"] == "stop" for row in answered), answered
    for row in answered:
        assert row["answer"] in constraint["choices"] if "choices" in constraint else \
            regex.fullmatch(constraint["regex"], row["answer"]), row["answer"]


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_writes_json_the_schema_allows(ray_cluster, tmp_path):
    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:12]
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question")} for r in rows])
    output = str(tmp_path / "out")
    schema = {**SCHEMA, "properties": {k: v for k, v in SCHEMA["properties"].items() if k != "count"}}
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=48, json_schema=json.dumps(schema), batch_size=4)
    summary = run_job(str(tmp_path / "in.parquet"), output, config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    answers = read_output(output).to_pylist()
    whole = [r for r in answers if r["finish_reason"] == "stop"]
    assert summary["answers_cut_short"] == len(answers) - len(whole) < len(answers) // 2
    for row in whole:
        jsonschema.validate(json.loads(row["answer"]), schema)
        assert row["answer_json"] == json.loads(row["answer"])        # every property required: none null
    assert all(r["answer_json"] is None for r in answers if r["finish_reason"] != "stop")
    other = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=48, json_schema={**schema, "required": ["shape"]})
    with pytest.raises(ValueError, match="cannot resume .*json_schema"):
        run_job(str(tmp_path / "in.parquet"), output, other, resume=True)
    regex_only = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=8, regex="[a-z]+", batch_size=4)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "words"), regex_only)
    words = read_output(str(tmp_path / "words")).to_pylist()
    assert all(regex.fullmatch("[a-z]+", r["answer"]) for r in words if r["finish_reason"] == "stop")
    shapes = [r for r in rows if r["question"].startswith("What shape")]
    assert shapes and all(next(w["answer"] for w in words if w["id"] == r["id"]) == r["answers"][0] for r in shapes)


@pytest.mark.parametrize("settings,message", [
    (dict(regex="a+", choices=["a"]), "choices and regex are two ways"),
    (dict(json_schema="{}", choices_column="labels"), "choices and json_schema are two ways"),
    (dict(regex=r"(a)\1"), "regex: the pattern uses groupref"),
    (dict(regex=r"[^\s\S]"), "regex: it matches no text"),
    (dict(regex=""), "regex: it matches only the empty answer"), (dict(regex="(?:)*"), "only the empty answer"),
    (dict(json_schema='{"type": "object"}'), "json_schema: #: an object needs `properties`"),
    (dict(json_schema="{nope"), "json_schema: the JSON schema is not JSON"),
    (dict(json_schema={"type": "string", "maxLength": 10 ** 6}), "too large"),
    (dict(choice_logprobs=True), "choice_logprobs scores the choices"),
    (dict(choice_logprobs=True, regex="a+"), "choice_logprobs scores the choices"),
])
def test_constraints_a_run_cannot_keep_are_refused_before_it_starts(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)


def test_one_schema_is_one_text():
    a = PipelineConfig(model="m", json_schema='{"type":  "integer"}')
    b = PipelineConfig(model="m", json_schema={"type": "integer"})
    assert a.json_schema == b.json_schema == '{"type": "integer"}'
