"""Per-row sampling on the device: repetition, presence and frequency penalties, greedy, temperature,
top-k, top-p, min-p, typical-p, epsilon and eta cutoffs, min-new-tokens.

Randomness is counter-based: the noise for (seed, step, token) is a hash of those three integers,
so a row's sample depends on its own logits, seed and step only, never on its batch neighbours or
on a global generator, and no host sync is needed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compiling import CompiledOrEager
from .types import SamplingParams

_M32 = 0xFFFFFFFF
NON_FINITE = -1     # the token of a row whose logits hold a NaN or an infinity
NO_TOKEN_LEFT = -2  # the token of a row of which no allowed token was left to take


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 lanes; multiplication wraps mod 2^64, then masked."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, steps: Tensor, tokens: Tensor | int) -> Tensor:
    """(B, V) float32 uniforms in (0, 1) from (seed, step, token): for the token ids (B, K) given,
    or for every token of a vocabulary of that size. A token's noise is the same either way."""
    if isinstance(tokens, int):
        tokens = torch.arange(tokens, device=seeds.device, dtype=torch.int64)[None, :]
    key = _hash32(_hash32(seeds ^ (seeds >> 32)) ^ _hash32(steps * 0x9E3779B9 + 1))
    bits = _hash32(key[:, None] ^ _hash32(tokens + 0x632BE5AB))
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def _candidates(logits: Tensor, k_cap: int | None) -> tuple[Tensor, Tensor]:
    """Each row's logits in descending order and their token ids: all of them, or the k_cap largest
    where no row keeps more (each has 0 < top_k <= k_cap). Equal logits rank by token id, lower
    first, either way: bf16 logits tie often, and a row's top-k must not depend on how many
    candidates its batch neighbours made it take."""
    if k_cap is not None and k_cap < logits.shape[-1]:
        return _top_candidates(logits, k_cap)
    return logits.sort(dim=-1, descending=True, stable=True)


def _top_candidates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits of each row, ranked as a stable sort of the whole row ranks them.
    torch.topk returns every logit above its k-th value but any of those equal to it: their places
    take the lowest ids among the tokens equal to it (a second topk, over a key larger for lower
    ids: exact in float32 below 2^24 tokens), then the k are ordered. ~3x a plain topk on a CPU,
    a tenth of an int64 topk over (logit, id) keys."""
    values, ids = logits.topk(k, dim=-1)
    edge = values[:, -1:]
    lower_first = torch.arange(logits.shape[-1], 0, -1, device=logits.device, dtype=torch.float32)
    tied_ids = torch.where(logits == edge, lower_first, 0.0).topk(k, dim=-1).indices
    at_edge = values == edge                                   # a suffix of the descending values
    ids = torch.where(at_edge, tied_ids.gather(-1, (at_edge.cumsum(dim=-1) - 1).clamp_min(0)), ids)
    ids = ids.sort(dim=-1).values
    values, order = logits.gather(-1, ids).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _keep_top_k_top_p(ranked: Tensor, top_k: Tensor, top_p: Tensor, vocab_size: int) -> Tensor:
    """-inf in place of each descending row's logits past its top-k, or less probable than the last
    token of the smallest prefix whose probability mass reaches top_p (>= 1 token; tokens tied with
    that last one all stay, as in outside_nucleus, so that the order of ties does not matter; top_p 1
    keeps all, though a float cumulative sum may reach 1 before the last tokens)."""
    rank = torch.arange(ranked.shape[-1], device=ranked.device)[None, :]
    drop = rank >= torch.where(top_k > 0, top_k, vocab_size)[:, None]
    probs = ranked.masked_fill(drop, float("-inf")).softmax(dim=-1)
    past = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (rank > 0)     # top_p 0 keeps the likeliest
    edge = probs.masked_fill(past, float("inf")).amin(dim=-1, keepdim=True)
    drop |= (probs < edge) & (top_p < 1)[:, None]
    return ranked.masked_fill(drop, float("-inf"))


def outside_nucleus(scaled: Tensor, top_p: Tensor) -> Tensor:
    """True for each row's tokens outside its nucleus, found without a sort. The nucleus (the smallest
    set of most probable tokens whose mass reaches top_p) is every token at least as probable as its
    least probable member p*, and p* is the largest probability whose tokens at or above it hold
    top_p: a bisection over float32's bit patterns (as integers, in the order of the non-negative
    floats) finds it exactly in 31 halvings, each one pass over the row. Tokens tied with p* are all
    kept, as _keep_top_k_top_p keeps them after its sort."""
    probs = scaled.softmax(dim=-1)
    bits = probs.view(torch.int32)
    lo = torch.zeros(len(probs), dtype=torch.int64, device=probs.device)    # holds top_p: all tokens
    hi = bits.amax(dim=-1).long() + 1                                        # holds nothing
    for _ in range(31):
        mid = (lo + hi) // 2
        holds = torch.where(bits >= mid[:, None], probs, 0.0).sum(dim=-1) >= top_p
        lo, hi = torch.where(holds, mid, lo), torch.where(holds, hi, mid)
    return (bits < lo[:, None]) & (top_p < 1)[:, None]      # a float sum may reach 1 short of the tail


def _filter_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor, k_cap: int | None = None) -> Tensor:
    """Set to -inf every token outside the row's top-k and outside its nucleus of mass top_p."""
    ranked, order = _candidates(logits, k_cap)
    kept = _keep_top_k_top_p(ranked, top_k, top_p, logits.shape[-1])
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)


@dataclass
class SamplingState:
    """Per-slot sampling parameters on the device, written when a request takes a slot."""
    temperature: Tensor     # (S,) float32, 0 = greedy
    top_k: Tensor           # (S,) int64
    top_p: Tensor           # (S,) float32
    seed: Tensor            # (S,) int64
    step: Tensor            # (S,) int64 tokens generated so far
    min_new: Tensor         # (S,) int64
    stop_mask: Tensor       # (S, V) bool: the slot's stop ids
    penalty: Tensor         # (S,) float32 repetition penalty, 1 = none
    seen: Tensor            # (S, V) bool: tokens of the prompt and the answer so far (kept where penalty != 1)
    log_min_p: Tensor       # (S,) float32 log of min_p (-inf: none)
    typical_p: Tensor       # (S,) float32 (1: none)
    epsilon: Tensor         # (S,) float32 epsilon_cutoff (0: none)
    eta: Tensor             # (S,) float32 eta_cutoff (0: none)
    presence: Tensor        # (S,) float32 presence penalty (0: none)
    frequency: Tensor       # (S,) float32 frequency penalty (0: none)
    # made once a slot needs them: (S, V) float32, what the presence and frequency penalties take off each
    # token so far (kept as it grows, O(rows) a step, so a step subtracts it in one pass), and (S, V)
    # bool, the tokens the answer holds
    answer_penalty: Tensor | None = None
    in_answer: Tensor | None = None

    @classmethod
    def empty(cls, num_slots: int, vocab_size: int, device: torch.device | str) -> "SamplingState":
        z = dict(device=device)
        ints = lambda: torch.zeros(num_slots, dtype=torch.int64, **z)  # noqa: E731
        masks = lambda: torch.zeros(num_slots, vocab_size, dtype=torch.bool, **z)  # noqa: E731
        return cls(torch.zeros(num_slots, **z), ints(), torch.ones(num_slots, **z), ints(), ints(), ints(),
                   masks(), torch.ones(num_slots, **z), masks(), torch.full((num_slots,), float("-inf"), **z),
                   torch.ones(num_slots, **z), torch.zeros(num_slots, **z), torch.zeros(num_slots, **z),
                   torch.zeros(num_slots, **z), torch.zeros(num_slots, **z))

    def assign(self, slot: int, temperature: float, top_k: int, top_p: float, seed: int, min_new: int,
               stop_ids: list[int], penalty: float = 1.0, prompt_ids: list[int] = (), min_p: float = 0.0,
               typical_p: float = 1.0, epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> None:
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = temperature, top_k, top_p
        self.log_min_p[slot] = math.log(min_p) if min_p > 0 else float("-inf")
        self.typical_p[slot], self.epsilon[slot], self.eta[slot] = typical_p, epsilon_cutoff, eta_cutoff
        self.seed[slot], self.step[slot], self.min_new[slot] = seed, 0, min_new
        self._set_row(self.stop_mask, slot, stop_ids)
        self.penalty[slot] = penalty
        self._set_row(self.seen, slot, prompt_ids if penalty != 1.0 else ())
        self.presence[slot], self.frequency[slot] = presence_penalty, frequency_penalty
        if self.answer_penalty is None and (presence_penalty or frequency_penalty):
            self.answer_penalty = torch.zeros(self.seen.shape, device=self.seen.device)
            self.in_answer = torch.zeros_like(self.seen)
        if self.answer_penalty is not None:
            self.answer_penalty[slot], self.in_answer[slot] = 0.0, False

    @staticmethod
    def _set_row(mask: Tensor, slot: int, ids) -> None:
        mask[slot] = False
        ids = [i for i in set(ids) if 0 <= i < mask.shape[1]]
        if ids:
            mask[slot, torch.tensor(ids, device=mask.device)] = True

    def mark_seen(self, slots: Tensor, tokens: Tensor) -> None:
        """The rows' new tokens join what their penalties discourage."""
        self.seen[slots, tokens] = True
        if self.answer_penalty is not None:     # a token's first time costs presence + frequency, later ones frequency
            first = ~self.in_answer[slots, tokens]
            self.answer_penalty[slots, tokens] += self.frequency[slots] + self.presence[slots] * first
            self.in_answer[slots, tokens] = True


def penalize_repeats(logits: Tensor, penalty: Tensor, seen: Tensor) -> Tensor:
    """The reference's repetition penalty: a seen token's logit is divided by the penalty when
    positive, multiplied by it when negative (both lower it for a penalty > 1)."""
    penalty = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def penalize_counts(logits: Tensor, answer_penalty: Tensor) -> Tensor:
    """vLLM's (and OpenAI's) presence and frequency penalties, on the answer's tokens only (not the
    prompt's): a token the answer holds loses the presence penalty, and the frequency penalty for
    each time it holds it (SamplingState.answer_penalty, their sum so far)."""
    return logits - answer_penalty


def drop_below_min_p(scaled: Tensor, log_min_p: Tensor) -> Tensor:
    """-inf in place of each row's tokens less probable than min_p times its likeliest (transformers'
    min_p, after temperature, top-k and top-p): a ratio of probabilities, so a difference of logits."""
    return scaled.masked_fill(scaled < scaled.amax(dim=-1, keepdim=True) + log_min_p[:, None], float("-inf"))


def _entropy(log_p: Tensor) -> Tensor:
    """(B, 1) entropy of each row's distribution (a dropped token, log p -inf, adds nothing)."""
    return -(log_p * log_p.exp()).nansum(dim=-1, keepdim=True)


def drop_atypical(scaled: Tensor, typical_p: Tensor) -> Tensor:
    """-inf in place of each row's tokens outside its typical set (transformers' typical_p): tokens
    ranked by how far their surprise (-log p) lies from the entropy, the closest first, are kept
    until their mass reaches typical_p, with every token as close as the last kept one."""
    log_p = scaled.log_softmax(dim=-1)
    distance = (-log_p - _entropy(log_p)).abs()
    closest, order = distance.sort(dim=-1)
    mass = log_p.exp().gather(-1, order).cumsum(dim=-1)
    last = (mass < typical_p[:, None]).sum(dim=-1, keepdim=True).clamp_max(scaled.shape[-1] - 1)
    drop = (distance > closest.gather(-1, last)) & (typical_p < 1)[:, None]
    return scaled.masked_fill(drop, float("-inf"))


def drop_below_epsilon(scaled: Tensor, epsilon: Tensor) -> Tensor:
    """-inf in place of each row's tokens less probable than epsilon, the likeliest kept
    (transformers' epsilon_cutoff)."""
    unlikely = scaled.softmax(dim=-1) < epsilon[:, None]
    return scaled.masked_fill(unlikely & (scaled < scaled.amax(dim=-1, keepdim=True)), float("-inf"))


def drop_below_eta(scaled: Tensor, eta: Tensor) -> Tensor:
    """-inf in place of each row's tokens less probable than min(eta, sqrt(eta) * exp(-entropy)),
    the likeliest kept (transformers' eta_cutoff: a cutoff that falls as the distribution widens)."""
    log_p = scaled.log_softmax(dim=-1)
    cutoff = torch.minimum(eta[:, None], eta.sqrt()[:, None] * torch.exp(-_entropy(log_p)))
    unlikely = log_p.exp() < cutoff
    return scaled.masked_fill(unlikely & (scaled < scaled.amax(dim=-1, keepdim=True)), float("-inf"))


def drop_by_cutoffs(scaled: Tensor, state: SamplingState, slots: Tensor) -> Tensor:
    """typical_p, then epsilon_cutoff, then eta_cutoff, each on what the last left (transformers'
    order, after min_p); each inert at its neutral value."""
    scaled = drop_atypical(scaled, state.typical_p[slots])
    scaled = drop_below_epsilon(scaled, state.epsilon[slots])
    return drop_below_eta(scaled, state.eta[slots])


def flag_non_finite(tokens: Tensor, logits: Tensor) -> Tensor:
    """NON_FINITE in place of the token of each row whose logits are not all finite: argmax over a
    NaN is an arbitrary token, and the host learns of it with the tokens it reads anyway. A NaN or
    an infinity makes the row's float32 sum one (so would logits near 1e34, noise as well); the sum
    costs ~15x less than isfinite().all() on a CPU."""
    return torch.where(logits.sum(dim=-1, dtype=torch.float32).isfinite(), tokens, NON_FINITE)


def model_tokens(tokens: Tensor) -> Tensor:
    """Sampled tokens as the model may read them: a NON_FINITE row has ended, but a step in flight
    still embeds its token."""
    return tokens.clamp_min(0)


def gumbel_argmax(scores: Tensor, seeds: Tensor, steps: Tensor, tokens: Tensor) -> Tensor:
    """Each row's column of the largest score plus the Gumbel noise of its token (tokens (B, K), or
    (1, K) shared): a draw from softmax(scores) (the Gumbel-max trick)."""
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, tokens)))
    return (scores + gumbel).argmax(dim=-1)


# gumbel_argmax through torch.compile: the noise's ~25 integer passes, the logs and the argmax in one
# kernel (eager, each pass reads and writes (B, V) int64 lanes: ~12 GB a step at 256 rows of a
# 128 256-token vocabulary).
fused_gumbel_argmax = CompiledOrEager(gumbel_argmax, "the sampler's noise")
# The bisection's 31 passes, each one kernel (eager, each is three passes over (B, V)).
fused_outside_nucleus = CompiledOrEager(outside_nucleus, "the nucleus")


def too_early(step: Tensor, min_new: Tensor, stop_mask: Tensor, slots: Tensor) -> Tensor:
    """(B, V) True at the stop ids of rows that have not reached their min_new_tokens."""
    return (step[slots] < min_new[slots])[:, None] & stop_mask[slots]


def greedy_tokens(logits: Tensor, step: Tensor, min_new: Tensor, stop_mask: Tensor, slots: Tensor) -> Tensor:
    """An all-greedy, unpenalised step: `sample` then `flag_non_finite` as one function, so that
    compiled (fused_greedy_tokens) its ~ten small kernels outside the decode graph are two or three."""
    logits = logits.float()
    tokens = logits.masked_fill(too_early(step, min_new, stop_mask, slots), float("-inf")).argmax(dim=-1)
    return flag_non_finite(tokens, logits)


fused_greedy_tokens = CompiledOrEager(greedy_tokens, "the greedy draw")


def sample_rows(logits: Tensor, state: SamplingState, slots: Tensor, params: list[SamplingParams], *,
                compiled: bool, allowed: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Next token of each row, NON_FINITE where its logits are not, the host-side facts `sample`
    takes read from the rows' requests. compiled: the engine's decode step is; its sampler is then
    compiled too (an all-greedy step one compiled function), and nuclei are found by bisection.
    allowed: (B, V) bool, the only tokens each row may take (model.engine.constraints), or None;
    bias: (B, V) float32 added to the logits first (model.engine.biases), or None."""
    sampled = [p for p in params if not p.greedy]
    penalty = any(p.penalized for p in params)
    if not sampled and not penalty and allowed is None and bias is None:
        draw = fused_greedy_tokens if compiled else greedy_tokens
        return draw(logits, state.step, state.min_new, state.stop_mask, slots)
    top_ks = [p.top_k for p in sampled]
    tokens = sample(logits, state, slots, any_sampling=bool(sampled),
                    any_filter=any(p.top_k > 0 or p.top_p < 1 for p in sampled), any_penalty=penalty,
                    any_min_p=any(p.min_p > 0 for p in sampled), any_cutoffs=any(p.cut_off for p in sampled),
                    top_k_cap=max(top_ks) if top_ks and min(top_ks) > 0 else None,
                    sort_free_nucleus=compiled and not any(top_ks), fuse_noise=compiled, allowed=allowed,
                    bias=bias)
    barred = barred_tokens(state, slots, allowed, bias)
    if barred is not None:      # every token barred (all -inf): argmax took one it may not take
        tokens = torch.where(barred.gather(-1, tokens[:, None])[:, 0], NO_TOKEN_LEFT, tokens)
    return flag_non_finite(tokens, logits)


def barred_tokens(state: SamplingState, slots: Tensor, allowed: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """(B, V) True at the tokens a row may not take: not allowed, biased by -inf, or a stop id before its
    min_new_tokens; None where no row is constrained or biased (nothing else bars every token)."""
    if allowed is None and bias is None:
        return None
    barred = too_early(state.step, state.min_new, state.stop_mask, slots)
    if allowed is not None:
        barred = barred | ~allowed
    return barred if bias is None else barred | torch.isneginf(bias)


def sample(logits: Tensor, state: SamplingState, slots: Tensor, *, any_sampling: bool,
           any_filter: bool, any_penalty: bool = False, any_min_p: bool = False, any_cutoffs: bool = False,
           top_k_cap: int | None = None,
           sort_free_nucleus: bool = False, fuse_noise: bool = False, allowed: Tensor | None = None,
           bias: Tensor | None = None) -> Tensor:
    """Next token per row (B,) int64. slots (B,) indexes the rows' SamplingState entries.

    any_sampling / any_filter / any_penalty / top_k_cap are host-side facts about the rows (known
    from their requests), so all-greedy batches skip the noise and the sort, unpenalised ones the
    penalty, and batches whose sampled rows all set top_k sort only the largest top_k_cap logits.
    sort_free_nucleus (only where no row sets top_k): the nucleus by bisection (outside_nucleus),
    the engine's choice with fuse_noise: compiled, it beat the sort 2.4-2.9x on a CPU (32 and 256
    rows of 49 280 tokens), and the GPU's sort took ~3 ms a step at 256 x 128 259 (run 6); eager,
    at 256 rows, it lost. fuse_noise: the noise and the draw, and the bisection, compiled (the
    engine's choice with a compiled decode step: CUDA's default). allowed, bias: as sample_rows's.
    """
    logits = _processed(logits, state, slots, any_penalty, allowed, bias)
    greedy = logits.argmax(dim=-1)
    if not any_sampling:
        return greedy
    temperature = state.temperature[slots]
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if any_filter and not sort_free_nucleus:    # Gumbel-max over the kept candidates only
        ranked, tokens = _candidates(scaled, top_k_cap)
        scaled = _keep_top_k_top_p(ranked, state.top_k[slots], state.top_p[slots], logits.shape[-1])
    else:
        tokens = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        if any_filter:
            outside = fused_outside_nucleus if fuse_noise else outside_nucleus
            scaled = scaled.masked_fill(outside(scaled, state.top_p[slots]), float("-inf"))
    if any_min_p:
        scaled = drop_below_min_p(scaled, state.log_min_p[slots])
    if any_cutoffs:         # on the kept candidates: the tokens past them are dropped already
        scaled = drop_by_cutoffs(scaled, state, slots)
    draw = fused_gumbel_argmax if fuse_noise else gumbel_argmax
    best = draw(scaled, state.seed[slots], state.step[slots], tokens)
    sampled = tokens.expand(len(best), -1).gather(-1, best[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def _processed(logits: Tensor, state: SamplingState, slots: Tensor, any_penalty: bool,
               allowed: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """float32 logits after the bias (transformers' sequence_bias comes first), the repetition,
    presence and frequency penalties (vLLM's order), the bans and min_new_tokens (-inf at the stop ids)."""
    logits = logits.float() if bias is None else logits.float() + bias
    if any_penalty:
        logits = penalize_repeats(logits, state.penalty[slots], state.seen[slots])
        if state.answer_penalty is not None:
            logits = penalize_counts(logits, state.answer_penalty[slots])
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.masked_fill(too_early(state.step, state.min_new, state.stop_mask, slots), float("-inf"))


def processed_scores(logits: Tensor, state: SamplingState, slots: Tensor, *, any_sampling: bool,
                     any_penalty: bool = False, any_cutoffs: bool = False, allowed: Tensor | None = None,
                     between: Callable[[Tensor], Tensor] | None = None, bias: Tensor | None = None) -> Tensor:
    """(B, V) float32: the rows' logits as transformers' processors leave them (its output_scores):
    `sample`'s penalty and bans, then `between` (a caller's processors), then, where sampling,
    temperature, top-k, top-p, min-p and the cutoffs (-inf where a token is dropped). `draw` on
    them picks the token `sample` picks."""
    logits = _processed(logits, state, slots, any_penalty, allowed, bias)
    if between is not None:
        logits = between(logits)
    if not any_sampling:
        return logits
    scaled = logits / state.temperature[slots].clamp_min(1e-6)[:, None]
    scaled = _filter_top_k_top_p(scaled, state.top_k[slots], state.top_p[slots])
    scaled = drop_below_min_p(scaled, state.log_min_p[slots])
    return drop_by_cutoffs(scaled, state, slots) if any_cutoffs else scaled


def draw(scores: Tensor, state: SamplingState, slots: Tensor, *, any_sampling: bool) -> Tensor:
    """The token of each row of processed_scores: its argmax, or where sampling, its Gumbel draw
    (each token's noise as `sample` gives it)."""
    if not any_sampling:
        return scores.argmax(dim=-1)
    tokens = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    return gumbel_argmax(scores, state.seed[slots], state.step[slots], tokens)
