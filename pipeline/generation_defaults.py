"""The checkpoint's generation_config.json as the defaults of a run's decoding settings.

transformers' `generate` decodes as a checkpoint's generation_config.json says unless told otherwise
(vLLM too, by default), and so does our `model.generate`: a fine-tune shipped with `do_sample: true,
temperature: 0.6` samples there. A run (`generation_config="auto"`, the default) takes the settings
the file holds for those the job leaves at their defaults (and does not name in `given_settings`,
as the jobs do with the flags given), so its answers are the ones the model's own `generate` gives;
`"none"` ignores the file. Sampling follows transformers: the file's
temperature, top_k, top_p and cutoffs count only with `do_sample: true`, and then a file without
top_k samples among the 50 likeliest, as transformers' default. The settings it holds that a run
cannot follow are named in a warning.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING, fields, replace

from .checkpoint import generation_config_of
from .config import TOKEN_SETTINGS, PipelineConfig
from .storage import redact_url

log = logging.getLogger(__name__)
# the file's key -> the run's setting, each taken as it is
TAKEN = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens",
         "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
         "num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
         "stop_strings": "stop", **{name: name for name in TOKEN_SETTINGS}}
# with do_sample: the file's key -> (the run's setting, transformers' default where the file has none)
SAMPLED = {"temperature": ("temperature", 1.0), "top_k": ("top_k", 50), "top_p": ("top_p", None),
           "min_p": ("min_p", None), "typical_p": ("typical_p", None), "epsilon_cutoff": ("epsilon_cutoff", None),
           "eta_cutoff": ("eta_cutoff", None)}
SAMPLED_SETTINGS = {setting for setting, _ in SAMPLED.values()}
BEAM_SETTINGS = {"length_penalty", "early_stopping"}
SETTINGS = set(TAKEN.values()) | SAMPLED_SETTINGS       # the run's settings the file may set
# keys that change no answer of a run (ids it reads elsewhere, the cache, output formats, max_length:
# a run always sets max_new_tokens, which transformers lets win over it)
INERT = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
         "use_cache", "cache_implementation", "max_length", "do_sample", "num_return_sequences",
         "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states"}
NEUTRAL = {"num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
           "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0}


def job_defaults() -> dict:
    return {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(PipelineConfig)
            if f.default is not MISSING or f.default_factory is not MISSING}


def checkpoint_settings(generation_config: dict) -> dict:
    """The run settings the file asks for (setting -> value), sampling ones only with do_sample."""
    wanted = {setting: generation_config[key] for key, setting in TAKEN.items()
              if generation_config.get(key) is not None}
    if isinstance(wanted.get("stop"), str):
        wanted["stop"] = [wanted["stop"]]
    if generation_config.get("do_sample"):
        for key, (setting, default) in SAMPLED.items():
            value = generation_config.get(key, default)
            if value is not None:
                wanted[setting] = value
    return wanted


def unfollowed(generation_config: dict) -> list[str]:
    """The file's keys that would change answers and that a run does not follow."""
    known = TAKEN.keys() | SAMPLED.keys() | INERT
    return sorted(k for k, v in generation_config.items()
                  if k not in known and not k.startswith("_") and v not in (None, False, [], {})
                  and NEUTRAL.get(k, object()) != v)


def resolved(config: PipelineConfig) -> tuple[PipelineConfig, dict]:
    """`config` with the generation config it names read and taken (pipeline.checkpoint's
    generation_config_of: "auto", the checkpoint's; a path, that file), and the settings taken."""
    if config.generation_config == "none":
        return config, {}
    named = config.generation_config != "auto"
    found = generation_config_of(config.generation_config if named else config.model, config.storage_options,
                                 named=named)
    return with_checkpoint_defaults(config, found, config.generation_config if named else None)


def with_checkpoint_defaults(config: PipelineConfig, generation_config: dict,
                             source: str | None = None) -> tuple[PipelineConfig, dict]:
    """The run's settings with the file's for those left at their defaults, and the ones taken. A
    ValueError names the file (`source`, else the checkpoint's) where its settings make an impossible run."""
    if config.generation_config == "none" or not generation_config or config.score_column is not None:
        return config, {}       # a scoring run decodes nothing: the file's num_beams refused it, its temperature
                                # was announced
    whose = "the checkpoint's generation_config.json" if source is None else f"generation config {redact_url(source)!r}"
    defaults = job_defaults()
    taken = {name: value for name, value in checkpoint_settings(generation_config).items()
             if getattr(config, name) == defaults[name] != value and name not in config.given_settings}
    moot = set()        # settings of a way of decoding the run does not use: they would change nothing
    if taken.get("temperature", config.temperature) == 0:
        moot |= SAMPLED_SETTINGS
    if taken.get("num_beams", config.num_beams) == 1:
        moot |= BEAM_SETTINGS
    taken = {name: value for name, value in taken.items() if name not in moot}
    skipped = unfollowed(generation_config)
    if skipped:
        log.warning("%s sets %s, which a run does not follow", whose,
                    listed_settings({k: generation_config[k] for k in skipped}))
    if not taken:
        return config, {}
    try:
        taken_config = replace(config, **taken)
    except ValueError as e:
        raise ValueError(f"{whose} sets {listed_settings(taken)}, which makes this run "
                         f"impossible: {e}; set those settings yourself, or ignore the file (generation_config="
                         "'none', --generation-config none)") from None
    log.warning("decoding as %s asks, for the settings this run leaves at their defaults: %s "
                "(to ignore the file: generation_config='none', on the command line --generation-config none)", whose,
                listed_settings(taken))
    return taken_config, taken


def listed_settings(settings: dict) -> str:
    """name=value, ... (as the warnings and the printed summary name settings)."""
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())
