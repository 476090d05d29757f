"""`generate()` with the reference's semantics, on the engine's static KV cache.

A left-padded batch is run as in transformers' `generate`: positions cumsum(attention_mask) - 1,
image features computed once and scattered only in the prefill, decode steps that feed one token
per row, rows stopped by an eos id (then padded with pad_token_id), prompt + new tokens returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .engine.kv_cache import KVCache, PaddedCacheAttention
from .engine.beams import BeamRules, BeamSearch, beam_log_probs, best_candidates, split_candidates
from .engine.bad_words import banned_by_bad_words
from .engine.biases import bias_tensor, biases_after
from .engine.ngrams import NGrams, allowed_without
from .engine.sampler import SamplingState, draw, processed_scores, sample
from .engine.stop_strings import StopStringMatcher
from .generation_hooks import UserRules
from .generation_settings import GenerateSettings


@dataclass
class GenerateOutput:
    """generate()'s answer with return_dict_in_generate=True, as transformers' GenerateDecoderOnlyOutput
    (and GenerateBeamDecoderOnlyOutput): read by attribute or by key. scores (output_scores): each
    step's (rows, V) float32 logits as the processors left them (beam search: the beams' processed
    log p); logits (output_logits): each step's raw float32 logits; beam search adds
    sequences_scores (each answer's length-penalised log p, with output_scores) and beam_indices
    (the row of `scores` each answer's token came from, -1 past its end)."""
    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    sequences_scores: Tensor | None = None
    beam_indices: Tensor | None = None
    attentions: None = None         # transformers' fields never given here (output_attentions is refused,
    hidden_states: None = None      # the cache is the engine's own): None, as theirs when not asked for
    cache: None = None

    @property
    def past_key_values(self) -> None:      # transformers' older name of `cache`
        return self.cache

    def __getitem__(self, key: str | int):
        return self.to_tuple()[key] if isinstance(key, int) else getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> list[str]:
        """The fields given, in transformers' order (its beam search output's puts sequences_scores second)."""
        order = BEAM_FIELDS if self.beam_indices is not None else DECODER_FIELDS
        return [name for name in order if getattr(self, name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())


DECODER_FIELDS = ("sequences", "scores", "logits", "attentions", "hidden_states", "cache")
BEAM_FIELDS = ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states",
               "cache")


def transition_scores(sequences: Tensor, scores: tuple[Tensor, ...], beam_indices: Tensor | None = None,
                      normalize_logits: bool = False) -> Tensor:
    """(rows, steps) score of each generated token (transformers' compute_transition_scores): read
    from `scores` at the token's row (a beam search's beam_indices; 0 past an answer's end), log-
    softmaxed first if normalize_logits."""
    stacked = torch.stack(scores, dim=1)                                  # (rows of scores, steps, V)
    if normalize_logits:
        stacked = stacked.log_softmax(dim=-1)
    if beam_indices is None:
        beam_indices = torch.arange(stacked.shape[0], device=stacked.device)[:, None].expand(-1, stacked.shape[1])
    ended = beam_indices < 0
    steps = int((~ended).sum(-1).max())
    rows, ended = beam_indices[:, :steps].clamp_min(0).long(), ended[:, :steps]
    tokens = sequences[:, sequences.shape[-1] - steps:]
    picked = stacked[rows, torch.arange(steps, device=rows.device)[None, :], tokens]
    return picked.masked_fill(ended, 0.0)


def _sampling_state(s: GenerateSettings, input_ids: Tensor, mask: Tensor, vocab: int) -> SamplingState:
    batch = input_ids.shape[0]
    state = SamplingState.empty(batch, vocab, input_ids.device)
    # torch.manual_seed makes sampling repeatable; greedy leaves the global generator alone.
    seeds = torch.randint(0, 2 ** 62, (batch,)).tolist() if s.do_sample else [0] * batch
    for row in range(batch):
        prompt = penalised_prompt(input_ids[row], mask[row]) if s.penalty != 1.0 else []
        state.assign(row, s.temperature, s.top_k, s.top_p, seeds[row], s.min_new, s.eos, s.penalty, prompt, s.min_p,
                     s.typical_p, s.epsilon, s.eta)
    return state


def penalised_prompt(row: Tensor, row_mask: Tensor) -> list[int]:
    """The prompt ids the repetition penalty counts, as the reference: from the first attended one on
    (left padding not; right padding and the mask's holes, which it does not look at, yes)."""
    return row[int((row_mask != 0).int().argmax()):].tolist()


def mask_from_padding(input_ids: Tensor, s: GenerateSettings) -> Tensor:
    """No attention_mask: the reference's guess, the pad id's places are padding where the pad id is
    set, not an eos id, and in the prompt; else every place is attended."""
    if s.given_pad is None or s.given_pad in s.eos or not bool((input_ids == s.given_pad).any()):
        return torch.ones_like(input_ids)
    return (input_ids != s.given_pad).long()


def _prefill_embeddings(model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None,
                        pixel_attention_mask: Tensor | None) -> Tensor:
    embeds = model.model.text_model.embed_tokens(input_ids)
    if pixel_values is None:
        return embeds
    features = model.model.get_image_features(pixel_values, pixel_attention_mask)
    return model.model.merge_image_features(input_ids, embeds, features)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
             pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None,
             tokenizer=None, **kwargs) -> Tensor | GenerateOutput:
    """(B, T) prompt ids (left-padded) -> (B, T + n_new) LongTensor, like transformers' generate.

    Settings (kwargs over generation_config.json; model.generation_settings): max_new_tokens /
    max_length, min_new_tokens / min_length, suppress_tokens, begin_suppress_tokens, forced_bos /
    forced_eos_token_id, renormalize_logits, max_time, sequence_bias,
    do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids, eos_token_id,
    pad_token_id, num_return_sequences (k sampled answers a prompt: rows b*k .. b*k+k-1 are prompt b's),
    stop_strings (with `tokenizer`, ours or transformers', as the reference asks), and beam search:
    num_beams, length_penalty, early_stopping (num_return_sequences: the best beams);
    typical_p, epsilon_cutoff, eta_cutoff; return_dict_in_generate with output_scores / output_logits
    (a GenerateOutput); the caller's prefix_allowed_tokens_fn, logits_processor, stopping_criteria
    (model.generation_hooks) and streamer.
    """
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("generate needs input_ids of shape (batch, seq_len)" + (
            " (not inputs_embeds: the images' places are found by their ids)" if "inputs_embeds" in kwargs else ""))
    param = next(model.parameters())
    input_ids = input_ids.to(param.device)
    batch, prompt_len = input_ids.shape
    s = GenerateSettings(model, prompt_len, kwargs)
    if s.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., "
                         "tokenizer=processor.tokenizer)")
    if s.streamer is not None:      # as the reference: each answer's rows (num_return_sequences)
        s.streamer.put(input_ids.repeat_interleave(s.copies, dim=0).cpu())
    mask = mask_from_padding(input_ids, s) if attention_mask is None else attention_mask.to(param.device)
    embeds = _prefill_embeddings(model, input_ids, pixel_values, pixel_attention_mask)   # each image once
    if s.num_beams > 1:
        return _beam_generate(model, s, input_ids, mask, embeds, tokenizer)
    if s.copies > 1:
        input_ids, mask, embeds = (t.repeat_interleave(s.copies, dim=0) for t in (input_ids, mask, embeds))
        batch *= s.copies
    text, tc = model.model.text_model, model.config.text_config
    cache = KVCache(tc.num_hidden_layers, batch, tc.num_key_value_heads, prompt_len + s.max_new,
                    tc.head_dim, param.dtype, param.device)
    key_mask = torch.ones(batch, prompt_len + s.max_new, dtype=torch.bool, device=param.device)
    key_mask[:, :prompt_len] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    state = _sampling_state(s, input_ids, mask, tc.vocab_size)
    rows = torch.arange(batch, device=param.device)

    hidden = text(inputs_embeds=embeds, position_ids=positions, attention=PaddedCacheAttention(cache, key_mask, 0))
    logits = model.lm_head(hidden[:, -1])
    eos = torch.tensor(s.eos, dtype=torch.int64, device=param.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=param.device)
    position = positions[:, -1:]
    new_tokens = []
    # as the reference: every row's ids, its left padding and a finished row's padding included
    ids = input_ids.tolist() if s.no_repeat or s.bad_words or s.stop_strings or s.sequence_bias else []
    matcher = StopStringMatcher(tokenizer) if s.stop_strings else None
    ngrams = [NGrams(s.no_repeat, row) for row in ids] if s.no_repeat else []
    scores, raw_logits = [], []
    running = input_ids         # each row's ids so far, for the caller's rules
    for step in range(s.max_new):
        bans = [(row, banned_by_bad_words(history, s.bad_words)) for row, history in enumerate(ids) if s.bad_words]
        bans += [(row, ngram.banned()) for row, ngram in enumerate(ngrams)]
        allowed = allowed_without(bans, *logits.shape, logits.device)
        if s.output_logits:
            raw_logits.append(logits.float())
        bias = bias_tensor([(row, biases_after(history, s.sequence_bias)) for row, history in enumerate(ids)],
                           *logits.shape, logits.device) if s.sequence_bias else None
        token = _next_token(s, logits, state, rows, allowed, running, scores, bias)
        token = torch.where(unfinished, token, s.pad)
        if s.streamer is not None:
            s.streamer.put(token.cpu())
        if s.user.reads_ids:
            running = torch.cat([running, token[:, None]], dim=1)
        for row, t in zip(ids, token.tolist() if ids else ()):
            row.append(t)
        for row, t in zip(ngrams, token.tolist() if ngrams else ()):
            row.extend([t])
        if s.penalty != 1.0:
            state.mark_seen(rows, token)
        new_tokens.append(token)
        state.step += 1
        unfinished &= ~torch.isin(token, eos)
        if matcher is not None:         # as the reference: a stop string may begin in the prompt
            unfinished &= ~torch.tensor([matcher.completes(row, s.stop_strings) for row in ids], device=token.device)
        if s.user.stops:
            unfinished &= ~s.user.stopped(running, tuple(scores) if s.output_scores else None)
        if step == s.max_new - 1 or not bool(unfinished.any()):
            break
        position = position + 1
        attention = PaddedCacheAttention(cache, key_mask, prompt_len + step)
        hidden = text(input_ids=token[:, None], position_ids=position, attention=attention)
        logits = model.lm_head(hidden[:, -1])
    if s.streamer is not None:
        s.streamer.end()
    return _answer(s, torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1), scores, raw_logits)


def _next_token(s: GenerateSettings, logits: Tensor, state: SamplingState, rows: Tensor, allowed: Tensor | None,
                running: Tensor, scores: list[Tensor], bias: Tensor | None = None) -> Tensor:
    """Each row's next token; its processed scores join `scores` where they are asked for (then
    the token is drawn from them, so that they explain it), as are the caller's processors."""
    if not (s.output_scores or s.user.processes or s.renormalize):
        return sample(logits, state, rows, any_sampling=s.do_sample, any_filter=s.do_sample,
                      any_penalty=s.penalty != 1.0, any_min_p=s.min_p > 0, any_cutoffs=s.cut_off, allowed=allowed,
                      bias=bias)
    between = (lambda x: s.user.process(running, x)) if s.user.processes else None
    processed = processed_scores(logits, state, rows, any_sampling=s.do_sample, any_penalty=s.penalty != 1.0,
                                 any_cutoffs=s.cut_off, allowed=allowed, between=between, bias=bias)
    if s.renormalize:       # transformers' last processor: scores as log p
        processed = processed.log_softmax(dim=-1)
    if s.output_scores:
        scores.append(processed)
    return draw(processed, state, rows, any_sampling=s.do_sample)


def _answer(s: GenerateSettings, sequences: Tensor, scores: list[Tensor], logits: list[Tensor],
            **beams) -> Tensor | GenerateOutput:
    if not s.return_dict:
        return sequences
    return GenerateOutput(sequences, tuple(scores) if s.output_scores else None,
                          tuple(logits) if s.output_logits else None, **beams)


def _beam_generate(model: nn.Module, s: GenerateSettings, input_ids: Tensor, mask: Tensor, embeds: Tensor,
                   tokenizer=None) -> Tensor:
    """generate() by beam search (model.engine.beams): every prompt's beams in one batch of
    batch * num_beams rows, whose K/V each step gathers from their parents' rows."""
    text, tc, device = model.model.text_model, model.config.text_config, input_ids.device
    batch, prompt_len = input_ids.shape
    k = s.num_beams
    cache = KVCache(tc.num_hidden_layers, batch * k, tc.num_key_value_heads, prompt_len + s.max_new,
                    tc.head_dim, embeds.dtype, device)
    key_mask = torch.ones(batch * k, prompt_len + s.max_new, dtype=torch.bool, device=device)
    key_mask[:, :prompt_len] = mask.bool().repeat_interleave(k, dim=0)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    hidden = text(inputs_embeds=embeds, position_ids=positions, attention=PaddedCacheAttention(cache, key_mask[::k], 0))
    logits = model.lm_head(hidden[:, -1])
    matcher = StopStringMatcher(tokenizer) if s.stop_strings else None
    searches = [BeamSearch(k, s.eos, s.max_new, s.length_penalty, s.early_stopping,
                           matcher and matcher.after(row, s.stop_strings)) for row in input_ids.tolist()]
    rules = [BeamRules(search, tc.vocab_size, device, prompt_ids=row.tolist(), min_new_tokens=s.min_new,
                       repetition_penalty=s.penalty, no_repeat_ngram_size=s.no_repeat, bad_words=s.bad_words,
                       sequence_bias=s.sequence_bias,
                       penalized_ids=penalised_prompt(row, row_mask))
             for search, row, row_mask in zip(searches, input_ids, mask)]
    next_position = positions[:, -1].repeat_interleave(k) + 1
    step_scores, raw_logits = [], []
    for step in range(s.max_new):
        rows_now = 1 if step == 0 else k          # beams a prompt had at this step
        parents = []
        log_probs = beam_log_probs(logits, rules)
        if s.user.processes:
            log_probs = _user_processed(s.user, input_ids, searches, log_probs, k)
        if s.renormalize:
            log_probs = log_probs.log_softmax(dim=-1)
        if s.output_logits:         # as the reference's: a row per beam from the first step on
            raw_logits.append(logits.float().repeat_interleave(k // rows_now, dim=0))
        if s.output_scores:
            step_scores.append(log_probs.repeat_interleave(k // rows_now, dim=0))
        found = split_candidates(*best_candidates(log_probs, rules), rules)
        stopped = (_user_stopped(s.user, input_ids, searches, found, logits.shape[-1],
                                 tuple(step_scores) if s.output_scores else None) if s.user.stops else None)
        for b, (search, rule, (scores, ids)) in enumerate(zip(searches, rules, found)):
            search.advance(scores, ids, logits.shape[-1], None if stopped is None else stopped[b])
            rule.follow()
            parents += [b * rows_now + p for p in search.parents]
        if all(search.done for search in searches):
            break
        # after the first step a prompt's beams share its rows: only their answers' move
        start, end = 0 if step == 0 else prompt_len, prompt_len + step
        index = torch.tensor(parents, device=device)
        cache.k[:, :, :, start:end] = cache.k[:, index, :, start:end]
        cache.v[:, :, :, start:end] = cache.v[:, index, :, start:end]
        tokens = torch.tensor([beam[-1] for search in searches for beam in search.beams], device=device)
        attention = PaddedCacheAttention(cache, key_mask, end)
        hidden = text(input_ids=tokens[:, None], position_ids=(next_position + step)[:, None], attention=attention)
        logits = model.lm_head(hidden[:, -1])
    best = [(b, search, h) for b, search in enumerate(searches) for h in search.best(s.copies)]
    fill = s.pad if s.pad else (s.eos[0] if s.eos else -1)       # the reference's fill: pad, unless it is 0
    width = max(len(h.tokens) for *_, h in best)
    new = torch.tensor([h.tokens + [fill] * (width - len(h.tokens)) for *_, h in best], dtype=torch.int64,
                       device=device)
    sequences = torch.cat([input_ids.repeat_interleave(s.copies, dim=0), new], dim=1)
    if not s.return_dict:
        return sequences
    paths = [[b * k + j for j in search.path(h)] + [-1] * (width - len(h.tokens)) for b, search, h in best]
    sequences_scores = torch.tensor([h.score for *_, h in best], device=device) if s.output_scores else None
    return _answer(s, sequences, step_scores, raw_logits, sequences_scores=sequences_scores,
                   beam_indices=torch.tensor(paths, dtype=torch.int32, device=device))


def _beam_ids(input_ids: Tensor, searches: list[BeamSearch]) -> Tensor:
    """The running beams' ids (prompt, answer so far), a search's beams in a row."""
    beams = [beam for search in searches for beam in search.beams]
    answers = torch.tensor(beams, dtype=torch.int64, device=input_ids.device).reshape(len(beams), len(beams[0]))
    return torch.cat([input_ids.repeat_interleave(len(searches[0].beams), dim=0), answers], dim=1)


def _user_processed(user: UserRules, input_ids: Tensor, searches: list[BeamSearch], log_probs: Tensor,
                    k: int) -> Tensor:
    """The beams' log p after the caller's processors, which read num_beams rows a prompt from the
    first step on, as the reference's (its first step's beams are copies of the prompt)."""
    ids = _beam_ids(input_ids, searches)
    copies = k // len(searches[0].beams)
    processed = user.process(ids.repeat_interleave(copies, dim=0), log_probs.repeat_interleave(copies, dim=0))
    return processed[::copies]


def _user_stopped(user: UserRules, input_ids: Tensor, searches: list[BeamSearch],
                  found: list[tuple[list[float], list[int]]], vocab: int, scores) -> list[list[bool]]:
    """For each search, which of its candidates the caller's stopping criteria end, all read at once
    (the candidates' ids: prompt, parent beam's answer, the token)."""
    rows = [(b, i // vocab, i % vocab) for b, (_, ids) in enumerate(found) for i in ids]
    answers = [searches[b].beams[parent] + [token] for b, parent, token in rows]
    ids = torch.cat([input_ids[[b for b, *_ in rows]], torch.tensor(answers, device=input_ids.device)], dim=1)
    done, start = user.stopped(ids, scores).tolist(), 0
    out = []
    for _, ids_of_search in found:
        out.append(done[start:start + len(ids_of_search)])
        start += len(ids_of_search)
    return out
