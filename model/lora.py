"""LoRA adapters (PEFT's folder layout: adapter_config.json + adapter_model.safetensors), merged into
the base checkpoint's weights as they load, as PEFT's `merge_and_unload` merges them.

A fine-tune is often published as an adapter of a few MB beside a base checkpoint (SmolVLM's
fine-tuning recipe saves one). Merged, the model is the base model's shape and speed: nothing
changes in the engine. Each adapted weight W becomes W + scaling * (B @ A) (scaling = alpha / r,
alpha / sqrt(r) with rsLoRA, per-module alphas from alpha_pattern), and with DoRA that times
magnitude / ||W + scaling * (B @ A)|| row by row; computed in float32 and cast to the model's
dtype once (PEFT's merge in float32 gives the same bits). Options that do not merge into a weight
(adapted biases, modules saved whole, token adapters, ...) are refused, naming the option.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .files import CheckpointError, adapter_files, open_safetensors

PEFT_PREFIX = "base_model.model."
# "base": the base weight PEFT saves beside an adapted LM head or embedding (save_embedding_layers),
# which replaces the checkpoint's when PEFT loads the adapter
PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude", "base_layer.weight": "base"}


class LoraAdapter:
    """The weight deltas of one adapter, by the name of the parameter (ours, as the base checkpoint's
    keys map to it) each one changes."""

    def __init__(self, parts: dict[str, dict[str, torch.Tensor]], scalings: dict[str, float], folder: Path) -> None:
        self.parts, self.scalings, self.folder = parts, scalings, folder

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LoraAdapter":
        folder = Path(path).expanduser()
        if not folder.is_dir():     # a URL or hub id is the jobs' (--adapter): the library reads a local folder
            raise FileNotFoundError(f"adapter {str(path)!r}: no such folder (the library reads an adapter from a "
                                    "local folder; download a hub id's or a URL's first)")
        config, weights = adapter_files(folder)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with open_safetensors(weights) as f:
            for key in f.keys():
                module, part = split_key(key, folder)
                parts.setdefault(module + ".weight", {})[part] = f.get_tensor(key).float()
        for name, found in parts.items():
            if ("A" in found) != ("B" in found) or not ("A" in found or "base" in found):
                raise CheckpointError(f"adapter {folder}: {name} has {sorted(found)} but not both lora_A and lora_B")
            if "A" in found and found["A"].dim() != 2:      # PEFT's LoRA of a convolution: another kind of change
                raise CheckpointError(f"adapter {folder}: {name} has a LoRA of a convolution (lora_A "
                                      f"{tuple(found['A'].shape)}): only linear layers' LoRA merge here")
        scalings = {name: scaling(config, name.removesuffix(".weight"), found["A"].shape[0])
                    for name, found in parts.items() if "A" in found}
        return cls(parts, scalings, folder)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def names(self) -> set[str]:
        return set(self.parts)

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (the base checkpoint's tensor, or the one the adapter saved in its place) with
        this adapter's change, float32."""
        found = self.parts[name]
        if "base" in found:
            if found["base"].shape != weight.shape:
                raise CheckpointError(f"adapter {self.folder}: {name} is {tuple(weight.shape)} in the checkpoint, but "
                                      f"the adapter saved it as {tuple(found['base'].shape)}")
            weight = found["base"]
        weight = weight.float()
        if "A" not in found:
            return weight
        if weight.dim() != 2 or found["B"].shape[0] != weight.shape[0] or found["A"].shape[1] != weight.shape[1]:
            raise CheckpointError(f"adapter {self.folder}: {name} is {tuple(weight.shape)} in the checkpoint, but the "
                                  f"adapter's B @ A is {found['B'].shape[0]} x {found['A'].shape[1]}")
        merged = weight + (found["B"] @ found["A"]) * self.scalings[name]
        if "magnitude" not in found:
            return merged
        return (found["magnitude"] / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged

    def check_applied(self, applied: set[str], tied: set[str]) -> None:
        """Every delta went to a weight of the model, none to a weight that another shares (tied: asked
        first, as a tied checkpoint stores no LM head for its delta to go to)."""
        shared = sorted(self.names() & tied)
        if shared:
            raise CheckpointError(f"adapter {self.folder} changes {shared[0]}, which the model ties to another "
                                  "weight: merge it with PEFT (merge_and_unload) and load the merged checkpoint")
        left = sorted(self.names() - applied)
        if left:
            raise CheckpointError(f"adapter {self.folder} changes weights the model does not have: {left[:5]} "
                                  "(an adapter of another base model?)")


def split_key(key: str, folder: Path) -> tuple[str, str]:
    """('model.text_model.layers.0.self_attn.q_proj', 'A') from PEFT's saved key."""
    body = key.removeprefix(PEFT_PREFIX)
    for suffix, part in PARTS.items():
        if body.endswith("." + suffix):
            return body[:-len(suffix) - 1], part
    raise CheckpointError(f"adapter {folder}: {key} is not a LoRA tensor (lora_A, lora_B, or DoRA's magnitude); "
                          "embedding and other adapters are not merged here")


def scaling(config: dict, module: str, rank: int) -> float:
    """alpha / r (rsLoRA: alpha / sqrt(r)); alpha from the first alpha_pattern that names the module."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"adapter: lora_alpha of {module} must be a number, got {alpha!r}")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
