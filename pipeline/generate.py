"""Model stage: a replica (one actor; `tensor_parallel_size` devices) streaming its batches through one engine.

Rows arrive grouped by image (pipeline.groups: an image's frames once, with its questions) and
leave one per question. The uint8 frames become float pixel values here, on the model's device,
once per image. Rows that arrive with an error pass straight through; a row the engine refuses
becomes an error row and the rest of the batch is still answered (a failed step's rows are run
one at a time to isolate it: EngineLoop).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import pyarrow as pa

from .checkpoint import local_checkpoint
from .config import PipelineConfig, kept_name
from .dedup import SharedAnswers, took_another_answer
from .faults import crash_always_on, crash_on_load, crash_once_on, hang_once_on
from .groups import IMAGE_FIELDS, ungroup
from .ledger import CrashLedger, Gate, ledger_path, loading_watched
from .replica import load_engine, pick_device, replica_kind, replica_placement_group
from .requests import WHOLE, RowRequests, error_output
from .rows import (CHOICE_LOGPROBS, KEPT, LOGPROB, ROW_SCORED, SAMPLES, SAMPLES_LOGPROB, TOKEN_LOGPROBS, RowError,
                   error_message, output_schema)
from .run_stats import StatsReporter, replica_key
from .structured import answer_field, parsed_answers, parsed_lists

log = logging.getLogger(__name__)
GROUP_REBUILDS = 2            # per batch: a tensor-parallel group whose rank died is rebuilt this often


class Generate(RowRequests):
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
        RowRequests.__init__(self, config, self.encoder, self.device)
        self.ledger, self.gate = CrashLedger(ledger_path("generate")), Gate()
        self.shared, self.stats = SharedAnswers(), StatsReporter(stats)
        self.unreported_kind: str | None = replica_key(replica_kind(self.engine, self.device, tp))
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
        counts = self.shared_counts(requests, results, outputs)
        kind, self.unreported_kind = self.unreported_kind, None     # once a replica: its batches run at once
        if kind:
            counts[kind] = 1
        await self.stats.report(counts)
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

    def finish(self, batch: pa.Table, rows: list[dict], outputs: list[dict | None], results: dict) -> pa.Table:
        for i, result in results.items():
            outputs[i] = (error_output(rows[i], error_message("generate", result))
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
            return error_output(row, f"generate: {result.error}")
        if ROW_SCORED in row:                       # a given answer scored, none generated
            return {**error_output(row, None), "answer": row[ROW_SCORED], "finish_reason": "stop",
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
