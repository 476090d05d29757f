"""Real-size configs built on the meta device: key names, shapes and parameter counts, nothing allocated."""
from __future__ import annotations

import pytest
import torch

from model import Idefics3Config, Idefics3ForConditionalGeneration
from tests.fixtures.checkpoints import build_tokenizer, reference_config

SMOLVLM_256M = dict(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16),
    text_config=dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=2),
    scale_factor=4, image_token_id=49190,
)
IDEFICS3_8B = dict(
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=364, patch_size=14),
    text_config=dict(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
    scale_factor=2, tie_word_embeddings=False,
)


def on_meta(config: dict) -> Idefics3ForConditionalGeneration:
    with torch.device("meta"):
        return Idefics3ForConditionalGeneration(Idefics3Config.from_dict(config))


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_smolvlm_256m_keys_shapes_and_count():
    model = on_meta(SMOLVLM_256M)
    keys = shapes(model)
    assert len(keys) == 471
    assert sum(p.numel() for p in model.parameters()) == 256_484_928
    assert all(p.is_meta for p in model.parameters())
    expected = {
        "model.vision_model.embeddings.patch_embedding.weight": (768, 3, 16, 16),
        "model.vision_model.embeddings.position_embedding.weight": (1024, 768),
        "model.vision_model.encoder.layers.11.self_attn.out_proj.bias": (768,),
        "model.vision_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
        "model.vision_model.post_layernorm.bias": (768,),
        "model.connector.modality_projection.proj.weight": (576, 12288),
        "model.text_model.embed_tokens.weight": (49280, 576),
        "model.text_model.layers.29.self_attn.k_proj.weight": (192, 576),
        "model.text_model.layers.0.mlp.down_proj.weight": (576, 1536),
        "model.text_model.layers.3.post_attention_layernorm.weight": (576,),
        "model.text_model.norm.weight": (576,),
        "lm_head.weight": (49280, 576),
    }
    assert {k: keys[k] for k in expected} == expected
    assert sum(k.startswith("model.vision_model.") for k in keys) == 197
    assert sum(k.startswith("model.text_model.") for k in keys) == 272
    assert model.config.image_seq_len == 64


def test_idefics3_8b_keys_shapes_and_count():
    model = on_meta(IDEFICS3_8B)
    keys = shapes(model)
    assert len(keys) == 729
    assert sum(p.numel() for p in model.parameters()) == 8_462_086_384
    assert keys["model.vision_model.embeddings.position_embedding.weight"] == (676, 1152)
    assert keys["model.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert keys["model.connector.modality_projection.proj.weight"] == (4096, 4608)
    assert keys["model.text_model.layers.31.self_attn.v_proj.weight"] == (1024, 4096)
    assert model.config.image_seq_len == 169


@pytest.mark.parametrize("config", [SMOLVLM_256M, IDEFICS3_8B], ids=["smolvlm-256m", "idefics3-8b"])
def test_meta_keys_equal_the_reference_keys(config, tmp_path):
    import transformers
    ref_config = transformers.Idefics3Config(**config)
    with torch.device("meta"):
        ref = transformers.Idefics3ForConditionalGeneration(ref_config)
    assert shapes(on_meta(config)) == shapes(ref)


def test_fixture_configs_match_reference_keys(tmp_path):
    import transformers
    folder = build_tokenizer(tmp_path)
    for name in ("smolvlm", "idefics3", "odd"):
        ref_config = reference_config(folder, name)
        with torch.device("meta"):
            ref = transformers.Idefics3ForConditionalGeneration(ref_config)
        assert shapes(on_meta(ref_config.to_dict())) == shapes(ref), name
