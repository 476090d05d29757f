"""This run against a baseline's predictions (another checkpoint's, an earlier fine-tune's) on the
same benchmark: both scored with this run's ground truth and metric, row by row, so that the
difference is paired: how much better or worse, with a 95 % interval, which rows changed."""
from __future__ import annotations

import pyarrow as pa

from evaluation.metrics import score_row
from evaluation.report import code_span, escape_cell
from evaluation.scoring import (average, check_unique_ids, counted_questions, groups_of, is_error_row, numbers_as_text,
                                present_row_columns, question_score, questions, questions_by_category)


def baseline_scores(scored: pa.Table, baseline: pa.Table, metric: str) -> pa.Table:
    """`scored` with baseline_answer and baseline_score: the baseline's answer to each row's id,
    scored against this run's ground truth (0 where the baseline's row is an error; null where it
    has no row of that id)."""
    ids = [str(i) for i in baseline.column("id").to_pylist()]
    check_unique_ids(ids, "the baseline's predictions")
    rows = dict(zip(ids, baseline.to_pylist()))
    ours = [str(i) for i in scored.column("id").to_pylist()]
    if rows and ours and rows.keys().isdisjoint(ours):
        raise ValueError(f"the baseline's {len(rows)} predictions share no id with this run's {len(ours)} rows "
                         f"(theirs like {ids[0]!r}, ours like {ours[0]!r}): not an evaluation of the same benchmark?")
    texts = dict(zip(ids, numbers_as_text(baseline.select(["answer"])).column("answer").to_pylist()))
    answers, scores = [], []
    extra = scored.select(present_row_columns(scored, metric)).to_pylist()   # options as the prompt read them
    for row, more in zip(numbers_as_text(scored.select(["id", "answers"])).to_pylist(), extra):
        row.update(more)
        theirs, answer = rows.get(str(row["id"])), texts.get(str(row["id"]))
        answers.append(None if answer is None else str(answer))    # as text, as scored (a float32 0.1: "0.1")
        scores.append(None if theirs is None else 0.0 if is_error_row(theirs) else score_row(metric, answer, row))
    scored = scored.drop_columns([c for c in ("baseline_answer", "baseline_score") if c in scored.column_names])
    return (scored.append_column("baseline_answer", pa.array(answers, pa.string()))
            .append_column("baseline_score", pa.array(scores, pa.float64())))


def paired_difference(now: list[float], then: list[float], groups: list | None = None) -> dict:
    """Mean scores, their difference and its 95 % interval (normal approximation of the paired
    differences' mean), and how many rows scored higher, lower, the same; with `groups`, means of
    the groups' means (scoring.average)."""
    diffs = [a - b for a, b in zip(now, then)]
    delta, interval = average(diffs, groups, -1.0, 1.0)
    return {"rows": len(diffs), "score": average(now, groups)[0], "baseline_score": average(then, groups)[0],
            "delta": delta, "ci95": interval,
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
            "same": sum(d == 0 for d in diffs)}


def compare(scored: pa.Table, source: str, baseline_rows: int, category_column: str = "category",
            averaged_over: str | None = None, metric: str = "") -> dict:
    """metrics.json's `baseline`: the paired comparison over the rows both runs answered, overall
    and per category (means of `averaged_over`'s groups' means, as the scores; a circular metric's
    over the questions both runs answered every copy of), and the rows only one of them has."""
    asked = [q for q in questions(scored.to_pylist(), metric) if question_score(q, "baseline_score") is not None]

    def paired(group: list[list[dict]]) -> dict:
        found = paired_difference([question_score(q) for q in group],
                                  [question_score(q, "baseline_score") for q in group],
                                  groups_of([q[0] for q in group], averaged_over))
        return {**found, "rows": sum(map(len, group)), **counted_questions(group, metric)}

    overall = paired(asked)
    per_category = {}
    if category_column in scored.column_names:
        per_category = {c: paired(g) for c, g in questions_by_category(asked, category_column).items()}
    return {"source": source, **overall, "per_category": per_category,
            "rows_without_baseline": scored.num_rows - overall["rows"],
            "baseline_rows_unused": baseline_rows - overall["rows"]}


def changed_rows(rows: list[dict]) -> list[dict]:
    """The rows whose score differs from the baseline's (the ones worth a look), in their order."""
    return [r for r in rows if r.get("baseline_score") is not None and r["baseline_score"] != r["score"]]


def report_lines(comparison: dict) -> list[str]:
    """report.md's section on the baseline."""
    c = comparison
    interval = "n/a" if c["ci95"] is None else f"[{c['ci95'][0]}, {c['ci95'][1]}]"
    counted = f"questions ({c['questions']}, of {c['rows']} rows)" if "questions" in c else "rows"
    lines = ["## Against the baseline", "", f"- baseline: {code_span(c['source'])}",
             f"- rows compared: {c['rows']} ({c['rows_without_baseline']} without a baseline answer, "
             f"{c['baseline_rows_unused']} baseline answers to ids this run did not answer)",
             f"- delta: {c['delta']} (this run {c['score']}, the baseline {c['baseline_score']}), "
             f"95 % interval {interval}",
             f"- {counted} better / worse / same: {c['better']} / {c['worse']} / {c['same']}", ""]
    if c["per_category"]:
        lines += ["| category | rows | score | baseline | delta | better | worse |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {escape_cell(name)} | {v['rows']} | {v['score']} | {v['baseline_score']} | {v['delta']} "
                  f"| {v['better']} | {v['worse']} |" for name, v in c["per_category"].items()]
    return lines
