"""The evaluation embedding model: a motion encoder and a text encoder trained contrastively into one space.

We cannot download Guo et al.'s pretrained HumanML3D evaluator, so the project trains its own on the same data,
TMR-style (Petrovich et al. 2023, "TMR: Text-to-Motion Retrieval Using Contrastive 3D Human Motion Synthesis"):
- motion: Guo et al.'s movement encoder (two stride-2 convolutions: one token per 4 frames) on features
  normalised with the dataset's Mean/Std (stored in the weights, so the model takes de-normalised features),
  then a small transformer encoder over the tokens (TMR's choice; a GRU as in Guo et al. costs ~10x more to
  train on a CPU), mean-pooled over the valid tokens, and an MLP head;
- text: the frozen sentence encoder (all-MiniLM-L6-v2 by default) gives word-token states (in place of Guo's
  GloVe vectors); a one-layer transformer, mean pooling and an MLP head are trained on top;
- loss: TMR's symmetric InfoNCE over the batch, temperature 0.1, with TMR's negative filtering: a pair whose
  captions are near-paraphrases (frozen sentence cosine > ``negative_filter``) is not used as a negative. Bandai
  captions are paraphrases of a few dozen (content, style) labels, so most batches hold such pairs.
Embeddings are L2-normalised: the Euclidean distances the metrics use then rank exactly as the cosine the
loss trains (so FID, MM-Dist and Diversity are on the unit sphere's scale, not Guo's).

Train: ``python -m backend.train evaluator --data DATASET --out DIR --config evaluator`` (the training loop of
:mod:`backend.train` runs :class:`EvaluatorTask`). DIR gets ``evaluator.safetensors`` + ``config.json`` (kind
"evaluator"), whose ``val`` is the held-out retrieval accuracy measured at that save.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backend.checkpoint import load_config, load_weights, save_json, save_weights
from backend.config import EvaluatorConfig, ModelConfig
from backend.models.transformer_denoiser import positional_encoding

WEIGHTS = "evaluator.safetensors"
UNIT = 4  # frames per motion token


class SequenceEncoder(nn.Module):
    """(B, L, d_in) + mask (B, L) True = valid -> unit vectors (B, embed_dim): linear, sinusoidal positions,
    ``layers`` pre-norm transformer layers, mean over the valid positions, MLP head. Padding changes nothing."""

    def __init__(self, d_in: int, hidden: int, embed_dim: int, layers: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, 2 * hidden, 0.1, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.head = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + positional_encoding(x.shape[1], self.inp.out_features, x.device).to(x.dtype)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return nn.functional.normalize(self.head(pooled), dim=-1)


class MotionEncoder(nn.Module):
    """De-normalised features (B, T, D) + lengths (B,) -> unit embeddings (B, embed_dim).

    A motion's embedding does not depend on the padding of its batch (padded frames are zeroed after every
    convolution and masked in attention and pooling).
    """

    def __init__(self, feature_dim: int, hidden: int, embed_dim: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.convs = nn.ModuleList([nn.Conv1d(feature_dim, hidden, 4, 2, 1), nn.Conv1d(hidden, hidden, 4, 2, 1)])
        self.act = nn.LeakyReLU(0.2)
        self.encoder = SequenceEncoder(hidden, hidden, embed_dim, layers, heads)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.feature_dim or features.shape[1] == 0:
            raise ValueError(f"expected features (batch, frames, {self.feature_dim}), got {tuple(features.shape)}")
        lengths = torch.as_tensor(lengths, device=features.device).long()
        if lengths.shape != features.shape[:1] or bool((lengths < UNIT).any() or (lengths > features.shape[1]).any()):
            raise ValueError(f"lengths must be {UNIT}..{features.shape[1]} frames per motion, got {lengths.tolist()}")
        pad = -features.shape[1] % UNIT
        x = nn.functional.pad((features - self.mean) / self.std, (0, 0, 0, pad))
        frames = torch.arange(x.shape[1], device=x.device)
        h = (x * (frames[None] < lengths[:, None])[..., None]).transpose(1, 2)  # (B, D, T)
        n = lengths
        for conv in self.convs:
            n = n // 2
            valid = torch.arange(h.shape[-1] // 2, device=h.device)[None] < n[:, None]
            h = self.act(conv(h)) * valid[:, None]
        return self.encoder(h.transpose(1, 2), valid)


class Evaluator(nn.Module):
    """Motion and text encoders into one ``embed_dim`` space; the frozen sentence encoder is loaded beside them
    (it is not part of the saved weights). Config: ``backend.config.EvaluatorConfig`` (``feature_dim`` set)."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        from backend.models.text_encoder import TextEncoder

        if config.feature_dim is None:
            raise ValueError("the evaluator config has no feature_dim (training sets it from the data)")
        self.text_encoder = TextEncoder(config.text_encoder.path, max_length=config.text_encoder.max_length)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden, embed_dim, heads = config.hidden, config.embed_dim, config.heads
        self.motion = MotionEncoder(config.feature_dim, hidden, embed_dim, config.layers, heads)
        self.text = SequenceEncoder(self.text_encoder.dim, hidden, embed_dim, config.text_layers, heads)
        self.temperature, self.negative_filter = config.temperature, config.negative_filter

    def state_dict(self, *args, **kwargs):  # the frozen sentence encoder is not ours to save
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("text_encoder.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith("text_encoder.")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict: missing {missing}, unexpected {unexpected}")
        return missing, unexpected

    def set_normalizer(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.motion.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.motion.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def encode_motion(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """De-normalised features (B, T, D) (zero-padded past each length) -> (B, embed_dim)."""
        return self.motion(features, lengths)

    @torch.no_grad()
    def sentence_states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen encoder's (token states (B, S, Dt), mask (B, S), sentence vectors (B, Dt)) of captions,
        cached per caption; new captions are encoded together in batches of 256 (training sees the same few
        thousand captions again and again)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for s in range(0, len(missing), 256):
            chunk = missing[s : s + 256]
            batch = self.text_encoder(chunk)
            for i, c in enumerate(chunk):
                self._text_cache[c] = (batch.tokens[i, batch.mask[i]].cpu(), batch.pooled[i].cpu())
        states = [self._text_cache[c][0] for c in captions]
        device = self.motion.mean.device
        tokens = nn.utils.rnn.pad_sequence(states, batch_first=True).to(device)
        mask = torch.arange(tokens.shape[1])[None] < torch.tensor([len(x) for x in states])[:, None]
        return tokens, mask.to(device), torch.stack([self._text_cache[c][1] for c in captions]).to(device)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings (B, embed_dim), frozen sentence vectors (B, Dt))."""
        tokens, mask, pooled = self.sentence_states(list(captions))
        return self.text(tokens, mask), pooled

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The training loss of a batch: symmetric InfoNCE with negative filtering (see the module docstring).
        Runs in float32 (outside any autocast: GRUs and a temperature-scaled softmax want it)."""
        with torch.autocast(features.device.type, enabled=False):
            return self._loss(features.float(), lengths, captions)

    def _loss(self, features: torch.Tensor, lengths: torch.Tensor, captions: list[str]) -> torch.Tensor:
        m = self.encode_motion(features, lengths)
        t, sentence = self.encode_text(captions)
        logits = m @ t.T / self.temperature
        same = (sentence @ sentence.T > self.negative_filter) & ~torch.eye(
            len(captions), dtype=torch.bool, device=m.device
        )
        logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(len(captions), device=m.device)
        return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def load_evaluator(folder: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """Load a trained evaluator folder (``config.json`` + ``evaluator.safetensors``), in eval mode."""
    config = load_config(folder)
    if config.get("kind") != "evaluator":
        raise ValueError(
            f"{folder} is a {config.get('kind')!r} run, not an evaluator "
            f"(python -m backend.train evaluator --config evaluator ...)"
        )
    model = Evaluator(ModelConfig.from_dict(config, str(folder)).evaluator)
    load_weights(model, Path(folder) / WEIGHTS)
    return model.to(device).eval()


def denormalize(batch: dict, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A collated batch's normalised features back to de-normalised ones, padding kept at zero."""
    return (batch["features"].to(mean.device) * std + mean) * batch["mask"].to(mean.device)[..., None]


@torch.no_grad()
def embed_dataset(model: Evaluator, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(text, motion) embeddings of every clip of a MotionDataset (its random caption and crop per clip)."""
    from backend.data.dataset import collate_motion

    model.eval()
    mean, std = model.motion.mean, model.motion.std
    texts, motions = [], []
    for s in range(0, len(dataset), batch_size):
        batch = collate_motion([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        motions.append(model.encode_motion(denormalize(batch, mean, std), batch["lengths"].to(mean.device)).cpu())
        texts.append(model.encode_text(batch["captions"])[0].cpu())
    return torch.cat(texts).numpy(), torch.cat(motions).numpy()


def retrieval_accuracy(model: Evaluator, dataset, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Held-out retrieval: R-precision top-1/2/3 (text -> motion within shuffled batches of 32, the protocol's
    measure), averaged over ``repeats`` passes with fresh captions, crops and batches; and the chance level."""
    from backend import metrics

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tops, batch = [], min(32, len(dataset))
    for _ in range(repeats):
        text, motion = embed_dataset(model, dataset)
        tops.append(metrics.r_precision(text, motion, batch_size=batch, rng=rng))
    top = np.mean(tops, axis=0)
    return {
        "R@1": float(top[0]),
        "R@2": float(top[1]),
        "R@3": float(top[2]),
        "batch": batch,
        "chance_R@1": 1.0 / batch,
        "chance_R@3": 3.0 / batch,
    }


class EvaluatorTask:
    """``python -m backend.train evaluator``: the task the training loop of :mod:`backend.train` runs.

    Config: ``evaluator`` (the model keys of :class:`Evaluator`) and ``train.evaluator`` (``batch_size``, ``lr``,
    ``steps``, ``warmup``, ``max_frames`` (random crops of at most this many frames), ``save_every``). Every save
    measures the held-out retrieval accuracy on the val split and writes it into config.json.
    """

    def __init__(self, config: dict, args: argparse.Namespace, device: torch.device):
        from backend.data.dataset import MotionDataset, load_normalizer

        self.config, self.device = config, device
        mean, std = load_normalizer(args.data)
        config["evaluator"]["feature_dim"] = int(np.asarray(mean).shape[0])
        typed = ModelConfig.from_dict(config)
        self.model = Evaluator(typed.evaluator).to(device)
        self.model.set_normalizer(mean, std)
        stage = typed.train.evaluator
        max_frames = stage.max_frames
        self.dataset = MotionDataset(args.data, "train", max_frames=max_frames, unit=UNIT,
                                     source_repeats=stage.source_repeats)
        self.val = MotionDataset(args.data, "val", max_frames=max_frames, unit=UNIT)
        if len(self.val) < 2:
            raise ValueError(f"{args.data} has {len(self.val)} val clips: the evaluator needs a val split")
        self.data = str(Path(args.data).resolve())
        self.val_history: list[dict] = []

    def loss(self, model: nn.Module, items: list[dict]) -> dict[str, torch.Tensor]:
        from backend.data.dataset import collate_motion

        batch = collate_motion(items)
        feats = denormalize(batch, self.model.motion.mean, self.model.motion.std)
        return {"loss": model(feats, batch["lengths"].to(self.device), batch["captions"])}

    def export(self, folder: Path, step: int) -> None:
        val = retrieval_accuracy(self.model, self.val) | {"step": step}
        self.model.train()
        self.val_history.append(val)
        print(
            f"\nevaluator step {step}: val R-precision top-1 {val['R@1']:.3f}, top-2 {val['R@2']:.3f}, "
            f"top-3 {val['R@3']:.3f} (batches of {val['batch']}; chance {val['chance_R@1']:.3f}, "
            f"{val['chance_R@3']:.3f})",
            flush=True,
        )
        save_weights(folder / WEIGHTS, self.model, {"step": str(step)})
        save_json(
            folder / "config.json",
            {
                **self.config,
                "kind": "evaluator",
                "step": step,
                "data": self.data,
                "val": val,
                "val_history": self.val_history,
            },
        )

    def extra_state(self) -> dict:
        return {"val_history": self.val_history}

    def load_extra_state(self, state: dict) -> None:
        self.val_history = list(state.get("val_history", []))
