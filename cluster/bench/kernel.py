"""moectl bench kernel: experts.kernels.forward.moe_forward, backend torch vs triton, per token count.

  random experts [E, F, H] (scaled 0.02) + random gate -> top-k slot ids, weights
  per T in --tokens: warm up, time --repeats calls per backend, print the medians,
  each backend's speed-up over the first, and the max abs difference from the first's output.

Backends: torch, triton (the launch settings measured on an H200 where they fit), and
triton-portable (the untuned defaults, for a before/after of those settings in one run).

Defaults are Mixtral-8x7B's expert shapes (H 4096, F 14336, 8 experts, top-2, bf16),
about 2.8 GB of weights: meant for a GPU; on CPU pass smaller --hidden/--ffn.

--touch-cost: the autoscaler's touch_cost for these shapes. One expert's call time with n pairs, all
on one slot, in the layout a group runs (prepare()), fitted as t(n) = a + b * n over --tokens by least
squares (default 1,2,4,8,16,32,64: decode sizes): a is what a call costs for touching the expert at
all (its weight read), b what each pair adds, and a / b the weight read in pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

DTYPES = ("bfloat16", "float16", "float32")
BACKENDS = ("torch", "triton", "triton-portable")
WARMUP_CALLS = 10  # the first triton call per shape compiles; the rest let the GPU clocks ramp up


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,16,256, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size H (default 4096)")
    parser.add_argument("--ffn", type=int, default=14336, help="expert FFN size F (default 14336)")
    parser.add_argument("--experts", type=int, default=8, help="experts (slots) held (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--tokens", type=_int_list, default=None,
                        help="comma-separated token counts (default 1,4,16,64,256,1024,4096; "
                             "with --touch-cost 1,2,4,8,16,32,64)")
    parser.add_argument("--touch-cost", action="store_true",
                        help="fit one expert's call time as a + b * pairs with the first backend and print "
                             "a / b, the value for the autoscaler's touch_cost")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row; the median is shown (default 20)")
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto = cuda when available (default)")
    parser.add_argument("--backends", default="torch,triton",
                        help=f"comma-separated, from {','.join(BACKENDS)}; speed-ups are against the first "
                             "(default torch,triton)")
    parser.add_argument("--seed", type=int, default=0)


def _time_ms(fn, repeats: int, device) -> float:
    """Median wall time of fn() in ms, after WARMUP_CALLS untimed calls."""
    import torch

    for _ in range(WARMUP_CALLS):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            # Events time the GPU work itself; synchronize so each sample is complete.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _call(backend: str, hidden, slot_ids, weights, experts):
    from experts.kernels.forward import moe_forward

    if backend == "triton-portable":
        from experts.kernels.triton_moe import triton_moe_forward

        return lambda: triton_moe_forward(hidden, slot_ids, weights, experts, tuned=False)
    return lambda: moe_forward(hidden, slot_ids, weights, experts, backend=backend)


def run(args) -> int:
    import torch

    from experts.kernels.weights import ExpertWeights

    for name in ("hidden", "ffn", "experts", "top_k", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.touch_cost and args.tokens is not None and len(set(args.tokens)) < 2:
        raise ValueError(f"--touch-cost fits a line: --tokens needs two different counts or more, got {args.tokens}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - set(BACKENDS) or len(set(backends)) != len(backends):
        raise ValueError(f"--backends must name distinct ones of {','.join(BACKENDS)}, got {args.backends!r}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device: use --device cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        skipped = [b for b in backends if b.startswith("triton")]
        if skipped:
            print(f"note: {', '.join(skipped)} need{'s' if len(skipped) == 1 else ''} CUDA (or TRITON_INTERPRET=1, "
                  "which is far too slow to time); skipping")
            backends = [b for b in backends if b not in skipped]
    if not backends:
        return 0
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    def rand(*shape):  # small weights keep bf16 activations far from overflow
        return (torch.randn(*shape, device=device) * 0.02).to(dtype)

    h, f, e = args.hidden, args.ffn, args.experts
    experts = ExpertWeights(rand(e, f, h), rand(e, f, h), rand(e, h, f))
    if args.touch_cost:
        return _fit_touch_cost(args, backends[0], experts, device, dtype)
    args.tokens = args.tokens or [1, 4, 16, 64, 256, 1024, 4096]
    print(f"device {device}  dtype {args.dtype}  H {h}  F {f}  experts {e}  top-{args.top_k}  "
          f"weights {experts.nbytes / 2**30:.2f} GiB  median of {args.repeats} after {WARMUP_CALLS} warm-up")
    first = backends[0]
    cols = [f"{b} ms" for b in backends] + [f"{b} x" for b in backends[1:]] + [f"{b} |diff|" for b in backends[1:]]
    width = max(12, max(len(c) for c in cols) + 2)
    print(f"{'tokens':>7}" + "".join(f"{c:>{width}}" for c in cols))
    for tokens in args.tokens:
        hidden = torch.randn(tokens, h, device=device).to(dtype)
        gate_logits = torch.randn(tokens, e, device=device)
        top_w, slot_ids = torch.softmax(gate_logits, -1).topk(args.top_k, dim=-1)  # [T, k]
        weights = (top_w / top_w.sum(-1, keepdim=True)).to(dtype)  # Mixtral renormalises the top-k
        ms, outs = {}, {}
        for b in backends:
            call = _call(b, hidden, slot_ids, weights, experts)
            outs[b] = call()
            ms[b] = _time_ms(call, args.repeats, device)
        row = [f"{ms[b]:.3f}" for b in backends] + [f"{ms[first] / ms[b]:.2f}x" for b in backends[1:]]
        row += [f"{(outs[first].float() - outs[b].float()).abs().max().item():.2e}" for b in backends[1:]]
        print(f"{tokens:>7}" + "".join(f"{c:>{width}}" for c in row))
    return 0


def _fit_touch_cost(args, backend: str, experts, device, dtype) -> int:
    """t(n) = a + b * n for one expert given n pairs (see the module docstring); prints a / b."""
    import numpy as np
    import torch

    from experts.kernels.forward import prepare

    held = prepare(experts, backend) if backend != "triton-portable" else experts
    tokens = args.tokens or [1, 2, 4, 8, 16, 32, 64]
    print(f"device {device}  dtype {args.dtype}  H {args.hidden}  F {args.ffn}  backend {backend}  "
          f"one expert, n pairs on it; median of {args.repeats} after {WARMUP_CALLS} warm-up")
    print(f"{'pairs':>7}{'ms':>10}")
    ms = []
    for n in tokens:
        hidden = torch.randn(n, args.hidden, device=device).to(dtype)
        slot_ids = torch.zeros(n, 1, dtype=torch.int64, device=device)
        weights = torch.ones(n, 1, device=device).to(dtype)
        ms.append(_time_ms(_call(backend, hidden, slot_ids, weights, held), args.repeats, device))
        print(f"{n:>7}{ms[-1]:>10.3f}")
    per_pair, per_call = np.polyfit(np.array(tokens, dtype=float), np.array(ms), 1)
    if per_pair * max(tokens) <= 1e-3 * max(ms):  # less than 0.1% over the range: noise, or a flat kernel
        print(f"fit: {per_call:.3f} ms per call, and pairs add nothing measurable over {tokens}: "
              "try larger --tokens; touch_cost cannot be fitted")
        return 1
    print(f"fit: {per_call:.3f} ms per call + {per_pair * 1e3:.2f} us per pair -> "
          f"touch_cost {per_call / per_pair:.1f} (pairs one weight read costs)")
    return 0
