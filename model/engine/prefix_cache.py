"""Prompt prefixes shared by requests about the same image: their K/V computed once.

Rows about one image share their prompt up to the end of its image block (the chat template's
opening and the image's hundreds to thousands of tokens) and differ in the question after it. A
slot's cache rows 0..prompt_len-1 hold its prompt's K/V from its prefill until another request
takes the slot (decode writes only later rows), so a new request naming the same image
(`Request.image_key`) copies the rows of the common prefix from such a slot and prefills only the
rest: no vision tower and no prefill for the image block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .scheduler import Sequence
from .types import Request


@dataclass(frozen=True)
class PrefixSource:
    """Rows 0..length-1 of `slot` hold the K/V of the request's first `length` prompt tokens."""
    slot: int
    length: int


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SlotPrefixes:
    """Which slots hold the prompt of which image. A prefix is shared only if it covers every image
    token of the new prompt (an image's features are the same for equal keys; the text after them
    is the request's own) and leaves at least one token to prefill (its logits start the answer).
    Tensor-parallel ranks see the same requests and slots, so they make the same choices."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self._prompts: dict[int, tuple[str, list[int]]] = {}    # slot -> (image key, prompt ids) in its rows
        self._slots: dict[str, set[int]] = {}             # image key -> slots holding its prompts

    def clear(self) -> None:
        self._prompts.clear()
        self._slots.clear()

    def holds(self, key: str | None) -> bool:
        return bool(self.slots_holding(key))

    def slots_holding(self, key: str | None) -> set[int]:
        """The slots that hold prompts about image `key`."""
        return self._slots.get(key, set())

    def reusable(self, request: Request) -> int:
        """The most prompt tokens of `request` that a slot holds now (0: none)."""
        return max((self._match(request, slot) for slot in self._slots.get(request.image_key, ())), default=0)

    def plan(self, requests: list[Request], slots: list[int]) -> list[PrefixSource | None]:
        """Where each request about to be prefilled into `slots` finds its prefix (None: nowhere).
        This prefill overwrites those slots' rows, but for a request that continues its own slot's
        old prompt: the rows it keeps may serve the others too. The slots' old prompts are then
        forgotten (`remember` tells the new ones after the prefill)."""
        own = [self._match(r, slot) for r, slot in zip(requests, slots)]
        kept = {slot: n for slot, n in zip(slots, own) if n}
        sources = [PrefixSource(slot, n) if n else self._best(r, kept, set(slots))
                   for r, slot, n in zip(requests, slots, own)]
        for slot in slots:
            self._forget(slot)
        return sources

    def remember(self, requests: list[Request], slots: list[int]) -> None:
        """After their prefill: these slots hold these prompts."""
        for request, slot in zip(requests, slots):
            if request.image_key is not None and request.pixel_values is not None:
                self._prompts[slot] = (request.image_key, request.prompt_ids)
                self._slots.setdefault(request.image_key, set()).add(slot)

    def _forget(self, slot: int) -> None:
        key, _ = self._prompts.pop(slot, (None, None))
        if key is not None:
            self._slots[key].discard(slot)
            if not self._slots[key]:
                del self._slots[key]

    def _match(self, request: Request, source: int, rows: int | None = None) -> int:
        """Prompt tokens of `request` whose K/V the first `rows` (default: all) rows of slot
        `source` hold: 0 unless they cover its image and leave a token to run."""
        held = self._prompts.get(source)
        if held is None or request.image_key is None or request.pixel_values is None or held[0] != request.image_key:
            return 0
        ids, image = request.prompt_ids, self.image_token_id
        need = len(ids) - ids[::-1].index(image) if image in ids else 1         # through its last image token
        if held[1][:need] != ids[:need]:                                         # compared at C speed
            return 0
        n = need + common_prefix_length(held[1][need:], ids[need:])
        n = min(n, len(ids) - 1, len(ids) if rows is None else rows)
        return n if n >= need else 0

    def _best(self, request: Request, kept: dict[int, int], taken: set[int]) -> PrefixSource | None:
        best = None
        for source in sorted(self._slots.get(request.image_key, ())):
            # A slot this prefill takes: only the rows its new request keeps.
            n = self._match(request, source, kept.get(source, 0) if source in taken else None)
            if n and (best is None or n > best.length):
                best = PrefixSource(source, n)
        return best


class SharedPrefixAdmission:
    """Admission when prefixes are shared: a request waits one prefill for an earlier request of
    this one about its image (none of whose prompts a slot holds yet) rather than prefill that
    image block again; it counts only the tokens it will run against the prefill budget; and it
    takes a free slot holding its image, else one holding no image that a waiting request asks about."""

    def __init__(self, prefixes: SlotPrefixes, waiting: Iterable[Sequence]) -> None:
        self.prefixes = prefixes
        wanted = {s.request.image_key for s in waiting} - {None}
        self.wanted_slots = set().union(*(prefixes.slots_holding(key) for key in wanted))
        self._batch_keys: set[str | None] = set()       # of the batch's first _seen sequences
        self._seen = 0

    def hold(self, seq: Sequence, batch: list[Sequence]) -> bool:
        self._batch_keys.update(s.request.image_key for s in batch[self._seen:])      # the batch only grows
        self._seen = len(batch)
        key = seq.request.image_key
        return (key is not None and seq.request.pixel_values is not None and not self.prefixes.holds(key)
                and key in self._batch_keys)

    def choose_slot(self, seq: Sequence, free: set[int]) -> int:
        return min(self.prefixes.slots_holding(seq.request.image_key) & free or free - self.wanted_slots or free)

    def prefill_tokens(self, seq: Sequence) -> int:
        return seq.prompt_len - self.prefixes.reusable(seq.request)
