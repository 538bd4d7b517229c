"""Benchmark prompt timelines against naive concatenation: seams, per-segment text match, and cost.

    python tools/bench_timeline.py --data .data/merged [--checkpoint DIR] [--evaluator DIR] [--timelines 8]

Timelines are made of the test split's captions (``--rows`` rows of 3-5 s each, seeded). Each is generated two
ways with the same seed and steps: as one timeline (``MotionPipeline.timeline``: blended windows at every
denoising step) and as separate single-prompt motions of the rows' lengths, concatenated (the naive way: the
features joined, the root path integrated across). Printed, measured in this one run:

- transition jerk: per boundary, the peak and mean of the per-frame jerk (``backend.metrics.jerk_per_frame``)
  over +-0.5 s around it, against the same over +-0.5 s around each segment's middle (within-segment) of the
  same motions; and concatenation's transition jerk over the timeline's;
- per-segment R-precision with the evaluator: each row's frames against its caption, batches of 32, for the
  timeline and for the single-prompt motions (the same prompts and lengths generated alone);
- time: a 5-minute, 20-row timeline against one 10 s motion (same steps, one CPU thread), and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from addon.timeline import TimelineRow
from backend import metrics
from backend.data.dataset import MotionDataset
from backend.evaluate import embed_motions, embed_texts
from backend.models.evaluator import load_evaluator
from backend.motion import features_to_positions
from backend.pipeline import TIMELINE_BLEND_S, MotionPipeline, collect

WINDOW_S = 0.5  # seconds each side of a boundary that count as the transition


def make_timelines(captions: list[str], count: int, rows: int, seed: int) -> list[tuple[TimelineRow, ...]]:
    """``count`` timelines of ``rows`` distinct captions each, rows 3-5 s long (whole tenths), seeded."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(captions), size=count * rows, replace=False)
    out = []
    for k in range(count):
        start, timeline = 0.0, []
        for j in range(rows):
            length = round(float(rng.uniform(3.0, 5.0)), 1)
            timeline.append(TimelineRow(start, round(start + length, 1), captions[picked[k * rows + j]]))
            start = round(start + length, 1)
        out.append(tuple(timeline))
    return out


def seam_jerk(positions: np.ndarray, fps: int, boundaries: list[int], middles: list[int]) -> tuple[list, list]:
    """(peaks, means) of the per-frame jerk over +-``WINDOW_S`` around each of ``boundaries``, then the same
    around each of ``middles``: ([boundary peaks], [boundary means]), ([middle peaks], [middle means])."""
    per_frame = metrics.jerk_per_frame(positions, fps)  # step t covers frames t..t+3: centred at t + 1.5
    centre = np.arange(len(per_frame)) + 1.5

    def around(frames: list[int]) -> tuple[list, list]:
        near = [np.abs(centre - f) <= WINDOW_S * fps for f in frames]
        return [float(per_frame[m].max()) for m in near], [float(per_frame[m].mean()) for m in near]

    return around(boundaries), around(middles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prepared dataset (its test captions make the timelines)")
    parser.add_argument("--checkpoint", default=None, help="generation checkpoint (default: the shipped one)")
    parser.add_argument("--evaluator", default="backend/weights/evaluator")
    parser.add_argument("--timelines", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-long", action="store_true", help="skip the 5-minute timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = MotionPipeline.from_checkpoint(args.checkpoint, device="cpu")
    fps = pipe.fps
    test = MotionDataset(args.data, "test", unit=4)
    captions = list(dict.fromkeys(caps[0] for caps in test.captions))
    timelines = make_timelines(captions, args.timelines, args.rows, args.seed)

    rows_out = {"timeline": [], "concatenated": []}
    segments: dict[str, list[np.ndarray]] = {"timeline": [], "single prompt": []}
    texts: list[str] = []
    for k, rows in enumerate(timelines):
        seed = args.seed + k
        motion = collect(pipe.timeline(rows, seed=seed, steps=args.steps))[0]
        singles = [pipe(r.prompt, seconds=r.end - r.start, seed=seed, steps=args.steps) for r in rows]
        joined = np.concatenate([m.features for m in singles])
        starts = np.concatenate([[0], np.cumsum([m.frames for m in singles])])
        middles = ((starts[:-1] + starts[1:]) / 2).round().astype(int).tolist()
        rows_out["timeline"].append(seam_jerk(motion.positions, fps, list(starts[1:-1]), middles))
        rows_out["concatenated"].append(seam_jerk(features_to_positions(joined), fps, list(starts[1:-1]), middles))
        for r, single in zip(rows, singles):
            segments["timeline"].append(motion.features[round(r.start * fps): round(r.end * fps)])
            segments["single prompt"].append(single.features)
            texts.append(r.prompt)
        print(f"timeline {k + 1}/{len(timelines)}: {' | '.join(r.prompt[:30] for r in rows)}")

    print(f"\n{len(timelines)} timelines x {args.rows} rows (3-5 s each, test captions), {args.steps} "
          f"{pipe.sampler(args.steps)} steps, blend {TIMELINE_BLEND_S:g} s; transition = +-{WINDOW_S:g} s around each "
          f"boundary, within-segment = +-{WINDOW_S:g} s around each segment's middle (m/s^3, means over the "
          f"boundaries / middles)\n")
    print("| method | transition peak | within peak | peak ratio | transition mean | within mean | mean ratio |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name, values in rows_out.items():
        (tpeak, tmean), (wpeak, wmean) = ([np.mean(np.concatenate([v[side][k] for v in values])) for k in (0, 1)]
                                          for side in (0, 1))
        summary[name] = (tpeak, tmean)
        print(f"| {name} | {tpeak:.1f} | {wpeak:.1f} | {tpeak / wpeak:.2f} | {tmean:.1f} | {wmean:.1f} | "
              f"{tmean / wmean:.2f} |")
    (tp, tm), (cp, cm) = summary["timeline"], summary["concatenated"]
    print(f"\nconcatenation / timeline transition jerk: peak {cp / tp:.2f}x, mean {cm / tm:.2f}x")

    evaluator = load_evaluator(args.evaluator, "cpu")
    text_emb = embed_texts(evaluator, texts)
    rng_seed = args.seed
    print("\n| segments of | R@1 | R@2 | R@3 |\n|---|---|---|---|")
    for name, motions in segments.items():
        r = metrics.r_precision(text_emb, embed_motions(evaluator, motions), rng=np.random.default_rng(rng_seed))
        print(f"| {name} ({len(motions)} segments) | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} |")

    if not args.skip_long:
        long_rows = [TimelineRow(15.0 * k, 15.0 * (k + 1), texts[k % len(texts)]) for k in range(20)]
        t0 = time.perf_counter()
        pipe("a person walks forward", seconds=10.0, steps=args.steps)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        collect(pipe.timeline(long_rows, steps=args.steps))
        whole = time.perf_counter() - t0
        print(f"\n5-minute timeline (20 rows of 15 s): {whole:.2f} s; one 10 s motion: {one:.2f} s; "
              f"ratio {whole / one:.1f}x (target <= 30x); one CPU thread, {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
