"""SmolVLM2 checkpoints (model_type "smolvlm": transformers' SmolVLM classes, which for images are
Idefics3's: the same config fields, weight names, vision tower, connector, image tokens and image
processor). Ours loads them and answers as transformers' SmolVLMForConditionalGeneration; videos are
not supported (rows are images)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine, SamplingParams
from tests.fixtures.checkpoints import build_checkpoint
from tests.model.test_engine import _reference, _requests
from tests.model.test_generation import mixed_batch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import SmolVLMForConditionalGeneration

    path = build_checkpoint(tmp_path_factory.mktemp("smolvlm2"), "smolvlm", family="smolvlm")
    ours = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ref = SmolVLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, ref


def test_the_checkpoint_is_smolvlms_and_is_read_as_it_is(pair):
    path, ours, _ = pair
    written = json.loads((path / "config.json").read_text())
    assert (written["model_type"], written["vision_config"]["model_type"]) == ("smolvlm", "smolvlm_vision")
    assert ours.config.model_type == "smolvlm"
    assert ours.config.to_dict()["architectures"] == ["SmolVLMForConditionalGeneration"]


@torch.no_grad()
def test_logits_and_greedy_tokens_match_the_reference(pair):
    path, ours, ref = pair
    inputs = mixed_batch(path)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours(**inputs).logits[real], ref(**inputs).logits[real], atol=1e-4, rtol=0)
    kwargs = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **kwargs), ref.generate(**inputs, **kwargs))


def test_the_engine_answers_as_the_reference_alone(pair):
    path, ours, ref = pair
    requests = _requests(path, [1, 0, 2], [SamplingParams(max_new_tokens=8)] * 3)
    results = LLMEngine(ours, max_batch_size=2).generate(requests)
    assert [r.token_ids for r in results] == [_reference(ref, request) for request in requests]


def test_images_and_prompts_are_processed_as_smolvlms_processor_does(pair):
    """transformers' SmolVLM image processor (a subclass of Idefics3's) and its image prompt string
    (its processor needs torchvision, for videos, so its pieces are compared)."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    from processing import Idefics3Processor

    path = pair[0]
    ours = Idefics3Processor.from_pretrained(path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    reference = SmolVLMImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    want = reference([[image]], return_row_col_info=True, return_tensors="np")
    got = ours.image_processor([[image]], return_row_col_info=True, return_tensors="np")
    assert np.array_equal(got["pixel_values"], want["pixel_values"]) and got["rows"] == want["rows"]
    expanded = ours(text="<image>Hi", images=[[image]])["input_ids"][0]
    prompt = get_image_prompt_string(want["rows"][0][0], want["cols"][0][0], ours.image_seq_len,
                                     "<fake_token_around_image>", "<image>", "<global-img>")
    assert expanded == ours.tokenizer(prompt + "Hi")["input_ids"]


def test_the_driver_accepts_it(pair):
    from pipeline.checkpoint import check_model
    check_model(str(pair[0]))


# SmolVLM2-500M-Video-Instruct's config.json as published (its vision config omits the sizes that
# the class defaults give: 12 layers, 3072 wide; unknown keys from its training code are ignored).
SMOLVLM2_500M = {
    "architectures": ["SmolVLMForConditionalGeneration"], "image_token_id": 49190, "model_type": "smolvlm",
    "pad_token_id": 128002, "scale_factor": 4, "tie_word_embeddings": False, "torch_dtype": "float32",
    "use_cache": False, "vocab_size": 49280,
    "text_config": {"architectures": ["VLlama3ForCausalLM"], "head_dim": 64, "hidden_size": 960,
                    "intermediate_size": 2560, "is_llama_config": True, "max_position_embeddings": 8192,
                    "model_type": "llama", "num_attention_heads": 15, "num_hidden_layers": 32,
                    "num_key_value_heads": 5, "pad_token_id": 2, "pixel_shuffle_factor": 4, "qk_layer_norms": False,
                    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_theta": 100000,
                    "torch_dtype": "bfloat16", "use_resampler": False, "vocab_size": 49280},
    "vision_config": {"hidden_size": 768, "image_size": 512, "max_image_size": {"longest_edge": 512},
                      "model_type": "smolvlm_vision", "num_attention_heads": 12, "patch_size": 16,
                      "size": {"longest_edge": 2048}, "tie_word_embeddings": False, "use_base_siglip": False},
}


def test_a_published_smolvlm2_config_builds_the_references_model():
    """Same parameter names and shapes as transformers' SmolVLMForConditionalGeneration, on the meta device."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from model import Idefics3Config

    with torch.device("meta"):
        ours = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(SMOLVLM2_500M))
        ref = SmolVLMForConditionalGeneration(SmolVLMConfig.from_dict(SMOLVLM2_500M))
    shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}   # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert ours.config.image_seq_len == 64 and ours.config.text_config.rope_theta == 100000.0
