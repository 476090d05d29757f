"""Fused q/k/v and gate/up projections: same logits, same state dict, undone by moves and casts."""
from __future__ import annotations

import torch

from model import Idefics3ForConditionalGeneration
from model.fusion import Fusable, fuse_projections
from tests.model.test_parity import make_batch

torch.set_num_threads(1)


def _logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits


def _model(checkpoint) -> Idefics3ForConditionalGeneration:
    return Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm")).eval()


def test_fused_model_gives_the_same_logits_and_shares_weight_memory(checkpoint):
    model = _model(checkpoint)
    batch = make_batch(model.config)
    before = _logits(model, batch)
    names = sorted(model.state_dict())
    fuse_projections(model)
    attn, mlp = model.model.text_model.layers[0].self_attn, model.model.text_model.layers[0].mlp
    assert attn.fused is not None and mlp.fused is not None
    fused = attn.fused.weight
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.v_proj.weight.data_ptr() == fused[-attn.v_proj.weight.shape[0]:].data_ptr()
    assert sorted(model.state_dict()) == names
    torch.testing.assert_close(_logits(model, batch), before, atol=1e-5, rtol=1e-5)


def test_save_after_fusion_round_trips(checkpoint, tmp_path):
    model = fuse_projections(_model(checkpoint))
    model.save_pretrained(tmp_path / "saved")
    again = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_cast_and_weight_loading_drop_the_fusion(checkpoint):
    model = fuse_projections(_model(checkpoint))
    model.to(torch.float64)
    fusable = [m for m in model.modules() if isinstance(m, Fusable)]
    assert all(m.fused is None for m in fusable)
    fuse_projections(model)
    state = {k: torch.zeros_like(v) if k.endswith("q_proj.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert all(m.fused is None for m in fusable)     # a stale fused copy would ignore the new weights
    fresh = _model(checkpoint).to(torch.float64)
    fresh.load_state_dict(state)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in make_batch(model.config).items()}
    torch.testing.assert_close(_logits(model, batch), _logits(fresh, batch), atol=0, rtol=0)
