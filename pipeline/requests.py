"""A row as the engine's request: its decoding settings (the job's, and the row's own from
`sampling_column`), its constraint, bad words, scored text and pixel values. The model stage makes
them; a dry run makes them too, without a model, so that a row whose settings no request takes is an
error row of the rehearsal as of the run."""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import partial
from typing import Callable

import numpy as np
import pyarrow as pa

from .config import SETTABLE, PipelineConfig
from .rows import ROW_CHOICES, ROW_SCORED, ROW_SETTINGS, RowError, error_message, reuse_recent, row_seed

WHOLE = "whole answer"      # a prepared row's: whether a text is a whole answer of its constraint
CONSTRAINTS = {"choices", "regex", "json_schema"}
BAD_WORD_LISTS = 4096        # per replica: the token ids of the last bad-word lists of rows, made once each


class RowRequests:
    """Rows as requests of one engine's device (`encoder`: the checkpoint's processing.RowEncoder)."""

    def __init__(self, config: PipelineConfig, encoder, device) -> None:
        self.config, self.encoder, self.device = config, encoder, device
        self.recent_pixels: OrderedDict = OrderedDict()      # image key -> pixel values
        self._bad_words: OrderedDict[tuple[str, ...], tuple] = OrderedDict()   # words -> their token ids (LRU)

    def prepare(self, batch: pa.Table, images: list[dict], group_of) -> tuple[list[dict], list[dict | None], dict]:
        """The batch's rows (each with its group's image: `images[group_of[i]]`, shared, not copied),
        their outputs so far (rows that arrived with an error, or failed to become a request), and
        the engine requests of the others (row index -> Request)."""
        rows = batch.select(["id", "question", "input_ids", "error"] +
                            [c for c in (ROW_CHOICES, ROW_SETTINGS, ROW_SCORED) if c in batch.column_names]).to_pylist()
        for row, group in zip(rows, group_of):
            row.update(images[group])
        outputs: list[dict | None] = [error_output(r, r["error"]) if r["error"] else None for r in rows]
        requests = {}
        for i in [i for i, out in enumerate(outputs) if out is None]:
            try:
                requests[i] = self.request(rows[i])
            except Exception as e:
                outputs[i] = error_output(rows[i], error_message("prepare", e))
        return rows, outputs, requests

    def request(self, row: dict):
        from model.engine import Request, SamplingParams

        c = self.config
        if c.score_column is not None:
            return Request(str(row["id"]), row["input_ids"], self.pixel_values(row), image_key=row["image_key"],
                           continuation_ids=self.scored_ids(row.get(ROW_SCORED)),
                           sampling=SamplingParams(max_new_tokens=0))
        settings = dict(max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens, temperature=c.temperature,
                        top_p=c.top_p, top_k=c.top_k, min_p=c.min_p, typical_p=c.typical_p,
                        epsilon_cutoff=c.epsilon_cutoff, eta_cutoff=c.eta_cutoff,
                        repetition_penalty=c.repetition_penalty, presence_penalty=c.presence_penalty,
                        frequency_penalty=c.frequency_penalty, no_repeat_ngram_size=c.no_repeat_ngram_size,
                        num_beams=c.num_beams, length_penalty=c.length_penalty, early_stopping=c.early_stopping,
                        stop=c.stop, choices=row.get(ROW_CHOICES) or c.choices, bad_words=c.bad_words,
                        regex=c.regex, json_schema=c.json_schema, seed=row_seed(c.seed, row["id"]))
        own = given_settings(row.get(ROW_SETTINGS))
        if own.keys() & CONSTRAINTS:        # a row's own constraint replaces the job's
            settings.update(choices=(), regex=None, json_schema=None)
        settings.update(own)
        if settings["max_new_tokens"] == 0:        # the engine's refusal, found where a dry run finds it too
            raise RowError("the row's max_new_tokens 0 answers nothing")
        choices, stop = texts(settings.pop("choices")), texts(settings.pop("stop"))
        bad_words = self.bad_word_ids(texts(settings.pop("bad_words"))) + tuple(map(tuple, c.bad_words_ids))
        settings["min_new_tokens"] = c.min_new_tokens_for(len(row["input_ids"]), settings["min_new_tokens"],
                                                          settings["max_new_tokens"])
        sampling = SamplingParams(**settings, stop=stop, choices=choices, bad_words_ids=bad_words,
                                  sequence_bias=c.sequence_bias, suppress_tokens=c.suppress_tokens,
                                  begin_suppress_tokens=c.begin_suppress_tokens,
                                  logprobs=c.logprobs, choice_logprobs=c.choice_logprobs and bool(choices), n=c.samples,
                                  top_logprobs=c.top_logprobs)
        row[WHOLE] = whole_answer(sampling)
        return Request(str(row["id"]), row["input_ids"], self.pixel_values(row), sampling=sampling,
                       image_key=row["image_key"])

    def bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """The token sequences of bad words, as vLLM makes them: each word as written and after a
        space (how it is tokenized inside a sentence), each once."""
        def spell() -> tuple[tuple[int, ...], ...]:
            encode = self.encoder.tokenizer.encode
            spelled = [encode(text, add_special_tokens=False) for word in words
                       for text in (word.strip(), " " + word.strip())]
            return tuple(dict.fromkeys(tuple(ids) for ids in spelled if ids))

        # rows' own bad words (--sampling-column) may all differ: the recent lists, not every one
        return reuse_recent(self._bad_words, words, spell, keep=BAD_WORD_LISTS)

    def scored_ids(self, text: str | None) -> list[int]:
        """The tokens of a text scored as the answer: after one space, as the model writes answers
        after the generation prompt ("Assistant:"), unless the text begins with one."""
        if not text:
            raise RowError("the row has no text to score")
        spelled = text if text[:1].isspace() else " " + text
        return self.encoder.tokenizer.encode(spelled, add_special_tokens=False)

    def pixel_values(self, row: dict):
        """The row's frames as pixel values on the device, converted once for consecutive rows
        about the same image (the engine does not mutate them)."""
        def convert():
            frames = np.frombuffer(bytearray(row["frames"]), dtype=np.uint8).reshape(row["frames_shape"])
            return self.encoder.pixel_values(frames, device=self.device)
        return reuse_recent(self.recent_pixels, row["image_key"], convert)


def error_output(row: dict, message: str | None) -> dict:
    """The output of a row that has no answer (`message`: why)."""
    prompt = row.get("input_ids")
    return {"question": row["question"], "answer": None, "finish_reason": "error", "error": message,
            "num_prompt_tokens": len(prompt) if prompt else 0, "num_generated_tokens": 0, "answer_logprob": None,
            "choice_logprobs": None, "samples": None, "samples_finish_reason": None,
            "samples_num_generated_tokens": None, "samples_logprob": None, "token_logprobs": None}


def texts(value) -> tuple:
    """A setting of texts (stop, choices, bad_words) as a tuple: one text alone, as the config reads it."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def given_settings(cell) -> dict:
    """The settings a row sets (`sampling_column`): a struct's non-null fields, or a JSON object's."""
    if cell is None:
        return {}
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise RowError(f"the row's settings are not JSON: {e}") from None
        if not isinstance(cell, dict):
            raise RowError(f"the row's settings must be a JSON object, got {type(cell).__name__}")
        unknown = sorted(cell.keys() - SETTABLE.keys())
        if unknown:
            raise RowError(f"the row's settings name {unknown[0]!r}, not one a row may set "
                           f"({', '.join(SETTABLE)})")
    return {k: checked_setting(k, v) for k, v in cell.items() if v is not None}


FLOAT32_MAX = float(np.finfo(np.float32).max)
SETTING_KINDS = {   # kind -> (what a value must be, the test): JSON text holds anything ("0.7" for a number)
    "integer": ("an integer of 64 bits", lambda v: type(v) is int and -2 ** 63 <= v < 2 ** 63),
    "number": ("a number within float32's range", lambda v: type(v) in (int, float) and abs(v) <= FLOAT32_MAX),
    "text": ("a text", lambda v: isinstance(v, str)),
    "texts": ("a text or a list of texts", lambda v: isinstance(v, str) or (
        isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v))),
}


def checked_setting(name: str, value):
    """A row's setting as the engine can take it, else a row error naming it (its step would fail
    with a message naming none: "'>=' not supported between instances of 'str' and 'int'")."""
    what, holds = SETTING_KINDS[SETTABLE[name]]
    if not holds(value):
        raise RowError(f"the row's setting {name!r} must be {what}, got {value!r}")
    return value


def whole_answer(sampling) -> Callable[[str], bool] | None:
    """Whether a text is a whole answer of the request's constraint (None: it has none)."""
    from model.engine.automaton import automaton_of, matches
    from model.engine.json_schema import schema_text_pattern

    if sampling.choices:
        return set(sampling.choices).__contains__
    if sampling.regex is None and sampling.json_schema is None:
        return None
    pattern = sampling.regex if sampling.regex is not None else schema_text_pattern(sampling.json_schema_text)
    automaton_of(pattern)       # a pattern no automaton follows fails its row here (a dry run's too), not in a step
    return partial(matches, pattern)
