"""Generation time of one motion per sampler setting: ``python tools/bench_generate.py [--profile]``.

The whole of ``MotionPipeline.__call__`` (text encoding, denoising, VAE decoding, positions and rotations) for
one prompt of ``--seconds`` (10) on the shipped checkpoint (or ``--checkpoint DIR``, or random weights of
``--config NAME``), one torch thread by default. Rows: DDIM with classifier-free guidance at ``--ddim`` steps
(the teacher), and the consistency-distilled sampler at ``--fast`` steps when the checkpoint ships one. Times
are this process's CPU seconds, the best of ``--repeats`` (other load on a shared machine only ever adds
time); "new prompt" encodes a prompt never seen before, "same prompt" repeats one (its encoding is cached, as
when only the seed changes). Ratios are to the first row, measured in the same run.

``--profile`` adds where the time of a new prompt goes: text encoder, denoiser, VAE decode, the pose smoothing
and foot planting, positions and rotations, and the rest (DDIM arithmetic, Python glue), timed by wrapping those
calls of the pipeline in use. The wrapping names functions, not lines, so the script profiles older versions of
the pipeline too.

``--against OLD_CHECKOUT`` measures before/after: this script runs in fresh processes on the old checkout's code and
on this one's, alternating (old, new, old, new, ...) for ``--rounds`` rounds, and prints each row's best round of
either side and their ratio. A shared virtual machine's speed drifts by tens of percent between hours; alternating
in one run puts both sides on the same hours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import backend.pipeline as pipeline_module
from backend.pipeline import MotionPipeline

STAGES = ("text encoder", "denoiser", "VAE decode", "smooth + plant", "positions + rotations")
ROOT = Path(__file__).resolve().parents[1]


class StageClock:
    """Process CPU seconds spent in each stage, by wrapping the callables that make it (outermost call only,
    so a stage calling itself, e.g. a decode window calling the decode, counts once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: object, name: str, stage: str) -> None:
        original: Callable = getattr(owner, name)

        def timed(*args, **kwargs):
            self._depth[stage] += 1
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[stage] -= 1
                if self._depth[stage] == 0:
                    self.seconds[stage] += time.process_time() - start

        setattr(owner, name, timed)

    def attach(self, pipe: MotionPipeline) -> None:
        self.wrap(pipe.text_encoder, "forward", "text encoder")
        for model in (pipe.denoiser, getattr(pipe, "student", None)):
            if model is not None:
                self.wrap(model, "forward", "denoiser")
        for name in ("decode", "decode_window"):  # decode_window: before 2026-11-29 (windowed decoding)
            if hasattr(pipe.vae, name):
                self.wrap(pipe.vae, name, "VAE decode")
        for name in ("smooth_pose", "plant_feet"):  # absent before 2026-11-29: the stage reads 0
            if hasattr(pipeline_module, name):
                self.wrap(pipeline_module, name, "smooth + plant")
        # features_to_joints: from 2026-11-30 (positions computed once for both)
        for name in ("features_to_positions", "features_to_rotations", "features_to_joints"):
            if hasattr(pipeline_module, name):
                self.wrap(pipeline_module, name, "positions + rotations")


def measure(args: argparse.Namespace) -> dict:
    """Time every row in this process: {"header": str, "rows": [{"label", "new", "same", "stages"}]} (seconds;
    ``stages`` of the fastest new-prompt repeat, with its "total")."""
    if args.config:
        pipe = MotionPipeline.random(args.config)
    else:
        pipe = MotionPipeline.from_checkpoint(args.checkpoint, device="cpu")
    pipe.cpu_threads = args.threads
    info = pipe.describe()
    fast = getattr(pipe, "uses_student", None)
    rows = [(f"DDIM {n} step{'s' * (n != 1)}, guidance {args.guidance:g} (2 passes)", n) for n in args.ddim
            if fast is None or not fast(n)]
    rows += [(f"fast sampler {n} step{'s' * (n > 1)}", n) for n in args.fast if fast is not None and fast(n)]
    header = (f"model {info['model']} ({info['arch']}), cpu, torch threads {args.threads}, {args.seconds:g} s of "
              f"motion, best of {args.repeats}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    prompt = "a person walks forward, then waves with the right hand"
    pipe(prompt, seconds=2.0, steps=2)  # warm-up; also caches this prompt's encoding
    clock = StageClock()
    clock.attach(pipe)
    results = []
    for label, steps in rows:
        new, same, stages = [], [], []
        for r in range(args.repeats):
            clock.seconds.clear()
            start = time.process_time()
            pipe(f"{prompt}, take {steps}-{r}", seconds=args.seconds, seed=r, guidance=args.guidance, steps=steps)
            new.append(time.process_time() - start)
            stages.append({**clock.seconds, "total": new[-1]})
            start = time.process_time()
            pipe(prompt, seconds=args.seconds, seed=r, guidance=args.guidance, steps=steps)
            same.append(time.process_time() - start)
        results.append({"label": label, "new": min(new), "same": min(same),
                        "stages": min(stages, key=lambda s: s["total"])})
    return {"header": header, "rows": results}


def _print_profile(named_rows: list[tuple[str, dict]]) -> None:
    print(f"\nwhere the time of a new prompt goes (ms, the fastest repeat)\n"
          f"| sampler | {' | '.join(STAGES)} | other | total |\n|---|{'---|' * (len(STAGES) + 2)}")
    for label, stages in named_rows:
        other = stages["total"] - sum(stages.get(s, 0.0) for s in STAGES)
        cells = " | ".join(f"{1000 * stages.get(s, 0.0):.1f}" for s in STAGES)
        print(f"| {label} | {cells} | {1000 * other:.1f} | {1000 * stages['total']:.1f} |")


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The measuring options of this run, for a child process that runs in another folder."""
    argv = ["--seconds", str(args.seconds), "--ddim", *map(str, args.ddim), "--fast", *map(str, args.fast),
            "--guidance", str(args.guidance), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.checkpoint:
        argv += ["--checkpoint", str(Path(args.checkpoint).resolve())]
    if args.config:
        argv += ["--config", args.config]
    return argv


def compare(args: argparse.Namespace) -> None:
    """Before/after: this script on ``args.against``'s code and on this checkout's, alternating, in fresh
    processes; each row's best round per side, and their ratio."""
    trees = {"before": Path(args.against).resolve(), "now": ROOT}
    rounds: dict[str, list[dict]] = {side: [] for side in trees}
    for _ in range(args.rounds):
        for side, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, *_child_argv(args), "--json"], cwd=tree, text=True,
                                 capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)}, check=False)
            if out.returncode:
                raise SystemExit(f"bench_generate on {tree} failed:\n{out.stderr[-3000:]}")
            rounds[side].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def best(side: str, label: str) -> dict | None:
        rows = [row for run in rounds[side] for row in run["rows"] if row["label"] == label]
        if not rows:
            return None
        return {"new": min(r["new"] for r in rows), "same": min(r["same"] for r in rows),
                "stages": min((r["stages"] for r in rows), key=lambda st: st["total"])}

    labels = [row["label"] for row in rounds["now"][0]["rows"]]
    print(f"{rounds['now'][-1]['header']}\nbefore: {trees['before']}; now: {ROOT}; the best of {args.rounds} "
          f"alternating rounds each")
    print("| sampler | before: new prompt (ms) | now: new prompt (ms) | now / before | before: same prompt (ms) | "
          "now: same prompt (ms) |\n|---|---|---|---|---|---|")
    profile = []
    for label in labels:
        now, before = best("now", label), best("before", label)
        if before is None:
            print(f"| {label} | - | {1000 * now['new']:.1f} | - | - | {1000 * now['same']:.1f} |")
        else:
            print(f"| {label} | {1000 * before['new']:.1f} | {1000 * now['new']:.1f} | "
                  f"{now['new'] / before['new']:.3f} | {1000 * before['same']:.1f} | {1000 * now['same']:.1f} |")
            profile.append((f"before: {label}", before["stages"]))
        profile.append((f"now: {label}", now["stages"]))
    if args.profile:
        _print_profile(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="generation checkpoint folder (default: the shipped weights)")
    parser.add_argument("--config", help="random weights of this config instead of a checkpoint")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ddim", type=int, nargs="*", default=[50, 10, 4])
    parser.add_argument("--fast", type=int, nargs="*", default=[4, 2, 1])
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while generating")
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    parser.add_argument("--against", metavar="OLD_CHECKOUT", help="before/after against an older checkout's code")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of --against")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's rows, for --against
    args = parser.parse_args()

    if args.against:
        if not (Path(args.against) / "backend").is_dir() or args.rounds < 1:
            parser.error("--against needs a checkout of this project (a folder with backend/) and --rounds >= 1")
        compare(args)
        return
    measured = measure(args)
    if args.json:
        print(json.dumps(measured))
        return
    print(measured["header"])
    base = measured["rows"][0]["new"]
    print("| sampler | new prompt (ms) | same prompt (ms) | x first row |\n|---|---|---|---|")
    for row in measured["rows"]:
        print(f"| {row['label']} | {1000 * row['new']:.1f} | {1000 * row['same']:.1f} | {row['new'] / base:.3f} |")
    if args.profile:
        _print_profile([(row["label"], row["stages"]) for row in measured["rows"]])


if __name__ == "__main__":
    main()
