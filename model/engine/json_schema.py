"""A JSON schema as the regular expression of documents that satisfy it (SamplingParams.json_schema).

The documents are written as `json.dumps` writes them with one optional space after each ":" and
",": objects hold their properties in the schema's order (required ones always, the others where
the model writes them) and no others; strings are JSON strings (escapes included) of any
characters. What a regular expression cannot say, or what would need one too large to build, is
refused with the keyword that asks for it: free-form objects and arrays (no `properties` /
`items`), number bounds, `uniqueItems`, recursive `$ref`s, string `pattern`s, most `format`s.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

SPACE = "[ ]?"
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
FORMATS = {
    "date": r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
FORMATS["date-time"] = FORMATS["date"] + "T" + FORMATS["time"]
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "additionalProperties"}
MAX_PATTERN_CHARS = 1_000_000      # past the automaton's MAX_NFA_STATES anyway: refused before it is built
KEYWORDS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required", "items",
            "minItems", "maxItems", "minLength", "maxLength", "format"}


def json_schema_pattern(schema: str | dict) -> str:
    """The expression of the documents that satisfy `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema is an object, not {type(schema).__name__}")
    try:
        return _Writer(schema).value(schema, "#")
    except (TypeError, AttributeError, KeyError) as e:     # a keyword of the wrong type ("properties": 5)
        raise ValueError(f"the JSON schema has a keyword of the wrong type ({type(e).__name__}: {e})") from None


COMPOSED = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")   # each says the whole value alone
JSON_TYPES = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}


def check_alone(schema: dict, where: str) -> None:
    """ValueError where a keyword that says the whole value ($ref, const, enum, anyOf, oneOf, allOf)
    stands beside another that would constrain it too: the pattern would follow the first alone.
    `type` beside const or enum is taken (their values of another type are left out)."""
    composed = [key for key in COMPOSED if key in schema]
    if not composed:
        return
    allowed_beside = {"type"} if composed[0] in ("const", "enum") else set()
    others = sorted((set(schema) & KEYWORDS) - {composed[0]} - allowed_beside)
    if others:
        raise ValueError(f"{where}: {others[0]} beside {composed[0]} is not supported (a pattern would follow "
                         f"{composed[0]} alone)")


def of_types(value: Any, types: Any) -> bool:
    """Whether a JSON value is of `types` (a type name, a list of them, or None: any)."""
    names = [types] if isinstance(types, str) else types or list(JSON_TYPES) + ["integer", "number"]
    for name in names:
        if name == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if name == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        kind = JSON_TYPES.get(name)
        if kind is not None and isinstance(value, kind) and (name == "boolean") == isinstance(value, bool):
            return True
    return False


def _bounds(schema: dict, low_key: str, high_key: str, where: str) -> tuple[int, int | None]:
    """A string's or array's length bounds: integers >= 0, the low one not above the high one."""
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    if high is not None and low > high:
        raise ValueError(f"{where}: {low_key} {low} is above {high_key} {high}")
    return low, high


@lru_cache(maxsize=256)
def schema_text_pattern(text: str) -> str:
    """json_schema_pattern of a schema's JSON text, remembered (every row of a job has the same)."""
    return json_schema_pattern(text)


def literal(value: Any) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _Writer:
    def __init__(self, root: dict) -> None:
        self.root, self.resolving = root, []

    def value(self, schema: Any, where: str) -> str:
        return _bounded(self._value(schema, where), where)

    def _value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            raise ValueError(f"{where}: a schema that allows any JSON value cannot be written as a pattern "
                             "(say its type)")
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema is an object, not {schema!r}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise ValueError(f"{where}: the keyword {unknown[0]!r} is not supported")
        check_alone(schema, where)
        if "$ref" in schema:
            return self.reference(schema["$ref"], where)
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else list(schema["enum"])
            values = [v for v in values if of_types(v, schema.get("type"))]
            if not values:
                raise ValueError(f"{where}: no value is allowed (an empty enum, or none of its values of the type)")
            return "(?:" + "|".join(map(literal, values)) + ")"
        for key in ("anyOf", "oneOf"):      # oneOf read as anyOf: a document two branches allow is allowed too
            if key in schema:
                if not schema[key]:
                    raise ValueError(f"{where}: an empty {key} allows no value")
                return "(?:" + "|".join(self.value(s, f"{where}/{key}/{i}") for i, s in enumerate(schema[key])) + ")"
        if "allOf" in schema:
            if len(schema["allOf"]) != 1:
                raise ValueError(f"{where}: allOf of more than one schema is not supported")
            return self.value(schema["allOf"][0], f"{where}/allOf/0")
        types = schema.get("type")
        if types is None:
            raise ValueError(f"{where}: the schema does not say its type")
        if isinstance(types, list):
            if not types:
                raise ValueError(f"{where}: an empty list of types allows no value")
            return "(?:" + "|".join(self.typed(t, schema, where) for t in types) + ")"
        return self.typed(types, schema, where)

    def reference(self, ref: str, where: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{where}: only references inside the schema (#/...) are supported, not {ref!r}")
        if ref in self.resolving:
            raise ValueError(f"{where}: the schema is recursive ({ref!r} inside itself), which a pattern "
                             "cannot say")
        target: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{where}: {ref!r} names nothing in the schema")
            target = target[part]
        self.resolving.append(ref)
        try:
            return self.value(target, ref)
        finally:
            self.resolving.pop()

    def typed(self, kind: str, schema: dict, where: str) -> str:
        write = {"string": self.string, "integer": lambda s, w: INTEGER, "number": lambda s, w: NUMBER,
                 "boolean": lambda s, w: "(?:true|false)", "null": lambda s, w: "null",
                 "array": self.array, "object": self.object}.get(kind)
        if write is None:
            raise ValueError(f"{where}: unknown type {kind!r}")
        return write(schema, where)

    def string(self, schema: dict, where: str) -> str:
        if "format" in schema:
            bounded = sorted({"minLength", "maxLength"} & set(schema))
            if bounded:
                raise ValueError(f"{where}: {bounded[0]} beside format is not supported (the format sets the length)")
            if schema["format"] not in FORMATS:
                raise ValueError(f"{where}: the string format {schema['format']!r} is not supported "
                                 f"(supported: {', '.join(sorted(FORMATS))})")
            return f'"{FORMATS[schema["format"]]}"'
        low, high = _bounds(schema, "minLength", "maxLength", where)
        return f'"{STRING_CHAR}{_count(low, high)}"'

    def array(self, schema: dict, where: str) -> str:
        if "items" not in schema or not isinstance(schema["items"], dict):
            raise ValueError(f"{where}: an array needs `items` (one schema for its items)")
        item = self.value(schema["items"], f"{where}/items")
        low, high = _bounds(schema, "minItems", "maxItems", where)
        if high == 0:
            return r"\[\]"
        rest = _count(max(low - 1, 0), None if high is None else high - 1)
        items = f"{item}(?:,{SPACE}{item}){rest}"
        return rf"\[{items}\]" if low else rf"\[(?:{items})?\]"

    def object(self, schema: dict, where: str) -> str:
        if "properties" not in schema:
            raise ValueError(f"{where}: an object needs `properties` (free-form objects are not supported)")
        properties, required = schema["properties"], set(schema.get("required", ()))
        missing = sorted(required - set(properties))
        if missing:
            raise ValueError(f"{where}: the required property {missing[0]!r} is not among `properties`")
        members = [(f'{literal(name)}:{SPACE}{self.value(sub, f"{where}/properties/{name}")}', name in required)
                   for name, sub in properties.items()]
        _bounded("".join(m for m, _ in members), where)
        return r"\{" + _members(members, where) + r"\}"


def _count(low: int, high: int | None) -> str:
    return "*" if (low, high) == (0, None) else f"{{{low},}}" if high is None else f"{{{low},{high}}}"


def _bounded(pattern: str, where: str) -> str:
    """A pattern of nested schemas grows by a factor at each level (an array writes its item twice, an
    optional property writes the members after it again): a schema of a few hundred bytes took
    gigabytes and minutes before the automaton refused it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{where}: the schema's pattern outgrows {MAX_PATTERN_CHARS:,} characters (each level of "
                         "nested arrays writes its items' pattern twice, each optional property the members after "
                         "it again): make it flatter, or its properties required")
    return pattern


def _members(members: list[tuple[str, bool]], where: str) -> str:
    """Members in order, comma-separated, the optional ones where the model writes them."""
    rest = ""               # the members from i on, while none is written yet
    for i in range(len(members) - 1, -1, -1):
        member, needed = members[i]
        with_it = member + "".join(f",{SPACE}{m}" if must else f"(?:,{SPACE}{m})?" for m, must in members[i + 1:])
        rest = _bounded(with_it if needed else f"(?:{with_it}|{rest})" if rest else f"(?:{with_it})?", where)
    return rest
