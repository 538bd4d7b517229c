"""Render the model card's preview set and measure what each motion does.

    python tools/make_previews.py [--checkpoint backend/weights/default] [--out docs/previews]

The Bandai actions (eight prompts, most of them paraphrases never seen in training, plus a 60-second walk) and
the verbs more-mocap added (jump, squat, lie down, cartwheel, salsa), each generated with seed 0 and the
pipeline's defaults, written as PNG contact sheets; ``measurements.md`` beside them gives the numbers that tell
whether the motion does what was asked (distance walked, hand and foot heights, how far the body bends, how low
the pelvis and head go, how long both feet are off the ground), so a reader can check the model card's verdicts
without opening Blender.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from backend.pipeline import Motion, MotionPipeline
from backend.preview import render_preview
from backend.skeleton import SMPL22

PROMPTS: list[tuple[str, float]] = [
    ("a tired old man shuffles forward", 6.0),
    ("someone happily waves with their left hand", 6.0),
    ("a person runs forward", 6.0),
    ("a proud man walks ahead", 6.0),
    ("someone bows politely", 6.0),
    ("a person kicks with the right leg", 6.0),
    ("an exhausted person walks slowly", 6.0),
    ("a person raises both hands", 6.0),
    ("a person walks forward", 60.0),
    ("a person jumps up and down twice", 4.0),
    ("someone squats down low, then stands up", 6.0),
    ("a person lies down on the ground", 8.0),
    ("someone does a cartwheel to the side", 4.0),
    ("someone dances a few salsa steps", 6.0),
]
AIRBORNE_M = 0.10  # both feet higher than this above the floor: off the ground (feet rest at ~0.05 m)
JOINT = {name: i for i, name in enumerate(SMPL22.joint_names)}
COLUMNS = ("seconds", "path (m)", "net (m)", "L wrist max (m)", "R wrist max (m)", "L foot max (m)",
           "R foot max (m)", "max bend (deg)", "pelvis min (m)", "head min (m)", "airborne (s)")


def measure(motion: Motion) -> dict[str, float]:
    """Numbers that tell the action apart: travel, hand and foot heights (Y up, metres), the trunk's bend from
    vertical (over 90: upside down), the lowest pelvis and head, and the time both feet are off the ground."""
    p = motion.positions
    root = p[:, JOINT["pelvis"], [0, 2]]
    trunk = p[:, JOINT["head"]] - p[:, JOINT["pelvis"]]
    bend = np.degrees(np.arccos(np.clip(trunk[:, 1] / np.linalg.norm(trunk, axis=-1), -1.0, 1.0)))
    return {
        "seconds": motion.seconds,
        "path (m)": float(np.linalg.norm(np.diff(root, axis=0), axis=-1).sum()),
        "net (m)": float(np.linalg.norm(root[-1] - root[0])),
        "L wrist max (m)": float(p[:, JOINT["left_wrist"], 1].max()),
        "R wrist max (m)": float(p[:, JOINT["right_wrist"], 1].max()),
        "L foot max (m)": float(p[:, JOINT["left_foot"], 1].max()),
        "R foot max (m)": float(p[:, JOINT["right_foot"], 1].max()),
        "max bend (deg)": float(bend.max()),
        "pelvis min (m)": float(p[:, JOINT["pelvis"], 1].min()),
        "head min (m)": float(p[:, JOINT["head"], 1].min()),
        "airborne (s)": float((p[:, [JOINT["left_foot"], JOINT["right_foot"]], 1].min(axis=1) > AIRBORNE_M).sum()
                              / motion.fps),
    }


def file_name(index: int, prompt: str, seconds: float) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
    return f"{index}_{slug}_{seconds:g}s.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="generation checkpoint (default: the shipped one)")
    parser.add_argument("--out", default="docs/previews", help="folder for the PNGs and measurements.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50,
                        help="denoising steps (up to the checkpoint's fast_steps: its fast sampler; more: DDIM)")
    parser.add_argument("--first", type=int, default=len(PROMPTS), help="only the first N prompts (a quick look)")
    args = parser.parse_args(argv)
    prompts = PROMPTS[: max(args.first, 0)]
    if not prompts:
        parser.error("--first must be at least 1")

    pipe = MotionPipeline.from_checkpoint(args.checkpoint, device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Previews of `{pipe.describe()['model']}`",
        "",
        f"`python tools/make_previews.py --steps {args.steps}` (seed {args.seed}, {args.steps}"
        f" {pipe.sampler(args.steps)} steps, default guidance). Heights are"
        " metres above the floor (the canonical skeleton is 1.7 m tall; wrists hang at ~0.85 m, feet rest at ~0.05"
        " m); bend is the pelvis-to-head line's angle from vertical.",
        "",
        "| prompt | file | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for i, (prompt, seconds) in enumerate(prompts):
        start = time.perf_counter()
        motion = pipe(prompt, seconds=seconds, seed=args.seed, steps=args.steps)
        took = time.perf_counter() - start
        name = file_name(i, prompt, seconds)
        render_preview(motion.positions, out / name, title=prompt, fps=motion.fps)
        m = measure(motion)
        lines.append(f"| {prompt} | [{name}]({name}) | " + " | ".join(f"{m[c]:.2f}" for c in COLUMNS) + " |")
        summary = ", ".join(f"{c} {m[c]:.2f}" for c in COLUMNS)
        print(f"{prompt!r} ({seconds:g} s): generated in {took:.2f} s; {summary}")
    (out / "measurements.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(prompts)} previews and measurements.md to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
