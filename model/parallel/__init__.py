"""Tensor parallelism: one Idefics3 model across `tp` devices, each rank loading only its slices."""
from ..config import check_tp
from .layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, ShardSpec, TPContext,
                     VocabParallelEmbedding)
from .loading import load_shard
from .shard import shard_model, sharded_fraction
from .local import TPEngine, launch_local
from .worker import TPWorker, free_port

__all__ = ["TPEngine", "TPWorker", "launch_local", "load_shard", "check_tp", "shard_model", "sharded_fraction",
           "TPContext", "ShardSpec", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "ParallelLMHead", "free_port"]
