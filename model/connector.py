"""Pixel-shuffle connector: trades spatial resolution for channels, then projects to the text width."""
from __future__ import annotations

import math

from torch import Tensor, nn

from .config import Idefics3Config
from .linear import Linear


def pixel_shuffle(x: Tensor, scale: int) -> Tensor:
    """(n, side*side, D) -> (n, (side/s)^2, D*s^2). Output token (u, v) concatenates, for row offset r
    then column offset t, the input token at grid cell (u*s + r, v*s + t)."""
    n, tokens, dim = x.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side % scale:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {scale}, got {tokens} tokens")
    blocks = side // scale
    x = x.reshape(n, blocks, scale, blocks, scale, dim)      # (n, u, r, v, t, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, blocks * blocks, scale * scale * dim)


class Idefics3SimpleMLP(nn.Module):
    def __init__(self, config: Idefics3Config):
        super().__init__()
        in_dim = config.vision_config.hidden_size * config.scale_factor ** 2
        self.proj = Linear(in_dim, config.text_config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    def __init__(self, config: Idefics3Config):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = Idefics3SimpleMLP(config)

    def forward(self, image_hidden_states: Tensor) -> Tensor:
        return self.modality_projection(pixel_shuffle(image_hidden_states, self.scale_factor))
