"""pipeline.replica.load_engine: a replica's engine as its config asks (tensor-parallel size 1)."""
from __future__ import annotations

import pytest

from pipeline import PipelineConfig
from pipeline.replica import load_engine


@pytest.mark.parametrize("compile_decode", [None, True, False])
def test_the_engine_compiles_its_decode_step_as_configured(checkpoint, compile_decode):
    engine = load_engine(PipelineConfig(model=str(checkpoint), compile_decode=compile_decode), "cpu", None, {})
    assert engine.compile is bool(compile_decode)           # None: the engine's default, off on CPU
