"""Ray Data graph: read -> preprocess (CPU actors) -> generate (model replicas) -> write."""
from importlib import import_module

# Each name's module, imported on first use: a process that needs one module of the package (the run's
# stats actor, ray alone) does not pay for the others' imports (Ray Data, pandas: ~1 s of a CPU each).
_HOMES = {"PipelineConfig": "config", "DEFAULT_PROMPT": "config", "build_processor": "builder",
          "read_rows": "io", "write_rows": "io", "read_output": "io", "run_job": "job", "OUTPUT_SCHEMA": "rows"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
