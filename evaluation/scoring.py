"""Predictions joined to ground truth, scored per row, and summarised (the numbers of metrics.json)."""
from __future__ import annotations

import math
import re
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

from evaluation.benchmarks import SCORING_COLUMNS
from evaluation.metrics import CIRCULAR, NEEDED_ROW_COLUMNS, ROW_COLUMNS, as_answer_list, get_metric, score_row
from evaluation.mmbench import question_of

SECONDARY_METRICS = ["exact_match"]
DIGITS = 6  # metrics.json and report.md carry the same rounded numbers
GROUND_TRUTH_COLUMNS = ("id", "answers", "category", *SCORING_COLUMNS)


def _ids_as_strings(table: pa.Table) -> list[str]:
    return [str(v) for v in table.column("id").to_pylist()]


def check_unique_ids(ids: list[str], what: str) -> None:
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            (dupes.append(i) if i in seen else seen.add(i))
        raise ValueError(f"{what} has duplicate ids: {sorted(set(dupes))[:5]}")


def join_ground_truth(predictions: pa.Table, truth: pa.Table) -> pa.Table:
    """One row per ground-truth row, in ground-truth order, with its prediction attached by id.

    A ground-truth row without a prediction becomes an error row (a lost row must lower the score,
    not vanish); a prediction whose id is not in the ground truth is a clear error. Columns keep
    their Arrow types (a map of choice_logprobs, int32 counts).
    """
    pred_ids, truth_ids = _ids_as_strings(predictions), _ids_as_strings(truth)
    check_unique_ids(pred_ids, "predictions")
    check_unique_ids(truth_ids, "ground truth")
    unknown = sorted(set(pred_ids) - set(truth_ids))
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have ids not in the ground truth, e.g. {unknown[:5]}")
    position = {i: k for k, i in enumerate(pred_ids)}
    index = pa.array([position.get(i) for i in truth_ids], pa.int64())
    taken = predictions.take(index)         # a null index: a row of nulls
    # The benchmark's ground truth (answers, category) wins where it has the column; other shared columns
    # (the question as the model saw it) come from the predictions.
    columns = {name: truth.column(name) for name in truth.column_names}
    missing = index.is_null()
    for name in [n for n in predictions.column_names if n not in GROUND_TRUTH_COLUMNS or n not in columns]:
        columns[name] = (_unless(missing, columns[name], taken.column(name)) if name in columns
                         else taken.column(name))
    for name, value in (("finish_reason", "error"), ("error", "no prediction for this id")):
        column = columns.get(name, pa.nulls(len(truth_ids), pa.string()))
        if pa.types.is_null(column.type):
            column = column.cast(pa.string())
        columns[name] = pc.if_else(missing, pa.scalar(value, column.type), column)
    return pa.table(columns)


def _unless(missing: pa.Array, truth: pa.ChunkedArray, predicted: pa.ChunkedArray) -> pa.ChunkedArray:
    """The prediction's values, the ground truth's where a row has no prediction (a shared column:
    the question as the benchmark asks it); the prediction's alone where their types do not convert."""
    try:
        return pc.if_else(missing, truth, predicted.cast(truth.type))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return predicted


def is_error_row(row: dict) -> bool:
    """A row that failed, or has no answer (a predictions file's null): it scores 0, counted in errors."""
    return row.get("error") is not None or row.get("finish_reason") == "error" or row.get("answer") is None


def check_ground_truth(table: pa.Table, metric: str) -> None:
    """Every row needs ground truth the metric can use (answers; option letters for multiple_choice)."""
    if "answers" not in table.column_names:
        raise ValueError("no ground-truth column 'answers' (pass --answers-column, or --input to join by id)")
    if table.num_rows == 0:
        raise ValueError("the benchmark has no rows: nothing to score")
    get_metric(metric)
    needed = [c for c in NEEDED_ROW_COLUMNS.get(metric, ()) if c not in table.column_names]
    if needed:
        raise ValueError(f"{metric} scores with each row's {needed[0]} too: the ground truth has no {needed[0]!r} "
                         "column (--input names the benchmark's file, whose columns are joined by id)")
    missing, unusable = [], []
    for row in table.select(["id", "answers", *present_row_columns(table, metric)]).to_pylist():
        if not as_answer_list(row["answers"]):
            missing.append(str(row["id"]))
            continue
        try:
            score_row(metric, "", row)
        except ValueError as e:
            unusable.append(f"{row['id']}: {e}")
    if missing:
        raise ValueError(f"{len(missing)} rows have no ground-truth answers, e.g. ids {missing[:5]}")
    if unusable:
        raise ValueError(f"{len(unusable)} rows have ground truth {metric} cannot use, e.g. {unusable[:3]}")


def present_row_columns(table: pa.Table, metric: str) -> list[str]:
    """The columns beside the answers that the metric reads, those the table has."""
    return [c for c in ROW_COLUMNS.get(metric, ()) if c in table.column_names]


def _string_typed(table: pa.Table) -> pa.Table:
    """Text columns that hold only nulls get the string type, so every predictions file reads alike."""
    for name in ("answer", "question", "finish_reason", "error"):
        if name in table.column_names and pa.types.is_null(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), name, table.column(name).cast(pa.string()))
    return table


def score_rows(table: pa.Table, metric: str) -> pa.Table:
    """Add `score` (the primary metric) and one column per secondary metric; error rows score 0."""
    check_ground_truth(table, metric)
    table = table.drop_columns([c for c in ("score", *SECONDARY_METRICS, "baseline_answer", "baseline_score")
                                if c in table.column_names])      # an earlier evaluation's, scored again
    secondary = [m for m in SECONDARY_METRICS if m != metric]
    scores: dict[str, list[float]] = {"score": [], **{m: [] for m in secondary}}
    texts = numbers_as_text(table.select([c for c in ("answer", "answers") if c in table.column_names]))
    for row, text in zip(table.to_pylist(), texts.to_pylist()):
        failed, row = is_error_row(row), {**row, **text}
        scores["score"].append(0.0 if failed else score_row(metric, text.get("answer"), row))
        for m in secondary:
            scores[m].append(0.0 if failed else score_row(m, text.get("answer"), row))
    for name, values in scores.items():
        table = table.append_column(name, pa.array(values, pa.float64()))
    return _string_typed(table)


def numbers_as_text(table: pa.Table) -> pa.Table:
    """Float columns (and lists of floats) as Arrow writes them as text: the shortest form of the value
    in its own width (a float32 0.1 is "0.1", not 0.10000000149011612) and 3.0 as "3"; from 1e10 up
    Arrow writes an exponent ("1e+10"), written out here ("10000000000", as a prediction spells it)."""
    for k, field in enumerate(table.schema):
        is_list = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
        value_type = field.type.value_type if is_list else field.type
        if pa.types.is_floating(value_type):
            text = table.column(k).cast(pa.list_(pa.string()) if is_list else pa.string())
            chunks = [_positional_list(chunk) if is_list else _positional(chunk) for chunk in text.chunks]
            table = table.set_column(k, field.name, pa.chunked_array(chunks, text.type))
    return table


def _positional(texts: pa.Array) -> pa.Array:
    if not pc.any(pc.match_substring(texts, "e+")).as_py():
        return texts
    return pa.array([t if t is None or "e+" not in t else format(Decimal(t), "f") for t in texts.to_pylist()],
                    pa.string())


def _positional_list(lists: pa.ListArray) -> pa.ListArray:
    return pa.ListArray.from_arrays(lists.offsets, _positional(lists.values), mask=lists.is_null())


def _mean(values: list[float]) -> float:
    return round(math.fsum(values) / len(values), DIGITS) if values else 0.0


Z95 = 1.959964


def interval95(values: list[float], low: float = 0.0, high: float = 1.0) -> list[float] | None:
    """The 95 % interval of the values' mean (normal approximation: mean +- 1.96 standard errors,
    what a benchmark of n rows can tell apart), within [low, high] (a score's range); None below
    two rows."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    half = Z95 * math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return [round(max(mean - half, low), DIGITS), round(min(mean + half, high), DIGITS)]


def average(values: list[float], groups: list | None = None, low: float = 0.0,
            high: float = 1.0) -> tuple[float, list[float] | None]:
    """The values' mean and its 95 % interval; with `groups` (each value's group), the mean of the
    groups' means (lmms-eval's MMStar average over its l2_category), its interval from the groups'
    own variances (none where a group has one row)."""
    if groups is None:
        return _mean(values), interval95(values, low, high)
    members: dict = {}
    for value, group in zip(values, groups):
        members.setdefault(group, []).append(value)
    if not members:
        return 0.0, None
    means = [math.fsum(g) / len(g) for g in members.values()]
    mean = math.fsum(means) / len(means)
    if min(map(len, members.values())) < 2:         # a group of one row: its variance unknown
        return round(mean, DIGITS), None
    spread = math.fsum(math.fsum((v - m) ** 2 for v in g) / (len(g) - 1) / len(g)
                       for g, m in zip(members.values(), means))
    half = Z95 * math.sqrt(spread) / len(means)
    return round(mean, DIGITS), [round(max(mean - half, low), DIGITS), round(min(mean + half, high), DIGITS)]


def in_number_order(label: str) -> list:
    """A sort key that reads the numbers in a label as numbers: "level 2" before "level 10"."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", label))]


def by_category(rows: list[dict], column: str) -> dict[str, list[dict]]:
    """Rows by their category (None: "(none)"), the categories in the order of their numbers."""
    return _grouped(rows, lambda r: r[column])


def questions_by_category(questions: list[list[dict]], column: str) -> dict[str, list[list[dict]]]:
    """Questions by the category of their first row (a question's copies share it)."""
    return _grouped(questions, lambda q: q[0][column])


def _grouped(items: list, value) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault("(none)" if value(item) is None else str(value(item)), []).append(item)
    return dict(sorted(groups.items(), key=lambda item: in_number_order(item[0])))


def questions(rows: list[dict], metric: str) -> list[list[dict]]:
    """What a score is the mean of: each row alone, or for a circular metric (mmbench) each question
    with its circular copies, its main row (id below 1e6) first."""
    if metric not in CIRCULAR:
        return [[r] for r in rows]
    asked: dict[str, list[dict]] = {}
    for r in rows:
        key = question_of(r["id"])
        copies = asked.setdefault(key, [])
        copies.insert(0, r) if key == str(r["id"]) else copies.append(r)
    return list(asked.values())


def counted_questions(group: list[list[dict]], metric: str) -> dict[str, int]:
    """A circular metric's count of the questions a score is over (its rows counted apart); else none."""
    return {"questions": len(group)} if metric in CIRCULAR else {}


def question_score(question: list[dict], name: str = "score") -> float | None:
    """A question's score: the least of its rows' (right only when every copy is); None where a row's is."""
    values = [r[name] for r in question]
    return None if None in values else min(values)


def groups_of(rows: list[dict], column: str | None) -> list[str] | None:
    """Each row's group of `column` (None where the rows have no such column: no groups)."""
    if column is None or not rows or column not in rows[0]:
        return None
    return ["(none)" if r[column] is None else str(r[column]) for r in rows]


def summarize(scored: pa.Table, metric: str, category_column: str = "category",
              averaged_over: str | None = None) -> dict:
    """The metrics.json document: primary score (and its 95 % interval), all metrics, per-category
    scores (each with its rows and interval: a category of a few rows tells little), rows, errors.
    averaged_over: a column whose groups' means make each score (the mean of means), where the rows
    have it. A circular metric's scores are means over questions, each right only when all its copies are."""
    rows = scored.to_pylist()
    asked = questions(rows, metric)
    groups = groups_of([q[0] for q in asked], averaged_over)
    score, interval = average([question_score(q) for q in asked], groups)
    metrics = {metric: score}
    for m in SECONDARY_METRICS:
        if m != metric:
            metrics[m] = average([question_score(q, m) for q in asked], groups)[0]
    per_category: dict[str, dict] = {}
    if category_column in scored.column_names:
        for c, group in questions_by_category(asked, category_column).items():
            mean, ci = average([question_score(q) for q in group], groups_of([q[0] for q in group], averaged_over))
            per_category[c] = {"score": mean, "rows": sum(map(len, group)), **counted_questions(group, metric),
                               "ci95": ci}
    averaged = {"averaged_over": {"column": averaged_over, "groups": len(set(groups))}} if groups else {}
    return {"metric": metric, "score": score, "ci95": interval, "metrics": metrics, **averaged,
            "per_category": per_category, "rows": len(rows), **counted_questions(asked, metric),
            "errors": sum(is_error_row(r) for r in rows)}
