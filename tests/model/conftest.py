"""Shared fixtures for the model tests: one tiny reference checkpoint per config and session."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, **kw) -> folder built by the reference (cached per arguments)."""
    built: dict[tuple, object] = {}
    torch.set_num_threads(1)

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_checkpoint(tmp_path_factory.mktemp(name), name, **kwargs)
        return built[key]

    return get
