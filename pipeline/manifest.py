"""The settings a run's answers depend on, kept beside its output (`<output>.run.json`), so that
`--resume` cannot mix answers made two ways into one dataset: another checkpoint, prompt or
decoding; other kept columns would also give the output's files two schemas.

Not compared: the input (a resumed run may read a grown dataset), and what only moves speed or
placement (replicas, batch sizes, device, dtype: a resumed run may land on other hardware).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .checkpoint import remote_files, remote_versions
from .config import TOKEN_SETTINGS, PipelineConfig
from .storage import fsspec_fs, is_local, redact_url, sibling, write_text

ANSWER_SETTINGS = ("prompt", "system_prompt", "prompt_template", "prompt_suffix", "id_column", "image_column",
                   "question_column", "option_columns", "hint_column", "option_list_column", "open_question_suffix",
                   "image_columns", "images_named_in_text", "capitalize_questions", "question_removals",
                   "max_new_tokens",
                   "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
                   "eta_cutoff",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "image_backend",
                   "image_longest_edge", "image_splitting",
                   "max_image_pixels", "max_image_bytes", "keep_columns", "logprobs", "stop",
                   "choices", "choices_column", "choice_logprobs", "regex", "json_schema",
                   "samples", "messages_column", "sampling_column",
                   "score_column", "top_logprobs", "no_repeat_ngram_size", "num_beams", "length_penalty",
                   "early_stopping", "bad_words", *TOKEN_SETTINGS)
SAMPLED_BYTES = 1 << 20     # a weights file of more than twice this is sampled, not read whole
TENSOR_BYTES = 256          # read from each end of each tensor of a sampled weights file


def tensor_ends(f: BinaryIO, size: int) -> Iterator[bytes]:
    """A safetensors file's header (each tensor's name, type, shape and place) and each tensor's first
    and last bytes: a fine-tune changes each tensor it trained, wherever in the file it lies (the
    language model's, between the connector's and the vision encoder's, for a text-only one)."""
    length = int.from_bytes(f.read(8), "little")
    header = f.read(length) if 0 < length < size else b""
    try:
        tensors = json.loads(header)
    except ValueError:
        tensors = None
    if not isinstance(tensors, dict):       # not a safetensors file after all: its ends
        f.seek(0)
        yield from file_ends(f, size)
        return
    yield header
    for name, tensor in sorted(tensors.items()):
        begin, end = tensor.get("data_offsets", (0, 0)) if isinstance(tensor, dict) else (0, 0)
        for start in sorted({begin, max(begin, end - TENSOR_BYTES)}):
            f.seek(8 + length + start)
            yield f.read(min(TENSOR_BYTES, end - start))


def file_ends(f: BinaryIO, size: int) -> Iterator[bytes]:
    """A file's first and last MiB (runs before stop 55 sampled weights files so)."""
    yield f.read(SAMPLED_BYTES)
    f.seek(size - SAMPLED_BYTES)
    yield f.read()


def checkpoint_fingerprint(model: str, storage_options: dict | None = None,
                           sampled: Callable[[BinaryIO, int], Iterator[bytes]] = tensor_ends) -> str:
    """A hash of a checkpoint folder's small files and of each large weights file's size and samples
    (`sampled`: every tensor's ends): another fine-tune of the same shapes differs, the same folder
    moved elsewhere does not. A URL's checkpoint: its files' names, sizes and versions (ETags); a hub
    id: itself."""
    folder = Path(model)
    if not is_local(model):
        return listing_hash(remote_versions(model, storage_options))
    if not folder.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            whole = file.suffix != ".safetensors" or size <= 2 * SAMPLED_BYTES
            # read whole but a MiB at a time: a Trainer's optimizer.pt (twice the model) beside the
            # weights was held in memory whole
            for chunk in iter(lambda: f.read(SAMPLED_BYTES), b"") if whole else sampled(f, size):
                digest.update(chunk)
    return digest.hexdigest()


def run_settings(config: PipelineConfig) -> dict:
    adapter = config.adapter and checkpoint_fingerprint(config.adapter, config.storage_options)
    return {"model": redact_url(config.model),
            "checkpoint": checkpoint_fingerprint(config.model, config.storage_options), "adapter": adapter,
            **{name: getattr(config, name) for name in ANSWER_SETTINGS}}


def names_and_sizes_fingerprint(model: str, storage_options: dict | None = None) -> str | None:
    """A URL checkpoint's fingerprint as runs before stop 41 wrote it (names and sizes only): a run
    resumed across that change is the same checkpoint's if this matches. None for a local one."""
    return None if is_local(model) else listing_hash(remote_files(model, storage_options))


def earlier_fingerprint(model: str, storage_options: dict | None = None) -> str | None:
    """The checkpoint's fingerprint as an earlier version wrote it into a run's manifest: a URL's
    by names and sizes (before stop 41), a folder's by its weights files' ends (before stop 55)."""
    if is_local(model):
        return checkpoint_fingerprint(model, storage_options, file_ends)
    return names_and_sizes_fingerprint(model, storage_options)


def listing_hash(listing: dict) -> str:
    return hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()


def differences(earlier: dict, now: dict, also_same: dict | None = None) -> list[str]:
    """What changed, in words ("prompt: 'A' -> 'B'"); the model's path alone may change (a moved folder).
    A setting newer than the earlier run's file had, then, its default; `also_same`: name -> another
    value that counts as the one now."""
    defaults = json.loads(json.dumps({name: getattr(PipelineConfig(model=""), name) for name in ANSWER_SETTINGS}))
    earlier = {**defaults, **earlier}
    same = also_same or {}
    changed = []
    for name in [n for n in now if n != "model" and earlier.get(n) not in (now[n], same.get(n, now[n]))]:
        if name == "checkpoint":
            changed.append(f"the checkpoint's files ({earlier.get('model')!r} then, {now['model']!r} now)")
        elif name == "adapter":
            then, later = ("one" if earlier.get(name) else "none"), ("one" if now[name] else "none")
            changed.append("the adapter's files" if then == later else f"the adapter ({then} then, {later} now)")
        else:
            changed.append(f"{name}: {earlier.get(name)!r} -> {now[name]!r}")
    return changed


IMAGE_DEFAULTED = ("image_longest_edge", "image_splitting", "max_image_pixels", "max_image_bytes")


def with_image_defaults(earlier: dict, now: dict, config: PipelineConfig) -> tuple[dict, dict]:
    """Both runs' image settings with None as what it stood for (the checkpoint's, the defaults'): a
    setting given at that value one time and left out the other is the same setting."""
    if all(earlier.get(name) == now[name] for name in IMAGE_DEFAULTED):
        return earlier, now
    from .checks import effective_image_settings

    try:
        effective = effective_image_settings(config)
    except Exception:       # a checkpoint whose processor files this process cannot read (a hub id): as given
        return earlier, now
    resolved = lambda settings: {**settings, **{n: effective[n] for n in IMAGE_DEFAULTED  # noqa: E731
                                                if settings.get(n) is None}}
    return resolved(earlier), resolved(now)


def manifest_path(output: str) -> str:
    return sibling(output, ".run.json")


def earlier_settings(output: str, storage_options: dict | None) -> dict:
    """The settings the run manifest beside `output` holds ({} where there is none, or it does not read)."""
    fs, local = fsspec_fs(manifest_path(output), storage_options)
    try:
        settings = json.loads(fs.cat(local)) if fs.exists(local) else {}
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def keep_run_settings(output: str, config: PipelineConfig, resume: bool, storage_options: dict | None) -> None:
    """Write this run's settings beside the output; a resumed run first checks that they are those
    of the run it continues (ValueError naming each difference)."""
    now = check_run_settings(output, config, resume, storage_options)
    write_text(manifest_path(output), json.dumps(now, indent=2), storage_options)


def check_run_settings(output: str, config: PipelineConfig, resume: bool, storage_options: dict | None) -> dict:
    """This run's settings (as run.json will hold them), after a resumed run's check that they are those
    of the run it continues."""
    path = manifest_path(output)
    now = json.loads(json.dumps(run_settings(config)))     # as they will read back (lists, not tuples)
    fs, local = fsspec_fs(path, storage_options)
    if resume and fs.exists(local):
        try:
            earlier = json.loads(fs.cat(local))
        except ValueError as e:
            raise ValueError(f"the run manifest {redact_url(path)!r} does not read ({e}): a run stopped while "
                             "writing it? Remove it to resume without checking the earlier run's settings") from None
        legacy = {key: earlier_fingerprint(source, config.storage_options)
                  for key, source in (("checkpoint", config.model), ("adapter", config.adapter))
                  if source and earlier.get(key) != now[key]}
        changed = differences(*with_image_defaults(earlier, now, config), legacy)
        if changed:
            raise ValueError(f"cannot resume into {output!r} with other settings than its earlier run ("
                             + "; ".join(changed) + "): its answers would be a mix. Use the earlier settings, "
                             "or a new output")
    return now
