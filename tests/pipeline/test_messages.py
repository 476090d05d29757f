"""--messages-column: each row's conversation (HF chat messages, its images in the image column)
has its next assistant turn answered: the model stage's answers equal transformers' generate on
the same messages (a last assistant turn left out, the suffix in the last user turn); a null cell
is asked --prompt; bad messages are error rows naming the cause; a Ray run of the demo answers a
conversation of one question as that question."""
import asyncio
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.common import DEMO_INPUT, DEMO_MODEL
from pipeline import PipelineConfig, read_output, run_job
from tests.pipeline.helpers import png, write_parquet
from tests.processing.test_conversation import as_reference, text

CONVERSATION = [{"role": "user", "content": [{"type": "image"}, text("What is in the first image?")]},
                {"role": "assistant", "content": [text("Shapes.")]},
                {"role": "user", "content": [text("And in this one?"), {"type": "image"}]},
                {"role": "assistant", "content": [text("An old answer, answered again.")]}]
# The column as Arrow keeps such lists: structs of every part's fields (nulls where a part has none).
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()),
                                                                                      ("text", pa.string())])))]))


def reference_answer(oracle, images: list[bytes], messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
    import torch

    wanted = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    pictures = [Image.open(io.BytesIO(b)) for b in images]
    inputs = oracle.processor.apply_chat_template(as_reference(wanted, pictures), add_generation_prompt=True,
                                                  tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = oracle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(oracle.model.generation_config.eos_token_id or [])
    n = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return oracle.processor.decode(new[:n], skip_special_tokens=True).strip(), n


def conversation_rows() -> list[dict]:
    return [{"id": "two-images", "image": [png(30, 20, 1), png(24, 40, 2)], "messages": CONVERSATION},
            {"id": "one-turn", "image": [png(40, 30, 3)], "messages": CONVERSATION[:2]},
            {"id": "null", "image": [png(20, 20, 4)], "messages": None},
            {"id": "no-user-turn", "image": [png(20, 20, 5)], "messages": [CONVERSATION[1]]},
            {"id": "too-few-images", "image": [png(20, 20, 6)], "messages": CONVERSATION[:3]}]


def test_the_model_stage_answers_each_conversations_next_turn_as_the_reference(checkpoint, oracle):
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess

    rows = conversation_rows()
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=10, messages_column="messages",
                            prompt_suffix=" Be brief.")
    stage = Generate(config)
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("image", pa.list_(pa.binary())),
                                                         ("messages", MESSAGES)]))
    answered = {r["id"]: r for r in asyncio.run(stage(Preprocess(config)(table))).to_pylist()}
    stage.loop.close()
    suffixed = [*CONVERSATION[:2], {"role": "user", "content": [text("And in this one?"), {"type": "image"},
                                                                  text(" Be brief.")]}]
    assert (answered["two-images"]["answer"], answered["two-images"]["num_generated_tokens"]) == \
        reference_answer(oracle, rows[0]["image"], suffixed, 10)
    assert answered["two-images"]["question"] == "And in this one?\n Be brief."
    one = [{"role": "user", "content": [{"type": "image"}, text("What is in the first image? Be brief.")]}]
    assert (answered["one-turn"]["answer"], answered["one-turn"]["num_generated_tokens"]) == \
        reference_answer(oracle, rows[1]["image"], one, 10)
    assert answered["null"]["question"] == config.prompt + " Be brief." and answered["null"]["error"] is None
    assert answered["no-user-turn"]["error"].startswith("messages: RowError: the conversation ends with nothing")
    assert answered["too-few-images"]["error"] == ("preprocess: PromptError: the conversation has 2 image parts for "
                                                   "the row's 1 images")


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the demo model is not built (python -m jobs.train_demo)")
def test_a_run_answers_a_conversation_of_one_question_as_that_question(ray_cluster, tmp_path):
    rows = pq.read_table(DEMO_INPUT.parent / "heldout.parquet").to_pylist()[:8]
    as_text = [{"id": r["id"], "image": r["image"], "question": r["question"]} for r in rows]
    as_chat = [{"id": r["id"], "image": r["image"],
                "messages": json.dumps([{"role": "user", "content": [{"type": "image"}, text(r["question"])]},
                                        {"role": "assistant", "content": "a dataset's old answer"}])} for r in rows]
    write_parquet(tmp_path / "text.parquet", as_text)
    write_parquet(tmp_path / "chat.parquet", as_chat)
    plain = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=12, batch_size=4)
    chat = PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=12, batch_size=4, messages_column="messages",
                          keep_columns=["messages"])
    run_job(str(tmp_path / "text.parquet"), str(tmp_path / "text"), plain)
    summary = run_job(str(tmp_path / "chat.parquet"), str(tmp_path / "chat"), chat)
    assert summary["error_rows"] == 0 and summary["missing_rows"] == 0
    columns = ["id", "question", "answer", "num_generated_tokens"]
    answers = lambda out: sorted(read_output(str(tmp_path / out), columns=columns).to_pylist(), key=str)  # noqa: E731
    assert answers("chat") == answers("text")
    with pytest.raises(ValueError, match="cannot resume .*messages_column"):
        run_job(str(tmp_path / "chat.parquet"), str(tmp_path / "chat"),
                PipelineConfig(model=str(DEMO_MODEL), max_new_tokens=12, keep_columns=["messages"]), resume=True)
    with pytest.raises(ValueError, match="no `dialogue` column of conversations"):
        run_job(str(tmp_path / "chat.parquet"), str(tmp_path / "other"),
                PipelineConfig(model=str(DEMO_MODEL), messages_column="dialogue"))
    write_parquet(tmp_path / "bad.parquet", [{"id": "a", "image": rows[0]["image"], "messages": 3}])
    with pytest.raises(ValueError, match="the messages column 'messages' holds int64"):
        run_job(str(tmp_path / "bad.parquet"), str(tmp_path / "bad"),
                PipelineConfig(model=str(DEMO_MODEL), messages_column="messages"))


def test_messages_and_a_template_are_refused_together():
    with pytest.raises(ValueError, match="messages_column and prompt_template are two ways"):
        PipelineConfig(model="m", messages_column="messages", prompt_template="{title}")


def test_a_cell_no_parser_can_read_is_its_rows_error_not_the_jobs():
    """100 000 levels of JSON raised RecursionError out of the CPU stage: the job failed, every row unanswered."""
    from pipeline.preprocess import conversation
    from pipeline.rows import RowError

    found = conversation("[" * 100_000 + "]" * 100_000, "")
    assert isinstance(found, RowError) and "nest too deeply" in str(found)
