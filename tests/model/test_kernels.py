"""model.kernels: the few-rows projection kernel (skinny) and decode attention. Without a GPU, Triton's
interpreter runs them (tests/model/kernels_interpreted.py, in a subprocess); on CUDA the compiled
kernels, at the 8B's shapes and inside the engine's compiled, graphed decode step."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.kernels
import model.linear
import model.kernels.attention as attention
import model.kernels.fused as fused
import model.kernels.skinny as skinny
from model.kernels import runtime
from model import Idefics3ForConditionalGeneration
from model.engine import LLMEngine, SamplingParams
from tests.model.test_engine import _reference, _requests

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def count_launches(monkeypatch, module) -> list[int]:
    """Switch `module`'s kernel on; the launches it makes from then on (their first argument's rows)."""
    made: list[int] = []
    real = module.launch

    def counted(x, *args, **kwargs):
        made.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, "launch", counted)
    monkeypatch.setattr(module, "enabled", True)
    return made


def test_without_a_gpu_or_the_interpreter_the_op_is_f_linear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight = torch.randn(2, 16), torch.randn(24, 16)
    assert not skinny.runs_skinny(x, weight)
    assert torch.equal(skinny.skinny_linear(x, weight), F.linear(x, weight))
    before = model.linear.linear(x, weight)             # oneDNN on CPU
    monkeypatch.setattr(skinny, "enabled", True)       # the switch is for GPU projections only
    assert torch.equal(model.linear.linear(x, weight), before)


def test_gpus_before_ampere_keep_the_torch_step(monkeypatch):
    capabilities = {0: (7, 5), 1: (8, 0), 2: (9, 0)}        # a T4, an A100, an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    runtime.capable_gpu.cache_clear()
    try:
        assert [runtime.capable_gpu(i) for i in range(3)] == [False, True, True]
    finally:
        runtime.capable_gpu.cache_clear()


@cuda
def test_cuda_this_gpu_takes_the_kernels_from_ampere_on():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    assert runtime.kernel_can_run(x) == (torch.cuda.get_device_capability() >= (8, 0))


def test_the_environment_switches_kernels_on_in_every_process():
    """IDEFICS3_KERNELS sets the switches' defaults (what a tensor-parallel worker or Ray actor sees)."""
    probe = ("import model.kernels.attention as a, model.kernels.fused as f, model.kernels.skinny as s; "
             "print(s.enabled, f.enabled, a.enabled)")
    runs = {value: subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT), IDEFICS3_KERNELS=value)).stdout.split()
            for value in ("skinny, attention", "", "skinny,fused,attention")}
    assert runs == {"skinny, attention": ["True", "False", "True"], "": ["False"] * 3,
                    "skinny,fused,attention": ["True"] * 3}


def test_without_a_gpu_or_the_interpreter_layers_do_not_fuse(monkeypatch):
    """The fused layers are for the kernel's devices; elsewhere the decode step is the plain one."""
    from model.engine.kv_cache import DecodeAttention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(skinny, "enabled", True)
    monkeypatch.setattr(fused, "enabled", True)
    x = torch.randn(2, 1, 16)
    assert DecodeAttention.few_rows and not fused.fuses(DecodeAttention, x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused.fuses(DecodeAttention, x) and not fused.fuses(object(), x)     # a prefill's backend
    monkeypatch.setattr(skinny, "enabled", False)
    assert not fused.fuses(DecodeAttention, x)


def test_which_calls_the_kernel_takes():
    x, weight = torch.randn(2, 1, 16), torch.randn(24, 16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setattr(runtime, "triton_available", lambda: True)
        assert skinny.runs_skinny(x, weight)
        assert skinny.runs_skinny(x.bfloat16(), weight.bfloat16())
        assert not skinny.runs_skinny(torch.randn(65, 16), weight)          # prefill: F.linear
        assert not skinny.runs_skinny(x, weight.bfloat16())                 # mixed dtypes
        assert not skinny.runs_skinny(x, weight.t().contiguous().t())       # columns not contiguous
        assert not skinny.runs_skinny(x.double(), weight.double())
    assert [skinny.row_bucket(n) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]


def test_without_a_gpu_or_the_interpreter_attention_is_the_torch_step(monkeypatch):
    from model.engine.kv_cache import DecodeAttention
    from model.llama import apply_rope

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k_cache, v_cache = torch.randn(2, 3, 2, 40, 16), torch.randn(2, 3, 2, 40, 16)
    q, k, v, positions = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.tensor([31, 0, 7])
    cos, sin = torch.rand(3, 16), torch.rand(3, 16)
    visible = torch.arange(32)[None, :] <= positions[:, None]
    keys, values = k_cache.clone(), v_cache.clone()
    keys[1, torch.arange(3), :, positions] = apply_rope(k, cos[:, None], sin[:, None])
    values[1, torch.arange(3), :, positions] = v
    expected = attention.attend_torch(apply_rope(q, cos[:, None], sin[:, None]), keys, values, 1, 32, visible)
    assert not attention.runs_kernel(q, k_cache, v_cache)
    assert torch.equal(attention.decode_attention(q, k, v, cos, sin, k_cache, v_cache, 1, positions, 32), expected)
    assert torch.equal(k_cache, keys) and torch.equal(v_cache, values)
    monkeypatch.setattr(attention, "enabled", True)       # for the GPU: the CPU's decode step keeps torch's RoPE
    assert not DecodeAttention(k_cache, v_cache, positions, 32).takes_rope
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert DecodeAttention(k_cache, v_cache, positions, 32).takes_rope
    assert [attention.split_count(n) for n in (64, 512, 513, 4096, 100_000)] == [1, 1, 2, 8, 16]


@pytest.mark.skipif(not runtime.triton_available(), reason="needs triton (its interpreter runs the kernel on CPU)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA tests below run the kernel itself")
def test_the_interpreted_kernels():
    """The kernels' arithmetic, their bounds and their place in the engine, by Triton's interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
                           "tests/model/kernels_interpreted.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    # nothing skipped but, without a C++ compiler, the compiled cases
    assert " passed" in done.stdout and ("skipped" not in done.stdout or shutil.which("g++") is None), \
        done.stdout[-2000:]


def compile_for(target: int, kernel, types: dict[str, str], constants: dict) -> dict:
    """Compile a Triton kernel for sm_<target> without a GPU (ptxas comes with triton): its asm.
    Pointers and integers are declared 16-divisible, as Triton's launcher finds them at the 8B's shapes."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton has no CUDA backend")
    if torch.cuda.is_available():       # the CUDA tests compile and run them; ASTSource's form varies by version
        pytest.skip("with a GPU the CUDA tests below compile the kernels themselves")
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):     # under @triton.heuristics
        fn = fn.fn
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name].startswith("*") or signature[name] == "i32"}
    options = {key: constants.pop(key) for key in ("num_warps", "num_stages") if key in constants}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", target, 32), options=options).asm


SKINNY_TYPES = dict(x_ptr="*{t}", w_ptr="*{t}", out_ptr="*{t}", bias_ptr="*{t}", norm_ptr="*{t}", up_ptr="*{t}",
                    res_ptr="*{t}", M="i32", N="i32", K="i32", stride_x="i32", stride_w="i32", stride_up="i32",
                    stride_res="i32", eps="fp32")
UNFUSED = dict(NORM=False, ACT=False, RESIDUAL=False)


@pytest.mark.skipif(not runtime.triton_available(), reason="needs triton")
@pytest.mark.parametrize("target", [90, 80])
def test_the_projection_kernel_compiles_for_the_gpu_in_every_config(target):
    """What the interpreter cannot check: Triton's GPU compiler accepts the kernel (bf16: tensor-core
    dots), for every autotuned config and each row bucket, bf16 and float32 with a bias."""
    cases = [dict(c, ROWS=16, dtype="bf16", HAS_BIAS=False, **UNFUSED) for c in skinny.configs()]
    cases += [dict(skinny.configs()[0], ROWS=rows, dtype="bf16", HAS_BIAS=False, **UNFUSED) for rows in (32, 64)]
    cases += [dict(skinny.configs()[0], ROWS=16, dtype="fp32", HAS_BIAS=True, **UNFUSED)]
    fused = [dict(NORM=True, ACT=False, RESIDUAL=False), dict(NORM=False, ACT=True, RESIDUAL=True),
             dict(NORM=False, ACT=False, RESIDUAL=True)]         # model.kernels.fused's three uses
    cases += [dict(c, ROWS=16, dtype="bf16", HAS_BIAS=False, **f) for c in skinny.configs()[:2] for f in fused]
    for case in cases:
        dtype = case.pop("dtype")
        types = {name: t.format(t=dtype) for name, t in SKINNY_TYPES.items()}
        asm = compile_for(target, skinny.plain_kernel(), types, dict(case, UPCAST=dtype == "fp32", EVEN_K=True))
        assert asm["cubin"] and ("mma" in asm["ptx"]) == (dtype == "bf16")    # float32: exact FMAs, no tf32
    from model.kernels.skinny_triton import prologue_kernel      # a big batch's norm or activation alone

    types = dict(x_ptr="*bf16", norm_ptr="*bf16", up_ptr="*bf16", out_ptr="*bf16", M="i32", K="i32", stride_x="i32",
                 stride_up="i32", eps="fp32")
    for norm, act in ((True, False), (False, True)):
        shapes = dict(ROWS=4, BLOCK_K=512, EVEN_K=True, NORM=norm, ACT=act)
        assert compile_for(target, prologue_kernel, types, shapes)["cubin"]


def sass_of(asm: dict) -> str:
    """The machine code of a compiled kernel, by the cuobjdump that comes with triton."""
    import triton

    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if not path or not os.path.exists(path):
        pytest.skip("this triton carries no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(asm["cubin"])
        cubin.flush()
        return subprocess.run([path, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def async_16_byte_copies(sass: str) -> int:
    return len(re.findall(r"\bLDGSTS\.E(?:\.BYPASS)?\.128\b", sass))


@pytest.mark.skipif(not runtime.triton_available(), reason="needs triton")
@pytest.mark.parametrize("parts", ["plain", "norm", "act+residual"])
def test_the_projection_kernel_streams_its_tiles_in_pipelined_16_byte_copies(parts):
    """What a bandwidth-bound kernel lives by, read off its sm_90 machine code: every tile it streams
    (the weight's, the rows', the up projection's) comes in 16-byte asynchronous copies, one set a
    pipeline stage. A mask Triton cannot prove constant along K, or a stride it cannot prove
    16-divisible, would make them narrower (4x-8x the copies for the same bytes) or synchronous."""
    flags = dict(plain=UNFUSED, norm=dict(UNFUSED, NORM=True), **{"act+residual": dict(UNFUSED, ACT=True, RESIDUAL=True)})
    types = {name: t.format(t="bf16") for name, t in SKINNY_TYPES.items()}
    for config in skinny.configs():
        sass = sass_of(compile_for(90, skinny.plain_kernel(), types, dict(
            config, ROWS=16, HAS_BIAS=False, UPCAST=False, EVEN_K=True, **flags[parts])))
        tiles = config["BLOCK_N"] + 16 + (16 if parts == "act+residual" else 0)     # weight, rows, up: rows
        per_stage = tiles * config["BLOCK_K"] * 2 // (config["num_warps"] * 32 * 16)
        assert async_16_byte_copies(sass) >= config["num_stages"] * per_stage, (parts, config)


@pytest.mark.skipif(not runtime.triton_available(), reason="needs triton")
@pytest.mark.parametrize("target", [90, 80])
def test_the_attention_kernels_compile_for_the_gpu(target):
    from model.kernels import attention_triton

    for dtype, direct in (("bf16", True), ("bf16", False), ("fp32", True), ("fp32", False)):
        types = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", cos_ptr=f"*{dtype}", sin_ptr=f"*{dtype}",
                     kc_ptr=f"*{dtype}", vc_ptr=f"*{dtype}", pos_ptr="*i64", out_ptr=f"*{dtype}",
                     part_ptr=f"*{dtype}" if direct else "*fp32", stat_ptr=f"*{dtype}" if direct else "*fp32",
                     kv_len="i32", chunk="i32", scale="fp32", splits="i32",
                     **{f"stride_{name}": "i32"
                        for name in ("qb", "qh", "kb", "kh", "vb", "vh", "slot", "head", "pos")})
        shapes = dict(GROUP=4, HEAD_DIM=128, G_PAD=16, D_PAD=128, BLOCK_L=attention.BLOCK_L)
        asm = compile_for(target, attention_triton.split_kernel, types, dict(shapes, DIRECT=direct, UPCAST=dtype == "fp32"))
        assert asm["cubin"]
        if dtype == "bf16":     # an iteration's keys and values in 16-byte asynchronous copies, double-buffered at least
            keys_and_values = 2 * attention.BLOCK_L * 128 * 2 // (4 * 32 * 16)
            assert async_16_byte_copies(sass_of(asm)) >= 2 * keys_and_values
    merged = dict(part_ptr="*fp32", stat_ptr="*fp32", out_ptr="*bf16", splits="i32", head_dim="i32")
    assert compile_for(target, attention_triton.merge_kernel, merged, dict(SPLITS_PAD=8, D_PAD=128))["cubin"]


@cuda
@pytest.mark.parametrize("rows", [1, 2, 16, 32, 64])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (128259, 4096)])   # 8B: q/k/v, down, head
def test_cuda_kernel_at_the_8b_shapes(rows, n, k):
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    assert skinny.runs_skinny(x, weight)
    out = skinny.skinny_linear(x, weight)
    expected = F.linear(x.float(), weight.float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@cuda
@pytest.mark.parametrize("rows", [2, 32, 100])          # 100: the prologue kernel, then cuBLAS
@pytest.mark.parametrize("parts, n, k", [("norm", 6144, 4096), ("act+residual", 4096, 14336), ("residual", 4096, 4096)])
def test_cuda_fused_projections_at_the_8b_shapes(rows, parts, n, k):
    from tests.model.kernels_interpreted import PARTS, fused_case

    case = fused_case(rows, n, k, torch.bfloat16, **PARTS[parts])
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in case]
    expected = fused.fused_linear_torch(*args)
    torch.testing.assert_close(fused.fused_linear(*args).float(), expected.float(), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_float32_kernel_is_full_precision():
    x, weight = torch.randn(3, 512, device="cuda"), torch.randn(700, 512, device="cuda")
    torch.testing.assert_close(skinny.skinny_linear(x, weight), F.linear(x.double(), weight.double()).float(),
                               rtol=1e-5, atol=1e-4)


@cuda
@pytest.mark.parametrize("rows, kv_len", [(2, 256), (32, 1024), (2, 4096)])
def test_cuda_decode_attention_at_the_8b_shapes(rows, kv_len):
    torch.manual_seed(rows)
    make = dict(dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = (torch.randn(2, rows, 8, kv_len + 1, 128, **make) for _ in range(2))
    q, k, v = torch.randn(rows, 32, 128, **make), torch.randn(rows, 8, 128, **make), torch.randn(rows, 8, 128, **make)
    cos, sin = torch.rand(rows, 128, **make), torch.rand(rows, 128, **make)
    positions = torch.randint(0, kv_len, (rows,), device="cuda")
    expected_caches = [k_cache.float(), v_cache.float()]
    expected = attention.rope_write_attend_torch(q.float(), k.float(), v.float(), cos.float(), sin.float(),
                                                 *expected_caches, 1, positions, kv_len)
    assert attention.runs_kernel(q, k_cache, v_cache)
    out = attention.decode_attention(q, k, v, cos, sin, k_cache, v_cache, 1, positions, kv_len)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k_cache.float(), expected_caches[0], rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_compiled_attention_writes_the_caches_in_place():
    from tests.model.kernels_interpreted import compiled_op_writes_in_place

    compiled_op_writes_in_place("cuda")        # the interpreter's check, on the GPU's torch and Triton


@cuda
@pytest.mark.parametrize("kernels", [["skinny"], ["attention"], ["skinny", "attention"], ["skinny", "fused"],
                                     ["skinny", "fused", "attention"]])
@pytest.mark.filterwarnings("error:torch.compile of")
def test_cuda_engine_through_the_kernels_answers_as_the_reference(checkpoint, monkeypatch, kernels):
    """The compiled, CUDA-graphed decode step with the op inside: the reference's tokens (float32)."""
    from transformers import Idefics3ForConditionalGeneration as Reference

    path = checkpoint("idefics3", vocab_size=450)
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(path, [1, 0, 2], [SamplingParams(max_new_tokens=m) for m in (6, 9, 4)])
    expected = [_reference(ref, r) for r in requests]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    made = {name: count_launches(monkeypatch, getattr(model.kernels, name)) for name in kernels if name != "fused"}
    monkeypatch.setattr(fused, "enabled", "fused" in kernels)      # its launches are skinny's
    vlm = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to("cuda")
    engine = LLMEngine(vlm, max_batch_size=2)
    assert engine.runner.compile and engine.runner.use_cuda_graphs
    assert [r.token_ids for r in engine.generate(requests)] == expected
    assert all(made.values())       # each kernel ran (in the warm-ups before the graphs' captures)
