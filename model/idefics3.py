"""Idefics3Model (vision tower + connector + Llama) and Idefics3ForConditionalGeneration (LM head, loss)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Idefics3Config
from .connector import Idefics3Connector
from .linear import Linear
from .llama import AttentionBackend, LlamaModel
from .vision import Idefics3VisionTransformer

IGNORE_INDEX = -100


def as_config(config: Any) -> Idefics3Config:
    """Ours, or another library's Idefics3Config (transformers': it has to_dict) read as ours."""
    if isinstance(config, Idefics3Config):
        return config
    if callable(getattr(config, "to_dict", None)):
        return Idefics3Config.from_dict(config.to_dict())
    raise TypeError(f"config must be an Idefics3Config, got {type(config).__name__}")


class _Output:
    """Read as transformers' ModelOutput: by name, or by position among the fields that are set, in
    the reference's order (`model(**inputs)[0]`: the loss where labels were given, else the logits)."""
    ORDER: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return [name for name in self.ORDER if getattr(self, name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key: str | int | slice) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class Idefics3ModelOutput(_Output):
    last_hidden_state: Tensor
    image_hidden_states: Tensor | None = None   # (n_real_frames, S, Dt) when images were encoded
    ORDER = ("last_hidden_state", "image_hidden_states")


@dataclass
class Idefics3CausalLMOutput(_Output):
    logits: Tensor
    loss: Tensor | None = None
    image_hidden_states: Tensor | None = None
    ORDER = ("loss", "logits", "image_hidden_states")


class _PretrainedMixin:
    """from_pretrained / save_pretrained / dtype / device shared by both model classes."""

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, **kwargs):
        from .loading import load_pretrained
        return load_pretrained(cls, path_or_id, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, path: str | Path) -> Path:
        from .loading import save_pretrained
        return save_pretrained(self, path)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _frames(x: Tensor, trailing: int) -> Tensor:
    """(B, F, *rest) or (n, *rest) -> (n, *rest), where rest has `trailing` dims."""
    return x.reshape(-1, *x.shape[-trailing:]) if x.dim() == trailing + 2 else x


class Idefics3Model(_PretrainedMixin, nn.Module):
    def __init__(self, config: Idefics3Config):
        super().__init__()
        self.config = config = as_config(config)
        self.vision_model = Idefics3VisionTransformer(config.vision_config)
        self.connector = Idefics3Connector(config)
        self.text_model = LlamaModel(config.text_config)
        self.generation_config: dict = {}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def patch_mask(self, pixel_attention_mask: Tensor) -> Tensor:
        """A patch is valid iff any pixel of its p x p block is (trailing pixels beyond a multiple of p ignored)."""
        p = self.config.vision_config.patch_size
        n, h, w = pixel_attention_mask.shape
        m = pixel_attention_mask[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p)
        return m.to(torch.int32).sum(dim=(2, 4)) > 0

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """(B, F, 3, H, W) or (n, 3, H, W) -> (n_real_frames, S, Dt). All-zero frames (after the cast to
        the model dtype) are batch padding and dropped."""
        if pixel_values.dim() not in (4, 5):
            raise ValueError(f"pixel_values must be (B, F, 3, H, W) or (n, 3, H, W), got {tuple(pixel_values.shape)}")
        frames = _frames(pixel_values, 3).to(self.dtype)
        real = (frames != 0).flatten(1).any(1)
        frames = frames[real]
        if pixel_attention_mask is None:
            masks = torch.ones(frames.shape[0], *frames.shape[2:], dtype=torch.bool, device=frames.device)
        else:
            masks = _frames(pixel_attention_mask, 2).to(frames.device)[real]
        if frames.shape[0] == 0:
            s, d = self.config.image_seq_len, self.config.text_config.hidden_size
            return frames.new_zeros(0, s, d)
        hidden = self.vision_model(frames, self.patch_mask(masks))
        return self.connector(hidden)

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor) -> Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_id = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_id)).all(-1)

    def merge_image_features(self, input_ids: Tensor | None, inputs_embeds: Tensor,
                             image_features: Tensor) -> Tensor:
        """Write features, in order, into the `<image>` positions (row-major over batch, sequence)."""
        mask = self.image_token_mask(input_ids, inputs_embeds)
        features = image_features.reshape(-1, inputs_embeds.shape[-1])
        n_tokens = int(mask.sum())
        if n_tokens != features.shape[0]:
            raise ValueError(f"Image features and image tokens do not match, tokens: {n_tokens}, "
                             f"features: {features.shape[0]}")
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask[..., None], features)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None,
                image_hidden_states: Tensor | None = None,
                attention: AttentionBackend | None = None) -> Idefics3ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass pixel_values or image_hidden_states, not both")
        if inputs_embeds is None:
            inputs_embeds = self.text_model.embed_tokens(input_ids)
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, pixel_attention_mask)
        if image_hidden_states is not None:
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_hidden_states)
        hidden = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, attention=attention)
        return Idefics3ModelOutput(hidden, image_hidden_states)


def select_positions(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """int k > 0: last k positions; 0: all; 1-D tensor: those positions; 2-D int: per-row positions;
    2-D bool: the selected positions flattened to (n_true, D)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    keep = logits_to_keep.to(hidden.device)
    if keep.dim() == 1:
        return hidden[:, keep]
    if keep.dtype == torch.bool:
        return hidden[keep]
    return torch.take_along_dim(hidden, keep[..., None], dim=1)


def causal_lm_loss(logits: Tensor, labels: Tensor, image_token_id: int,
                   num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy in float32 (with num_items_in_batch, a trainer's count of the labels
    over its accumulated batches: their sum over it). Labels of -100 and of `<image>` positions are
    ignored (the documented behaviour; the reference counts image labels)."""
    labels = labels.to(logits.device)
    labels = labels.masked_fill(labels == image_token_id, IGNORE_INDEX)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)   # position t predicts label t+1
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="mean" if num_items_in_batch is None else "sum")
    return loss if num_items_in_batch is None else loss / torch.as_tensor(num_items_in_batch, device=loss.device)


# transformers' forward flags that change nothing here at these values (no cache is returned: use_cache
# any); other values are refused by name rather than ignored
NEUTRAL_FLAGS = {"return_dict": (None, True), "output_attentions": (None, False), "output_hidden_states": (None, False),
                 "cache_position": (None,), "use_cache": None}


def check_forward_flags(flags: dict) -> None:
    for name, value in flags.items():
        if name not in NEUTRAL_FLAGS:
            raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        allowed = NEUTRAL_FLAGS[name]
        if allowed is not None and not any(value is a for a in allowed):
            raise ValueError(f"forward({name}={value!r}) is not supported (only {' or '.join(map(str, allowed))})")


class Idefics3ForConditionalGeneration(_PretrainedMixin, nn.Module):
    def __init__(self, config: Idefics3Config):
        super().__init__()
        self.config = config = as_config(config)
        self.model = Idefics3Model(config)
        text = config.text_config
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        self.generation_config: dict = {}
        self.tie_weights()

    def tie_weights(self) -> None:
        """Only the top-level `tie_word_embeddings` ties (the text config's flag is ignored)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.text_model.embed_tokens

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        return self.model.get_image_features(pixel_values, pixel_attention_mask)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None,
                image_hidden_states: Tensor | None = None, inputs_embeds: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, attention: AttentionBackend | None = None,
                num_items_in_batch: int | Tensor | None = None, **flags) -> Idefics3CausalLMOutput:
        check_forward_flags(flags)
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need logits at every position: use logits_to_keep=0 with labels")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, pixel_values=pixel_values,
                         pixel_attention_mask=pixel_attention_mask,
                         image_hidden_states=image_hidden_states, attention=attention)
        logits = self.lm_head(select_positions(out.last_hidden_state, logits_to_keep))
        loss = None if labels is None else causal_lm_loss(logits, labels, self.config.image_token_id,
                                                          num_items_in_batch)
        return Idefics3CausalLMOutput(logits, loss, out.image_hidden_states)

    def generate(self, inputs: Tensor | None = None, **kwargs):
        """generate(input_ids, ...) or generate(**processor_outputs, ...), as the reference."""
        from .generation import generate  # imported lazily: generation imports the engine
        if inputs is not None:
            if kwargs.get("input_ids") is not None:
                raise ValueError("pass the prompt ids once: generate(inputs) or generate(input_ids=...)")
            kwargs["input_ids"] = inputs
        return generate(self, **kwargs)

    @staticmethod
    def compute_transition_scores(sequences: Tensor, scores: tuple[Tensor, ...], beam_indices: Tensor | None = None,
                                  normalize_logits: bool = False) -> Tensor:
        """Each generated token's score, from generate(return_dict_in_generate=True, output_scores=True)."""
        from .generation import transition_scores
        return transition_scores(sequences, scores, beam_indices, normalize_logits)
