"""Benchmark generation time per prompt: ``python tools/bench_generate.py [--config default] [--steps 50]``.

Random weights of the given config (timing does not depend on training), batch of one prompt, classifier-
free guidance on (conditional + unconditional in one batch), the full path of ``MotionPipeline.__call__``:
text encoding, DDIM, windowed VAE decoding, features -> positions and rotations. Prints one row per duration
and the cost ratios to the 10 s row (linear cost means ratio ~ seconds / 10). The best of ``--repeats`` runs
is reported, since other processes on a shared machine only ever add time; "cpu s" is this process's CPU
time (what the run costs without contention, for a single thread).
"""

from __future__ import annotations

import argparse
import os
import time

from backend.pipeline import MotionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads while generating (the pipeline's cpu_threads, default 1)")
    args = parser.parse_args()

    pipe = MotionPipeline.random(args.config, device=args.device)
    pipe.cpu_threads = args.threads
    info = pipe.describe()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {info['model']} ({info['arch']}), device {info['device']}, torch threads "
          f"{pipe.cpu_threads}, params: vae {info['params']['vae']:,}, denoiser "
          f"{info['params']['denoiser']:,}, text encoder {info['params']['text_encoder']:,}")
    print(f"{args.steps} DDIM steps, guidance {args.guidance}, best of {args.repeats}; load average at start "
          f"{load:.2f} on {os.cpu_count()} cores")
    pipe("warm up", seconds=2.0, steps=2)
    prompt = "a person walks forward, then waves with the right hand"
    rows = []
    for seconds in args.seconds:
        times, cpu = [], []
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            motion = pipe(prompt, seconds=seconds, seed=r, guidance=args.guidance, steps=args.steps)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rows.append((seconds, motion.frames, min(times), sorted(times)[len(times) // 2], min(cpu)))
    base, base_cpu = rows[0][2], rows[0][4]
    print(f"{'seconds':>8} {'frames':>7} {'best s':>8} {'median s':>9} {'x first':>8} {'cpu s':>7} "
          f"{'cpu x first':>11}")
    for seconds, frames, best, median, cpu_s in rows:
        print(f"{seconds:8.0f} {frames:7d} {best:8.3f} {median:9.3f} {best / base:8.2f} {cpu_s:7.3f} "
              f"{cpu_s / base_cpu:11.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
