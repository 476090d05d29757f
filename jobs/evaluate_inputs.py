"""What jobs.evaluate reads: the benchmark's ground truth, predictions (a run's, or given), a baseline's,
the metric of an earlier evaluation and the gallery's images; local or any fsspec URL (s3://...)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa

from evaluation.benchmarks import OPTION_LIST_LAYOUT, SCORING_COLUMNS
from evaluation.metrics import METRICS
from evaluation.report import METRICS_FILE
from pipeline.rows import rename_columns
from pipeline.storage import redact_url

PREDICTIONS_FILE = "predictions.parquet"


def earlier_summary(predictions: str, options: dict) -> dict:
    """The metrics.json beside an evaluation's predictions.parquet (scored again: the README's
    second command), if there is one; else {}."""
    from pipeline.storage import fsspec_fs

    fs, path = fsspec_fs(predictions, options)
    try:
        summary = json.loads(fs.cat_file(f"{path.rsplit('/', 1)[0]}/{METRICS_FILE}"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def earlier_metric(predictions: str, options: dict) -> str | None:
    """The metric an evaluation's predictions were scored with."""
    metric = earlier_summary(predictions, options).get("metric")
    return metric if isinstance(metric, str) and metric in METRICS else None


def earlier_averaged_over(predictions: str, options: dict) -> str | None:
    """The column whose groups' means made an evaluation's score (MMStar's l2_category), if any."""
    averaged = earlier_summary(predictions, options).get("averaged_over")
    column = averaged.get("column") if isinstance(averaged, dict) else None
    return column if isinstance(column, str) else None


MADE_WITH = ("model", "checkpoint", "adapter", "prompt suffix", "open question suffix", "settings", "replicas")
CARRIED = "answers' "


def earlier_sources(predictions: str, options: dict) -> dict[str, str]:
    """How an evaluation's predictions were made (its metrics.json's `sources`: checkpoint, settings,
    replicas ...), as a rescoring of them names it ("answers' checkpoint"); carried on by a rescoring
    of a rescoring. A rescoring in place lost them with the report it replaced."""
    sources = earlier_summary(predictions, options).get("sources")
    if not isinstance(sources, dict):
        return {}
    return {key if key.startswith(CARRIED) else CARRIED + key: str(value) for key, value in sources.items()
            if key in MADE_WITH or key.startswith(CARRIED)}


def storage_options(args: argparse.Namespace) -> dict:
    from jobs.common import json_option

    return json_option(getattr(args, "storage_options", None), "--storage-options")


def parquet_dataset(uri: str, options: dict | None = None):
    """A Parquet file, folder or glob, local or any fsspec URL (as the pipeline reads it)."""
    from pipeline.io import parquet_dataset as dataset

    return dataset(uri, options)


def read_parquet(uri: str, columns: list[str] | None = None, options: dict | None = None) -> pa.Table:
    """The Parquet at `uri` as one table, its files' types unified (a shard whose category is all
    null beside one of text); requested columns it lacks are skipped."""
    import pyarrow.dataset as pads

    dataset = parquet_dataset(uri, options)
    try:
        schema = pa.unify_schemas([f.physical_schema for f in dataset.get_fragments()] or [dataset.schema],
                                  promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:      # answers as text in one file, lists in another
        raise ValueError(f"{uri}: its files' columns are of types that do not convert to one another ({e}): "
                         "write each column with one type") from None
    dataset = pads.dataset(dataset.files, schema=schema, filesystem=dataset.filesystem, format="parquet")
    present = dataset.schema.names
    return dataset.to_table(columns=None if columns is None else [c for c in columns if c in present])


def _column_mapping(args: argparse.Namespace) -> dict[str, str]:
    return {args.id_column: "id", args.question_column: "question", args.answers_column: "answers",
            args.image_column: "image", args.category_column: "category"}


def read_ground_truth(args: argparse.Namespace) -> pa.Table:
    """id, answers, and question/category when present, from --input (never the image bytes)."""
    wanted = list(dict.fromkeys([args.id_column, args.answers_column, args.question_column, args.category_column,
                                 *SCORING_COLUMNS]))
    table = rename_columns(read_parquet(args.input, wanted, storage_options(args)), _column_mapping(args))
    needed = {"id": ("--id-column", args.id_column), "answers": ("--answers-column", args.answers_column)}
    if args.category_column != "category":      # asked for by name: the per-category scores would be missing
        needed["category"] = ("--category-column", args.category_column)
    for name, (flag, column) in needed.items():
        if name not in table.column_names:
            columns = parquet_dataset(args.input, storage_options(args)).schema.names     # all, not those read
            raise ValueError(f"{args.input} has no {column!r} column ({flag}); columns: {columns}")
    return table


def check_column_flags(args: argparse.Namespace) -> None:
    """Each column flag names a column of its own: --category-column question renamed the questions away
    (a traceback: 'Field "category" exists 2 times')."""
    flags = {"--id-column": args.id_column, "--question-column": args.question_column,
             "--answers-column": args.answers_column, "--image-column": args.image_column,
             "--category-column": args.category_column}
    named = {}
    for flag, column in flags.items():
        if column in named:
            raise ValueError(f"{flag} {column!r} is the column of {named[column]} too: each names a column of its own")
        named[column] = flag


# Flags of how a model answers: with --predictions (answers given) they would change nothing
MODEL_RUN_ONLY = ("adapter", "system_prompt", "prompt_suffix", "max_new_tokens", "num_beams", "choices",
                  "choices_column", "resume", "retry_errors", "overwrite")
READING = ("storage_options", "image_root", "fetch_threads", "fetch_attempts", "fetch_timeout_s")   # rescoring reads


def check_job_flags(args: argparse.Namespace, given: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Flags that contradict one another are refused before any work, naming them. `given`: the
    command line's own (a job.yaml shared by a model run and its rescoring may hold run settings)."""
    from jobs.common import run_flag_names

    flags = {a.dest: a.option_strings[0] for a in ap._actions if a.option_strings}
    if args.gallery < 0:
        raise ValueError(f"--gallery must be >= 0 (rows shown), got {args.gallery}")
    if args.resume and args.overwrite:
        raise ValueError("--resume (or --retry-errors) continues the earlier run, --overwrite discards it: pass one")
    if args.predictions:
        run_only = [*MODEL_RUN_ONLY, *(k for k in run_flag_names() if k not in READING)]
        unused = [flags[k] for k in run_only if getattr(given, k, None) is not None]
        if unused:
            raise ValueError(f"{unused[0]} is about running a model; --predictions scores answers already made: "
                             "give one")


def read_predictions(uri: str, args: argparse.Namespace) -> pa.Table:
    """id, answer (the prediction: never renamed, though a benchmark may name its ground truth
    `answer`, as MMStar does) and the rest in the contract's names."""
    table = read_parquet(uri, None, storage_options(args))
    mapping = {k: v for k, v in _column_mapping(args).items()
               if k != "answer" and not (v == "id" and "id" in table.column_names)}
    table = rename_columns(table, mapping)
    for needed in ("id", "answer"):
        if needed not in table.column_names:
            raise ValueError(f"predictions {uri} have no {needed!r} column; columns: {table.column_names}")
    return table.drop_columns([c for c in ("image",) if c in table.column_names])


def evaluation_predictions(uri: str, options: dict) -> str | None:
    """The predictions.parquet of the evaluation's output folder `uri` names; None where it names none
    (its raw/ answers beside it are the same rows again: read together, every id was a duplicate)."""
    from pipeline.storage import fsspec_fs

    fs, path = fsspec_fs(uri, options)
    if uri.endswith(".parquet") or not fs.exists(f"{path.rstrip('/')}/{PREDICTIONS_FILE}"):
        return None
    return f"{uri.rstrip('/')}/{PREDICTIONS_FILE}"


def baseline_file(uri: str, options: dict) -> str:
    """--baseline's predictions: the file named, or the predictions.parquet of the run folder named."""
    from pipeline.storage import fsspec_fs

    if uri.endswith(".parquet"):
        fs, path = fsspec_fs(uri, options)
        if not fs.exists(path):
            raise FileNotFoundError(f"--baseline {redact_url(uri)!r}: no such file")
        return uri
    found = evaluation_predictions(uri, options)
    if found is None:
        raise FileNotFoundError(f"--baseline {redact_url(uri)!r} is neither a .parquet file nor an evaluation's "
                                f"output folder (no {PREDICTIONS_FILE} in it)")
    return found


def load_images(args: argparse.Namespace, ids: list[str]) -> dict[str, object]:
    """Image cells of the given ids from --input, for the gallery's thumbnails."""
    if not args.input:
        return {}
    from pipeline.config import column_list

    named = column_list(args.image_columns or [])
    firsts = [columns[0] for _, columns in OPTION_LIST_LAYOUT.values()]     # MMMU's image_1: a row's first image
    candidates = list(dict.fromkeys([*named[:1], args.image_column, *firsts]))
    table = read_parquet(args.input, [args.id_column, *candidates], storage_options(args))
    column = next((c for c in candidates if c in table.column_names), None)
    if column is None or args.id_column not in table.column_names:
        return {}
    wanted = set(ids)
    cells = {str(i): img[0] if isinstance(img, list) and img else img
             for i, img in zip(table.column(args.id_column).to_pylist(), table.column(column).to_pylist())
             if str(i) in wanted}
    # paths relative to the input's folder (or --image-root) and URLs, read as the run reads them
    from pipeline.fetch import ImageFetcher
    from pipeline.io import input_folder

    options = storage_options(args)
    fetcher = ImageFetcher(options, root=args.image_root or input_folder(args.input, options))
    try:
        read = fetcher.fetch(list(cells.values()))
    finally:
        fetcher.close()
    return {key: data if isinstance(data, bytes) else None for key, data in zip(cells, read)}


def input_has_ids(args: argparse.Namespace) -> bool:
    return args.id_column in parquet_dataset(args.input, storage_options(args)).schema.names


def raw_output(output: str) -> str:
    """Where the model's answers are written (as jobs.caption writes them): <output>/raw."""
    return output.rstrip("/") + "/raw"


def default_output(args: argparse.Namespace) -> str:
    return args.output or f"runs/evaluate-{Path(args.input or args.predictions).stem}"
