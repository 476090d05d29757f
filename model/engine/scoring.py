"""Each choice's log-probability (SamplingParams.choice_logprobs): how likely the model is to answer
exactly that choice, so that labels can be thresholded and compared, not only picked.

A choice's score is log p(the answer is the choice, as written or after one space, in the
tokenizer's spelling, and then ends), summed over both spellings: the log-probability of each of
its tokens after the prompt, teacher-forced, plus that of any stop token after the last. The
engine scores a request's choices with sequences of its own (one per spelling), which share the
request's image features and prompt prefix and are forced along the spelling instead of sampled.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence as Seq

import torch
from torch import Tensor

from .scheduler import Sequence
from .types import Request, SamplingParams

END = -1        # a forced step that takes whichever stop token the model likes best, scored over all of them
SCORE_ID = "\x1fscore"


def encode_text(tokenizer, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


def scoring_requests(request: Request, tokenizer) -> list[tuple[str, Request, tuple[int, ...]]]:
    """For each spelling of each choice of `request` (its image named, so that they share its
    features and prompt prefix): the choice, a request that scores it, and the tokens to force it along."""
    scorers = []
    for choice in dict.fromkeys(request.sampling.choices):
        for text in (choice, " " + choice):
            forced = (*encode_text(tokenizer, text), END)
            sampling = SamplingParams(max_new_tokens=len(forced), logprobs=True,
                                      stop_token_ids=request.sampling.stop_token_ids)
            name = f"{request.request_id}{SCORE_ID}{len(scorers)}"
            scorers.append((choice, replace(request, request_id=name, sampling=sampling), forced))
    return scorers


def add_scorers(seq: Sequence, tokenizer, make_sequence: Callable[[Request], Sequence]) -> list[Sequence]:
    """Sequences that score `seq`'s choices, one per spelling, made by `make_sequence`."""
    for choice, request, forced in scoring_requests(seq.request, tokenizer):
        scorer = make_sequence(request)
        scorer.forced, scorer.parent = forced, seq
        seq.children.append((choice, scorer))
    return [scorer for _, scorer in seq.children]


def answered(finished: list[Sequence]) -> list[Sequence]:
    """The requests among (or scored or sampled beside) `finished` whose answers and choice scores are all done
    now: each once, and never a scorer."""
    ready = []
    for seq in finished:
        owner = seq.parent or seq
        if owner.all_finished and not owner.emitted:
            owner.emitted = True
            ready.append(owner)
    return ready


def force(tokens: Tensor, logprobs: Tensor | None, logits: Tensor, seqs: Seq[Sequence], rows: Seq[int]) -> None:
    """Replace the sampled tokens of forced sequences (in place) by their spelling's next token, and
    their log p by its: for END, the likeliest stop token, scored as any of them."""
    for seq, row in zip(seqs, rows):
        if not seq.forced:
            continue
        token = seq.forced[len(seq.generated)]
        log_p = logits[row].float().log_softmax(-1)
        if token == END:
            stops = torch.tensor(sorted(seq.stop_ids), device=logits.device)
            forced, value = stops[log_p[stops].argmax()], log_p[stops].logsumexp(-1)
        else:
            forced, value = torch.tensor(token, device=logits.device), log_p[token]
        # no host sync here: a NON_FINITE row (its logits not finite) keeps that verdict
        tokens[row] = torch.where(tokens[row] < 0, tokens[row], forced)
        if logprobs is not None:
            logprobs[row] = value


def choice_logprobs(seq: Sequence) -> dict[str, float | None]:
    """Each choice's score from the sequence's scorers (None where one could not finish: an error,
    or no room left in the context)."""
    scores: dict[str, list[float | None]] = {}
    for choice, scorer in seq.children:
        whole = scorer.finish_reason == "stop" and len(scorer.generated) == len(scorer.forced)
        scores.setdefault(choice, []).append(scorer.logprob if whole else None)
    return {c: None if None in s else math.log(sum(math.exp(x - max(s)) for x in s)) + max(s)
            for c, s in scores.items()}
