"""LoRA adapters merged at load time: the weights PEFT's merge_and_unload makes, bit for bit in
float32, and the greedy answers of transformers' generate on that merged model; each tensor-parallel
rank its slice of them."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine
from model.files import CheckpointError
from model.parallel import TPContext, load_shard
from model.parallel.shard import shard_specs
from tests.model.parallel_cases import requests

ADAPTERS = {   # PEFT LoraConfig settings: plain (rank and alpha per module), rsLoRA, DoRA
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
    "rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj", "down_proj", "o_proj"],
                 use_dora=True),
    # the LM head adapted: PEFT saves its base weight beside A and B (lm_head.base_layer.weight)
    "head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]),
}


def build_adapter(base, folder, seed: int = 1, **settings):
    """A PEFT adapter of `base` with random A, B (and DoRA magnitudes moved off their start), and
    the reference model with it merged by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics3ForConditionalGeneration as Reference

    torch.manual_seed(seed)
    peft_model = get_peft_model(Reference.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapted(request, checkpoint, tmp_path_factory):
    base = checkpoint("idefics3")
    folder = tmp_path_factory.mktemp(request.param)
    return base, folder, build_adapter(base, folder, **ADAPTERS[request.param])


def test_merged_weights_are_peft_merge_and_unload_bit_for_bit(adapted):
    base, folder, reference = adapted
    ours = Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder)
    plain = dict(Idefics3ForConditionalGeneration.from_pretrained(base).named_parameters())
    want = reference.state_dict()
    changed = 0
    for name, p in ours.named_parameters():
        assert torch.equal(p, want[name]), name
        changed += not torch.equal(p, plain[name])
    assert changed >= 5                             # what the test is about: the adapter changed weights


def test_greedy_answers_equal_transformers_on_peft_merged_model(adapted):
    base, folder, reference = adapted
    ours = Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder)
    chosen = requests(base, max_new_tokens=8)
    results = LLMEngine(ours).generate(chosen)
    plain = LLMEngine(Idefics3ForConditionalGeneration.from_pretrained(base)).generate(chosen)
    for req, res in zip(chosen, results):
        ids = torch.tensor([req.prompt_ids])
        kwargs = dict(max_new_tokens=8, do_sample=False)
        if req.pixel_values is not None:
            kwargs.update(pixel_values=req.pixel_values[None], pixel_attention_mask=req.pixel_attention_mask[None])
        want = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:]
        assert res.token_ids == want.tolist()
    assert [r.token_ids for r in results] != [r.token_ids for r in plain]


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_its_slice_of_the_merged_weights(adapted, tp):
    base, folder, _ = adapted
    merged = dict(Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder).named_parameters())
    for rank in range(tp):
        shard = load_shard(base, TPContext(rank, tp), adapter=folder)
        specs = shard_specs(shard)
        for name, p in shard.named_parameters():
            if name in specs and "embed_tokens" not in name and "lm_head" not in name:
                spec = specs[name]
                rows = spec.stop - spec.start
                assert torch.equal(p.narrow(spec.dim, 0, rows), merged[name].narrow(spec.dim, spec.start, rows)), name
            elif name not in specs:
                assert torch.equal(p, merged[name]), name


def test_adapters_that_do_not_merge_into_weights_are_refused(checkpoint, tmp_path):
    base = checkpoint("idefics3")
    folder = tmp_path / "adapter"
    build_adapter(base, folder, **ADAPTERS["lora"])
    config = json.loads((folder / "adapter_config.json").read_text())
    for option, value, says in [("modules_to_save", ["lm_head"], "modules_to_save set"),
                                ("bias", "all", "bias='all' set"), ("peft_type", "IA3", "only LoRA adapters"),
                                # PEFT re-initialises these on load, taking their principal part out of the base
                                ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),
                                ("init_lora_weights", "olora", "init_lora_weights='olora'"),
                                ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga'"),
                                ("lora_alpha", None, "lora_alpha of .* must be a number, got None")]:
        (folder / "adapter_config.json").write_text(json.dumps({**config, option: value}))
        with pytest.raises(CheckpointError, match=says):
            Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    other = checkpoint("smolvlm")            # another base: its weights have other shapes or names
    with pytest.raises(CheckpointError, match="adapter"):
        Idefics3ForConditionalGeneration.from_pretrained(other, adapter=folder)
    tied = checkpoint("smolvlm")            # its LM head is its embedding, stored once
    build_adapter(tied, tmp_path / "head", **ADAPTERS["head"])
    with pytest.raises(CheckpointError, match="changes lm_head.weight, which the model ties to another weight"):
        Idefics3ForConditionalGeneration.from_pretrained(tied, adapter=tmp_path / "head")   # not "another base"
    build_adapter(base, tmp_path / "conv", target_modules=["patch_embedding"])      # PEFT's LoRA of a Conv2d
    with pytest.raises(CheckpointError, match="patch_embedding.weight has a LoRA of a convolution"):
        Idefics3ForConditionalGeneration.from_pretrained(base, adapter=tmp_path / "conv")
    from pipeline.checkpoint import check_adapter, check_model       # the jobs' driver check, before any actor
    with pytest.raises(CheckpointError, match="patch_embedding.weight with a LoRA of a convolution"):
        check_adapter(str(tmp_path / "conv"), None, check_model(str(base), None, 1))
    for url in ("https://huggingface.co/owner/name", "owner/name"):   # the jobs' --adapter reads these, not the library
        with pytest.raises(FileNotFoundError, match=f"adapter '{url}': no such folder"):
            Idefics3ForConditionalGeneration.from_pretrained(base, adapter=url)
    shutil.copy(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle weights are never loaded"):
        Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder)


def test_a_bfloat16_model_gets_the_float32_merge_rounded_once(adapted):
    """The merge runs in float32 whatever the model's dtype, and is cast once (merging in bfloat16
    would round the base weight, the delta and their sum)."""
    base, folder, _ = adapted
    merged = dict(Idefics3ForConditionalGeneration.from_pretrained(base, adapter=folder).named_parameters())
    low = Idefics3ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16, adapter=folder)
    for name, p in low.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, merged[name].to(torch.bfloat16)), name
