"""--prompt-template: each row's question made of its own columns (an alt text, a title, a count);
answers equal transformers' generate asked that text; a row with a null in one of them is asked
--prompt; templates naming no column, or a column the input lacks, are refused before any work."""
import asyncio

import pyarrow as pa
import pytest

from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet

TEMPLATE = "The alt text says '{alt}'; {count} objects. What shape is first?"


def rows_with_alt_text():
    rows = good_rows(3, with_questions=False)
    for row, alt, count in zip(rows, ["a red circle", None, "three squares"], [1, 2, 3]):
        row.update(alt=alt, count=count)
    return rows


def test_the_model_stage_asks_each_row_its_filled_template(checkpoint, oracle):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = rows_with_alt_text()
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, prompt_template=TEMPLATE,
                            prompt_suffix=" One word.")
    stage = Generate(config)
    answered = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    asked = [(TEMPLATE.format(alt=r["alt"], count=r["count"]) if r["alt"] else config.prompt) + " One word."
             for r in rows]
    assert [r["question"] for r in answered] == asked
    assert [(r["answer"], r["num_generated_tokens"]) for r in answered] == \
        [oracle.answer(r["image"], text, 10) for r, text in zip(rows, asked)]


def test_a_run_fills_the_template_from_the_input_columns(ray_cluster, checkpoint, tmp_path):
    write_parquet(tmp_path / "in.parquet", rows_with_alt_text())
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=4, prompt_template=TEMPLATE)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    questions = sorted(r["question"] for r in read_output(str(tmp_path / "out")).to_pylist())
    assert questions == sorted([TEMPLATE.format(alt="a red circle", count=1), config.prompt,
                                TEMPLATE.format(alt="three squares", count=3)])
    with pytest.raises(ValueError, match=r"--prompt-template names \['title'\], which are not columns"):
        run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out2"),
                PipelineConfig(model=str(checkpoint), prompt_template="About {title}: {alt}"))


def test_a_value_that_does_not_fit_the_template_is_an_error_row(checkpoint):
    from pipeline.preprocess import Preprocess

    rows = rows_with_alt_text()
    rows[2]["count"] = 2 ** 21          # no character: {count:c} fails for this row alone
    config = PipelineConfig(model=str(checkpoint), prompt_template="{alt}: {count:c}")
    encoded = Preprocess(config)(pa.Table.from_pylist(rows))
    errors = [e for group in encoded.column("error").to_pylist() for e in group if e]    # rows grouped by image
    assert len(errors) == 1 and errors[0].startswith("prompt template: RowError: the row's values do not fit")
    assert "OverflowError" in errors[0]


def test_columns_inside_a_format_spec_are_read_and_a_missing_one_is_the_rows_error(checkpoint):
    """"{alt:>{width}}" names width too (it was left unread: every batch failed with a KeyError)."""
    from pipeline.preprocess import Preprocess, fill

    config = PipelineConfig(model=str(checkpoint), prompt_template="Alt: {alt:>{width}}")
    assert config.template_columns() == ["alt", "width"]
    rows = [dict(r, width=12) for r in rows_with_alt_text()]
    encoded = Preprocess(config)(pa.Table.from_pylist(rows))
    assert all(e is None for group in encoded.column("error").to_pylist() for e in group)
    assert "KeyError" in str(fill("{alt} {gone}", {"alt": "a"}))     # a row's error, not the batch's


@pytest.mark.parametrize("template,message", [
    ("Describe it.", "names no column"), ("Describe {}.", "name input columns"), ("{0} and {alt}", "'0'"),
    ("{meta.title}", "'meta.title'"), ("{tags[0]}", "'tags\\[0\\]'"), ("Describe {alt", "expected '}'"),
    ("{alt:{}}", "name input columns"), ("{alt:>{0}}", "'0'"),      # fields inside a format spec too
])
def test_templates_that_name_no_columns_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", prompt_template=template)


def test_a_question_column_no_prompt_reads_and_an_image_marker_are_refused_before_any_work(checkpoint):
    """--question-column beside a template that does not name it (or beside --messages-column) changed
    nothing, silently; `<image>` in a template made every row an error row."""
    from pipeline.checks import check_row_encoding

    for settings, made in ((dict(prompt_template="{title}?"), "prompt_template"), (dict(messages_column="m"),
                                                                                   "messages_column")):
        with pytest.raises(ValueError, match=f"question_column 'q' is not read beside {made}"):
            PipelineConfig(model="m", question_column="q", **settings)
    assert PipelineConfig(model="m", question_column="q", prompt_template="About {q}?").question_column == "q"
    with pytest.raises(ValueError, match="prompt_template '<image> {title}' cannot make a row's prompt"):
        check_row_encoding(PipelineConfig(model=str(checkpoint), prompt_template="<image> {title}"))
