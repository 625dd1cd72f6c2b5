"""The engine's settings and the size of its KV pool.

KV budget, in order: kv_cache_bytes when set; else on CUDA kv_cache_fraction of the memory free
once the weights are loaded; else (CPU) DEFAULT_CPU_KV_BYTES. Never more than max_running
sequences of max_position_embeddings tokens can use, so a small model does not commit a
gigabyte it cannot fill.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from router_service.engine.scheduler import SchedulerConfig
from router_service.model.dense import DenseModel
from router_service.model.paged_cache import DEFAULT_BLOCK_SIZE, KVPool, blocks_for_budget, bytes_per_token

DEFAULT_CPU_KV_BYTES = 2**30  # 1 GiB: ~65k tokens of the `small` demo model in fp32


class RequestTooLarge(ValueError):
    """A request whose KV cache could never fit in the whole pool (INVALID_ARGUMENT at the edge)."""


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    max_new_tokens: int = 4096  # cap on a request's max_tokens
    stop_at_eos: bool = True  # the model's eos token ends generation (finish_reason "stop")
    kv_cache_bytes: int | None = None  # the KV pool's size; None: see the module docstring
    kv_cache_fraction: float = 0.5  # on CUDA without kv_cache_bytes: this much of the free memory
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    # 2: the step's batch runs as two micro-batches, one computing while the other's tokens are at the
    # expert groups (engine/pipeline.py); only with experts that can be waited on (RemoteExperts)
    micro_batches: int = 1

    def __post_init__(self):
        if self.kv_cache_bytes is not None and (not _is_int(self.kv_cache_bytes) or self.kv_cache_bytes < 1):
            raise ValueError(f"kv_cache_bytes must be None (auto) or an int >= 1, got {self.kv_cache_bytes!r}")
        if not isinstance(self.kv_cache_fraction, (int, float)) or not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction!r}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be an int in [1, 1024], got {self.block_size!r}")
        if self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def kv_budget_bytes(dense: DenseModel, config: EngineConfig) -> int:
    spec, dtype = dense.spec, dense.dtype
    useful = config.scheduler.max_running * spec.max_position_embeddings * bytes_per_token(spec, dtype)
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if dense.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dense.device)
        return min(useful, int(free * config.kv_cache_fraction))
    return min(useful, DEFAULT_CPU_KV_BYTES)


def kv_pool(dense: DenseModel, config: EngineConfig) -> KVPool:
    budget = kv_budget_bytes(dense, config)
    blocks = blocks_for_budget(dense.spec, dense.dtype, budget, config.block_size)
    if blocks < 1:
        per_block = bytes_per_token(dense.spec, dense.dtype) * config.block_size
        raise ValueError(f"kv_cache_bytes={budget} holds no block of {config.block_size} tokens "
                         f"({per_block} bytes each for this model in {dense.dtype}); raise it")
    return KVPool(dense.spec, blocks, config.block_size, dense.dtype, dense.device)
