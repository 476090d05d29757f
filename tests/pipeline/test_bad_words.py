"""--bad-words TEXT: no answer holds the text (as written or after a space, as vLLM tokenizes bad
words); answers equal transformers' generate(bad_words_ids=...) with those token sequences; a row
may name its own (--sampling-column), one text alone or a list."""
import json

import pytest

from pipeline import PipelineConfig
from tests.pipeline.helpers import good_rows
from tests.pipeline.test_row_settings import answered


def test_answers_avoid_the_words_as_the_reference(checkpoint, oracle, monkeypatch):
    rows = good_rows(4)
    plain = [oracle.answer(r["image"], r["question"] or PipelineConfig.prompt, 12) for r in rows]
    words = sorted({text[:1] for text, _ in plain})        # the tiny model's answers repeat a character
    config = PipelineConfig(model=str(checkpoint), max_new_tokens=12, bad_words=words)
    out, stage = answered(config, rows)
    ids = stage.bad_word_ids(tuple(words))
    assert len(ids) == 2 * len(words) and all(ids)          # each word, and after a space
    want = [oracle.answer(r["image"], r["question"] or config.prompt, 12, bad_words_ids=[list(w) for w in ids])
            for r in rows]
    assert [(out[r["id"]]["answer"], out[r["id"]]["num_generated_tokens"]) for r in rows] == want
    assert want != plain
    tokenize = stage.encoder.tokenizer.encode
    for r in rows:
        answer = tokenize(" " + out[r["id"]]["answer"], add_special_tokens=False)
        assert not any(tuple(answer[i:i + len(w)]) == w for w in ids for i in range(len(answer)))
    monkeypatch.setattr("pipeline.requests.BAD_WORD_LISTS", 3)     # rows' own lists: the recent ones kept
    for k in range(10):
        stage.bad_word_ids((f"w{k}",))
    assert len(stage._bad_words) == 3 and stage.bad_word_ids(tuple(words)) == ids


def test_a_row_names_its_own_words_and_stops_one_text_alone(checkpoint):
    rows = good_rows(2)
    first, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=12), rows[:1])
    word = first["row-0"]["answer"][:1]
    stop = first["row-0"]["answer"][2:5]
    for row, own in zip(rows, [{"bad_words": word}, {"stop": stop}]):
        row["settings"] = json.dumps(own)
    out, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=12, sampling_column="settings"), rows)
    banned, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=12, bad_words=[word]), rows[:1])
    stopped, _ = answered(PipelineConfig(model=str(checkpoint), max_new_tokens=12, stop=[stop]), rows[1:])
    assert out["row-0"]["answer"] == banned["row-0"]["answer"] != first["row-0"]["answer"]
    assert out["row-1"]["answer"] == stopped["row-1"]["answer"]      # one stop string, not its letters


@pytest.mark.parametrize("settings,message", [
    (dict(bad_words=[""]), "bad_words must be non-empty strings"),
    (dict(bad_words=["x"], score_column="c"), "bad_words is about generating")])
def test_bad_words_a_run_cannot_take_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **settings)
