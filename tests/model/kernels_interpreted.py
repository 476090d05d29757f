"""model.kernels' Triton kernels run by Triton's interpreter on CPU tensors: collected only by
tests/model/test_kernels.py, which runs this file under TRITON_INTERPRET=1 (set before triton is
imported) in a subprocess, so that CI checks the kernels without a GPU."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import model.kernels
import model.kernels.attention as attention
import model.kernels.fused as fused
import model.kernels.skinny as skinny
from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import _reference, _requests
from tests.model.test_kernels import count_launches

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch, skinny)


# ---- model.kernels.skinny ------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("n, k", [(48, 64), (77, 130), (448, 96), (40, 256)])   # 256: BLOCK_K divides K
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


# ---- model.kernels.fused -------------------------------------------------------------------------
def record_fusions(monkeypatch) -> list:
    """Switch the fused layers on; the Fusion of each kernel launch from then on."""
    made: list = []
    real = skinny.launch

    def recorded(x, weight, bias, out, config=None, fusion=skinny.NO_FUSION):
        made.append(fusion)
        return real(x, weight, bias, out, config, fusion)

    monkeypatch.setattr(skinny, "launch", recorded)
    monkeypatch.setattr(fused, "enabled", True)
    return made


def kind(fusion) -> str:
    parts = [name for name, t in (("norm", fusion.norm_weight), ("act", fusion.up), ("residual", fusion.residual))
             if t is not None]
    return "+".join(parts) or "none"


@pytest.fixture
def fusions(monkeypatch):
    monkeypatch.setattr(skinny, "enabled", True)
    return record_fusions(monkeypatch)


PARTS = {"norm": dict(norm=True), "norm+bias": dict(norm=True, bias=True), "residual": dict(residual=True),
         "act+residual": dict(act=True, residual=True), "act+residual+bias": dict(act=True, residual=True, bias=True)}


def fused_case(rows, n, k, dtype, norm=False, act=False, residual=False, bias=False, seed=0):
    torch.manual_seed(seed)
    gate_up = torch.randn(rows, 1, 2 * k, dtype=dtype)           # gate and up: views of one projection
    return (gate_up[..., :k], torch.randn(n, k, dtype=dtype) / k ** 0.5,
            torch.randn(n, dtype=dtype) if bias else None, torch.rand(k, dtype=dtype) + 0.5 if norm else None,
            1e-5, gate_up[..., k:] if act else None, torch.randn(rows, 1, n, dtype=dtype) if residual else None)


@pytest.mark.parametrize("parts", sorted(PARTS))
@pytest.mark.parametrize("rows, n, k", [(1, 48, 64), (2, 77, 130), (17, 40, 256), (64, 24, 96)])
def test_the_fused_kernel_computes_the_torch_chain(parts, rows, n, k, fusions):
    args = fused_case(rows, n, k, torch.float32, **PARTS[parts])
    torch.testing.assert_close(fused.fused_linear(*args), fused.fused_linear_torch(*args), rtol=1e-5, atol=1e-5)
    assert [kind(f) for f in fusions] == [parts.replace("+bias", "")]


@pytest.mark.parametrize("parts", sorted(PARTS))
def test_the_fused_kernel_rounds_bf16_where_torch_does(parts, fusions):
    """Each step rounded to bf16 as the torch chain rounds it: at most one bf16 step apart."""
    args = fused_case(5, 96, 128, torch.bfloat16, **PARTS[parts])
    out, expected = fused.fused_linear(*args), fused.fused_linear_torch(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 1, 96)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=4e-2)


@pytest.mark.parametrize("parts", sorted(PARTS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_more_rows_than_the_kernel_holds_take_the_prologue_kernel_and_f_linear(parts, dtype, tolerance, fusions,
                                                                              monkeypatch):
    prologues = []
    real = skinny.launch_prologue
    monkeypatch.setattr(skinny, "launch_prologue", lambda x, fusion: prologues.append(kind(fusion)) or real(x, fusion))
    args = fused_case(70, 24, 600, dtype, **PARTS[parts])          # 600: BLOCK_K does not divide it
    torch.testing.assert_close(fused.fused_linear(*args).float(), fused.fused_linear_torch(*args).float(),
                               rtol=tolerance, atol=tolerance)
    assert fusions == [] and prologues == ([] if parts == "residual" else [parts.replace("+bias", "")])


def test_without_a_prologue_more_rows_are_the_torch_chain(fusions):
    args = fused_case(65, 24, 32, torch.float32, residual=True)
    assert torch.equal(fused.fused_linear(*args), fused.fused_linear_torch(*args))
    assert fusions == []


# ---- model.kernels.attention ---------------------------------------------------------------------
def cache_case(layers=2, slots=4, kv_heads=2, max_len=100, head_dim=16, heads=8, rows=3, kv_len=64,
               dtype=torch.float32, seed=0):
    """Caches, a step's q/k/v before RoPE (q's rows strided, as the fused projection's slices),
    cos/sin of the rows' positions (the first row's at the bucket's last key)."""
    torch.manual_seed(seed)
    k_cache = torch.randn(layers, slots, kv_heads, max_len + 1, head_dim, dtype=dtype)
    positions = torch.randint(0, kv_len, (rows,))
    positions[0] = kv_len - 1
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = (part.view(rows, -1, head_dim) for part in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                       kv_heads * head_dim], dim=-1))
    angles = positions[:, None].float() * 0.7 ** torch.arange(head_dim // 2)
    angles = torch.cat([angles, angles], dim=-1)
    return (q, k, v, angles.cos().to(dtype), angles.sin().to(dtype), k_cache, torch.randn_like(k_cache), positions)


def both_ways(case, layer, kv_len, splits=None):
    """(kernel's out, caches), (torch's out, caches), each from copies of the caches."""
    q, k, v, cos, sin, k_cache, v_cache, positions = case
    kc, vc = k_cache.clone(), v_cache.clone()
    out = attention.launch(q, k, v, cos, sin, kc[layer], vc[layer], positions, kv_len, splits)
    tc, tv = k_cache.clone(), v_cache.clone()
    expected = attention.rope_write_attend_torch(q, k, v, cos, sin, tc, tv, layer, positions, kv_len)
    return (out, kc, vc), (expected, tc, tv)


@pytest.mark.parametrize("kv_heads, heads, head_dim", [(2, 8, 16), (1, 3, 8), (4, 4, 64), (2, 10, 32)])
@pytest.mark.parametrize("kv_len, splits", [(64, None), (64, 3), (640, None), (1536, None)])
def test_decode_attention_equals_the_torch_step(kv_heads, heads, head_dim, kv_len, splits):
    case = cache_case(kv_heads=kv_heads, heads=heads, head_dim=head_dim, max_len=kv_len + 5, kv_len=kv_len)
    got, expected = both_ways(case, 1, kv_len, splits)
    for ours, theirs in zip(got, expected):      # the output, and both caches with the new rows written
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert attention.split_count(kv_len) == {64: 1, 640: 2, 1536: 3}[kv_len]


def test_a_row_past_the_step_keys_is_written_and_attends_to_them_all():
    """A free slot's row (its position past the kv bucket): written as the torch step writes it."""
    case = list(cache_case(kv_len=96, max_len=120))
    case[-1] = torch.tensor([95, 110, 3])
    for splits in (1, 2):
        got, expected = both_ways(case, 0, 96, splits)
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_decode_attention_in_half_precision_and_never_reads_past_a_row():
    q, k, v, cos, sin, k_cache, v_cache, positions = cache_case(dtype=torch.bfloat16, kv_len=200, max_len=300)
    reference = [t.float() for t in (q, k, v, cos, sin, k_cache, v_cache)]
    expected = attention.rope_write_attend_torch(*reference, 0, positions, 200)
    for row, position in enumerate(positions.tolist()):        # keys no query may see: poison
        k_cache[0, row, :, position:] = float("nan")           # the new position's too: written first
        v_cache[0, row, :, position:] = float("nan")
    for splits in (1, 2):
        out = attention.launch(q, k, v, cos, sin, k_cache[0], v_cache[0], positions, 200, splits)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(k_cache[0, torch.arange(3), :, positions].float(),
                                   reference[5][0, torch.arange(3), :, positions], rtol=2e-2, atol=2e-2)


def test_the_compiled_op_writes_the_caches_in_place():
    compiled_op_writes_in_place("cpu")


def compiled_op_writes_in_place(device: str) -> None:
    """Under torch.compile the op writes into the caches themselves: no copy of them in the code
    (also run on CUDA by test_kernels.py)."""
    from torch._inductor.utils import run_and_get_code

    case = [t.to(device) for t in cache_case(kv_len=64)]
    (expected, k_want, v_want), _ = both_ways(case, 1, 64)
    q, k, v, cos, sin, k_cache, v_cache, positions = case

    def step(q, k, v, cos, sin, k_cache, v_cache, positions, kv_len):
        return attention.decode_attention(q + 0, k, v, cos, sin, k_cache, v_cache, 1, positions, kv_len) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    out, code = run_and_get_code(compiled, q, k, v, cos, sin, k_cache, v_cache, positions, 64)
    torch.testing.assert_close(out, expected * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_want, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache, v_want)
    assert "decode_attention" in code[0] and not [line for line in code[0].splitlines()
                                                  if "clone" in line or "copy_" in line], code[0]


@pytest.fixture(scope="module")
def tiny(checkpoint):
    from transformers import Idefics3ForConditionalGeneration as Reference

    path = checkpoint("idefics3")
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(path, [1, 0, 2], [SamplingParams(max_new_tokens=m) for m in (5, 7, 3)])
    return path, requests, [_reference(ref, r) for r in requests]


compiling = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")


# Each kernel's launches are counted where it runs beside the others (the interpreter is slow: CI's time).
# Eager: the compiled step through the kernels is checked below against the eager one (an engine compiling
# through the interpreter cost CI ~30 s more), and the compiled engine against the reference in test_engine.
@pytest.mark.parametrize("kernels", [["skinny", "attention"], ["skinny", "fused", "attention"]])
def test_an_engine_through_the_kernels_answers_as_the_reference(tiny, kernels, monkeypatch):
    path, requests, expected = tiny
    made = {name: count_launches(monkeypatch, getattr(model.kernels, name)) for name in kernels if name != "fused"}
    fusions = record_fusions(monkeypatch) if "fused" in kernels else None
    model_ = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    engine = LLMEngine(model_, max_batch_size=4, compile=False)
    assert [r.token_ids for r in engine.generate(requests)] == expected
    for launches in made.values():          # the decode steps ran the kernels (at most 4 rows)
        assert launches and max(launches) <= 4
    if fusions is not None:     # norms before q/k/v and gate/up, o's residual, down's activation and residual
        assert {kind(f) for f in fusions} == {"none", "norm", "residual", "act+residual"}



@compiling
@pytest.mark.parametrize("fusing", [False, True])
def test_the_compiled_step_through_the_kernels_writes_the_cache_in_place(tiny, monkeypatch, fusing):
    """As test_engine's check of the torch step: no scatter of the cache, the same logits and rows."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from model.engine.kv_cache import KVCache
    from model.engine.runner import decode_logits
    from tests.model.test_engine import _PostGradGraph

    made = [count_launches(monkeypatch, module) for module in (skinny, attention)]
    monkeypatch.setattr(fused, "enabled", fusing)
    vlm = Idefics3ForConditionalGeneration.from_pretrained(tiny[0], dtype=torch.float32)
    tc = vlm.config.text_config
    cache = KVCache(tc.num_hidden_layers, 4, tc.num_key_value_heads, 128, tc.head_dim, torch.float32, "cpu")
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([3, 0, 9])
    graph = _PostGradGraph()
    CustomGraphPass.register(_PostGradGraph)
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=graph, fx_graph_cache=False), torch.inference_mode():
        compiled = torch.compile(decode_logits, fullgraph=True, dynamic=True)(vlm, cache.k, cache.v, tokens, positions, 64)
        k_after = cache.k.clone()
        cache.k.zero_()
        monkeypatch.setattr(attention, "enabled", False)
        monkeypatch.setattr(skinny, "enabled", False)
        eager = decode_logits(vlm, cache.k, cache.v, tokens, positions, 64)
    ops = set(graph.ops)
    assert "idefics3.skinny_linear.default" in ops and any("auto_functionalized" in op for op in ops), sorted(ops)
    assert ("idefics3.fused_linear.default" in ops) == fusing
    assert not [op for op in ops if "scatter" in op], sorted(ops)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_after, cache.k, rtol=1e-4, atol=1e-4)
    assert all(made)


def test_the_benchmark_times_both_and_sweeps_the_configs(tmp_path, capsys):
    from bench import skinny as bench

    out = tmp_path / "rows.jsonl"
    bench.main(["--device", "cpu", "--rows", "2", "--shape", "qkv", "40", "64", "--shape", "head", "70", "32",
                "--layers", "2", "--min-bytes", "20000", "--repeats", "1", "--sweep", "--fused", "--dtype", "float32",
                "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "sweep best" in lines[1] and "best of each" in lines[3]
    assert [r.get("shape") for r in rows] == ["qkv", "head", None]
    assert all(r["kernel"] and len(r["sweep_us"]) == len(skinny.configs()) and r["picked"] for r in rows[:2])
    assert rows[2]["rows"] == 2 and rows[2]["best_ms"] <= rows[2]["aten_ms"]
    # q/k/v with its norm, both ways; the head has no fusion, and counts as its kernel in both sums
    assert rows[0]["fusion"] == "norm" and rows[0]["chain_us"] > 0 and rows[0]["fused_us"] > 0
    assert "fusion" not in rows[1]
    assert "torch chain" in lines[3] and rows[2]["fused_ms"] > 0 and rows[2]["chain_ms"] > 0


def test_the_attention_benchmark_times_both(tmp_path):
    from bench import attention as bench

    out = tmp_path / "rows.jsonl"
    bench.main(["--device", "cpu", "--rows", "2", "--kv", "64", "600", "--layers", "2", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--repeats", "1", "--dtype", "float32", "--splits", "1", "3",
                "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kv_len"], r["splits"], r["kernel"]) for r in rows] == [(64, 1, True), (600, 2, True)]
    assert all(list(r["splits_us"]) == ["1", "3"] and min(r["splits_us"].values()) > 0 for r in rows)


def test_a_tensor_parallel_shard_fuses_only_its_norms(tiny, monkeypatch):
    """A row-parallel projection's sum comes after its all-reduce: o and down keep the torch chain."""
    from model.engine.kv_cache import KVCache
    from model.engine.runner import decode_logits
    from model.fusion import fuse_projections
    from model.parallel.layers import TPContext
    from model.parallel.loading import load_shard

    shard = fuse_projections(load_shard(tiny[0], TPContext(0, 1)).eval())
    tc = shard.config.text_config
    cache = KVCache(tc.num_hidden_layers, 2, tc.num_key_value_heads, 32, tc.head_dim, torch.float32, "cpu")
    tokens, positions = torch.tensor([5, 6]), torch.tensor([3, 0])
    with torch.inference_mode():
        plain = decode_logits(shard, cache.k, cache.v, tokens, positions, 8)
        monkeypatch.setattr(skinny, "enabled", True)
        fusions = record_fusions(monkeypatch)
        fused_logits = decode_logits(shard, cache.k, cache.v, tokens, positions, 8)
    assert {kind(f) for f in fusions} == {"norm", "none"}
    torch.testing.assert_close(fused_logits, plain, rtol=1e-5, atol=1e-5)
