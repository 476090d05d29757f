"""Each choice's log-probability (SamplingParams.choice_logprobs): how likely the model is to answer
exactly that choice, so that labels can be thresholded and compared, not only picked.

A choice's score is log p(the answer is the choice, as written or after one space, in the
tokenizer's spelling, and then ends), summed over both spellings: the log-probability of each of
its tokens after the prompt, teacher-forced, plus that of any stop token after the last. The
engine scores a request's choices with sequences of its own (one per spelling), which share the
request's image features and prompt prefix and score the spelling as their continuation
(model.engine.continuation): one prefill each, whose last logits give the stop tokens' log p.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .scheduler import Sequence
from .types import Request, SamplingParams

SCORE_ID = "\x1fscore"


def encode_text(tokenizer, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


def scoring_requests(request: Request, tokenizer) -> list[tuple[str, Request]]:
    """For each spelling of each choice of `request` (its image named, so that they share its
    features and prompt prefix): the choice, and a request that scores the spelling after the prompt."""
    scorers = []
    for choice in dict.fromkeys(request.sampling.choices):
        for text in (choice, " " + choice):
            sampling = SamplingParams(max_new_tokens=0, stop_token_ids=request.sampling.stop_token_ids)
            name = f"{request.request_id}{SCORE_ID}{len(scorers)}"
            scorers.append((choice, replace(request, request_id=name, sampling=sampling,
                                            continuation_ids=encode_text(tokenizer, text))))
    return scorers


def add_scorers(seq: Sequence, tokenizer, make_sequence: Callable[[Request], Sequence]) -> list[Sequence]:
    """Sequences that score `seq`'s choices, one per spelling, made by `make_sequence`; those whose
    prompt and spelling outgrow the context are not run (their choice's score is None)."""
    runnable = []
    for choice, request in scoring_requests(seq.request, tokenizer):
        scorer = make_sequence(request)
        scorer.parent, scorer.scorer = seq, True
        if scorer.max_new_tokens < 0:
            scorer.finish_reason = "length"
        else:
            runnable.append(scorer)
        seq.children.append((choice, scorer))
    return runnable


def score_ends(seqs: list[Sequence], logits: Tensor) -> None:
    """After their prefill (`logits`: its last-position rows, seqs[i]'s in row i): each scorer's log p,
    its spelling's tokens' and then any stop token's (the logsumexp over the stop ids)."""
    rows = [i for i, seq in enumerate(seqs) if seq.scorer and seq.continuation_logprobs is not None]
    if not rows:
        return
    log_p = logits[rows].log_softmax(-1)
    ends = torch.stack([row[sorted(seqs[i].stop_ids)].logsumexp(-1) for i, row in zip(rows, log_p)]).tolist()
    for i, end in zip(rows, ends):          # read in one host sync
        seqs[i].logprob = sum(seqs[i].continuation_logprobs) + end


def answered(finished: list[Sequence]) -> list[Sequence]:
    """The requests among (or scored or sampled beside) `finished` whose answers and choice scores
    are all done now: each once, and never a scorer."""
    ready = []
    for seq in finished:
        owner = seq.parent or seq
        if owner.all_finished and not owner.emitted:
            owner.emitted = True
            ready.append(owner)
    return ready


def choice_logprobs(seq: Sequence) -> dict[str, float | None]:
    """Each choice's score from the sequence's scorers (None where one could not run: no room left
    in the context, or logits that were not finite)."""
    scores: dict[str, list[float | None]] = {}
    for choice, scorer in seq.children:
        whole = scorer.continuation_logprobs is not None and math.isfinite(scorer.logprob)
        scores.setdefault(choice, []).append(scorer.logprob if whole else None)
    return {c: None if None in s else math.log(sum(math.exp(x - max(s)) for x in s)) + max(s)
            for c, s in scores.items()}
