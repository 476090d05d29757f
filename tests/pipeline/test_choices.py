"""--choice: every answer is one of the choices; the model stage's answers are transformers' generate
with the same allowed tokens on each row alone, and a run on Ray labels the demo's images."""
import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.model.test_choices import brute_force_allowed
from tests.pipeline.helpers import good_rows, write_parquet


def test_the_model_stage_answers_one_of_the_choices_as_the_reference(checkpoint, oracle):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(4)
    choices = ["red circle", "blue square", "green", "nothing at all"]
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, choices=choices)
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    stop_ids = sorted(stage.engine.stop_ids)
    backend = oracle.processor.tokenizer.backend_tokenizer
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, eos_token_id=stop_ids,
                          allowed=lambda generated: brute_force_allowed(backend, generated, choices, stop_ids))
            for r in rows]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == want
    assert all(r["answer"] in choices and r["finish_reason"] == "stop" for r in answered)


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_labels_the_demo_images_with_the_choices(ray_cluster, tmp_path):
    """The demo model names shapes right; asked their colour, it still answers a shape."""
    rows = [r for r in pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()
            if r["question"].startswith(("What shape is", "What colour is"))][:12]
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question")} for r in rows])
    shapes = ["circle", "square", "triangle"]
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=8, choices=shapes, batch_size=4)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    answers = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert all(answers[r["id"]]["answer"] in shapes for r in rows)
    asked_shape = [r for r in rows if r["question"].startswith("What shape")]
    assert asked_shape and all(answers[r["id"]]["answer"] == r["answers"][0] for r in asked_shape)
    assert any(r["question"].startswith("What colour") for r in rows)
