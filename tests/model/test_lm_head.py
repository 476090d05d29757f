"""The LM head padded to aligned rows (model.lm_head): the same logits, state dict and tie; the
engine's tokens through it equal the reference's (on CUDA the engine pads it itself)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

import model.linear
from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine, SamplingParams
from model.lm_head import pad_lm_head
from tests.model.test_engine import _reference, _requests
from tests.model.test_parity import make_batch

VOCAB = 450     # not a multiple of 64, as Idefics3-8B's 128 259


def _embedding(model):
    return model.model.text_model.embed_tokens


@torch.no_grad()
@pytest.mark.parametrize("name", ["smolvlm", "idefics3"])      # tied, untied
def test_a_padded_head_keeps_logits_state_dict_and_tie(checkpoint, name, monkeypatch):
    plain = Idefics3ForConditionalGeneration.from_pretrained(checkpoint(name, vocab_size=VOCAB))
    padded = copy.deepcopy(plain)
    assert pad_lm_head(padded)
    head = padded.lm_head
    rows = head.padded.rows
    assert rows.shape == (512, head.in_features) and not rows[VOCAB:].any()
    assert head.weight.data_ptr() == rows.data_ptr() and head.weight.shape == (VOCAB, head.in_features)
    assert (head.weight is _embedding(padded).weight) == (name == "smolvlm")
    before, after = plain.state_dict(), padded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    batch = make_batch(plain.config)
    expected = plain(**batch).logits
    multiplied = []
    monkeypatch.setattr(model.linear, "linear",
                        lambda x, w, b=None, packed=None: multiplied.append(w.shape[0]) or F.linear(x, w, b))
    torch.testing.assert_close(padded(**batch).logits, expected, rtol=1e-6, atol=1e-6)
    assert multiplied[-1] == 512        # the head multiplied the whole buffer
    monkeypatch.undo()
    assert not pad_lm_head(padded) and padded.lm_head.padded is head.padded     # once
    twin = copy.deepcopy(padded)        # its weight is storage of its own: unpadded until padded again
    assert twin.lm_head.padded is None and pad_lm_head(twin) and twin.lm_head.padded.rows.shape[0] == 512
    assert twin.lm_head.weight.data_ptr() == twin.lm_head.padded.rows.data_ptr()
    moved = twin.to(torch.float64)      # a cast weight is another tensor: unpadded
    assert moved.lm_head.padded is None
    torch.testing.assert_close(moved(**batch).logits.float(), expected, rtol=1e-4, atol=1e-4)
    padded.load_state_dict(before, assign=True)      # a replaced weight: unpadded
    assert padded.lm_head.padded is None
    torch.testing.assert_close(padded(**batch).logits, expected, rtol=0, atol=0)


def test_aligned_vocabularies_are_left_alone(checkpoint):
    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint("idefics3"))     # 448 rows
    assert not pad_lm_head(model) and model.lm_head.padded is None


@pytest.fixture(scope="module")
def odd_vocab(tmp_path_factory):
    from transformers import Idefics3ForConditionalGeneration as Reference

    from tests.fixtures.checkpoints import build_checkpoint

    path = build_checkpoint(tmp_path_factory.mktemp("odd_vocab"), "idefics3", vocab_size=VOCAB)
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(path, [1, 0, 2], [SamplingParams(max_new_tokens=m) for m in (6, 9, 4)])
    expected = [_reference(ref, r) for r in requests]
    return Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32), requests, expected


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"))])
@pytest.mark.filterwarnings("error:torch.compile of")
def test_an_engine_on_a_padded_head_answers_as_the_reference(odd_vocab, compile):
    """Compiled as on CUDA: the padded buffer traces into the decode step (no eager fallback)."""
    model, requests, expected = odd_vocab
    padded = copy.deepcopy(model)
    assert pad_lm_head(padded)
    engine = LLMEngine(padded, max_batch_size=2, compile=compile)
    assert [r.token_ids for r in engine.generate(requests)] == expected
    assert engine.runner.compile == compile
    assert padded.lm_head.padded is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_pads_an_odd_vocabulary_and_answers_as_the_reference(odd_vocab):
    model, requests, expected = odd_vocab
    on_gpu = copy.deepcopy(model).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = LLMEngine(on_gpu, max_batch_size=2)
    assert on_gpu.lm_head.padded is not None and on_gpu.lm_head.padded.rows.shape[0] == 512
    assert [r.token_ids for r in engine.generate(requests)] == expected
