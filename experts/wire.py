"""Tensors on the wire: raw bytes with dtype and shape beside them (elasticmoe.v1.Tensor).

Never pickle, never repeated float (DESIGN.md): a [t, H] fp32 tensor costs t*H*4 bytes
plus a few bytes of header, and decodes with torch.frombuffer without parsing numbers.
Decoding checks dtype, shape and byte count, so a malformed message is an error that
names the field, never a crash or a huge allocation.

On a GPU, payloads cross the PCIe bus through pinned (page-locked) host memory: to_host()
copies a CUDA tensor into a pinned buffer (a DMA, not a pageable bounce), and to_device() /
decode(device=cuda) copy pinned bytes up with non_blocking=True, so the copy overlaps what
the host does next. The router moves a layer's hidden states to the host once, not once per
group (router_service/serving/dispatch.py).
"""
from __future__ import annotations

import math
import warnings

import torch
from elasticmoe.v1 import expert_pb2

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}
NAME_OF = {v: k for k, v in WIRE_DTYPES.items()}
MAX_DIMS = 4

# gRPC's default 4 MiB message cap is one bf16 [512, 4096] hidden batch: too small for a
# prefill. The routers' channels (which talk to the cluster's own groups) take up to this;
# an expert server takes what the largest legitimate Forward of its model needs (below).
MAX_MESSAGE_BYTES = 256 * 2**20
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# A router sends a group at most one step's tokens per call (RouterConfig.max_step_tokens, which
# may not exceed this), so no legitimate Forward is larger than this many tokens' worth.
MAX_FORWARD_TOKENS = 8192
MAX_CONCURRENT_RPCS = 256  # Forwards (routers x micro-batches) and Stats at once; beyond: RESOURCE_EXHAUSTED


def server_options(hidden_size: int, top_k: int) -> list[tuple[str, int]]:
    """An expert server's gRPC options: messages capped at the largest legitimate Forward of this model
    (MAX_FORWARD_TOKENS rows of fp32 hidden, int32 ids and fp32 weights) plus headroom, and a bound on
    concurrent calls, so one client cannot make a group hold gigabytes or thousands of handlers."""
    largest = MAX_FORWARD_TOKENS * (hidden_size * 4 + top_k * 8) + 2**20
    return [("grpc.max_send_message_length", largest), ("grpc.max_receive_message_length", largest),
            ("grpc.max_concurrent_streams", MAX_CONCURRENT_RPCS)]


class WireError(ValueError):
    """A tensor message that does not describe a valid tensor; the message names the field."""


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """tensor on the CPU: a CUDA tensor through a pinned buffer (returns once the copy is done)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on device: to CUDA through pinned memory, non-blocking (stream-ordered)."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def encode(tensor: torch.Tensor) -> expert_pb2.Tensor:
    if tensor.dtype not in NAME_OF:
        raise WireError(f"dtype {tensor.dtype} cannot go on the wire (allowed: {', '.join(WIRE_DTYPES)})")
    flat = to_host(tensor.detach()).contiguous().reshape(-1).view(torch.uint8)  # bf16 has no numpy dtype: by bytes
    return expert_pb2.Tensor(dtype=NAME_OF[tensor.dtype], shape=list(tensor.shape), data=flat.numpy().tobytes())


def decode(msg: expert_pb2.Tensor, field: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor in msg; `field` names it in errors (e.g. "hidden")."""
    if msg.dtype not in WIRE_DTYPES:
        raise WireError(f"{field}.dtype must be one of {', '.join(WIRE_DTYPES)}, got {msg.dtype!r}")
    shape = list(msg.shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(d < 0 for d in shape):
        raise WireError(f"{field}.shape must have 1 to {MAX_DIMS} non-negative dims, got {shape}")
    dtype = WIRE_DTYPES[msg.dtype]
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if len(msg.data) != expected:
        raise WireError(f"{field}: shape {shape} of {msg.dtype} needs {expected} bytes, got {len(msg.data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    with warnings.catch_warnings():  # the bytes are read-only; nothing writes into a decoded tensor
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(msg.data, dtype=torch.uint8)
    return to_device(flat.view(dtype).reshape(shape), device)
