"""Slots and the waiting queue: who is admitted next, who runs, who is done."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .types import Request


@dataclass
class Sequence:
    """A request while the engine works on it."""
    request: Request
    stop_ids: frozenset[int]
    max_new_tokens: int | None = None        # the request's, or fewer: the room the context leaves
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None                 # why, when finish_reason is "error"
    logprob: float = 0.0                     # sum of the generated tokens' log p, when the request asks for it
    token_logprobs: list[float] = field(default_factory=list, repr=False)    # each token's, with top_logprobs
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list, repr=False)  # each step's top k
    scored: int = 0                          # the prompt's last tokens whose log p are asked (its continuation)
    continuation_logprobs: list[float] | None = None
    ngrams: object | None = field(default=None, repr=False)   # model.engine.ngrams.NGrams, with no_repeat_ngram_size
    constraint_state: tuple | None = None    # a constrained answer's constraint, its state, the tokens it read
    scorer: bool = False                     # it scores a choice of its parent (model.engine.scoring)
    children: list = field(default_factory=list, repr=False)   # (choice, Sequence) scoring its choices
    samples: list = field(default_factory=list, repr=False)    # Sequences of the request's other samples
    companions: list = field(default_factory=list, repr=False)  # Sequences admitted with it, unprefilled (beams)
    beam: object | None = field(default=None, repr=False)      # model.engine.beam_groups.BeamGroup it is a beam of
    parent: "Sequence | None" = field(default=None, repr=False)    # the sequence it scores or samples beside
    emitted: bool = False                    # its result was returned

    @property
    def all_finished(self) -> bool:
        """Finished, and so is every sequence that scores its choices or samples its other answers."""
        return (self.finish_reason is not None and all(c.finish_reason is not None for _, c in self.children)
                and all(s.finish_reason is not None for s in self.samples))

    def __post_init__(self) -> None:
        if self.max_new_tokens is None:
            self.max_new_tokens = self.request.sampling.max_new_tokens

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache, including the newest."""
        return self.prompt_len + len(self.generated)

    @property
    def max_length(self) -> int:
        """Cache positions the sequence may fill: its prompt and every new token it may get."""
        return self.prompt_len + self.max_new_tokens

    def last_token_pending(self) -> bool:
        """One more token reaches max_new_tokens: the sequence ends with it, whatever it is."""
        return len(self.generated) + 1 >= self.max_new_tokens

    def add_logprobs(self, chosen: float, top: list[tuple[int, float]] | None) -> None:
        """The next token's log p, and the step's likeliest tokens' (model.engine.logprobs)."""
        self.logprob += chosen
        k = self.request.sampling.top_logprobs
        if k:
            self.token_logprobs.append(chosen)
            self.top_logprobs.append(top[:k])

    def append(self, token: int) -> bool:
        """Record a new token; True when the sequence is finished."""
        self.generated.append(token)
        params = self.request.sampling
        if token in self.stop_ids and len(self.generated) >= params.min_new_tokens:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None


class Admission(Protocol):
    """Who is admitted, where, at what cost: ArrivalOrder, or model.engine.prefix_cache.SharedPrefixAdmission."""

    def hold(self, seq: Sequence, batch: list[Sequence]) -> bool:
        """Whether `seq` keeps its place in the queue for the next prefill instead of joining `batch`."""
        ...

    def choose_slot(self, seq: Sequence, free: set[int]) -> int:
        """The free slot `seq` takes."""
        ...

    def prefill_tokens(self, seq: Sequence) -> int:
        """Tokens the prefill will run for `seq` (counted against the prefill budget)."""
        ...


class ArrivalOrder:
    """The default admission: nobody held, the lowest free slot (the decode batch, slots 0..highest
    busy, stays short), whole prompts counted."""

    def hold(self, seq: Sequence, batch: list[Sequence]) -> bool:
        return False

    def choose_slot(self, seq: Sequence, free: set[int]) -> int:
        return min(free)

    def prefill_tokens(self, seq: Sequence) -> int:
        return seq.prompt_len


class Scheduler:
    """First come, first served. The lowest free slot is taken so the decode batch (slots
    0..highest busy) stays short; a finished sequence frees its slot at once.

    While sequences run, waiting ones are admitted in groups (a quarter of the slots, or all
    that wait): with requests streaming in, slots free one by one, and a prefill per freed slot
    would cost a device far more than a few decode steps with some slots idle (a prefill of a
    small model is bound by its kernel launches, whatever its size)."""

    def __init__(self, num_slots: int, max_prefill_tokens: int) -> None:
        self.free = set(range(num_slots))
        self.running: dict[int, Sequence] = {}        # slot -> sequence
        self.waiting: deque[Sequence] = deque()
        self.max_prefill_tokens = max_prefill_tokens
        self.admit_group = max(1, num_slots // 4)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, policy: Admission | None = None) -> list[Sequence]:
        """The next waiting sequences that fit in free slots and the prefill token budget (at least
        one), as `policy` (default ArrivalOrder) holds them back, chooses their slots and counts them."""
        policy = policy or ArrivalOrder()
        batch, held, tokens = [], [], 0
        while self.waiting and len(self.free) >= self.slots_needed(self.waiting[0]):
            if batch and policy.hold(self.waiting[0], batch):
                held.append(self.waiting.popleft())
                continue
            n = policy.prefill_tokens(self.waiting[0])
            if batch and tokens + n > self.max_prefill_tokens:
                break
            seq = self.waiting.popleft()
            seq.slot = policy.choose_slot(seq, self.free)
            self.free.remove(seq.slot)
            self.running[seq.slot] = seq
            for companion in seq.companions:
                companion.slot = min(self.free)
                self.free.remove(companion.slot)
                self.running[companion.slot] = companion
            batch.append(seq)
            tokens += n
        self.waiting.extendleft(reversed(held))
        return batch

    def can_admit(self, finishing: int = 0) -> bool:
        """Whether waiting sequences are admitted now (or once `finishing` running ones end)."""
        free, running = len(self.free) + finishing, len(self.running) - finishing
        if not (self.waiting and free >= self.slots_needed(self.waiting[0])):
            return False
        return not running or free >= min(len(self.waiting), self.admit_group)

    @staticmethod
    def slots_needed(seq: Sequence) -> int:
        return 1 + len(seq.companions)

    def release(self, seq: Sequence) -> None:
        del self.running[seq.slot]
        self.free.add(seq.slot)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def decode_batch_size(self) -> int:
        """Rows of the decode step: slots 0..highest busy slot."""
        return max(self.running) + 1 if self.running else 0
