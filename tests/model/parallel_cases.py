"""Checkpoints and requests shared by the tensor-parallel tests.

"tp_mqa" adds to the fixture configs a model with ONE KV head and six query heads (so tp 2 and 3
replicate the KV head), tied embeddings, and a 448-token vocabulary that tp 3 does not divide.
"""
from __future__ import annotations

import torch

from model.engine import Request, SamplingParams
from tests.fixtures.checkpoints import CONFIGS
from tests.model.test_generation import mixed_batch

CONFIGS.setdefault("tp_mqa", dict(
    vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                image_size=32, patch_size=4),
    text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=4096,
              rope_theta=100000.0),
    top=dict(scale_factor=4, tie_word_embeddings=True),
    longest_edge=64,
))

IMAGE_COUNTS = [1, 0, 2]


def batch_inputs(path) -> dict:
    """A left-padded processor batch with 1, 0 and 2 images (forward-pass inputs)."""
    return dict(mixed_batch(path, counts=IMAGE_COUNTS))


def requests(path, max_new_tokens: int = 5, **sampling) -> list[Request]:
    """One engine request per row of `batch_inputs` (padding removed)."""
    batch = batch_inputs(path)
    out = []
    for i, n in enumerate(IMAGE_COUNTS):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        pv = pm = None
        if n:
            pv, pm = batch["pixel_values"][i], batch["pixel_attention_mask"][i]
            real = (pv != 0).flatten(1).any(1)
            pv, pm = pv[real], pm[real]
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        out.append(Request(f"r{i}", ids, pv, pm, params))
    return out


def reference_tokens(model, reqs: list[Request]) -> list[list[int]]:
    from model.engine import LLMEngine
    torch.manual_seed(0)
    return [r.token_ids for r in LLMEngine(model, use_cuda_graphs=False).generate(reqs)]
