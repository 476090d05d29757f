"""The benchmarks known by name: each one's standard metric, and the instruction lmms-eval appends to
its questions (so that scores stand beside the tables made with it)."""
from __future__ import annotations

import re
from pathlib import PurePosixPath

from evaluation.mmbench import OPTION_COLUMNS

# Benchmark name (found in the input's path, lowercased, without - and _) -> its standard metric.
DATASET_METRICS = {
    "docvqa": "anls", "infovqa": "anls", "infographicvqa": "anls", "stvqa": "anls",
    "chartqa": "relaxed_accuracy", "plotqa": "relaxed_accuracy",
    "mmstar": "mmstar", "mmmu": "mmmu", "mmbench": "mmbench",
    "textvqa": "vqa_accuracy", "vqav2": "vqa_accuracy", "vizwiz": "vqa_accuracy", "okvqa": "vqa_accuracy",
    "demo": "exact_match",
}
DEMO = "demo"           # the bundled demo's held-out rows (demo/data/heldout.parquet)
# Benchmark -> the instruction appended to each question when --prompt-suffix is not given: lmms-eval's
# default post_prompt for the task, so that scores stand beside the tables made with it.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
SINGLE_WORD = "\nAnswer the question with a single word."        # ChartQA's
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
DATASET_SUFFIXES = {
    "docvqa": SHORT_ANSWER, "infovqa": SHORT_ANSWER, "infographicvqa": SHORT_ANSWER, "stvqa": SHORT_ANSWER,
    "chartqa": SINGLE_WORD, "textvqa": SHORT_ANSWER, "vqav2": SHORT_ANSWER,
    "vizwiz": UNANSWERABLE, "okvqa": UNANSWERABLE,
    # MMBench's and MMMU's: lmms-eval puts a line break between their options and this (which begins with one)
    "mmstar": OPTION_LETTER.rstrip("."), "mmmu": "\n" + OPTION_LETTER, "mmbench": "\n" + OPTION_LETTER,
}
OPEN_QUESTION_SUFFIXES = {"mmmu": "\n" + SHORT_ANSWER}     # MMMU's questions without options
# A benchmark whose rows keep their options as one list (MMMU's `options`, a list's text) and their
# images in columns of one each: its metric when the options are there (else the one above).
OPTION_LIST_LAYOUT = {"mmmu": ("options", [f"image_{k}" for k in range(1, 8)])}

CAPITALIZED = {"textvqa", "vizwiz"}     # lmms-eval asks their questions as str.capitalize writes them
# Benchmark -> its own names of the columns jobs.evaluate reads (as the Hugging Face hub files lmms-eval
# reads ship them), taken where the flags leave a column unnamed and the input has no column of the
# default name: question ids (a test server's submission needs them), the ground truth, categories
BENCHMARK_COLUMNS = {
    "docvqa": {"id": "questionId"}, "infovqa": {"id": "questionId"}, "infographicvqa": {"id": "questionId"},
    "textvqa": {"id": "question_id"}, "vqav2": {"id": "question_id"}, "vizwiz": {"id": "question_id"},
    "okvqa": {"id": "question_id"}, "stvqa": {"id": "question_id"},
    "chartqa": {"answers": "answer", "category": "type"}, "mmbench": {"id": "index", "answers": "answer"},
    "mmstar": {"id": "index", "answers": "answer"}, "mmmu": {"answers": "answer"},
}
# Benchmark -> the column whose groups' mean scores lmms-eval averages into its score (MMStar's
# "average": the mean of its 18 l2_category means), where the rows have it
AVERAGED_OVER = {"mmstar": "l2_category"}
# Ground truth beside the answers: the options mmmu and mmbench score with, the groups a benchmark's score
# averages over
SCORING_COLUMNS = sorted({options for options, _ in OPTION_LIST_LAYOUT.values()} | set(OPTION_COLUMNS)
                         | set(AVERAGED_OVER.values()))
# lmms-eval strips MMStar's questions and takes this out of them before its instruction
QUESTION_REMOVALS = {"mmstar": [" Please answer yes or no."]}
# Benchmark -> lmms-eval's max_new_tokens for it (lmms-eval 0.7.3's task files); where a task sets none,
# the model's class decides: 1024, as its idefics2 class (the Idefics family's) takes.
DATASET_MAX_NEW_TOKENS = {"docvqa": 32, "infovqa": 32, "infographicvqa": 32, "stvqa": 32, "chartqa": 16,
                          "vqav2": 16, "mmmu": 128, "mmbench": 1024, "textvqa": 1024, "vizwiz": 1024,
                          "okvqa": 1024, "mmstar": 1024}


def benchmark_in(path: str) -> str | None:
    """The known benchmark named in a path, if any: the file's own name first, then its folders from
    the nearest (textvqa_val.parquet in docvqa_runs/ is TextVQA). A name counts as a word of the part,
    written with or without - and _ (ST-VQA, doc_vqa), not inside a longer word (mytestvqa is not
    ST-VQA); the bundled demo's name only as a folder above the input (textvqa/demo.parquet is TextVQA)."""
    for k, part in enumerate(reversed(PurePosixPath(path.lower()).parts)):
        found = next((dataset for dataset in DATASET_METRICS if (k or dataset != DEMO) and _names_word(part, dataset)),
                     None)
        if found:
            return found
    return None


def _names_word(part: str, dataset: str) -> bool:
    spelled = "[-_ ]?".join(re.escape(letter) for letter in dataset)
    return re.search(f"(?<![a-z]){spelled}(?![a-z])", part) is not None
