"""Stop strings: whether a sequence's newest token completes one, as transformers' StopStringCriteria.

A stop string is completed by the token that an occurrence of it overlaps last; the occurrence may
begin in earlier tokens, the prompt's included. Byte-level vocabularies (GPT-2's and Llama 3's: every
Idefics3 checkpoint) are matched on the tokens' bytes, so a stop string whose UTF-8 bytes span
tokens that are each part of one character (decoded alone, U+FFFD) is found where it ends; other
vocabularies on the decoded text."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

_PRINTABLE = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}


def byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level vocabulary stands for (GPT-2's table): printable
    Latin-1 bytes are written as themselves, the other bytes as code points 256, 257, ... in order."""
    shifted = iter(range(256, 512))
    return {chr(b if b in _PRINTABLE else next(shifted)): b for b in range(256)}


def _decoder_types(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*map(_decoder_types, node.values()))
    if isinstance(node, list):
        return set().union(*map(_decoder_types, node))
    return set()


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers` object behind ours, transformers' fast tokenizer, or itself."""
    for name in ("backend_tokenizer", "backend"):
        inner = getattr(tokenizer, name, None)
        if hasattr(inner, "to_str"):
            return inner
    return tokenizer


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder maps tokens to bytes with GPT-2's table."""
    backend = _backend(tokenizer)
    if not hasattr(backend, "to_str"):
        return False
    types = _decoder_types(json.loads(backend.to_str()).get("decoder"))
    return "ByteLevel" in types and "ByteFallback" not in types


class StopStringMatcher:
    """Finds stop strings at the end of a token sequence, through one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.backend = tokenizer, _backend(tokenizer)
        self.alphabet = byte_level_alphabet() if is_byte_level(tokenizer) else None
        self._bytes: dict[int, bytes | None] = {}

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for; None for an id the vocabulary does not have."""
        if token_id not in self._bytes:
            token = self.backend.id_to_token(token_id)
            if token is None:
                self._bytes[token_id] = None
            elif all(c in self.alphabet for c in token):
                self._bytes[token_id] = bytes(self.alphabet[c] for c in token)
            else:       # an added token written in other characters: its text
                self._bytes[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return self._bytes[token_id]

    def after(self, prompt_ids: Sequence[int], stops: Sequence[str]) -> Callable[[list[int]], bool]:
        """Whether an answer to `prompt_ids` has its last token complete one of `stops` (an
        occurrence may begin in the prompt: its last tokens that a stop string's bytes can reach)."""
        tail = list(prompt_ids[-max(map(len, stops)) * 4:])       # a character is at most 4 bytes
        return lambda answer: self.completes(tail + answer, stops)

    def completes(self, token_ids: Sequence[int], stops: Sequence[str]) -> bool:
        """Whether the last of `token_ids` completes one of `stops`: an occurrence that it overlaps."""
        targets = [s.encode() for s in stops]
        window = list(token_ids[-max(map(len, targets)):])      # a token is at least one byte
        if self.alphabet is None:
            return self._completes_text(window, stops)
        pieces = [self.token_bytes(t) for t in window]
        if None in pieces:          # no stop string runs through a token outside the vocabulary
            pieces = pieces[len(pieces) - pieces[::-1].index(None):]
            if not pieces:
                return False
        before = b"".join(pieces[:-1])
        after = before + pieces[-1]
        return any(after.find(t, max(len(before) - len(t) + 1, 0)) >= 0 for t in targets)

    def _completes_text(self, window: list[int], stops: Sequence[str]) -> bool:
        before = self.tokenizer.decode(window[:-1], skip_special_tokens=False)
        after = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(after.find(s, max(len(before) - len(s) + 1, 0)) >= 0 for s in stops)
