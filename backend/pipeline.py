"""Text -> motion: the one generation API that the CLI, the server, the tools and the tests share.

    pipe = MotionPipeline.from_checkpoint()              # backend/weights/default, or a run folder
    motion = pipe("a person walks forward", seconds=10.0, seed=0)
    motion = pipe(GenerateRequest("a person walks forward", seconds=10.0))   # the same, as the wire's type
    for sample, start, chunk in pipe.stream(...):        # frames chunk by chunk, as the VAE decodes
        ...

Fields, their defaults and the prompt checks are ``addon.wire.GenerateRequest``'s; the pipeline adds only its
model's limits (``MotionPipeline.limits``: length, steps, batch size).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from addon.timeline import TimelineRow
from addon.wire import GenerateRequest, Limits
from backend.checkpoint import load_config, load_normalizer, load_weights, read_config_file
from backend.config import ModelConfig
from backend.coverage import CaptionIndex, Coverage
from backend.editing import CONTEXT_S, check_motion, piece_features, place_range, with_gap
from backend.models.consistency import STUDENT_FILE, build_student, consistency_x0, fast_schedule
from backend.models.denoiser import build_denoiser
from backend.models.diffusion import Diffusion
from backend.models.text_encoder import TextEncoder
from backend.models.vae import DOWNSAMPLE, MotionVAE
from backend.motion import (
    PLANT_REACH,
    ROTATION_CHANNELS,
    SMOOTH_REACH,
    features_to_joints,
    forward_kinematics,
    plant_feet,
    smooth_pose,
)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"
MAX_SAMPLES = 64  # samples per prompt in one call
TEXT_CACHE = 256  # prompts whose text encoding a pipeline keeps (a new seed or a repeated prompt skips it)
STREAM_TOKENS = 8  # latent tokens (32 frames, 1.6 s at 20 fps) in a stream's first chunk
TIMELINE_BLEND_S = 1.0  # seconds each side of a timeline row over which it hands over to its neighbours


@dataclass
class Motion:
    """A generated motion (or a streamed chunk of one) on the canonical 22-joint skeleton."""

    features: np.ndarray  # (T, 263) float32, de-normalised HumanML3D features
    positions: np.ndarray  # (T, 22, 3) metres, Y up
    root_translation: np.ndarray  # (T, 3)
    rotations: np.ndarray  # (T, 22, 4) local quaternions w, x, y, z
    fps: int
    prompt: str
    seed: int

    @property
    def frames(self) -> int:
        return int(self.features.shape[0])

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


@dataclass
class Window:
    """Where the denoiser runs: latent tokens ``lo..hi`` of sample ``sample`` with ``prompts[prompt]``; its
    output counts ``weight`` (hi - lo,) where windows overlap."""

    sample: int
    lo: int
    hi: int
    prompt: int
    weight: torch.Tensor


Plan = tuple[list[str], list[Window]]  # texts and the windows that use them


@dataclass
class Known:
    """Latent tokens fixed in advance (scaled latents (S, N, C) and a mask (S, N) True = known) and the noise
    (S, N, C) that brings them to each step's noise level."""

    latent: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor

    def put_back(self, x: torch.Tensor, diffusion: Diffusion, t: int | None) -> torch.Tensor:
        """``x`` with the known tokens replaced by theirs at timestep ``t`` (None: the clean latent)."""
        if t is None:
            value = self.latent
        else:
            value = diffusion.add_noise(self.latent, self.noise, torch.full((len(x),), t, dtype=torch.long))
        return torch.where(self.mask[..., None].to(x.device), value.to(x.device, x.dtype), x)


def concat_motions(chunks: Sequence[Motion]) -> Motion:
    """Join consecutive chunks of one sample (as ``MotionPipeline.stream`` yields them) into one Motion."""
    first = chunks[0]
    return Motion(*(np.concatenate([getattr(c, k) for c in chunks]) for k in
                    ("features", "positions", "root_translation", "rotations")),
                  fps=first.fps, prompt=first.prompt, seed=first.seed)


def collect(stream: Iterator[tuple[int, int, Motion]]) -> list[Motion]:
    """The whole motions of a stream (``MotionPipeline.stream`` or ``timeline``), one per sample in order."""
    chunks: dict[int, list[Motion]] = {}
    for k, _, chunk in stream:
        chunks.setdefault(k, []).append(chunk)
    return [concat_motions(chunks[k]) for k in sorted(chunks)]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: leave as is), restoring the previous count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MotionPipeline:
    """Text encoder + latent denoiser + DDIM + windowed VAE decoder + features -> positions/rotations."""

    def __init__(self, config: dict, vae: MotionVAE, denoiser: nn.Module, text_encoder: TextEncoder,
                 mean: np.ndarray, std: np.ndarray, device: torch.device, source: str):
        typed = ModelConfig.from_dict(config, source)
        self.config = config
        self.device = device
        self.vae = vae.to(device).eval()
        self.denoiser = denoiser.to(device).eval()
        self.text_encoder = text_encoder.to(device).eval()
        self.diffusion = Diffusion.from_config(typed.diffusion)
        self.latent_scale = typed.latent_scale or 1.0
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self.fps = typed.fps
        self.max_seconds = typed.max_seconds
        self.source = source
        # Torch threads while generating on the CPU. Every op here is small (a few thousand values), so more
        # threads gain nothing, and on a busy machine they wait on each other: measured on 2 shared cores,
        # 10 s of motion took 1.3 s with 1 thread and 22-80 s with 2. None leaves torch's setting alone.
        self.cpu_threads = typed.cpu_threads
        self.captions: CaptionIndex | None = None  # what the model was trained on, when its checkpoint says
        self.lcm = typed.lcm  # the consistency-distilled sampler's settings, when the checkpoint ships one
        self.student: nn.Module | None = None  # that sampler's denoiser (``backend.lcm``)
        if typed.rotation_channels not in ROTATION_CHANNELS:
            raise ValueError(f"{source}: rotation_channels must be one of {ROTATION_CHANNELS}, got "
                             f"{typed.rotation_channels!r}")
        self.rotation_channels = typed.rotation_channels  # the training data's convention ("auto": detect)

    @classmethod
    def _build(cls, config: dict, source: str) -> MotionPipeline:
        typed = ModelConfig.from_dict(config, source)
        encoder = TextEncoder(typed.text_encoder.path, max_length=typed.text_encoder.max_length,
                              cache_size=TEXT_CACHE)
        vae = MotionVAE.from_config(typed)
        denoiser = build_denoiser(typed.denoiser, vae.latent_dim, encoder.dim)
        d = typed.feature_dim
        pipe = cls(config, vae, denoiser, encoder, np.zeros(d, np.float32), np.ones(d, np.float32),
                   torch.device("cpu"), source)
        if typed.lcm is not None:
            lcm = typed.lcm
            try:  # the schedule of the most steps it takes: a bad lcm section fails here, naming the checkpoint
                fast_schedule(max(lcm.max_steps, 1), lcm.skip, typed.diffusion.num_timesteps, lcm.refine_from)
            except ValueError as error:
                raise ValueError(f"{source}: its lcm section: {error}") from None
            pipe.student = build_student(typed, vae.latent_dim, encoder.dim).eval()
        return pipe

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "auto") -> MotionPipeline:
        """Load a generation checkpoint folder (a denoiser run folder, or ``backend/weights/default``)."""
        if path is None:
            path = DEFAULT_WEIGHTS
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"no shipped weights at {path}. Train a model (python -m backend.train vae --data DATASET "
                    f"--out runs/vae; python -m backend.train denoiser --data DATASET --vae runs/vae --out "
                    f"runs/mld), then pass its folder (--checkpoint runs/mld) or copy it to {path}")
        path = Path(path)
        config = load_config(path)
        if config.get("kind") != "pipeline":
            raise ValueError(f"{path} is a {config.get('kind')!r} run, not a generation checkpoint: train a "
                             f"denoiser on it (python -m backend.train denoiser --vae {path} ...) and load that")
        pipe = cls._build(config, str(path))
        load_weights(pipe.vae, path / "vae.safetensors")
        load_weights(pipe.denoiser, path / "denoiser.safetensors")
        mean, std = load_normalizer(path)
        if mean.shape != (pipe.vae.feature_dim,):
            raise ValueError(f"{path}: normaliser has shape {mean.shape}, the VAE expects {pipe.vae.feature_dim}")
        pipe.mean, pipe.std = mean, std
        pipe.captions = CaptionIndex.load(path)
        if pipe.student is not None:
            load_weights(pipe.student, path / STUDENT_FILE)
        return pipe.to(resolve_device(device))

    @classmethod
    def random(cls, config: str | Path = "tiny", device: str = "cpu", seed: int = 0) -> MotionPipeline:
        """Random weights from ``configs/<config>.json`` (tests, benchmarks): finite but meaningless motion."""
        cfg = read_config_file(config)
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's global RNG untouched
            torch.manual_seed(seed)
            pipe = cls._build(cfg, f"random:{cfg['name']}")
        return pipe.to(resolve_device(device))

    def to(self, device: str | torch.device) -> MotionPipeline:
        self.device = resolve_device(device)
        for module in (self.vae, self.denoiser, self.text_encoder, self.student):
            if module is not None:
                module.to(self.device)
        return self

    def describe(self) -> dict:
        """Model name, architecture, device, parameter counts, limits."""
        return {
            "model": self.config.get("name", "unnamed"),
            "arch": self.config["denoiser"]["arch"],
            "source": Path(self.source).name,  # the folder's name: replies carry no absolute path
            "device": str(self.device),
            "fps": self.fps,
            "max_seconds": self.max_seconds,
            "text_encoder": self.text_encoder.name,
            "latent_dim": self.vae.latent_dim,
            "fast_steps": self.lcm.max_steps if self.student is not None else 0,
            "params": {"vae": _num_params(self.vae), "denoiser": _num_params(self.denoiser),
                       "text_encoder": _num_params(self.text_encoder)},
        }

    def coverage(self, prompt: str, k: int = 3) -> Coverage | None:
        """How close ``prompt`` comes to the training captions (the ``k`` nearest, and whether it is ``known``);
        None when the checkpoint carries no caption index."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("coverage needs a non-empty prompt")
        if self.captions is None:
            return None
        return self.captions.query(self.text_encoder, prompt, k)

    # --- generation ---------------------------------------------------------------------------------

    def uses_student(self, steps: int) -> bool:
        """Whether ``steps`` denoising steps run the consistency-distilled sampler (few steps, when shipped)
        rather than DDIM with classifier-free guidance on the teacher."""
        return self.student is not None and steps <= self.lcm.max_steps

    def sampler(self, steps: int) -> str:
        """What runs ``steps`` steps, as reports name it: "fast" (``uses_student``) or "DDIM"."""
        return "fast" if self.uses_student(steps) else "DDIM"

    @property
    def limits(self) -> Limits:
        """What this model takes: the protocol's limits with the model's own length, steps and samples; one
        frame at least; no cost cap in process (a server sets its own)."""
        return Limits(min_seconds=0.5 / self.fps, max_seconds=self.max_seconds,
                      max_steps=self.diffusion.num_timesteps, max_samples=MAX_SAMPLES, max_seed=2**53 - MAX_SAMPLES,
                      max_cost=2**62, fps=float(self.fps))

    def requests(self, prompt: str | GenerateRequest | Sequence[str | GenerateRequest],
                 seed: int | Sequence[int] | None = None, **fields: object) -> list[GenerateRequest]:
        """Checked requests, one per prompt: GenerateRequests as given, or built from prompts, ``seed`` (one, or
        one per prompt) and the other fields (defaults: GenerateRequest's). Requests generated together must
        agree on everything but prompt and seed. Bad arguments raise ValueError (WireError) or TypeError."""
        items = [prompt] if isinstance(prompt, (str, GenerateRequest)) else prompt
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError("prompt must be a non-empty string or a non-empty list of strings")
        seeds = [seed] * len(items) if seed is None or isinstance(seed, numbers.Integral) else seed
        if not isinstance(seeds, (list, tuple)) or len(seeds) != len(items):
            raise TypeError("seed must be an int or a list of ints, one per prompt")
        out = []
        for item, s in zip(items, seeds):
            if isinstance(item, GenerateRequest):
                if s is not None or fields:
                    raise TypeError("give GenerateRequests or prompts with fields, not both")
                out.append(item.check(self.limits))
                continue
            if not isinstance(item, str):
                raise TypeError(f"every prompt must be a string, got {type(item).__name__}")
            if s is not None:
                fields["seed"] = int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s
            out.append(GenerateRequest(item, **fields).check(self.limits))
        shared = {(r.seconds, r.guidance, r.steps, r.samples, r.timeline) for r in out}
        if len(shared) > 1:
            raise ValueError("requests generated together must share seconds, guidance, steps, samples and timeline")
        return out

    @torch.inference_mode()
    def _latents(self, prompts: list[str], seeds: list[int], tokens: int, guidance: float, steps: int,
                 callback: Callable[[int, int], None] | None, stop: Callable[[], bool] | None,
                 windows: list[Window] | None = None, known: Known | None = None) -> torch.Tensor | None:
        """The denoising loop, DDIM in latent space: one noise tensor per sample from its own seeded generator,
        then a scheduler step per timestep. ``stop()`` is asked before each step; True ends it (None).

        The denoiser runs on ``windows`` (default: one per sample, the whole latent, ``prompts[sample]``); where
        windows overlap their outputs blend by their weights (a timeline). ``known`` latent tokens are put back,
        noised to the step's level, after every step (inpainting), and exactly at the end.

        The fast sampler (``uses_student``) runs ``fast_schedule``: the consistency student's steps take guidance
        as an input, not a second batch (clamped to the range it learned), predict the clean latent and noise it
        afresh to the next step's level; the teacher's refining steps after it (``lcm.refine_from``) are DDIM's."""
        c = self.vae.latent_dim
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        def draw() -> torch.Tensor:  # the next noise of every sample, from its own seeded generator
            return torch.stack([torch.randn(tokens, c, generator=g) for g in generators]).to(self.device)

        x = draw()  # the starting noise, drawn before anything else for the same seeds as before
        student = self.student if self.uses_student(steps) else None
        plain = windows is None  # one window per sample, the whole latent: no gathering or blending
        if plain:
            windows = [Window(k, 0, tokens, k, torch.ones(tokens)) for k in range(len(seeds))]
        texts = list(dict.fromkeys(prompts))
        text = self.text_encoder(texts)
        which = torch.tensor([texts.index(prompts[w.prompt]) for w in windows], device=self.device)
        n, longest = len(windows), max(w.hi - w.lo for w in windows)
        mask = None
        if any(w.hi - w.lo < longest for w in windows):
            mask = torch.stack([torch.arange(longest) < w.hi - w.lo for w in windows]).to(self.device)
        if student is not None:
            scale = min(max(guidance, self.lcm.guidance_min), self.lcm.guidance_max)
            student_args = (text.tokens[which], text.mask[which], text.pooled[which], None, mask,
                            torch.full((n,), scale, device=self.device))
            schedule = fast_schedule(steps, self.lcm.skip, self.diffusion.num_timesteps, self.lcm.refine_from)
        else:
            schedule = [(t, False) for t in self.diffusion.ddim_timesteps(steps)]
        if guidance != 1.0:  # the teacher's batch: conditional first half, unconditional second half
            args = (text.tokens[which].repeat(2, 1, 1), text.mask[which].repeat(2, 1),
                    text.pooled[which].repeat(2, 1), torch.arange(2 * n, device=self.device) >= n,
                    None if mask is None else mask.repeat(2, 1))
        else:
            args = (text.tokens[which], text.mask[which], text.pooled[which], None, mask)
        total = torch.zeros(len(seeds), tokens, 1, device=self.device)
        for w in windows:
            total[w.sample, w.lo: w.hi, 0] += w.weight.to(self.device)

        def model_fn(x: torch.Tensor, t: torch.Tensor, by_student: bool) -> torch.Tensor:
            if plain:
                batch = x
            else:
                batch = torch.zeros(n, longest, c, dtype=x.dtype, device=x.device)
                for k, w in enumerate(windows):
                    batch[k, : w.hi - w.lo] = x[w.sample, w.lo: w.hi]
            step = t[:1].expand(n)
            if by_student:
                out = student(batch, step, *student_args)
            elif guidance == 1.0:
                out = self.denoiser(batch, step, *args)
            else:
                cond, uncond = self.denoiser(batch.repeat(2, 1, 1), step.repeat(2), *args).chunk(2)
                out = uncond + guidance * (cond - uncond)
            if plain:
                return out
            blended = torch.zeros_like(x)
            for k, w in enumerate(windows):
                blended[w.sample, w.lo: w.hi] += w.weight.to(x.device)[:, None] * out[k, : w.hi - w.lo]
            return blended / total

        for i, (t, by_student) in enumerate(schedule):
            if stop is not None and stop():
                return None
            t_batch = torch.full((len(x),), t, dtype=torch.long, device=self.device)
            output = model_fn(x, t_batch, by_student)
            t_prev = schedule[i + 1][0] if i + 1 < len(schedule) else None
            if not by_student:
                x = self.diffusion.ddim_step(output, x, t, t_prev)
            else:
                x = consistency_x0(self.diffusion, output, x, t_batch)
                if t_prev is not None:
                    x = self.diffusion.add_noise(x, draw(), torch.full_like(t_batch, t_prev))
            if known is not None:
                x = known.put_back(x, self.diffusion, t_prev)
            if callback is not None:
                callback(i + 1, len(schedule))
        return x / self.latent_scale

    def stream(self, prompt: str | GenerateRequest | Sequence[str | GenerateRequest],
               seed: int | Sequence[int] | None = None, callback: Callable[[int, int], None] | None = None,
               stop: Callable[[], bool] | None = None, **fields: object) -> Iterator[tuple[int, int, Motion]]:
        """Yield (sample_index, start_frame, chunk) as the VAE decodes the latent chunk by chunk.

        Takes what ``requests`` takes. Samples are ordered prompt by prompt, ``samples`` per prompt; sample k of
        a prompt uses seed + k. ``callback(step, total)`` runs after every denoising step; ``stop()`` is asked
        before every step and window, and True ends the stream early (how a server cancels: no exception).
        Arguments are checked at the call, before the first chunk is asked for.
        """
        return self._stream(*self._work(prompt, seed, fields), callback, stop)

    def _work(self, prompt: str | GenerateRequest | Sequence[str | GenerateRequest],
              seed: int | Sequence[int] | None, fields: dict) -> tuple:
        """The checked requests as ``_stream``'s first arguments: sample names, seeds, frames, guidance, steps,
        and the timeline's plan (None for prompts)."""
        requests = self.requests(prompt, seed, **fields)
        first = requests[0]
        seeds = [r.seed + k for r in requests for k in range(first.samples)]
        frames = first.frames(self.fps)
        if first.timeline:
            label = " | ".join(f"{row.start:g}-{row.end:g} s: {row.prompt}" for row in first.timeline)
            plan = self._timeline_plan(first.timeline, len(seeds), -(-frames // DOWNSAMPLE))
            return [label] * len(seeds), seeds, frames, float(first.guidance), first.steps, plan
        prompts = [r.prompt for r in requests for _ in range(first.samples)]
        return prompts, seeds, frames, float(first.guidance), first.steps, None

    def timeline(self, rows: Sequence[TimelineRow], seed: int = 0, samples: int = 1,
                 guidance: float = GenerateRequest.guidance, steps: int = GenerateRequest.steps,
                 callback: Callable[[int, int], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, int, Motion]]:
        """Stream one continuous motion directed by timeline rows (``addon.timeline``): ``stream`` of a
        ``GenerateRequest(timeline=rows, ...)``."""
        request = GenerateRequest(timeline=tuple(rows), seed=seed, samples=samples, guidance=guidance, steps=steps)
        return self.stream(request, callback=callback, stop=stop)

    def _timeline_plan(self, rows: Sequence[TimelineRow], samples: int, tokens: int) -> Plan:
        """Every row's prompt conditions the denoiser on its own window of the latent: the row's tokens plus
        ``TIMELINE_BLEND_S`` each side. Where windows overlap, the outputs mix with weights that fall linearly
        from 1 at the row's edge to ~0 that far beyond it, at every denoising step: one latent, decoded in one
        pass, so segments join without seams and none drifts from its neighbours' poses."""
        per_second = self.fps / DOWNSAMPLE
        margin = max(1, round(TIMELINE_BLEND_S * per_second))
        texts = list(dict.fromkeys(row.prompt for row in rows))
        windows = []
        for sample in range(samples):
            for row in rows:
                lo_row = min(tokens - 1, round(row.start * per_second))
                hi_row = max(lo_row + 1, min(tokens, round(row.end * per_second)))
                lo, hi = max(0, lo_row - margin), min(tokens, hi_row + margin)
                at = torch.arange(lo, hi)
                outside = torch.clamp(torch.maximum(lo_row - at, at - (hi_row - 1)), min=0).float()
                weight = torch.where(outside > 0, (margin - outside + 0.5) / margin, torch.ones(()))
                windows.append(Window(sample, lo, hi, texts.index(row.prompt), weight))
        return texts, windows

    @torch.inference_mode()
    def _stream(self, prompts: list[str], seeds: list[int], frames: int, guidance: float, steps: int,
                plan: Plan | None, callback: Callable[[int, int], None] | None, stop: Callable[[], bool] | None,
                whole: bool = False) -> Iterator[tuple[int, int, Motion]]:
        """Denoise (``plan``: the texts and windows of a timeline, else one window per sample with its prompt)
        and decode; ``prompts`` name the samples. ``whole``: one chunk per sample (no streaming: the latent
        decoded once, rotations computed once)."""
        threads = self.cpu_threads if self.device.type == "cpu" else None
        texts, windows = (prompts, None) if plan is None else plan
        with torch_threads(threads):
            z = self._latents(texts, seeds, -(-frames // DOWNSAMPLE), guidance, steps, callback, stop, windows)
        if z is None:
            return
        decoded: list[list[np.ndarray]] = [[] for _ in prompts]
        tokens = z.shape[1]
        # Chunks of STREAM_TOKENS latent tokens, then as many as were yielded before (1, 1, 2, 4, ... times): the
        # first frames come at once, and decoding each chunk's prefix stays linear in the length overall.
        bounds, done = [], 0
        while done < tokens:
            size = tokens if whole else STREAM_TOKENS * max(1, done // STREAM_TOKENS)
            bounds.append((done, min(tokens, done + size)))
            done = bounds[-1][1]
        for lo, hi in bounds:
            if stop is not None and stop():
                return
            start = lo * DOWNSAMPLE
            with torch_threads(threads):  # not held across a yield: the caller runs with its own setting
                features = self._decode(z, lo, hi)[:, : frames - start]
                chunks = [self._chunk(decoded[k], features[k], start, prompts[k], seeds[k])
                          for k in range(len(prompts))]
            for k, chunk in enumerate(chunks):
                yield k, start, chunk

    def _decode(self, z: torch.Tensor, start: int, stop: int) -> np.ndarray:
        """Frames of latent tokens [start, stop) of z (B, N, C) as features (B, frames, D): de-normalised, the
        pose's jitter filtered (``smooth_pose``), the feet planted (``plant_feet``); both read a margin of frames
        decoded beyond the range, so a chunk's frames are the whole motion's."""
        margin = -(-(SMOOTH_REACH + PLANT_REACH) // DOWNSAMPLE)
        lo, hi = max(0, start - margin), min(z.shape[1], stop + margin)
        features = self.vae.decode(z, hi)[:, DOWNSAMPLE * lo:].float().cpu().numpy() * self.std + self.mean
        return plant_feet(smooth_pose(features))[:, DOWNSAMPLE * (start - lo): DOWNSAMPLE * (stop - lo)]

    def _chunk(self, decoded: list[np.ndarray], features: np.ndarray, start: int, prompt: str,
               seed: int) -> Motion:
        """Frames ``start..`` of one sample; positions and rotations come from the whole prefix decoded so
        far, since the root's path and heading integrate over it."""
        decoded.append(features)
        positions, rotations = self._joints(np.concatenate(decoded))
        # the root translation its own array, as before: not a view a caller could move the positions through
        return Motion(features, positions[start:], positions[start:, 0].copy(), rotations[start:], self.fps, prompt,
                      seed)

    def _joints(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``features_to_joints`` (positions, rotations) in the convention of the model's training data, which its
        checkpoint records (detecting it on every chunk cost a third of the rotations; "auto" still does)."""
        return features_to_joints(features, self.rotation_channels)

    @torch.inference_mode()
    def edit(self, root_translation: np.ndarray, rotations: np.ndarray, start: int, stop: int, prompt: str,
             seed: int = 0, guidance: float = GenerateRequest.guidance, steps: int = GenerateRequest.steps,
             callback: Callable[[int, int], None] | None = None,
             stop_when: Callable[[], bool] | None = None) -> Motion | None:
        """Generate frames [start, stop) of a world-space motion (root translation (T, 3), local rotations
        (T, 22, 4), this model's fps) for ``prompt``, keeping every other frame exactly and joining them
        (``backend.editing``: the kept motion around the range is known latent tokens at every denoising step).
        Returns the whole motion (None if ``stop_when()`` ended it early)."""
        root_w, rot_w = check_motion(root_translation, rotations, start, stop)
        request = GenerateRequest(prompt, seconds=max((stop - start) / self.fps, self.limits.min_seconds),
                                  seed=seed, guidance=guidance, steps=steps).check(self.limits)
        frames, context = root_w.shape[0], round(CONTEXT_S * self.fps)
        lo, hi = max(0, start - context), min(frames, stop + context)
        kept = np.r_[0:start, stop:frames]
        floor = float(forward_kinematics(root_w[kept], rot_w[kept])[..., 1].min())
        tokens = -(-(hi - lo) // DOWNSAMPLE)
        latent = torch.zeros(1, tokens, self.vae.latent_dim)
        mask = torch.zeros(1, tokens, dtype=torch.bool)
        first_after = -(-(stop - lo) // DOWNSAMPLE)  # the first token wholly after the range
        for first, begin, end in ((0, lo, start), (first_after, lo + DOWNSAMPLE * first_after, hi)):
            if end - begin < DOWNSAMPLE + 1:  # features need a next frame: too short to fill a token
                continue
            features = piece_features(root_w[begin:end], rot_w[begin:end], floor)
            count = min(features.shape[0] // DOWNSAMPLE, tokens - first)
            x = torch.from_numpy(((features[: DOWNSAMPLE * count] - self.mean) / self.std).astype(np.float32))
            mu, _ = self.vae.encode(x[None].to(self.device))
            latent[:, first: first + count] = mu.cpu() * self.latent_scale
            mask[:, first: first + count] = True
        noise = torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(request.seed + 2**31))[None]
        known = Known(latent.to(self.device), mask.to(self.device), noise.to(self.device))
        threads = self.cpu_threads if self.device.type == "cpu" else None
        with torch_threads(threads):
            z = self._latents([request.prompt], [request.seed], tokens, float(request.guidance), request.steps,
                              callback, stop_when, known=known)
            if z is None:
                return None
            decoded = self._decode(z, 0, tokens)[0]
        positions, rot_c = self._joints(decoded.astype(np.float64))
        root_c = positions[:, 0]
        root_g, rot_g = place_range(root_w, rot_w, root_c, rot_c, lo, start, stop, floor, self.fps)
        root_w[start:stop], rot_w[start:stop] = root_g, rot_g
        features = piece_features(root_w, rot_w, floor)
        return Motion(np.concatenate([features, features[-1:]]).astype(np.float32),
                      forward_kinematics(root_w, rot_w).astype(np.float32), root_w.astype(np.float32),
                      rot_w.astype(np.float32), self.fps, request.prompt, request.seed)

    def continue_motion(self, root_translation: np.ndarray, rotations: np.ndarray, seconds: float, prompt: str,
                        **options: object) -> Motion | None:
        """The motion, then ``seconds`` more of it for ``prompt`` (``edit`` of frames appended at its end)."""
        frames, extra = len(root_translation), max(1, round(seconds * self.fps))
        root, rot = with_gap(root_translation, rotations, frames, extra)
        return self.edit(root, rot, frames, frames + extra, prompt, **options)

    def bridge(self, first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], seconds: float,
               prompt: str, **options: object) -> Motion | None:
        """``first``, ``seconds`` of ``prompt`` joining it to ``second``, then ``second`` where it is (both
        (root translation, rotations) in one world)."""
        frames, gap = len(first[0]), max(1, round(seconds * self.fps))
        root, rot = with_gap(np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]]), frames,
                             gap)
        return self.edit(root, rot, frames, frames + gap, prompt, **options)

    def __call__(self, prompt: str | GenerateRequest | Sequence[str | GenerateRequest],
                 seed: int | Sequence[int] | None = None, callback: Callable[[int, int], None] | None = None,
                 **fields: object) -> Motion | list[Motion]:
        """Generate (takes what ``requests`` takes): one Motion for one prompt and one sample, else a list
        (prompt by prompt, then samples)."""
        motions = collect(self._stream(*self._work(prompt, seed, fields), callback, None, whole=True))
        return motions[0] if isinstance(prompt, (str, GenerateRequest)) and len(motions) == 1 else motions
