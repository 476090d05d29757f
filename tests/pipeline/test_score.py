"""--score-column: each row's text is scored as its answer, none generated: `answer_logprob` is the
sum of its tokens' log p (after one space, as the model writes answers) given the image and
question, equal to transformers' forward pass; a run on the demo model scores right answers above
wrong ones; a row without text is an error row; generating settings are refused beside it."""
import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet

TEXTS = ["A red circle.", " two squares", None, "ünïcödé: 3"]


def reference_score(oracle, image: bytes, question: str, text: str) -> tuple[float, int]:
    import io

    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(image))},
                                             {"type": "text", "text": question}]}]
    inputs = oracle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    spelled = text if text[:1].isspace() else " " + text
    tail = oracle.processor.tokenizer(spelled, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([tail])], 1)
    with torch.no_grad():
        logits = oracle.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                              pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0].float()
    n = inputs["input_ids"].shape[1]
    log_p = logits[n - 1:-1].log_softmax(-1)
    return sum(log_p[i, t].item() for i, t in enumerate(tail)), len(tail)


def test_the_model_stage_scores_each_rows_text_as_the_reference(checkpoint, oracle):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = [dict(r, caption=t) for r, t in zip(good_rows(len(TEXTS)), TEXTS)]
    config = PipelineConfig(model=str(checkpoint), score_column="caption")
    stage = Generate(config)
    out = {r["id"]: r for r in asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()}
    stage.loop.close()
    for row in rows:
        got = out[row["id"]]
        if row["caption"] is None:
            assert got["error"] == "score column: RowError: the row has no text to score"
            continue
        want, count = reference_score(oracle, row["image"], row["question"] or config.prompt, row["caption"])
        assert (got["answer"], got["finish_reason"], got["num_generated_tokens"]) == (row["caption"], "stop", count)
        assert got["answer_logprob"] == pytest.approx(want, abs=2e-4)


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_scores_the_right_answers_above_wrong_ones(ray_cluster, tmp_path):
    rows = [r for r in pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()
            if r["question"].startswith("What shape")][:4]
    wrong = {"circle": "square", "square": "triangle", "triangle": "circle"}
    scored = [{"id": f"{r['id']}/{kind}", "image": r["image"], "question": r["question"], "caption": text}
              for r in rows for kind, text in (("right", r["answers"][0]), ("wrong", wrong[r["answers"][0]]))]
    write_parquet(tmp_path / "in.parquet", scored)
    config = PipelineConfig(model=str(DEMO_MODEL), score_column="caption", batch_size=4)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0 and len(rows) == 4
    out_rows = read_output(str(tmp_path / "out")).to_pylist()      # the scored texts' tokens, none generated
    assert summary["scored_tokens_this_run"] == sum(r["num_generated_tokens"] for r in out_rows) > 0
    assert summary["generated_tokens_this_run"] == 0
    out = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for r in rows:
        assert out[f"{r['id']}/right"]["answer_logprob"] > out[f"{r['id']}/wrong"]["answer_logprob"] + 1
        assert out[f"{r['id']}/right"]["answer"] == r["answers"][0]
    write_parquet(tmp_path / "bad.parquet", [{"id": "a", "image": rows[0]["image"], "caption": 3}])
    with pytest.raises(ValueError, match="the column of texts to score 'caption' holds int64"):
        run_job(str(tmp_path / "bad.parquet"), str(tmp_path / "bad"), config)


@pytest.mark.parametrize("settings", [dict(choices=["a"]), dict(regex="a+"), dict(samples=2, temperature=1.0),
                                      dict(stop=["."]), dict(sampling_column="s"),
                                      # given as flags (--temperature 0.7): they changed nothing, silently
                                      dict(temperature=0.7, given_settings=["temperature"])])
def test_generating_settings_are_refused_beside_scoring(settings):
    with pytest.raises(ValueError, match="score_column scores given answers; .* is about generating them"):
        PipelineConfig(model="m", score_column="caption", **settings)
