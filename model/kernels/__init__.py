"""Triton kernels for the decode step, each behind a custom op with a plain-torch fallback and a
switch (`enabled`), on for the engine only once a GPU has measured it faster."""
