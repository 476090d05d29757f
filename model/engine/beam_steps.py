"""The beam searches' steps inside the engine (a mixin of LLMEngine): a search starts on its head's
prefill logits, steps on its running beams' rows of each decode step, and ends its request (every
beam's slot freed). `beam_candidates` is the hook tensor-parallel ranks override (rank 0's)."""
from __future__ import annotations

import torch

from .beam_groups import BeamGroup, finish_group, start_group, step_searches
from .beams import BeamRules, split_candidates, top_candidates
from .scheduler import Scheduler, Sequence


class BeamSteps:
    """Needs the engine's row_state, runner, prefixes, device, _finished, _fail_non_finite and _stop_check."""

    def beam_candidates(self, logits: torch.Tensor, rules: list[BeamRules]) -> tuple[torch.Tensor, torch.Tensor]:
        """model.engine.beams.top_candidates (a hook: tensor-parallel ranks take rank 0's)."""
        return top_candidates(logits, rules)

    def _start_beams(self, scheduler: Scheduler, heads: list[Sequence], logits: torch.Tensor) -> None:
        """The first step of the beam searches of `heads` (just prefilled; row i of logits is heads[i]'s)."""
        groups = [start_group(head, logits.shape[-1], self.device, self._stop_check(head.request)) for head in heads]
        for group in groups:
            for beam in group.beams:
                self.row_state.sampling.assign(beam.slot, 0.0, 0, 1.0, 0, 0, [], 1.0, ())  # its sampled token is unread
                self.runner.positions[beam.slot] = beam.prompt_len
                self.row_state.active[beam.slot] = 1
            for beam in group.beams[1:]:
                self.prefixes.forget(beam.slot)         # its rows will hold another prompt
        self._beam_step(scheduler, logits, groups)

    def _beam_step(self, scheduler: Scheduler, logits: torch.Tensor, groups: list[BeamGroup]) -> None:
        """One step of each group's search, from its running beams' logits (rows in order): each beam
        takes its parent's K/V rows and its new token; a search that is done ends its request."""
        rules = [g.rules for g in groups]
        found = split_candidates(*self.beam_candidates(logits, rules), rules)
        failed, done, slots, tokens = step_searches(groups, found, logits.shape[-1], self.runner.cache)
        for group in failed + done:
            self._end_group(scheduler, group, failed=group in failed)
        if slots:
            self.runner.tokens[torch.tensor(slots, device=self.device)] = torch.tensor(tokens, device=self.device)

    def _end_group(self, scheduler: Scheduler, group: BeamGroup, failed: bool = False) -> None:
        """A search is done (or its logits were not finite): its request ends, every beam's slot is freed."""
        if failed:
            for beam in group.beams:
                self._fail_non_finite(beam)
        else:
            finish_group(group)
        for beam in group.beams:
            scheduler.release(beam)
            self.row_state.active[beam.slot] = 0
        self._finished.append(group.head)
