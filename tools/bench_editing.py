"""Measure the joins of continue, bridge and regenerate-range on real takes used as context.

    python tools/bench_editing.py --data .data/merged [--checkpoint DIR] [--takes 8] [--steps 50] [--plot PNG]

Takes are the test split's clips of at least 8 s (real mocap from ../shared/data, prepared; the model never
trained on them), as world-space root translation and local rotations. For each take:
- continue: its first 4 s, then 3 s more for its own caption;
- bridge: its first 3 s and the next take's last 3 s, placed to start 1.5 m ahead of the first's end and facing
  its way, joined by 2 s of the first take's caption;
- regenerate: its frames 4-6 s regenerated for its caption, the rest kept.
At each join between a kept frame and a generated one, per joint: the position jump (the step across the join
minus the mean of the steps either side: ~0 for smooth motion, the size of any jump) and the velocity jump (the
change of velocity across the join, m/s), the worst joint. Beside each, the same at the same frame of the real
take the kept frames come from (what the recorded motion does there: the measure reads two kept frames, so a
jerk in the take shows in both), and the join's excess over it (the gap the join adds). Last, the same numbers
at every frame of the real takes, and the largest change to a kept frame (0: kept exactly). ``--plot`` draws
every bridge's root and wrist speeds over time, the generated range shaded: a join that jumps shows as a spike.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backend.data.dataset import MotionDataset
from backend.editing import rotate, yaw, yaw_quat
from backend.motion import features_to_rotations, forward_kinematics
from backend.pipeline import Motion, MotionPipeline
from backend.quaternion import qmul
from backend.skeleton import SMPL22


def jumps(positions: np.ndarray, k: int, fps: float) -> tuple[float, float]:
    """(position jump m, velocity jump m/s) of the worst joint across the join between frames k-1 and k (needs
    frames k-2 .. k+1)."""
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


def plot_bridges(bridges: list[tuple[str, Motion]], start: int, stop: int, path: str) -> None:
    """Root and wrist speeds (m/s) of each bridge over time, its generated frames [start, stop) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joints = {"root": 0, "left wrist": SMPL22.joint_names.index("left_wrist"),
              "right wrist": SMPL22.joint_names.index("right_wrist")}
    fig, axes = plt.subplots(len(bridges), 1, figsize=(9, 1.9 * len(bridges)), sharex=True, squeeze=False)
    for ax, (name, motion) in zip(axes[:, 0], bridges):
        t = np.arange(1, motion.frames) / motion.fps
        for label, j in joints.items():
            ax.plot(t, np.linalg.norm(np.diff(motion.positions[:, j], axis=0), axis=-1) * motion.fps, label=label)
        ax.axvspan(start / motion.fps, stop / motion.fps, color="gold", alpha=0.25)
        ax.set_ylabel("m/s")
        ax.set_title(f"bridge from {name}", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds (shaded: generated)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--takes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--plot", help="write the bridges' speed plot to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = MotionPipeline.from_checkpoint(args.checkpoint, device="cpu")
    fps = pipe.fps
    test = MotionDataset(args.data, "test", unit=1)
    takes = [k for k in range(len(test)) if len(test.features[k]) >= 8 * fps][: args.takes]
    rows: dict[str, list[tuple[float, float, float, float]]] = {"continue": [], "bridge": [], "regenerate": []}
    reference, kept_change, bridges = [], 0.0, []

    def join(edited: Motion, at: int, real: np.ndarray, real_at: int) -> tuple[float, float, float, float]:
        return (*jumps(edited.positions, at, fps), *jumps(real, real_at, fps))

    for k in takes:
        features = test.features[k] * test.std + test.mean
        root, rot = features_to_rotations(features.astype(np.float64))
        prompt = test.captions[k][0]
        original = forward_kinematics(root, rot)
        reference += [jumps(original, t, fps) for t in range(2, len(original) - 1)]
        edited = pipe.edit(root, rot, 4 * fps, 6 * fps, prompt, steps=args.steps)
        rows["regenerate"] += [join(edited, 4 * fps, original, 4 * fps), join(edited, 6 * fps, original, 6 * fps)]
        kept = np.r_[0: 4 * fps, 6 * fps: len(root)]
        kept_change = max(kept_change, float(np.abs(edited.root_translation[kept] - root[kept]).max()),
                          float(np.abs(edited.rotations[kept] - rot[kept]).max()))
        cont = pipe.continue_motion(root[: 4 * fps], rot[: 4 * fps], 3.0, prompt, steps=args.steps)
        rows["continue"].append(join(cont, 4 * fps, original, 4 * fps))
        other = takes[(takes.index(k) + 1) % len(takes)]
        root_b, rot_b = features_to_rotations((test.features[other] * test.std + test.mean).astype(np.float64))
        second = ahead(root[3 * fps - 1], rot[3 * fps - 1, 0], root_b[-3 * fps:], rot_b[-3 * fps:], 1.5)
        bridged = pipe.bridge((root[: 3 * fps], rot[: 3 * fps]), second, 2.0, prompt, steps=args.steps)
        rows["bridge"] += [join(bridged, 3 * fps, original, 3 * fps),
                           join(bridged, 5 * fps, forward_kinematics(root_b, rot_b), len(root_b) - 3 * fps)]
        bridges.append((test.ids[k], bridged))
        print(f"{test.ids[k]}: {prompt!r}")
    ref = np.array(reference)
    print(f"\n{len(takes)} real test takes (>= 8 s), {args.steps} {pipe.sampler(args.steps)} steps, "
          f"model {pipe.describe()['model']}")
    print("worst joint at each join; 'real there': the real take at the same frame; 'added': the join's excess "
          "over it\n| joins of | count | position jump: mean / max (cm) | real there: mean / max | added: mean / "
          "max | velocity jump: mean / max (m/s) | real there: mean / max | added: mean / max |\n"
          "|---|---|---|---|---|---|---|---|")

    def cells(values: np.ndarray, scale: float) -> str:
        return f"{scale * values.mean():.2f} / {scale * values.max():.2f}"

    for name, values in rows.items():
        v = np.array(values)
        print(f"| {name} | {len(v)} | {cells(v[:, 0], 100)} | {cells(v[:, 2], 100)} | "
              f"{cells(np.maximum(v[:, 0] - v[:, 2], 0), 100)} | {cells(v[:, 1], 1)} | {cells(v[:, 3], 1)} | "
              f"{cells(np.maximum(v[:, 1] - v[:, 3], 0), 1)} |")
    print(f"| every frame of the real takes | {len(ref)} | mean {100 * ref[:, 0].mean():.2f}, median "
          f"{100 * np.median(ref[:, 0]):.2f}, p95 {100 * np.percentile(ref[:, 0], 95):.2f} | | | mean "
          f"{ref[:, 1].mean():.2f}, median {np.median(ref[:, 1]):.2f}, p95 {np.percentile(ref[:, 1], 95):.2f} | | |")
    print(f"\nlargest change to a kept frame: {kept_change:.2e}")
    if args.plot:
        plot_bridges(bridges, 3 * fps, 5 * fps, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
