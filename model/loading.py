"""Checkpoints in the Hugging Face layout: safetensors only (single file or sharded), local folder or hub id.

The model is built on the meta device, materialised once in the target dtype and device, then filled
tensor by tensor from safetensors, so peak host memory is about one model plus one tensor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import Idefics3Config
from .files import (SINGLE_FILE, CheckpointError, open_safetensors, resolve_checkpoint_dir, stored_float_dtype,
                    weight_files)
from .lora import LoraAdapter

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
BASE_PREFIX = "model."
BASE_CHILDREN = ("vision_model.", "connector.", "text_model.")
LM_HEAD, EMBED = "lm_head.weight", "model.text_model.embed_tokens.weight"


def target_name(key: str, is_base: bool) -> str | None:
    """Map a checkpoint key to our parameter name; None means the key is deliberately skipped."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a non-persistent buffer some old exports carried; we recompute it
    if is_base:
        if key == LM_HEAD:
            return None  # a full checkpoint loaded into the bare model: the head is not ours
        return key[len(BASE_PREFIX):] if key.startswith(BASE_PREFIX) else key
    return BASE_PREFIX + key if key.startswith(BASE_CHILDREN) else key


def _tied_names(model: nn.Module) -> list[set[str]]:
    """Groups of names that share one tensor (the tied LM head)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def _check_keys(model: nn.Module, loaded: set[str], unexpected: list[str], folder: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = set(loaded)
    for group in _tied_names(model):
        if group & loaded:
            covered |= group
    missing = sorted(set(params) - covered)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the model: missing keys {missing}, "
                              f"unexpected keys {sorted(unexpected)}")


def load_weights(model: nn.Module, files: list[Path], folder: Path, adapter: LoraAdapter | None = None) -> None:
    """Copy every tensor of `files` into the (already materialised) parameters of `model`, with
    `adapter`'s changes merged into the weights it adapts."""
    from .idefics3 import Idefics3Model
    is_base = isinstance(model, Idefics3Model)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {name: group for group in _tied_names(model) for name in group}
    loaded, unexpected = set(), []
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                name = target_name(key, is_base)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                tensor = adapter.merged(name, tensor) if name in (adapter or ()) else tensor
                if (tied.get(name, set()) - {name}) & loaded and not _holds(params[name], tensor):
                    params[name] = _untie(model, name, key)
                _copy_tensor(params[name], tensor, key)
                loaded.add(name)
    _check_keys(model, loaded, unexpected, folder)
    check_adapter(adapter, model, loaded)


def _holds(param: torch.Tensor, tensor: torch.Tensor) -> bool:
    return param.shape == tensor.shape and torch.equal(param.detach(), tensor.to(param.device, param.dtype))


def _untie(model: nn.Module, name: str, key: str) -> nn.Parameter:
    """`name`'s own parameter in place of the one it shares: a checkpoint that says it ties its LM
    head to the embeddings but stores both, different, keeps both (as transformers does)."""
    log.warning("%s differs from the tensor tie_word_embeddings ties it to: not tied", key)
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    shared = getattr(module, attribute)
    own = nn.Parameter(torch.empty_like(shared), requires_grad=shared.requires_grad)
    setattr(module, attribute, own)
    model.config.tie_word_embeddings = False
    return own


def check_adapter(adapter: LoraAdapter | None, model: nn.Module, loaded: set[str]) -> None:
    if adapter is not None:
        adapter.check_applied(loaded, set().union(*_tied_names(model)))


def _copy_tensor(param: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if param.shape != tensor.shape:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


DEVICE_DTYPE = "device"      # a dtype argument: compute_dtype of the device the model lands on


def common_dtype(choices: list[torch.dtype]) -> torch.dtype:
    """One dtype for ranks whose devices chose differently (a node of mixed GPUs): float16 runs
    fast on every CUDA GPU, so any disagreement settles on it."""
    return choices[0] if len(set(choices)) == 1 else torch.float16


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype to run inference in on `device` when none is asked for: bfloat16 on CUDA GPUs that
    compute in it natively (compute capability 8.0, Ampere, and later), float16 on older ones (T4,
    V100: bfloat16 is emulated there, many times slower), float32 on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def _resolve_dtype(dtype: torch.dtype | str | None, config: Idefics3Config, files: list[Path]) -> torch.dtype:
    """Explicit dtype, else "auto"/None -> the checkpoint's `dtype`; where it names none, its weights'
    (as transformers' "auto"; float32 where they hold no float)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.dtype if dtype in (None, "auto") else dtype
    name = stored_float_dtype(files) if name is None else name
    if name is None:
        return torch.float32
    resolved = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return resolved


def read_generation_config(folder: Path) -> dict:
    file = folder / GENERATION_CONFIG
    return json.loads(file.read_text()) if file.is_file() else {}


HUB_ARGUMENTS = {"revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "etag_timeout"}
# transformers' arguments that change nothing here (one attention implementation; safetensors only)
IGNORED_ARGUMENTS = {"attn_implementation", "_attn_implementation", "low_cpu_mem_usage", "trust_remote_code",
                     "use_safetensors", "use_cache"}


def materialized(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to_empty(device=device)` (the meta model's tensors, uninitialised on `device`) without
    torch.empty_like, whose meta path imports sympy: ~0.9 CPU-s of every replica's start. The tensors
    are made contiguous, as every parameter and buffer of these models is."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def load_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, adapter: str | Path | None = None,
                    **kwargs) -> nn.Module:
    """`adapter`: a PEFT LoRA adapter folder of this checkpoint, merged as the weights load (model.lora).
    transformers' `torch_dtype` and a one-device `device_map` are read as dtype and device; the hub's
    download arguments pass to it; any other keyword is a TypeError (a typo was silently a float32 model)."""
    dtype, device, hub_kwargs = _transformers_arguments(dtype, device, kwargs)
    lora = None if adapter is None else LoraAdapter.from_pretrained(adapter)
    folder = resolve_checkpoint_dir(path_or_id, **hub_kwargs)
    config = Idefics3Config.from_pretrained(folder)
    files = weight_files(folder)
    target_dtype, target_device = _resolve_dtype(dtype, config, files), torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(config)
    model = materialized(model.to(target_dtype), target_device)  # casting on meta costs nothing
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    load_weights(model, files, folder, lora)
    model.config.dtype = str(target_dtype).replace("torch.", "")
    model.generation_config = read_generation_config(folder)
    return model.eval()


def _transformers_arguments(dtype, device, kwargs: dict) -> tuple:
    """(dtype, device, the hub's arguments) of from_pretrained's keywords, as transformers reads them."""
    kwargs = dict(kwargs)
    torch_dtype, device_map = kwargs.pop("torch_dtype", None), kwargs.pop("device_map", None)
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one")
    if device_map is not None and not isinstance(device_map, (str, torch.device, int)):
        raise TypeError(f"device_map={device_map!r}: a model here lives on one device; pass it (device='cuda:0')")
    if device_map is not None and device is not None and torch.device(device) != _one_device(device_map):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass one")
    ignored = sorted(IGNORED_ARGUMENTS & kwargs.keys())
    if ignored:
        log.warning("from_pretrained: %s change nothing here (ignored)", ", ".join(ignored))
    unknown = sorted(kwargs.keys() - IGNORED_ARGUMENTS - HUB_ARGUMENTS)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
    device = device if device is not None or device_map is None else _one_device(device_map)
    return dtype if dtype is not None else torch_dtype, device, {k: v for k, v in kwargs.items() if k in HUB_ARGUMENTS}


def _one_device(device_map) -> torch.device:
    """transformers' device_map naming one device ("auto": the GPU where there is one)."""
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """config.json + model.safetensors (+ generation_config.json), in the layout transformers reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.dtype = str(model.dtype).replace("torch.", "")
    config.save_pretrained(path, bare=not hasattr(model, "lm_head"))
    state, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied head is stored once, under the embedding's name
            continue
        seen.add(id(p))
        tensor = p.detach().contiguous().cpu()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view (fused projections): safetensors refuses shared storage
        state[name] = tensor
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
    if model.generation_config:
        (path / GENERATION_CONFIG).write_text(json.dumps(model.generation_config, indent=2) + "\n")
    return path
