"""Prompt prefixes shared between requests: their K/V computed once.

Rows about one image share their prompt up to the end of its image block (the chat template's
opening and the image's hundreds to thousands of tokens) and differ in the question after it; rows
with a long system prompt share their prompt's text before the first image whatever the image. A
slot's cache rows 0..prompt_len-1 hold its prompt's K/V from its prefill until another request
takes the slot (decode writes only later rows), so a new request naming the same image
(`Request.image_key`), or whose prompt begins with the same text (`MIN_SHARED_TEXT` tokens or
more before its first image), copies the rows of the common prefix from such a slot and prefills
only the rest. K/V at a position depend only on the tokens up to it (and the image features among
them), so copied rows are the rows the request would have computed.
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


# Shorter text before an image (a chat template's opening: a few tokens) is not worth a copy and a
# masked attention instead of a plain causal one; a system prompt is.
MIN_SHARED_TEXT = 64
# Slots holding one text are alike (a system prompt's rows): a few of the latest that this prefill
# does not take are asked, not all.
TEXT_SOURCES_ASKED = 8


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """By halving, comparing slices at C speed."""
    low, high = 0, min(len(a), len(b))              # a[:low] == b[:low]; a[:high] != b[:high] or high is the end
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def text_head(request: Request, image_token_id: int) -> tuple[int, ...] | None:
    """The first MIN_SHARED_TEXT prompt tokens, when the prompt has an image after them: requests
    with equal heads share at least those tokens' K/V, whatever their images."""
    if request.pixel_values is None:
        return None
    head = request.prompt_ids[:MIN_SHARED_TEXT]
    return tuple(head) if len(head) == MIN_SHARED_TEXT and image_token_id not in head else None


class SlotPrefixes:
    """Which slots hold the prompt of which image, or which text before an image. A prefix through
    an image is shared only if it covers every image token of the new prompt (an image's features
    are the same for equal keys; the text after them is the request's own); a text prefix (at least
    MIN_SHARED_TEXT tokens) stops before the first image token. Either leaves at least one token to
    prefill (its logits start the answer). Tensor-parallel ranks see the same requests and slots,
    so they make the same choices."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self._prompts: dict[int, tuple[str | None, list[int]]] = {}   # slot -> (image key, prompt ids) in its rows
        self._slots: dict[str, set[int]] = {}             # image key -> slots holding its prompts
        self._heads: dict[int, tuple[int, ...]] = {}      # slot -> its prompt's text head
        self._head_slots: dict[tuple[int, ...], dict[int, None]] = {}    # text head -> slots, oldest first

    def clear(self) -> None:
        for index in (self._prompts, self._slots, self._heads, self._head_slots):
            index.clear()

    def holds(self, key: str | None) -> bool:
        return bool(self.slots_holding(key))

    def holds_text(self, head: tuple[int, ...] | None) -> bool:
        return head in self._head_slots

    def slots_holding(self, key: str | None) -> set[int]:
        """The slots that hold prompts about image `key`."""
        return self._slots.get(key, set())

    def head_of(self, request: Request) -> tuple[int, ...] | None:
        return text_head(request, self.image_token_id)

    def reusable(self, request: Request) -> int:
        """The most prompt tokens of `request` that a slot holds now (0: none)."""
        best = self._best(request, {}, set())
        return 0 if best is None else best.length

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
            self.forget(slot)
        return sources

    def remember(self, requests: list[Request], slots: list[int]) -> None:
        """After their prefill: these slots hold these prompts."""
        for request, slot in zip(requests, slots):
            head = self.head_of(request)
            keyed = request.image_key is not None and request.pixel_values is not None
            if keyed or head is not None:
                self._prompts[slot] = (request.image_key if keyed else None, request.prompt_ids)
            if keyed:
                self._slots.setdefault(request.image_key, set()).add(slot)
            if head is not None:
                self._heads[slot] = head
                self._head_slots.setdefault(head, {})[slot] = None

    def forget(self, slot: int) -> None:
        """Slot `slot` no longer holds a prompt to share."""
        key, _ = self._prompts.pop(slot, (None, None))
        if key is not None:
            self._slots[key].discard(slot)
            if not self._slots[key]:
                del self._slots[key]
        head = self._heads.pop(slot, None)
        if head is not None:
            del self._head_slots[head][slot]
            if not self._head_slots[head]:
                del self._head_slots[head]

    def _match(self, request: Request, source: int, rows: int | None = None) -> int:
        """Prompt tokens of `request` whose K/V the first `rows` (default: all) rows of slot
        `source` hold: through its images (same image key) or its text before them; else 0."""
        head = self.head_of(request)
        shares_text = head is not None and self._heads.get(source) == head
        return max(self._match_image(request, source, rows), self._match_text(request, source, rows) if shares_text else 0)

    def _match_image(self, request: Request, source: int, rows: int | None = None) -> int:
        """Through the prompt's last image token at least, leaving a token to run; else 0."""
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

    def _match_text(self, request: Request, source: int, rows: int | None = None) -> int:
        """The text before the prompt's first image that slot `source` holds (it holds the same head)."""
        ids = request.prompt_ids
        before_image = ids.index(self.image_token_id) if self.image_token_id in ids else len(ids) - 1
        n = common_prefix_length(self._prompts[source][1][:before_image], ids[:before_image])
        return min(n, len(ids) - 1, len(ids) if rows is None else rows)

    def _best(self, request: Request, kept: dict[int, int], taken: set[int]) -> PrefixSource | None:
        def rows(source: int) -> int | None:        # a slot this prefill takes: only the rows its new request keeps
            return kept.get(source, 0) if source in taken else None

        best = None
        for source in sorted(self._slots.get(request.image_key, ())):
            n = self._match_image(request, source, rows(source))
            if n and (best is None or n > best.length):
                best = PrefixSource(source, n)
        asked, head = 0, self.head_of(request)
        for source in reversed(self._head_slots.get(head, {})) if head is not None else ():      # latest first
            n = self._match_text(request, source, rows(source))
            if n and (best is None or n > best.length):
                best = PrefixSource(source, n)
            asked += source not in taken
            if asked == TEXT_SOURCES_ASKED:
                break
        return best


class SharedPrefixAdmission:
    """Admission when prefixes are shared: a request waits one prefill for an earlier request of
    this one about its image, or with its text before the image (none of whose prompts a slot holds
    yet), rather than prefill that image block or text again; it counts only the tokens it will run
    against the prefill budget; and it takes a free slot holding its image, else one holding no
    image that a waiting request asks about."""

    def __init__(self, prefixes: SlotPrefixes, waiting: Iterable[Sequence]) -> None:
        self.prefixes = prefixes
        wanted = {s.request.image_key for s in waiting} - {None}
        self.wanted_slots = set().union(*(prefixes.slots_holding(key) for key in wanted))
        self._batch_keys: set[str | None] = set()       # of the batch's first _seen sequences
        self._batch_heads: set[tuple[int, ...] | None] = set()
        self._seen = 0

    def hold(self, seq: Sequence, batch: list[Sequence]) -> bool:
        for s in batch[self._seen:]:                    # the batch only grows
            self._batch_keys.add(s.request.image_key)
            self._batch_heads.add(self.prefixes.head_of(s.request))
        self._seen = len(batch)
        request = seq.request
        key = request.image_key if request.pixel_values is not None else None
        if key is not None and self.prefixes.holds(key):
            return False                                # it copies its image's prefix now
        head = self.prefixes.head_of(request)
        return ((key is not None and key in self._batch_keys)
                or (head is not None and not self.prefixes.holds_text(head) and head in self._batch_heads))

    def choose_slot(self, seq: Sequence, free: set[int]) -> int:
        return min(self.prefixes.slots_holding(seq.request.image_key) & free or free - self.wanted_slots or free)

    def prefill_tokens(self, seq: Sequence) -> int:
        return seq.prompt_len - self.prefixes.reusable(seq.request)
