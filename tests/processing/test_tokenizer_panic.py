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


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_not_turned_into_errors(stop):
    with pytest.raises(stop), tokenizer.backend_panics_as_errors():
        raise stop()
