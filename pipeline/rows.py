"""Row-level helpers shared by the stages: ids, error rows, per-row seeds, output schema."""
from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")
RECENT_IMAGES = 4            # per actor: images whose frames / pixel values are kept for the next rows about them
ROW_HASH = "row_hash"        # Ray Data's deterministic (file path, row index) hash, our id when `id` is absent
ROW_CHOICES = "_choices"     # a row's own choices (--choices-column), on their way to the model stage
ROW_SCORED = "_scored"       # the text a row's answer is scored as (--score-column), on its way to the model stage
ROW_SETTINGS = "_settings"   # a row's own decoding settings (--sampling-column), on their way to the model stage
KEPT = "_kept."              # prefix of a kept input column on its way to the output: apart from the stages' own
                             # columns (input_ids, image_key, frames, ...), whatever the input names its columns
OUTPUT_SCHEMA = pa.schema([
    ("question", pa.string()), ("answer", pa.string()), ("finish_reason", pa.string()),
    ("error", pa.string()), ("num_prompt_tokens", pa.int32()), ("num_generated_tokens", pa.int32()),
])                            # plus `id` first (its input type) and the kept input columns


class RowError(ValueError):
    """A row-level failure found by the pipeline itself (null image, unreadable image path, ...)."""


def row_ids(batch: pa.Table, column: str = "id") -> pa.ChunkedArray:
    """The id column, else the row hash Ray Data adds at read time (uint64 of file path + row index)."""
    if column in batch.column_names:
        return batch.column(column)
    if ROW_HASH in batch.column_names:
        return batch.column(ROW_HASH)
    raise ValueError("rows have neither an `id` column nor Ray Data's `row_hash`: read them with pipeline.read_rows")


def keep_ids(batch: pa.Table, ids: tuple[str, ...] | list[str], column: str = "id") -> pa.Table:
    """The rows of `batch` whose id (in `column`), as a string, is one of `ids`."""
    return batch.filter(pc.is_in(pc.cast(row_ids(batch, column), pa.string()), pa.array(list(ids), pa.string())))


def rename_columns(batch: pa.Table, renames: dict[str, str]) -> pa.Table:
    """`batch` with the columns `renames` names renamed (old -> new)."""
    return batch.rename_columns([renames.get(name, name) for name in batch.column_names])


def error_message(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"


_ERROR_TYPE = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Broken)\b")
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)")    # a row's own value in its error ('bogus'), not "row's"
_CLAUSE_END = re.compile(r" \(|; ")                # the cause's first clause: what follows explains it


def error_kind(message: str) -> str:
    """"stage: cause" of an error row's message, for counting: the exception type that ended the row
    ("preprocess: ImageDecodeError"); for the pipeline's own RowError, the failure it wraps
    ("read image: FileNotFoundError") or its own words ("read image: image is null")."""
    if not message:
        return "(no message)"
    stage, _, rest = message.partition(": ")
    types = _ERROR_TYPE.findall(rest)
    if types[:1] != [RowError.__name__]:
        return f"{stage}: {types[0] if types else rest}"[:100]
    own_words = _CLAUSE_END.split(_QUOTED.sub("'…'", rest.removeprefix(f"{RowError.__name__}: ")))[0]
    return f"{stage}: {types[1] if len(types) > 1 else own_words}"[:100]


def row_seed(seed: int | None, row_id) -> int | None:
    """A per-row seed that depends on the job seed and the row id only, never on batching."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(str(row_id).encode())) % (1 << 62)


LOGPROB = pa.field("answer_logprob", pa.float64())   # with --logprobs: the answer's log p under the model
CHOICE_LOGPROBS = pa.field("choice_logprobs", pa.map_(pa.string(), pa.float64()))  # --choice-logprobs: each one's
# --samples N: every sample's answer, finish reason, token count (and log p with --logprobs); the first is the row's own
SAMPLES = [pa.field("samples", pa.list_(pa.string())), pa.field("samples_finish_reason", pa.list_(pa.string())),
           pa.field("samples_num_generated_tokens", pa.list_(pa.int32()))]
SAMPLES_LOGPROB = pa.field("samples_logprob", pa.list_(pa.float64()))
# --top-logprobs K: each answer token's id and log p, and the step's K likeliest tokens' (distillation)
TOKEN_LOGPROBS = pa.field("token_logprobs", pa.list_(pa.struct([
    ("id", pa.int32()), ("logprob", pa.float64()), ("top_ids", pa.list_(pa.int32())),
    ("top_logprobs", pa.list_(pa.float64()))])))


def output_schema(id_type: pa.DataType, kept: list[pa.Field], extra: list[pa.Field] = ()) -> pa.Schema:
    """`extra`: the optional columns a run adds (LOGPROB, CHOICE_LOGPROBS, SAMPLES, --json-schema's answer_json)."""
    return pa.schema([pa.field("id", id_type), *OUTPUT_SCHEMA, *extra, *kept])


def reuse_recent(recent: OrderedDict, key: Hashable | None, make: Callable[[], T], keep: int = RECENT_IMAGES) -> T:
    """`make()`, or what it gave for `key` among the `keep` last keys (by default RECENT_IMAGES: rows
    about one image come together in datasets of several questions an image). Key None: made, not kept."""
    if key is not None and key in recent:
        recent.move_to_end(key)
        return recent[key]
    value = make()
    if key is not None:
        recent[key] = value
        if len(recent) > keep:
            recent.popitem(last=False)
    return value
