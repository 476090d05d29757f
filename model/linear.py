"""The one GEMM entry point of every projection: oneDNN for float32 inference on CPU (and bfloat16
where the CPU computes it natively), on weights packed once into its blocked layout where the engine
asked for it."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import skinny
from .kernels.runtime import on_kernel_device

log = logging.getLogger(__name__)


def _packed_is_f_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> bool:
    """Whether oneDNN's linear on w packed gives F.linear's result here (False where its private ops
    are missing or fail)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), F.linear(x, w, b))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _onednn_linear_works() -> bool:
    """The oneDNN ops used here are private to torch: probe them once, fall back to F.linear if a
    build lacks them or they change."""
    probe = torch.ones(2, 3), torch.arange(12.0).reshape(4, 3)
    return torch.backends.mkldnn.is_available() and _packed_is_f_linear(*probe)


def _onednn_bf16_is_f_linear() -> bool:
    """bfloat16 on a CPU with native bfloat16 dot products (AVX512-BF16, AMX): F.linear is oneDNN's
    GEMM already, so its packed weight gives the same bits (checked here) ~1.6-2x faster at decode's
    few rows (BENCHMARKS.md). Elsewhere bfloat16 is emulated, and left to F.linear."""
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not ONEDNN or native is None or not native():
        return False
    g = torch.Generator().manual_seed(0)
    return _packed_is_f_linear(*(torch.randn(*shape, generator=g).bfloat16() for shape in ((3, 40), (24, 40), (24,))))


ONEDNN = _onednn_linear_works()
ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _onednn_bf16_is_f_linear() else (torch.float32,)


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """CPU float32 (or native bfloat16) without autograd: oneDNN's linear has no backward, so training
    keeps F.linear. Not under torch.compile either: inductor cannot lower the private op, and picks
    its own GEMMs."""
    if not ONEDNN or x.device.type != "cpu" or x.dtype not in ONEDNN_DTYPES or weight.dtype != x.dtype:
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class PackedWeight:
    """A weight reordered once into oneDNN's blocked layout: a second copy, which spares the
    per-call reorder (small-batch decode reads the weights ~1.6x faster). It stands for the weight
    only while that is unchanged: same storage, no in-place write since (an optimizer step, a
    load_state_dict; a write through `.data` bumps no version and goes unseen)."""

    def __init__(self, weight: Tensor) -> None:
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.source = self._identity(weight)

    @staticmethod
    def _identity(weight: Tensor) -> tuple:
        return weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype

    def matches(self, weight: Tensor) -> bool:
        return self._identity(weight) == self.source

    def __deepcopy__(self, memo: dict) -> None:
        # A copied module's weights live elsewhere, so no pack could stand for them (and oneDNN's
        # blocked tensor has no storage to copy): the copy starts unpacked.
        return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: PackedWeight | None = None) -> Tensor:
    """x @ weight.T + bias. On CPU, torch's float32 matmul goes to MKL, which takes its AVX2 path on
    AMD processors; oneDNN uses the widest vector unit: 2.1-2.2x the FLOP/s of MKL on a Zen 5 core
    for the prefill GEMMs, 1.3-1.9x (1.8-3.1x packed) for decode at batch 8 (BENCHMARKS.md).
    Still IEEE float32, in another summation order. With model.kernels.skinny switched on, GPU
    projections go through its custom op (few rows: its kernel; more: F.linear)."""
    if skinny.enabled and on_kernel_device(x):
        return skinny.skinny_linear(x, weight, bias)
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if packed is not None and packed.matches(weight):
        weight = packed.blocked
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Packable(nn.Module):
    """A module whose `weight` may get a PackedWeight (pack_weights) for its `linear` calls."""
    packed: PackedWeight | None = None

    def _apply(self, fn, recurse: bool = True):
        self.packed = None          # a moved or cast weight is another tensor: free the stale copy
        return super()._apply(fn, recurse)


class PaddedRows:
    """A weight's storage with rows past the weight's own (model.lm_head.pad_lm_head), the weight a
    view of its first rows. A deep copy's weight is storage of its own, so the copy has none."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def __deepcopy__(self, memo: dict) -> None:
        return None


class Linear(Packable, nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose forward is `linear`; with `padded`,
    the whole padded storage is multiplied and the padding's outputs dropped."""
    padded: PaddedRows | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.padded is not None:
            out = linear(x, self.padded.rows)[..., : self.out_features]
            return out if self.bias is None else out + self.bias
        return linear(x, self.weight, self.bias, self.packed)

    def _apply(self, fn, recurse: bool = True):
        self.padded = None          # the moved or cast weight is another tensor
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.padded = None          # an `assign` load replaces the weight
        return super()._load_from_state_dict(*args, **kwargs)


def _packable(weight: Tensor) -> bool:
    return ONEDNN and weight.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES


def _packing_targets(model: nn.Module) -> list:
    """The projections that run on CPU through oneDNN: fused groups as one, not their parts again."""
    fused_parts, targets = set(), []
    for module in model.modules():
        fused = getattr(module, "fused", None)
        if fused is not None:
            targets.append(fused)
            fused_parts.update(id(part) for part in module.fusable())
    targets += [m for m in model.modules() if isinstance(m, Packable) and id(m) not in fused_parts]
    return [t for t in targets if _packable(t.weight)]


def available_host_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pack_weights(model: nn.Module, budget_bytes: int | None = None) -> nn.Module:
    """Give every projection that runs on CPU through oneDNN a PackedWeight. Inference only: a changed
    weight stops using it. It costs a second copy of those weights, so nothing is packed (with a
    warning) when that copy would exceed `budget_bytes`."""
    targets = _packing_targets(model)
    need = sum(t.weight.numel() * t.weight.element_size() for t in targets)
    if budget_bytes is not None and need > budget_bytes:
        log.warning("not packing %.2f GiB of projection weights for oneDNN (budget %.2f GiB): "
                    "CPU decode runs slower", need / 2**30, budget_bytes / 2**30)
        return model
    for target in targets:
        target.packed = PackedWeight(target.weight)
    return model
