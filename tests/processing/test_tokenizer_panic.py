"""A tokenizer.json whose backend panics on a text (pyo3's PanicException, a BaseException that passes
every per-row `except Exception`) gives that text an ordinary ValueError instead."""
from __future__ import annotations

import json

import pytest

from processing import tokenizer
from processing.tokenizer import Tokenizer
from tests.fixtures.checkpoints import build_tokenizer

# Nested quantifiers: Oniguruma backtracks until its retry limit, and the tokenizers library panics.
REDOS = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}


@pytest.fixture(scope="module")
def redos_tokenizer(tmp_path_factory) -> Tokenizer:
    path = build_tokenizer(tmp_path_factory.mktemp("redos"))
    config = json.loads((path / "tokenizer.json").read_text())
    config["pre_tokenizer"] = REDOS
    (path / "tokenizer.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("call", [lambda t, s: t(s), lambda t, s: t([s, "hi"]), lambda t, s: t.encode(s)],
                         ids=["call", "batch", "encode"])
def test_a_backend_panic_while_encoding_is_a_value_error(redos_tokenizer, call):
    try:
        call(redos_tokenizer, "a" * 40 + "!")
    except Exception as e:          # what a per-row handler catches
        assert isinstance(e, ValueError) and "tokenizer" in str(e) and "retry-limit" in str(e), e
    else:
        pytest.fail("the pattern no longer makes the backend panic: this test needs another one")
    assert redos_tokenizer("aaa!")["input_ids"]        # ordinary texts still encode


@pytest.fixture(scope="module")
def redos_decoder(tmp_path_factory) -> Tokenizer:
    """The same pattern in a Replace decoder over the fused text: a generated answer panics as it is decoded
    (in the engine's thread, whose callers then waited for ever)."""
    path = build_tokenizer(tmp_path_factory.mktemp("redos-decoder"))
    config = json.loads((path / "tokenizer.json").read_text())
    replace = {"type": "Replace", "pattern": REDOS["pattern"], "content": ""}
    config["decoder"] = {"type": "Sequence", "decoders": [config["decoder"], {"type": "Fuse"}, replace]}
    (path / "tokenizer.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(path)


def test_a_backend_panic_while_decoding_is_a_value_error(redos_decoder):
    ids = redos_decoder.encode("a" * 40 + "!", add_special_tokens=False)
    with pytest.raises(ValueError, match="tokenizer.*retry-limit"):
        redos_decoder.decode(ids)
    with pytest.raises(ValueError, match="retry-limit"):
        redos_decoder.batch_decode([ids[:3], ids])
    assert redos_decoder.decode(redos_decoder.encode("hi!", add_special_tokens=False)) == "hi!"     # others decode


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_not_turned_into_errors(stop):
    with pytest.raises(stop), tokenizer.backend_panics_as_errors():
        raise stop()
