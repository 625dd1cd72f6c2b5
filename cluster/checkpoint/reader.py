"""Read a Hugging Face MoE checkpoint selectively: dense tensors, or some experts.

    Checkpoint(dir) -> spec (config.json) + tensor name -> shard file
    load_dense()                  every tensor that is not an expert's
    load_expert(layer, expert)    three tensors of one expert

Each tensor is read on its own through safetensors' safe_open, which maps the file
and copies out only that tensor's byte range: a process that serves two experts
never holds the others (MoE is dense in memory; DESIGN.md "Memory matters").
Only safetensors is read; pickled `.bin` checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cluster.checkpoint.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or corrupt; the message names the file or tensor."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {value}")
        return value
    if value not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


class Checkpoint:
    """A checkpoint directory: its ModelSpec and lazy, per-tensor access to its weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.spec = ModelSpec.from_dir(self.path)
        self._handles: dict[Path, object] = {}  # open safetensors files (memory-mapped, not read)
        self.file_of = self._index()  # tensor name -> shard path
        self.loaded_bytes = 0  # bytes copied out of the checkpoint by this process

    def _index(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
            for shard in set(weight_map.values()):
                # Shards are files of this directory: a path with '..' or an absolute one would make a group
                # map any file the process can read. Not resolved: Hugging Face caches link shards elsewhere.
                if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts \
                        or "\\" in shard:
                    raise CheckpointError(f"{index} names shard {shard!r:.100}: shards must be relative paths inside "
                                          f"the checkpoint directory (no '..', not absolute)")
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in set(files.values()):
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard {shard.name}, which is missing")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {pickles[0]}: pickled weights are not loaded; convert to safetensors)" if pickles else ""
            raise CheckpointError(f"{self.path}: no *.safetensors files{hint}")
        files = {}
        for shard in shards:
            for name in self._open(shard).keys():
                files[name] = shard
        return files

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: corrupt safetensors file ({e})") from e
        return self._handles[shard]

    def has(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> list[int]:
        return list(self._open(self._file(name)).get_slice(name).get_shape())

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.path}")
        return self.file_of[name]

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its own byte range, converted to dtype when given."""
        try:
            tensor = self._open(self._file(name)).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.file_of[name]}: cannot read tensor {name!r} ({e})") from e
        self.loaded_bytes += tensor.numel() * tensor.element_size()
        return tensor.to(dtype) if dtype is not None else tensor

    def dense_names(self) -> list[str]:
        return sorted(n for n in self.file_of if not self.spec.is_expert_tensor(n))

    def load_dense(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every non-expert tensor: embeddings, attention, norms, gates, shared experts, LM head."""
        names = self.dense_names()
        return self._load_many(names, dtype, what="dense tensors")

    def load_expert(self, layer: int, expert: int, dtype: torch.dtype = torch.float32):
        """(gate [F, H], up [F, H], down [H, F]) of one expert."""
        if not self.spec.is_sparse(layer):
            raise CheckpointError(f"layer {layer} is not an MoE layer of this model (sparse layers: {self.spec.sparse_layers})")
        if not 0 <= expert < self.spec.num_experts:
            raise CheckpointError(f"expert must be in [0, {self.spec.num_experts - 1}], got {expert}")
        return tuple(self.load(n, dtype) for n in self.spec.expert_tensor_names(layer, expert))

    def _load_many(self, names: list[str], dtype: torch.dtype, what: str) -> dict[str, torch.Tensor]:
        start, last_report, out = time.monotonic(), time.monotonic(), {}
        before = self.loaded_bytes
        for i, name in enumerate(names):
            out[name] = self.load(name, dtype)
            if time.monotonic() - last_report > 2.0:  # progress on long loads, not a line per tensor
                last_report = time.monotonic()
                log.info("loading %s from %s: %d/%d tensors, %.1f MiB", what, self.path, i + 1, len(names),
                         (self.loaded_bytes - before) / 2**20)
        log.info("loaded %d %s (%.1f MiB) from %s in %.2f s", len(names), what,
                 (self.loaded_bytes - before) / 2**20, self.path, time.monotonic() - start)
        return out
