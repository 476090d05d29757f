"""Configs: documented defaults, the rms_norm_eps pitfall, legacy rope keys, unknown keys, config.json round trips."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from model import Idefics3Config, Idefics3VisionConfig, LlamaConfig
from model.connector import pixel_shuffle

LEGACY_TEXT = dict(vocab_size=128259, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0))


def test_documented_defaults():
    v, t, c = Idefics3VisionConfig(), LlamaConfig(), Idefics3Config()
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 3072, 12, 16)
    assert (v.num_channels, v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps) == (
        3, 224, 32, "gelu_pytorch_tanh", 1e-6)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (32000, 4096, 11008, 32)
    assert (t.num_key_value_heads, t.head_dim, t.max_position_embeddings, t.rms_norm_eps) == (32, 128, 2048, 1e-6)
    assert t.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.attention_bias, t.mlp_bias) == (1, 2, None, False, False)
    assert (c.scale_factor, c.image_token_id, c.tie_word_embeddings, c.use_cache, c.pad_token_id) == (
        2, 128257, False, True, 128002)


def test_rms_norm_eps_pitfall_matches_reference():
    assert Idefics3Config().text_config.rms_norm_eps == 1e-5
    assert Idefics3Config.from_dict({}).text_config.rms_norm_eps == 1e-5
    assert Idefics3Config.from_dict({"text_config": {"hidden_size": 64, "num_attention_heads": 4}}
                                    ).text_config.rms_norm_eps == 1e-6
    ref = transformers.Idefics3Config(text_config={"hidden_size": 64, "num_attention_heads": 4})
    assert ref.text_config.rms_norm_eps == 1e-6


def test_legacy_rope_keys_become_rope_parameters_like_reference():
    ours = Idefics3Config.from_dict({"text_config": LEGACY_TEXT}).text_config
    ref = transformers.Idefics3Config(text_config=dict(LEGACY_TEXT)).text_config
    assert ours.rope_parameters == {k: v for k, v in ref.rope_parameters.items() if k != "type"}
    assert ours.rope_parameters["original_max_position_embeddings"] == 131072  # defaulted
    assert ours.rope_theta == 500000.0


def test_unknown_keys_ignored_and_vision_defaults_fill_gaps():
    config = Idefics3Config.from_dict({
        "model_type": "idefics3", "torch_dtype": "bfloat16", "_pad_token_id": 7, "qk_layer_norms": False,
        "neftune_noise_alpha": 0.0, "pixel_shuffle_factor": 4, "use_base_siglip": True,
        "vision_config": {"model_type": "idefics3", "hidden_size": 768, "image_size": 512, "patch_size": 16,
                          "num_attention_heads": 12, "max_image_size": {"longest_edge": 512}},
        "text_config": {"is_llama_config": True, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16},
    })
    assert (config.vision_config.intermediate_size, config.vision_config.num_hidden_layers) == (3072, 12)
    assert (config.dtype, config.pad_token_id) == ("bfloat16", 7)


def test_json_round_trip_and_transformers_reads_our_file(tmp_path):
    config = Idefics3Config.from_dict({"text_config": LEGACY_TEXT, "scale_factor": 4, "image_token_id": 9,
                                       "tie_word_embeddings": True,
                                       "vision_config": {"hidden_size": 32, "image_size": 32, "patch_size": 4,
                                                         "num_attention_heads": 2}})
    assert Idefics3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save_pretrained(tmp_path)
    assert Idefics3Config.from_pretrained(tmp_path) == config
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (ref.scale_factor, ref.image_token_id, ref.tie_word_embeddings) == (4, 9, True)
    assert dict(ref.text_config.rope_parameters) == config.text_config.rope_parameters
    assert ref.text_config.rms_norm_eps == config.text_config.rms_norm_eps
    assert ref.vision_config.patch_size == 4 and ref.vision_config.intermediate_size == 3072


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="only 'llama'"):
        Idefics3Config.from_dict({"text_config": {"model_type": "mistral"}})
    with pytest.raises(ValueError, match="square grid divisible by 4"):
        pixel_shuffle(torch.zeros(1, 36, 2), 4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(FileNotFoundError):
        Idefics3Config.from_pretrained("./definitely/missing")


@pytest.mark.parametrize("where, key, value", [("text_config", "num_key_value_heads", 0),
                                               ("text_config", "num_attention_heads", 0),
                                               ("text_config", "vocab_size", -5),
                                               ("text_config", "hidden_size", 64.5),
                                               ("vision_config", "patch_size", 0),
                                               ("vision_config", "num_attention_heads", True),
                                               ("config", "scale_factor", 0)])
def test_sizes_that_are_not_positive_integers_name_their_key(where, key, value):
    """0 KV heads was a ZeroDivisionError traceback (the job's check passes ValueErrors on as one line)."""
    data = {"text_config": {}, "vision_config": {}}
    (data if where == "config" else data[where])[key] = value
    with pytest.raises(ValueError, match=f"{where}.{key} must be a positive integer, got {value!r}"):
        Idefics3Config.from_dict(data)


def test_transformers_config_objects_are_read_as_ours():
    """A transformers Idefics3VisionConfig given as vision_config, or a transformers Idefics3Config given to
    our model, failed deep in the model ("no attribute 'num_patches_per_side'")."""
    from model import Idefics3ForConditionalGeneration

    theirs = transformers.Idefics3Config(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": 64}, scale_factor=2)
    ours = Idefics3Config(vision_config=theirs.vision_config, text_config=theirs.text_config, scale_factor=2)
    assert ours.vision_config.num_patches_per_side == 4 and ours.text_config.num_key_value_heads == 1
    model = Idefics3ForConditionalGeneration(theirs)
    assert isinstance(model.config, Idefics3Config) and model.config.to_dict() == Idefics3Config.from_dict(
        theirs.to_dict()).to_dict()
    with pytest.raises(TypeError, match="vision_config must be a Idefics3VisionConfig, a dict or None, got str"):
        Idefics3Config(vision_config="junk")


def test_from_pretrained_takes_overrides_and_the_vision_config_alone_as_the_reference(tmp_path):
    """Idefics3Config.from_pretrained(path, scale_factor=...) was a TypeError; Idefics3VisionConfig had none."""
    from tests.fixtures.checkpoints import build_checkpoint

    path = build_checkpoint(tmp_path / "ck", "smolvlm")
    ours, theirs = Idefics3Config.from_pretrained(path, scale_factor=4), transformers.Idefics3Config.from_pretrained(
        path, scale_factor=4)
    assert ours.scale_factor == theirs.scale_factor == 4 and ours.get_text_config() is ours.text_config
    vision = Idefics3VisionConfig.from_pretrained(path)
    assert vision.to_dict() == Idefics3Config.from_pretrained(path).vision_config.to_dict()
    assert Idefics3VisionConfig.from_pretrained(path).hidden_size == transformers.Idefics3VisionConfig.from_pretrained(
        path).hidden_size
    assert json.loads(ours.to_json_string())["scale_factor"] == 4
    with pytest.raises(TypeError, match=r"no settings \['scale_facotr'\]"):
        Idefics3Config.from_pretrained(path, scale_facotr=2)
