"""Requests in, results out: the engine's public value types."""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from .bad_words import check_bad_words
from .biases import normalized_sequence_bias, normalized_token_ids
from .cutoffs import check_cutoffs
from .json_schema import schema_text_pattern


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 means greedy."""
    max_new_tokens: int = 64                 # 0: no answer (a request that only scores its continuation_ids)
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0              # 0 = no top-k filter
    top_p: float = 1.0          # 1.0 = no nucleus filter
    min_p: float = 0.0          # > 0: no token less probable than min_p x the likeliest (after temperature)
    typical_p: float = 1.0      # < 1: only the tokens whose surprise is nearest the entropy, this much mass
    epsilon_cutoff: float = 0.0   # > 0: no token less probable than this (but the likeliest)
    eta_cutoff: float = 0.0       # > 0: no token less probable than min(eta, sqrt(eta) * exp(-entropy))
    seed: int | None = None     # None = drawn at admission (answer then not reproducible)
    stop_token_ids: tuple[int, ...] | list[int] | None = None   # None = the generation config's eos ids
    repetition_penalty: float = 1.0   # > 1 discourages every token of the prompt and the answer so far
    logprobs: bool = False            # Result.cumulative_logprob: the answer's log-probability under the model
    stop: tuple[str, ...] | list[str] = ()   # strings that end the answer (with the token that completes one)
    choices: tuple[str, ...] | list[str] = ()   # the answer is one of these (after at most one space)
    regex: str | None = None          # the answer matches this expression in full (re.fullmatch's sense)
    json_schema: dict | str | None = None   # the answer is a JSON document the schema (or its text) allows
    choice_logprobs: bool = False     # Result.choice_logprobs: each choice's log p (model.engine.scoring)
    n: int = 1                        # answers sampled for the request (Result.samples; model.engine.samples)
    top_logprobs: int = 0             # Result.top_logprobs: each step's k likeliest tokens and their log p
    no_repeat_ngram_size: int = 0     # > 0: no n-gram of this size twice in prompt + answer (model.engine.ngrams)
    num_beams: int = 1                # > 1: beam search (model.engine.beams; n: the best beams returned)
    length_penalty: float = 1.0       # beam search: a hypothesis ranks by its log p / its length ** this
    early_stopping: bool | str = False   # beam search: True, False or "never", as transformers'
    bad_words_ids: tuple = ()         # token sequences the answer never holds (model.engine.bad_words)
    presence_penalty: float = 0.0     # vLLM's: taken off the logit of each token the answer holds already
    frequency_penalty: float = 0.0    # vLLM's: taken off a token's logit once for each time the answer holds it
    sequence_bias: tuple | dict = ()  # {token id or ids: bias} added before the penalties (model.engine.biases)
    suppress_tokens: tuple = ()       # token ids never taken (stop ids too), as transformers' suppress_tokens
    begin_suppress_tokens: tuple = ()  # token ids not taken as the answer's first token

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "seed"):     # a float would fail a step, not here
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            try:
                object.__setattr__(self, name, operator.index(value))       # numpy's integers too
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 63:     # a row's int64 in the sampler
            raise ValueError(f"seed must be an integer of 64 bits, got {self.seed}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not self.temperature >= 0:       # NaN too: it would sample from NaN scores
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        check_cutoffs(self.typical_p, self.epsilon_cutoff, self.eta_cutoff)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if any(not isinstance(c, str) or not c for c in self.choices):
            raise ValueError(f"choices must be non-empty strings, got {list(self.choices)!r}")
        if sum(map(bool, (self.choices, self.regex is not None, self.json_schema is not None))) > 1:
            raise ValueError("choices, regex and json_schema are three ways to constrain an answer: give one")
        if self.constrained and self.min_new_tokens:
            raise ValueError("min_new_tokens cannot be combined with choices, regex or json_schema (a whole "
                             "answer may come first)")
        if self.json_schema is not None:
            schema_text_pattern(self.json_schema_text)      # a schema it cannot follow is refused here
        if self.choice_logprobs and not self.choices:
            raise ValueError("choice_logprobs scores the request's choices: give some")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.n > 1 and self.greedy and self.num_beams == 1:
            raise ValueError(f"n={self.n} greedy answers would all be the same one: sample them (temperature > 0)")
        if self.num_beams != 1:
            self._check_beams()
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:      # vLLM's range (and OpenAI's)
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.bad_words_ids:
            check_bad_words(self.bad_words_ids, vocab=1 << 62)     # the vocabulary: the engine checks it
            object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in self.bad_words_ids))
        object.__setattr__(self, "sequence_bias", normalized_sequence_bias(self.sequence_bias))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            object.__setattr__(self, name, normalized_token_ids(getattr(self, name), name))

    def _check_beams(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.n > self.num_beams:
            raise ValueError(f"n={self.n} > num_beams={self.num_beams}: beam search returns at most its beams")
        if not self.greedy:
            raise ValueError("beam search with temperature > 0 (beam sampling) is not implemented: "
                             "search with temperature 0 or sample without beams")
        beside = [name for name, given in (("choices", self.choices), ("regex", self.regex is not None),
                                           ("json_schema", self.json_schema is not None),
                                           ("top_logprobs", self.top_logprobs),
                                           ("presence_penalty", self.presence_penalty),
                                           ("frequency_penalty", self.frequency_penalty),
                                           ("max_new_tokens=0", not self.max_new_tokens)) if given]
        if beside:
            raise ValueError(f"beam search cannot be combined with {', '.join(beside)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty reads the tokens seen so far (repetition, presence, frequency)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def follows_answer(self) -> bool:
        """Whether the tokens it may take next depend on its answer so far (a constraint's state,
        the n-grams to ban): no decode step is queued before the last one's tokens are read."""
        return (self.constrained or self.no_repeat_ngram_size > 0 or any(len(w) > 1 for w in self.bad_words_ids)
                or any(len(ids) > 1 for ids, _ in self.sequence_bias))

    @property
    def cut_off(self) -> bool:
        """Whether it sets typical_p, epsilon_cutoff or eta_cutoff."""
        return self.typical_p < 1 or self.epsilon_cutoff > 0 or self.eta_cutoff > 0

    @property
    def constrained(self) -> bool:
        return bool(self.choices) or self.regex is not None or self.json_schema is not None

    @property
    def json_schema_text(self) -> str | None:
        schema = self.json_schema
        return schema if schema is None or isinstance(schema, str) else json.dumps(schema)


@dataclass
class Request:
    """One prompt. pixel_values: float (n_frames, 3, H, W), already normalised; None = text only.
    image_key: names the image (a hash of its file, say): requests with equal keys promise equal
    pixel values, and the engine encodes them once (model.engine.image_cache).
    continuation_ids: tokens after the prompt that are scored, not generated: each one's log p given
    the prompt and those before it (Result.continuation_logprobs), from the prefill; the answer, if
    any, goes on after them (a caption's likelihood: its tokens here, max_new_tokens 0)."""
    request_id: str
    prompt_ids: list[int]
    pixel_values: Tensor | None = None
    pixel_attention_mask: Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_key: str | None = None
    continuation_ids: list[int] | None = None

    def __post_init__(self):
        self.prompt_ids = token_list(self.prompt_ids, self.request_id)
        if self.continuation_ids is not None:
            self.continuation_ids = token_list(self.continuation_ids, self.request_id)


def token_list(ids, request_id: str) -> list[int]:
    """Token ids as a list of ints, from a tensor or array too (the processor's input_ids[0])."""
    if isinstance(ids, list):
        return ids
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if values and isinstance(values[0], list):
        raise ValueError(f"request {request_id!r}: {len(values)} rows of token ids: give one prompt's (input_ids[0])")
    return values


class NonFiniteLogitsError(ArithmeticError):
    """A request's logits held a NaN or an infinity (float16 overflow, broken weights): its answer
    would be noise, so it ends with finish_reason "error" instead."""


def request_name(request_id: str) -> str:
    """A request's id as an error names it: the engine's own sequences of a request (its samples, beams
    and scorers, named `<id>\x1f<kind><i>`) as "'q0' (sample 1)", not by their internal ids."""
    base, _, own = request_id.partition("\x1f")
    kind = own.rstrip("0123456789")
    return repr(base) + (f" ({kind} {own[len(kind):]})" if own else "")


class NoTokenLeftError(ValueError):
    """No token a request may take is left (its constraint's next text spelled only by stop ids, or
    every token it allows kept out by bans, suppressed tokens, biases of -inf, n-grams): it ends with
    finish_reason "error" instead of an answer that breaks its constraint; its batch goes on."""


@dataclass
class Result:
    request_id: str
    token_ids: list[int]
    text: str | None
    finish_reason: Literal["stop", "length", "error"]
    num_prompt_tokens: int
    num_generated_tokens: int
    cumulative_logprob: float | None = None   # sum of the new tokens' log p (raw logits), if asked for
    error: str | None = None                  # "ErrorType: message" when finish_reason is "error"
    choice_logprobs: dict[str, float | None] | None = None   # with SamplingParams.choice_logprobs
    samples: list["Result"] | None = None    # with SamplingParams.n > 1: every answer, this one first
    continuation_logprobs: list[float] | None = None   # with Request.continuation_ids: each one's log p
    token_logprobs: list[float] | None = None          # with top_logprobs: each new token's log p
    top_logprobs: list[list[tuple[int, float]]] | None = None   # with top_logprobs: each step's (id, log p), top k
