"""A checkpoint's files in the Hugging Face layout: where its folder is, which weight files it has.

No tensor is read here, and torch is not imported: the driver's checks and the CPU-stage actors use
these without the model stage's dependencies (model.loading reads the weights).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]   # what a loader reads: never pickles


ADAPTER_CONFIG = "adapter_config.json"       # a PEFT adapter folder's (model.lora merges LoRA ones)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Options whose adapters are not a weight delta (or change the model's structure): refused when set.
UNMERGED_OPTIONS = ("fan_in_fan_out", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                    "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                    "velora_config", "monteclora_config", "kasa_config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (pickle-only, missing/unexpected keys, bad shapes)."""


def adapter_files(folder: Path) -> tuple[dict, Path]:
    """A local adapter folder's config (checked: check_adapter_config) and the path of its weights."""
    file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"adapter {folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    config = check_adapter_config(json.loads(file.read_text()), str(folder))
    if not weights.is_file():
        raise CheckpointError(f"adapter {folder}: no {ADAPTER_WEIGHTS} (pickle weights are never loaded)")
    return config, weights


BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")     # initialisations that change the base


def check_adapter_config(config: dict, adapter: str) -> dict:
    """A LoRA (or DoRA) adapter's config whose every option merges into weights (model.lora)."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"adapter {adapter}: peft_type {config.get('peft_type')!r}; only LoRA adapters "
                              "(and DoRA) are merged")
    refused = [option for option in UNMERGED_OPTIONS if config.get(option)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        # PEFT takes these adapters' principal part out of the base weights again when it loads them;
        # W + s * B @ A on the base as it is would be other weights, silently
        refused.append(f"init_lora_weights={init!r} (saved without converting it to a plain LoRA)")
    if refused:
        raise CheckpointError(f"adapter {adapter}: {', '.join(refused)} set; such adapters are not merged here "
                              "(merge it with PEFT's merge_and_unload and load the merged checkpoint)")
    return config


def is_hub_id(text: str) -> bool:
    """`owner/name`, and nothing on this disk by that name: a checkpoint the hub (or its cache) holds."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def resolve_checkpoint_dir(path_or_id: str | Path, **hub_kwargs) -> Path:
    """A local folder as is; anything else that looks like `owner/name` through the hub cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if not is_hub_id(text):
        raise FileNotFoundError(f"checkpoint folder not found: {text}")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS, **hub_kwargs))


MAX_HEADER_BYTES = 100_000_000      # the safetensors library's own limit


def check_complete_safetensors(name: str, f: BinaryIO, size: int) -> dict[str, list[int]]:
    """A safetensors file (`f` open at its start, `size` bytes) must hold the bytes its header
    describes: a download or copy cut short would fail every replica's load, each in turn.
    Returns its tensors' shapes (read from the header alone)."""
    head = f.read(8)
    header_len = int.from_bytes(head, "little")
    if len(head) < 8 or 8 + header_len > size:
        raise CheckpointError(f"{name} is not a complete safetensors file: its {size} bytes end before its "
                              "header does (a download or copy cut short, or not safetensors at all)")
    if header_len > MAX_HEADER_BYTES:       # read whole before it is parsed: the file must not say how much
        raise CheckpointError(f"{name} is not a safetensors file: its header says it is {header_len} bytes long, "
                              f"more than safetensors' limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{name} is not a safetensors file (its header does not read)") from None
    if 8 + header_len + end != size:
        raise CheckpointError(f"{name} is not a complete safetensors file: {size} bytes where its header "
                              f"describes {8 + header_len + end} (a download or copy cut short?)")
    return {k: t.get("shape") for k, t in header.items() if k != "__metadata__"}


STORED_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def stored_float_dtype(files: list[Path]) -> str | None:
    """The dtype of a checkpoint's first floating-point tensor (what transformers' dtype="auto" takes
    where the config names none), from the first file's header alone."""
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return next((STORED_FLOATS[t["dtype"]] for k, t in header.items()
                 if k != "__metadata__" and t.get("dtype") in STORED_FLOATS), None)


def open_safetensors(file: Path):
    """safe_open of a file checked whole first: a cut-short one ("incomplete metadata", naming no file)
    is a CheckpointError naming it."""
    from safetensors import safe_open

    with open(file, "rb") as f:
        check_complete_safetensors(str(file), f, file.stat().st_size)
    return safe_open(str(file), framework="pt", device="cpu")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded index first); pickle weights are refused."""
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that are not there: {absent}")
        return [folder / s for s in shards]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); loading them would run arbitrary "
            f"code, so only safetensors are read. Convert them to {SINGLE_FILE} (e.g. with "
            f"safetensors.torch.save_file on a trusted machine) and try again.")
    raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")
