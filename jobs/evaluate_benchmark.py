"""What a known benchmark (named in the input's path: evaluation.benchmarks) sets in jobs.evaluate:
the names of its columns, its metric, the instruction after its questions, how its options and
images are laid out, and the groups its score averages over."""
from __future__ import annotations

import argparse

from evaluation.benchmarks import (AVERAGED_OVER, BENCHMARK_COLUMNS, CAPITALIZED, DATASET_METRICS, DATASET_SUFFIXES,
                                   OPEN_QUESTION_SUFFIXES, OPTION_LIST_LAYOUT, QUESTION_REMOVALS, benchmark_in)
from evaluation.metrics import METRICS, ROW_COLUMNS
from jobs.evaluate_inputs import (default_output, earlier_averaged_over, earlier_metric, input_has_ids, parquet_dataset,
                                  raw_output, storage_options)


def benchmark_name(args: argparse.Namespace) -> str | None:
    return benchmark_in(args.input or args.predictions or "")


COLUMN_FLAGS = {"id": "id_column", "answers": "answers_column", "category": "category_column"}


def name_columns(args: argparse.Namespace) -> None:
    """The id, ground-truth and category columns the flags leave unnamed: their default names, else
    a known benchmark's own (DocVQA's questionId, MMStar's ground truth `answer`) where --input has
    that column and none of the default name."""
    unnamed = [name for name, flag in COLUMN_FLAGS.items() if getattr(args, flag) is None]
    own = dict(BENCHMARK_COLUMNS.get(benchmark_in(args.input or "")) or {})
    if unnamed and (args.resume or args.retry_errors is not None):
        own.update(resumed_columns(args))
    present: list[str] = []
    if args.input and any(name in own for name in unnamed):
        try:
            present = parquet_dataset(args.input, storage_options(args)).schema.names
        except Exception:       # noqa: BLE001 (a missing or unreadable input is named where it is read)
            present = []
    for name in unnamed:
        theirs = own.get(name)
        chosen = theirs if theirs in present and name not in present else name
        setattr(args, COLUMN_FLAGS[name], chosen)


def resumed_columns(args: argparse.Namespace) -> dict[str, str]:
    """The id and category columns of the run a resume continues, as its manifest names them (a run
    begun before known benchmarks' own names were read used the default ones)."""
    from pipeline.manifest import earlier_settings

    try:
        earlier = earlier_settings(raw_output(default_output(args)), storage_options(args))
    except Exception:       # noqa: BLE001 (an output that cannot be read is named where the run reads it)
        return {}
    found = {"id": earlier["id_column"]} if isinstance(earlier.get("id_column"), str) else {}
    if isinstance(earlier.get("keep_columns"), list) and "category" not in earlier["keep_columns"]:
        found["category"] = "category"      # it kept none: its categories were not another column's
    return found


def choose_metric(args: argparse.Namespace) -> str:
    """--metric, else the one an evaluation's own predictions were scored with, else the benchmark's."""
    earlier = args.predictions and earlier_metric(args.predictions, storage_options(args))
    name = benchmark_name(args)
    if args.metric or earlier:
        return args.metric or earlier
    if name:
        listed = OPTION_LIST_LAYOUT.get(name)
        has_list = listed is None or listed[0] in parquet_dataset(args.input or args.predictions,
                                                                  storage_options(args)).schema.names
        return DATASET_METRICS[name] if has_list else "multiple_choice"     # its options written in the question
    raise ValueError(f"cannot tell the benchmark from {args.input or args.predictions!r}: pass --metric "
                     f"({', '.join(METRICS)})")


def choose_suffix(args: argparse.Namespace) -> str:
    if args.prompt_suffix is not None:
        return args.prompt_suffix
    return DATASET_SUFFIXES.get(benchmark_name(args), "")


def chosen_average(args: argparse.Namespace) -> str | None:
    """The column whose groups' means make the score (MMStar's l2_category, by its name or as its
    earlier evaluation's metrics.json says), under its name in the scored rows."""
    column = AVERAGED_OVER.get(benchmark_name(args)) or (
        args.predictions and earlier_averaged_over(args.predictions, storage_options(args)))
    return "category" if column and column == args.category_column else column or None


def asked_options(args: argparse.Namespace, present: list[str]) -> dict:
    """A multiple-choice benchmark whose options are columns A, B, ... (MMBench's, with its `hint`),
    or one list (MMMU's, its images in columns of one each): they are asked after the question as
    lmms-eval asks them; without them the model saw no options."""
    name = benchmark_name(args)
    layout = OPTION_LIST_LAYOUT.get(name) or (OPTION_LIST_LAYOUT["mmmu"] if choose_metric(args) == "mmmu" else None)
    if layout is not None:
        options, image_columns = layout
        asked = {}
        if args.image_column == "image" and "image" not in present and not args.image_columns:
            asked["image_columns"] = [c for c in image_columns if c in present]
            asked["images_named_in_text"] = True
        if options in present:
            open_suffix = OPEN_QUESTION_SUFFIXES.get(name) if args.prompt_suffix is None else None
            asked.update(option_list_column=options, open_question_suffix=open_suffix)
        return asked
    letters = [c for c in "ABCDEFGHIJ" if c in present]
    if choose_metric(args) not in ("multiple_choice", "mmbench", "mmstar") or letters[:2] != ["A", "B"]:
        return {}
    return {"option_columns": letters, "hint_column": "hint" if "hint" in present else None}


def how_asked(args: argparse.Namespace, present: list[str]) -> dict:
    """The PipelineConfig settings of how the benchmark's rows are asked (its options, images and
    question clean-up), and under `scored_with` the columns its scoring reads beside the answers."""
    name, asked = benchmark_name(args), asked_options(args, present)
    scored_with = [c for c in (asked.get("option_list_column"), AVERAGED_OVER.get(name)) if c]
    if not input_has_ids(args):     # rows joined to no ground truth carry what their metric reads (MMBench's options)
        scored_with += [c for c in ROW_COLUMNS.get(choose_metric(args), ()) if c in present and c not in scored_with]
    return {**asked, "capitalize_questions": name in CAPITALIZED,
            "question_removals": QUESTION_REMOVALS.get(name, []), "scored_with": scored_with}
