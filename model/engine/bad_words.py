"""SamplingParams.bad_words_ids (transformers' bad_words_ids, vLLM's bad_words): token sequences an
answer never holds. A one-token word is never taken; a longer one's last token is not taken right
after the rest of it (the prompt counted, as the reference counts it): "The image shows" kept out
of captions, a class name out of a description.
"""
from __future__ import annotations

from typing import Sequence as Seq


def usable_bad_words(words, stop_ids) -> tuple[tuple[int, ...], ...]:
    """The words as tuples, without one-token words that are stop ids (as the reference drops them:
    an answer must be able to end)."""
    stops = set(stop_ids)
    return tuple(tuple(w) for w in words if not (len(w) == 1 and w[0] in stops))


def banned_by_bad_words(ids: Seq[int], words: tuple[tuple[int, ...], ...]) -> list[int]:
    """The tokens that would complete one of `words` if taken after `ids` (a word longer than `ids`
    and the token: none)."""
    n = len(ids)
    return sorted({w[-1] for w in words if len(w) - 1 <= n and tuple(ids[n - len(w) + 1:]) == w[:-1]})


def banned_after(prompt_ids: Seq[int], answer: Seq[int], words: tuple[tuple[int, ...], ...]) -> list[int]:
    """banned_by_bad_words after an answer to `prompt_ids`, reading only the last tokens a word can reach."""
    return banned_by_bad_words(last_ids(prompt_ids, answer, max(map(len, words), default=1) - 1), words)


def last_ids(prompt_ids: Seq[int], answer: Seq[int], reach: int) -> list[int]:
    """The last `reach` tokens of the prompt and the answer so far (all a rule of token runs of at most
    reach + 1 tokens reads: bad words, sequence biases), without copying the whole prompt."""
    return (list(prompt_ids[-reach:]) + list(answer[-reach:]))[-reach:] if reach else []


def is_token_id(value) -> bool:
    """A token id as settings hold them: an int >= 0, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sequence_bans(seq) -> list[int]:
    """The tokens an engine sequence may not take next for its request's bad words."""
    words = usable_bad_words(seq.request.sampling.bad_words_ids, seq.stop_ids)
    return banned_after(seq.request.prompt_ids, seq.generated, words)


def check_bad_words(words, vocab: int) -> None:
    """ValueError naming a bad word that is not a non-empty sequence of token ids of the vocabulary."""
    for word in words:
        if not isinstance(word, (list, tuple)) or not word or \
                any(not is_token_id(t) or t >= vocab for t in word):
            raise ValueError(f"bad_words_ids holds {word!r}: each must be a non-empty list of token ids "
                             f"below the vocabulary's {vocab}")
