"""Sharded loading: each rank builds its shard on meta, then reads only its slices of the checkpoint.

Sharded tensors go through `safe_open(...).get_slice(key)[rows]`, which reads just those bytes, so a
rank's peak memory is about its shard (plus the replicated parameters), never a full sharded tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Idefics3Config, check_tp
from ..idefics3 import Idefics3ForConditionalGeneration
from ..files import CheckpointError, open_safetensors, resolve_checkpoint_dir, weight_files
from ..loading import (_check_keys, _copy_tensor, _holds, _resolve_dtype, _tied_names, _untie, check_adapter,
                       materialized, read_generation_config, target_name)
from ..lora import LoraAdapter
from .layers import ShardSpec, TPContext
from .shard import shard_model


def read_shard(handle, key: str, spec: ShardSpec) -> torch.Tensor:
    """Rows [start, stop) of dim `spec.dim` of checkpoint tensor `key`, read as a slice."""
    part = handle.get_slice(key)
    shape = list(part.get_shape())
    if len(shape) <= spec.dim or shape[spec.dim] != spec.full:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(shape)} does not match the model, whose "
                              f"dim {spec.dim} (the one sharded) has size {spec.full}")
    index = (slice(None),) * spec.dim + (slice(spec.start, spec.stop),)
    return part[index]


def _copy_shard(param: torch.Tensor, tensor: torch.Tensor, key: str, spec: ShardSpec) -> None:
    rows = spec.stop - spec.start
    expected = list(param.shape)
    expected[spec.dim] = rows
    if list(tensor.shape) != expected:
        raise CheckpointError(f"{key}: checkpoint slice shape {tuple(tensor.shape)} != shard shape {tuple(expected)}")
    with torch.no_grad():
        param.narrow(spec.dim, 0, rows).copy_(tensor)
        param.narrow(spec.dim, rows, param.shape[spec.dim] - rows).zero_()   # vocab padding rows


def load_sharded_weights(model: nn.Module, files: list[Path], folder: Path, specs: dict[str, ShardSpec],
                         adapter: LoraAdapter | None = None) -> None:
    """Fill `model` (materialised, sharded) from `files`: slices for sharded parameters, whole tensors
    for replicated ones; a weight `adapter` changes is read whole, merged, then sliced (DoRA's
    norms are over whole rows). A tied LM head stored apart and different is untied, as load_weights
    does (each rank sees its slices: one whose slices agree keeps the tie, with the same values)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {name: group for group in _tied_names(model) for name in group}
    loaded, unexpected = set(), []
    for file in files:
        with open_safetensors(file) as handle:
            for key in handle.keys():
                name = target_name(key, is_base=False)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                spec = specs.get(name)
                tensor = _rank_tensor(handle, key, name, spec, adapter)
                if (tied.get(name, set()) - {name}) & loaded and not _holds(_filled(params[name], spec), tensor):
                    params[name] = _untie(model, name, key)
                if spec is None:
                    _copy_tensor(params[name], tensor, key)
                else:
                    _copy_shard(params[name], tensor, key, spec)
                loaded.add(name)
    _check_keys(model, loaded, unexpected, folder)
    check_adapter(adapter, model, loaded)


def _rank_tensor(handle, key: str, name: str, spec: ShardSpec | None, adapter: LoraAdapter | None) -> torch.Tensor:
    """What this rank keeps of checkpoint tensor `key`: its slice or the whole, with the adapter merged."""
    if name in (adapter or ()):
        merged = adapter.merged(name, handle.get_tensor(key))
        return merged if spec is None else shard_of(merged, spec)
    return handle.get_tensor(key) if spec is None else read_shard(handle, key, spec)


def _filled(param: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The rows of a shard the checkpoint fills (not the vocabulary's padding rows)."""
    return param if spec is None else param.narrow(spec.dim, 0, spec.stop - spec.start)


def shard_of(tensor: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    return tensor.narrow(spec.dim, spec.start, spec.stop - spec.start)


def load_shard(path_or_id: str | Path, tp: TPContext, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None,
               adapter: str | Path | None = None) -> Idefics3ForConditionalGeneration:
    """This rank's shard of an Idefics3ForConditionalGeneration checkpoint (with a LoRA `adapter`
    folder merged), ready for inference. A config that cannot be split raises before any weight is read."""
    lora = None if adapter is None else LoraAdapter.from_pretrained(adapter)
    folder = resolve_checkpoint_dir(path_or_id)
    config = Idefics3Config.from_pretrained(folder)
    check_tp(config, tp.world_size)
    files = weight_files(folder)
    target_dtype = _resolve_dtype(dtype, config, files)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    specs = shard_model(model, tp)
    model = materialized(model.to(target_dtype), torch.device(device or "cpu"))
    model.tie_weights()   # materialising gives each tied name its own tensor
    load_sharded_weights(model, files, folder, specs, lora)
    model.config.dtype = str(target_dtype).replace("torch.", "")
    model.generation_config = read_generation_config(folder)
    return model.eval()
