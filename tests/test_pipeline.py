"""The generation API (random tiny weights): lengths, seeds, batching, streaming, callbacks, long motions,
bad input and bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from backend import generate
from backend.checkpoint import read_config_file, save_array, save_json, save_weights
from backend.models.denoiser import build_denoiser
from backend.pipeline import DEFAULT_WEIGHTS, Motion, MotionPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe() -> MotionPipeline:
    pipe = MotionPipeline.random("tiny", device="cpu", seed=0)
    torch.manual_seed(1)  # zero-initialised output layers would make every motion the same: give them weights
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(std=0.05)
    return pipe


def _equal(a: Motion, b: Motion) -> bool:
    return all(
        np.array_equal(getattr(a, k), getattr(b, k)) for k in ("features", "positions", "root_translation", "rotations")
    )


def test_motion_has_the_requested_length_and_is_consistent(pipe):
    for seconds in (0.1, 1.0, 3.3, 10.0):
        motion = pipe("a person walks forward", seconds=seconds, steps=4)
        frames = round(seconds * pipe.fps)
        assert isinstance(motion, Motion) and motion.frames == frames and motion.fps == 20
        assert motion.features.shape == (frames, 263) and motion.features.dtype == np.float32
        assert motion.positions.shape == (frames, 22, 3) and motion.rotations.shape == (frames, 22, 4)
        assert all(np.isfinite(a).all() for a in (motion.features, motion.positions, motion.rotations))
    np.testing.assert_array_equal(motion.root_translation, motion.positions[:, 0])
    np.testing.assert_allclose(np.linalg.norm(motion.rotations, axis=-1), 1.0, atol=1e-5)


def test_one_frame_motion(pipe):
    assert pipe("a person jumps", seconds=0.05, steps=2).frames == 1


def test_seeds_are_honoured(pipe):
    a = pipe("a person waves", seconds=2.0, seed=5, steps=5)
    assert _equal(a, pipe("a person waves", seconds=2.0, seed=5, steps=5))
    assert not np.allclose(a.features, pipe("a person waves", seconds=2.0, seed=6, steps=5).features)
    assert (a.prompt, a.seed) == ("a person waves", 5)


def test_batched_prompts_match_single_generation(pipe):
    prompts = ["a person walks", "someone jumps up high and lands", "a person bows"]
    batch = pipe(prompts, seconds=1.6, seed=[3, 10, 7], samples=2, steps=5)
    assert [m.prompt for m in batch] == [p for p in prompts for _ in range(2)]
    assert [m.seed for m in batch] == [3, 4, 10, 11, 7, 8]
    alone = pipe("someone jumps up high and lands", seconds=1.6, seed=11, steps=5)
    np.testing.assert_allclose(batch[3].features, alone.features, atol=1e-4)
    assert len(pipe("a person walks", seconds=1.0, samples=3, steps=2)) == 3


def test_call_is_the_concatenation_of_stream(pipe):
    kwargs = {"seconds": 5.3, "seed": [1, 2], "samples": 2, "steps": 4, "guidance": 3.0}
    motions = pipe(["a person walks", "a person runs"], **kwargs)
    chunks: dict[int, list] = {}
    for sample, start, chunk in pipe.stream(["a person walks", "a person runs"], **kwargs):
        assert start == sum(c.frames for c in chunks.get(sample, []))  # contiguous, in order
        chunks.setdefault(sample, []).append(chunk)
    assert sorted(chunks) == [0, 1, 2, 3]
    # 27 latent tokens = 4 decode windows of 8 tokens (32 frames): chunks of 1, 1 and 2 windows
    assert [c.frames for c in chunks[0]] == [32, 32, 42]
    for k, motion in enumerate(motions):  # __call__ decodes in one batched pass: the same frames, to rounding
        for key in ("features", "positions", "root_translation", "rotations"):
            np.testing.assert_allclose(np.concatenate([getattr(c, key) for c in chunks[k]]), getattr(motion, key),
                                       atol=2e-5)


def test_callback_every_step_and_cancel(pipe):
    calls = []
    pipe("a person walks", seconds=1.0, steps=7, callback=lambda s, n: calls.append((s, n)))
    assert calls == [(i, 7) for i in range(1, 8)]

    class Cancelled(Exception):
        pass

    def cancel(step, total):
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe("a person walks", seconds=1.0, steps=7, callback=cancel)


def test_cpu_threads_apply_while_generating_only(pipe):
    seen = []
    torch.set_num_threads(2)
    try:
        for _ in pipe.stream(
            "a person walks", seconds=2.0, steps=2, callback=lambda s, n: seen.append(torch.get_num_threads())
        ):
            seen.append(("caller", torch.get_num_threads()))
        assert seen[:2] == [1, 1] and set(seen[2:]) == {("caller", 2)}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_guidance_changes_the_motion(pipe):
    a = pipe("a person walks", seconds=1.0, steps=4, guidance=1.0)
    b = pipe("a person walks", seconds=1.0, steps=4, guidance=4.0)
    assert not np.allclose(a.features, b.features)


def test_long_motion_sixty_seconds(pipe):
    motion = pipe("a person walks for a long time", seconds=60.0, steps=2)
    assert motion.frames == 1200 and np.isfinite(motion.positions).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": ""}, ValueError, "prompt is empty"),
        ({"prompt": "   "}, ValueError, "prompt is empty"),
        ({"prompt": "x" * 1001}, ValueError, "prompt is 1001 characters long; the limit is 1000"),
        ({"prompt": "walk \ud800"}, ValueError, "lone surrogate"),
        ({"prompt": 3}, TypeError, "prompt must be"),
        ({"prompt": ["walk", None]}, TypeError, "every prompt must be a string"),
        ({"prompt": []}, TypeError, "non-empty"),
        ({"seconds": 0}, ValueError, "'seconds' must be between 0.025 and 120.0"),
        ({"seconds": -2.0}, ValueError, "'seconds' must be between"),
        ({"seconds": 120.5}, ValueError, "and 120.0, got 120.5"),
        ({"seconds": float("nan")}, ValueError, "'seconds' must be a finite number"),
        ({"seconds": "10"}, ValueError, "'seconds' must be a number"),
        ({"seconds": 0.01}, ValueError, "'seconds' must be between 0.025"),
        ({"seconds": 10**400}, ValueError, "'seconds' is out of range"),
        ({"steps": 0}, ValueError, "'steps' must be between 1 and 1000"),
        ({"steps": 2.5}, ValueError, "'steps' must be an integer"),
        ({"guidance": float("inf")}, ValueError, "guidance"),
        ({"samples": 0}, ValueError, "samples"),
        ({"samples": 65}, ValueError, "'samples' must be between 1 and 64"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": [1, 2]}, TypeError, "one per prompt"),
    ],
)
def test_bad_arguments(pipe, kwargs, error, message):
    args = {"prompt": "a person walks", "seconds": 2.0, **kwargs}
    with pytest.raises(error, match=message):
        pipe(**args)
    with pytest.raises(error, match=message):  # stream checks at the call, before any chunk is asked for
        pipe.stream(**args)


def test_describe(pipe):
    info = pipe.describe()
    assert info["model"] == "tiny" and info["arch"] == "motion_mamba" and info["device"] == "cpu"
    assert info["fps"] == 20 and info["max_seconds"] == pipe.max_seconds == 120
    assert info["params"]["denoiser"] == sum(p.numel() for p in pipe.denoiser.parameters())
    json.dumps(info)


def _save_checkpoint(pipe: MotionPipeline, folder, **config_changes) -> None:
    save_weights(folder / "vae.safetensors", pipe.vae)
    save_weights(folder / "denoiser.safetensors", pipe.denoiser)
    save_array(folder / "Mean.npy", pipe.mean)
    save_array(folder / "Std.npy", pipe.std)
    save_json(folder / "config.json", {**pipe.config, "kind": "pipeline", **config_changes})


def test_checkpoint_round_trip(pipe, tmp_path):
    _save_checkpoint(pipe, tmp_path)
    loaded = MotionPipeline.from_checkpoint(tmp_path, device="cpu")
    assert _equal(loaded("a person walks", seconds=1.5, steps=3), pipe("a person walks", seconds=1.5, steps=3))
    assert loaded.describe()["source"] == tmp_path.name and loaded.source == str(tmp_path)  # no absolute path out
    # a checkpoint written when the VAE decoded in windows names them; its weights decode the same, in one pass
    config = json.loads((tmp_path / "config.json").read_text())
    config["vae"].update(window=8, context=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    older = MotionPipeline.from_checkpoint(tmp_path, device="cpu")
    assert _equal(older("a person walks", seconds=1.5, steps=3), pipe("a person walks", seconds=1.5, steps=3))


def test_bad_checkpoints(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MotionPipeline.from_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        MotionPipeline.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a Motion Mamba checkpoint"):
        MotionPipeline.from_checkpoint(tmp_path)
    other = tmp_path / "other_arch"
    other.mkdir()
    _save_checkpoint(pipe, other, denoiser={"arch": "unet3000"})
    with pytest.raises(ValueError, match="unknown denoiser arch 'unet3000'"):
        MotionPipeline.from_checkpoint(other)
    # weights of another architecture under this config: the MLD-style transformer's
    transformer = read_config_file("mld_transformer_tiny")
    swapped = tmp_path / "swapped"
    shutil.copytree(other, swapped)
    save_weights(swapped / "denoiser.safetensors", build_denoiser(transformer["denoiser"], 4, 384))
    save_json(swapped / "config.json", {**pipe.config, "kind": "pipeline"})
    with pytest.raises(ValueError, match="another architecture"):
        MotionPipeline.from_checkpoint(swapped)


def test_no_shipped_weights_says_how_to_get_them(monkeypatch, tmp_path):
    import backend.pipeline

    monkeypatch.setattr(backend.pipeline, "DEFAULT_WEIGHTS", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"python -m backend.train vae"):
        MotionPipeline.from_checkpoint()


@pytest.fixture(scope="module")
def shipped() -> MotionPipeline:
    return MotionPipeline.from_checkpoint(device="cpu")


def _travel(motion: Motion) -> float:
    """Metres between the first and last root position on the floor."""
    return float(np.linalg.norm(motion.root_translation[-1, [0, 2]] - motion.root_translation[0, [0, 2]]))


def test_the_shipped_model_loads_and_generates(shipped):
    assert (DEFAULT_WEIGHTS / "MODEL_CARD.md").is_file(), "the shipped checkpoint needs its model card"
    motion = shipped("an elderly person walks forward slowly", seconds=3.0, seed=0, steps=10)
    assert motion.features.shape == (60, 263) and motion.fps == 20
    assert all(np.isfinite(a).all() for a in (motion.features, motion.positions, motion.rotations))
    assert _travel(motion) > 0.5, f"a 3 s walk should travel, got {_travel(motion):.2f} m"


def test_the_shipped_model_follows_the_prompt(shipped):
    """Prompts whose answer is plain in the joints: which hand is up, and how far a run goes next to a walk."""
    prompts = ["a person waves with the left hand", "a person waves with the right hand",
               "a person raises both hands", "a person walks forward", "a person runs forward"]
    left, right, both, walk, run = shipped(prompts, seconds=4.0, seed=1, steps=10)
    wrists = {name: (m.positions[:, 20, 1].max(), m.positions[:, 21, 1].max())  # left, right wrist heights (m)
              for name, m in (("left", left), ("right", right), ("both", both))}
    assert wrists["left"][0] > 1.5 > 1.2 > wrists["left"][1], wrists
    assert wrists["right"][1] > 1.5 > 1.2 > wrists["right"][0], wrists
    assert min(wrists["both"]) > 1.5, wrists
    assert _travel(run) > 1.8 * _travel(walk) > 1.8 * 2.0, (_travel(run), _travel(walk))


def test_a_generate_request_is_the_same_as_its_fields(pipe):
    from addon.wire import GenerateRequest

    request = GenerateRequest("a person waves", seconds=1.5, seed=4, steps=3)
    assert _equal(pipe(request), pipe("a person waves", seconds=1.5, seed=4, steps=3))
    assert pipe("a person waves", steps=1).frames == GenerateRequest("x").frames(pipe.fps) == 80  # default 4 s
    with pytest.raises(ValueError, match="must share seconds"):
        pipe([request, GenerateRequest("a person sits", seconds=2.0, steps=3)])


def test_stop_ends_the_stream_between_steps_without_an_exception(pipe):
    steps: list[int] = []
    chunks = list(pipe.stream("a person walks", seconds=1.0, steps=7, callback=lambda s, n: steps.append(s),
                              stop=lambda: len(steps) >= 3))
    assert chunks == [] and steps == [1, 2, 3]
    starts: list[int] = []
    for _, start, _ in pipe.stream("a person walks", seconds=20.0, steps=2, stop=lambda: len(starts) >= 1):
        starts.append(start)
    assert starts == [0] and len(list(pipe.stream("a person walks", seconds=20.0, steps=2))) > 1


# What the model knows: prompts written for these tests, none of them a calibration prompt
# (backend.coverage.UNKNOWN_CALIBRATION) or a training caption word for word.
KNOWN_PROMPTS = (
    "a person walks forward", "someone waves their right hand", "a man walks backwards slowly",
    "a woman runs ahead quickly", "a person raises both arms above the head", "somebody bows politely",
    "a person kicks with the right leg", "someone waves bye with both hands", "the man punches forward twice",
    "a person lifts the left arm", "a person walks and turns to the left", "an old man walks forward",
    "a person jumps up and down twice", "somebody squats down low", "a woman dances the salsa",
)
UNKNOWN_PROMPTS = (
    "a person sits down on a chair", "a person does a handstand", "someone climbs a rope",
    "a person sweeps the floor with a broom", "a woman does yoga on a mat", "a man shovels snow",
    "a person bends down and ties their shoes", "someone paddles a canoe", "a person skates on ice",
    "a boy plays hopscotch", "a person plays the violin", "someone juggles three balls",
    "a person stirs a pot while cooking", "a person types on a keyboard", "someone waters the plants",
)


def test_coverage_tells_known_prompts_from_unknown_ones(shipped):
    """The shipped checkpoint's caption index, calibrated on held-back val captions, on prompts it never saw."""
    index = shipped.captions
    assert index is not None, "the shipped checkpoint carries no caption index (python -m backend.coverage)"
    print(f"\nindex: {len(index.captions)} captions, {len(index.actions)} actions, threshold {index.threshold:.4f}, "
          f"calibration {index.calibration}")
    results = {p: shipped.coverage(p) for p in KNOWN_PROMPTS + UNKNOWN_PROMPTS}
    for prompt, c in results.items():
        print(f"  {'known  ' if c.known else 'unknown'} {c.similarity:.3f}  {prompt!r} -> {c.nearest[0][0]!r}")
    hits_known = sum(results[p].known for p in KNOWN_PROMPTS) / len(KNOWN_PROMPTS)
    hits_unknown = sum(not results[p].known for p in UNKNOWN_PROMPTS) / len(UNKNOWN_PROMPTS)
    print(f"held-out prompts: known {hits_known:.2f}, unknown {hits_unknown:.2f}, balanced accuracy "
          f"{(hits_known + hits_unknown) / 2:.2f} (calibration: {index.calibration['accuracy']:.2f})")
    assert (hits_known + hits_unknown) / 2 >= 0.9
    for prompt in ("a person walks forward", "someone waves their right hand"):
        assert results[prompt].known, (prompt, results[prompt])
    for prompt in ("a person jumps up and down twice", "somebody squats down low"):  # more-mocap's verbs
        assert results[prompt].known, (prompt, results[prompt])
    for prompt in ("a person sits down on a chair", "a person does a handstand"):
        assert not results[prompt].known, (prompt, results[prompt])


def test_coverage_reply_is_the_nearest_captions_best_first(shipped):
    c = shipped.coverage("a person waves with the left hand", k=5)
    sims = [s for _, s in c.nearest]
    assert len(c.nearest) == 5 and sims == sorted(sims, reverse=True) and c.similarity == sims[0]
    assert all("left" in caption for caption, _ in c.nearest[:3]), c.nearest
    assert all(caption in shipped.captions.captions for caption, _ in c.nearest)
    for caption in shipped.captions.captions[::500]:  # a training caption finds itself (int8 codes: cos ~ 1)
        found = shipped.coverage(caption, k=1)
        assert found.nearest[0][0] == caption and abs(found.similarity - 1.0) < 0.01, found
    wire = c.to_wire()
    assert wire["known"] is True and wire["nearest"][0][0] == c.nearest[0][0]
    with pytest.raises(ValueError, match="non-empty prompt"):
        shipped.coverage("  ")


def test_coverage_without_an_index_is_none(pipe):
    assert pipe.captions is None and pipe.coverage("a person walks forward") is None


def test_coverage_calibration_picks_the_widest_gap():
    from backend.coverage import calibrate

    threshold, accuracy = calibrate(np.array([0.9, 0.95, 0.99]), np.array([0.3, 0.5, 0.7]))
    assert accuracy == 1.0 and threshold == pytest.approx(0.8)
    threshold, accuracy = calibrate(np.array([0.9, 0.6, 0.95]), np.array([0.3, 0.5, 0.7]))  # one overlap
    assert accuracy == pytest.approx((2 / 3 + 1) / 2) and 0.7 < threshold <= 0.9
    with pytest.raises(ValueError, match="known and unknown"):
        calibrate(np.array([]), np.array([0.3]))


def test_coverage_cli_errors_are_clear(tmp_path, capsys):
    from backend.coverage import main

    assert main([str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a Motion Mamba checkpoint" in capsys.readouterr().err
    shutil.copy(DEFAULT_WEIGHTS / "config.json", tmp_path / "config.json")
    assert main([str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "no split file train.txt" in capsys.readouterr().err


@pytest.mark.parametrize("prompt, noted", [("a person sits down on a chair", True),
                                           ("a person walks forward", False)])  # fmt: skip
def test_generate_cli_says_when_the_model_has_not_seen_the_prompt(tmp_path, capsys, prompt, noted):
    assert generate.main([prompt, "--seconds", "1", "--steps", "2", "--out", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out
    assert ("note: this model has not seen anything like" in out) == noted, out


@torch.no_grad()
def test_shipped_model_walks_on_planted_feet():
    """The shipped model's walk against its raw decode (the same latent): where the decoded contacts hold a foot
    down it stays (the root travels with it: ``plant_feet``), GMD's skate ratio falls, the walk still goes."""
    from addon.wire import GenerateRequest
    from backend.metrics import foot_skate_ratio
    from backend.motion import PLANT_CONTACT, features_to_positions
    from backend.skeleton import SMPL22

    pipe = MotionPipeline.from_checkpoint(DEFAULT_WEIGHTS, device="cpu")
    feet = list(SMPL22.foot_left + SMPL22.foot_right)  # the contact channels' joints

    def planted_slide_and_skate(features: np.ndarray) -> tuple[float, float]:
        p = features_to_positions(features.astype(np.float64))
        held = (features[:-1, -4:] > PLANT_CONTACT) & (features[1:, -4:] > PLANT_CONTACT)
        slide = np.linalg.norm(np.diff(p[:, feet][..., [0, 2]], axis=0), axis=-1)
        return float(slide[held].mean()), foot_skate_ratio(p, (10, 11), pipe.fps)

    for seed in (0, 1):
        walk = pipe("a person walks forward", seconds=4.0, seed=seed)
        z = pipe._latents(["a person walks forward"], [seed], walk.frames // 4, GenerateRequest.guidance,
                          GenerateRequest.steps, None, None, None)
        raw = pipe.vae.decode(z)[0].numpy() * pipe.std + pipe.mean
        (slide, skate), (raw_slide, raw_skate) = planted_slide_and_skate(walk.features), planted_slide_and_skate(raw)
        assert slide < 0.5 * raw_slide and skate < 0.6 * raw_skate, (seed, slide, raw_slide, skate, raw_skate)
        assert np.linalg.norm(walk.root_translation[-1, [0, 2]] - walk.root_translation[0, [0, 2]]) > 2.0
