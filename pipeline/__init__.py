"""Ray Data graph: read -> preprocess (CPU actors) -> generate (model replicas) -> write."""
from .builder import build_processor
from .config import DEFAULT_PROMPT, PipelineConfig
from .io import read_output, read_rows, write_rows
from .job import run_job
from .rows import OUTPUT_SCHEMA

__all__ = ["PipelineConfig", "DEFAULT_PROMPT", "build_processor", "read_rows", "write_rows", "read_output",
           "run_job", "OUTPUT_SCHEMA"]
