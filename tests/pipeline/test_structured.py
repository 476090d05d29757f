"""pipeline.structured: the schema's Arrow type of `answer_json`, and whole answers parsed into it,
through a real Parquet file."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.structured import answer_field, parsed_answers

SCHEMA = {
    "$defs": {"box": {"type": "array", "items": {"type": "number"}}},
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog"]}, "count": {"type": "integer"}, "boxes": {"type": "array", "items": {"$ref": "#/$defs/box"}},
        "seen": {"type": ["boolean", "null"]}, "size": {"enum": [1, 2.5]}, "mixed": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "nothing": {"type": "null"}, "empty": {"type": "object", "properties": {}},
        "parts": {"type": "object", "properties": {"head": {"type": "string", "format": "date"}}},
    },
    "required": ["label"],
}


def test_the_schema_becomes_an_arrow_type():
    field = answer_field(json.dumps(SCHEMA))
    assert field.name == "answer_json"
    assert field.type == pa.struct([
        ("label", pa.string()), ("count", pa.int64()), ("boxes", pa.list_(pa.list_(pa.float64()))),
        ("seen", pa.bool_()), ("size", pa.float64()), ("mixed", pa.string()), ("nothing", pa.string()),
        ("empty", pa.string()), ("parts", pa.struct([("head", pa.string())]))])
    assert answer_field('{"type": "array", "items": {"enum": [true, false]}}').type == pa.list_(pa.bool_())
    assert answer_field('{"enum": [1, 2, null]}').type == pa.int64()
    assert answer_field('{"enum": [null]}').type == pa.string()        # Parquet has no column of nulls only


def test_whole_answers_are_parsed_into_it_through_parquet(tmp_path):
    field = answer_field(json.dumps(SCHEMA))
    answers = ['{"label": "cat", "count": 3, "boxes": [[1, 2.5]], "seen": null, "mixed": "x", "empty": {}}',
               '{"label":"dog","mixed":7,"parts":{"head":"2024-01-02"},"size":1}',
               '{"label": "cat", "count": 99999999999999999999999}',      # beyond int64: no value
               '{"label": "do', '{"label": "do', None]
    column = parsed_answers(answers, ["stop", "stop", "stop", "length", "stop", "error"], field)
    pq.write_table(pa.table({"answer_json": column}), tmp_path / "out.parquet")
    rows = pq.read_table(tmp_path / "out.parquet").column("answer_json").to_pylist()
    assert rows[0] == {"label": "cat", "count": 3, "boxes": [[1.0, 2.5]], "seen": None, "size": None, "mixed": "x",
                       "nothing": None, "empty": "{}", "parts": None}
    assert rows[1]["mixed"] == "7" and rows[1]["parts"] == {"head": "2024-01-02"} and rows[1]["size"] == 1.0
    assert rows[2:] == [None, None, None, None]


def test_answers_of_another_type_are_null_not_converted_nor_fatal():
    """A row's own regex or choices (which replace the job's schema for it) may answer a number or a
    word: its `answer_json` is null, the batch's other answers are parsed (Arrow would raise on some,
    and quietly turn 2.5 into the integer 2 or true into 1.0)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                               "ok": {"type": "boolean"}}}
    field = answer_field(json.dumps(schema))
    answers = ['1', 'true', '"word"', '[1]', '{"n": 2.5}', '{"x": true}', '{"ok": 1}', '{"n": 3.0, "x": 2, "ok": false}']
    rows = parsed_answers(answers, ["stop"] * len(answers), field).to_pylist()
    assert rows == [None] * 7 + [{"n": 3, "x": 2.0, "ok": False}]
    for kind, answer in (("integer", "true"), ("number", '"1"'), ("boolean", "0"), ("array", '{"a": 1}')):
        typed = answer_field(json.dumps({"type": kind, "items": {"type": "integer"}}))
        assert parsed_answers([answer], ["stop"], typed).to_pylist() == [None], kind
