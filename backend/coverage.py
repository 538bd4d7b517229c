"""What a model knows: its training captions' sentence embeddings, and how close a prompt comes to them.

A checkpoint folder may hold a caption index beside its weights:
  captions.safetensors  one row per unique training caption: its L2-normalised embedding as "codes" (N, D) int8
                        times "scales" (N,) float32 (cosines to within ~0.005 of float32, a quarter the size)
  captions.json         {"encoder", "captions": [N strings], "actions": [...], "threshold", "calibration"}
``python -m backend.coverage CHECKPOINT_DIR --data DATASET`` builds one for an existing checkpoint (a
denoiser run writes its own when it saves). The ``known`` threshold is calibrated on held-back captions: the
``val`` split's captions that are no training caption word for word (same actions, other paraphrases) against
``UNKNOWN_CALIBRATION``, actions none of the shipped data sources has (a model trained on other data that has some
of them needs its own list: ``CaptionIndex.build(..., unknown=...)``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from backend.checkpoint import atomic_write, save_json
from backend.data.dataset import MotionDataset
from backend.models.text_encoder import TextEncoder

INDEX_FILE = "captions.safetensors"
META_FILE = "captions.json"
TEMPLATES = Path(__file__).resolve().parent / "data" / "caption_templates.json"
CLASS_CAPTIONS = Path(__file__).resolve().parent / "data" / "class_captions.json"

# Prompts for actions none of the shipped data sources (Bandai-Namco, more-mocap: CMU, dance, DeepMimic, HDM05)
# has: the negatives of the calibration.
UNKNOWN_CALIBRATION = (
    "someone sits down on a chair", "a person swims", "a man does push-ups", "a person rides a bicycle",
    "a person kneels on one knee", "a man plays the guitar", "a person drinks from a cup",
    "someone stretches their arms over their head", "someone lifts a heavy box", "a person swings a golf club",
    "a person does sit-ups", "someone talks on the phone", "a person plays the piano", "someone mops the floor",
    "a person brushes their teeth", "a man rows a boat", "a person skis down a slope", "someone plays tennis",
    "a woman drives a car", "a person eats with a fork", "someone puts on a jacket", "a man shaves his face",
    "a person opens a door and walks through", "someone reads a book", "a person washes the dishes",
)


@dataclass
class Coverage:
    """How close a prompt is to what the model was trained on: ``nearest`` are (caption, cosine) best first."""

    known: bool
    similarity: float
    nearest: list[tuple[str, float]]

    def to_wire(self) -> dict:
        """The ``coverage`` field of the ``accepted`` reply."""
        return {"known": self.known, "similarity": round(self.similarity, 4),
                "nearest": [[c, round(s, 4)] for c, s in self.nearest]}


def embed(encoder: TextEncoder, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, D) float32 L2-normalised sentence embeddings on the CPU."""
    parts = [encoder(texts[i: i + batch]).pooled.float().cpu() for i in range(0, len(texts), batch)]
    return torch.nn.functional.normalize(torch.cat(parts), dim=-1)


def calibrate(known: np.ndarray, unknown: np.ndarray) -> tuple[float, float]:
    """The threshold on best-match similarity that classifies the two sets best (accuracy averaged over the
    two classes); among equally good ones, the one in the middle of the widest gap. Returns (threshold, accuracy)."""
    known, unknown = np.asarray(known, float), np.asarray(unknown, float)
    if not len(known) or not len(unknown):
        raise ValueError("calibration needs known and unknown examples")
    values = np.unique(np.concatenate([known, unknown]))
    cuts = np.concatenate([[values[0] - 1e-3], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-3]])
    acc = np.array([((known >= c).mean() + (unknown < c).mean()) / 2 for c in cuts])
    best = np.flatnonzero(acc == acc.max())
    margin = np.array([np.abs(values - c).min() for c in cuts])  # half the gap a cut sits in
    i = max(best, key=lambda j: margin[j])
    return float(cuts[i]), float(acc[i])


def trained_actions(captions: list[str]) -> list[str]:
    """The actions (one phrase each, from the caption templates and class names) the captions speak of."""
    templates = json.loads(TEMPLATES.read_text(encoding="utf-8"))["contents"]
    classes = json.loads(CLASS_CAPTIONS.read_text(encoding="utf-8"))["classes"].values()
    groups = list(templates.values()) + [[v] if isinstance(v, str) else v for v in classes]
    text = "\n".join(c.lower() for c in captions)
    seen: dict[str, None] = {}
    for phrases in groups:
        if any(p.lower() in text for p in phrases):
            seen.setdefault(phrases[0], None)
    return list(seen)


class CaptionIndex:
    """Unique training captions, their embeddings and the calibrated ``known`` threshold."""

    def __init__(self, captions: list[str], embeddings: torch.Tensor, actions: list[str], encoder: str,
                 threshold: float, calibration: dict | None = None):
        if embeddings.shape[0] != len(captions):
            raise ValueError(f"{len(captions)} captions but {embeddings.shape[0]} embeddings")
        self.captions, self.embeddings, self.actions = captions, embeddings.float(), actions
        self.encoder, self.threshold, self.calibration = encoder, float(threshold), calibration or {}

    @classmethod
    def build(cls, encoder: TextEncoder, data: str | Path,
              unknown: tuple[str, ...] = UNKNOWN_CALIBRATION) -> CaptionIndex:
        """Index a prepared dataset's unique training captions; calibrate on its ``val`` captions (those no training
        caption repeats word for word) against ``unknown``, prompts for actions the data lacks."""
        train = _captions(data, "train")
        val = _captions(data, "val")
        held = [c for c in val if c not in set(train)] or val or train  # tiny datasets: what there is
        index = cls(train, embed(encoder, train), trained_actions(train), encoder.name, 0.0)
        known = index.best(embed(encoder, held))
        far = index.best(embed(encoder, list(unknown)))
        index.threshold, accuracy = calibrate(known, far)
        index.calibration = {"held_back_known": len(held), "unknown": len(far), "accuracy": round(accuracy, 4),
                             "known_min": round(float(known.min()), 4), "unknown_max": round(float(far.max()), 4)}
        return index

    def best(self, queries: torch.Tensor) -> np.ndarray:
        """Each query's highest cosine similarity to a training caption."""
        return (queries @ self.embeddings.T).max(dim=1).values.numpy()

    def query(self, encoder: TextEncoder, prompt: str, k: int = 3) -> Coverage:
        """The ``k`` nearest training captions to ``prompt`` and the verdict."""
        if encoder.name != self.encoder:
            raise ValueError(f"the caption index was built with {self.encoder}, the model encodes with {encoder.name}")
        sims = (embed(encoder, [prompt]) @ self.embeddings.T)[0]
        top = torch.topk(sims, min(k, len(self.captions)))
        nearest = [(self.captions[i], float(s)) for s, i in zip(top.values, top.indices)]
        return Coverage(nearest[0][1] >= self.threshold, nearest[0][1], nearest)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        scales = self.embeddings.abs().amax(dim=1).clamp(min=1e-12) / 127
        codes = torch.round(self.embeddings / scales[:, None]).to(torch.int8)
        atomic_write(folder / INDEX_FILE, save({"codes": codes.contiguous(), "scales": scales.contiguous()}))
        save_json(folder / META_FILE, {"encoder": self.encoder, "threshold": round(self.threshold, 4),
                                       "calibration": self.calibration, "actions": self.actions,
                                       "captions": self.captions})

    @classmethod
    def load(cls, folder: str | Path) -> CaptionIndex | None:
        """The folder's index, or None when it has none."""
        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file():
            return None
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / INDEX_FILE))
        embeddings = tensors["codes"].float() * tensors["scales"][:, None]
        return cls(meta["captions"], embeddings, meta["actions"], meta["encoder"], meta["threshold"],
                   meta.get("calibration"))


def _captions(data: str | Path, split: str) -> list[str]:
    """A split's unique captions, in first-seen order."""
    dataset = MotionDataset(data, split)
    return list(dict.fromkeys(c for caps in dataset.captions for c in caps if c))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from backend.checkpoint import load_config
    from backend.config import ModelConfig

    parser = argparse.ArgumentParser(prog="python -m backend.coverage",
                                     description="Build a checkpoint's caption index from its training data.")
    parser.add_argument("checkpoint", help="a generation checkpoint folder (e.g. backend/weights/default)")
    parser.add_argument("--data", required=True, help="the prepared dataset the checkpoint was trained on")
    args = parser.parse_args(argv)
    try:
        typed = ModelConfig.from_dict(load_config(args.checkpoint), args.checkpoint)
        encoder = TextEncoder(typed.text_encoder.path, typed.text_encoder.max_length)
        index = CaptionIndex.build(encoder, args.data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index.save(args.checkpoint)
    size = sum((Path(args.checkpoint) / f).stat().st_size for f in (INDEX_FILE, META_FILE))
    print(f"{len(index.captions)} training captions, {len(index.actions)} actions, threshold {index.threshold:.4f} "
          f"({json.dumps(index.calibration)}); {size / 1024:.0f} KiB in {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
