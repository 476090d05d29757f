"""The decoder's elementwise chains compiled (model.pointwise) give the eager values, and a function
whose compile fails runs eagerly after one warning (model.compiling)."""
from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

from model import Idefics3ForConditionalGeneration
from model.compiling import CompiledOrEager
from model.llama import EAGER
from model.pointwise import COMPILED, compile_pointwise
from tests.model.test_parity import make_batch

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
@torch.no_grad()
@pytest.mark.filterwarnings("error:torch.compile of")
@pytest.mark.parametrize("name", ["smolvlm", "odd"])
def test_compiled_pointwise_gives_the_eager_logits(checkpoint, name):
    eager = Idefics3ForConditionalGeneration.from_pretrained(checkpoint(name))
    batch = make_batch(eager.config)
    expected = eager(**batch).logits
    compiled = compile_pointwise(copy.deepcopy(eager))
    layer = compiled.model.text_model.layers[0]
    assert layer.input_layernorm.pointwise is layer.self_attn.pointwise is layer.mlp.pointwise is COMPILED
    torch.testing.assert_close(compiled(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(f._run not in (None, f.fn) for f in (COMPILED.rms_norm, COMPILED.rope, COMPILED.act_mul))
    assert compile_pointwise(compiled, False).model.text_model.norm.pointwise is EAGER


@needs_compiler
def test_a_function_that_does_not_compile_runs_eagerly_after_one_warning():
    def half_traceable(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()          # fullgraph cannot hold it
        return x * 2

    fn = CompiledOrEager(half_traceable, "the half-traceable")
    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match="torch.compile of the half-traceable failed, running it eagerly"):
        assert torch.equal(fn(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(x + 1), (x + 1) * 2)
    assert fn._run is half_traceable


def test_a_callers_fault_still_raises():
    fn = CompiledOrEager(lambda x: x.reshape(3), "a reshape")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError):
        fn(torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
@pytest.mark.filterwarnings("error:torch.compile of")
def test_cuda_compiled_pointwise_gives_the_eager_logits_in_bf16(checkpoint):
    """Triton's kernels round once where eager bf16 rounds each op: close, not equal."""
    eager = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("idefics3"), dtype=torch.bfloat16, device="cuda")
    batch = {k: v.cuda() for k, v in make_batch(eager.config).items()}
    expected = eager(**batch).logits.float()
    got = compile_pointwise(copy.deepcopy(eager))(**batch).logits.float()
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
