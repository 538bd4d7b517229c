"""Stick-figure previews of joint positions: a .gif animation or a .png contact sheet (matplotlib, Agg).

Used for data (``python -m backend.data preview``) and for generated motion. The camera looks at the figure's
front-left from slightly above and follows the root, so a walk stays in frame; the floor grid moves under it and
the root's path is drawn on the floor. The character's left side is blue, its right side red, the spine black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.skeleton import SMPL22, Skeleton

LEFT, RIGHT, CENTRE = "#1f5fbf", "#d0342c", "#222222"
SHEET_FRAMES = 8
GIF_MAX_FRAMES = 200


def _chain_colours(skeleton: Skeleton) -> list[str]:
    colours = []
    for chain in skeleton.kinematic_chains:
        names = " ".join(skeleton.joint_names[j] for j in chain[1:])
        colours.append(LEFT if "left" in names else RIGHT if "right" in names else CENTRE)
    return colours


def _to_plot(p: np.ndarray) -> np.ndarray:
    """Data (x, y, z) with Y up -> matplotlib (z, x, y) with its Z up: a rotation, so left stays left."""
    return p[..., [2, 0, 1]]


class _Figure:
    """The artists of one stick figure on a 3D axes, created once and moved frame by frame."""

    GRID_STEP = 0.5

    def __init__(self, ax, skeleton: Skeleton, path: np.ndarray, radius: float) -> None:
        self.ax, self.skeleton, self.path, self.radius = ax, skeleton, path, radius
        n_grid = int(np.ceil(2 * radius / self.GRID_STEP)) + 2
        self.grid = [ax.plot([], [], [], color="#cccccc", lw=0.6)[0] for _ in range(2 * n_grid)]
        self.trail = ax.plot([], [], [], color="#e69f00", lw=1.2)[0]
        self.bones = [
            ax.plot([], [], [], color=colour, lw=2.2, solid_capstyle="round")[0]
            for colour in _chain_colours(skeleton)
        ]
        self.label = ax.text2D(0.03, 0.93, "", transform=ax.transAxes, fontsize=7)

    def show(self, frame: np.ndarray, label: str) -> list:
        """Pose the figure (J, 3 in plot coordinates), centring the camera on its root."""
        r, step = self.radius, self.GRID_STEP
        cx, cy = frame[0, 0], frame[0, 1]
        self.ax.set_xlim(cx - r, cx + r)
        self.ax.set_ylim(cy - r, cy + r)
        self.ax.set_zlim(0, 2 * r)
        xs = np.arange(np.ceil((cx - r) / step) * step, cx + r, step)
        ys = np.arange(np.ceil((cy - r) / step) * step, cy + r, step)
        segments = [([g, g], [cy - r, cy + r]) for g in xs] + [([cx - r, cx + r], [g, g]) for g in ys]
        for k, line in enumerate(self.grid):
            a, b = segments[k] if k < len(segments) else ([], [])
            line.set_data_3d(a, b, np.zeros(len(a)))
        inside = (np.abs(self.path[:, 0] - cx) < r) & (np.abs(self.path[:, 1] - cy) < r)
        self.trail.set_data_3d(self.path[inside, 0], self.path[inside, 1], np.zeros(inside.sum()))
        for chain, line in zip(self.skeleton.kinematic_chains, self.bones):
            pts = frame[list(chain)]
            line.set_data_3d(pts[:, 0], pts[:, 1], pts[:, 2])
        self.label.set_text(label)
        return [*self.grid, self.trail, *self.bones, self.label]


def _setup_axes(ax) -> None:
    ax.view_init(elev=12, azim=-35)
    ax.set_box_aspect((1, 1, 1), zoom=1.45)
    ax.set_axis_off()


def render_preview(
    positions: np.ndarray,
    out: str | Path,
    skeleton: Skeleton = SMPL22,
    title: str = "",
    fps: float = 20.0,
) -> Path:
    """Draw joint positions (T, J, 3) (metres, Y up) to ``out``: .png = contact sheet of 8 frames spread over the
    clip, .gif = animation (at most 200 frames, subsampled evenly beyond that). Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (skeleton.num_joints, 3) or p.shape[0] < 1:
        raise ValueError(f"positions must have shape (T, {skeleton.num_joints}, 3) with T >= 1, got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("positions contain NaN or infinite values")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".gif"):
        raise ValueError(f"{out}: the preview must be a .png (contact sheet) or a .gif (animation)")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist")

    q = _to_plot(p)
    q[..., 2] -= q[..., 2].min()  # stand on the floor
    path = q[:, 0, :2]
    radius = max(0.9, float(q[..., 2].max()) * 0.55)

    if suffix == ".png":
        frames = np.unique(np.linspace(0, len(q) - 1, SHEET_FRAMES).round().astype(int))
        fig = plt.figure(figsize=(1.7 * len(frames), 2.6), dpi=90)
        for k, t in enumerate(frames):
            ax = fig.add_subplot(1, len(frames), k + 1, projection="3d")
            _setup_axes(ax)
            _Figure(ax, skeleton, path, radius).show(q[t], f"{t / fps:.1f} s")
        fig.suptitle(title, fontsize=9)
        fig.subplots_adjust(left=0, right=1, bottom=0, top=0.92, wspace=0)
        fig.savefig(out)
        plt.close(fig)
        return out

    frames = np.unique(np.linspace(0, len(q) - 1, min(len(q), GIF_MAX_FRAMES)).round().astype(int))
    fig = plt.figure(figsize=(3.2, 3.4), dpi=80)
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    _setup_axes(ax)
    fig.suptitle(title, fontsize=8)
    figure = _Figure(ax, skeleton, path, radius)

    def update(t: int) -> list:
        return figure.show(q[t], f"{t / fps:.1f} s")

    interval = 1000.0 / fps * (len(q) / len(frames))
    FuncAnimation(fig, update, frames=frames, interval=interval, blit=False).save(
        out, writer=PillowWriter(fps=1000.0 / interval)
    )
    plt.close(fig)
    return out
