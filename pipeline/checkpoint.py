"""Checkpoints named by URL (`--model s3://bucket/SmolVLM-256M-Instruct`): copied once per node.

On a cluster the driver's disk is not the workers', so a checkpoint kept on S3 (or any fsspec store)
is copied by the first actor of a node that needs it into a local cache, the others waiting on a
file lock and then reading the same copy. A copy is complete (a marker lists its files and their
sizes) and current (a checkpoint rewritten under the same URL, with other sizes, is copied again).
Only the files a loader reads are copied: safetensors weights, JSON configs, tokenizer and
templates; pickle weights are never fetched.
"""
from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

from model.config import CONFIG_NAME, Idefics3Config, check_tp
from model.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HUB_PATTERNS, INDEX_FILE, SINGLE_FILE, CheckpointError,
                         adapter_files, check_adapter_config, check_complete_safetensors, is_hub_id, weight_files)

from .storage import fsspec_fs, is_local, patient_stores, private_temp_folder, reader_fs, reading_store, redact_url

CACHE_ENV = "IDEFICS3_CHECKPOINT_CACHE"     # default: <temp dir>/idefics3-checkpoints-<uid>
COMPLETE = ".complete.json"
log = logging.getLogger(__name__)
GENERATION_CONFIG = "generation_config.json"
REQUIRED_FILES = (CONFIG_NAME, "tokenizer.json")      # the model's and the CPU stage's processor's


def cache_root() -> Path:
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else private_temp_folder("idefics3-checkpoints")


# what tells one version of a stored file from another of the same size (S3's and GCS's, then times)
VERSION_KEYS = ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "updated", "mtime", "created")


def remote_listing(uri: str, storage_options: dict | None) -> dict[str, dict]:
    """The checkpoint's wanted files under `uri`: relative path -> the store's facts about it."""
    fs, root = reader_fs(uri, storage_options)
    found = {}
    with reading_store("model", uri):   # an endpoint it cannot reach, a refusal: one line, not a traceback
        listing = fs.find(root, detail=True)
    for path, info in listing.items():
        wanted = any(fnmatch.fnmatch(posixpath.basename(path), p) for p in HUB_PATTERNS)
        relative = relative_key(path, root) if wanted else None
        if relative:
            found[relative] = info
    if not found:
        raise FileNotFoundError(f"no checkpoint files ({', '.join(HUB_PATTERNS)}) under {redact_url(uri)!r}")
    return found


def relative_key(path: str, root: str) -> str | None:
    """A stored file's path under the checkpoint's root (None for a listed link elsewhere), refused
    where it would leave the root once copied to a local folder: an object store's key may hold
    `..` parts (`ckpt/../../.ssh/x.json`), or an empty one (`ckpt//x.json`, an absolute path)."""
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    relative = path[len(prefix):]
    if not relative or {"..", ".", ""} & set(relative.split("/")):
        raise CheckpointError(f"checkpoint file {redact_url(path)!r} is not a plain path under {redact_url(root)!r}: "
                              "refused (a copy of it would be written outside the checkpoint's folder)")
    return relative


def remote_files(uri: str, storage_options: dict | None) -> dict[str, int]:
    """The checkpoint's wanted files under `uri`: relative path -> size."""
    return {relative: int(info.get("size") or 0) for relative, info in remote_listing(uri, storage_options).items()}


def remote_versions(uri: str, storage_options: dict | None) -> dict[str, list]:
    """relative path -> [size, version]: a file rewritten in place at the same size (another fine-tune
    of the same shapes) differs by its ETag or modification time."""
    return {relative: [int(info.get("size") or 0), next((str(info[k]) for k in VERSION_KEYS if info.get(k)), "")]
            for relative, info in remote_listing(uri, storage_options).items()}


def check_model(model: str, storage_options: dict | None = None, tensor_parallel_size: int = 1) -> dict | None:
    """Refuses, in the driver and before any work, a model the stage actors could not load: a folder
    (local or URL) without config.json, tokenizer.json or safetensors weights, a config.json that is
    not an Idefics3 one or that `tensor_parallel_size` cannot split, or a path that is neither a
    folder nor a hub id. Otherwise every actor would fail on it in turn, minutes in, each with its
    traceback. A hub id's config.json is asked of the hub (check_hub_model). Returns the shapes of
    the folder's weights (their files' headers; None for a hub id)."""
    shapes: dict = {}
    if is_local(model):
        folder = Path(fsspec.core.strip_protocol(model)).expanduser()
        if not folder.is_dir():
            if is_hub_id(model):
                return check_hub_model(model, tensor_parallel_size)     # None
            what = "a file, not a checkpoint folder" if folder.exists() else "no such checkpoint folder"
            raise FileNotFoundError(f"model {model!r}: {what} (nor a hub id owner/name)")
        for path in weight_files(folder):   # CheckpointError: pickle weights only, no weights, shards missing
            with path.open("rb") as f:
                shapes.update(check_complete_safetensors(str(path), f, path.stat().st_size))
        names = {p.name for p in folder.iterdir()}
        read_config = (folder / CONFIG_NAME).read_bytes
    else:
        listing = remote_files(model, storage_options)
        names = {r for r in listing if "/" not in r}
        check_listed_weights(model, names)
        fs, root = reader_fs(model, storage_options)
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            with fs.open(posixpath.join(root.rstrip("/"), name), "rb", block_size=1 << 20) as f:
                shapes.update(check_complete_safetensors(f"{model.rstrip('/')}/{name}", f, listing[name]))
        read_config = lambda: fs.cat_file(posixpath.join(root.rstrip("/"), CONFIG_NAME))  # noqa: E731
    check_required_files(model, names)
    check_config(model, read_config(), tensor_parallel_size)
    return shapes


def generation_config_of(model: str, storage_options: dict | None = None, *, named: bool = False) -> dict:
    """The checkpoint's generation_config.json: {} where it has none, or where the hub cannot be asked
    (then with a warning). A file that is not a JSON object is refused, naming it. `named`: `model`
    names a generation config the user chose (a .json file, or a folder holding one, local or by URL):
    one not there is refused."""
    if named:
        text, what = _named_generation_config(model, storage_options), f"generation_config {model!r}"
    else:
        text, what = _checkpoint_generation_config(model, storage_options), f"model {model!r}: its {GENERATION_CONFIG}"
    if text is None:
        return {}
    try:
        found = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{what} is not JSON: {e}") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return found


def _checkpoint_generation_config(model: str, storage_options: dict | None) -> bytes | None:
    if is_local(model):
        folder = Path(fsspec.core.strip_protocol(model)).expanduser()
        if not folder.is_dir():
            return hub_generation_config(model)
        path = folder / GENERATION_CONFIG
        return path.read_bytes() if path.is_file() else None
    fs, root = reader_fs(model, storage_options)
    path = posixpath.join(root.rstrip("/"), GENERATION_CONFIG)
    return fs.cat_file(path) if fs.isfile(path) else None


def _named_generation_config(source: str, storage_options: dict | None) -> bytes:
    fs, path = fsspec_fs(source, storage_options)
    path = path if path.endswith(".json") else posixpath.join(path.rstrip("/"), GENERATION_CONFIG)
    if not fs.isfile(path):
        raise FileNotFoundError(f"generation_config {source!r}: no such file ({path}); name a .json file or a "
                                "folder holding generation_config.json, or 'auto' / 'none'")
    return fs.cat_file(path)


def hub_generation_config(model: str) -> bytes | None:
    """A hub repository's generation_config.json, from the hub (or its cache where the hub cannot
    be reached); None where it has none, or with a warning where it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        names = hub_files(model)
        if GENERATION_CONFIG not in names:
            return None
        offline = False
    except HubUnreachable:
        offline = True
    except (CheckpointError, FileNotFoundError):    # check_model has said so already
        return None
    try:
        return Path(hf_hub_download(model, GENERATION_CONFIG, local_files_only=offline)).read_bytes()
    except EntryNotFoundError:
        return None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        log.warning("model %r: its %s could not be read (%s): decoding takes the run's settings only", model,
                    GENERATION_CONFIG, _first_line(e))
        return None


def check_adapter(adapter: str | None, storage_options: dict | None = None, model_shapes: dict | None = None) -> None:
    """Refuses, in the driver, a LoRA adapter (a folder or its URL) that the replicas could not merge:
    no such folder, no adapter_config.json or adapter_model.safetensors, one cut short, an adapter
    whose options do not merge into weights (model.files.check_adapter_config), or, given the
    model's weight shapes (check_model's), one of another base model."""
    if adapter is None:
        return
    shapes = adapter_shapes(adapter, storage_options)
    if model_shapes:
        check_adapter_fits(adapter, shapes, model_shapes)


def adapter_shapes(adapter: str, storage_options: dict | None) -> dict[str, list[int]]:
    """The shapes of an adapter's tensors, once its files are checked (check_adapter)."""
    if is_local(adapter):
        folder = Path(fsspec.core.strip_protocol(adapter)).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"adapter {adapter!r}: no such folder (an adapter is a local folder or a URL)")
        _, weights = adapter_files(folder)
        with weights.open("rb") as f:
            return check_complete_safetensors(str(weights), f, weights.stat().st_size)
    listing = remote_files(adapter, storage_options)
    fs, root = reader_fs(adapter, storage_options)
    if ADAPTER_CONFIG not in listing or ADAPTER_WEIGHTS not in listing:
        raise FileNotFoundError(f"adapter {adapter!r}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                                f"(found {sorted(listing)})")
    check_adapter_config(json.loads(fs.cat_file(posixpath.join(root.rstrip("/"), ADAPTER_CONFIG))), adapter)
    with fs.open(posixpath.join(root.rstrip("/"), ADAPTER_WEIGHTS), "rb", block_size=1 << 20) as f:
        return check_complete_safetensors(f"{adapter.rstrip('/')}/{ADAPTER_WEIGHTS}", f, listing[ADAPTER_WEIGHTS])


def check_adapter_fits(adapter: str, shapes: dict[str, list[int]], model_shapes: dict[str, list[int]]) -> None:
    """Each pair of lora_B (out x r) and lora_A (r x in) of the adapter must change a weight of the
    model of out x in (PEFT's keys: base_model.model. + the weight's key, less `.weight`)."""
    for key, a_shape in sorted(shapes.items()):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if len(a_shape) != 2:       # PEFT's LoRA of a convolution (the patch embedding's) is another kind of change
            raise CheckpointError(f"adapter {adapter!r} changes {module}.weight with a LoRA of a convolution "
                                  f"(lora_A {' x '.join(map(str, a_shape))}): only linear layers' LoRA merge here")
        want = model_shapes.get(module + ".weight")
        if want is None:
            raise CheckpointError(f"adapter {adapter!r} changes {module}.weight, which the model does not have "
                                  "(an adapter of another base model?)")
        if b_shape is None or [b_shape[0], a_shape[1]] != list(want):
            got = "no lora_B" if b_shape is None else f"{b_shape[0]} x {a_shape[1]}"
            raise CheckpointError(f"adapter {adapter!r} does not fit the model: {module}.weight is "
                                  f"{' x '.join(map(str, want))} in the model, {got} in the adapter (an adapter "
                                  "of another base model?)")


def check_listed_weights(model: str, names: set[str]) -> None:
    """A listing of a checkpoint's files (a URL's, a hub repository's) holds safetensors weights."""
    if not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"model {model!r} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                              "pickle weights are never loaded")


def check_required_files(model: str, names: set[str]) -> None:
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise FileNotFoundError(f"model {model!r} has no {' or '.join(missing)}: not a checkpoint folder "
                                "in the Hugging Face layout")


def check_config(model: str, config_json: bytes | str, tensor_parallel_size: int) -> None:
    try:
        config = Idefics3Config.from_dict(json.loads(config_json))
        check_tp(config, tensor_parallel_size)
    except (ValueError, TypeError) as e:    # bad JSON, another model_type, unknown fields, unsplittable
        raise CheckpointError(f"model {model!r}: {e}") from e


def check_hub_model(model: str, tensor_parallel_size: int) -> None:
    """A hub id: the repository must exist, hold tokenizer.json and safetensors weights (one listing),
    and its config.json (a few KB) must be an Idefics3 config that `tensor_parallel_size` can split.
    A hub this process cannot reach (offline, or no answer) says nothing of the actors' nodes, which
    may reach it or hold it: then only the hub cache's config.json is checked, if it has one, and the
    rest is left to them. The listing fails at once where the hub cannot be reached, so the config is
    then read from the cache without the hub client's retries (~23 s)."""
    try:
        names, unreachable = hub_files(model), None
    except HubUnreachable as e:
        names, unreachable = None, str(e)
    config = hub_config(model, unreachable)
    if config is None:
        return
    check_config(model, config, tensor_parallel_size)
    if names is not None:
        check_listed_weights(model, names)
        check_required_files(model, names)


class HubUnreachable(Exception):
    """The hub cannot be asked here (offline, no answer, a failing hub); the message says why."""


def hub_files(model: str) -> set[str]:
    """The top-level files of a hub repository."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    try:
        return {entry.path for entry in HfApi().list_repo_tree(model, recursive=False)}
    except GatedRepoError:
        raise _gated(model) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise _not_on_hub(model) from None
    except (httpx.HTTPError, OSError) as e:      # HfHubHTTPError and OfflineModeIsEnabled are both
        raise HubUnreachable(_first_line(e)) from None


def hub_config(model: str, unreachable: str | None = None) -> bytes | None:
    """A hub repository's config.json (the hub cache's copy where the hub is `unreachable`, for that
    reason); None, with a warning, where it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        path = hf_hub_download(model, CONFIG_NAME, local_files_only=unreachable is not None)
    except GatedRepoError:
        raise _gated(model) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise _not_on_hub(model) from None
    except LocalEntryNotFoundError as e:        # offline, or no answer, and not in the hub cache
        log.warning("model %r: not checked (%s); the actors will fetch it (where the hub cannot be reached, "
                    "HF_HUB_OFFLINE=1 reads the hub cache without asking)", model, unreachable or _first_line(e))
        return None
    except EntryNotFoundError:
        raise FileNotFoundError(f"model {model!r}: the hub repository has no {CONFIG_NAME}: not a checkpoint "
                                "in the Hugging Face layout") from None
    except HfHubHTTPError as e:                 # throttled, or the hub failing: the actors will try again
        log.warning("model %r: not checked (%s); the actors will fetch it", model, _first_line(e))
        return None
    return Path(path).read_bytes()


def _gated(model: str) -> CheckpointError:
    return CheckpointError(f"model {model!r}: a gated hub repository; accept its terms on the hub and set HF_TOKEN")


def _not_on_hub(model: str) -> FileNotFoundError:
    return FileNotFoundError(f"model {model!r}: no such checkpoint folder, nor a repository on the hub "
                             "(a private one needs HF_TOKEN)")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def local_checkpoint(model: str, storage_options: dict | None = None) -> str:
    """A local folder or hub id as it is; a URL's checkpoint as the path of this node's copy of it."""
    if is_local(model):
        return model
    target = cache_root() / hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:24]
    target.parent.mkdir(parents=True, exist_ok=True)
    with patient_stores(), open(f"{target}.lock", "w") as lock:     # a store's blip here failed an actor's start
        files = remote_versions(model, storage_options)
        fcntl.flock(lock, fcntl.LOCK_EX)        # one copy per node; the others wait for it
        if copied_files(target) != files:
            copy(model, files, target, storage_options)
            marker = target / COMPLETE
            marker.with_suffix(".tmp").write_text(json.dumps(files))
            marker.with_suffix(".tmp").replace(marker)      # a copy killed mid-write leaves no half marker
    return str(target)


def copied_files(target: Path) -> dict | None:
    """The listing a finished copy in `target` was made from; None where there is none (or its
    marker cannot be read: copy again)."""
    try:
        return json.loads((target / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def copy(uri: str, files: dict, target: Path, storage_options: dict | None) -> None:
    shutil.rmtree(target, ignore_errors=True)
    fs, root = reader_fs(uri, storage_options)

    def get(relative: str) -> None:
        local = target / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(posixpath.join(root.rstrip("/"), relative), str(local))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(get, files))
