"""Command line: ``python -m backend.data {prepare,prepare-bvh,preview} ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _prepare(args: argparse.Namespace) -> None:
    from backend.data.prepare import prepare

    start = time.perf_counter()
    sources = [args.source] if args.command == "prepare-bvh" else args.paths[:-1]
    out = args.out if args.command == "prepare-bvh" else args.paths[-1]
    if not sources:
        raise ValueError("give one or more sources, then the output folder")
    info = prepare(sources, out, labels=args.labels, joint_map=args.map, workers=args.workers, force=args.force)
    counts = info["counts"]
    print(f"prepared {counts['prepared']} of {counts['clip_files']} clips ({counts['failed']} failed, "
          f"{counts['skipped']} skipped) into {out} in {time.perf_counter() - start:.1f} s with "
          f"{info['workers']} worker(s)")
    print(f"{counts['frames']} frames at {info['fps']:g} fps ({counts['hours']} h); splits: "
          + ", ".join(f"{k} {v}" for k, v in counts["splits"].items()))
    print(f"held-out (content, style) pairs: {len(info['splits']['test_unseen_pairs'])}; "
          f"features->positions round trip max error {info['checks']['roundtrip_max_error_m']:.2e} m")
    for name, c in info["sources"].items():
        print(f"  {name:14s} {c['prepared']:5d} prepared of {c['clip_files']:5d} ({c['failed']} failed, "
              f"{c['skipped']} skipped), {c['frames'] / info['fps'] / 60:.1f} min; "
              + ", ".join(f"{k} {v}" for k, v in sorted(c["splits"].items())))
    print(f"license: {info['license']}")
    for failure in info["failures"]:
        print(f"  failed: {failure['member']}: {failure['error']}")
    for skip in info["skipped"]:
        print(f"  skipped: {skip['member']}: {skip['reason']}")


def _load_positions(target: Path, clip_id: str | None) -> tuple[np.ndarray, str]:
    """Joint positions (T, J, 3) of a dataset clip, or of a .npy of positions (T, J, 3) or features (T, D)."""
    from backend.motion import features_to_positions

    if target.is_dir():
        if clip_id is None:
            raise ValueError("give a clip ID to preview from a dataset folder")
        joints, vecs = target / "new_joints" / f"{clip_id}.npy", target / "new_joint_vecs" / f"{clip_id}.npy"
        path = joints if joints.is_file() else vecs
        if not path.is_file():
            raise ValueError(f"clip {clip_id!r} not found in {target} (no new_joints/ or new_joint_vecs/ file)")
        title = clip_id
        texts = target / "texts" / f"{clip_id}.txt"
        if texts.is_file():
            title = f"{clip_id}: {texts.read_text(encoding='utf-8').split('#', 1)[0]}"
    elif target.suffix == ".npy" and target.is_file():
        path, title = target, target.stem
    else:
        raise ValueError(f"{target}: expected a dataset folder or a .npy file")
    data = np.load(path)
    if data.ndim == 3 and data.shape[-1] == 3:
        return data, title
    if data.ndim == 2:
        return features_to_positions(data.astype(np.float64)), title
    raise ValueError(f"{path}: expected positions (T, J, 3) or features (T, D), got shape {data.shape}")


def _preview(args: argparse.Namespace) -> None:
    from backend.preview import render_preview

    out = Path(args.out)
    ids = args.ids or [None]
    if len(ids) > 1 and out.suffix.lower() != ".png":
        raise ValueError("several clips go into one .png contact sheet (one row each); a .gif takes one clip")
    sheets = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, clip_id in enumerate(ids):
            positions, title = _load_positions(Path(args.target), clip_id)
            target = out if len(ids) == 1 else Path(tmp) / f"{k}.png"
            render_preview(positions, target, title=args.title or title, fps=args.fps)
            print(f"{title}: {positions.shape[0]} frames")
            if len(ids) > 1:
                sheets.append(Image.open(target).convert("RGB"))
        if sheets:
            stacked = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), "white")
            for k, sheet in enumerate(sheets):
                stacked.paste(sheet, (0, sum(s.height for s in sheets[:k])))
            stacked.save(out, optimize=True)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("prepare", help="several folders/archives of clips (BVH, ASF/AMC, DeepMimic) -> one "
                       "HumanML3D-layout dataset")
    m.add_argument("paths", nargs="+", metavar="PATH", help="SOURCE [SOURCE ...] OUT: source folders or "
                   ".tar.xz/.tar.gz/.zip archives, then the output dataset folder (its parent must exist)")
    p = sub.add_parser("prepare-bvh", help="one BVH folder/archive -> HumanML3D-layout dataset")
    p.add_argument("source", help="folder or .tar.xz/.tar.gz/.zip of .bvh files (with label .json beside them)")
    p.add_argument("out", help="output dataset folder (its parent must exist)")
    for q in (m, p):
        q.add_argument("--labels", help="JSON {clip_id: {content, style}} for clips without a known layout "
                       "(default: the .json beside each clip)")
        q.add_argument("--map", help="joint map name or JSON file for every clip (default: the shipped map that "
                       "fits each skeleton by bone names and rest geometry)")
        q.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
        q.add_argument("--force", action="store_true", help="replace OUT if it exists")
        q.set_defaults(func=_prepare)
    v = sub.add_parser("preview", help="stick-figure .gif animation or .png contact sheet of a clip")
    v.add_argument("target", help="dataset folder, or a .npy of positions (T, J, 3) or features (T, D)")
    v.add_argument("ids", nargs="*", metavar="ID", help="clip id(s) when target is a dataset folder; several ids "
                   "make one .png with a row per clip")
    v.add_argument("--out", required=True, help="FILE.gif or FILE.png")
    v.add_argument("--title", default=None)
    v.add_argument("--fps", type=float, default=20.0)
    v.set_defaults(func=_preview)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
