"""generate()'s settings as transformers' generate reads them: the caller's kwargs, then the
checkpoint's generation_config.json, then transformers' defaults; a setting this generate does not
follow is refused by name rather than ignored."""
from __future__ import annotations

from torch import Tensor, nn

from .engine.bad_words import check_bad_words, usable_bad_words
from .engine.biases import check_in_vocabulary, normalized_sequence_bias
from .engine.cutoffs import check_cutoffs
from .generation_hooks import ForcedToken, OutOfTime, SuppressedTokens, UserRules


def _setting(name: str, kwargs: dict, config: dict, default=None):
    """kwargs win, an explicit None too (transformers 5 sets it over the checkpoint's value: that step off),
    then generation_config.json, then the default."""
    if name in kwargs:
        return kwargs[name]
    return default if config.get(name) is None else config[name]


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, Tensor):
        return ids.flatten().tolist()
    return [ids] if isinstance(ids, int) else list(ids)


FOLLOWED = {"max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
            "repetition_penalty", "eos_token_id", "pad_token_id", "num_return_sequences", "no_repeat_ngram_size",
            "num_beams", "length_penalty", "early_stopping", "bad_words_ids", "min_p", "stop_strings",
            "typical_p", "epsilon_cutoff", "eta_cutoff", "prefix_allowed_tokens_fn", "logits_processor",
            "stopping_criteria", "streamer", "min_length", "suppress_tokens", "begin_suppress_tokens",
            "forced_bos_token_id", "forced_eos_token_id", "renormalize_logits", "max_time", "sequence_bias",
            "return_dict_in_generate", "output_scores", "output_logits"}
CUTOFFS = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}     # their neutral values
# transformers' settings that change nothing here: whatever their value, or at these values
UNUSED = {"bos_token_id", "decoder_start_token_id", "use_cache", "transformers_version", "cache_implementation",
          "cache_config", "return_legacy_cache", "compile_config",
          # assisted decoding's, which changes nothing without an assistant (assistant_model: refused)
          "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
          "assistant_lookbehind", "target_lookbehind"}
INERT = {"num_beam_groups": 1, "encoder_repetition_penalty": 1.0, "diversity_penalty": 0.0,
         "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0}


def check_settings(settings: dict, source: str) -> None:
    """ValueError naming a setting this generate does not follow at the value given (beam search,
    output dicts, other logits processors): running on without it would answer otherwise than the
    reference, silently."""
    for name, value in settings.items():
        if name in FOLLOWED or name in UNUSED or name.startswith("_") or _inert(name, value):
            continue
        what = "group beam search" if name == "num_beam_groups" else "it"
        shown = f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, Tensor) else repr(value)
        raise ValueError(f"generate does not implement {name}={shown} ({source}): {what} would change the "
                         f"answers; it follows {', '.join(sorted(FOLLOWED))}")


def _inert(name: str, value) -> bool:
    """Off: None, False, empty, or the neutral value of a setting that has one (0 is not off in general:
    top_h=0.0 is an error in transformers)."""
    if isinstance(value, Tensor):
        return value.numel() == 0
    return value is None or value is False or (name in INERT and value == INERT[name]) or value in ({}, [], ())


class GenerateSettings:
    """generate()'s settings: kwargs over the checkpoint's generation_config.json over transformers' defaults."""

    def __init__(self, model: nn.Module, prompt_len: int, kwargs: dict) -> None:
        cfg, text = getattr(model, "generation_config", None) or {}, model.config.text_config
        check_settings(kwargs, "given")
        check_settings({k: v for k, v in cfg.items() if k not in kwargs}, "the checkpoint's generation_config.json")
        setting = lambda name, default=None: _setting(name, kwargs, cfg, default)  # noqa: E731

        def get(name: str, default=None):   # None (given explicitly) is that step off: its neutral value
            value = setting(name, default)
            return default if value is None else value
        max_new, max_length = setting("max_new_tokens"), setting("max_length")
        if max_new is None:     # transformers 5: max_length counts the prompt; neither set: 20 new tokens (its
            # cap at config.max_position_embeddings never applies: Idefics3's is the text config's, not the top level's)
            max_new = (max_length if max_length is not None else prompt_len + 20) - prompt_len
        if max_new <= 0:        # as the reference: an answer of no token is a mistake, not a request
            raise ValueError(f"max_new_tokens must be greater than 0, got {max_new}" if get("max_new_tokens")
                             is not None else f"the prompt has {prompt_len} tokens and max_length is {max_length}: "
                             "no room for an answer (max_length counts the prompt; set max_new_tokens)")
        self.max_new = max_new
        min_new = setting("min_new_tokens")     # min_length counts the prompt; min_new_tokens wins over it
        self.min_new = min_new if min_new is not None else max(int(get("min_length", 0)) - prompt_len, 0)
        self.eos = _as_list(setting("eos_token_id", text.eos_token_id))
        self.given_pad = setting("pad_token_id", text.pad_token_id)
        self.pad = self.given_pad if self.given_pad is not None else (self.eos[0] if self.eos else 0)
        self.do_sample = bool(get("do_sample", False))
        self.temperature = float(get("temperature", 1.0)) if self.do_sample else 0.0
        top_k = setting("top_k", 50)        # 50 unless set; set to None: no top-k
        self.top_k, self.top_p = (0 if top_k is None else int(top_k)), float(get("top_p", 1.0))
        self.min_p = float(get("min_p", 0.0)) if self.do_sample else 0.0
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        typical, epsilon, eta = [float(get(name, default)) for name, default in CUTOFFS.items()]
        # the reference applies typical_p below 1 (refusing it at 0 or less), the others inside (0, 1): else none
        cutoffs = [typical if typical < 1 else 1.0, *(v if 0 < v < 1 else 0.0 for v in (epsilon, eta))]
        check_cutoffs(*cutoffs)
        self.typical_p, self.epsilon, self.eta = cutoffs if self.do_sample else CUTOFFS.values()
        self.cut_off = self.typical_p < 1 or self.epsilon > 0 or self.eta > 0
        self.penalty = float(get("repetition_penalty", 1.0))
        if self.penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.penalty}")
        if self.do_sample and not self.temperature > 0:       # NaN too
            raise ValueError(f"temperature must be > 0 with do_sample=True, got {self.temperature}")
        if self.do_sample and self.top_p < 0:
            raise ValueError(f"top_p must be in [0, 1] (0: the likeliest token only), got {self.top_p}")
        if self.do_sample and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: none) with do_sample=True, got {self.top_k}")
        self.no_repeat = max(int(get("no_repeat_ngram_size", 0)), 0)       # transformers: <= 0 is none
        bad_words = get("bad_words_ids") or []
        check_bad_words(bad_words, text.vocab_size)
        self.bad_words = usable_bad_words(bad_words, self.eos)
        self.sequence_bias = normalized_sequence_bias(get("sequence_bias") or ())
        check_in_vocabulary(text.vocab_size, self.sequence_bias)
        self.num_beams = int(get("num_beams", 1))
        self.length_penalty = float(get("length_penalty", 1.0))
        self.early_stopping = get("early_stopping", False)
        if self.num_beams < 1 or (self.num_beams > 1 and self.do_sample):
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}" if self.num_beams < 1 else
                             "beam search with do_sample=True (beam sampling) is not implemented: "
                             "search greedily (do_sample=False) or sample without beams")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self.copies = int(get("num_return_sequences", 1))
        if self.copies < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.copies}")
        if self.copies > self.num_beams and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.copies}: greedy decoding answers each prompt once; "
                             "sample (do_sample=True) for several answers" if self.num_beams == 1 else
                             f"num_return_sequences={self.copies} > num_beams={self.num_beams}: beam search "
                             "returns at most its beams")
        stops = get("stop_strings") or []
        self.stop_strings = [stops] if isinstance(stops, str) else list(stops)
        self.return_dict = bool(get("return_dict_in_generate", False))
        self.output_scores = self.return_dict and bool(get("output_scores", False))
        self.output_logits = self.return_dict and bool(get("output_logits", False))
        self.renormalize = bool(get("renormalize_logits", False))
        max_time = setting("max_time")
        processors = self._transformers_processors(get, prompt_len) + list(kwargs.get("logits_processor") or ())
        criteria = list(kwargs.get("stopping_criteria") or ()) + ([] if max_time is None else [OutOfTime(max_time)])
        self.user = UserRules(kwargs.get("prefix_allowed_tokens_fn"), processors, criteria,
                              rows_per_prompt=max(self.num_beams, self.copies))
        self.streamer = kwargs.get("streamer")     # put(prompt ids), put(each step's tokens), end(), as transformers'
        if self.streamer is not None and self.num_beams > 1:
            raise ValueError("a streamer cannot follow beam search (as transformers' generate): its beams change "
                             "their past tokens; set num_beams=1")

    def _transformers_processors(self, get, prompt_len: int) -> list:
        """transformers' forced_bos / forced_eos_token_id, suppress_tokens and begin_suppress_tokens,
        in its order (model.generation_hooks)."""
        forced_bos, forced_eos = get("forced_bos_token_id"), get("forced_eos_token_id")
        suppress, begin = get("suppress_tokens"), get("begin_suppress_tokens")
        for name, forced in (("forced_bos_token_id", forced_bos), ("forced_eos_token_id", forced_eos)):
            if forced is not None and suppress is not None and set(_as_list(forced)) <= set(_as_list(suppress)):
                raise ValueError(f"every token of {name} ({forced}) is also in suppress_tokens: nothing could be "
                                 "taken at its step (as transformers refuses it)")
        processors = [] if forced_bos is None else [ForcedToken([int(forced_bos)], 1)]
        if forced_eos is not None:
            processors.append(ForcedToken(_as_list(forced_eos), prompt_len + self.max_new - 1))
        if suppress is not None:
            processors.append(SuppressedTokens(_as_list(suppress)))
        if begin is not None:   # its first new token's step (the one after a forced bos of a 1-token prompt)
            first = prompt_len if prompt_len > 1 or forced_bos is None else prompt_len + 1
            processors.append(SuppressedTokens(_as_list(begin), first))
        return processors
