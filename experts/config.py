"""ExpertGroupConfig: what one expert group loads, where it computes, where it listens.

Validated when built, so a bad value fails at the controller that wrote it, with a
message naming the field, not later inside an actor on another node. Values that
depend on the machine ("auto" device, default dtype) are resolved by the group
itself (resolve_device / resolve_dtype): the controller that builds the config may
have no GPU while the actor that reads it has one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.config import config_from_dict
from experts.credentials import CredentialsError, ExpertCredentials, GroupCredentials
from experts.kernels.forward import BACKENDS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExpertGroupConfig:
    checkpoint: str  # checkpoint directory, readable from the node the group runs on
    slots: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) loaded at start; may be empty
    device: str = "auto"  # "auto" = cuda when torch.cuda.is_available(), else cpu
    dtype: str | None = None  # None = bfloat16 on cuda, float32 on cpu
    backend: str = "auto"  # expert kernel: "auto" = triton on cuda, torch on cpu
    host: str = "127.0.0.1"  # bind address; "0.0.0.0" to serve routers on other nodes
    # Same-layer Forwards queued together run as one kernel call (experts/coalescer.py); with a window a
    # call waits this long for others first (0: never waits, merges only what queued while busy).
    coalesce_window_s: float = 0.0
    port: int = 0  # 0 = a free port, chosen on every start
    name: str = "group"  # shows in logs and error messages
    cpu_threads: int | None = None  # torch threads for expert math on CPU; None = torch's default (all cores)
    # CPU cores the group's process may run on (os.sched_setaffinity); None = any. A group pinned to its own
    # core with one thread stands for a group that owns its GPU (moectl bench skew).
    cpu_affinity: list[int] | None = None
    # What callers must present, and optional mutual TLS (experts/credentials.py). The cluster's credentials are
    # cut to the group's share (digests) here, in the process that builds the config: no secret reaches a group.
    # None: the port is open to anyone who reaches it (tests, one machine); the controller always sets it.
    credentials: GroupCredentials | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.coalesce_window_s, bool) or not isinstance(self.coalesce_window_s, (int, float)) \
                or not 0 <= self.coalesce_window_s <= 0.1:
            raise ValueError(f"coalesce_window_s must be a number of seconds in [0, 0.1], got {self.coalesce_window_s!r}")
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"checkpoint must be a non-empty path string, got {self.checkpoint!r}")
        self.slots = [self._slot(s) for s in self.slots]
        if len(set(self.slots)) != len(self.slots):
            dup = sorted({s for s in self.slots if self.slots.count(s) > 1})
            raise ValueError(f"slots must not repeat a (layer, expert) pair, repeated: {dup}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be None or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0 = pick a free port), got {self.port!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.cpu_affinity is not None and (not isinstance(self.cpu_affinity, (list, tuple)) or not self.cpu_affinity
                                              or not all(isinstance(c, int) and c >= 0 for c in self.cpu_affinity)):
            raise ValueError(f"cpu_affinity must be None or a non-empty list of core ids, got {self.cpu_affinity!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or isinstance(self.cpu_threads, bool)
                                             or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads must be None (torch's default) or an int >= 1, got {self.cpu_threads!r}")
        if isinstance(self.credentials, ExpertCredentials):
            self.credentials = self.credentials.for_group()
        if self.credentials is not None and not isinstance(self.credentials, GroupCredentials):
            raise CredentialsError("credentials must be None, ExpertCredentials or GroupCredentials")

    @staticmethod
    def _slot(slot) -> tuple[int, int]:
        # lists come from JSON/YAML; tuples from Python
        ok = isinstance(slot, (list, tuple)) and len(slot) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in slot)
        if not ok:
            raise ValueError(f"slots must be (layer, expert) pairs of non-negative ints, got {slot!r}")
        return int(slot[0]), int(slot[1])

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertGroupConfig":
        return config_from_dict(cls, d)

    def resolve_device(self) -> torch.device:
        """The device to compute on, decided on the machine the group runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"group {self.name}: device='cuda' but torch sees no CUDA device here "
                             "(was the actor created with num_gpus=1?)")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if device.type == "cuda" else torch.float32
