"""Building blocks: RoPE tables, RMSNorm, the attention seam, position bucketing, pixel shuffle."""
from __future__ import annotations

import torch
import transformers
from transformers.models.idefics3 import modeling_idefics3 as ref_idefics3
from transformers.models.llama import modeling_llama as ref_llama

from model import CausalAttention, LlamaConfig, LlamaModel
from model.config import Idefics3VisionConfig
from model.connector import pixel_shuffle
from model.llama import LlamaRMSNorm, LlamaRotaryEmbedding, rope_inv_freq
from model.vision import Idefics3VisionEmbeddings, bucket_position_ids

LLAMA3_8B_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)


def test_llama3_inv_freq_matches_documented_values_and_reference():
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=LLAMA3_8B_ROPE)
    inv_freq = rope_inv_freq(config)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (64,)
    torch.testing.assert_close(inv_freq[:3], torch.tensor([1.0, 0.81462, 0.66360]), atol=1e-5, rtol=0)
    torch.testing.assert_close(inv_freq[-3:], torch.tensor([4.6247e-07, 3.7673e-07, 3.0689e-07]),
                               atol=0, rtol=1e-4)
    ref_config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                          max_position_embeddings=131072, rope_parameters=dict(LLAMA3_8B_ROPE))
    assert torch.equal(inv_freq, ref_llama.LlamaRotaryEmbedding(ref_config).inv_freq)


def test_rotary_table_stays_float32_and_cos_sin_match_reference():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 1000.0})
    rotary = LlamaRotaryEmbedding(config).to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32
    positions = torch.tensor([[0, 0, 1, 2, 3], [7, 100, 2047, 5, 4096]])  # arbitrary (B, L), not a range
    cos, sin = rotary(positions, torch.bfloat16)
    ref = ref_llama.LlamaRotaryEmbedding(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)


def test_rms_norm_casts_back_before_the_weight_like_reference():
    torch.manual_seed(0)
    ours, ref = LlamaRMSNorm(32, eps=1e-5), ref_llama.LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(32))
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 5, 32)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ours.to(dtype)(x.to(dtype)), ref.to(dtype)(x.to(dtype)))


def test_default_attention_zeroes_rows_that_see_no_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = CausalAttention(mask)(0, q, k, v)
    assert out.shape == (2, 4, 5, 8)
    assert torch.equal(out[1, :, :2], torch.zeros(4, 2, 8))
    # Real rows against a plain softmax over the visible keys, with kv head j serving query heads 2j, 2j+1.
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / 8 ** 0.5
    visible = torch.ones(5, 5).tril().bool() & mask.bool()[:, None, None, :]
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num() @ vv
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_attention_seam_gets_post_rope_qkv_per_layer():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(config).eval()
    ids, positions = torch.randint(0, 50, (2, 6)), torch.tensor([[0, 1, 2, 3, 4, 5], [9, 10, 11, 12, 13, 14]])
    calls, inner = [], CausalAttention()

    def recording(layer_idx, q, k, v):
        calls.append((layer_idx, q.shape, k.shape, v.shape))
        return inner(layer_idx, q, k, v)

    with torch.no_grad():
        plain = model(ids, position_ids=positions)
        seen = model(ids, position_ids=positions, attention=recording)
        shifted = model(ids, position_ids=positions + 3)                    # RoPE is relative: same
        gapped = model(ids, position_ids=positions + torch.tensor([0, 0, 0, 5, 5, 5]))
    assert torch.equal(plain, seen)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert calls[0][1:] == ((2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(gapped[:, :3], plain[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(gapped[:, 3:], plain[:, 3:], atol=1e-3)   # relative distances changed


def test_position_bucketing_follows_float32_recipe_of_reference():
    config = Idefics3VisionConfig(hidden_size=8, num_attention_heads=2, image_size=70, patch_size=2)  # N = 35
    ref = ref_idefics3.Idefics3VisionEmbeddings(transformers.Idefics3VisionConfig(**{
        k: v for k, v in config.to_dict().items() if k != "model_type"}))
    ours = Idefics3VisionEmbeddings(config)
    ours.load_state_dict(ref.state_dict())
    mask = torch.zeros(2, 35, 35, dtype=torch.bool)
    mask[0], mask[1, :25, :25] = True, True
    pixels = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        assert torch.equal(ours(pixels, mask), ref(pixels, mask))
    ids = bucket_position_ids(mask, 35)
    assert torch.equal(ids[0], torch.arange(35 * 35))
    assert ids[1, 5].item() == 6 != 5 * 35 // 25  # where floor(i*N/nb) would be wrong
    grid = torch.zeros(1, 32, 32, dtype=torch.bool)
    grid[0, :16, :24] = True
    ids = bucket_position_ids(grid, 32).view(32, 32)
    assert ids[0, :24].tolist() == [4 * j // 3 for j in range(24)]
    assert ids[:16, 0].tolist() == [64 * i for i in range(16)] and ids[20, 20].item() == 0


def test_pixel_shuffle_order_is_row_offset_col_offset_channel():
    x = torch.arange(16.0).view(1, 16, 1)
    assert pixel_shuffle(x, 2)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    x2 = torch.arange(32.0).view(1, 16, 2)
    assert pixel_shuffle(x2, 2)[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
