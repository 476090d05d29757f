"""Stop strings end answers where transformers' StopStringCriteria ends them, byte-level tokens included."""
from __future__ import annotations

import random

import pytest
import torch

from model.engine.stop_strings import StopStringMatcher, byte_level_alphabet, is_byte_level
from processing import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer

# Characters the fixture's ASCII corpus never merged: each is 2-4 byte tokens, none a character alone.
TEXT = "Café über 日本語 ✓ naïve 🙂 — a red circle. Où? ½ ünïcödé!"
STOPS = [["é"], ["日本"], ["本語 ✓"], ["🙂"], ["é ü"], ["ïcö", "circle."], ["e 🙂 —"], ["Où?"], ["½"],
         ["red"], [" a"], ["never"], ["\ufffd"], ["Caf"]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    path = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_pretrained(path), PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


def reference_stops(hf_tokenizer, ids: list[int], stops: list[str]) -> bool:
    from transformers.generation.stopping_criteria import StopStringCriteria

    return bool(StopStringCriteria(hf_tokenizer, stops)(torch.tensor([ids]), None)[0])


def test_the_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_level_alphabet() == {char: byte for byte, char in bytes_to_unicode().items()}


def test_multibyte_characters_are_split_into_byte_tokens(tokenizers):
    ours, hf = tokenizers
    assert is_byte_level(ours) and is_byte_level(ours.backend) and is_byte_level(hf)   # ours, its backend, HF's
    ids = ours.encode(TEXT, add_special_tokens=False)
    assert ours.decode(ids) == TEXT
    partial = [t for t in ids if "\ufffd" in ours.decode([t])]
    assert len(partial) > 10            # what the test is about: tokens that are part of a character


@pytest.mark.parametrize("stops", STOPS, ids=lambda s: "|".join(s).encode("unicode_escape").decode())
def test_every_prefix_stops_where_the_reference_stops(tokenizers, stops):
    ours, hf = tokenizers
    ids = ours.encode(TEXT, add_special_tokens=False)
    matcher = StopStringMatcher(ours)
    got = [matcher.completes(ids[:n], stops) for n in range(1, len(ids) + 1)]
    want = [reference_stops(hf, ids[:n], stops) for n in range(1, len(ids) + 1)]
    assert got == want
    if stops[0] not in ("never", "\ufffd"):
        assert any(got)


def test_random_tokens_specials_and_ids_outside_the_vocabulary(tokenizers):
    """Random-weight models emit any id of their embedding, past the tokenizer's vocabulary too."""
    ours, hf = tokenizers
    rng = random.Random(0)
    vocab = len(ours)
    text_ids = ours.encode(TEXT, add_special_tokens=False)
    matcher = StopStringMatcher(ours)
    checked = stopped = 0
    for _ in range(60):
        ids = [rng.choice([rng.randrange(vocab + 40), rng.choice(text_ids)]) for _ in range(rng.randint(1, 14))]
        stops = [ours.decode(text_ids[i:i + rng.randint(1, 4)]) for i in rng.sample(range(len(text_ids) - 4), 2)]
        stops = [s for s in stops if s] or ["é"]
        for n in range(1, len(ids) + 1):
            want = reference_stops(hf, ids[:n], stops)
            assert matcher.completes(ids[:n], stops) == want, (ids[:n], stops)
            checked, stopped = checked + 1, stopped + want
    assert stopped > 0 and checked > 300
