"""Evaluate text-to-motion models by the standard protocol (Guo et al. 2022), baselines in the same run.

    python -m backend.evaluate --data DATASET --checkpoint RUN --evaluator DIR [--baseline RUN]
        [--split test|test_unseen_pairs] [--repeats 20] [--out report.json]

Every repeat draws one caption (and, for clips longer than the evaluator's window, one crop) per clip of the
split, and every method produces a motion of that clip's length for that caption:
- ``real``: the real clip itself (the reference row: FID ~ 0, the R-precision ceiling);
- ``motion_mamba`` (``--checkpoint``) and ``mld_transformer`` (``--baseline``): generated, batched by length;
- ``retrieval``: the training clip whose caption is nearest the prompt (frozen sentence encoder, cosine; ties
  broken at random), cropped to the length.
The same evaluator embeds them all. Per repeat: FID against the real clips' embeddings of a separate reference
pass, R-precision top-1/2/3 (batches of 32), MM-Dist, Diversity (300 pairs, fewer if the split is smaller);
MultiModality from ``--mm-samples`` samples of ``--mm-prompts`` prompts (``--mm-pairs`` pairs); and, on the joint
positions recovered from the features, the mean jerk (m/s^3; nearer the real row's is better) and GMD's foot skate
ratio (see ``backend.metrics``), each the mean over the clips. Each metric is
reported as mean ± 95% CI over the repeats, plus AITS: seconds per sentence at batch 1 after a warm-up, timed
on the device named in the report. Writes the JSON report and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backend import metrics
from backend.checkpoint import load_config, save_json
from backend.config import ModelConfig
from backend.models.evaluator import Evaluator, EvaluatorTask, load_evaluator
from backend.motion import features_to_positions
from backend.pipeline import MotionPipeline, resolve_device
from backend.skeleton import skeleton_for_dim
from backend.train import seed_everything

__all__ = ["EvaluatorTask", "evaluate", "format_table", "main"]  # backend.train runs EvaluatorTask from here

GUO = {"mm_prompts": 100, "mm_samples": 30, "mm_pairs": 10, "diversity_pairs": 300, "r_batch": 32}
METRICS = ("R@1", "R@2", "R@3", "FID", "MM-Dist", "Diversity", "MultiModality", "Jerk", "Foot skate")
HEADERS = {
    "R@1": "R-prec. top-1 ↑",
    "R@2": "top-2 ↑",
    "R@3": "top-3 ↑",
    "FID": "FID ↓",
    "MM-Dist": "MM-Dist ↓",
    "Diversity": "Diversity →",
    "MultiModality": "MModality ↑",
    "Jerk": "Jerk (m/s³) →",
    "Foot skate": "Foot skate ↓",
}


@dataclass
class Item:
    """One evaluation case of a repeat: a caption and a length (frames), with the real clip it came from."""

    caption: str
    length: int
    features: np.ndarray  # (length, D) de-normalised real motion


@dataclass
class Method:
    """A row of the table: ``generate(items, seed)`` returns one (length_i, D) motion per item; ``samples``
    (optional) returns n motions for one item (MultiModality); ``describe`` goes into the report."""

    name: str
    generate: Callable[[list[Item], int], list[np.ndarray]]
    samples: Callable[[Item, int, int], list[np.ndarray]] | None = None
    describe: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's name, and the thread count, for the report."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def draw_items(dataset, mean: np.ndarray, std: np.ndarray, seed: int, limit: int | None = None) -> list[Item]:
    """One pass over ``dataset`` (random caption and crop per clip, seeded), features de-normalised."""
    seed_everything(seed)
    items = []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        d = dataset[i]
        n = int(d["length"])
        items.append(Item(d["caption"], n, d["features"][:n].numpy() * std + mean))
    return items


@torch.no_grad()
def embed_motions(evaluator: Evaluator, motions: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Evaluator embeddings (N, E) of de-normalised motions of any lengths."""
    device = evaluator.motion.mean.device
    out = []
    for s in range(0, len(motions), batch_size):
        chunk = motions[s : s + batch_size]
        lengths = torch.tensor([m.shape[0] for m in chunk])
        feats = torch.zeros(len(chunk), int(lengths.max()), chunk[0].shape[1])
        for k, m in enumerate(chunk):
            feats[k, : m.shape[0]] = torch.as_tensor(m, dtype=torch.float32)
        out.append(evaluator.encode_motion(feats.to(device), lengths.to(device)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def embed_texts(evaluator: Evaluator, captions: list[str], batch_size: int = 256) -> np.ndarray:
    return torch.cat(
        [evaluator.encode_text(captions[s : s + batch_size])[0].cpu() for s in range(0, len(captions), batch_size)]
    ).numpy()


# --- methods -------------------------------------------------------------------------------------------


def real_method() -> Method:
    return Method(
        "real",
        lambda items, seed: [it.features for it in items],
        describe={"what": "real motions of the split (reference row)"},
    )


def pipeline_method(
    name: str, pipe: MotionPipeline, path: str | Path, steps: int, guidance: float, batch_size: int
) -> tuple[Method, Callable[[Item], None]]:
    """A generation checkpoint (loaded from ``path``) at ``steps`` as a row, and a function that generates one
    item at batch 1 (for AITS)."""

    def run(captions: list[str], frames: int, seeds: list[int], samples: int = 1) -> list[np.ndarray]:
        out = pipe(
            list(captions), seconds=frames / pipe.fps, seed=seeds, guidance=guidance, steps=steps, samples=samples
        )
        return [m.features for m in out]

    def generate(items: list[Item], seed: int) -> list[np.ndarray]:
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_length[it.length].append(i)
        out: list[np.ndarray | None] = [None] * len(items)
        jobs = [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]
        for idx in tqdm(jobs, desc=f"  {name}", unit="batch", leave=False):
            feats = run([items[i].caption for i in idx], items[idx[0]].length, [seed + i for i in idx])
            for i, f in zip(idx, feats):
                out[i] = f
        return out

    def samples(item: Item, n: int, seed: int) -> list[np.ndarray]:
        return run([item.caption], item.length, [seed], samples=n)

    def one(item: Item) -> None:
        pipe(item.caption, seconds=item.length / pipe.fps, seed=0, guidance=guidance, steps=steps)

    sampler = "consistency" if pipe.uses_student(steps) else "ddim"
    describe = pipe.describe() | {"checkpoint": str(path), "steps": steps, "sampler": sampler, "guidance": guidance}
    return Method(name, generate, samples, describe), one


def retrieval_method(train_set, mean: np.ndarray, std: np.ndarray, evaluator: Evaluator) -> tuple[Method, Callable]:
    """Nearest-caption retrieval over the training clips (every caption of every clip), by the cosine of the
    frozen sentence encoder's vectors (not the evaluator's trained text head, which would favour this row)."""

    def sentence(captions: list[str]) -> torch.Tensor:
        return evaluator.sentence_states(captions)[2].cpu()

    motions = [f * std + mean for f in train_set.features]
    owners, captions = [], []
    for i, caps in enumerate(train_set.captions):
        owners += [i] * len(caps)
        captions += caps
    owners_np = np.asarray(owners)
    bank = torch.cat([sentence(captions[s : s + 1024]) for s in range(0, len(captions), 1024)])

    def pick(item: Item, n: int, rng: np.random.Generator, q: torch.Tensor | None = None) -> list[np.ndarray]:
        sims = (bank @ (sentence([item.caption])[0] if q is None else q)).numpy()
        ties = np.unique(owners_np[sims >= sims.max() - 1e-5])
        out = []
        for clip in rng.choice(ties, n, replace=len(ties) < n):
            m = motions[clip]
            start = int(rng.integers(0, m.shape[0] - item.length + 1)) if m.shape[0] > item.length else 0
            out.append(m[start : start + item.length])
        return out

    def generate(items: list[Item], seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [pick(it, 1, rng)[0] for it in items]

    def samples(item: Item, n: int, seed: int) -> list[np.ndarray]:
        return pick(item, n, np.random.default_rng(seed))

    describe = {
        "what": "nearest training caption (frozen sentence encoder, cosine), its clip cropped to length",
        "train_clips": len(motions),
        "train_captions": len(captions),
    }

    @torch.no_grad()
    def one(item: Item) -> None:  # AITS: encode the prompt afresh (no cache), then search
        pick(item, 1, np.random.default_rng(0), evaluator.text_encoder([item.caption]).pooled.cpu()[0])

    return Method("retrieval", generate, samples, describe), one


# --- the run -------------------------------------------------------------------------------------------


def aits(one: Callable[[Item], None], items: list[Item], device: torch.device) -> float:
    """Average seconds per sentence at batch 1, after one warm-up call."""
    one(items[0])
    total = 0.0
    for it in tqdm(items, desc="  AITS", unit="sentence", leave=False):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        one(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total += time.perf_counter() - start
    return total / len(items)


def format_table(report: dict) -> str:
    """The report as a markdown table (mean ± 95% CI)."""
    lines = [
        "| Method | " + " | ".join(HEADERS[m] for m in METRICS) + " | AITS (s) ↓ |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for row in report["rows"]:
        cells = []
        for m in METRICS:
            v = row["metrics"].get(m)
            cells.append("—" if v is None else f"{v['mean']:.3f} ± {v['ci']:.3f}")
        a = row.get("aits_s")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {'—' if a is None else f'{a:.4f}'} |")
    lines.append("")
    lines.append(
        f"{report['split']} split{_of_sources(report)}, {report['clips']} clips, {report['repeats']} repeats, "
        f"evaluator {report['evaluator']}; AITS on {report['device']}."
    )
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _of_sources(report: dict) -> str:
    sources = report.get("sources")
    return f" ({', '.join(sources)} clips only)" if sources else ""


def write_previews(out: Path, name: str, items: list[Item], motions: list[np.ndarray]) -> None:
    """Stick-figure contact sheets ``<out>_previews/<k>_<name>.png`` of the first repeat's motions."""
    from backend.preview import render_preview

    folder = out.with_name(out.stem + "_previews")
    folder.mkdir(parents=True, exist_ok=True)
    for k, (item, motion) in enumerate(zip(items, motions)):
        render_preview(features_to_positions(motion), folder / f"{k:02d}_{name}.png", title=f"{name}: {item.caption}")


def _same_vae(a: str | Path, b: str | Path) -> bool:
    def digest(p: str | Path) -> str:
        return hashlib.sha256((Path(p) / "vae.safetensors").read_bytes()).hexdigest()

    return digest(a) == digest(b)


def evaluate(args: argparse.Namespace) -> dict:
    """Run the protocol; return the report (also written to ``args.out`` and its ``.md`` twin)."""
    from backend.data.dataset import MotionDataset, load_normalizer

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.mm_prompts > 0 and not 1 <= args.mm_pairs <= args.mm_samples:
        raise ValueError(f"--mm-pairs must be in 1..--mm-samples ({args.mm_samples}), got {args.mm_pairs}")
    device = resolve_device(args.device)
    evaluator = load_evaluator(args.evaluator, device)
    evaluator_config = load_config(args.evaluator)
    max_frames = ModelConfig.from_dict(evaluator_config, str(args.evaluator)).train.evaluator.max_frames
    mean, std = (a.astype(np.float32) for a in load_normalizer(args.data))
    sources = args.sources.split(",") if args.sources else None
    test_set = MotionDataset(args.data, args.split, max_frames=max_frames, unit=4, sources=sources)
    n_clips = len(test_set) if args.max_clips is None else min(args.max_clips, len(test_set))
    if n_clips < GUO["r_batch"]:
        raise ValueError(f"the {args.split} split has {n_clips} clips; R-precision needs at least {GUO['r_batch']}")
    notes = [
        f"MultiModality: {args.mm_samples} samples of {args.mm_prompts} prompts, {args.mm_pairs} pairs "
        f"(Guo et al.: {GUO['mm_samples']}, {GUO['mm_prompts']}, {GUO['mm_pairs']})." if args.mm_prompts > 0 else
        "MultiModality: not measured (--mm-prompts 0)."
    ]
    div_pairs = min(GUO["diversity_pairs"], n_clips)
    if div_pairs < GUO["diversity_pairs"]:
        notes.append(f"Diversity over {div_pairs} pairs (the split has fewer than {GUO['diversity_pairs']} clips).")
    notes.append(
        "Embeddings are unit vectors (see backend/models/evaluator.py): FID, MM-Dist and Diversity are on "
        "that scale, not comparable with numbers from Guo et al.'s HumanML3D evaluator."
    )

    methods: list[Method] = [real_method()]
    timers: dict[str, Callable[[Item], None]] = {}
    steps = list(args.steps)
    for name, path in (("motion_mamba", args.checkpoint), ("mld_transformer", args.baseline)):
        if path is None:
            notes.append(f"{name} row skipped: no {'--checkpoint' if name == 'motion_mamba' else '--baseline'}.")
            continue
        pipe = MotionPipeline.from_checkpoint(path, device=str(device))
        for n in steps if name == "motion_mamba" else steps[:1]:  # the baseline at the first step count
            sampler = pipe.sampler(n)
            label = name if len(steps) == 1 else f"{name} ({sampler}, {n} step{'s' * (n != 1)})"
            method, timers[label] = pipeline_method(label, pipe, path, n, args.guidance, args.batch_size)
            methods.append(method)
    if args.checkpoint and args.baseline and not _same_vae(args.checkpoint, args.baseline):
        notes.append("WARNING: --checkpoint and --baseline use different VAEs (vae.safetensors differ).")
    if args.no_retrieval:
        notes.append("retrieval row skipped: --no-retrieval.")
    else:
        method, timers["retrieval"] = retrieval_method(MotionDataset(args.data, "train", unit=4), mean, std, evaluator)
        methods.append(method)

    reference = embed_motions(
        evaluator, [it.features for it in draw_items(test_set, mean, std, args.seed + 999_999, n_clips)]
    )
    values: dict[str, dict[str, list[float]]] = {m.name: defaultdict(list) for m in methods}
    skeleton = skeleton_for_dim(mean.shape[-1])
    feet = (skeleton.foot_left[-1], skeleton.foot_right[-1])  # the joints below the ankles, as GMD's skate ratio
    for r in tqdm(range(args.repeats), desc="repeats", unit="repeat"):
        seed = args.seed + 1000 * r
        items = draw_items(test_set, mean, std, seed, n_clips)
        text = embed_texts(evaluator, [it.caption for it in items])
        mm_items = [
            items[i]
            for i in np.random.default_rng(seed).choice(len(items), min(args.mm_prompts, len(items)), replace=False)
        ]
        for method in methods:
            rng = np.random.default_rng(seed)  # every row gets the same R-precision batches and diversity pairs
            motions = method.generate(items, seed)
            if r == 0 and args.previews and args.out:
                write_previews(Path(args.out), method.name, items[: args.previews], motions)
            emb = embed_motions(evaluator, motions)
            v = values[method.name]
            for k, top in enumerate(metrics.r_precision(text, emb, batch_size=GUO["r_batch"], rng=rng), 1):
                v[f"R@{k}"].append(float(top))
            v["FID"].append(metrics.frechet_distance(reference, emb))
            v["MM-Dist"].append(metrics.mm_dist(text, emb))
            v["Diversity"].append(metrics.diversity(emb, pairs=div_pairs, rng=rng))
            joints = [features_to_positions(m) for m in motions]
            v["Jerk"].append(float(np.mean([metrics.jerk(p, skeleton.fps) for p in joints])))
            v["Foot skate"].append(float(np.mean([metrics.foot_skate_ratio(p, feet, skeleton.fps) for p in joints])))
            if method.samples is not None and args.mm_prompts > 0:
                mm = np.stack(
                    [
                        embed_motions(evaluator, method.samples(it, args.mm_samples, seed + 7 * j))
                        for j, it in enumerate(tqdm(mm_items, desc=f"  {method.name} MM", leave=False))
                    ]
                )
                v["MultiModality"].append(metrics.multimodality(mm, pairs=args.mm_pairs, rng=rng))

    timing_items = draw_items(test_set, mean, std, args.seed, min(args.aits_prompts, n_clips))
    rows = []
    for method in methods:
        row = {
            "name": method.name,
            "describe": method.describe,
            "metrics": {k: dict(zip(("mean", "ci"), metrics.mean_ci(v))) for k, v in values[method.name].items()},
            "aits_s": None,
        }
        if method.name in timers and args.aits_prompts > 0:
            row["aits_s"] = aits(timers[method.name], timing_items, device)
        rows.append(row)
    if len(rows) > 1:
        real_jerk = rows[0]["metrics"]["Jerk"]["mean"]
        ratios = ", ".join(f"{r['name']} {r['metrics']['Jerk']['mean'] / real_jerk:.2f}" for r in rows[1:])
        notes.append(f"Jerk / the real row's: {ratios}.")
    report = {
        "split": args.split,
        "sources": sources,
        "data": str(args.data),
        "clips": n_clips,
        "repeats": args.repeats,
        "evaluator": str(args.evaluator),
        "evaluator_val": evaluator_config.get("val"),
        "device": device_name(device),
        "steps": steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "protocol": GUO | {"diversity_pairs_used": div_pairs, "ci": "1.96 * std / sqrt(repeats)"},
        "rows": rows,
        "notes": notes,
    }
    if args.out:
        out = Path(args.out)
        save_json(out, report)
        out.with_suffix(".md").write_text(format_table(report))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="HumanML3D-layout dataset folder")
    p.add_argument("--evaluator", required=True, help="evaluator folder (python -m backend.train evaluator)")
    p.add_argument("--checkpoint", help="the Motion Mamba generation checkpoint (a denoiser run folder)")
    p.add_argument("--baseline", help="the MLD-style transformer checkpoint (configs/mld_transformer.json)")
    p.add_argument("--split", default="test", choices=("test", "test_unseen_pairs", "val"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", help="report JSON path (the markdown table goes beside it as .md)")
    p.add_argument("--steps", type=int, nargs="+", default=[50],
                   help="denoising steps, a Motion Mamba row each (the baseline takes the first); step counts the "
                        "checkpoint's distilled sampler covers use it, others DDIM")
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    p.add_argument("--mm-prompts", type=int, default=GUO["mm_prompts"])
    p.add_argument("--mm-samples", type=int, default=GUO["mm_samples"])
    p.add_argument("--mm-pairs", type=int, default=GUO["mm_pairs"])
    p.add_argument("--aits-prompts", type=int, default=20, help="sentences timed for AITS (0: skip)")
    p.add_argument("--max-clips", type=int, default=None, help="use only the first N clips of the split")
    p.add_argument("--sources", help="only the split's clips of these sources (comma-separated names from the "
                                     "dataset's dataset.json, e.g. bandai-namco or hdm05,cmu-cc3)")
    p.add_argument("--previews", type=int, default=0, help="contact sheets of the first N prompts, every row")
    p.add_argument("--no-retrieval", action="store_true", help="skip the text-retrieval row")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    report = evaluate(build_parser().parse_args(argv))
    print(format_table(report))
    return report


def cli() -> int:
    """``python -m backend.evaluate``: bad arguments and missing folders end with a one-line error, status 2."""
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
