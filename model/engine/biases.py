"""What a request adds to, or takes from, its logits before the penalties, as transformers'
processors of the same names: SamplingParams.sequence_bias (a bias on a token, or on a token right
after given ones; a one-token entry is vLLM's and OpenAI's logit_bias), suppress_tokens (never
taken, stop ids included) and begin_suppress_tokens (not taken first). Checked without torch: a
driver checks a job's before any work.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING
from typing import Sequence as Seq

from .bad_words import is_token_id, last_ids

if TYPE_CHECKING:
    from torch import Tensor

Bias = tuple[tuple[int, ...], float]


def normalized_sequence_bias(value) -> tuple[Bias, ...]:
    """`value` as ((token ids, bias), ...), one entry a sequence (the last given wins): a dict
    {token id or ids: bias} (a JSON object's keys, digits, count as ids) or transformers' list
    [[ids, bias], ...], as generation_config.json holds it. ValueError for anything else."""
    pairs = value.items() if isinstance(value, dict) else value
    out: dict[tuple[int, ...], float] = {}
    for pair in pairs or ():
        try:
            ids, bias = pair
        except (TypeError, ValueError):
            raise ValueError(f"sequence_bias holds {pair!r}: give [token ids, bias] pairs") from None
        ids = _ids(ids)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
            raise ValueError(f"sequence_bias gives {ids!r} the bias {bias!r}: a number (-inf bans it)")
        out[ids] = float(bias)
    return tuple(out.items())


def _ids(ids) -> tuple[int, ...]:
    if isinstance(ids, str) and ids.strip().isdigit():
        ids = int(ids)
    ids = (ids,) if isinstance(ids, int) and not isinstance(ids, bool) else ids
    if not isinstance(ids, (list, tuple)) or not ids or not all(map(is_token_id, ids)):
        raise ValueError(f"sequence_bias holds {ids!r}: each key must be a token id or a non-empty list of them")
    return tuple(ids)


def normalized_token_ids(value, name: str) -> tuple[int, ...]:
    """A list of token ids (suppress_tokens, begin_suppress_tokens) as a tuple, one id alone as one."""
    ids = [value] if isinstance(value, int) else list(value or ())
    if not all(map(is_token_id, ids)):
        raise ValueError(f"{name} must be token ids, got {value!r}")
    return tuple(dict.fromkeys(ids))


def check_in_vocabulary(vocab: int, sequence_bias: tuple[Bias, ...] = (), **token_lists) -> None:
    """ValueError naming a biased token id, or one of a list of token ids (suppress_tokens=...),
    outside a vocabulary of `vocab` tokens."""
    named = [("sequence_bias", t) for ids, _ in sequence_bias for t in ids]
    named += [(name, t) for name, ids in token_lists.items() for t in ids]
    for name, token in named:
        if token >= vocab:
            raise ValueError(f"{name} holds token id {token}, outside the vocabulary's {vocab}")


def biases_after(ids: Seq[int], biases: tuple[Bias, ...]) -> dict[int, float]:
    """token -> the bias its logit takes after `ids` (biases of one token always; longer ones when
    `ids` ends with all but their last token, as many as end so, summed)."""
    out: dict[int, float] = {}
    for entry, bias in biases:
        before = len(entry) - 1
        if before <= len(ids) and (not before or tuple(ids[-before:]) == entry[:-1]):
            out[entry[-1]] = out.get(entry[-1], 0.0) + bias
    return out


def bias_tensor(rows: list[tuple[int, dict[int, float]]], num_rows: int, vocab: int, device) -> Tensor | None:
    """(num_rows, vocab) float32: each row's biases (rows: row, token -> bias), 0 elsewhere; None where none."""
    import torch

    entries = [(row, token, bias) for row, found in rows for token, bias in found.items()]
    if not entries:
        return None
    out = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
    index = torch.tensor([[row, token] for row, token, _ in entries], device=device).T
    out[index[0], index[1]] = torch.tensor([bias for *_, bias in entries], dtype=torch.float32, device=device)
    return out


def answer_biases(prompt_ids: Seq[int], answer: Seq[int], biases: tuple[Bias, ...]) -> dict[int, float]:
    """biases_after an answer to `prompt_ids`, reading only the last tokens an entry can reach."""
    return biases_after(last_ids(prompt_ids, answer, max((len(entry) for entry, _ in biases), default=1) - 1), biases)


def sequence_biases(seq) -> dict[int, float]:
    """An engine sequence's biases for its next token."""
    return answer_biases(seq.request.prompt_ids, seq.generated, seq.request.sampling.sequence_bias)


def suppressed(sampling, answer_len: int) -> list[int]:
    """The tokens suppress_tokens and begin_suppress_tokens keep from an answer of answer_len tokens so far."""
    return list(sampling.suppress_tokens) + (list(sampling.begin_suppress_tokens) if not answer_len else [])
