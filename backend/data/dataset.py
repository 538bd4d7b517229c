"""PyTorch Dataset / DataLoader helpers over a HumanML3D-layout dataset (ours or HumanML3D's own).

Items are normalised feature windows with one of the clip's captions, picked with torch's random generator
(so ``torch.manual_seed`` and DataLoader worker seeding make runs repeatable). Lengths are cut down to a multiple
of ``unit`` (the VAE's temporal downsampling); clips longer than ``max_frames`` get a random crop.
``source_repeats`` lists the clips of some sources (``dataset.json``'s per-clip ``source``) several times per
epoch: a training mix that gives a small source's many actions more of the steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from backend.data.captions import parse_caption_file

SPLITS = ("train", "val", "test", "test_unseen_pairs", "all")


def load_normalizer(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(Mean, Std) float32 (D,) of a dataset folder."""
    root = Path(root)
    try:
        mean, std = np.load(root / "Mean.npy"), np.load(root / "Std.npy")
    except FileNotFoundError as exc:
        raise ValueError(f"{root} is not a prepared dataset: {exc.filename} is missing") from None
    if mean.shape != std.shape or mean.ndim != 1 or not (std > 0).all():
        raise ValueError(f"{root}: Mean.npy {mean.shape} / Std.npy {std.shape} are not matching (D,) with Std > 0")
    return mean.astype(np.float32), std.astype(np.float32)


def clip_sources(root: str | Path) -> dict[str, str]:
    """{clip id: source name} from a prepared dataset's ``dataset.json`` (ValueError if it has none)."""
    manifest = Path(root) / "dataset.json"
    if not manifest.is_file():
        raise ValueError(f"{root}: no dataset.json (written by backend.data prepare) to tell the clips' sources")
    return {clip_id: entry["source"] for clip_id, entry in
            json.loads(manifest.read_text(encoding="utf-8"))["clips"].items()}


def _check_sources(root: Path, sources: dict[str, str], named, bad: list[str]) -> None:
    known = sorted(set(sources.values()))
    problems = bad + [f"unknown source {name!r}" for name in named if name not in known]
    if problems:
        raise ValueError(f"{root}: {', '.join(problems)} (this dataset's sources: {', '.join(known)}; "
                         f"source_repeats values are integers >= 1)")


class MotionDataset(Dataset):
    """Clips of one split: items {features (T, D) float32 normalised, caption str, length int, id str}.

    Clips with fewer than ``min_frames`` frames (after rounding down to ``unit``) are left out and listed in
    ``self.skipped``; clips without a caption file get the caption "". ``sources`` keeps only the clips of those
    sources; ``source_repeats`` lists each clip of a source that many times.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        max_frames: int | None = None,
        unit: int = 4,
        min_frames: int | None = None,
        sources: list[str] | None = None,
        source_repeats: dict[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if unit < 1:
            raise ValueError(f"unit must be >= 1, got {unit}")
        if max_frames is not None and max_frames < unit:
            raise ValueError(f"max_frames ({max_frames}) must be at least unit ({unit})")
        split_file = self.root / f"{split}.txt"
        if not split_file.is_file():
            raise ValueError(f"{self.root}: no split file {split_file.name} (known splits: {', '.join(SPLITS)})")
        self.mean, self.std = load_normalizer(self.root)
        self.unit, self.max_frames = unit, max_frames
        min_frames = max(unit, min_frames or unit)
        self.ids: list[str] = []
        self.features: list[np.ndarray] = []
        self.captions: list[list[str]] = []
        self.skipped: list[str] = []
        clip_ids = split_file.read_text(encoding="utf-8").split()
        if sources is not None:
            of = clip_sources(self.root)
            _check_sources(self.root, of, sources, [])
            clip_ids = [clip_id for clip_id in clip_ids if of.get(clip_id) in sources]
        for clip_id in clip_ids:
            path = self.root / "new_joint_vecs" / f"{clip_id}.npy"
            if not path.is_file():
                raise ValueError(f"{self.root}: {split_file.name} lists {clip_id!r} but {path} is missing")
            data = np.load(path)
            if data.ndim != 2 or data.shape[1] != self.mean.shape[0]:
                raise ValueError(f"{path}: expected (T, {self.mean.shape[0]}) features, got {data.shape}")
            if data.shape[0] // unit * unit < min_frames:
                self.skipped.append(clip_id)
                continue
            text = self.root / "texts" / f"{clip_id}.txt"
            lines = parse_caption_file(text.read_text(encoding="utf-8")) if text.is_file() else []
            caps = [line["caption"] for line in lines]
            self.ids.append(clip_id)
            self.features.append(((data - self.mean) / self.std).astype(np.float32))
            self.captions.append(caps or [""])
        if source_repeats:
            self._repeat_sources(source_repeats)

    def _repeat_sources(self, repeats: dict[str, int]) -> None:
        """List each clip of ``repeats``' sources that many times (the arrays are shared, not copied)."""
        sources = clip_sources(self.root)
        bad = [f"{name}: {times!r}" for name, times in repeats.items()
               if not (isinstance(times, int) and not isinstance(times, bool) and times >= 1)]
        _check_sources(self.root, sources, repeats, bad)
        clips = list(zip(self.ids, self.features, self.captions))
        extra = [clip for clip in clips for _ in range(repeats.get(sources.get(clip[0], ""), 1) - 1)]
        for clip_id, features, captions in extra:
            self.ids.append(clip_id)
            self.features.append(features)
            self.captions.append(captions)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = self.features[index]
        length = data.shape[0] // self.unit * self.unit
        if self.max_frames is not None:
            length = min(length, self.max_frames // self.unit * self.unit)
        start = int(torch.randint(0, data.shape[0] - length + 1, ()).item())
        caps = self.captions[index]
        caption = caps[int(torch.randint(0, len(caps), ()).item())]
        return {
            "features": torch.from_numpy(data[start : start + length]),
            "caption": caption,
            "length": length,
            "id": self.ids[index],
        }


def collate_motion(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: features (B, Tmax, D) zero-padded, mask (B, Tmax) True = valid, lengths (B,), captions, ids."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([item["length"] for item in batch], dtype=torch.long)
    dim = batch[0]["features"].shape[-1]
    features = torch.zeros(len(batch), int(lengths.max()), dim, dtype=torch.float32)
    for k, item in enumerate(batch):
        features[k, : item["length"]] = item["features"]
    mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    return {
        "features": features,
        "mask": mask,
        "lengths": lengths,
        "captions": [item["caption"] for item in batch],
        "ids": [item["id"] for item in batch],
    }


def motion_loader(
    root: str | Path,
    split: str = "train",
    batch_size: int = 32,
    shuffle: bool | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader over :class:`MotionDataset` with :func:`collate_motion` (shuffled for train by default)."""
    dataset = MotionDataset(root, split, **dataset_kwargs)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=split == "train" if shuffle is None else shuffle,
        num_workers=num_workers, collate_fn=collate_motion, drop_last=drop_last,
    )
