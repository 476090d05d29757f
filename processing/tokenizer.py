"""Tokenizer on the `tokenizers` library: tokenizer.json + tokenizer_config.json of the HF layout.

Behaviour follows the reference's fast tokenizer: added tokens split the text, BOS/EOS come only from
tokenizer.json's post-processor (the reference ignores add_bos_token/add_eos_token in the config for
these byte-level tokenizers, and so do we), padding and truncation are the backend's own, decode
skips tokens flagged special.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer as Backend

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The reference's "no limit" sentinel for model_max_length; anything above it means "unknown".
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)


@contextmanager
def backend_panics_as_errors() -> Iterator[None]:
    """A panic of the Rust backend (e.g. a tokenizer.json pre-tokenizer regex hitting Oniguruma's retry limit)
    reaches Python as pyo3's PanicException, a BaseException that would pass every per-row `except Exception`
    and fail the whole batch: it becomes a ValueError. Other BaseExceptions (KeyboardInterrupt, ...) pass."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"the tokenizer (tokenizer.json) failed on this text: {str(e).strip()}") from None


class BatchEncoding(dict):
    """A dict with attribute access and `.to(device)`, like the reference's BatchFeature."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchEncoding":
        """The tensors on a device (`to("cuda")`, `to(device=...)`) and the floating ones in a dtype
        (`to(torch.bfloat16)`, `to("cuda", torch.bfloat16)`, `dtype=`): ids and masks keep their
        integer type, as the reference's BatchFeature does."""
        import torch
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        out = type(self)()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, **kwargs) if device is not None else value
                value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            out[key] = value
        return out


def _token_content(value: Any) -> str | None:
    """Config tokens are strings or serialised AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"unrecognised special token entry in tokenizer_config.json: {value!r}")


def _extra_special(config: dict) -> list[str]:
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    values = extra.values() if isinstance(extra, dict) else extra
    return [_token_content(v) for v in values]


def to_tensors(data: dict, return_tensors: str | None) -> dict:
    """Lists of equal-length rows -> int64 torch/numpy arrays; None keeps Python lists."""
    if return_tensors is None:
        return data
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    out = {}
    for key, rows in data.items():
        if isinstance(rows, list) and rows and isinstance(rows[0], list) and len({len(r) for r in rows}) > 1:
            raise ValueError(f"cannot stack `{key}` of different lengths {[len(r) for r in rows]} into a tensor: "
                             "pass padding=True (or padding='max_length')")
        array = np.asarray(rows, dtype=np.int64)
        if return_tensors == "pt":
            import torch
            array = torch.from_numpy(array)
        out[key] = array
    return out


class Tokenizer:
    """The subset of the reference tokenizer API the processor, engine and pipeline use."""

    def __init__(self, backend: Backend, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.padding_side: str = self.config.get("padding_side") or "right"
        self.truncation_side: str = self.config.get("truncation_side") or "right"
        max_len = self.config.get("model_max_length")
        self.model_max_length: int = int(max_len) if max_len is not None else VERY_LARGE_INTEGER
        self.chat_template = self.config.get("chat_template")
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        self._named = {key: _token_content(self.config.get(key)) for key in NAMED_SPECIAL}
        self._extra = [t for t in _extra_special(self.config) if t]
        self._register_config_tokens()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only the `tokenizers` serialisation is supported)")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(Backend.from_file(str(tok_file)), config)

    def save_pretrained(self, path: str | Path) -> None:
        """tokenizer.json (its added tokens too) and tokenizer_config.json, as from_pretrained reads them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {**self.config, "padding_side": self.padding_side, "truncation_side": self.truncation_side}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")

    # --- special tokens -------------------------------------------------------------------------

    def _register_config_tokens(self) -> None:
        """Named and extra special tokens of the config are special in the backend (added if missing)."""
        for entry in (self.config.get("added_tokens_decoder") or {}).values():
            if entry.get("content") and self.backend.token_to_id(entry["content"]) is None:
                self.backend.add_tokens([AddedToken(entry["content"], special=bool(entry.get("special")),
                                                    normalized=bool(entry.get("normalized", False)))])
        tokens = [t for t in self._named.values() if t] + self._extra
        if tokens:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

    def add_special_tokens(self, tokens: dict[str, Any]) -> int:
        """`{"bos_token": ..., "additional_special_tokens": [...]}`; returns how many ids were new."""
        before = self.backend.get_vocab_size(with_added_tokens=True)
        new: list[str] = []
        for key, value in tokens.items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                values = [_token_content(v) for v in value]
                self._extra += [v for v in values if v not in self._extra]
                new += values
            elif key in NAMED_SPECIAL:
                self._named[key] = _token_content(value)
                new.append(self._named[key])
            else:
                raise ValueError(f"unknown special token key {key!r}")
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new if t])
        return self.backend.get_vocab_size(with_added_tokens=True) - before

    def add_tokens(self, tokens: Sequence[str], special_tokens: bool = False) -> int:
        added = [AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in tokens]
        return self.backend.add_tokens(added)

    def __getattr__(self, name: str) -> Any:
        # bos_token, bos_token_id, pad_token, pad_token_id, ... resolved from the named special tokens.
        named = self.__dict__.get("_named", {})
        if name in named:
            return named[name]
        if name.endswith("_id") and name[:-3] in named:
            token = named[name[:-3]]
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self._named.items() if v is not None}
        if self._extra:
            out["additional_special_tokens"] = list(self._extra)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens (bos, eos, ...), then the additional ones, each once: the reference's
        list (decode skips more: every added token the backend flags special, as the reference's does)."""
        return list(dict.fromkeys([t for t in self._named.values() if t] + self._extra))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Unknown tokens map to the unk id (None when there is no unk token), as in the reference."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    # --- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.backend.no_padding()
        self.backend.no_truncation()
        with backend_panics_as_errors():
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True) -> BatchEncoding:
        """Tokenize one string (flat lists) or a batch (lists of rows); padding/truncation as in the reference."""
        single = isinstance(text, str)
        batch = [text] if single else list(text)
        if not all(isinstance(t, str) for t in batch):
            raise ValueError("text must be a string or a list of strings")
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        self._configure(pad, trunc, max_length, pad_to_multiple_of, padding_side)
        try:
            with backend_panics_as_errors():
                encodings = self.backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        finally:
            self.backend.no_padding()
            self.backend.no_truncation()
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if single and return_tensors is None:       # as the reference: tensors keep the batch axis
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(to_tensors(data, return_tensors))

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of) -> tuple[str | None, str | None, int | None]:
        """Normalise padding/truncation flags: (pad mode, truncation strategy, max_length)."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # a bare max_length truncates, as in the reference
        pad = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if pad not in (None, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        trunc = {True: "longest_first", False: None, None: None, "do_not_truncate": None}.get(truncation, truncation)
        if trunc not in (None, "longest_first", "only_first", "only_second"):
            raise ValueError(f"truncation must be a bool or a truncation strategy name, got {truncation!r}")
        if max_length is None and (pad == "max_length" or trunc):
            known = self.model_max_length <= LARGE_INTEGER
            max_length = self.model_max_length if known else None
            pad = pad if known or pad != "max_length" else None
            trunc = trunc if known else None
        if pad and self.pad_token_id is None:
            raise ValueError("asked to pad but the tokenizer has no pad token (set pad_token in tokenizer_config.json)")
        if trunc and pad and pad_to_multiple_of and max_length and max_length % pad_to_multiple_of:
            raise ValueError(f"truncation length ({max_length}) is not a multiple of pad_to_multiple_of "
                             f"({pad_to_multiple_of})")
        return pad, trunc, max_length

    def _configure(self, pad, trunc, max_length, pad_to_multiple_of, padding_side) -> None:
        if trunc:
            self.backend.enable_truncation(max_length, stride=0, strategy=trunc, direction=self.truncation_side)
        else:
            self.backend.no_truncation()
        if pad:
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            self.backend.enable_padding(direction=side, pad_id=self.pad_token_id, pad_token=self.pad_token,
                                        length=max_length if pad == "max_length" else None,
                                        pad_to_multiple_of=pad_to_multiple_of)
        else:
            self.backend.no_padding()

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """One sequence -> str; a batch (2-D) -> list[str]. Accepts lists, numpy arrays, tensors and
        an encoding (its input_ids). clean_up_tokenization_spaces: None, the tokenizer's setting."""
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        with backend_panics_as_errors():
            text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Each sequence -> str; one sequence alone (a list of ids, a 1-D tensor) -> a list of its text."""
        if isinstance(sequences, Mapping):
            sequences = sequences["input_ids"]
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        if sequences and isinstance(sequences[0], int):
            sequences = [sequences]
        return [self.decode(list(seq), skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def _clean_up(self, text: str, clean_up: bool | None = None) -> str:
        # The reference skips this WordPiece-era cleanup for BPE models (it would eat real spaces).
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        if not clean_up or type(self.backend.model).__name__ == "BPE":
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text
