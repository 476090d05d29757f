"""model.linear: oneDNN projections (packed or not) equal F.linear in float32, and bit for bit in
bfloat16 where the CPU has it natively; training and stale packs fall back to the plain weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import Idefics3ForConditionalGeneration
from model.linear import ONEDNN, ONEDNN_DTYPES, Linear, PackedWeight, linear, pack_weights, uses_onednn
from tests.model.test_parity import make_batch

torch.set_num_threads(1)
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no usable oneDNN linear")
needs_native_bf16 = pytest.mark.skipif(torch.bfloat16 not in ONEDNN_DTYPES,
                                       reason="this CPU emulates bfloat16 (no AVX512-BF16 or AMX)")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (3, 5, 96), (0, 96)])
def test_linear_matches_f_linear_packed_or_not(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    with torch.inference_mode():
        assert uses_onednn(x, w)
        expected = F.linear(x, w, b)
        _close(linear(x, w, b), expected)
        _close(linear(x, w, b, PackedWeight(w)), expected)
        _close(linear(x, w[50:150], None, PackedWeight(w[50:150])), F.linear(x, w[50:150]))


@needs_native_bf16
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (3, 5, 96), (300, 96)])
def test_bf16_linear_packed_or_not_is_f_linear_bit_for_bit(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in (shape, (200, 96), (200,)))
    with torch.inference_mode():
        assert uses_onednn(x, w)
        assert torch.equal(linear(x, w, b, PackedWeight(w)), F.linear(x, w, b))
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_training_keeps_f_linear_and_its_gradients():
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    assert not uses_onednn(x, layer.weight)
    layer(x).square().sum().backward()
    weight = layer.weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    F.linear(x2, weight, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad)
    torch.testing.assert_close(x.grad, x2.grad)


@needs_onednn
def test_a_pack_stops_standing_for_a_weight_changed_by_an_optimizer_step_or_a_load():
    layer = Linear(16, 8)
    pack_weights(layer)
    assert layer.packed is not None and layer.packed.matches(layer.weight)
    x = torch.randn(4, 16)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x.requires_grad_()).sum().backward()
    optimizer.step()
    assert not layer.packed.matches(layer.weight)
    with torch.inference_mode():
        _close(layer(x), F.linear(x, layer.weight, layer.bias))     # the new weight, not the packed old one
    pack_weights(layer)
    layer.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.ones(8)})
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.ones(4, 8))


@needs_onednn
def test_packed_model_gives_the_same_logits_and_packs_fused_groups_once(checkpoint):
    from model.fusion import fuse_projections

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm")).eval()
    batch = make_batch(model.config)
    with torch.inference_mode():
        before = model(**batch).logits
    pack_weights(fuse_projections(model))
    attn = model.model.text_model.layers[0].self_attn
    assert attn.fused.packed is not None and attn.q_proj.packed is None and attn.o_proj.packed is not None
    assert model.lm_head.packed is not None
    with torch.inference_mode():
        _close(model(**batch).logits, before)


@needs_native_bf16
def test_a_packed_bf16_model_gives_the_same_logits_bit_for_bit(checkpoint):
    from model.fusion import fuse_projections

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm"), dtype=torch.bfloat16).eval()
    batch = make_batch(model.config)
    with torch.inference_mode():
        before = model(**batch).logits
    pack_weights(fuse_projections(model))
    vision_mlp = model.model.vision_model.encoder.layers[0].mlp.fc1             # with a bias
    assert model.lm_head.packed is not None and vision_mlp.packed is not None
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, before)


@needs_onednn
def test_nothing_is_packed_past_the_memory_budget(checkpoint, caplog):
    from model.fusion import fuse_projections
    from model.linear import available_host_memory

    model = fuse_projections(Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm")).eval())
    projections = [model.lm_head, model.model.text_model.layers[0].self_attn.fused]
    need = sum(p.weight.numel() * 4 for p in [*projections, model.model.text_model.layers[0].mlp.down_proj])
    pack_weights(model, budget_bytes=need)
    assert all(p.packed is None for p in projections)
    assert "not packing" in caplog.text
    pack_weights(model, budget_bytes=available_host_memory())
    assert all(p.packed is not None for p in projections)


@needs_onednn
def test_a_packed_model_deep_copies_and_moves_without_its_packs(checkpoint):
    import copy

    from model.fusion import fuse_projections

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("smolvlm")).eval()
    batch = make_batch(model.config)
    pack_weights(fuse_projections(model))
    twin = copy.deepcopy(model)                   # what the CUDA tests do after a CPU engine ran
    assert twin.lm_head.packed is None and twin.model.text_model.layers[0].self_attn.fused.packed is None
    with torch.inference_mode():
        _close(twin(**batch).logits, model(**batch).logits)
    model.to(torch.float64)
    assert model.lm_head.packed is None
