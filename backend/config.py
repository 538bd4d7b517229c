"""Model and training configs as typed sections: every key of a config is known, typed and checked.

    config = ModelConfig.from_dict(read_config_file("tiny"))   # ValueError naming any unknown or mistyped key
    Diffusion.from_config(config.diffusion)

Each default is written here once: the models and training read these sections, not the dicts.

``read_config_file`` and ``load_config`` (backend.checkpoint) check every config they read this way; the
dict stays the on-disk form (JSON, ``"base"`` inheritance, what training records in a run folder).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VAEConfig:
    """``vae``: the motion VAE (backend.models.vae.MotionVAE)."""

    latent_dim: int = 8
    width: int = 128
    layers: int = 1
    d_state: int = 16
    expand: float = 2.0


@dataclass(frozen=True)
class MotionMambaConfig:
    """``denoiser`` with ``arch: motion_mamba`` (backend.models.denoiser)."""

    arch: str
    dims: list[int]
    scans: list[int]
    groups: int = 8
    heads: int = 4
    d_state: int = 16
    expand: float = 2.0
    guidance_embed: bool = False  # a consistency-distilled student takes the guidance scale as an input


@dataclass(frozen=True)
class MLDTransformerConfig:
    """``denoiser`` with ``arch: mld_transformer`` (backend.models.transformer_denoiser)."""

    arch: str
    d_model: int
    layers: int
    heads: int = 4
    ff_dim: int | None = None  # 4 * d_model
    dropout: float = 0.1


DENOISERS: dict[str, type] = {"motion_mamba": MotionMambaConfig, "mld_transformer": MLDTransformerConfig}


@dataclass(frozen=True)
class DiffusionConfig:
    """``diffusion``: the noise schedule (backend.models.diffusion.Diffusion)."""

    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "epsilon"


@dataclass(frozen=True)
class LCMConfig:
    """``lcm``: the consistency-distilled few-step sampler shipped beside a checkpoint (backend.lcm)."""

    guidance_min: float = 1.0  # the guidance scales the student learns (drawn uniformly in training)
    guidance_max: float = 5.0
    skip: int = 20  # teacher timesteps per distillation step (a 50-step DDIM grid over 1000)
    ema: float = 0.95  # decay of the target network
    max_steps: int = 4  # requests with at most this many steps use the fast sampler
    refine_from: int = 0  # 0: those steps are all the student's; t: its one step, the rest the teacher's from t
    endpoint_weight: float = 0.0  # weight of the one-step loss on the teacher's own samples (0: plain LCD)
    endpoint_pairs: int = 1024  # (noise, teacher sample) pairs made once at the start when that weight is > 0
    endpoint_teacher_steps: int = 10  # the teacher's DDIM steps for each of those samples
    teacher: str | None = None  # recorded by training
    step: int | None = None  # training steps the student had


@dataclass(frozen=True)
class TextEncoderConfig:
    """``text_encoder``: the frozen sentence encoder's folder (None: the shipped one) and token count."""

    path: str | None = None
    max_length: int = 32


@dataclass(frozen=True)
class StageConfig:
    """``train.vae`` / ``train.denoiser`` / ``train.evaluator``: one training stage (backend.train)."""

    batch_size: int
    lr: float
    steps: int
    max_frames: int
    warmup: int = 0
    schedule_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 1000
    kl_weight: float = 1e-4  # vae
    acc_weight: float = 0.0  # vae: weight of the second-difference (jitter) reconstruction loss
    cond_drop: float = 0.1  # denoiser
    vae: str | None = None  # denoiser: the VAE run it was trained on (recorded by training)
    source_repeats: dict | None = None  # {source: n}: each clip of that source listed n times per epoch


@dataclass(frozen=True)
class TrainConfig:
    """``train``: the seed and the stages."""

    seed: int = 0
    vae: StageConfig | None = None
    denoiser: StageConfig | None = None
    evaluator: StageConfig | None = None
    lcm: StageConfig | None = None


@dataclass(frozen=True)
class EvaluatorConfig:
    """``evaluator``: the text-motion retrieval model (backend.models.evaluator)."""

    hidden: int
    embed_dim: int
    feature_dim: int | None = None  # set from the data by training
    layers: int = 2
    text_layers: int = 1
    heads: int = 4
    temperature: float = 0.1
    negative_filter: float = 0.8
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(frozen=True)
class ModelConfig:
    """A whole config file or run folder's ``config.json``."""

    name: str = "unnamed"
    format: str | None = None
    kind: str | None = None  # "vae" | "pipeline" | "evaluator" in a run folder
    step: int | None = None
    fps: int = 20
    feature_dim: int = 263
    max_seconds: float = 120.0
    latent_scale: float | None = None
    rotation_channels: str = "auto"  # the data's rotation-channel convention (backend.motion.rotation_channels)
    cpu_threads: int | None = 1
    vae: VAEConfig | None = None
    denoiser: MotionMambaConfig | MLDTransformerConfig | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    lcm: LCMConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluator: EvaluatorConfig | None = None
    data: str | None = None  # the dataset a run was trained on (recorded by training)
    val: dict | None = None  # an evaluator run's last validation
    val_history: list[dict] | None = None  # and every one before it

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """The typed config; ValueError naming the first unknown, missing or mistyped key (``source``: where
        the dict came from, for the message)."""
        return _build(cls, data, source)


def denoiser_config(data: dict[str, Any], source: str = "denoiser") -> MotionMambaConfig | MLDTransformerConfig:
    """A ``denoiser`` section typed by its ``arch``; ValueError naming an unknown, missing or mistyped key."""
    return _build(object, data, source)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    if cls is object:  # a denoiser: its arch picks the section type
        arch = data.get("arch")
        if arch not in DENOISERS:
            raise ValueError(f"{where}: unknown denoiser arch {arch!r}; known: {', '.join(DENOISERS)}")
        cls = DENOISERS[arch]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")
    return cls(**{key: _value(hints[key], value, f"{where}.{key}") for key, value in data.items()})


def _value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against a field's type hint (sections built recursively)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{where} must not be null")
    sections = [t for t in options if dataclasses.is_dataclass(t)]
    if len(sections) > 1:  # the denoiser union
        return _build(object, value, where)
    if sections:
        return _build(sections[0], value, where)
    for kind in options:
        origin = typing.get_origin(kind) or kind
        if origin is bool and isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, dict) and isinstance(value, origin):
            return value
        if origin is list and isinstance(value, list):
            item = typing.get_args(kind)[0]
            return [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options if t is not type(None))
    raise ValueError(f"{where} must be {names}, got {type(value).__name__} {value!r:.40}")
