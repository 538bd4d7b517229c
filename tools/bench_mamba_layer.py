"""One Mamba layer's inference time at the shipped denoiser's shapes (10 s of motion, batch 2 as with guidance):
the fused path (the causal convolution and SiLU in the compiled kernel, the scan without autograd) against the
same layer through the differentiable ops, measured in one run.

    .venv/bin/python tools/bench_mamba_layer.py [--threads 1]

Prints a markdown table: per shape, the layer's time both ways and their ratio, and the convolution + SiLU alone
both ways. Needs the compiled scan (a C compiler); without it there is nothing to compare.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.models import mamba as mamba_module
from backend.models.mamba import Mamba
from backend.models.ssm import uses_compiled_scan

# (batch, length, d_model) of the default U-Net's Mamba layers at 10 s of motion (50 latent tokens), batch 2:
# temporal scans per level (50, 25, 13 tokens) and the spatial scans (every frame's 8 groups as a sequence).
SHAPES = [(2, 50, 96), (2, 25, 128), (2, 13, 192), (100, 8, 12), (50, 8, 16), (26, 8, 24)]


def best_time(fn, repeats: int = 7, calls: int = 100) -> float:
    """Least mean seconds per call over ``repeats`` runs of ``calls`` calls, after a warm-up."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def layer_and_conv_times(layer: Mamba, x: torch.Tensor, inner: torch.Tensor) -> tuple[float, float]:
    """Seconds per call of the whole layer on x and of its convolution + SiLU on inner, in inference mode."""
    with torch.inference_mode():
        return best_time(lambda: layer(x)), best_time(lambda: layer._conv_silu(inner))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not uses_compiled_scan():
        sys.exit("the compiled CPU scan is not available here (no C compiler?): nothing to compare")
    print(f"one Mamba layer (d_state 16, expand 2), inference, {args.threads} thread(s); times in µs\n")
    print("| batch, length, d_model | layer, ops | layer, fused | ratio | conv + SiLU, ops | fused | ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch, length, d_model in SHAPES:
        torch.manual_seed(0)
        layer = Mamba(d_model).eval()
        x = torch.randn(batch, length, d_model)
        inner = layer.in_proj(x).detach()[..., : layer.d_inner]  # the convolution's input: a strided view
        fused_layer, fused_conv = layer_and_conv_times(layer, x, inner)
        mamba_module.uses_compiled_scan = lambda: False  # the differentiable ops' path, same scan
        try:
            ops_layer, ops_conv = layer_and_conv_times(layer, x, inner)
        finally:
            mamba_module.uses_compiled_scan = uses_compiled_scan
        print(f"| {batch}, {length}, {d_model} | {ops_layer * 1e6:.0f} | {fused_layer * 1e6:.0f} | "
              f"{ops_layer / fused_layer:.2f} | {ops_conv * 1e6:.0f} | {fused_conv * 1e6:.0f} | "
              f"{ops_conv / fused_conv:.2f} |")


if __name__ == "__main__":
    main()
