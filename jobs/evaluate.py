"""Offline evaluation: run a checkpoint on a benchmark in Parquet (or take existing predictions), score it.

    python -m jobs.evaluate --input data/docvqa_val.parquet --model HuggingFaceTB/SmolVLM-256M-Instruct \
        --output runs/docvqa [--metric anls] [--prompt-suffix "..."] [--gallery 50]
    python -m jobs.evaluate --predictions runs/docvqa/predictions.parquet --output runs/rescore
    python -m jobs.evaluate            # the bundled demo model on its held-out split

Writes predictions.parquet, metrics.json, report.md, scores.png (and gallery.html with --gallery N)
into --output, a folder or a URL (s3://...); the model's raw answers go to <output>/raw as the caption
job writes them, so a killed run continues with --resume. Flags may also come from `--config
eval.yaml`. Metrics follow lmms-eval's conventions (evaluation/metrics.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.baseline import baseline_scores, changed_rows, compare
from evaluation.benchmarks import DATASET_MAX_NEW_TOKENS
from evaluation.metrics import METRICS, ROW_COLUMNS
from evaluation.mmmu import with_subjects
from evaluation.report import (GALLERY_FILE, sample_rows, write_chart, write_gallery, write_metrics_json,
                               write_report_md)
from evaluation.scoring import check_ground_truth, join_ground_truth, score_rows, summarize
from jobs.common import (BAD_ARGUMENTS, Interrupted, add_run_flags, interrupted, merge_args, output_folder,
                         print_error, print_rehearsal, run_failed, run_flag_names, stop_on_signals)
from jobs.evaluate_benchmark import (benchmark_name, choose_metric, choose_suffix, chosen_average, how_asked,
                                     name_columns)
from jobs.evaluate_inputs import (PREDICTIONS_FILE, baseline_file, check_column_flags, check_job_flags, default_output,
                                  earlier_sources, evaluation_predictions, input_has_ids, load_images, raw_output,
                                  read_ground_truth, read_parquet, read_predictions, storage_options)
from pipeline.errors import RunFailed
from pipeline.storage import redact_url

log = logging.getLogger("jobs.evaluate")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL, DEMO_INPUT = REPO / "demo" / "model", REPO / "demo" / "data" / "heldout.parquet"
DEMO_OUTPUT = REPO / "demo" / "output" / "evaluate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    given = ap.parse_args(argv)
    args = argparse.Namespace(**merge_args(given, DEFAULTS, ap))
    name_columns(args)
    check_column_flags(args)
    check_job_flags(args, given, ap)
    if args.predictions:        # an evaluation's output folder: its predictions.parquet, as --baseline's
        args.predictions = evaluation_predictions(args.predictions, storage_options(args)) or args.predictions
    return args




def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help="benchmark Parquet (file, folder, glob; local or fsspec URL)")
    ap.add_argument("--model", help="checkpoint folder, its URL (s3://..., copied once per node) or hub id")
    ap.add_argument("--adapter", help="a PEFT LoRA (or DoRA) adapter of --model: its folder or URL, merged "
                                      "into the weights as they load (a fine-tune published as an adapter)")
    ap.add_argument("--output", type=output_folder,
                    help="folder for the artefacts (default: runs/evaluate-<dataset>; the demo's: "
                                     "demo/output/evaluate)")
    ap.add_argument("--metric", choices=list(METRICS), help="default: the dataset's standard metric")
    ap.add_argument("--system-prompt", help="a system turn before every question (default: none)")
    ap.add_argument("--prompt-suffix", help="appended to every question (default: lmms-eval's instruction for "
                    "the benchmark named in --input, e.g. '\\nAnswer the question using a single word or phrase.' "
                    "for DocVQA; none for others; '' for none)")
    ap.add_argument("--id-column", help="the benchmark's question ids, the predictions' `id` (default: id, else a "
                                        "known benchmark's own: DocVQA's questionId, VQAv2's question_id, MMStar's "
                                        "index; else ids from each row's file and index)")
    ap.add_argument("--question-column", help="default: question")
    ap.add_argument("--answers-column", help="the ground truth: one answer or a list (default: answers, else a "
                                             "known benchmark's answer: ChartQA's, MMBench's, MMStar's, MMMU's)")
    ap.add_argument("--image-column", help="default: image")
    ap.add_argument("--image-columns", metavar="A,B",
                    help="instead of --image-column: columns of an image each, a row's images their non-null cells "
                         "in order (default for MMMU: its image_1 ... image_7)")
    ap.add_argument("--category-column", help="scores are also given per category (default: category; "
                                              "ChartQA's type)")
    ap.add_argument("--predictions", help="score this predictions Parquet (id, answer[, answers, category]; an "
                    "evaluation's output folder: its predictions.parquet) instead of running a model; with --input, "
                    "ground truth is joined from it by id")
    ap.add_argument("--baseline", metavar="PREDICTIONS",
                    help="an earlier evaluation's predictions.parquet (or its --output folder; local or URL), e.g. "
                         "the base checkpoint's: the report compares the two row by row (both scored with this "
                         "run's ground truth and metric: the difference, its 95%% interval, rows better and worse, "
                         "per category); the gallery then shows rows whose score changed")
    ap.add_argument("--dry-run", type=int, nargs="?", const=64, metavar="N",
                    help="rehearse the model run on this machine, writing nothing and loading no weights: the "
                         "ground truth checked for the metric, then the caption job's --dry-run on the first N "
                         "benchmark rows (default 64): rows that would fail and why, prompt tokens, tiles")
    ap.add_argument("--gallery", type=int, metavar="N", help="write gallery.html with N sampled rows")
    ap.add_argument("--limit", type=int, metavar="N", help="score only the first N benchmark rows (a quick check; "
                    "the report says so)")
    ap.add_argument("--max-new-tokens", type=int, help="default: lmms-eval's for a known benchmark (DocVQA 32, "
                                                       "ChartQA 16, MMMU 128, ...), else 64")
    ap.add_argument("--num-beams", type=int, metavar="K",
                    help="beam search with K beams (transformers' num_beams; default 1: greedy, as lmms-eval "
                         "scores most benchmarks)")
    ap.add_argument("--choice", action="append", metavar="TEXT", dest="choices",
                    help="answer with one of these texts only (repeatable), e.g. the option letters of a "
                         "multiple-choice benchmark; lmms-eval does not, so scores may differ from its tables")
    ap.add_argument("--choices-column", help="a column of each question's own choices (lists of text)")
    ap.add_argument("--resume", action="store_true", default=None,
                    help="continue the model run that --output holds (a killed one answers the rest; a finished "
                         "one is scored again)")
    ap.add_argument("--retry-errors", nargs="?", const="", metavar="TEXT",
                    help="resume, and answer again the model run's error rows (only those whose error or its kind "
                         "holds TEXT in any case, if given; with --limit, of its rows only), then score")
    ap.add_argument("--overwrite", action="store_true", default=None,
                    help="start over, discarding the answers an earlier run left in --output")
    add_run_flags(ap)
    ap.add_argument("--config", help="eval.yaml (a path or URL) with any of the flags above")
    return ap


DEFAULTS = dict(input=None, model=None, adapter=None, output=None, metric=None, system_prompt=None,
                prompt_suffix=None,
                id_column=None, question_column="question", answers_column=None, image_column="image",
                image_columns=None,
                category_column=None, predictions=None, baseline=None, dry_run=None, gallery=0, limit=None,
                max_new_tokens=None, num_beams=None,
                resume=False, retry_errors=None, overwrite=False, choices=None, choices_column=None,
                **dict.fromkeys(run_flag_names()))


def resolve_demo(args: argparse.Namespace) -> argparse.Namespace:
    """No --input, --model or --predictions: evaluate the bundled demo model on its held-out split."""
    if args.input or args.model or args.predictions:
        return args
    for what, path in (("demo model", DEMO_MODEL), ("demo held-out split", DEMO_INPUT)):
        if not path.exists():
            raise FileNotFoundError(f"the {what} is missing at {path}: build it with `python -m jobs.train_demo` "
                                    "(or pass --input and --model)")
    args.input, args.model = str(DEMO_INPUT), str(DEMO_MODEL)
    args.output = args.output or str(DEMO_OUTPUT)
    args.overwrite = args.overwrite or not args.resume      # a demo run starts over unless told to resume
    return args


def pipeline_config(args: argparse.Namespace, kept: list[str], **asked):
    """Greedy answers with the given run flags (the checkpoint's generation_config.json only with
    --generation-config auto); what is not given is PipelineConfig's default. `asked`: how rows are
    asked (a multiple-choice benchmark's option columns)."""
    from pipeline import PipelineConfig

    given = {k: v for k, v in vars(args).items() if v is not None and k in PipelineConfig.field_names()
             and k not in ("model", "storage_options", "prompt_suffix")}
    given.setdefault("generation_config", "none")
    if benchmark_name(args) in DATASET_MAX_NEW_TOKENS:      # lmms-eval's for the task, unless given
        given.setdefault("max_new_tokens", DATASET_MAX_NEW_TOKENS[benchmark_name(args)])
    return PipelineConfig(model=args.model, keep_columns=kept, storage_options=storage_options(args),
                          prompt_suffix=choose_suffix(args), **{**given, **asked})


SHOWN_SETTINGS = ("system_prompt", "max_new_tokens", "num_beams", "generation_config", "image_backend",
                  "image_longest_edge", "image_splitting", "max_image_pixels", "dtype", "choices", "choices_column")


def model_settings(args: argparse.Namespace) -> dict[str, str]:
    """What the report says of how the answers were made: the checkpoint's files (a fingerprint, as
    the caption job's run manifest keeps), the prompt suffix and the settings answers depend on."""
    from pipeline.manifest import checkpoint_fingerprint

    config, _ = model_run_config(args)
    adapter = {"adapter": checkpoint_fingerprint(config.adapter, config.storage_options)} if config.adapter else {}
    opened = {} if config.open_question_suffix is None else {"open question suffix": repr(config.open_question_suffix)}
    return {"checkpoint": checkpoint_fingerprint(config.model, config.storage_options), **adapter,
            "prompt suffix": repr(config.prompt_suffix), **opened,
            "settings": json.dumps({name: shown(getattr(config, name)) for name in SHOWN_SETTINGS})}


def shown(value):
    """A setting as the report shows it: a URL (--generation-config's) without its secrets."""
    from pipeline.storage import redact_url

    return redact_url(value) if isinstance(value, str) else value


def refuse_earlier_answers(raw: str, args: argparse.Namespace) -> None:
    """Answers of an earlier run are thrown away only with --overwrite (prepare_job removes them once
    every check has passed), not by a command repeated without --resume; this says so in the job's flags."""
    from pipeline.storage import has_files, redact_url

    if not args.overwrite and has_files(raw, storage_options(args)):
        raise FileExistsError(f"{redact_url(args.output)!r} holds the answers of an earlier run "
                              f"({redact_url(raw)}): pass --resume to continue it (a finished one is scored "
                              "again), or --overwrite to start over")


def model_run_config(args: argparse.Namespace):
    """The caption pipeline's config of the model run, and the renames that make the benchmark's
    ground truth `answers` and `category` (kept columns that travel with each row)."""
    from pipeline.io import input_dataset

    truth = {args.answers_column: "answers", args.category_column: "category"}
    present = [truth.get(c, c) for c in input_dataset(args.input, storage_options(args)).schema.names]
    if "answers" not in present:
        raise ValueError(f"{args.input} has no ground-truth column {args.answers_column!r} (see --answers-column)")
    asked = how_asked(args, present)
    kept = [c for c in ("answers", "category", *asked.pop("scored_with")) if c in present]
    return pipeline_config(args, kept, **asked), truth


def run_model(args: argparse.Namespace, ids: list[str] | None = None) -> tuple[str, dict]:
    """Answer every benchmark row (with --limit: those of `ids`, else the first N read) with the
    caption pipeline (greedy unless --num-beams, resumable); returns the raw output and the run's summary.

    The ground truth (answers, category) travels with each row as kept columns, so that rows whose
    ids the pipeline derives (inputs without `id`) are scored as well.
    """
    from jobs.cluster import check_cluster_fits, init_ray
    from pipeline.job import prepare_job, run_prepared

    if not args.model:
        raise ValueError("--model is required to run a model (or pass --predictions to score existing answers)")
    if ids is None and args.limit is not None and args.resume:
        raise ValueError(f"--limit with --resume: {args.input} has no id column ({args.id_column!r}, --id-column) to "
                         "find its first rows by again; a resume without --limit answers every benchmark row and "
                         "scores them all")
    config, truth = model_run_config(args)
    raw = raw_output(args.output)
    if not args.resume:
        refuse_earlier_answers(raw, args)
    check_cluster_fits(config.cpu_workers, config.cpus_per_worker, config.device)
    job = prepare_job(args.input, raw, config, resume=bool(args.resume), limit=args.limit if ids is None else None,
                      only_ids=ids, renames=truth, overwrite=bool(args.overwrite), retry_errors=args.retry_errors)
    if job.has_rows:
        init_ray(config.device)
    return raw, run_prepared(job)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


def checked_truth(args: argparse.Namespace, metric: str) -> pa.Table | None:
    """The benchmark's ground truth (its first --limit rows), checked for the metric: the table to
    join by id where the benchmark has ids; None where it has none (its rows carry their answers
    through the run), checked row by row all the same."""
    if input_has_ids(args):
        truth = read_ground_truth(args).slice(0, args.limit)
        repeated = sorted(i for i, n in Counter(str(i) for i in truth.column("id").to_pylist()).items() if n > 1)
        if repeated:
            raise ValueError(f"{args.input}: its id column {args.id_column!r} repeats ids, e.g. {repeated[:5]}: "
                             "--id-column names another (id, where the input has none: each row's own from its "
                             "file and index)")
        check_ground_truth(truth, metric)
        return truth
    found = read_parquet(args.input, [args.answers_column, *ROW_COLUMNS.get(metric, ())], storage_options(args))
    if args.answers_column in found.column_names:
        found = found.slice(0, args.limit)
        columns = {"id": [f"row {i}" for i in range(found.num_rows)], "answers": found.column(args.answers_column),
                   **{c: found.column(c) for c in ROW_COLUMNS.get(metric, ()) if c in found.column_names}}
        check_ground_truth(pa.table(columns), metric)
    return None


def check_baseline_ids(baseline_path: str, truth: pa.Table, args: argparse.Namespace) -> None:
    """A baseline sharing no id with the benchmark is refused before the model run, not after it (a
    run that named its rows otherwise, as row hashes without --id-column, pairs with none)."""
    theirs = read_predictions(baseline_path, args).column("id").to_pylist()
    ours = truth.column("id").to_pylist()
    if theirs and ours and {str(i) for i in theirs}.isdisjoint(str(i) for i in ours):
        raise ValueError(f"the baseline's {len(theirs)} predictions share no id with the benchmark's {len(ours)} rows "
                         f"(theirs like {str(theirs[0])!r}, ours like {str(ours[0])!r}, the input's "
                         f"{args.id_column!r} column): --id-column names the ids the baseline's run used")


def gather_predictions(args: argparse.Namespace, metric: str,
                       baseline_path: str | None = None) -> tuple[pa.Table, dict | None]:
    """Predictions (run or read) with ground truth attached, one row per benchmark row (the first
    --limit ones with it); and the model run's summary (None when --predictions are scored)."""
    from pipeline.rows import keep_ids

    check_limit(args.limit)
    truth = checked_truth(args, metric) if args.input else None     # before a long model run, not after it
    if truth is not None and baseline_path:
        check_baseline_ids(baseline_path, truth, args)
    if truth is None and args.input and args.predictions:
        raise ValueError(f"{args.input} has no {args.id_column!r} column to join the predictions on (--id-column)")
    ids = None if truth is None or args.limit is None else [str(i) for i in truth.column("id").to_pylist()]
    source, run = (args.predictions, None) if args.predictions else run_model(args, ids)
    predictions = read_predictions(source, args)
    if truth is None:
        # the ground truth is in the predictions (kept columns, or the file's own): each row once
        from evaluation.scoring import check_unique_ids

        check_unique_ids([str(i) for i in predictions.column("id").to_pylist()], "predictions")
        return predictions.slice(0, args.limit), run
    if ids is not None:
        predictions = keep_ids(predictions, ids)
    return join_ground_truth(predictions, truth), run  # the benchmark's ground truth wins


@contextmanager
def artefact_folder(output: str, options: dict) -> Iterator[Path]:
    """The local folder the artefacts are written to: `output` itself, or for a URL (s3://...) a
    temporary one whose files are copied there at the end."""
    from pipeline.storage import fsspec_fs, is_local

    if is_local(output):
        Path(output).mkdir(parents=True, exist_ok=True)
        yield Path(output)
        return
    with tempfile.TemporaryDirectory() as local:
        yield Path(local)
        fs, path = fsspec_fs(output, options)
        for file in sorted(Path(local).iterdir()):
            fs.put_file(str(file), f"{path.rstrip('/')}/{file.name}")


def remove_earlier_gallery(output: str, options: dict) -> None:
    """An earlier evaluation's gallery in the output (rescored in place) shows its scores, not these."""
    from pipeline.storage import fsspec_fs

    fs, path = fsspec_fs(f"{output.rstrip('/')}/{GALLERY_FILE}", options)
    if fs.exists(path):
        fs.rm(path)


def unanswered(run: dict | None) -> str | None:
    """What the report and the exit status say of a model run whose output lacks rows."""
    from jobs.common import incomplete_output

    return incomplete_output(run, "benchmark rows") if run else None


def evaluate(args: argparse.Namespace) -> tuple[dict, str | None]:
    """Scores the predictions and writes the artefacts; returns metrics.json's summary and, when the
    model run left rows unanswered, what is wrong (the rows count as errors where their ids are known)."""
    args = resolve_demo(args)
    metric = choose_metric(args)
    args.output = default_output(args)
    baseline_path = args.baseline and baseline_file(args.baseline, storage_options(args))    # before a long run
    scored, run = gather_predictions(args, metric, baseline_path)
    if metric == "mmmu" and "category" not in scored.column_names:
        scored = with_subjects(scored)
    scored = score_rows(scored, metric)
    averaged_over = chosen_average(args)
    summary = summarize(scored, metric, averaged_over=averaged_over)
    if args.baseline:
        baseline = read_predictions(baseline_path, args)
        scored = baseline_scores(scored, baseline, metric)
        summary["baseline"] = compare(scored, redact_url(args.baseline), baseline.num_rows,
                                      averaged_over=averaged_over, metric=metric)
    sources = {k: redact_url(v) for k, v in (("model", args.model), ("input", args.input),
                                             ("predictions", args.predictions)) if v}
    if args.model and not args.predictions:
        sources.update(model_settings(args))
    if args.predictions:
        sources.update(earlier_sources(args.predictions, storage_options(args)))
    if run and run.get("replicas"):       # the dtype a device chose (settings' "dtype": null) is known only here
        resumed = "" if run["rows_this_run"] == run["rows"] else " (this run's; the resumed one's rows may differ)"
        sources["replicas"] = ", ".join(f"{n} x {kind}" for kind, n in sorted(run["replicas"].items())) + resumed
    if args.limit is not None:
        sources["limit"] = f"the first {args.limit} rows only"
    problem = unanswered(run)
    if problem:
        sources["incomplete"] = problem
    summary["sources"] = sources        # what report.md lists, for a later rescoring and for programs
    with artefact_folder(args.output, storage_options(args)) as out_dir:
        pq.write_table(scored, out_dir / PREDICTIONS_FILE)
        write_metrics_json(summary, out_dir)
        write_report_md(summary, sources, out_dir)
        write_chart(summary, out_dir)
        if args.gallery > 0:
            rows = scored.to_pylist()
            rows = sample_rows((changed_rows(rows) if args.baseline else []) or rows, args.gallery)
            write_gallery(rows, load_images(args, [str(r["id"]) for r in rows]), summary, out_dir)
    if args.gallery == 0:
        remove_earlier_gallery(args.output, storage_options(args))
    log.info("%s = %s over %d rows (%d errors) -> %s", metric, summary["score"], summary["rows"],
             summary["errors"], redact_url(args.output))
    return summary, problem


def rehearse(args: argparse.Namespace) -> dict:
    """--dry-run: the ground truth checked for the metric, then the caption job's rehearsal
    (pipeline.dry_run) of the model run evaluate would make."""
    from pipeline.dry_run import dry_run

    args = resolve_demo(args)
    metric = choose_metric(args)
    if args.predictions or not args.model:
        raise ValueError("--dry-run rehearses a model run: give --input and --model (not --predictions)")
    check_limit(args.limit)
    if args.baseline:
        baseline_file(args.baseline, storage_options(args))
    checked_truth(args, metric)
    config, truth = model_run_config(args)
    # a resumed evaluation may keep its --limit (it answers the first rows' missing ones, by id)
    found = dry_run(args.input, raw_output(default_output(args)), config, rows=args.dry_run,
                    resume=bool(args.resume), overwrite=bool(args.overwrite), renames=truth,
                    limit=None if args.resume else args.limit, retry_errors=args.retry_errors)
    return {"metric": metric, **found}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop_on_signals()
    try:
        args = parse_args(argv)
        if args.dry_run is not None:
            return print_rehearsal(rehearse(args))
        summary, problem = evaluate(args)
    except BAD_ARGUMENTS as e:
        print_error(e, build_parser())
        return 2
    except RunFailed as e:     # StartFailed too
        return run_failed(e)
    except (KeyboardInterrupt, Interrupted) as e:
        return interrupted(e, "the model's answers written are kept (<output>/raw); the same command with "
                              "--resume answers the rest and scores them")
    print(json.dumps({k: summary[k] for k in ("metric", "score", "rows", "errors")}))
    if problem:
        print_error(problem)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
