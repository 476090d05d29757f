"""model.engine.json_schema: the pattern of a schema takes the documents the schema allows (written
as json.dumps writes them, one optional space after ":" and ","), checked with jsonschema, and no
document the schema refuses."""
from __future__ import annotations

import itertools
import json
import random
import re
import time

import jsonschema
import pytest

from model.engine.json_schema import json_schema_pattern

SCHEMA = {
    "$defs": {"box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4}},
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog", "a \"quoted\" label"]},
        "score": {"type": "number"},
        "boxes": {"type": "array", "items": {"$ref": "#/$defs/box"}, "maxItems": 2},
        "caption": {"type": "string", "minLength": 1, "maxLength": 12},
        "seen": {"type": ["boolean", "null"]},
        "taken": {"type": "string", "format": "date"},
        "colour": {"anyOf": [{"const": "red"}, {"type": "integer"}]},
    },
    "required": ["label", "seen"],
}
VALUES = {
    "label": ["cat", "dog", "a \"quoted\" label", "bird", 3],
    "score": [0, -1.5, 2e-3, 12, "1"],
    "boxes": [[], [[1, 2, 3, 4]], [[1, 2, 3, 4], [0, 0, 0, 0]], [[1, 2, 3]], [[1, 2, 3, 4]] * 3],
    "caption": ["a", "ünïcode 日本", 'tab\t"q"', "", "far too long a caption"],
    "seen": [True, False, None, "yes"],
    "taken": ["2024-02-29", "2024-13-01", "yesterday"],     # (the pattern's "date" is a shape: Feb 30 passes)
    "colour": ["red", 7, "blue", None],
}


def documents(rng: random.Random, count: int):
    """Objects of some of the properties (in the schema's order) with good and bad values."""
    names = list(SCHEMA["properties"])
    for _ in range(count):
        kept = [n for n in names if rng.random() < 0.6]
        yield {n: rng.choice(VALUES[n]) for n in kept}


def written(document: dict, rng: random.Random) -> str:
    colon, comma = rng.choice([(":", ","), (": ", ", ")])
    return json.dumps(document, ensure_ascii=rng.random() < 0.5, separators=(comma, colon))


def test_the_pattern_takes_exactly_the_documents_the_schema_allows():
    pattern, rng = re.compile(json_schema_pattern(SCHEMA)), random.Random(0)
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    outcomes = set()
    for document in documents(rng, 3000):
        text, valid = written(document, rng), validator.is_valid(document)
        assert bool(pattern.fullmatch(text)) == valid, text
        outcomes.add(valid)
    assert outcomes == {True, False}


@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "integer"}, ["0", "-12", "7"], ["01", "1.5", "-", ""]),
    ({"type": "number"}, ["0.5", "-1e+9", "3E2"], [".5", "1.", "+1"]),
    ({"type": "string"}, ['""', '"a\\nb"', '"\\u00e9"', '"日本"'], ['"a', '"\\x"', '"a"b"', '"\n"']),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 1}, ["[true]", "[true, false]"], ["[]", "[true,]"]),
    ({"type": "object", "properties": {}}, ["{}"], ['{"a":1}']),
    ({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "null"}, "c": {"type": "null"}},
      "required": ["b"]},
     ['{"b":null}', '{"a":null,"b":null}', '{"b":null, "c":null}', '{"a":null,"b":null,"c":null}'],
     ["{}", '{"a":null}', '{"b":null,"a":null}', '{,"b":null}', '{"b":null,}']),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123"']),
    ({"type": "string", "format": "date-time"}, ['"2024-05-01T12:30:00Z"', '"2024-05-01T12:30:00.5+02:00"'],
     ['"2024-05-01 12:30:00"']),
])
def test_small_schemas(schema, good, bad):
    pattern = re.compile(json_schema_pattern(json.dumps(schema)))
    assert all(pattern.fullmatch(text) for text in good), good
    assert not any(pattern.fullmatch(text) for text in bad), bad


def test_optional_properties_in_every_combination():
    names = "abcd"
    schema = {"type": "object", "properties": {n: {"const": i} for i, n in enumerate(names)}, "required": ["c"]}
    pattern = re.compile(json_schema_pattern(schema))
    for mask in itertools.product([0, 1], repeat=4):
        document = {n: i for i, (n, keep) in enumerate(zip(names, mask)) if keep}
        assert bool(pattern.fullmatch(json.dumps(document))) == ("c" in document), document


@pytest.mark.parametrize("schema,message", [
    ({}, "any JSON value"), ({"type": "object"}, "needs `properties`"), ({"type": "array"}, "needs `items`"),
    ({"type": "integer", "minimum": 0}, "'minimum' is not supported"), ({"properties": {}}, "does not say its type"),
    ({"type": "string", "pattern": "a+"}, "'pattern' is not supported"),
    ({"type": "string", "format": "email"}, "format 'email' is not supported"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}, "recursive"),
    ({"$ref": "#/$defs/missing"}, "names nothing"), ({"$ref": "other.json#/a"}, "inside the schema"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}, "'b' is not among"),
    ({"type": "thing"}, "unknown type"), ("[1, 2]", "is an object"), ("{not json", "not JSON"),
    # keywords of the wrong type: a clear ValueError, not a TypeError from inside the writer
    ({"type": "object", "properties": 5}, "keyword of the wrong type"), ({"enum": 5}, "keyword of the wrong type"),
    ({"type": "string", "maxLength": "5"}, "maxLength must be an integer >= 0"),
    ({"type": "string", "maxLength": -1}, "maxLength must be an integer >= 0"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength 3 is above maxLength 2"),
    ({"type": "array", "items": {"type": "string"}, "minItems": "a"}, "minItems must be an integer"),
    # schemas no value satisfies, and keywords a pattern would drop beside one that says the whole value
    ({"enum": []}, "no value is allowed"), ({"anyOf": []}, "empty anyOf"), ({"type": []}, "empty list of types"),
    ({"const": 3, "type": "string"}, "no value is allowed"),
    ({"type": "string", "maxLength": 2, "anyOf": [{"type": "string"}]}, "maxLength beside anyOf"),
    ({"$ref": "#/$defs/a", "maxLength": 2, "$defs": {"a": {"type": "string"}}}, "maxLength beside $ref"),
    ({"type": "string", "format": "date", "maxLength": 4}, "maxLength beside format"),
])
def test_schemas_a_pattern_cannot_follow_are_refused(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        json_schema_pattern(schema)


def test_a_type_beside_an_enum_leaves_out_its_values_of_other_types():
    """pydantic writes enums with their type: {"enum": [...], "type": "string", "title": ...}."""
    pattern = re.compile(json_schema_pattern({"type": "string", "enum": ["a", 1, None], "title": "T"}))
    assert pattern.fullmatch('"a"') and not pattern.fullmatch("1") and not pattern.fullmatch("null")


def _nested(depth: int, wrap) -> dict:
    schema = {"type": "string", "maxLength": 10}
    for _ in range(depth):
        schema = wrap(schema)
    return schema


@pytest.mark.parametrize("schema", [
    _nested(24, lambda s: {"type": "array", "items": s}),
    _nested(6, lambda s: {"type": "object", "properties": {k: s for k in "abcd"}}),
])
def test_a_schema_whose_pattern_grows_by_a_factor_a_level_is_refused_at_once(schema):
    """Each level copies what it holds (an array its item, an optional property the members after it):
    24 nested arrays (700 bytes of JSON) took 2 GB and 22 s, and failed in MemoryError."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match="pattern outgrows 1,000,000 characters"):
        json_schema_pattern(schema)
    assert time.perf_counter() - start < 5
