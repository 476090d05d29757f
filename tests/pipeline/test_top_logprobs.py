"""--top-logprobs K: a `token_logprobs` column of each answer token's id and log p and the step's K
likeliest tokens', equal to transformers' generate(output_logits=True) on the row alone; a run on
Ray writes it, its ids spelling the answer; refused with several samples."""
import asyncio
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import good_rows, write_parquet


def reference_steps(oracle, image: bytes, question: str, max_new_tokens: int, k: int) -> list[dict]:
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(image))},
                                             {"type": "text", "text": question}]}]
    inputs = oracle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = oracle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(oracle.model.generation_config.eos_token_id or [])
    n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    steps = []
    for logits, token in zip(out.logits[:n], tokens[:n]):
        log_p = logits[0].float().log_softmax(-1)
        values, ids = log_p.topk(k)
        steps.append({"id": token, "logprob": log_p[token].item(), "top_ids": ids.tolist(), "top_logprobs": values.tolist()})
    return steps


def test_the_model_stage_writes_each_tokens_top_logprobs_as_the_reference(checkpoint, oracle):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = good_rows(3)
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=6, top_logprobs=4)
    stage = Generate(config)
    out = asyncio.run(stage(Preprocess(config)(pa.Table.from_pylist(rows)))).to_pylist()
    stage.loop.close()
    for row, got in zip(rows, out):
        want = reference_steps(oracle, row["image"], row["question"] or config.prompt, 6, 4)
        assert [s["id"] for s in got["token_logprobs"]] == [s["id"] for s in want]
        assert len(got["token_logprobs"]) == got["num_generated_tokens"]
        for g, w in zip(got["token_logprobs"], want):
            assert g["top_ids"] == w["top_ids"]
            assert g["logprob"] == pytest.approx(w["logprob"], abs=2e-4)
            assert g["top_logprobs"] == pytest.approx(w["top_logprobs"], abs=2e-4)


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_writes_the_column_whose_ids_spell_the_answer(ray_cluster, tmp_path):
    from tokenizers import Tokenizer

    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:6]
    write_parquet(tmp_path / "in.parquet", [{k: r[k] for k in ("id", "image", "question")} for r in rows])
    config = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=16, batch_size=3, top_logprobs=3)
    summary = run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    tokenizer = Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))
    for row in read_output(str(tmp_path / "out")).to_pylist():
        steps = row["token_logprobs"]
        assert tokenizer.decode([s["id"] for s in steps], skip_special_tokens=True).strip() == row["answer"]
        assert all(len(s["top_ids"]) == 3 and s["logprob"] <= s["top_logprobs"][0] + 1e-6 for s in steps)
        assert all(s["id"] == s["top_ids"][0] for s in steps)                # greedy: the likeliest each time
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert schema.field("token_logprobs").type.value_type.names == ["id", "logprob", "top_ids", "top_logprobs"]


@pytest.mark.parametrize("settings,message", [(dict(top_logprobs=21), "top_logprobs must be in"),
                                              (dict(top_logprobs=2, samples=2, temperature=1.0), "not with samples")])
def test_top_logprobs_a_run_cannot_keep_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)
