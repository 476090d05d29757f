"""--json-schema's answers as a typed Parquet column (`answer_json`): the schema's Arrow type, and
each whole answer parsed into it, so that a run's labels, counts and captions are columns to query
(`answer_json.label`), not text to parse again.

Objects are structs of their properties in the schema's order (an optional property the answer
left out is null), arrays lists, strings strings, integers int64, numbers float64, booleans bool.
Where a value may be of several types (`anyOf`, a list of types, an `enum` of mixed values) that
are not one Arrow type, it is kept as its JSON text (a string); null alongside one type is that
type (a value that can only be null, and an object without properties, are JSON text: Parquet
has no column of those). An answer cut short (finish_reason "length") or an error row has a null `answer_json`.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

COLUMN = "answer_json"
JSON_TEXT = pa.string()
SIMPLE = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(),
          "null": pa.null()}


def answer_field(schema_text: str) -> pa.Field:
    """The `answer_json` column of a run with this schema (its JSON text)."""
    schema = json.loads(schema_text)
    return pa.field(COLUMN, _storable(_Types(schema).of(schema)))


def parsed_answers(answers: list[str | None], finish_reasons: list[str], field: pa.Field) -> pa.Array:
    """Each whole answer parsed into `field`'s type; null where the answer is not whole (cut short,
    or ended by a stop string) or is not of the type (a row's own regex or choices answer another
    way) or its values do not fit (an integer beyond int64)."""
    values = []
    for answer, finish in zip(answers, finish_reasons):
        try:        # a stop string (--stop) may end an answer before its document does
            value = _fitted(json.loads(answer), field.type) if finish == "stop" and answer else None
            pa.array([value], field.type)
        except (ValueError, TypeError, OverflowError):  # json's and Arrow's (ArrowInvalid is a ValueError)
            value = None
        values.append(value)
    return pa.array(values, field.type)


def parsed_lists(answers: list[list | None], finish_reasons: list[list | None], field: pa.Field,
                 list_field: pa.Field) -> pa.Array:
    """parsed_answers of each row's list of answers (--samples' `samples_json`); null for a null list."""
    flat = parsed_answers([a for row in answers if row is not None for a in row],
                          [f for row in finish_reasons if row is not None for f in row], field).to_pylist()
    rows, start = [], 0
    for row in answers:
        rows.append(None if row is None else flat[start:start + len(row)])
        start += 0 if row is None else len(row)
    return pa.array(rows, list_field.type)


def _fitted(value: Any, type_: pa.DataType) -> Any:
    """`value` shaped for `type_`: structs as dicts of every field, text where JSON text is kept,
    integers written 3.0 as 3; ValueError where it is of another type (Arrow would convert some:
    2.5 to an integer 2, true to a number 1.0)."""
    if value is None or pa.types.is_null(type_):
        if value is not None:
            raise ValueError(f"{value!r} is not null")
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_struct(type_) and isinstance(value, dict):
        return {f.name: _fitted(value.get(f.name), f.type) for f in type_}
    if pa.types.is_list(type_) and isinstance(value, list):
        return [_fitted(v, type_.value_type) for v in value]
    if isinstance(value, bool):
        if pa.types.is_boolean(type_):
            return value
    elif pa.types.is_integer(type_) and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    elif pa.types.is_floating(type_) and isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"{value!r} is not of the type {type_}")


class _Types:
    """Arrow types of a schema's parts, `$ref`s resolved against its root."""

    def __init__(self, root: dict) -> None:
        self.root = root

    def of(self, schema: Any) -> pa.DataType:
        if not isinstance(schema, dict):
            return JSON_TEXT
        if "$ref" in schema:
            return self.of(self.resolve(schema["$ref"]))
        if "const" in schema:
            return _value_type([schema["const"]])
        if "enum" in schema:
            return _value_type(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return _one_type([self.of(s) for s in schema[key]])
        if "allOf" in schema:
            return self.of(schema["allOf"][0])
        kinds = schema.get("type")
        if isinstance(kinds, list):
            return _one_type([self.of({**schema, "type": k}) for k in kinds])
        if kinds == "array":
            return pa.list_(_storable(self.of(schema.get("items"))))
        if kinds == "object" and schema.get("properties"):
            return pa.struct([pa.field(name, _storable(self.of(sub))) for name, sub in schema["properties"].items()])
        return SIMPLE.get(kinds, JSON_TEXT)

    def resolve(self, ref: str) -> Any:
        target: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return target


def _value_type(values: list) -> pa.DataType:
    """The type of an enum's values (null among them aside)."""
    kinds = {bool if isinstance(v, bool) else type(v) for v in values if v is not None}
    if not kinds:
        return pa.null()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.bool_() if kinds == {bool} else JSON_TEXT      # text as itself, other values as JSON text


def _storable(type_: pa.DataType) -> pa.DataType:
    return JSON_TEXT if pa.types.is_null(type_) else type_


def _one_type(types: list[pa.DataType]) -> pa.DataType:
    """The one type of several alternatives (null aside), else JSON text."""
    distinct = set(t for t in types if not pa.types.is_null(t))
    return distinct.pop() if len(distinct) == 1 else pa.null() if not distinct else JSON_TEXT
