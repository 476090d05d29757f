"""Beam search (SamplingParams.num_beams; transformers' num_beams, length_penalty, early_stopping):
the answer of highest log-probability among the `num_beams` best partial answers kept each step,
for captions and short answers where greedy's first choice leads astray.

One prompt's search is a BeamSearch: the host-side bookkeeping of transformers' vectorized beam
search, step for step (its candidate counts, its scores, its early-stop heuristic), so that the
hypotheses, their order and the step the search ends at are the reference's. A step's device work
for every search at once is `top_candidates`: the beams' log-probabilities (min_new_tokens, the
repetition penalty, n-gram bans, bad words, sequence biases and suppressed tokens applied to them by
BeamRules, as the reference applies its processors after the log-softmax), each search's best
candidates, read in one host sync.
Callers (model.generation, model.engine.beam_groups) own the K/V: each step they copy every beam's
cache rows from its parent's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .bad_words import banned_after, usable_bad_words
from .biases import answer_biases, bias_tensor
from .ngrams import NGrams, allowed_without
from .sampler import penalize_repeats

NEG = -1.0e9       # the reference's score for "never": not -inf, so sums stay ordered


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]
    score: float         # the sum of its tokens' log p divided by its length ** length_penalty
    logprob: float       # the sum of its tokens' log p (as beam search saw them: after the penalties)
    parent: int = 0      # the running beam its last token continued


class BeamSearch:
    """One prompt's beams. `beams` holds the running beams' new tokens: one empty beam before the
    first step, which stands for the reference's num_beams copies of the prompt, the others scored
    -1e9 (`start_scores`): their candidates rank after all of the first's that are possible, so they
    are taken only where fewer than `width` are (a forced token, a prefix_allowed_tokens_fn of one).

    Plain Python floats on the host (a step's few candidates: ~10x faster than small tensors). The
    reference sums in float32; here the sums come from the device in float32 and the rest is in
    float64, which ranks alike but for candidates within a float32 rounding of each other (as
    fragile as the logits themselves), and keeps "never" (-1e9) scores apart where float32 merges
    them (they decide nothing: at least num_beams candidates go on each step)."""

    def __init__(self, num_beams: int, stop_ids, max_new_tokens: int, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, completes_stop=None) -> None:
        self.num_beams, self.stop_ids, self.max_new_tokens = num_beams, frozenset(stop_ids), max_new_tokens
        # completes_stop(answer): whether the answer's last token completes a stop string (stop_strings)
        self.completes_stop = completes_stop
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        # candidates kept a step: enough that num_beams of them go on even if as many end on each stop id
        self.width = max(2, 1 + len(self.stop_ids)) * num_beams
        self.beams: list[list[int]] = [[]]
        self.scores: list[float] = [0.0]            # each running beam's sum of log p
        self.parents: list[int] = []                 # the last step's: beam j continues old beam parents[j]
        self.history: list[list[int]] = []           # every step's parents
        self.finished = [Hypothesis([], NEG, NEG)] * num_beams
        self.is_finished = [False] * num_beams
        self.improvable = True
        self.done = False

    @property
    def steps(self) -> int:
        return len(self.beams[0])

    @property
    def start_scores(self) -> list[float]:
        """The scores a step's candidates start from: each running beam's, or before the first step
        the prompt's copies' (0 and -1e9 for the others, as the reference's)."""
        return [0.0] + [NEG] * (self.num_beams - 1) if self.steps == 0 else self.scores

    def advance(self, top_scores: list[float], top_ids: list[int], vocab: int,
                stopped: list[bool] | None = None) -> None:
        """Take a step's `width` best candidates (accumulated log p, descending; ids beam * vocab + token);
        `stopped`: the candidates a caller's stopping criteria end."""
        k, step = self.num_beams, self.steps + 1
        copies, tokens = [i // vocab for i in top_ids], [i % vocab for i in top_ids]
        parents = copies if step > 1 else [0] * len(copies)      # the first step's copies are one beam
        ends = [t in self.stop_ids or step >= self.max_new_tokens for t in tokens]
        if stopped is not None:
            ends = [end or stop for end, stop in zip(ends, stopped)]
        if self.completes_stop is not None:
            ends = [end or self.completes_stop(self.beams[p] + [t]) for end, p, t in zip(ends, parents, tokens)]
        going = [s + NEG if end else s for s, end in zip(top_scores, ends)]
        order = best_first(going)[:k]
        self._keep_finished(top_scores, parents, tokens, ends, step, copies)
        self.parents = [parents[i] for i in order]
        self.history.append([copies[i] for i in order])
        self.beams = [self.beams[parents[i]] + [tokens[i]] for i in order]
        self.scores = [going[i] for i in order]
        self._check_improvable(step)
        self.done = not self.improvable or all(self.is_finished) and self.early_stopping is True or all(ends)

    def _keep_finished(self, scores: list[float], parents: list[int], tokens: list[int], ends: list[bool],
                       step: int, copies: list[int]) -> None:
        """The num_beams best hypotheses so far: the kept ones and the candidates that end now (only
        among the num_beams best candidates, while they may still improve on the kept ones)."""
        k = self.num_beams
        closed = (all(self.is_finished) and self.early_stopping is True) or not self.improvable
        length = step ** self.length_penalty
        ranked = [s / length + (NEG if closed else 0.0) + (0.0 if end and i < k else NEG)
                  for i, (s, end) in enumerate(zip(scores, ends))]
        merged = [h.score for h in self.finished] + ranked
        keep = best_first(merged)[:k]

        def hypothesis(i: int) -> Hypothesis:       # i < k: a kept one; else candidate i - k
            if i < k:
                return self.finished[i]
            c = i - k
            return Hypothesis(self.beams[parents[c]] + [tokens[c]], ranked[c], scores[c], copies[c])

        self.is_finished = [self.is_finished[i] if i < k else ends[i - k] and i - k < k for i in keep]
        self.finished = [hypothesis(i) for i in keep]

    def _check_improvable(self, step: int) -> None:
        """Whether the best running beam may still beat the worst kept hypothesis (the reference's
        heuristic: at the current length, or at the longest with early_stopping "never")."""
        longest = self.early_stopping == "never" and self.length_penalty > 0
        best = self.scores[0] / ((self.max_new_tokens if longest else step) ** self.length_penalty)
        worst = min(h.score for h in self.finished)
        self.improvable = self.improvable and any(best > (worst if f else NEG) for f in self.is_finished)

    def best(self, n: int = 1) -> list[Hypothesis]:
        return self.finished[:n]

    def path(self, hypothesis: Hypothesis) -> list[int]:
        """The running beam each of the hypothesis's tokens continued, first token first (the
        reference's beam_indices, within this search: the first token's, the prompt's copy; none
        for an empty one, a place no candidate took)."""
        if not hypothesis.tokens:
            return []
        beams = [hypothesis.parent]
        for parents in reversed(self.history[:len(hypothesis.tokens) - 1]):
            beams.append(parents[beams[-1]])
        return beams[::-1]


def best_first(values: list[float]) -> list[int]:
    """Indices of `values`, highest first (ties: the earlier first)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


class BeamRules:
    """What the reference's logits processors do to one search's beams, on the device: eos ids
    barred before min_new_tokens, the repetition penalty (on log p: multiplied), n-gram bans, bad
    words. Its per-beam state follows the beams' parents each step. prompt_ids: the prompt as the
    processors read it (a left-padded row's padding included); penalized_ids: the tokens the
    repetition penalty counts from it."""

    def __init__(self, search: BeamSearch, vocab: int, device, *, prompt_ids=(), min_new_tokens: int = 0,
                 repetition_penalty: float = 1.0, penalized_ids=(), no_repeat_ngram_size: int = 0,
                 bad_words=(), sequence_bias=(), suppress_tokens=(), begin_suppress_tokens=()) -> None:
        self.search, self.min_new_tokens, self.penalty = search, min_new_tokens, repetition_penalty
        self.bad_words = usable_bad_words(bad_words, search.stop_ids)
        self.sequence_bias, self.suppress, self.begin_suppress = sequence_bias, suppress_tokens, begin_suppress_tokens
        self.prompt_ids = prompt_ids
        stop = sorted(i for i in search.stop_ids if 0 <= i < vocab)
        self.stop = torch.tensor(stop, dtype=torch.int64, device=device)
        self.seen = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            ids = [i for i in set(penalized_ids) if 0 <= i < vocab]
            self.seen[0, torch.tensor(ids, dtype=torch.int64, device=device)] = True
        self.ngrams = [NGrams(no_repeat_ngram_size, list(prompt_ids))] if no_repeat_ngram_size else None

    @property
    def active(self) -> bool:
        return (self.seen is not None or self.ngrams is not None or bool(self.bad_words)
                or self.search.steps < self.min_new_tokens or bool(self.sequence_bias) or bool(self.suppress)
                or (bool(self.begin_suppress) and not self.search.steps))

    def apply(self, log_probs: Tensor) -> Tensor:
        """This search's rows of log p, as its processors leave them."""
        if self.sequence_bias:      # the reference's first processor
            found = [(row, answer_biases(self.prompt_ids, beam, self.sequence_bias))
                     for row, beam in enumerate(self.search.beams)]
            bias = bias_tensor(found, *log_probs.shape, log_probs.device)
            log_probs = log_probs if bias is None else log_probs + bias
        if self.search.steps < self.min_new_tokens and self.stop.numel():
            log_probs = log_probs.index_fill(1, self.stop, float("-inf"))
        if self.seen is not None:
            log_probs = penalize_repeats(log_probs, log_probs.new_full((len(log_probs),), self.penalty), self.seen)
        bans = allowed_without(self._bans(), *log_probs.shape, log_probs.device)
        return log_probs if bans is None else log_probs.masked_fill(~bans, float("-inf"))

    def _bans(self) -> list[tuple[int, list[int]]]:
        """Each beam's banned tokens: the n-grams it would repeat, its bad words' last tokens."""
        bans = [(row, ngrams.banned()) for row, ngrams in enumerate(self.ngrams or ())]
        if self.bad_words:
            bans += [(row, banned_after(self.prompt_ids, beam, self.bad_words))
                     for row, beam in enumerate(self.search.beams)]
        kept_out = list(self.suppress) + (list(self.begin_suppress) if not self.search.steps else [])
        return bans + [(row, kept_out) for row in range(len(self.search.beams))]

    def follow(self) -> None:
        """Move the state on to the search's new beams (after BeamSearch.advance)."""
        parents, tokens = self.search.parents, [beam[-1] for beam in self.search.beams]
        if self.seen is not None:
            device = self.seen.device
            self.seen = self.seen[torch.tensor(parents, device=device)]
            self.seen[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)] = True
        if self.ngrams is not None:
            self.ngrams = [copy.deepcopy(self.ngrams[p]) for p in parents]
            for ngrams, t in zip(self.ngrams, tokens):
                ngrams.extend([t])


def top_candidates(logits: Tensor, rules: list[BeamRules]) -> tuple[Tensor, Tensor]:
    """Each search's best `width` candidates, from the logits of its beams (rows in the order of
    `rules`, len(search.beams) each), end to end: accumulated log p (float32) and beam * vocab + token."""
    return best_candidates(beam_log_probs(logits, rules), rules)


def beam_log_probs(logits: Tensor, rules: list[BeamRules]) -> Tensor:
    """The beams' log p as the searches' processors leave them (the reference's output_scores)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if any(r.active for r in rules):
        parts = log_probs.split([len(r.search.beams) for r in rules])
        log_probs = torch.cat([r.apply(p) if r.active else p for r, p in zip(rules, parts)])
    return log_probs


def best_candidates(log_probs: Tensor, rules: list[BeamRules]) -> tuple[Tensor, Tensor]:
    """top_candidates from the beams' processed log p (a search before its first step: its row
    once for each of the prompt's copies, as the reference's rows)."""
    starts = [r.search.start_scores for r in rules]
    sizes = [len(s) for s in starts]
    rows, first = [], 0
    for r, size in zip(rules, sizes):
        rows += range(first, first + size) if r.search.steps else [first] * size
        first += len(r.search.beams)
    if len(rows) != len(log_probs):
        log_probs = log_probs[torch.tensor(rows, device=log_probs.device)]
    scores = torch.tensor([s for start in starts for s in start], dtype=torch.float32)
    totals = log_probs + scores.to(log_probs.device)[:, None]
    widths = [r.search.width for r in rules]
    if len(set(sizes)) == 1 and len(set(widths)) == 1:
        values, ids = totals.view(len(rules), -1).topk(widths[0])
        return values.flatten(), ids.flatten()
    found = [part.reshape(-1).topk(w) for part, w in zip(totals.split(sizes), widths)]
    return torch.cat([v for v, _ in found]), torch.cat([i for _, i in found])


def split_candidates(values: Tensor, ids: Tensor, rules: list[BeamRules]) -> list[tuple[list[float], list[int]]]:
    """top_candidates' output as each search's (scores, ids) lists (the step's one host sync)."""
    values, ids = values.tolist(), ids.tolist()
    found, start = [], 0
    for r in rules:
        end = start + r.search.width
        found.append((values[start:end], ids[start:end]))
        start = end
    return found
