"""Rows that ask exactly what another row asked get its answer, computed once.

Scraped datasets hold the same image many times (mirrors, reposts, thumbnails re-encoded to the same
bytes), and a recaptioning job asks each the same prompt: with greedy decoding or beam search their
answers are the same tokens, so the engine answers the first and the others take its result, in
the same batch, in one of the batches in flight beside it, or in a recent one (an LRU of finished
answers). Sampled answers (each row its own seed) are never shared. The key is everything the
answer depends on: the image's bytes (their hash, the image key), the prompt's tokens, the
continuation scored, and every decoding setting but the seed.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace

RECENT_ANSWERS = 4096


def answer_key(request) -> tuple | None:
    """What determines the request's answer, or None where it is drawn (temperature > 0) or its
    image has no key."""
    if not request.sampling.greedy or (request.pixel_values is not None and request.image_key is None):
        return None
    continuation = None if request.continuation_ids is None else tuple(request.continuation_ids)
    return (request.image_key, tuple(request.prompt_ids), continuation, repr(replace(request.sampling, seed=None)))


def took_another_answer(request, result) -> bool:
    """Whether `result` is the answer of another row's request (SharedAnswers hands that row's
    Result over as it is, its request id included)."""
    return getattr(result, "request_id", request.request_id) != request.request_id


class SharedAnswers:
    """Answers requests (index -> Request) through `run` (the same contract, index -> Result or the
    row's exception), each distinct deterministic question once across the calls in flight and the
    RECENT_ANSWERS last answered."""

    def __init__(self, capacity: int = RECENT_ANSWERS) -> None:
        self.capacity = capacity
        self.recent: OrderedDict[tuple, object] = OrderedDict()
        self.pending: dict[tuple, asyncio.Future] = {}
        self.shared = 0             # rows answered by another row's answer

    async def answer(self, requests: dict, run: Callable[[dict], Awaitable[dict]]) -> dict:
        keys = {i: answer_key(r) for i, r in requests.items()}
        results, waiting, asked, owned = {}, {}, {}, {}
        for i, key in keys.items():
            if key is None:
                asked[i] = requests[i]
            elif key in self.recent:
                self.recent.move_to_end(key)
                results[i] = self.recent[key]
            elif key in self.pending:
                waiting[i] = self.pending[key]
            else:
                self.pending[key] = owned[key] = asyncio.get_running_loop().create_future()
                asked[i] = requests[i]
        self.shared += len(results) + len(waiting)
        try:
            answered = await run(asked) if asked else {}
        except BaseException as e:
            # the rows waiting on these questions in other calls fail with it, named, not cancelled with it
            failure = e if isinstance(e, Exception) else RuntimeError(f"the batch asking first was stopped ({e!r})")
            for future in owned.values():
                future.set_exception(failure)
                future.exception()          # retrieved: a future no other call waits on logs nothing
            raise
        finally:
            for key in owned:
                self.pending.pop(key, None)
        for i, result in answered.items():
            key = keys[i]
            if key in owned:
                owned[key].set_result(result)
                self._remember(key, result)
        for i, future in waiting.items():
            try:        # shielded: a waiter's cancel would cancel the asking call's future (and every waiter's)
                results[i] = await asyncio.shield(future)
            except Exception as e:      # the other call's failure: this row's too, not this whole call's
                results[i] = e
        return {**answered, **results}

    def _remember(self, key: tuple, result) -> None:
        if isinstance(result, BaseException) or getattr(result, "finish_reason", None) == "error":
            return      # a failure is the row's (or its step's), not the question's
        self.recent[key] = result
        if len(self.recent) > self.capacity:
            self.recent.popitem(last=False)
