"""Turn a built (meta) Idefics3 model into one rank's shard, and check a config can be split.

Text and vision attention: q/k/v split by heads (column-parallel), the output projection by its input
(row-parallel). MLPs: gate/up (fc1) by output, down (fc2) by input. Embedding and LM head by vocabulary
rows. Norms, the patch/position embeddings and the connector are replicated. With more ranks than
KV heads, each KV head is replicated on tp / num_key_value_heads consecutive ranks.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Idefics3Config, check_tp
from ..llama import LlamaAttention, LlamaMLP
from ..vision import Idefics3VisionAttention, Idefics3VisionMLP
from .layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, ShardSpec, TPContext,
                     VocabParallelEmbedding)


def kv_head_range(num_kv_heads: int, tp: TPContext) -> tuple[int, int]:
    """The KV heads [first, last) this rank holds: a split, or one replicated head when tp > heads."""
    if num_kv_heads >= tp.world_size:
        per_rank = num_kv_heads // tp.world_size
        return tp.rank * per_rank, (tp.rank + 1) * per_rank
    head = tp.rank // (tp.world_size // num_kv_heads)
    return head, head + 1


def _column(linear: nn.Linear, first: int, last: int) -> ColumnParallelLinear:
    return ColumnParallelLinear(linear.in_features, linear.out_features, first, last, linear.bias is not None)


def _row(linear: nn.Linear, first: int, last: int, tp: TPContext) -> RowParallelLinear:
    return RowParallelLinear(linear.in_features, linear.out_features, first, last, linear.bias is not None, tp)


def _split(total: int, tp: TPContext) -> tuple[int, int]:
    per_rank = total // tp.world_size
    return tp.rank * per_rank, (tp.rank + 1) * per_rank


def shard_text_attention(attn: LlamaAttention, tp: TPContext) -> None:
    hd = attn.head_dim
    q0, q1 = _split(attn.num_heads, tp)
    k0, k1 = kv_head_range(attn.num_kv_heads, tp)
    attn.q_proj = _column(attn.q_proj, q0 * hd, q1 * hd)
    attn.k_proj = _column(attn.k_proj, k0 * hd, k1 * hd)
    attn.v_proj = _column(attn.v_proj, k0 * hd, k1 * hd)
    attn.o_proj = _row(attn.o_proj, q0 * hd, q1 * hd, tp)
    attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0


def shard_text_mlp(mlp: LlamaMLP, tp: TPContext) -> None:
    first, last = _split(mlp.gate_proj.out_features, tp)
    mlp.gate_proj = _column(mlp.gate_proj, first, last)
    mlp.up_proj = _column(mlp.up_proj, first, last)
    mlp.down_proj = _row(mlp.down_proj, first, last, tp)


class ShardedVisionAttention(Idefics3VisionAttention):
    """The vision attention on a head slice: its output has num_heads * head_dim features, not the width."""

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


def shard_vision_attention(attn: Idefics3VisionAttention, tp: TPContext) -> None:
    hd = attn.head_dim
    h0, h1 = _split(attn.num_heads, tp)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, _column(getattr(attn, name), h0 * hd, h1 * hd))
    attn.out_proj = _row(attn.out_proj, h0 * hd, h1 * hd, tp)
    attn.num_heads = h1 - h0
    attn.__class__ = ShardedVisionAttention


def shard_vision_mlp(mlp: Idefics3VisionMLP, tp: TPContext) -> None:
    first, last = _split(mlp.fc1.out_features, tp)
    mlp.fc1 = _column(mlp.fc1, first, last)
    mlp.fc2 = _row(mlp.fc2, first, last, tp)


def local_config(config: Idefics3Config, tp: TPContext) -> Idefics3Config:
    """The config the engine sees on this rank: local head counts (KV-cache size), full vocabulary."""
    text = config.text_config
    q0, q1 = _split(text.num_attention_heads, tp)
    k0, k1 = kv_head_range(text.num_key_value_heads, tp)
    local = copy.deepcopy(config)
    local.text_config = dataclasses.replace(text, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                                            intermediate_size=text.intermediate_size // tp.world_size)
    return local


def shard_model(model: nn.Module, tp: TPContext) -> dict[str, ShardSpec]:
    """Replace the layers of an Idefics3ForConditionalGeneration (best built on meta) by this rank's
    shards, in place. Returns parameter name -> slice of the checkpoint tensor it holds."""
    check_tp(model.config, tp.world_size)
    text = model.config.text_config
    with torch.device(model.lm_head.weight.device):   # new layers where the old ones were (meta: free)
        for module in list(model.modules()):
            if isinstance(module, LlamaAttention):
                shard_text_attention(module, tp)
            elif isinstance(module, LlamaMLP):
                shard_text_mlp(module, tp)
            elif isinstance(module, Idefics3VisionAttention):
                shard_vision_attention(module, tp)
            elif isinstance(module, Idefics3VisionMLP):
                shard_vision_mlp(module, tp)
        model.model.text_model.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, tp)
        model.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, tp)
    model.tie_weights()
    model.config = local_config(model.config, tp)
    return shard_specs(model)


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Parameter name -> its slice, for every sharded parameter (absent names are replicated)."""
    specs = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "shard_spec"):
            continue
        for name, _ in module.named_parameters(recurse=False):
            spec = module.shard_spec(name)
            if spec is not None:
                specs[f"{module_name}.{name}"] = spec
    return specs


def sharded_fraction(model: nn.Module) -> tuple[int, int]:
    """(elements of this rank's sharded parameters, elements of all its parameters), each tensor once."""
    specs, seen, sharded, total = shard_specs(model), set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        sharded += p.numel() if name in specs else 0
    return sharded, total
