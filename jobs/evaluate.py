"""Offline evaluation: run a checkpoint on a benchmark in Parquet (or take existing predictions), score it.

    python -m jobs.evaluate --input data/docvqa_val.parquet --model HuggingFaceTB/SmolVLM-256M-Instruct \
        --output runs/docvqa [--metric anls] [--prompt-suffix "..."] [--gallery 50]
    python -m jobs.evaluate --predictions runs/docvqa/predictions.parquet --output runs/rescore
    python -m jobs.evaluate            # the bundled demo model on its held-out split

Writes predictions.parquet, metrics.json, report.md, scores.png (and gallery.html with --gallery N).
Metrics follow lmms-eval's conventions (evaluation/metrics.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.metrics import METRICS
from evaluation.report import (sample_rows, write_chart, write_gallery, write_metrics_json,
                               write_report_md)
from evaluation.scoring import join_ground_truth, score_rows, summarize

log = logging.getLogger("jobs.evaluate")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL, DEMO_INPUT = REPO / "demo" / "model", REPO / "demo" / "data" / "heldout.parquet"
PREDICTIONS_FILE = "predictions.parquet"

# Benchmark name (found in the input's path, lowercased, without - and _) -> its standard metric.
DATASET_METRICS = {
    "docvqa": "anls", "infovqa": "anls", "infographicvqa": "anls", "stvqa": "anls",
    "chartqa": "relaxed_accuracy", "plotqa": "relaxed_accuracy",
    "mmstar": "multiple_choice", "mmmu": "multiple_choice", "mmbench": "multiple_choice",
    "textvqa": "vqa_accuracy", "vqav2": "vqa_accuracy", "vizwiz": "vqa_accuracy", "okvqa": "vqa_accuracy",
    "demo": "exact_match",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help="benchmark Parquet (file, folder, glob; local or fsspec URL)")
    ap.add_argument("--model", help="checkpoint folder or hub id")
    ap.add_argument("--output", help="folder for the artefacts (default: runs/evaluate-<dataset>)")
    ap.add_argument("--metric", choices=list(METRICS), help="default: the dataset's standard metric")
    ap.add_argument("--prompt-suffix", default="", help="appended to every question, e.g. "
                    "'Answer the question using a single word or phrase.'")
    ap.add_argument("--question-column", default="question")
    ap.add_argument("--answers-column", default="answers")
    ap.add_argument("--image-column", default="image")
    ap.add_argument("--category-column", default="category")
    ap.add_argument("--predictions", help="score this predictions Parquet (id, answer[, answers, category]) "
                    "instead of running a model; with --input, ground truth is joined from it by id")
    ap.add_argument("--gallery", type=int, default=0, metavar="N", help="write gallery.html with N sampled rows")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per model batch (pipeline default)")
    return ap.parse_args(argv)


def resolve_demo(args: argparse.Namespace) -> argparse.Namespace:
    """No --input, --model or --predictions: evaluate the bundled demo model on its held-out split."""
    if args.input or args.model or args.predictions:
        return args
    for what, path in (("demo model", DEMO_MODEL), ("demo held-out split", DEMO_INPUT)):
        if not path.exists():
            raise FileNotFoundError(f"the {what} is missing at {path}: build it with `python -m jobs.train_demo` "
                                    "(or pass --input and --model)")
    args.input, args.model = str(DEMO_INPUT), str(DEMO_MODEL)
    return args


def choose_metric(args: argparse.Namespace) -> str:
    if args.metric:
        return args.metric
    name = (args.input or args.predictions or "").lower().replace("-", "").replace("_", "")
    for dataset, metric in DATASET_METRICS.items():
        if dataset in name:
            return metric
    raise ValueError(f"cannot tell the benchmark from {args.input or args.predictions!r}: pass --metric "
                     f"({', '.join(METRICS)})")


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, folder or glob, local or any fsspec URL, as one table (missing columns skipped)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if any(c in path for c in "*?["):
        paths = sorted(fs.glob(path))
        if not paths:
            raise FileNotFoundError(f"no Parquet files match {uri}")
    elif fs.exists(path):
        paths = path
    else:
        raise FileNotFoundError(f"no such Parquet file or folder: {uri}")
    dataset = pq.ParquetDataset(paths, filesystem=fs)
    present = dataset.schema.names
    return dataset.read(columns=None if columns is None else [c for c in columns if c in present])


def rename_columns(table: pa.Table, mapping: dict[str, str]) -> pa.Table:
    """User column names -> the dataset contract's (question, answers, image, category)."""
    names = [mapping.get(n, n) for n in table.column_names]
    return table.rename_columns(names)


def _column_mapping(args: argparse.Namespace) -> dict[str, str]:
    return {args.question_column: "question", args.answers_column: "answers",
            args.image_column: "image", args.category_column: "category"}


def read_ground_truth(args: argparse.Namespace) -> pa.Table:
    """id, answers, and question/category when present, from --input (never the image bytes)."""
    wanted = ["id", args.answers_column, args.question_column, args.category_column]
    table = rename_columns(read_parquet(args.input, wanted), _column_mapping(args))
    for needed in ("id", "answers"):
        if needed not in table.column_names:
            flag = "" if needed == "id" else f" (--answers-column {args.answers_column!r})"
            raise ValueError(f"{args.input} has no {needed!r} column{flag}; columns: {table.column_names}")
    return table


def read_predictions(uri: str, args: argparse.Namespace) -> pa.Table:
    table = rename_columns(read_parquet(uri), _column_mapping(args))
    for needed in ("id", "answer"):
        if needed not in table.column_names:
            raise ValueError(f"predictions {uri} have no {needed!r} column; columns: {table.column_names}")
    return table.drop_columns([c for c in ("image",) if c in table.column_names])


def run_model(args: argparse.Namespace, out_dir: Path) -> str:
    """Answer every benchmark row with the caption pipeline; returns the raw output folder."""
    from jobs.evaluate_pipeline import run_pipeline  # Ray is imported only when a model runs

    return run_pipeline(args, out_dir / "raw")


def load_images(args: argparse.Namespace, ids: list[str]) -> dict[str, object]:
    """Image cells of the given ids from --input, for the gallery's thumbnails."""
    if not args.input:
        return {}
    table = read_parquet(args.input, ["id", args.image_column])
    if args.image_column not in table.column_names or "id" not in table.column_names:
        return {}
    wanted = set(ids)
    return {str(i): img for i, img in zip(table.column("id").to_pylist(), table.column(args.image_column).to_pylist())
            if str(i) in wanted}


def gather_predictions(args: argparse.Namespace, out_dir: Path) -> pa.Table:
    """Predictions (run or read) with ground truth attached, one row per benchmark row."""
    source = args.predictions or run_model(args, out_dir)
    predictions = read_predictions(source, args)
    if not args.input:
        return predictions
    truth = read_ground_truth(args)
    predictions = predictions.drop_columns([c for c in ("answers",) if c in predictions.column_names])
    return join_ground_truth(predictions, truth)


def evaluate(args: argparse.Namespace) -> dict:
    args = resolve_demo(args)
    metric = choose_metric(args)
    out_dir = Path(args.output or f"runs/evaluate-{Path(args.input or args.predictions).stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = score_rows(gather_predictions(args, out_dir), metric)
    pq.write_table(scored, out_dir / PREDICTIONS_FILE)
    summary = summarize(scored, metric)
    sources = {k: v for k, v in (("model", args.model), ("input", args.input),
                                 ("predictions", args.predictions)) if v}
    write_metrics_json(summary, out_dir)
    write_report_md(summary, sources, out_dir)
    write_chart(summary, out_dir)
    if args.gallery > 0:
        rows = sample_rows(scored.to_pylist(), args.gallery)
        write_gallery(rows, load_images(args, [str(r["id"]) for r in rows]), summary, out_dir)
    log.info("%s = %s over %d rows (%d errors) -> %s", metric, summary["score"], summary["rows"],
             summary["errors"], out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = evaluate(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("metric", "score", "rows", "errors")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
