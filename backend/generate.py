"""Generate a motion from text: ``python -m backend.generate "PROMPT" --seconds S --out FILE [options]``.

``--timeline FILE`` instead of a prompt directs one continuous motion by a prompt timeline (``addon.timeline``:
``START END PROMPT`` per line, seconds).

FILE is .npz (features, positions, root_translation, rotations (wxyz), fps, prompt, seed), .bvh (the
canonical skeleton; loads in Blender's BVH importer) or .gif / .png (a stick-figure preview).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from addon.timeline import parse_timeline
from addon.wire import GenerateRequest
from backend.pipeline import Motion, MotionPipeline, collect

FORMATS = (".npz", ".bvh", ".gif", ".png")


def save_motion(motion: Motion, path: str | Path) -> Path:
    """Write a Motion as .npz, .bvh, or a .gif/.png preview (chosen by the suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported output {path.name!r}: use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        np.savez(path, features=motion.features, positions=motion.positions,
                 root_translation=motion.root_translation, rotations=motion.rotations,
                 fps=np.int64(motion.fps), prompt=np.str_(motion.prompt), seed=np.int64(motion.seed))
    elif suffix == ".bvh":
        from backend.data.bvh import write_bvh
        from backend.skeleton import skeleton_for_dim

        write_bvh(path, skeleton_for_dim(motion.features.shape[-1]), motion.root_translation, motion.rotations,
                  motion.fps)
    else:
        from backend.preview import render_preview

        render_preview(motion.positions, path, title=motion.prompt, fps=motion.fps)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.generate", description=__doc__.splitlines()[0])
    defaults = GenerateRequest.defaults()  # the protocol's defaults, the same in the add-on and the server
    parser.add_argument("prompt", nargs="?", help="what the character does, e.g. 'a person walks forward and waves'")
    parser.add_argument("--timeline", help="a prompt timeline file (START END PROMPT per line) instead of a prompt")
    parser.add_argument("--seconds", type=float, default=defaults["seconds"], help="duration (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--guidance", type=float, default=defaults["guidance"],
                        help="classifier-free guidance scale (default %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults["steps"],
                        help="denoising steps (default %(default)s; at most the checkpoint's fast_steps use its "
                        "fast sampler, more use DDIM)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: backend/weights/default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", required=True, help=f"output file ({', '.join(FORMATS)})")
    parser.add_argument("--preview", help="also write a .gif/.png preview here")
    args = parser.parse_args(argv)
    try:
        for target in (args.out, args.preview):
            if target and Path(target).suffix.lower() not in FORMATS:
                raise ValueError(f"unsupported output {target!r}: use one of {', '.join(FORMATS)}")
        if (args.prompt is None) == (args.timeline is None):
            raise ValueError("give a prompt or --timeline FILE (one of them)")
        t0 = time.perf_counter()
        rows = parse_timeline(Path(args.timeline).read_text(encoding="utf-8")) if args.timeline else None
        request = GenerateRequest(args.prompt if rows is None else "", seconds=args.seconds, seed=args.seed,
                                  guidance=args.guidance, steps=args.steps, timeline=rows)
        pipe = MotionPipeline.from_checkpoint(args.checkpoint, device=args.device)
        t1 = time.perf_counter()
        motion = collect(pipe.stream(request))[0]
        t2 = time.perf_counter()
        written = [save_motion(motion, args.out)]
        if args.preview:
            written.append(save_motion(motion, args.preview))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = pipe.describe()
    what = f"a timeline of {len(rows)} rows" if rows else repr(args.prompt)
    print(f"{motion.frames} frames ({motion.seconds:.2f} s at {motion.fps} fps) of {what}, seed "
          f"{request.seed}, {request.steps} {pipe.sampler(request.steps)} steps, guidance "
          f"{request.guidance}: generated in {t2 - t1:.2f} s on "
          f"{info['device']} (model {info['model']}, loaded in {t1 - t0:.2f} s)")
    for prompt in dict.fromkeys(row.prompt for row in rows) if rows else [args.prompt]:
        coverage = pipe.coverage(prompt)
        if coverage is not None and not coverage.known:
            closest = "; ".join(f"{caption!r} ({similarity:.2f})" for caption, similarity in coverage.nearest)
            print(f"note: this model has not seen anything like {prompt!r} (similarity {coverage.similarity:.2f});"
                  f" the closest it knows: {closest}")  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
