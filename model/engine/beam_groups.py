"""A request's beam search in the engine (SamplingParams.num_beams): its beams are sequences in slots
of their own, admitted together (Sequence.companions), decoded in the running batch beside other
requests. Only the request's own sequence is prefilled: its logits give the first step, whose beams
all copy its prompt's K/V; after each later step every beam copies its parent's answer rows. The
search itself, as transformers', is model.engine.beams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .beams import BeamRules, BeamSearch, Hypothesis
from .scheduler import Sequence

BEAM_ID = "\x1fbeam"


@dataclass(eq=False)
class BeamGroup:
    search: BeamSearch
    rules: BeamRules
    beams: list[Sequence]          # the request's own sequence first; beam j of the search is in beams[j]'s slot

    @property
    def head(self) -> Sequence:
        return self.beams[0]

    def running(self) -> list[Sequence]:
        """The sequences holding the search's current beams (one before its first step)."""
        return self.beams[:len(self.search.beams)]


def add_companions(seq: Sequence, make_sequence) -> None:
    """The num_beams - 1 sequences that take slots beside `seq`, a request of beam search."""
    p = seq.request.sampling
    seq.companions = [make_sequence(replace(seq.request, request_id=f"{seq.request.request_id}{BEAM_ID}{i}",
                                            sampling=replace(p, num_beams=1, n=1)))
                      for i in range(1, p.num_beams)]


def start_group(seq: Sequence, vocab: int, device, completes_stop=None) -> BeamGroup:
    """The search of `seq` (admitted, with its companions in their slots); completes_stop: its stop
    strings' check of an answer, if it has any."""
    p, request = seq.request.sampling, seq.request
    search = BeamSearch(p.num_beams, seq.stop_ids, seq.max_new_tokens, p.length_penalty, p.early_stopping,
                        completes_stop)
    rules = BeamRules(search, vocab, device, prompt_ids=request.prompt_ids, min_new_tokens=p.min_new_tokens,
                      repetition_penalty=p.repetition_penalty, penalized_ids=request.prompt_ids,
                      no_repeat_ngram_size=p.no_repeat_ngram_size, bad_words=p.bad_words_ids,
                      sequence_bias=p.sequence_bias, suppress_tokens=p.suppress_tokens,
                      begin_suppress_tokens=p.begin_suppress_tokens)
    group = BeamGroup(search, rules, [seq, *seq.companions])
    for beam in group.beams:
        beam.beam = group
    return group


def follow_search(group: BeamGroup) -> tuple[list[int], list[int], int, int]:
    """After a step of its search: each beam sequence's answer is its beam's; returns the K/V rows to
    move (target slots, source slots, first row, end row): each beam's parent's rows, the prompt's
    after the first step (only the request's own slot holds it), the answer's after the others."""
    search, prompt = group.search, group.head.prompt_len
    for seq, beam in zip(group.beams, search.beams):
        seq.generated = list(beam)
    before = search.steps - 1           # answer tokens whose K/V are in the slots
    targets = [s.slot for s in group.beams[:len(search.parents)]]
    sources = [group.beams[p].slot for p in search.parents]
    return targets, sources, 0 if before == 0 else prompt, prompt + before


def step_searches(groups: list[BeamGroup], found: list[tuple[list[float], list[int]]], vocab: int, cache
                  ) -> tuple[list[BeamGroup], list[BeamGroup], list[int], list[int]]:
    """Each group's search advanced by its step's candidates (model.engine.beams.split_candidates),
    its beams' K/V rows moved after their parents' in `cache`: the groups whose logits were not
    finite (not advanced), the groups now done, and the slots and next tokens of the others' beams."""
    failed, done, slots, tokens, moves = [], [], [], [], []
    for group, (scores, ids) in zip(groups, found):
        if any(math.isnan(v) or v == math.inf for v in scores):
            failed.append(group)
            continue
        group.search.advance(scores, ids, vocab)
        group.rules.follow()
        moves.append(follow_search(group))
        if group.search.done:
            done.append(group)
        else:
            slots += [s.slot for s in group.beams]
            tokens += [beam[-1] for beam in group.search.beams]
    cache.move_rows(moves)
    return failed, done, slots, tokens


def finish_group(group: BeamGroup) -> None:
    """The request's answer is its best hypothesis; with n > 1, its next best are its samples."""
    head = group.head
    best, *others = group.search.best(max(1, head.request.sampling.n))
    stopped = group.search.completes_stop or (lambda answer: False)
    _take(head, best, stopped)
    head.samples = [_take(Sequence(head.request, head.stop_ids, head.max_new_tokens), h, stopped) for h in others]


def _take(seq: Sequence, h: Hypothesis, completes_stop) -> Sequence:
    seq.generated, seq.logprob = list(h.tokens), h.logprob
    ended = bool(h.tokens) and (h.tokens[-1] in seq.stop_ids or completes_stop(h.tokens))
    seq.finish_reason = "stop" if ended else "length"
    return seq
