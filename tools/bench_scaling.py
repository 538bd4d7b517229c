"""Generation time and peak memory vs motion length: the Motion Mamba denoiser against the MLD-style transformer.

    .venv/bin/python tools/bench_scaling.py                 # 10 s .. 300 s, CPU (and CUDA when present)
    .venv/bin/python tools/bench_scaling.py --quick         # a smoke run: 10, 20, 40 s, 2 steps, no files

Both models run at their default sizes (configs/default.json, configs/mld_transformer.json: the same VAE and a
matched denoiser parameter budget) with random weights: the cost of a forward pass does not depend on the
weight values. One sample, classifier-free guidance 2.5 (so the denoiser sees a batch of 2), the same number of
DDIM steps for both. Every (model, length, device) point runs in a fresh subprocess: load, one warm-up
generation of 1 s, then the timed generation (DDIM denoising, then the VAE decode), 3 to 5 times, the least
kept. Time on the CPU is the process CPU time (one torch thread by default: on a shared machine wall time
mostly measures the neighbours); on CUDA, wall time after synchronising.

Peak memory: CUDA, ``torch.cuda.max_memory_allocated`` during the timed run minus the allocation before it;
CPU, the peak resident set size sampled every 2 ms from /proc/self/statm by a thread during the first timed run,
minus the resident size just before it (tracemalloc cannot see torch's allocations; ``ru_maxrss`` cannot see
a peak below the one model loading left behind).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = {"motion_mamba": "default", "mld_transformer": "mld_transformer"}
LENGTHS = [10, 20, 40, 80, 160, 300]
PROMPT = "a person walks forward, then turns around and runs back"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: peak resident set size above the starting one, sampled by a thread."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self.start = period, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def measure_point(
    config: str, seconds: float, steps: int, device: str, min_time: float, min_runs: int, threads: int
) -> dict:
    """Time and peak memory of one generation of ``seconds`` seconds (run inside the child process)."""
    import torch

    torch.set_num_threads(threads)

    from backend.models.vae import DOWNSAMPLE
    from backend.pipeline import MotionPipeline

    pipe = MotionPipeline.random(config, device=device)
    pipe.max_seconds = max(pipe.max_seconds, seconds)
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def generate(secs: float) -> dict:
        tokens = -(-round(secs * pipe.fps) // DOWNSAMPLE)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        z = pipe._latents([PROMPT], [0], tokens, 2.5, steps, None, None)
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            pipe.vae.decode(z)
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        # CPU: process CPU seconds (what a run costs, whatever else the shared machine runs); CUDA: wall seconds
        total = c2 - c0 if dev.type == "cpu" else t2 - t0
        return {"denoise_wall_s": t1 - t0, "decode_wall_s": t2 - t1, "wall_s": t2 - t0, "total_s": total}

    generate(1.0)  # warm-up: small, so that its freed heap cannot hide a short run's memory
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        runs = [generate(seconds)]
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        with PeakRSS() as rss:
            runs = [generate(seconds)]
        peak = rss.increase
    while len(runs) < min_runs or (sum(r["wall_s"] for r in runs) < min_time and len(runs) < 5):
        runs.append(generate(seconds))
    best = min(runs, key=lambda r: r["total_s"])
    return {
        "model": config,
        "arch": pipe.config["denoiser"]["arch"],
        "seconds": seconds,
        "device": device,
        "steps": steps,
        "latent_tokens": -(-round(seconds * pipe.fps) // DOWNSAMPLE),
        "denoiser_params": pipe.describe()["params"]["denoiser"],
        **best,
        "peak_mem_mb": peak / 2**20,
        "runs": len(runs),
        "threads": torch.get_num_threads(),
    }


def run_point(
    config: str, seconds: float, steps: int, device: str, min_time: float, min_runs: int, threads: int, timeout: float
) -> dict:
    """``measure_point`` in a fresh interpreter (a clean heap per point); an error or timeout is recorded."""
    cmd = [
        sys.executable,
        __file__,
        "--point",
        config,
        str(seconds),
        "--steps",
        str(steps),
        "--device",
        device,
        "--min-time",
        str(min_time),
        "--min-runs",
        str(min_runs),
        "--threads",
        str(threads),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": config, "seconds": seconds, "device": device, "error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {
            "model": config,
            "seconds": seconds,
            "device": device,
            "error": (out.stderr.strip().splitlines() or ["failed"])[-1],
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(points: list[dict], key: str) -> float | None:
    """Log-log slope between the two longest measured lengths (1 = linear, 2 = quadratic)."""
    import math

    ok = [p for p in points if "error" not in p and p[key] > 0]
    if len(ok) < 2:
        return None
    a, b = ok[-2], ok[-1]
    return math.log(b[key] / a[key]) / math.log(b["seconds"] / a["seconds"])


def markdown(results: list[dict], steps: int) -> str:
    lines = [
        f"Generation of one sample: classifier-free guidance 2.5 (the denoiser sees a batch of 2), {steps} DDIM "
        "steps, then the VAE decode; random weights (cost does not depend on weight values); the default-size "
        "models of configs/default.json and configs/mld_transformer.json (same VAE, denoisers of matched size). "
        "Time: on the CPU, the process CPU seconds of the run (robust to other load on a shared machine; one torch "
        "thread by default), on CUDA wall seconds; the least of 3 to 5 runs, after a 1 s warm-up, each point "
        "in a fresh process. Peak memory: CUDA, torch.cuda.max_memory_allocated minus the allocation before "
        "the run; CPU, peak resident set size sampled every 2 ms from /proc/self/statm during the run minus "
        "the resident size before it (activations and workspace; the weights are loaded before).",
        "",
    ]
    for device in dict.fromkeys(r["device"] for r in results):
        rows = [r for r in results if r["device"] == device]
        by_model = {m: [r for r in rows if r["model"] == m] for m in dict.fromkeys(r["model"] for r in rows)}
        ok = [r for r in rows if "error" not in r]
        threads = f", {ok[0]['threads']} threads" if ok and device == "cpu" else ""
        lines += [
            f"### {device}{threads}",
            "",
            "| length (s) | latent tokens | "
            + " | ".join(f"{m} time (s) | {m} peak mem (MiB)" for m in by_model)
            + " | time ratio (transformer / mamba) |",
            "|---|---|" + "---|---|" * len(by_model) + "---|",
        ]
        for seconds in sorted({r["seconds"] for r in rows}):
            cells, times = [], []
            tokens = "—"
            for pts in by_model.values():
                p = next((p for p in pts if p["seconds"] == seconds), None)
                if p is None or "error" in p:
                    cells += [p["error"] if p else "—", "—"]
                    times.append(None)
                else:
                    tokens = str(p["latent_tokens"])
                    cells += [f"{p['total_s']:.3f}", f"{p['peak_mem_mb']:.1f}"]
                    times.append(p["total_s"])
            ratio = f"{times[-1] / times[0]:.2f}" if len(times) == 2 and None not in times else "—"
            lines.append(f"| {seconds:g} | {tokens} | " + " | ".join(cells) + f" | {ratio} |")
        lines.append("")
        for m, pts in by_model.items():
            params = next((p["denoiser_params"] for p in pts if "error" not in p), None)
            st, sm = slope(pts, "total_s"), slope(pts, "peak_mem_mb")
            lines.append(
                f"- {m}: denoiser {params:,} parameters; log-log slope over the two longest lengths: "
                f"time {'—' if st is None else f'{st:.2f}'}, memory {'—' if sm is None else f'{sm:.2f}'}"
                if params
                else f"- {m}: no successful point"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "total_s", "generation time (s; CPU: process CPU time)"),
        (axes[1], "peak_mem_mb", "peak memory (MiB)"),
    ):
        anchor = None
        for (model, device), style in zip(
            sorted({(r["model"], r["device"]) for r in results}), ("o-", "s-", "o--", "s--")
        ):
            pts = [
                r for r in results if r["model"] == model and r["device"] == device and "error" not in r and r[key] > 0
            ]
            if pts:
                ax.loglog([p["seconds"] for p in pts], [p[key] for p in pts], style, label=f"{model} ({device})")
                anchor = anchor or (pts[0]["seconds"], pts[0][key])
        if anchor:
            xs = [anchor[0], max(r["seconds"] for r in results)]
            for power, ls in ((1, ":"), (2, "-.")):
                ax.loglog(
                    xs,
                    [anchor[1] * (x / anchor[0]) ** power for x in xs],
                    ls,
                    color="gray",
                    label="linear" if power == 1 else "quadratic",
                )
        ax.set_xlabel("motion length (s)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Motion Mamba vs MLD-style transformer: cost vs motion length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 10, 20, 40 s, 2 steps, nothing written")
    p.add_argument("--lengths", type=float, nargs="+", default=LENGTHS, help="motion lengths in seconds")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (the same for both models)")
    p.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    p.add_argument("--min-time", type=float, default=2.0, help="repeat a point until it took this many seconds")
    p.add_argument("--min-runs", type=int, default=3, help="timed runs per point at least (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per point before giving up on it")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling", help="writes OUT.md, OUT.png, OUT.json")
    p.add_argument("--point", nargs=2, metavar=("CONFIG", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        print(
            json.dumps(
                measure_point(
                    args.point[0],
                    float(args.point[1]),
                    args.steps,
                    args.device[0],
                    args.min_time,
                    args.min_runs,
                    args.threads,
                )
            )
        )
        return []
    import torch

    if args.quick:
        args.lengths, args.steps, args.min_time, args.min_runs = [10, 20, 40], 2, 0.0, 1
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for device in devices:
        for model, config in MODELS.items():
            for seconds in args.lengths:
                r = run_point(
                    config, seconds, args.steps, device, args.min_time, args.min_runs, args.threads, args.timeout
                )
                results.append(r | {"model": model})
                print(
                    f"{device} {model:16s} {seconds:6g} s: "
                    + (
                        r["error"]
                        if "error" in r
                        else f"{r['total_s']:8.3f} s (wall {r['wall_s']:.3f}: denoise {r['denoise_wall_s']:.3f}, "
                        f"decode {r['decode_wall_s']:.3f}), peak {r['peak_mem_mb']:8.1f} MiB"
                    ),
                    flush=True,
                )
    table = markdown(results, args.steps)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("# Cost vs motion length\n\n![scaling](scaling.png)\n\n" + table)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.md')}, .png, .json")
    return results


if __name__ == "__main__":
    main()
