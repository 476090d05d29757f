"""Loading real safetensors checkpoints: shards, prefixes, tying, dtype, hub cache, bad folders, round trips."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import CheckpointError, Idefics3ForConditionalGeneration, Idefics3Model
from tests.fixtures.checkpoints import build_tokenizer, reference_config
from tests.model.test_parity import make_batch


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def test_sharded_checkpoint_loads_same_weights(checkpoint):
    single = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm"))
    folder = checkpoint("smolvlm", shard_size="50KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    sharded = Idefics3ForConditionalGeneration.from_pretrained(folder)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    assert sharded.lm_head.weight is sharded.model.text_model.embed_tokens.weight  # tied


@torch.no_grad()
@pytest.mark.parametrize("shard_size", [None, "50KB"])
def test_a_tied_checkpoint_storing_a_different_head_keeps_both_as_the_reference(checkpoint, tmp_path, shard_size):
    """tie_word_embeddings, but the file holds lm_head.weight unlike the embeddings (a head trained
    apart): transformers keeps both; tying them would drop one, whichever key was read last."""
    folder = copy_checkpoint(checkpoint("smolvlm"), tmp_path / "ck")
    embed = load_file(str(folder / "model.safetensors"))["model.text_model.embed_tokens.weight"]
    head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    edit_weights(folder, lambda s: s.update({"lm_head.weight": head}))
    if shard_size:      # the reference's shards of it: another order of the two keys
        transformers.Idefics3ForConditionalGeneration.from_pretrained(folder).save_pretrained(
            tmp_path / "sharded", max_shard_size=shard_size)
        folder = tmp_path / "sharded"
    ours = Idefics3ForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(ours.lm_head.weight, head) and torch.equal(ours.model.text_model.embed_tokens.weight, embed)
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    batch = make_batch(ours.config)
    torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)
    same = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm"))
    assert same.lm_head.weight is same.model.text_model.embed_tokens.weight      # a plain tied one stays tied


def test_pickle_only_folder_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(checkpoint("smolvlm") / "config.json", folder)
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*arbitrary code"):
        Idefics3ForConditionalGeneration.from_pretrained(folder)


def test_missing_key_is_listed(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint("idefics3"), tmp_path / "ck")
    edit_weights(folder, lambda s: s.pop("model.text_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['model.text_model.layers.1.mlp.up_proj.weight'\]"):
        Idefics3ForConditionalGeneration.from_pretrained(folder)


def test_unexpected_key_and_bad_shape_are_reported(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint("idefics3"), tmp_path / "ck")
    edit_weights(folder, lambda s: s.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model.extra.weight'\]"):
        Idefics3ForConditionalGeneration.from_pretrained(folder)
    edit_weights(folder, lambda s: (s.pop("model.extra.weight"), s.update({"lm_head.weight": torch.zeros(3, 3)})))
    with pytest.raises(CheckpointError, match=r"lm_head.weight: checkpoint shape \(3, 3\)"):
        Idefics3ForConditionalGeneration.from_pretrained(folder)


def test_a_weights_file_cut_short_is_named(checkpoint, tmp_path):
    """safetensors said "incomplete metadata, file not fully covered", naming no file of the 17 shards."""
    folder = copy_checkpoint(checkpoint("smolvlm", shard_size="50KB"), tmp_path / "ck")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"^{shard} is not a complete safetensors file: .* bytes where"):
        Idefics3ForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [None, "auto"])
def test_weights_stored_in_bfloat16_under_a_config_naming_no_dtype_load_in_it_as_the_references(checkpoint, tmp_path,
                                                                                               dtype):
    """transformers' "auto" takes the weights' dtype where the config names none: ours was float32 (twice the
    memory)."""
    folder = copy_checkpoint(checkpoint("smolvlm"), tmp_path / "ck")
    edit_weights(folder, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    ours = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    asked = {} if dtype is None else {"dtype": dtype}
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder, **asked)
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in ref.parameters()} == {torch.bfloat16}


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


@torch.no_grad()
def test_bare_model_prefix_loads_and_untied_head_must_exist(tmp_path):
    for name, tied in (("smolvlm", True), ("idefics3", False)):
        folder = build_tokenizer(tmp_path / name)
        torch.manual_seed(0)
        transformers.Idefics3Model(reference_config(folder, name)).save_pretrained(folder)
        keys = json.loads((folder / "config.json").read_text())  # saved by the bare model
        assert keys["model_type"] == "idefics3"
        bare = Idefics3Model.from_pretrained(folder)
        assert not any(k.startswith("model.") for k in bare.state_dict())
        if tied:
            full = Idefics3ForConditionalGeneration.from_pretrained(folder)
            assert torch.equal(full.model.text_model.embed_tokens.weight, bare.text_model.embed_tokens.weight)
        else:
            with pytest.raises(CheckpointError, match=r"missing keys \['lm_head.weight'\]"):
                Idefics3ForConditionalGeneration.from_pretrained(folder)


@torch.no_grad()
def test_full_checkpoint_loads_into_bare_model(checkpoint):
    folder = checkpoint("idefics3")
    full = Idefics3ForConditionalGeneration.from_pretrained(folder)
    bare = Idefics3Model.from_pretrained(folder)
    batch = make_batch(full.config)
    hidden = bare(**batch).last_hidden_state
    torch.testing.assert_close(full.lm_head(hidden), full(**batch).logits, atol=0, rtol=0)


def test_a_bare_model_saves_itself_as_the_bare_architecture(checkpoint, tmp_path):
    """Its config.json named the full model's class, which auto classes build (a head the folder lacks)."""
    for name in ("idefics3", "smolvlm"):
        Idefics3Model.from_pretrained(checkpoint(name)).save_pretrained(tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())["architectures"] == ["Idefics3Model"]
        assert type(transformers.AutoModel.from_pretrained(tmp_path / name)) is transformers.Idefics3Model


@torch.no_grad()
@pytest.mark.parametrize("name", ["smolvlm", "idefics3"])
def test_save_pretrained_round_trips_into_transformers(checkpoint, tmp_path, name):
    ours = Idefics3ForConditionalGeneration.from_pretrained(checkpoint(name))
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "generation_config.json").exists()
    ref, info = transformers.Idefics3ForConditionalGeneration.from_pretrained(
        tmp_path / "saved", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = make_batch(ours.config)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ref.eval()(**batch).logits[real], ours(**batch).logits[real], atol=1e-4, rtol=0)
    again = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert again.config == ours.config


def test_dtype_and_generation_config_are_applied(checkpoint):
    folder = checkpoint("odd")
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.text_model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.generation_config == json.loads((folder / "generation_config.json").read_text())
    model.to(torch.float16)
    assert model.model.text_model.rotary_emb.inv_freq.dtype == torch.float32  # never follows casts


@torch.no_grad()
def test_hub_id_resolves_through_offline_cache(checkpoint, tmp_path):
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-idefics3"
    shutil.copytree(checkpoint("odd"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model = Idefics3ForConditionalGeneration.from_pretrained("acme/tiny-idefics3", cache_dir=tmp_path / "hub")
    local = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("odd"))
    assert torch.equal(model.lm_head.weight, local.lm_head.weight)


def test_transformers_loading_keywords_are_read_or_refused(checkpoint, caplog):
    """torch_dtype and device_map were swallowed (a float32 model where bfloat16 was asked), and a
    misspelt keyword too: transformers' names are read as ours, others are a TypeError."""
    folder = checkpoint("smolvlm")
    assert Idefics3ForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    on_cpu = Idefics3ForConditionalGeneration.from_pretrained(folder, device_map="cpu", attn_implementation="sdpa")
    assert on_cpu.device == torch.device("cpu") and "attn_implementation change nothing here" in caplog.text
    # as model cards write them
    Idefics3ForConditionalGeneration.from_pretrained(folder, _attn_implementation="eager", use_cache=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['dtpye'\]"):
        Idefics3ForConditionalGeneration.from_pretrained(folder, dtpye=torch.float16)
    with pytest.raises(TypeError, match="lives on one device"):
        Idefics3ForConditionalGeneration.from_pretrained(folder, device_map={"": 0, "lm_head": 1})
    with pytest.raises(ValueError, match="disagree"):
        Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, torch_dtype=torch.bfloat16)
