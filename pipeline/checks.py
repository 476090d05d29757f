"""The driver's checks of a run's input, before a cluster is started or joined: each names the
cause in one line, where Ray Data would fail the job when it reached it."""
from __future__ import annotations

import contextlib
import glob as globlib
import io
import logging
import posixpath
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from processing.errors import PromptError
from processing.fast_path import check_question

from .checkpoint import remote_files
from .config import SETTABLE, PipelineConfig
from .io import read_column, read_footers
from .preprocess import row_encoder
from .storage import fsspec_fs, is_local, lists_folders, protocol_of, reader_fs, redact_url, redact_urls

log = logging.getLogger(__name__)
LARGE_ROW_GROUP_BYTES = 10 ** 9


def check_image_root(root: str | None, storage_options: dict | None) -> None:
    """A given `image_root` (local, or an object store's prefix) must exist: else every row naming
    its image by a relative path would become an error row, after the whole run. Other stores
    (HTTP) cannot say whether a folder exists, so they are not asked, nor is a store that refuses
    the listing."""
    if root is None or not lists_folders(root):
        return
    try:
        fs, path = reader_fs(root, storage_options)
        missing = not fs.isdir(path)
    except OSError:         # credentials that may read objects but not list them: not known, not refused
        return
    except Exception as e:  # a malformed URL (botocore's ValueError quotes it): a one-line error, redacted
        raise ValueError(f"image root {redact_url(root)!r} cannot be read: {type(e).__name__}: "
                         f"{redact_urls(str(e))}") from None
    if missing:
        raise FileNotFoundError(f"image root {redact_url(root)!r}: no such folder (relative image paths of the "
                                "rows are read from it)")


def check_row_encoding(config: PipelineConfig) -> None:
    """The CPU stage's encoder, built from the checkpoint's processor files as its actors build it,
    must make a row's prompt and ids: a chat template that does not render (or that refuses
    --system-prompt's system turn), a tokenizer.json cut short, image settings it cannot apply would
    otherwise fail every CPU-stage actor, and the job, once a cluster is up. A hub id is left to them."""
    if is_local(config.model) and not Path(config.model).expanduser().is_dir():
        return
    if config.system_prompt is not None:     # its error would otherwise read as the model's
        try:
            check_question(config.system_prompt, "the system prompt")
        except PromptError as e:
            raise ValueError(f"system_prompt {config.system_prompt!r} cannot make a row's prompt (PromptError: {e})") \
                from None
    with processor_folder(config.model, config.storage_options) as folder:
        try:
            encoder = row_encoder(replace(config, max_image_pixels=None), folder, image_backend="pil")
            encoder.encode(sample_png(), "What is in the image?")
        except Exception as e:      # whatever it is, every row would meet it
            raise ValueError(f"model {config.model!r}: its processor files cannot make a row's prompt "
                             f"({type(e).__name__}: {e})") from None
        texts = [("prompt_suffix", config.prompt_suffix, "What is it?" + config.prompt_suffix),
                 ("prompt", config.prompt, config.prompt + config.prompt_suffix)]
        if config.prompt_template is not None:
            texts.append(("prompt_template", config.prompt_template, config.prompt_template + config.prompt_suffix))
        if config.open_question_suffix is not None:
            texts.append(("open_question_suffix", config.open_question_suffix,
                          "What is it?" + config.open_question_suffix))
        for name, text, asked in texts:
            try:            # every row without a question (or every row) would meet it
                encoder.encode(sample_png(), asked)
            except Exception as e:
                raise ValueError(f"{name} {text!r} cannot make a row's prompt ({type(e).__name__}: {e})") from None


def effective_image_settings(config: PipelineConfig) -> dict:
    """The image settings a run's None stands for (the checkpoint's longest edge and splitting, the
    processing defaults' limits), as the CPU stage's encoder applies them."""
    with processor_folder(config.model, config.storage_options) as folder:
        encoder = row_encoder(config, folder, image_backend="pil")
    processor = encoder.image_processor
    return {"image_longest_edge": processor.size["longest_edge"], "image_splitting": processor.do_image_splitting,
            "max_image_pixels": encoder.max_image_pixels, "max_image_bytes": encoder.max_image_bytes}


@contextlib.contextmanager
def processor_folder(model: str, storage_options: dict | None) -> Iterator[str]:
    """A local checkpoint folder as it is; a URL's files but its weights, copied to a temporary folder."""
    if is_local(model):
        yield model
        return
    fs, root = reader_fs(model, storage_options)
    with tempfile.TemporaryDirectory() as folder:
        for relative in remote_files(model, storage_options):
            if not relative.endswith(".safetensors"):
                (Path(folder) / relative).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(posixpath.join(root.rstrip("/"), relative), str(Path(folder) / relative))
        yield folder


def sample_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def check_output_outside_input(input_uri: str, output_uri: str, storage_options: dict | None) -> None:
    """A folder input is every Parquet file below it: an output inside it (with its checkpoint beside
    it) would be read back as input rows by the next run or resume."""
    fs, folder = fsspec_fs(input_uri, storage_options)
    if globlib.has_magic(folder) or protocol_of(input_uri) != protocol_of(output_uri) or not is_folder(fs, folder):
        return
    _, output = fsspec_fs(output_uri, storage_options)
    folder, output = posixpath.normpath(folder), posixpath.normpath(output)
    if output == folder or output.startswith(folder.rstrip("/") + "/"):
        raise ValueError(f"output {output_uri!r} lies inside the input folder {input_uri!r}, whose Parquet files are "
                         "all read: a resume would read the answers and checkpoint as input rows. Choose an output "
                         "outside it")


def check_input_excludes_output(files: list[str], output_uri: str, storage_options: dict | None) -> None:
    """No input file may be one of the output's or its checkpoint's (a glob input such as
    `data/*/*.parquet` with the output `data/answers` matches them once they exist)."""
    _, output = fsspec_fs(output_uri, storage_options)
    output = posixpath.normpath(output)
    ours = [f for f in files if f.startswith((output + "/", output + ".checkpoint/"))]
    if ours:
        raise ValueError(f"the input matches {len(ours)} files of the output {output_uri!r} or its checkpoint (e.g. "
                         f"{ours[0]}): they would be read as input rows. Choose an output the input does not match")


def is_folder(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except OSError:         # a store that cannot say (HTTP) or will not (no list permission): not known
        return False


def check_input_files(source: str, storage_options: dict | None) -> dict[str, pq.FileMetaData]:
    """The input files' footers; refuses, before any work, an input with a file that cannot be read
    (Ray Data would fail the job when it reached it, hours in), naming every such file."""
    footers = read_footers(source, storage_options)
    if not footers:
        raise FileNotFoundError(f"input {source!r} holds no .parquet file")
    bad = {path: why for path, why in footers.items() if isinstance(why, str)}
    if bad:
        named = "; ".join(f"{path} ({why})" for path, why in list(bad.items())[:5])
        raise ValueError(f"input {source!r}: {len(bad)} Parquet file(s) cannot be read, so nothing was started; "
                         f"repair or remove them: {named}")
    if protocol_of(source) in ("http", "https"):
        check_ranged_reads(next(iter(footers)), source, storage_options)
    return footers


def warn_of_large_row_groups(footers: dict[str, pq.FileMetaData], columns: list[str], source: str) -> None:
    """Arrow reads a Parquet row group's columns whole, whatever the batch: a file of inline images
    written as one row group of 1.8 GB took 10 GB in the one process reading it (and in the driver,
    for a dry run's first rows). Groups whose `columns` (those the run reads) are large are said
    before the run, with the way out."""
    wanted = set(columns)

    def read_bytes(group: pq.RowGroupMetaData) -> int:
        return sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                   if group.column(j).path_in_schema.split(".")[0] in wanted)

    sizes = {path: max((read_bytes(meta.row_group(k)) for k in range(meta.num_row_groups)), default=0)
             for path, meta in footers.items()}
    large = {path: size for path, size in sizes.items() if size > LARGE_ROW_GROUP_BYTES}
    if not large:
        return
    path, size = max(large.items(), key=lambda item: item[1])
    log.warning("input %r: %d file(s) hold row groups over %.0f GB in the columns the run reads (%s: %.1f GB); "
                "each is read whole, at several times its size in memory in one process: write the input with "
                "smaller row groups (pyarrow: pq.write_table(table, path, row_group_size=100) for rows of ~1 MB "
                "images)", redact_url(source), len(large), LARGE_ROW_GROUP_BYTES / 1e9, redact_url(path), size / 1e9)


def check_ranged_reads(path: str, source: str, storage_options: dict | None) -> None:
    """Parquet is read by byte ranges, its footer first (at the end). An HTTP server that answers a
    ranged GET with the whole file (Python's http.server) passed the footer checks (a small file fits
    fsspec's first read-ahead block, from byte 0) and failed the job at Ray Data's first read."""
    fs, stripped = fsspec_fs(path, storage_options)
    try:
        with fs.open(stripped, "rb", block_size=8) as f:
            if (f.size or 0) > 8:
                f.seek(f.size - 8)
                f.read(8)
    except ValueError as e:
        if "range" not in str(e).lower():
            raise
        raise ValueError(f"input {source!r}: the server of {path} answers a ranged read (HTTP Range) with the whole "
                         "file, and Parquet is read by ranges; serve the files from one that honours them (S3, the "
                         "Hugging Face Hub, nginx; not Python's http.server), or copy them to local disk") from None


def read_schema(footers: dict[str, pq.FileMetaData], columns: list[str], source: str) -> pa.Schema:
    """The schema every file is read as: `columns` (those the run uses) in the type of each that all
    files convert to (int32 and int64: int64; string and large_string: large_string; a dictionary,
    pandas' categorical, as its values: Arrow counts and unifies no dictionary). Ray Data would
    take the first 16 files' whole schemas: a conflict in a column the run does not use failed the
    read, and a later file whose column cannot be cast (text ids after integer ones) failed the job
    when it was reached, and every resume after; such a column of the run's is refused here."""
    schemas = {path: meta.schema.to_arrow_schema() for path, meta in footers.items()}
    fields = []
    for column in columns:
        first_of = {}
        for path, schema in schemas.items():
            if column in schema.names:
                first_of.setdefault(without_views(values_of(schema.field(column).type)), path)
        if not first_of:            # a hive partition key: in the paths, not the files
            continue
        try:
            if len({is_text(t) for t in first_of if is_text(t) is not None}) > 1:
                raise pa.ArrowTypeError("text and bytes")     # image paths in one file, image bytes in another
            unified = pa.unify_schemas([pa.schema([(column, t)]) for t in first_of], promote_options="permissive")
            if pa.uint64() in first_of and unified.field(column).type != pa.uint64():
                raise pa.ArrowTypeError("uint64 and signed")  # int64 would not hold uint64's upper half
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            named = "; ".join(f"{t} in {path}" for t, path in list(first_of.items())[:3])
            raise ValueError(f"input {source!r}: column {column!r} has types that do not convert to one another "
                             f"across files ({named}), so nothing was started: write it with one type") from None
        fields.append(unified.field(column))
    return pa.schema(fields)


def without_views(type_: pa.DataType) -> pa.DataType:
    """`type_` with Arrow's view layouts of text and bytes (string_view, binary_view: pyarrow keeps them
    through Parquet, as polars writes text) as their plain ones, inside lists and structs too: the run
    reads the files so, since the CPU stage's Arrow kernels (take) have none for views. (pyarrow 26
    reads a Parquet list_view column as an invalid array: not one to convert.)"""
    if pa.types.is_string_view(type_):
        return pa.string()
    if pa.types.is_binary_view(type_):
        return pa.binary()
    if pa.types.is_list(type_):
        return pa.list_(type_.value_field.with_type(without_views(type_.value_type)))
    if pa.types.is_large_list(type_):
        return pa.large_list(type_.value_field.with_type(without_views(type_.value_type)))
    if pa.types.is_struct(type_):
        return pa.struct([f.with_type(without_views(f.type)) for f in type_])
    return type_


def check_column_types(schema: pa.Schema, config: PipelineConfig, source: str, renames: dict[str, str]) -> None:
    """Ids must be text or integers (the output's key, sorted by Ray's checkpoint), questions text (a
    number or a list would fail every block of the CPU stage, and the job with it), images bytes,
    paths or HF datasets' {bytes, path} structs, or lists of those (anything else would make every
    row an error row): refused before any work."""
    for field in schema:
        name, type_ = renames.get(field.name, field.name), values_of(field.type)
        if name == config.question_column and not (is_text(type_) or pa.types.is_null(type_)):
            raise ValueError(f"input {source!r}: the question column {field.name!r} holds {field.type}, not text")
        if name == config.id_column and not (is_text(type_) or pa.types.is_integer(type_)):
            raise ValueError(f"input {source!r}: the id column {field.name!r} holds {field.type}, not text or integers")
        if name == config.choices_column and not holds_texts(type_):
            raise ValueError(f"input {source!r}: the choices column {field.name!r} holds {field.type}, not lists "
                             "of text")
        if name == config.sampling_column:
            check_settings_type(field, type_, source)
        if name == config.score_column and not (is_text(type_) or pa.types.is_null(type_)):
            raise ValueError(f"input {source!r}: the column of texts to score {field.name!r} holds {field.type}, "
                             "not text")
        if name == config.messages_column and not holds_messages(type_):
            raise ValueError(f"input {source!r}: the messages column {field.name!r} holds {field.type}, not lists of "
                             "{role, content} messages or their JSON text")
        if name == config.option_list_column and not (holds_texts(type_) or is_text(type_) or holds_numbers(type_)):
            raise ValueError(f"input {source!r}: the options column {field.name!r} holds {field.type}, not lists of "
                             "text (or numbers) or their text")
        if name in config.image_sources() and not holds_images(type_):
            raise ValueError(f"input {source!r}: the image column {field.name!r} holds {field.type}, not image bytes, "
                             "paths or {bytes, path} structs")


def values_of(type_: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column's values (pandas' categoricals are written so)."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def holds_images(type_: pa.DataType) -> bool:
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):      # several images a row
        type_ = values_of(type_.value_type)
    return is_text(type_) is not None or pa.types.is_struct(type_) or pa.types.is_null(type_)


def check_settings_type(field: pa.Field, type_: pa.DataType, source: str) -> None:
    """A column of decoding settings is JSON text, or structs of SETTABLE names in their types:
    a misspelt or mistyped setting would otherwise be every row's error (or silently unused)."""
    if is_text(type_) or pa.types.is_null(type_):
        return
    if not pa.types.is_struct(type_):
        raise ValueError(f"input {source!r}: the settings column {field.name!r} holds {field.type}, not structs of "
                         f"settings ({', '.join(SETTABLE)}) or their JSON text")
    holds = {"integer": pa.types.is_integer, "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
             "texts": holds_texts, "text": lambda t: bool(is_text(t))}
    for setting in type_:
        kind = SETTABLE.get(setting.name)
        if kind is None:
            raise ValueError(f"input {source!r}: the settings column {field.name!r} has {setting.name!r}, which is "
                             f"not a setting a row may set ({', '.join(SETTABLE)})")
        if not (holds[kind](values_of(setting.type)) or pa.types.is_null(setting.type)):
            raise ValueError(f"input {source!r}: the settings column {field.name!r} holds {setting.type} for "
                             f"{setting.name!r}, not {kind}")


def holds_messages(type_: pa.DataType) -> bool:
    """Lists of structs with a role and a content (the HF chat format), JSON text, or nulls only."""
    if is_text(type_) or pa.types.is_null(type_):
        return True
    listed = pa.types.is_list(type_) or pa.types.is_large_list(type_)
    return listed and pa.types.is_struct(type_.value_type) and {"role", "content"} <= {f.name for f in type_.value_type}


def holds_texts(type_: pa.DataType) -> bool:
    """Lists of strings (or nulls only)."""
    if pa.types.is_null(type_):
        return True
    listed = pa.types.is_list(type_) or pa.types.is_large_list(type_)
    return listed and (is_text(values_of(type_.value_type)) or pa.types.is_null(type_.value_type))


def holds_numbers(type_: pa.DataType) -> bool:
    listed = pa.types.is_list(type_) or pa.types.is_large_list(type_)
    return listed and (pa.types.is_integer(type_.value_type) or pa.types.is_floating(type_.value_type))


def is_text(type_: pa.DataType) -> bool | None:
    """True for strings, False for bytes, None for other types (Arrow would cast bytes to text)."""
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return True
    return False if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) else None


def input_ids(rows: pads.Dataset, footers: dict[str, pq.FileMetaData], schema: pa.Schema, column: str,
              source: str, storage_options: dict | None) -> pa.ChunkedArray | None:
    """The id column of every input row; None when the rows have none (Ray Data's row hash serves)."""
    if column in schema.names and lists_folders(source):
        return read_column(footers, schema.field(column), source, storage_options)
    if column in rows.schema.names:     # a hive partition key, or HTTP (whose server may not honour ranges)
        return rows.to_table(columns=[column]).column(column)
    return None


def check_ids(ids: pa.ChunkedArray | None, source: str, column: str = "id") -> None:
    """Resume skips every input row whose id is already written, so two rows sharing an id (an image id
    given to several questions) would lose one of them on resume, and a null id fails every resume
    (Ray's checkpoint sorts the ids written): both refused before any work."""
    if ids is None:
        return
    if ids.null_count:
        raise ValueError(f"input {source!r}: {ids.null_count} rows have a null `{column}`; ids are what --resume "
                         f"skips written rows by. Give every row an id, or rename the column (rows without "
                         "`id` get ids from their file and row)")
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    examples = ", ".join(f"{v['values']!r} x{v['counts']}" for v in repeated.slice(0, 3).to_pylist())
    raise ValueError(f"input {source!r}: {len(repeated)} ids occur more than once (e.g. {examples}); "
                     f"a resumed run would skip every row of an id already written. Make the `{column}` column "
                     "unique, or rename it (rows without `id` get ids from their file and row)")


def check_columns(names: list[str], config: PipelineConfig, source: str) -> None:
    """The rows (`names`: their columns, as the model stage gets them) must have the image column
    and every column `keep_columns` names."""
    names = set(names)
    flag = "--image-columns name others" if config.image_columns else "--image-column names another"
    for column in config.image_sources():
        if column not in names:
            raise ValueError(f"input {source!r} has no `{column}` column of images (columns: "
                             f"{sorted(names)}; {flag})")
    if config.id_column != "id" and config.id_column not in names:
        raise ValueError(f"input {source!r} has no `{config.id_column}` column of ids (columns: {sorted(names)})")
    if config.question_column != "question" and config.question_column not in names:
        raise ValueError(f"input {source!r} has no `{config.question_column}` column of questions (columns: "
                         f"{sorted(names)})")
    for column, holding in ((config.choices_column, "choices"), (config.score_column, "texts to score"),
                            (config.option_list_column, "options"),
                            (config.sampling_column, "decoding settings"), (config.messages_column, "conversations")):
        if column is not None and column not in names:
            raise ValueError(f"input {source!r} has no `{column}` column of {holding} (columns: {sorted(names)})")
    missing = [c for c in config.keep_columns if c not in names]
    if missing:
        raise ValueError(f"--keep-columns {missing} are not columns of {source!r} (columns: {sorted(names)})")
    asked = config.option_columns + ([config.hint_column] if config.hint_column else [])
    missing = [c for c in asked if c not in names]
    if missing:
        raise ValueError(f"option_columns / hint_column {missing} are not columns of {source!r} "
                         f"(columns: {sorted(names)})")
    missing = [c for c in config.template_columns() if c not in names]
    if missing:
        raise ValueError(f"--prompt-template names {missing}, which are not columns of {source!r} (columns: "
                         f"{sorted(names)})")
