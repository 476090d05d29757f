"""processing.Tokenizer against transformers' AutoTokenizer on the same tokenizer.json / tokenizer_config.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from processing.tokenizer import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "What is in the image?",
    "  leading spaces and trailing  ",
    "Colours: rouge, grün, 青い, emoji 🙂!",
    "<image><fake_token_around_image>inline<end_of_utterance>\n\nafter",
    "\n",
    "",
    "<row_1_col_1><global-img><|begin_of_text|>x<|pad|>",
]


def _write_config(path, **changes):
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(folder):
    return transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_reference(pair, add_special_tokens):
    ref, ours = pair
    for text in TEXTS:
        want = ref(text, add_special_tokens=add_special_tokens)
        assert ours(text, add_special_tokens=add_special_tokens) == dict(want), text
        assert ours.encode(text, add_special_tokens=add_special_tokens) == want["input_ids"]


@pytest.mark.parametrize("kwargs", [
    dict(padding=True),
    dict(padding="longest", padding_side="right"),
    dict(padding="max_length", max_length=24),
    dict(padding=True, pad_to_multiple_of=8),
    dict(truncation=True, max_length=5),
    dict(max_length=6),  # a bare max_length truncates
    dict(padding="max_length", truncation=True, max_length=8),
    dict(padding=True, truncation="longest_first", max_length=4, add_special_tokens=False),
])
@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
def test_batch_padding_and_truncation_match_reference(pair, kwargs, return_tensors):
    ref, ours = pair
    if return_tensors and not kwargs.get("padding"):
        kwargs = dict(kwargs, padding="max_length", max_length=kwargs.get("max_length", 30))
    try:
        want = ref(TEXTS, return_tensors=return_tensors, **kwargs)
        ragged = return_tensors == "np" and want["input_ids"].dtype == object  # the reference makes object arrays
    except ValueError:
        ragged = True
    if ragged:  # rows longer than max_length without truncation cannot be stacked: we say so
        with pytest.raises(ValueError, match="cannot stack"):
            ours(TEXTS, return_tensors=return_tensors, **kwargs)
        return
    got = ours(TEXTS, return_tensors=return_tensors, **kwargs)
    assert set(got) == set(want)
    for key in want:
        if return_tensors is None:
            assert got[key] == want[key], key
        else:
            assert type(got[key]) is type(want[key]) and got[key].dtype == want[key].dtype
            assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), key


def test_left_truncation_side_and_model_max_length(tmp_path):
    build_tokenizer(tmp_path)
    _write_config(tmp_path, truncation_side="left", model_max_length=7)
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    for kwargs in (dict(truncation=True), dict(padding="max_length"), dict(padding="max_length", truncation=True)):
        assert ours(TEXTS, **kwargs) == dict(ref(TEXTS, **kwargs)), kwargs


def test_ragged_tensors_and_missing_pad_token_are_clear_errors(folder, tmp_path):
    ours = Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a longer text"], return_tensors="pt")
    build_tokenizer(tmp_path)
    _write_config(tmp_path, pad_token=None)
    with pytest.raises(ValueError, match="no pad token"):
        Tokenizer.from_pretrained(tmp_path)(["a", "bb"], padding=True)


def test_decode_and_batch_decode_match_reference(pair):
    ref, ours = pair
    batch = ours(TEXTS, padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        for ids in batch:
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        as_tensor = torch.tensor(batch)
        assert ours.decode(as_tensor, skip_special_tokens=skip) == ref.decode(as_tensor, skip_special_tokens=skip)
        assert ours.decode(np.asarray(batch[0]), skip_special_tokens=skip) == ref.decode(batch[0], skip_special_tokens=skip)
    assert ours.decode(ours.encode("Hello, world!"), skip_special_tokens=True) == "Hello, world!"


def test_special_tokens_and_ids_match_reference(pair):
    ref, ours = pair
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name)
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id")
    assert ours.padding_side == ref.padding_side == "left"
    assert len(ours) == len(ref)
    tokens = ["<image>", "<global-img>", "<row_6_col_6>", "<row_7_col_1>", "Hello"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    ids = ours.encode("<image>Hello")
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert (ours.all_special_tokens, ours.all_special_ids) == (ref.all_special_tokens, ref.all_special_ids)


def test_add_special_tokens_appends_new_ids_like_the_reference(folder):
    ref, ours = transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    new = {"additional_special_tokens": ["<new_a>", "<image>", "<new_b>"]}
    assert ours.add_special_tokens(new) == ref.add_special_tokens(new) == 2
    text = "x<new_b>y<new_a>"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == ref.decode(ref(text)["input_ids"],
                                                                                  skip_special_tokens=True)


@pytest.mark.parametrize("flags", [dict(add_bos_token=False), dict(add_bos_token=True, add_eos_token=True),
                                   dict(add_eos_token=True)])
def test_add_bos_eos_flags_do_not_override_the_post_processor(tmp_path, flags):
    build_tokenizer(tmp_path)
    _write_config(tmp_path, **flags)
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:3]:
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode("hi")[0] == ours.bos_token_id  # as in tokenizer.json, whatever the flags say


def test_tokenizer_json_without_post_processor_adds_no_bos(tmp_path):
    build_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ref, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    assert ours.encode("hi there") == ref("hi there")["input_ids"]
    assert ours.encode("hi there")[0] != ours.bos_token_id


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_the_calls_transformers_users_write_give_the_references_results(pair):
    """One text with return_tensors keeps its batch axis; decode takes clean_up_tokenization_spaces
    and an encoding; batch_decode of one sequence alone gives a list of its text."""
    ref, ours = pair
    for kind in ("pt", "np"):
        got, want = ours("What is in the image?", return_tensors=kind), ref("What is in the image?", return_tensors=kind)
        assert tuple(got["input_ids"].shape) == tuple(want["input_ids"].shape) == (1, len(want["input_ids"][0]))
    ids = ref(TEXTS[:2], padding=True, return_tensors="pt")["input_ids"]
    for clean in (True, False, None):
        kwargs = {} if clean is None else {"clean_up_tokenization_spaces": clean}
        assert ours.batch_decode(ids, skip_special_tokens=True, **kwargs) == ref.batch_decode(
            ids, skip_special_tokens=True, **kwargs)
        assert ours.decode(ids[0], **kwargs) == ref.decode(ids[0], **kwargs)
    assert ours.batch_decode(ids[1]) == ours.batch_decode(ids[1].tolist()) == [ref.decode(ids[1])]
    encoding = ref(TEXTS[0])
    assert ours.decode(encoding) == ours.decode(dict(encoding)) == ref.decode(encoding["input_ids"])
