"""report.md shows a benchmark's own values (categories, sources) literally: no HTML, links, code or
emphasis that a Markdown viewer would act on."""
from __future__ import annotations

import re

import pytest

from evaluation.baseline import report_lines
from evaluation import report
from evaluation.report import escape_cell, report_markdown

HOSTILE = ["<img src=x onerror=alert(document.domain)>", "<script>alert(1)</script>",
           "`code` [link](javascript:alert(1))", "![i](http://x/t.png)", "*bold* _em_ ~~gone~~", "&lt;b&gt; a\\b"]


@pytest.mark.parametrize("text, cell", [
    ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;"),
    ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
    ("`code` [link](javascript:alert(1))", "\\`code\\` \\[link\\](javascript:alert(1))"),
    ("*bold* _em_ ~~gone~~", "\\*bold\\* \\_em\\_ \\~\\~gone\\~\\~"),
    ("&lt; a\\b", "&amp;lt; a\\\\b"),
    ("a|b", "a\\|b"),
    ("two\nlines\r\nthree", "two lines three"),
    ("(none)", "(none)"),
    ("colour", "colour"),
])
def test_escape_cell_leaves_no_html_or_markdown_syntax(text, cell):
    assert escape_cell(text) == cell


def test_report_tables_show_hostile_categories_literally():
    per_category = {c: {"score": 1.0, "rows": 1, "ci95": None} for c in HOSTILE}
    summary = {"metric": "exact_match", "score": 1.0, "metrics": {"exact_match": 1.0}, "rows": 6, "errors": 0,
               "per_category": per_category}
    comparison = {"source": "b`<script>`.parquet", "rows": 6, "rows_without_baseline": 0, "baseline_rows_unused": 0,
                  "delta": 0.0, "score": 1.0, "baseline_score": 1.0, "ci95": None, "better": 0, "worse": 0,
                  "same": 6, "per_category": {c: {"rows": 1, "score": 1.0, "baseline_score": 1.0, "delta": 0.0,
                                                 "better": 0, "worse": 0} for c in HOSTILE}}
    text = report_markdown({**summary, "baseline": comparison}, {"model": "m`<b>`x"})
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| category", "| metric", "| exact_match"))]
    assert len(rows) == 2 * len(HOSTILE)
    assert not any("<" in row or re.search(r"(?<!\\)[][`*_~]", row) for row in rows), rows
    assert "- model: ``m`<b>`x``" in text and "- baseline: ``b`<script>`.parquet``" in text
    assert report_lines(comparison)[-1].startswith("| &amp;lt;b&amp;gt; a\\\\b |")


@pytest.mark.parametrize("text, span", [("m", "`m`"), ("a`b", "``a`b``"), ("`x", "`` `x ``"), ("x\ny", "`x y`")])
def test_code_span_is_never_ended_by_the_text(text, span):
    assert report.code_span(text) == span
