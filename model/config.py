"""Configurations of Idefics3 (vision tower, Llama text model, the whole model) and their `config.json`.

Defaults are those of the Idefics3 documentation. Keys a checkpoint carries that we do not model
(`is_llama_config`, `qk_layer_norms`, `initializer_range`, ...) are accepted and ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


def _known_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _pick(cls, data: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys `cls` models (unknown keys in checkpoints are ignored on purpose)."""
    names = _known_fields(cls)
    return {k: v for k, v in data.items() if k in names}


def _check_sizes(config: Any, names: tuple[str, ...], where: str) -> None:
    """The sizes a model is built from are positive integers: a config.json with 0 heads would
    otherwise divide by zero far from the file that says so."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")


@dataclass
class Idefics3VisionConfig:
    """SigLIP-style vision tower. Missing keys take these class defaults (some SmolVLM configs rely on it)."""
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "idefics3_vision"

    def __post_init__(self) -> None:
        _check_sizes(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_channels", "image_size", "patch_size"), "vision_config")

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Idefics3VisionConfig":
        # Any vision model_type ("idefics3", "idefics3_vision", ...) is read the same way.
        return cls(**_pick(cls, {k: v for k, v in data.items() if k != "model_type"}))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> "Idefics3VisionConfig":
        """A checkpoint's vision config (its config.json's `vision_config`, or the whole file's)."""
        data = read_config_json(path_or_id)
        return cls.from_dict(data.get("vision_config", data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rope_parameters_from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """`rope_parameters` from either the current key or the older `rope_theta` + `rope_scaling` pair."""
    current = data.get("rope_parameters")
    if current:
        params = dict(current)
    else:
        params = dict(data.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(data.get("rope_theta", 10000.0)))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", data.get("max_position_embeddings", 2048))
    return params


@dataclass
class LlamaConfig:
    """The Llama text decoder. `num_key_value_heads`/`head_dim` of None are derived from the head count."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False  # ignored by Idefics3: only the top-level switch ties
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    model_type: str = "llama"

    def __post_init__(self) -> None:
        _check_sizes(self, ("hidden_size", "num_attention_heads"), "text_config")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_parameters = rope_parameters_from_legacy({
            "rope_parameters": self.rope_parameters, "max_position_embeddings": self.max_position_embeddings})
        _check_sizes(self, ("vocab_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                            "max_position_embeddings"), "text_config")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaConfig":
        model_type = data.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported text model_type {model_type!r}: only 'llama' text models are implemented")
        kwargs = _pick(cls, data)
        kwargs["rope_parameters"] = rope_parameters_from_legacy(data)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# SmolVLM2 checkpoints ("smolvlm") are transformers' SmolVLM classes, which are Idefics3's for images:
# the same configs, weight names, vision tower, connector, image tokens and image processor.
ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


def _sub_config(value: Any, kind: type, name: str):
    """A sub-config as given: ours, None (the defaults), a dict, or another library's config object
    (transformers' has to_dict; it failed deep in the model, "no attribute 'num_patches_per_side'")."""
    if isinstance(value, kind):
        return value
    if value is None:
        return kind() if kind is not LlamaConfig else LlamaConfig(rms_norm_eps=1e-5)
    if not isinstance(value, dict) and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a {kind.__name__}, a dict or None, got {type(value).__name__}")
    return kind.from_dict(value)


@dataclass
class Idefics3Config:
    """The whole model. Without a `text_config` the text model gets `rms_norm_eps=1e-5`; a `text_config`
    dict that omits it gets the Llama default 1e-6 (the reference's pitfall, kept for parity)."""
    vision_config: Idefics3VisionConfig = field(default_factory=Idefics3VisionConfig)
    text_config: LlamaConfig = field(default_factory=lambda: LlamaConfig(rms_norm_eps=1e-5))
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 128002  # deprecated and unused, kept for round trips
    dtype: str | None = None
    model_type: str = "idefics3"

    def __post_init__(self) -> None:
        self.vision_config = _sub_config(self.vision_config, Idefics3VisionConfig, "vision_config")
        self.text_config = _sub_config(self.text_config, LlamaConfig, "text_config")
        _check_sizes(self, ("scale_factor",), "config")
        # The class defaults (224 / 32 = 7 patches per side, scale 2) cannot pixel-shuffle; like the
        # reference we accept them here and the connector names the problem at run time.

    @property
    def image_seq_len(self) -> int:
        """Text positions one frame occupies after the pixel shuffle."""
        return self.vision_config.num_patches_per_side ** 2 // self.scale_factor ** 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Idefics3Config":
        data = dict(data)
        if "dtype" not in data and "torch_dtype" in data:
            data["dtype"] = data["torch_dtype"]
        if "pad_token_id" not in data and "_pad_token_id" in data:  # how transformers 5 writes it
            data["pad_token_id"] = data["_pad_token_id"]
        if data.get("model_type", "idefics3") not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {data['model_type']!r}: expected one of {sorted(ARCHITECTURES)}")
        return cls(**_pick(cls, data))

    def to_dict(self, bare: bool = False) -> dict[str, Any]:
        """`bare`: the config of a bare Idefics3Model (auto classes build what `architectures` names)."""
        out = dataclasses.asdict(self)
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        architecture = ARCHITECTURES[self.model_type]
        out["architectures"] = [architecture.replace("ForConditionalGeneration", "Model") if bare else architecture]
        return out

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **overrides: Any) -> "Idefics3Config":
        """config.json's config, `overrides` (scale_factor=2, ...) replacing its values, as the reference's."""
        unknown = sorted(set(overrides) - _known_fields(cls))
        if unknown:
            raise TypeError(f"Idefics3Config has no settings {unknown}")
        return cls.from_dict({**read_config_json(path_or_id), **overrides})

    def save_pretrained(self, path: str | Path, bare: bool = False) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string(bare))
        return path / CONFIG_NAME

    def to_json_string(self, bare: bool = False) -> str:
        return json.dumps(self.to_dict(bare), indent=2, sort_keys=True) + "\n"

    def get_text_config(self) -> LlamaConfig:
        return self.text_config


def read_config_json(path_or_id: str | Path) -> dict[str, Any]:
    from .files import resolve_checkpoint_dir
    folder = resolve_checkpoint_dir(path_or_id)
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    return json.loads(file.read_text())


def check_tp(config: Idefics3Config, tp: int) -> None:
    """Raise a ValueError naming every size that tensor parallelism of degree `tp` cannot split."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    text, vision = config.text_config, config.vision_config
    problems = [f"{where}.{name} ({value}) is not divisible by tensor_parallel_size {tp}"
                for where, name, value in [
                    ("text_config", "num_attention_heads", text.num_attention_heads),
                    ("text_config", "intermediate_size", text.intermediate_size),
                    ("vision_config", "num_attention_heads", vision.num_attention_heads),
                    ("vision_config", "intermediate_size", vision.intermediate_size)]
                if value % tp]
    kv = text.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(f"text_config.num_key_value_heads ({kv}) and tensor_parallel_size {tp}: one must "
                        f"divide the other (KV heads are split, or replicated when tp > num_key_value_heads)")
    if problems:
        raise ValueError("cannot shard this model: " + "; ".join(problems))
