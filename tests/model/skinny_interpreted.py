"""model.skinny's Triton kernel run by Triton's interpreter on CPU tensors: collected only by
tests/model/test_skinny.py, which runs this file under TRITON_INTERPRET=1 (set before triton is
imported) in a subprocess, so that CI checks the kernel without a GPU."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import model.skinny as skinny
from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import _reference, _requests

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches made (their row counts), while model.skinny is switched on."""
    made: list[int] = []
    real = skinny.launch

    def counted(x, *args, **kwargs):
        made.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(skinny, "launch", counted)
    monkeypatch.setattr(skinny, "enabled", True)
    return made


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("n, k", [(48, 64), (77, 130), (448, 96)])
def test_the_kernel_multiplies_as_f_linear(rows, n, k, launches):
    torch.manual_seed(rows * n)
    x, weight, bias = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(skinny.skinny_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skinny.skinny_linear(x, weight, bias), F.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    assert launches == [rows, rows]


def test_leading_dims_strided_rows_and_half_precision(launches):
    torch.manual_seed(0)
    big = torch.randn(300, 96)
    weight = big[100:250]                           # rows of a larger matrix (a fused projection's part)
    x = torch.randn(3, 1, 2 * 96)[..., ::2]         # not contiguous
    torch.testing.assert_close(skinny.skinny_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    half, w16 = x.bfloat16(), weight.bfloat16()
    out = skinny.skinny_linear(half, w16)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 1, 150)
    # float32 sums of the same bf16 products, rounded once: within bf16's rounding of F.linear's result
    torch.testing.assert_close(out.float(), F.linear(half.float(), w16.float()), rtol=8e-3, atol=8e-3)
    assert launches == [3, 3]


def test_more_rows_than_the_kernel_holds_go_to_f_linear(launches):
    x, weight = torch.randn(65, 32), torch.randn(40, 32)
    assert torch.equal(skinny.skinny_linear(x, weight), F.linear(x, weight))
    assert launches == []


def test_one_compiled_function_serves_every_row_count(launches):
    """The op is opaque to torch.compile: no guard on the rows, one graph for all."""
    from torch._dynamo.utils import counters

    counters.clear()
    weight = torch.randn(50, 96)
    step = torch.compile(lambda x: skinny.skinny_linear(x, weight).relu(), dynamic=True, fullgraph=True)
    for rows in (2, 5, 40, 70):
        x = torch.randn(rows, 1, 96)
        torch.testing.assert_close(step(x), F.linear(x, weight).relu(), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert launches == [2, 5, 40]


@pytest.fixture(scope="module")
def tiny(checkpoint):
    from transformers import Idefics3ForConditionalGeneration as Reference

    path = checkpoint("idefics3")
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(path, [1, 0, 2], [SamplingParams(max_new_tokens=m) for m in (5, 7, 3)])
    return path, requests, [_reference(ref, r) for r in requests]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"))])
@pytest.mark.filterwarnings("error:torch.compile of")
def test_an_engine_through_the_kernel_answers_as_the_reference(tiny, compile, launches):
    path, requests, expected = tiny
    model = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    engine = LLMEngine(model, max_batch_size=4, compile=compile)
    assert [r.token_ids for r in engine.generate(requests)] == expected
    assert engine.runner.compile == compile
    assert launches and max(launches) <= 4            # the decode steps' projections ran the kernel


def test_the_benchmark_times_both_and_sweeps_the_configs(tmp_path, capsys):
    from bench import skinny as bench

    out = tmp_path / "rows.jsonl"
    bench.main(["--device", "cpu", "--rows", "2", "--shape", "qkv", "40", "64", "--shape", "head", "70", "32",
                "--layers", "2", "--min-bytes", "20000", "--repeats", "1", "--sweep", "--dtype", "float32",
                "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "sweep best" in lines[1] and "best of each" in lines[3]
    assert [r.get("shape") for r in rows] == ["qkv", "head", None]
    assert all(r["kernel"] and len(r["sweep_us"]) == len(skinny.configs()) and r["picked"] for r in rows[:2])
    assert rows[2]["rows"] == 2 and rows[2]["best_ms"] <= rows[2]["aten_ms"]
