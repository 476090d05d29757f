"""CUDA: loading straight onto the GPU and the GPU forward agree with the CPU path (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from model import Idefics3ForConditionalGeneration
from tests.model.test_parity import make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@torch.no_grad()
@pytest.mark.parametrize("name", ["smolvlm", "idefics3", "odd"])
def test_cuda_forward_matches_cpu(checkpoint, name):
    folder = checkpoint(name)
    cpu = Idefics3ForConditionalGeneration.from_pretrained(folder)
    batch = make_batch(cpu.config)
    real = batch["attention_mask"].bool()
    expected = cpu(**batch).logits[real]
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.05)):
        gpu = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device="cuda")
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        assert gpu.model.text_model.rotary_emb.inv_freq.dtype == torch.float32
        assert gpu.model.text_model.rotary_emb.inv_freq.is_cuda
        out = gpu(**on_gpu, labels=on_gpu["input_ids"].masked_fill(~on_gpu["attention_mask"].bool(), -100))
        scale = expected.abs().max().item()
        assert (out.logits[real.cuda()].float().cpu() - expected).abs().max().item() < tol * scale
        assert torch.isfinite(out.loss)
