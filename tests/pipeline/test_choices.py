"""--choice: every answer is one of the choices; the model stage's answers are transformers' generate
with the same allowed tokens on each row alone, and a run on Ray labels the demo's images."""
import asyncio
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.model.test_choices import brute_force_allowed
from tests.pipeline.helpers import good_rows, write_parquet


def test_the_model_stage_answers_one_of_the_choices_as_the_reference(checkpoint, oracle):
    """The job's choices, or a row's own (--choices-column; a null or empty cell takes the job's); a
    row whose own choices are not text is an error row, and the others are answered."""
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(6)
    choices = ["red circle", "blue square", "green", "nothing at all"]
    own = [None, ["yellow star", "purple"], [], ["three", "two", "one"], ["fox", "dog", "the lazy dog"], ["", "x"]]
    for row, options in zip(rows, own):
        row["options"] = options
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, choices=choices, choices_column="options")
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    stop_ids = sorted(stage.engine.stop_ids)
    backend = oracle.processor.tokenizer.backend_tokenizer
    asked = [options or choices for options in own]
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, eos_token_id=stop_ids,
                          allowed=lambda generated, c=c: brute_force_allowed(backend, generated, c, stop_ids))
            for r, c in zip(rows[:5], asked)]
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered[:5]] == want
    assert all(r["answer"] in c and r["finish_reason"] == "stop" for r, c in zip(answered, asked[:5]))
    assert answered[5]["finish_reason"] == "error" and "choices must be non-empty strings" in answered[5]["error"]


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_labels_the_demo_images_with_the_choices(ray_cluster, tmp_path):
    """The demo model names shapes and colours right, each question with its own choices (the
    colour questions' from a column); asked a colour with only shapes to answer, it answers a shape."""
    rows = [r for r in pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()
            if r["question"].startswith(("What shape is", "What colour is"))][:16]
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    for i, r in enumerate(rows):
        r["options"] = colours if r["question"].startswith("What colour") and i % 4 else None
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question", "options")} for r in rows])
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=8, choices=shapes, choices_column="options",
                            batch_size=4, choice_logprobs=True)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    assert sum(summary["answers_by_choice"].values()) == len(rows)
    assert set(summary["answers_by_choice"]) <= set(shapes + colours)
    written = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    answers = {k: r["answer"] for k, r in written.items()}
    assert all(answers[r["id"]] in (r["options"] or shapes) for r in rows)
    right = [r for r in rows if r["question"].startswith("What shape") or r["options"]]
    assert all(answers[r["id"]] == r["answers"][0] for r in right)
    # each row's choices scored: a distribution over them (the rest is other answers), led by the right one
    scores = {k: dict(r["choice_logprobs"]) for k, r in written.items()}
    assert all(set(scores[r["id"]]) == set(r["options"] or shapes) for r in rows)
    assert all(sum(math.exp(v) for v in scores[r["id"]].values()) < 1 + 1e-6 for r in rows)
    assert all(max(scores[r["id"]], key=scores[r["id"]].get) == r["answers"][0] for r in right)
    assert all(math.exp(scores[r["id"]][r["answers"][0]]) > 0.5 for r in right)
    assert len(right) < len(rows) and any(r["options"] for r in rows)      # colour questions answered with shapes
