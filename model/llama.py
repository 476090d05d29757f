"""Llama decoder: RMSNorm, RoPE (default / linear / llama3), GQA attention through a pluggable backend, SwiGLU.

Module and parameter names are those of the Hugging Face state dict, so loading is a plain name match.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .fusion import Fusable
from .kernels import fused
from .linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class AttentionBackend(Protocol):
    """What a decoder layer calls once q, k, v exist (post-RoPE). The engine implements KV caches here.
    A backend whose calls run a few rows each (the decode step's) says so with a true `few_rows`
    attribute: the layers may then run their norms and adds inside their projections' kernels. One
    with a true `takes_rope` is given q and k before RoPE, and `rope=(cos, sin)`, to rotate them itself."""

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (B, Hq, L, hd), k/v: (B, Hkv, L, hd); returns (B, Hq, L, hd)."""
        ...


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped k/v heads (kv head j serves query heads j*g .. j*g+g-1)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class CausalAttention:
    """The default backend (no cache): causal attention plus a 2-D key padding mask.

    Query rows that can see no key at all (left padding) output 0, like the reference's SDPA path.
    """

    def __init__(self, attention_mask: Tensor | None = None):
        # Decided once, not per layer: `.all()` on a GPU tensor is a host sync.
        self.attention_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        self._mask: Tensor | None = None
        self._dead_rows: Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        keys = self.attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = causal[None, None] & keys                                  # (B, 1, L, L)
        self._dead_rows = ~mask.any(-1, keepdim=True)                     # (B, 1, L, 1)
        self._mask = mask | self._dead_rows                               # no NaN from empty rows

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.attention_mask is None:
            return sdpa(q, k, v, is_causal=True)
        if self._mask is None:
            self._build(q.shape[2], q.device)
        out = sdpa(q, k, v, mask=self._mask)
        return out.masked_fill(self._dead_rows, 0.0)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Statistics in float32, cast back to the input dtype *before* the weight multiply (as the reference).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def act_mul(act: Callable[[Tensor], Tensor], gate: Tensor, up: Tensor) -> Tensor:
    return act(gate) * up


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class Pointwise:
    """The decoder's elementwise chains, each a handful of kernels over the whole prompt when run
    eagerly; model.pointwise.compile_pointwise gives the layers compiled ones (one kernel each)."""
    rms_norm: Callable = rms_norm
    rope: Callable = apply_rope
    act_mul: Callable = act_mul


EAGER = Pointwise()


class LlamaRMSNorm(nn.Module):
    pointwise: Pointwise = EAGER

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Float32 inverse frequencies for `config.rope_parameters` (default, linear or llama3 scaling)."""
    params, dim = config.rope_parameters, config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, params)
    raise ValueError(f"unsupported rope_type {kind!r}: implemented are default, linear and llama3")


def _llama3_scaling(inv_freq: Tensor, params: dict) -> Tensor:
    """Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    in_band = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(in_band, blended, slowed)


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta weight (from_pretrained's) uninitialised: normal_ on meta imports
    torch's compiler, ~2 CPU-s of each replica's start, to produce nothing."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class LlamaRotaryEmbedding(nn.Module):
    """Holds float32 `inv_freq`; cos/sin are computed per call from arbitrary (B, L) position ids."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self._table(torch.get_default_device()), persistent=False)

    def _table(self, device: torch.device) -> Tensor:
        if device.type == "meta":   # a placeholder (no arithmetic on meta): materialising computes it (_apply)
            return torch.empty(self.config.head_dim // 2, device=device)
        return rope_inv_freq(self.config, device)

    def _apply(self, fn, recurse: bool = True):
        # Dtype casts must not touch the table (bf16 inv_freq shifts logits); device moves and
        # meta -> real materialisation (loading.materialized) recompute it exactly on the new device.
        device = fn(torch.empty(0, device=self.inv_freq.device)).device
        self.inv_freq = self._table(device)
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = position_ids.float()[..., None] * self.inv_freq          # (B, L, hd/2) float32
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, L, hd)


class LlamaAttention(Fusable):
    pointwise: Pointwise = EAGER

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, bias = config.head_dim, config.attention_bias
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=bias)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, n, self.head_dim).transpose(1, 2)

    def fusable(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        return self.o_proj(self.attend(self.project(x), cos, sin, attention))

    def attend(self, qkv: tuple[Tensor, Tensor, Tensor], cos: Tensor, sin: Tensor,
               attention: AttentionBackend) -> Tensor:
        """The heads' outputs (B, L, Hq * hd) for projected q, k, v (B, L, features)."""
        q, k, v = qkv
        b, length, _ = q.shape
        q, k, v = self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        if getattr(attention, "takes_rope", False):
            out = attention(self.layer_idx, q, k, v, rope=(cos, sin))
        else:
            out = attention(self.layer_idx, self.pointwise.rope(q, cos, sin), self.pointwise.rope(k, cos, sin), v)
        return out.transpose(1, 2).reshape(b, length, -1)

    def fused_forward(self, x: Tensor, norm: LlamaRMSNorm, cos: Tensor, sin: Tensor,
                      attention: AttentionBackend) -> Tensor:
        """x + forward(norm(x)), the norm and the add inside the projections (model.kernels.fused)."""
        heads = self.attend(fused.normed_projections(self, norm, x), cos, sin, attention)
        return fused.residual_projection(self.o_proj, heads, x)


class LlamaMLP(Fusable):
    pointwise: Pointwise = EAGER

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, h, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, h, bias=bias)
        self.up_proj = Linear(d, h, bias=bias)
        self.down_proj = Linear(h, d, bias=bias)
        self.act = activation(config.hidden_act)

    def fusable(self) -> list[nn.Module]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.project(x)
        return self.down_proj(self.pointwise.act_mul(self.act, gate, up))

    def fused_forward(self, x: Tensor, norm: LlamaRMSNorm) -> Tensor:
        """x + forward(norm(x)), the norm, activation and add inside the projections."""
        gate, up = fused.normed_projections(self, norm, x)
        return fused.gated_projection(self.down_proj, self.act, gate, up, x)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        if fused.fuses(attention, x):
            h = self.self_attn.fused_forward(x, self.input_layernorm, cos, sin, attention)
            return self.mlp.fused_forward(h, self.post_attention_layernorm)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                attention: AttentionBackend | None = None) -> Tensor:
        """Final-normed hidden states (B, L, D). Without `position_ids` every row uses 0..L-1
        (left padding is not shifted, as in the reference's plain forward)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        attention = attention if attention is not None else CausalAttention(attention_mask)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)
