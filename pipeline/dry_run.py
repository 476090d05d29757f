"""A run's rehearsal on the driver, before any cluster or GPU: every check a run makes, then the CPU
stage on the input's first rows (their images read, decoded and tiled, their prompts tokenized), and
what that says of the whole job: rows that would fail and why, prompt tokens, tiles, questions
asked twice (answered once: pipeline.dedup). Nothing is
written and no model weights are loaded: a dataset of millions of rows with a broken image column,
an image root that points elsewhere or prompts that outgrow the context shows it in seconds."""
from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from .config import SETTABLE, TOKEN_SETTINGS, PipelineConfig
from .dedup import answer_key
from .groups import IMAGE_FIELDS, ungroup
from .io import head_rows, input_dataset, read_output
from .job import check_job, check_run_arguments
from .manifest import check_run_settings
from .requests import RowRequests
from .resume import missing_ids
from .rows import ROW_HASH, error_kind, rename_columns
from .storage import redact_url

EXAMPLES_SHOWN = 5


def first_rows(input_uri: str, columns: list[str], schema: pa.Schema, n: int, options: dict | None,
               skipped: pc.Expression | None = None) -> pa.Table:
    """The input's first n rows (but those `skipped` selects), the run's columns in the types it reads
    them as; a row hash stands in for missing ids, as Ray Data's does in a run."""
    table = input_dataset(input_uri, options).head(n, columns=columns, filter=skipped, use_threads=False) \
        if skipped is not None else head_rows(input_dataset(input_uri, options), n, columns)
    types = [schema.field(name) if name in schema.names else table.schema.field(name) for name in table.column_names]
    table = table.cast(pa.schema(types))
    return table.append_column(ROW_HASH, pa.array([f"row {i}" for i in range(table.num_rows)], pa.string()))


def quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"mean": round(sum(values) / len(values), 1), "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def tiles_of_images(input_ids: list[int], image_id: int, global_id: int) -> list[int]:
    """Each image's tile count in a prompt: a tile is a run of image tokens, and an image's last is
    its global image, the run right after <global-img> (a row of several images has its frames joined)."""
    counts, tiles = [], 0
    for previous, token in zip([None, *input_ids], input_ids):
        if token == image_id and previous != image_id:
            tiles += 1
            if previous == global_id:
                counts.append(tiles)
                tiles = 0
    return counts


class Rehearsed(RowRequests):
    """Requests made to see which rows fail and which ask again, not to be run: without pixel values."""

    def pixel_values(self, row: dict):
        return None


def written_ids(output_uri: str, options: dict | None, retry_errors: str | None) -> pa.Array:
    """The ids a resume skips, as text: the output's rows but the error rows it answers again."""
    from .retry import retried

    table = read_output(output_uri, options, columns=["id", "finish_reason", "error"])
    if table is None:
        return pa.array([], pa.string())
    if retry_errors is not None:
        table = table.filter(pc.invert(retried(table, retry_errors)))
    return pc.cast(table.column("id"), pa.string()).combine_chunks()


def dry_run(input_uri: str, output_uri: str, config: PipelineConfig, *, rows: int = 64, resume: bool = False,
            overwrite: bool = False, renames: dict[str, str] | None = None, limit: int | None = None,
            retry_errors: str | None = None) -> dict:
    """The run's checks (prepare_job's, writing nothing), then its CPU stage on the first `rows` rows;
    returns what they showed. renames: input columns the run knows by other names (as prepare_job's)."""
    from .checks import processor_folder
    from .preprocess import Preprocess

    if rows < 1:
        raise ValueError(f"--dry-run needs at least 1 row to try, got {rows}")
    check_run_arguments(output_uri, config, resume, limit, retry_errors)
    checked = check_job(input_uri, output_uri, config, resume=resume, renames=renames, overwrite=overwrite)
    options = checked.config.storage_options
    if resume:
        check_run_settings(output_uri, checked.config, resume, options)
    input_rows = checked.input_rows if limit is None else min(checked.input_rows, limit)
    written = written_ids(output_uri, options, retry_errors) if resume and checked.ids is not None else None
    to_answer = input_rows if written is None else missing_ids(checked.ids, written)
    skipped = None if written is None else pc.invert(pc.field(config.id_column).cast(pa.string()).isin(written))
    sample = first_rows(input_uri, checked.columns, checked.schema, rows if limit is None else min(rows, limit),
                        options, skipped)     # only rows the run would answer
    sample = rename_columns(sample, checked.renames) if checked.renames else sample
    with processor_folder(config.model, options) as folder:        # a URL's files but its weights
        preprocess = Preprocess(checked.config, folder)
        groups = preprocess(sample)
    encoded, group_of = ungroup(groups)
    # the model stage's requests too (no pixels): rows whose own settings no request takes fail there
    _, outputs, requests = Rehearsed(checked.config, preprocess.encoder, "cpu").prepare(
        encoded, groups.select(list(IMAGE_FIELDS)).to_pylist(), group_of)
    errors = [(str(i), o["error"]) for i, o in zip(encoded.column("id").to_pylist(), outputs) if o and o["error"]]
    asked = [answer_key(request) for request in requests.values()]      # a question asked again: answered once
    asked = [key for key in asked if key is not None]
    prompts = [len(ids) for ids in encoded.column("input_ids").to_pylist() if ids is not None]
    processor = preprocess.encoder.processor
    firsts = [ids[0] for ids in groups.column("input_ids").to_pylist() if ids[0] is not None]
    image_id, global_id = processor.image_token_id, processor.global_image_token_id
    tiles = [n for ids in firsts for n in tiles_of_images(ids, image_id, global_id)]
    mean_prompt = sum(prompts) / len(prompts) if prompts else 0.0
    return {"input": redact_url(input_uri), "output": redact_url(output_uri), "input_rows": input_rows,
            "rows_tried": encoded.num_rows, "error_rows": len(errors),
            "errors_by_kind": dict(Counter(error_kind(e) for _, e in errors).most_common()),
            "error_examples": [{"id": i, "error": e} for i, e in errors[:EXAMPLES_SHOWN]],
            "prompt_tokens": quantiles(prompts), "images_tried": len(tiles), "tiles_per_image": quantiles(tiles),
            "repeated_questions": len(asked) - len(set(asked)), "rows_to_answer": to_answer,
            "estimated_prompt_tokens": round(mean_prompt * to_answer),
            "estimated_error_rows": round(len(errors) / max(encoded.num_rows, 1) * to_answer),
            "max_new_tokens": checked.config.max_new_tokens,
            "decoding": {name: getattr(checked.config, name) for name in (*SETTABLE, *TOKEN_SETTINGS)},
            "settings_from_generation_config": checked.generation_defaults}
