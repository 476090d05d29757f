"""LLMEngine: continuous batching over a static KV cache of slots.

Each step either prefills the next waiting requests that fit (free slots, token budget), packed
end to end with their images encoded together, or runs one decode step over every busy slot. A
finished request frees its slot at once, and the next waiting one takes it. Requests come all at
once (`generate`) or as they arrive (`add_requests` / `step`, and EngineLoop for other threads).
Requests naming the same image (`Request.image_key`) encode it once (image_cache) and, by default,
share the K/V of their prompt up to the image's end (prefix_cache): a later one prefills only its
own question. Its steps' parts live beside it: how a row's token is chosen (token_choice), the beam
searches' steps (beam_steps), how requests end and what they return (endings), the KV cache's size
(cache_sizing).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..fusion import fuse_projections
from ..linear import available_host_memory, pack_weights
from ..lm_head import pad_lm_head
from ..pointwise import compile_pointwise
from .beam_groups import add_companions
from .beam_steps import BeamSteps
from .cache_sizing import CacheSizing
from .constraints import EngineConstraints
from .continuation import folded, runnable_prefix
from .endings import RequestEndings
from .image_cache import ImageFeatureCache, ImageNames, keyed_by_shape
from .prefix_cache import SharedPrefixAdmission, SlotPrefixes
from .runner import ModelRunner, kv_bucket
from .logprobs import StepLogprobs, TokenLogprobs
from .sampler import NO_TOKEN_LEFT, NON_FINITE, model_tokens
from .samples import add_samples
from .scheduler import Scheduler, Sequence
from .scoring import add_scorers, answered, score_ends
from .stop_strings import StopStringMatcher
from .token_choice import TokenChoice
from .types import Request, Result
from .validation import check_request, check_search


def default_stop_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """eos ids of generation_config.json (else the text config), plus <end_of_utterance> if known."""
    eos = (getattr(model, "generation_config", None) or {}).get("eos_token_id")
    if eos is None:
        eos = model.config.text_config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    to_id = getattr(tokenizer, "token_to_id", None) or getattr(tokenizer, "convert_tokens_to_ids", None)
    eou = to_id("<end_of_utterance>") if to_id else None
    if isinstance(eou, int) and eou >= 0 and eou not in ids:
        ids.append(eou)
    return ids


@dataclass
class DecodeStep:
    """A queued decode step: the sequences it serves and where their tokens land on the host."""
    seqs: list[Sequence]
    tokens: torch.Tensor                     # (rows,) int64, indexed by slot
    ready: torch.cuda.Event | None           # CUDA: recorded after the copy to host memory
    logprobs: StepLogprobs | None = None     # when a request asks for them


class LLMEngine(CacheSizing, TokenChoice, BeamSteps, RequestEndings):
    """Serves `generate(requests)` from one model. The model is put in eval mode and its q/k/v and
    gate/up projections are fused in place (model.fusion: same state dict, same memory); on CPU in
    float32 (or bfloat16 where the CPU has it natively) the projections also get a copy packed for
    oneDNN (model.linear: ~1.6x faster decode, for a second copy of the weights, made only if it
    fits in half the available memory); on CUDA
    the LM head's rows are padded to an aligned count (model.lm_head: same state dict); and its
    norms, RoPE and activation run compiled or eagerly as this engine's decode step (model.pointwise:
    on a model shared by engines, the last one made decides)."""

    def __init__(self, model: nn.Module, tokenizer=None, max_batch_size: int = 64,
                 kv_cache_tokens: int | None = None, *, max_prefill_tokens: int = 8192,
                 use_cuda_graphs: bool = True, compile: bool | None = None, max_image_frames: int = 64,
                 overlap: bool | None = None, batched_prefill: bool | None = None,
                 image_cache_bytes: int = 256 << 20, share_prefixes: bool = True) -> None:
        free = available_host_memory()
        self.model = pack_weights(fuse_projections(model.eval()), None if free is None else free // 2)
        self.tokenizer = tokenizer
        self._stop_matcher: StopStringMatcher | None = None     # made when a request has stop strings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cuda":
            pad_lm_head(model)
        self.text_config = model.config.text_config
        self.constraints = EngineConstraints(tokenizer, self.text_config.vocab_size, self.device)
        self.max_batch_size, self.kv_cache_tokens = max_batch_size, kv_cache_tokens
        self.max_prefill_tokens, self.use_cuda_graphs = max_prefill_tokens, use_cuda_graphs
        self.max_image_frames = max_image_frames
        # CPU: compiled is slower (its GEMMs are MKL's, not packed oneDNN: 66 vs 34 ms a step at
        # SmolVLM-256M shapes, batch 8) and takes minutes to build.
        self.compile = self.device.type == "cuda" if compile is None else compile
        compile_pointwise(model, self.compile)      # the prefill's norms, RoPE and activation
        # Overlap: decode step N+1 is queued before step N's tokens are read, so the device never waits
        # on the host's bookkeeping. On CPU a step ends before the host goes on, so there is nothing to
        # hide, only a wasted step when the last rows end on a stop token: off by default.
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.batched_prefill = batched_prefill      # None: on CUDA (see PackedPrefillAttention)
        self.stop_ids = default_stop_ids(model, tokenizer)
        self.image_cache = ImageFeatureCache(image_cache_bytes)     # requests naming the same image
        self.share_prefixes = share_prefixes
        self.prefixes = SlotPrefixes(model.config.image_token_id)   # ... and their prompts' K/V
        self.runner: ModelRunner | None = None
        self._scheduler: Scheduler | None = None    # None: a new one, over the current cache's slots
        self._pending: list[Sequence] = []          # added, not yet in the scheduler
        self._in_flight: DecodeStep | None = None
        self._finished: list[Sequence] = []         # finished since the last step returned
        self._rng = random.Random()
        self.image_names = ImageNames()             # for the samples and scorers of unnamed images
        self.stats = {"prefill_s": 0.0, "prefills": 0, "decode_s": 0.0, "decode_steps": 0, "decode_tokens": 0,
                      "images_encoded": 0, "prefix_tokens_reused": 0}

    # ---- requests -----------------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """ValueError naming the request if the engine cannot run it (checked before any work starts)."""
        check_request(request, self.model.config, has_tokenizer=self.tokenizer is not None)
        check_search(request, self._stop_ids(request), self.max_batch_size, self.text_config.vocab_size)
        if self.kv_cache_tokens is not None:        # a set budget: one too small fails the request, not a step
            need = self._positions_needed(self._sequence(request))     # what its admission will ask of the cache
            if not self._fits_set_budget(need, request.sampling.num_beams):
                raise ValueError(f"request {request.request_id!r}: KV cache budget too small for one sequence of "
                                 f"its {need} positions (kv_cache_tokens={self.kv_cache_tokens})")
        if request.sampling.constrained:
            self.constraints.check(request, self._stop_ids(request))

    def _stop_ids(self, request: Request) -> frozenset[int]:
        stop = request.sampling.stop_token_ids
        return frozenset(self.stop_ids if stop is None else stop)

    def _sequence(self, request: Request) -> Sequence:
        # As vLLM's: an answer that would outgrow the context ends there, "length"; not an error.
        request, scored = folded(request)
        room = self.text_config.max_position_embeddings - len(request.prompt_ids)
        return Sequence(request, self._stop_ids(request), max_new_tokens=min(request.sampling.max_new_tokens, room),
                        scored=scored)

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Result]:
        """Answers in the order of `requests`."""
        if self.has_unfinished():
            raise RuntimeError("generate() while requests added with add_requests() are unfinished")
        seqs = self._add(requests)
        while any(not s.all_finished for s in seqs):
            self._step()
        return [self._result(s) for s in seqs]

    # ---- streaming: requests join the running batch as they come --------------------------------
    def add_requests(self, requests: list[Request]) -> None:
        """Queue requests (all checked first: a ValueError names the bad one, and none is queued).
        `step()` returns their results as they finish, whatever else is running."""
        self._add(requests)

    @torch.inference_mode()
    def step(self) -> list[Result]:
        """One prefill or one decode step; the results of the requests that finished in it."""
        return [self._result(s) for s in answered(self._step())]

    def has_unfinished(self) -> bool:
        return bool(self._pending) or (self._scheduler is not None and not self._scheduler.done)

    def device_ok(self) -> bool:
        """Whether the device still runs work: after an illegal address or a device-side assert, every
        CUDA call fails (the context is lost), so a failed step's rows are not to blame."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
            return True
        except Exception:       # torch.AcceleratorError (a RuntimeError) or whatever this build raises
            return False

    @torch.inference_mode()              # the slots' flags are inference tensors
    def abort(self) -> None:
        """Drop every unfinished request (after a failed step the engine's state is unknown)."""
        self._pending, self._scheduler, self._in_flight, self._finished = [], None, None, []
        self.prefixes.clear()           # a failed prefill may have written some slots' rows
        if self.runner is not None:
            self.row_state.active.zero_()   # dropped rows' positions must stop advancing (past the cache's end)

    def _add(self, requests: list[Request]) -> list[Sequence]:
        for r in requests:
            self.check_request(r)
        seqs = [self._sequence(keyed_by_shape(r)) for r in requests]
        for seq in seqs:
            self._pending.append(seq)
            p = seq.request.sampling
            if p.num_beams > 1:
                add_companions(seq, self._sequence)
                continue
            if p.n > 1 or p.choice_logprobs:
                seq.request = self.image_names.named(seq.request)
            if p.n > 1:
                self._pending += add_samples(seq, self._sequence)
            if seq.request.sampling.choice_logprobs:
                self._pending += self._within_set_budget(add_scorers(seq, self.tokenizer, self._sequence))
        return seqs

    def _admit_pending(self) -> None:
        """Pending requests join the scheduler in arrival order while they fit the cache. The cache
        is (re)sized only when nothing runs; a request too long for it waits for that, and so do
        the ones behind it (none overtakes it for ever)."""
        if not self._pending:
            return
        if self._scheduler is None or self._scheduler.done:
            self._size_cache_for_pending()
            if self._scheduler is None:
                self._scheduler = Scheduler(self.slots, self.max_prefill_tokens)
        while self._pending and self._positions_needed(self._pending[0]) <= self.runner.cache.max_len:
            seq = self._pending[0]
            if Scheduler.slots_needed(seq) > self.slots:
                if Scheduler.slots_needed(seq) <= self._slots_for(self._positions_needed(seq)):
                    break       # a cache sized for it alone has room: it waits until nothing runs
                self._pending.pop(0)        # beams the memory has no room for: never admitted
                seq.finish_reason = "error"
                seq.error = (f"ValueError: its {seq.request.sampling.num_beams} beams need as many slots, and the "
                             f"KV cache has room for {self._slots_for(self._positions_needed(seq))}")
                self._finished.append(seq)
                continue
            self._scheduler.add(self._pending.pop(0))

    def _step(self) -> list[Sequence]:
        if not self.has_unfinished():
            return []
        start = time.perf_counter()
        try:
            self._admit_pending()           # may size the cache, and find it too small
            scheduler = self._scheduler
            if scheduler.can_admit():
                self._collect(scheduler, self._in_flight)          # frees slots before admitting
                self._in_flight = None
                policy = SharedPrefixAdmission(self.prefixes, scheduler.waiting) if self.share_prefixes else None
                self._prefill(scheduler, scheduler.admit(policy))
                self.stats["prefill_s"] += time.perf_counter() - start
                self.stats["prefills"] += 1
            else:
                launched = self._launch_decode(scheduler, self._in_flight)
                self._collect(scheduler, self._in_flight)
                self._in_flight = launched
                if not self.overlap:
                    self._collect(scheduler, launched)
                    self._in_flight = None
                self.stats["decode_s"] += time.perf_counter() - start
        except BaseException:
            self.abort()
            raise
        finished, self._finished = self._finished, []
        return finished

    # ---- steps --------------------------------------------------------------------------------
    def _prefill(self, scheduler: Scheduler, seqs: list[Sequence]) -> None:
        runner = self.runner

        def encode(pixel_values: list, masks: list) -> list:
            self.stats["images_encoded"] += len(pixel_values)
            return runner.image_features(pixel_values, masks)

        requests, slots = [s.request for s in seqs], [s.slot for s in seqs]
        sources = self.prefixes.plan(requests, slots) if self.share_prefixes else [None] * len(seqs)
        prefixes = [0 if source is None else runnable_prefix(source.length, s.prompt_len, s.scored)
                    for s, source in zip(seqs, sources)]
        for slot, source, n in zip(slots, sources, prefixes):
            if n:
                runner.cache.copy_prefix(source.slot, slot, n)
        self.stats["prefix_tokens_reused"] += sum(prefixes)
        image = self.model.config.image_token_id
        unseen = [i for i, (r, n) in enumerate(zip(requests, prefixes)) if image in r.prompt_ids[n:]]
        features = [None] * len(seqs)
        for i, f in zip(unseen, self.image_cache.features([requests[i] for i in unseen], encode)):
            features[i] = f
        logits, scored = runner.prefill([r.prompt_ids for r in requests], features, slots, prefixes,
                                        [s.scored for s in seqs])
        if self.share_prefixes:
            self.prefixes.remember(requests, slots)
        # decode steps write every row up to the highest busy slot, a free one at its position: past
        # its prompt, whose K/V other requests may copy (a request of no answer frees its slot now)
        runner.positions[torch.tensor(slots, device=self.device)] = torch.tensor(
            [s.prompt_len for s in seqs], device=self.device)
        read = [(seq, log_p) for seq, log_p in zip(seqs, scored) if log_p is not None]
        if read:            # in one host sync
            values, start = torch.cat([log_p for _, log_p in read]).tolist(), 0
            for seq, log_p in read:
                seq.continuation_logprobs, start = values[start:start + len(log_p)], start + len(log_p)
        score_ends(seqs, logits)
        seqs, logits, slots = self._end_scored_only(scheduler, seqs, logits, slots)
        heads = [i for i, s in enumerate(seqs) if s.companions]
        if heads:
            self._start_beams(scheduler, [seqs[i] for i in heads], logits[heads])
            keep = [i for i, s in enumerate(seqs) if not s.companions]
            seqs, logits, slots = [seqs[i] for i in keep], logits[keep], [slots[i] for i in keep]
        if not seqs:
            return
        for seq in seqs:
            self._assign_sampling(seq)
        slot_t = torch.tensor(slots, device=self.device)
        tokens, logprobs = self._next_tokens(logits, slot_t, seqs, list(range(len(seqs))))
        runner.tokens[slot_t] = model_tokens(tokens)
        self.row_state.active[slot_t] = 1
        self.row_state.sampling.step[slot_t] += 1
        self._record(scheduler, seqs, tokens.tolist(), None if logprobs is None else logprobs.rows(range(len(seqs))))

    def _launch_decode(self, scheduler: Scheduler, in_flight: DecodeStep | None) -> DecodeStep | None:
        """Queue one decode step over the running sequences; its tokens reach the host later.
        With a step in flight, each sequence is one token longer than recorded, and those whose
        in-flight token is their last (max_new_tokens) are left out. None (collect first) if that
        leaves none, or if their slots would let waiting requests in (Scheduler.can_admit)."""
        lag = in_flight is not None
        if lag and any(s.request.sampling.follows_answer for s in in_flight.seqs):
            return None      # their next allowed tokens depend on the token in flight
        # a beam's answer is up to date (its search read its step's tokens at once)
        beams = [s for s in scheduler.running.values() if s.beam is not None]
        seqs = [s for s in scheduler.running.values() if s.beam is None and not (lag and s.last_token_pending())]
        finishing = len(scheduler.running) - len(seqs) - len(beams)
        if not (seqs or beams) or (finishing and scheduler.can_admit(finishing)):
            return None
        runner = self.runner
        rows = runner.decode_rows(scheduler.decode_batch_size())
        kv_len = kv_bucket(max(s.length for s in seqs + beams) + lag, runner.cache.max_len)
        logits = runner.decode(rows, kv_len)
        tokens, logprobs = self._next_tokens(logits, runner.slot_ids[:rows], seqs, [s.slot for s in seqs])
        runner.tokens[:rows] = model_tokens(tokens)
        if beams:
            groups = list({id(s.beam): s.beam for s in beams}.values())
            self._beam_step(scheduler, logits[[s.slot for g in groups for s in g.running()]], groups)
        runner.positions[:rows] += self.row_state.active[:rows]
        self.row_state.sampling.step[:rows] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(seqs) + len(beams)
        if self.device.type != "cuda":
            return DecodeStep(seqs, tokens, None, logprobs)
        self.row_state.host_tokens.reverse()        # the other buffer may hold the unread step in flight
        self.row_state.host_logprobs.reverse()
        host = self.row_state.host_tokens[0][:rows]
        host.copy_(tokens, non_blocking=True)
        if logprobs is not None:
            logprobs = logprobs.copied_to(self.row_state.host_logprobs[0])
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))     # the copy's stream, whatever device is current
        return DecodeStep(seqs, host, ready, logprobs)

    def _collect(self, scheduler: Scheduler, step: DecodeStep | None) -> None:
        """Record a launched step's tokens (the step's one host sync); rows of sequences that
        finished meanwhile are dropped."""
        if step is None:
            return
        if step.ready is not None:
            step.ready.synchronize()
        host = step.tokens.tolist()
        live = [s for s in step.seqs if s.finish_reason is None]
        self._record(scheduler, live, [host[s.slot] for s in live],
                     None if step.logprobs is None else step.logprobs.rows([s.slot for s in live]))

    def _record(self, scheduler: Scheduler, seqs: list[Sequence], tokens: list[int],
                logprobs: list[TokenLogprobs] | None = None) -> None:
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if token == NON_FINITE:
                self._fail_non_finite(seq)
            elif token == NO_TOKEN_LEFT:
                self._fail_no_token(seq)
            else:
                if logprobs is not None:
                    seq.add_logprobs(*logprobs[i])
                seq.append(token)
                if seq.finish_reason != "stop" and self._completes_stop_string(seq) and \
                        self.constraints.is_whole(seq):
                    seq.finish_reason = "stop"
            if seq.finish_reason is not None:
                scheduler.release(seq)
                self.row_state.active[seq.slot] = 0
                self._finished.append(seq)
