"""moectl bench kernel: experts.kernels.forward.moe_forward, backend torch vs triton, per token count.

  random experts [E, F, H] (scaled 0.02) + random gate -> top-k slot ids, weights
  per T in --tokens: warm up, time --repeats calls per backend, print the medians,
  each backend's speed-up over the first, and the max abs difference from the first's output.

Backends: torch, triton (the launch settings measured on an H200 where they fit), and
triton-portable (the untuned defaults, for a before/after of those settings in one run).

Defaults are Mixtral-8x7B's expert shapes (H 4096, F 14336, 8 experts, top-2, bf16),
about 2.8 GB of weights: meant for a GPU; on CPU pass smaller --hidden/--ffn.

--touch-cost: the autoscaler's touch_cost for these shapes. A call's time with n pairs spread evenly
over m experts (m in 1, 2, 4; n over --tokens, default 1,2,4,8,16,32,64: decode sizes), in the layout
a group runs (prepare()), fitted as t = c + a * m + b * n by least squares: c is what any call costs
(launches, bookkeeping), a what each expert touched adds (its weight read), b what each pair adds;
touch_cost = a / b, the weight read in pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

DTYPES = ("bfloat16", "float16", "float32")
BACKENDS = ("torch", "triton", "triton-portable")
TOUCHED = (1, 2, 4)  # --touch-cost: experts a call's pairs are spread over
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
                        help="fit a call's time as c + a * experts touched + b * pairs with the first backend "
                             "and print a / b, the value for the autoscaler's touch_cost")
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
        raise ValueError(f"--touch-cost fits a cost per pair: --tokens needs two different counts or more, "
                         f"got {args.tokens}")
    if args.touch_cost and args.experts < max(TOUCHED):
        raise ValueError(f"--touch-cost spreads pairs over up to {max(TOUCHED)} experts: --experts must be "
                         f">= {max(TOUCHED)}, got {args.experts}")
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
    """t = c + a * experts touched + b * pairs over a grid of calls (see the module docstring); prints a / b."""
    import numpy as np
    import torch

    from experts.kernels.forward import prepare

    held = prepare(experts, backend) if backend != "triton-portable" else experts
    tokens = args.tokens or [1, 2, 4, 8, 16, 32, 64]
    print(f"device {device}  dtype {args.dtype}  H {args.hidden}  F {args.ffn}  backend {backend}  "
          f"n pairs spread over m experts; median of {args.repeats} after {WARMUP_CALLS} warm-up")
    print(f"{'pairs':>7}{'experts':>9}{'ms':>10}")
    rows, ms = [], []
    for n in tokens:
        for m in (m for m in TOUCHED if m <= n):
            hidden = torch.randn(n, args.hidden, device=device).to(dtype)
            slot_ids = (torch.arange(n, device=device) % m)[:, None]  # [n, 1]: pair i on expert i % m
            weights = torch.ones(n, 1, device=device).to(dtype)
            ms.append(_time_ms(_call(backend, hidden, slot_ids, weights, held), args.repeats, device))
            rows.append((1.0, m, n))
            print(f"{n:>7}{m:>9}{ms[-1]:>10.3f}")
    if len({m for _, m, _ in rows}) < 2:
        raise ValueError(f"--touch-cost needs a token count >= 2 in --tokens to spread pairs over 2 experts, "
                         f"got {tokens}")
    (per_call, per_expert, per_pair), *_ = np.linalg.lstsq(np.array(rows), np.array(ms), rcond=None)
    print(f"fit: {per_call:.3f} ms per call + {per_expert:.3f} ms per expert touched + {per_pair * 1e3:.2f} us "
          "per pair")
    if per_pair * max(tokens) <= 1e-3 * max(ms) or per_expert <= 0:  # noise, or a kernel flat in one of them
        print(f"touch_cost cannot be fitted: pairs or experts add nothing measurable over {tokens} (try more "
              "--repeats or larger --tokens)")
        return 1
    print(f"touch_cost {per_expert / per_pair:.1f} (pairs one expert's weight read costs)")
    return 0
