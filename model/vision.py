"""SigLIP-style vision tower for variable-resolution frames (NaViT-style position bucketing, key masking)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Idefics3VisionConfig
from .fusion import Fusable
from .linear import Linear
from .llama import Embedding, activation


def bucket_position_ids(patch_mask: Tensor, num_patches_per_side: int) -> Tensor:
    """Position-table rows (n, h*w) for a top-left aligned valid rectangle of patches; invalid -> 0.

    Follows the reference's float32 recipe literally (fractional coordinate, clamp, right-closed
    bucketize): for some grid sizes it differs from floor(i * N / nb).
    """
    n, h, w = patch_mask.shape
    side, device = num_patches_per_side, patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    rows = _bucket(patch_mask[:, :, 0].sum(1), h, boundaries)             # (n, h)
    cols = _bucket(patch_mask[:, 0, :].sum(1), w, boundaries)             # (n, w)
    ids = (rows[:, :, None] * side + cols[:, None, :]).reshape(n, h * w)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


def _bucket(valid_count: Tensor, length: int, boundaries: Tensor) -> Tensor:
    index = torch.arange(length, device=boundaries.device, dtype=torch.float32)
    step = 1.0 / valid_count                                               # float32 per frame
    coords = (index[None, :] * step[:, None]).clamp(max=1.0 - 1e-6)
    return torch.bucketize(coords, boundaries, right=True)


class Idefics3VisionEmbeddings(nn.Module):
    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = Embedding(self.num_patches_per_side ** 2, config.hidden_size)

    def forward(self, pixel_values: Tensor, patch_mask: Tensor) -> Tensor:
        tokens = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (n, h*w, D), row-major
        return tokens + self.position_embedding(bucket_position_ids(patch_mask, self.num_patches_per_side))


class Idefics3VisionAttention(Fusable):
    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.q_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def _heads(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

    def fusable(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class Idefics3VisionMLP(nn.Module):
    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Idefics3EncoderLayer(nn.Module):
    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        self.self_attn = Idefics3VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Idefics3VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        h = x + self.self_attn(self.layer_norm1(x), key_mask)
        return h + self.mlp(self.layer_norm2(h))


class Idefics3Encoder(nn.Module):
    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Idefics3EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class Idefics3VisionTransformer(nn.Module):
    """Frames (n, 3, H, W) -> last hidden state (n, (H/p)*(W/p), D) after the post layernorm."""

    def __init__(self, config: Idefics3VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Idefics3VisionEmbeddings(config)
        self.encoder = Idefics3Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: Tensor, patch_attention_mask: Tensor | None = None) -> Tensor:
        p = self.config.patch_size
        if patch_attention_mask is None:
            n, _, h, w = pixel_values.shape
            patch_attention_mask = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        patch_attention_mask = patch_attention_mask.bool()
        x = self.embeddings(pixel_values, patch_attention_mask)
        # Padded patches are hidden as keys only; their queries still run and flow into the connector.
        flat = patch_attention_mask.reshape(x.shape[0], -1)
        key_mask = None if bool(flat.all()) else flat[:, None, None, :]
        return self.post_layernorm(self.encoder(x, key_mask))
