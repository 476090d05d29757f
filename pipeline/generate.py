"""Model stage: a replica (one actor; `tensor_parallel_size` devices) streaming its batches through one engine.

Rows arrive grouped by image (pipeline.groups: an image's frames once, with its questions) and
leave one per question. The uint8 frames become float pixel values here, on the model's device,
once per image. Rows that arrive with an error pass straight through; a row the engine refuses
becomes an error row and the rest of the batch is still answered (a failed step's rows are run
one at a time to isolate it: EngineLoop).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from functools import partial
from typing import Callable

import numpy as np
import pyarrow as pa

from .checkpoint import local_checkpoint
from .config import SETTABLE, PipelineConfig, kept_name
from .dedup import SharedAnswers, took_another_answer
from .faults import crash_always_on, crash_on_load, crash_once_on, hang_once_on
from .groups import IMAGE_FIELDS, ungroup
from .ledger import CrashLedger, Gate, ledger_path, loading_watched
from .replica import load_engine, pick_device, replica_placement_group
from .rows import (CHOICE_LOGPROBS, KEPT, LOGPROB, ROW_CHOICES, ROW_SCORED, ROW_SETTINGS, SAMPLES, SAMPLES_LOGPROB,
                   TOKEN_LOGPROBS, RowError, error_message, output_schema, reuse_recent, row_seed)
from .run_stats import StatsReporter
from .structured import answer_field, parsed_answers, parsed_lists

log = logging.getLogger(__name__)
WHOLE = "whole answer"      # a prepared row's: whether a text is a whole answer of its constraint
CONSTRAINTS = {"choices", "regex", "json_schema"}
GROUP_REBUILDS = 2            # per batch: a tensor-parallel group whose rank died is rebuilt this often
BAD_WORD_LISTS = 4096        # per replica: the token ids of the last bad-word lists of rows, made once each


class Generate:
    """The model stage. A replica takes several batches at once (Ray Data's concurrent calls,
    `calls_in_flight`) and their rows share one engine's decode steps, so a finished row's slot goes
    to the next batch's rows instead of idling until its own batch's longest answer ends: through
    an EngineLoop here (one device), or rank 0's (a tensor-parallel group: RayTPGroup.answer)."""

    def __init__(self, config: PipelineConfig, rank: dict | None = None, stats: str | None = None):
        from model.engine.loop import EngineLoop
        from processing import RowEncoder

        self.config, self.device = config, pick_device(config)
        self.rank = rank or {"CPU": 1.0}
        with loading_watched(ledger_path("generate-load")):
            crash_on_load()
            self.folder = local_checkpoint(config.model, config.storage_options)
            self.encoder = RowEncoder.from_pretrained(self.folder, image_backend=config.image_backend,
                                                      **config.image_settings())
            tp = config.tensor_parallel_size
            self.placement = replica_placement_group(self.rank, tp) if tp > 1 else None
            self.engine = self.load() if tp == 1 else self.load_group()
        self.loop = EngineLoop(self.engine, stall_timeout_s=config.step_timeout_s) if tp == 1 else None
        self.recent_pixels: OrderedDict = OrderedDict()      # image key -> pixel values
        self._bad_words: OrderedDict[tuple[str, ...], tuple] = OrderedDict()   # words -> their token ids (LRU)
        self.ledger, self.gate = CrashLedger(ledger_path("generate")), Gate()
        self.shared, self.stats = SharedAnswers(), StatsReporter(stats)
        if tp > 1:
            self.device = "cpu"  # this actor holds no device; the ranks move the pixel values to theirs

    def load(self):
        return load_engine(self.config, self.device, self.encoder.tokenizer, self.rank, self.placement, self.folder)

    def load_group(self):
        """A tensor-parallel group, built again where a rank dies while it starts (GROUP_REBUILDS times)."""
        from model.parallel.ray_group import TPGroupBroken

        for attempt in range(GROUP_REBUILDS + 1):
            try:
                return self.load()
            except TPGroupBroken as e:
                if attempt == GROUP_REBUILDS:
                    raise
                log.warning("replica: %s; building its tensor-parallel group again (attempt %d)", e, attempt + 2)

    async def __call__(self, groups: pa.Table) -> pa.Table:
        batch, group_of = ungroup(groups)
        crash_once_on(batch.column("id").to_pylist())
        if self.loop is not None:
            hang_once_on(self.engine, batch.column("id").to_pylist())
        rows, outputs, requests = self.prepare(batch, groups.select(list(IMAGE_FIELDS)).to_pylist(), group_of)
        results = await self.answer_tracked(rows, requests)
        table = self.finish(batch, rows, outputs, results)
        await self.stats.report(self.shared_counts(requests, results, outputs))
        return table

    async def answer_tracked(self, rows: list[dict], requests: dict) -> dict:
        """answer(), with the rows in flight on the ledger: rows that were in flight when an earlier
        process of this replica died run alone, and those that died with it alone too often fail."""
        names = {i: str(rows[i]["id"]) for i in requests}
        suspects = [i for i in requests if self.ledger.suspect(names[i])]
        results = {}
        ordinary = {i: r for i, r in requests.items() if i not in suspects}
        if ordinary:
            async with self.gate.shared():
                results.update(await self.answer_logged(ordinary, names, alone=False))
        for i in suspects:
            if self.ledger.condemned(names[i]):
                results[i] = RowError(self.ledger.verdict(names[i]))
                continue
            async with self.gate.alone():
                results.update(await self.answer_logged({i: requests[i]}, names, alone=True))
        return results

    async def answer_logged(self, requests: dict, names: dict, alone: bool) -> dict:
        logged = [names[i] for i in requests]
        with self.ledger.working(logged, alone):
            crash_always_on("generate", logged)
            return await self.answer(requests)

    def prepare(self, batch: pa.Table, images: list[dict], group_of) -> tuple[list[dict], list[dict | None], dict]:
        """The batch's rows (each with its group's image: `images[group_of[i]]`, shared, not copied),
        their outputs so far (rows that arrived with an error, or failed to become a request), and
        the engine requests of the others (row index -> Request)."""
        rows = batch.select(["id", "question", "input_ids", "error"] +
                            [c for c in (ROW_CHOICES, ROW_SETTINGS, ROW_SCORED) if c in batch.column_names]).to_pylist()
        for row, group in zip(rows, group_of):
            row.update(images[group])
        outputs: list[dict | None] = [self.error_output(r, r["error"]) if r["error"] else None for r in rows]
        requests = {}
        for i in [i for i, out in enumerate(outputs) if out is None]:
            try:
                requests[i] = self.request(rows[i])
            except Exception as e:
                outputs[i] = self.error_output(rows[i], error_message("prepare", e))
        return rows, outputs, requests

    def finish(self, batch: pa.Table, rows: list[dict], outputs: list[dict | None], results: dict) -> pa.Table:
        for i, result in results.items():
            outputs[i] = (self.error_output(rows[i], error_message("generate", result))
                          if isinstance(result, Exception) else self.answer_output(rows[i], result))
        return self.to_table(batch, outputs)

    def shared_counts(self, requests: dict, results: dict, outputs: list[dict]) -> dict[str, int]:
        """The batch's rows that took another row's answer, and the generated tokens their outputs hold."""
        shared = [i for i, result in results.items() if took_another_answer(requests[i], result)]
        if self.config.samples > 1:
            tokens = sum(sum(outputs[i]["samples_num_generated_tokens"] or ()) for i in shared)
        else:
            tokens = sum(outputs[i]["num_generated_tokens"] for i in shared)
        return {"shared_answer_rows": len(shared), "shared_answer_tokens": tokens}

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

    async def answer(self, requests: dict) -> dict:
        """index -> Result, or the exception of that row alone; a question asked again (same image,
        prompt and deterministic settings) is answered once (pipeline.dedup)."""
        return await self.shared.answer(requests, self.answer_each)

    async def answer_each(self, requests: dict) -> dict:
        if self.loop is not None:
            return await asyncio.wrap_future(self.loop.submit(requests))
        return await self.answer_on_group(requests)

    async def answer_on_group(self, requests: dict) -> dict:
        """A tensor-parallel group that lost a rank is rebuilt (same placement group) and the batch
        retried; past GROUP_REBUILDS the rows become error rows naming the dead rank. The batches in
        flight all see the loss: the first rebuilds, the others retry on its new group."""
        from model.parallel.ray_group import TPGroupBroken

        error = None
        for attempt in range(GROUP_REBUILDS + 1):
            group = None
            try:
                if self.engine is None:
                    self.engine = self.load()       # a rank may die as the new group starts, too
                group = self.engine
                return await group.answer(requests)
            except TPGroupBroken as e:
                log.warning("replica: %s; rebuilding its tensor-parallel group (attempt %d)", e, attempt + 1)
                if group is not None and self.engine is group:
                    group.close()
                    self.engine = None
                error = e
        return dict.fromkeys(requests, error)

    @classmethod
    def answer_output(cls, row: dict, result) -> dict:
        if result.finish_reason == "error":        # the engine's own verdict (model.engine.NonFiniteLogitsError)
            return cls.error_output(row, f"generate: {result.error}")
        if ROW_SCORED in row:                       # a given answer scored, none generated
            return {**cls.error_output(row, None), "answer": row[ROW_SCORED], "finish_reason": "stop",
                    "num_prompt_tokens": result.num_prompt_tokens - len(result.continuation_logprobs),
                    "num_generated_tokens": len(result.continuation_logprobs),
                    "answer_logprob": sum(result.continuation_logprobs)}
        samples = result.samples or [result]
        return {"question": row["question"], "answer": answer_text(result, row.get(WHOLE)),
                "finish_reason": result.finish_reason, "error": None,
                "num_prompt_tokens": result.num_prompt_tokens, "num_generated_tokens": result.num_generated_tokens,
                "answer_logprob": result.cumulative_logprob, "choice_logprobs": result.choice_logprobs,
                "samples": [answer_text(s, row.get(WHOLE)) for s in samples],
                "samples_finish_reason": [s.finish_reason for s in samples],
                "samples_num_generated_tokens": [s.num_generated_tokens for s in samples],
                "samples_logprob": [s.cumulative_logprob for s in samples], "token_logprobs": token_steps(result)}

    @staticmethod
    def error_output(row: dict, message: str | None) -> dict:
        prompt = row.get("input_ids")
        return {"question": row["question"], "answer": None, "finish_reason": "error", "error": message,
                "num_prompt_tokens": len(prompt) if prompt else 0, "num_generated_tokens": 0, "answer_logprob": None,
                "choice_logprobs": None, "samples": None, "samples_finish_reason": None,
                "samples_num_generated_tokens": None, "samples_logprob": None, "token_logprobs": None}

    def to_table(self, batch: pa.Table, outputs: list[dict]) -> pa.Table:
        c = self.config
        kept = [batch.schema.field(KEPT + name).with_name(kept_name(name)) for name in c.keep_columns]
        several = c.samples > 1
        extra = ([LOGPROB] * (c.logprobs or c.score_column is not None) + [CHOICE_LOGPROBS] * c.choice_logprobs
                 + SAMPLES * several + [SAMPLES_LOGPROB] * (several and c.logprobs)
                 + [TOKEN_LOGPROBS] * bool(c.top_logprobs))
        parsed = [] if c.json_schema is None else [answer_field(c.json_schema)]
        parsed += [pa.field("samples_json", pa.list_(parsed[0].type))] if parsed and several else []
        schema = output_schema(batch.schema.field("id").type, kept, extra + parsed)
        columns = [batch.column("id")]
        for f in list(schema)[1:len(schema) - len(kept) - len(parsed)]:
            columns.append(pa.array([o[f.name] for o in outputs], type=f.type))
        if parsed:
            columns.append(parsed_answers([o["answer"] for o in outputs], [o["finish_reason"] for o in outputs],
                                          parsed[0]))
        if len(parsed) > 1:
            columns.append(parsed_lists([o["samples"] for o in outputs], [o["samples_finish_reason"] for o in outputs],
                                        parsed[0], parsed[1]))
        columns += [batch.column(KEPT + name) for name in c.keep_columns]
        return pa.Table.from_arrays(columns, schema=schema)


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


def token_steps(result) -> list[dict] | None:
    """The TOKEN_LOGPROBS cells of an answer: each token's id and log p, the step's top ids and log p."""
    if result.top_logprobs is None:
        return None
    return [{"id": token, "logprob": chosen, "top_ids": [i for i, _ in top], "top_logprobs": [v for _, v in top]}
            for token, chosen, top in zip(result.token_ids, result.token_logprobs, result.top_logprobs)]


def answer_text(result, whole: Callable[[str], bool] | None = None) -> str | None:
    """The answer as the output keeps it: stripped, or, where a constraint made it (`whole`: whether a
    text is a whole answer of it), as it made it, without only the space a model may write first (a
    pattern may ask for spaces and newlines); None for a sample that ended in an error."""
    if result.finish_reason == "error":
        return None
    text = result.text or ""
    if whole is None:
        return text.strip()
    cut = text[1:] if text.startswith(" ") else text
    return cut if result.finish_reason != "stop" or whole(cut) else text


def whole_answer(sampling) -> Callable[[str], bool] | None:
    """Whether a text is a whole answer of the request's constraint (None: it has none)."""
    from model.engine.automaton import matches
    from model.engine.json_schema import schema_text_pattern

    if sampling.choices:
        return set(sampling.choices).__contains__
    if sampling.regex is None and sampling.json_schema is None:
        return None
    return partial(matches, sampling.regex if sampling.regex is not None else
                   schema_text_pattern(sampling.json_schema_text))
