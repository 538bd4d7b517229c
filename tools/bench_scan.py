"""Benchmark the selective scan: the project's CPU scan vs the oracle (mamba_ssm's selective_scan_ref semantics),
measured in one run. Full Mamba usage: D, z, delta_bias and softplus all on.

    .venv/bin/python tools/bench_scan.py            # batch 8, d_inner 256, d_state 16, L in 196/1024/4096
    .venv/bin/python tools/bench_scan.py --quick    # skip the oracle's backward (it takes minutes at L=1024)

Prints a markdown table: forward and forward+backward times, the speed-up over the oracle, and the length
scaling time(L=4096) / time(L=512) (8.0 = linear). With CUDA (and mamba_ssm), adds GPU rows.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from scan_reference import selective_scan_ref  # noqa: E402

from backend.models import ssm  # noqa: E402


def make_inputs(batch, dim, dstate, length, device="cpu", seed=0, channels_last=False):
    """Random scan inputs; channels_last: u, delta, z, B, C stored as (b, L, channels), as the Mamba layer
    passes them (mamba_ssm's layout, and the oracle's, is (b, channels, L))."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.5 - 1.0,
        "A": -torch.rand(dim, dstate, generator=gen) * 2 - 0.05,
        "B": torch.randn(batch, dstate, length, generator=gen),
        "C": torch.randn(batch, dstate, length, generator=gen),
        "D": torch.randn(dim, generator=gen),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": torch.randn(dim, generator=gen) * 0.3,
    }
    if channels_last:
        for name in ("u", "delta", "z", "B", "C"):
            tensors[name] = tensors[name].transpose(1, 2).contiguous().transpose(1, 2)
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of mapping every >= 32 MB block afresh (M_MMAP_MAX = 0,
    M_TRIM_THRESHOLD = 4 GB). Fresh mappings cost a page fault per 4 KB page on first touch, which grows
    faster than L once the (8, 256, L) buffers reach 32 MB at L = 4096. False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 4 << 30))
    except (OSError, AttributeError):
        return False


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call unless `repeats` is 1 (slow oracle runs)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_time(scan, inputs, repeats):
    def run():
        with torch.no_grad():
            scan(**inputs, delta_softplus=True)
    return timed(run, repeats)


def forward_backward_time(scan, inputs, repeats):
    def run():
        for t in inputs.values():
            t.grad = None
        scan(**inputs, delta_softplus=True).sum().backward()
    return timed(run, repeats)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ratio(ref: float | None, ours: float) -> str:
    return "-" if ref is None else f"{ref / ours:.0f}x"


def scaling(shape, repeats: int) -> str:
    """time(4096) / time(512) for both layouts, forward and forward+backward; the two lengths are timed in
    alternation so that a change of machine load hits both."""
    parts = []
    for channels_last in (False, True):
        times = {length: ([], []) for length in (512, 4096)}
        inputs = {length: make_inputs(*shape[:2], shape[2], length, channels_last=channels_last)
                  for length in times}
        for length in times:  # warm-up
            forward_backward_time(ssm.selective_scan, inputs[length], 1)
        for _ in range(repeats):
            for length, (fwd, fb) in times.items():
                fwd.append(forward_time(ssm.selective_scan, inputs[length], 1))
                fb.append(forward_backward_time(ssm.selective_scan, inputs[length], 1))
        fwd_ratio, fb_ratio = (statistics.median(times[4096][i]) / statistics.median(times[512][i]) for i in (0, 1))
        parts.append(f"{'(b,L,d)' if channels_last else '(b,d,L)'} forward {fwd_ratio:.2f}, "
                     f"forward+backward {fb_ratio:.2f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-inner", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the oracle's backward (minutes at L=1024)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.batch, args.d_inner, args.d_state)

    impl = ssm._implementation()
    print(f"selective scan, batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, float32, "
          f"with D/z/delta_bias/softplus; CPU implementation: {impl.name}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("ours: (b, d, L) inputs like the oracle's; ours (b,L,d): the same numbers stored as (b, L, d), the "
          "layout our Mamba layer passes (no transposes)\n")
    print("| device | L | ours fwd | ours (b,L,d) fwd | oracle fwd | fwd speed-up | ours fwd+bwd | "
          "ours (b,L,d) fwd+bwd | oracle fwd+bwd | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in (196, 1024, 4096):
        inputs = make_inputs(*shape[:2], shape[2], length)
        channels_last = make_inputs(*shape[:2], shape[2], length, channels_last=True)
        ours_fwd = forward_time(ssm.selective_scan, inputs, args.repeats)
        ours_fb = forward_backward_time(ssm.selective_scan, inputs, args.repeats)
        last_fwd = forward_time(ssm.selective_scan, channels_last, args.repeats)
        last_fb = forward_backward_time(ssm.selective_scan, channels_last, args.repeats)
        ref_fwd = forward_time(selective_scan_ref, inputs, 1 if length > 196 else 3)
        # The oracle's autograd backward grows quadratically (it keeps every step's graph): ~1.5 minutes at
        # L=1024 on 2 cores, tens of minutes at L=4096. Timed once at 1024, left out at 4096.
        slow = length >= 4096 or (args.quick and length > 196)
        ref_fb = None if slow else forward_backward_time(selective_scan_ref, inputs, 1)
        print(f"| cpu | {length} | {fmt(ours_fwd)} | {fmt(last_fwd)} | {fmt(ref_fwd)} | {ratio(ref_fwd, ours_fwd)} | "
              f"{fmt(ours_fb)} | {fmt(last_fb)} | {fmt(ref_fb)} | {ratio(ref_fb, ours_fb)} |", flush=True)
    print("oracle fwd+bwd at L=4096: not run (its backward is quadratic in L: tens of minutes)")
    print(f"\nlength scaling, ours, time(L=4096) / time(L=512) (linear = 8.0), medians of {args.repeats} "
          "interleaved runs:")
    print(f"  default allocator: {scaling(shape, args.repeats)}")
    if reuse_freed_memory():
        print(f"  glibc reusing freed memory: {scaling(shape, args.repeats)}")
        print("  (by default glibc maps every block >= 32 MB afresh, and the (8, 256, 4096) tensors are 32 MB: their\n"
              "  first-touch page faults are the part of the time that grows faster than L)")

    if ssm.mamba_ssm_available():
        print("\n| device | L | mamba_ssm fwd | oracle fwd | fwd speed-up | mamba_ssm fwd+bwd | oracle fwd+bwd | "
              "fwd+bwd speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for length in (196, 1024, 4096):
            inputs = make_inputs(*shape[:2], shape[2], length, device="cuda")
            fwd = forward_time(ssm.selective_scan, inputs, args.repeats)
            fb = forward_backward_time(ssm.selective_scan, inputs, args.repeats)
            ref_fwd = forward_time(selective_scan_ref, inputs, 3)
            ref_fb = forward_backward_time(selective_scan_ref, inputs, 1) if length <= 1024 else None
            print(f"| {torch.cuda.get_device_name()} | {length} | {fmt(fwd)} | {fmt(ref_fwd)} | "
                  f"{ratio(ref_fwd, fwd)} | {fmt(fb)} | {fmt(ref_fb)} | {ratio(ref_fb, fb)} |", flush=True)
    else:
        print("\nno GPU rows: CUDA with mamba_ssm's kernels is not available here")


if __name__ == "__main__":
    main()
