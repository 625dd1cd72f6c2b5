"""`moectl bench serving` runs end to end on a tiny model (no timing is asserted: benchmarks report)."""
from __future__ import annotations

import subprocess
import sys


def test_bench_serving_smoke(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "serving", "--checkpoint", str(tiny_checkpoint),
                        "--prefill-tokens", "64", "--decode-batch", "4", "--streams", "4", "--new-tokens", "4",
                        "--prompt-tokens", "8", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("prefill 64 tokens", "decode step, batch 4", "generation 4 streams x 4 tokens",
                 "cluster / transformers"):
        assert line in r.stdout, r.stdout
