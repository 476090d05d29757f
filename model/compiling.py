"""A function run through torch.compile where that works, and eagerly where it does not."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class CompiledOrEager:
    """`fn` through torch.compile (whole, dynamic shapes), compiled at the first call. A compiler that
    fails (no Triton, an old GPU) warns once, and `fn` serves from then on. Inside another compiled
    region (the decode step) `fn` is traced as it is, into that region's kernels."""

    def __init__(self, fn: Callable, what: str) -> None:
        self.fn, self.what = fn, what
        self._run: Callable | None = None

    def __call__(self, *args):
        if torch.compiler.is_compiling() or self._run is self.fn:
            return self.fn(*args)
        if self._run is None:
            self._run = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._run(*args)
        except Exception as e:       # the eager call below raises again if the fault is the caller's
            warnings.warn(f"torch.compile of {self.what} failed, running it eagerly: {e!r}")
            self._run = self.fn
            return self.fn(*args)

    def __deepcopy__(self, memo: dict) -> "CompiledOrEager":
        return self               # no state of a model's: a copied model shares the compiled code

    def __reduce__(self):
        return CompiledOrEager, (self.fn, self.what)
