"""Measure the joins of continue, bridge and regenerate-range on real takes used as context.

    python tools/bench_editing.py --data .data/merged [--checkpoint DIR] [--takes 8] [--steps 50]

Takes are the test split's clips of at least 8 s (real mocap from ../shared/data, prepared; the model never
trained on them), as world-space root translation and local rotations. For each take:
- continue: its first 4 s, then 3 s more for its own caption;
- bridge: its first 3 s and the next take's last 3 s, placed to start 1.5 m ahead of the first's end and facing
  its way, joined by 2 s of the first take's caption;
- regenerate: its frames 4-6 s regenerated for its caption, the rest kept.
At each join between a kept frame and a generated one, per joint: the position jump (the step across the join
minus the mean of the steps either side: ~0 for smooth motion, the size of any jump) and the velocity jump (the
change of velocity across the join, m/s), the worst joint; beside them the same numbers at every frame of the
real takes (median and 95th percentile), and the largest change to a kept frame (0: kept exactly).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backend.data.dataset import MotionDataset
from backend.editing import rotate, yaw, yaw_quat
from backend.motion import features_to_rotations, forward_kinematics
from backend.pipeline import MotionPipeline
from backend.quaternion import qmul


def jumps(positions: np.ndarray, k: int, fps: float) -> tuple[float, float]:
    """(position jump m, velocity jump m/s) of the worst joint across the join between frames k-1 and k."""
    step = np.diff(positions, axis=0)  # step[t] = p[t+1] - p[t]
    position = np.linalg.norm(step[k - 1] - (step[k - 2] + step[k]) / 2, axis=-1).max()
    velocity = np.linalg.norm(step[k] - step[k - 2], axis=-1).max() * fps / 2
    return float(position), float(velocity)


def ahead(root_end: np.ndarray, heading: np.ndarray, root: np.ndarray, rot: np.ndarray,
          metres: float) -> tuple[np.ndarray, np.ndarray]:
    """A motion turned about +Y and moved so that it starts ``metres`` ahead of ``root_end``, facing the
    ``heading`` (a root rotation) faces."""
    turn = yaw_quat(yaw(heading) - yaw(rot[0, 0]))
    root = rotate(turn, root - root[:1] * [1, 0, 1])
    forward = rotate(yaw_quat(yaw(heading)), np.array([0.0, 0.0, 1.0]))
    root[:, [0, 2]] += root_end[[0, 2]] + metres * forward[[0, 2]]
    rot = rot.copy()
    rot[:, 0] = qmul(torch.as_tensor(turn).expand(len(rot), 4), torch.as_tensor(rot[:, 0])).numpy()
    return root, rot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--takes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = MotionPipeline.from_checkpoint(args.checkpoint, device="cpu")
    fps = pipe.fps
    test = MotionDataset(args.data, "test", unit=1)
    takes = [k for k in range(len(test)) if len(test.features[k]) >= 8 * fps][: args.takes]
    rows: dict[str, list[tuple[float, float]]] = {"continue": [], "bridge": [], "regenerate": []}
    reference, kept_change = [], 0.0
    for k in takes:
        features = test.features[k] * test.std + test.mean
        root, rot = features_to_rotations(features.astype(np.float64))
        prompt = test.captions[k][0]
        original = forward_kinematics(root, rot)
        reference += [jumps(original, t, fps) for t in range(2, len(original) - 1)]
        edited = pipe.edit(root, rot, 4 * fps, 6 * fps, prompt, steps=args.steps)
        rows["regenerate"] += [jumps(edited.positions, 4 * fps, fps), jumps(edited.positions, 6 * fps, fps)]
        kept = np.r_[0: 4 * fps, 6 * fps: len(root)]
        kept_change = max(kept_change, float(np.abs(edited.root_translation[kept] - root[kept]).max()),
                          float(np.abs(edited.rotations[kept] - rot[kept]).max()))
        cont = pipe.continue_motion(root[: 4 * fps], rot[: 4 * fps], 3.0, prompt, steps=args.steps)
        rows["continue"].append(jumps(cont.positions, 4 * fps, fps))
        other = takes[(takes.index(k) + 1) % len(takes)]
        root_b, rot_b = features_to_rotations((test.features[other] * test.std + test.mean).astype(np.float64))
        second = ahead(root[3 * fps - 1], rot[3 * fps - 1, 0], root_b[-3 * fps:], rot_b[-3 * fps:], 1.5)
        bridged = pipe.bridge((root[: 3 * fps], rot[: 3 * fps]), second, 2.0, prompt, steps=args.steps)
        rows["bridge"] += [jumps(bridged.positions, 3 * fps, fps), jumps(bridged.positions, 5 * fps, fps)]
        print(f"{test.ids[k]}: {prompt!r}")
    ref = np.array(reference)
    print(f"\n{len(takes)} real test takes (>= 8 s), {args.steps} DDIM steps, model {pipe.describe()['model']}")
    print("| joins of | count | position jump, worst joint: mean / max (cm) | velocity jump: mean / max (m/s) |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        v = np.array(values)
        print(f"| {name} | {len(v)} | {100 * v[:, 0].mean():.2f} / {100 * v[:, 0].max():.2f} | "
              f"{v[:, 1].mean():.2f} / {v[:, 1].max():.2f} |")
    print(f"| every frame of the real takes | {len(ref)} | mean {100 * ref[:, 0].mean():.2f}, median "
          f"{100 * np.median(ref[:, 0]):.2f}, p95 {100 * np.percentile(ref[:, 0], 95):.2f} | mean "
          f"{ref[:, 1].mean():.2f}, median {np.median(ref[:, 1]):.2f}, p95 {np.percentile(ref[:, 1], 95):.2f} |")
    print(f"\nlargest change to a kept frame: {kept_change:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
