"""Evaluation artefacts: metrics.json, report.md, a per-category PNG chart, an HTML gallery."""
from __future__ import annotations

import base64
import html
import io
import json
import random
import re
from pathlib import Path

from evaluation.metrics import as_answer_list

METRICS_FILE, REPORT_FILE, CHART_FILE, GALLERY_FILE = "metrics.json", "report.md", "scores.png", "gallery.html"
# Punctuation that makes Markdown code, emphasis, strike-through, links / images or a table cell's end.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]~|])")


def write_metrics_json(summary: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / METRICS_FILE
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path


def _interval(ci95: list[float] | None) -> str:
    return "n/a" if ci95 is None else f"[{ci95[0]}, {ci95[1]}]"


def code_span(text: object) -> str:
    """`text` as a one-line Markdown code span, shown literally: its fence is longer than any run of
    backticks inside (a value's own backtick would otherwise end the span and let Markdown / HTML in)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def report_markdown(summary: dict, sources: dict[str, str], chart_name: str | None = CHART_FILE) -> str:
    """report.md's text; every number is printed exactly as metrics.json holds it."""
    lines = ["# Evaluation report", ""]
    lines += [f"- {key}: {code_span(value)}" for key, value in sources.items()]
    interval = summary.get("ci95")
    spread = f" (95 % interval [{interval[0]}, {interval[1]}])" if interval else ""
    if summary.get("averaged_over"):
        over = summary["averaged_over"]
        spread += f", the mean of the {over['groups']} {code_span(over['column'])} groups' means"
    lines += [f"- metric: {code_span(summary['metric'])}", f"- score: {summary['score']}{spread}",
              f"- rows: {summary['rows']}", *_questions_line(summary), f"- errors: {summary['errors']} (scored 0)", ""]
    lines += ["## Metrics", "", "| metric | score |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary["metrics"].items()]
    if summary["per_category"]:
        lines += ["", "## Per category", "", "| category | rows | score | 95 % interval |", "|---|---|---|---|"]
        lines += [f"| {escape_cell(c)} | {v['rows']} | {v['score']} | {_interval(v.get('ci95'))} |"
                  for c, v in summary["per_category"].items()]
    if summary.get("baseline"):
        from evaluation.baseline import report_lines

        lines += ["", *report_lines(summary["baseline"])]
    if chart_name:
        lines += ["", f"![{summary['metric']} per category]({chart_name})"]
    return "\n".join(lines) + "\n"


def _questions_line(summary: dict) -> list[str]:
    if "questions" not in summary:
        return []
    return [f"- questions: {summary['questions']} (scores are means over questions: a question counts right only "
            "when the answers to all its circular copies, its options rotated, are)"]


def escape_cell(text: str) -> str:
    """A table cell showing `text` (a benchmark's own value) literally in a Markdown viewer: HTML's special
    characters as entities (no tags), Markdown's link / code / emphasis punctuation and | backslash-escaped,
    line breaks as spaces."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return _MARKDOWN_SYNTAX.sub(r"\\\1", text)


def write_report_md(summary: dict, sources: dict[str, str], out_dir: Path) -> Path:
    path = Path(out_dir) / REPORT_FILE
    path.write_text(report_markdown(summary, sources))
    return path


def write_chart(summary: dict, out_dir: Path) -> Path:
    """Horizontal bars of the primary score per category (one bar, "all", without categories)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on batch machines
    import matplotlib.pyplot as plt

    scores = {c: v["score"] for c, v in summary["per_category"].items()} or {"all": summary["score"]}
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(scores)))
    names = list(scores)[::-1]  # first category on top
    bars = ax.barh(names, [scores[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{scores[n]:.3f}" for n in names], padding=3, fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(summary["metric"])
    ax.set_title(f"{summary['metric']} = {summary['score']:.4f} over {summary['rows']} rows")
    fig.tight_layout()
    path = Path(out_dir) / CHART_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def thumbnail_data_uri(image: object, size: int = 160) -> str | None:
    """A small JPEG data URI of an image cell (bytes, {bytes, path} struct or local path; of a list of
    them, the first), or None."""
    from processing.decode import decode_image, decode_image_file

    if isinstance(image, list):
        image = image[0] if image else None
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    try:    # the rows' own images: untrusted bytes, decoded within the same limits as the job's
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else decode_image_file(image)
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    except Exception:  # a gallery is for looking; an unreadable image is shown as missing
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_rows(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n rows drawn reproducibly, kept in their original order."""
    if n >= len(rows):
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def _gallery_card(row: dict, image: object) -> str:
    thumb = thumbnail_data_uri(image) if image is not None else None
    img = f'<img src="{thumb}" alt="">' if thumb else '<div class="noimg">no image</div>'
    answers = row.get("answers")
    truth = " | ".join(as_answer_list(answers))      # a number too (0, 3.0 as "3"), as the metrics read it
    cells = [("id", row.get("id")), ("question", row.get("question")), ("answer", row.get("answer")),
             ("ground truth", truth), ("score", row.get("score")), ("error", row.get("error")),
             ("baseline answer", row.get("baseline_answer")), ("baseline score", row.get("baseline_score"))]
    body = "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in cells if v is not None)
    verdict = "good" if (row.get("score") or 0) >= 0.5 else "bad"
    return f'<div class="card {verdict}">{img}<dl>{body}</dl></div>'


_STYLE = ("body{font-family:sans-serif;margin:1em}.card{display:inline-block;vertical-align:top;width:340px;"
          "margin:6px;padding:6px;border:2px solid #ccc}.good{border-color:#5a5}.bad{border-color:#c55}"
          "img{max-width:160px;float:left;margin-right:6px}dt{font-weight:bold;font-size:80%}"
          "dd{margin:0 0 4px 0;font-size:90%}.noimg{width:160px;height:60px;background:#eee;float:left}")


def write_gallery(rows: list[dict], images: dict[str, object], summary: dict, out_dir: Path) -> Path:
    """gallery.html: one card per row (thumbnail, question, answer, ground truth, score)."""
    cards = "\n".join(_gallery_card(r, images.get(str(r.get("id")))) for r in rows)
    title = f"{summary['metric']} = {summary['score']} over {summary['rows']} rows ({len(rows)} shown)"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{cards}\n</body></html>\n")
    path = Path(out_dir) / GALLERY_FILE
    path.write_text(page, encoding="utf-8")
    return path
