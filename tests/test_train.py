"""Training on real clips: the tiny config learns, resumes exactly (also after a real SIGKILL), runs under
2-process DDP (gloo), and its checkpoint generates; generate CLI outputs; bad arguments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from addon.timeline import parse_timeline
from backend import generate
from backend.checkpoint import load_config, load_state, read_config_file, save_json, save_state
from backend.config import ModelConfig
from backend.models.consistency import build_student, consistency_x0
from backend.models.text_encoder import TextEncoder
from backend.motion import plant_feet, smooth_pose
from backend.pipeline import MotionPipeline, collect
from backend.train import batch_indices, main, train

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = {
    "007005": ["a person walks forward", "someone walks straight ahead"],
    "009548": ["a person waves with the right hand", "someone waves hello"],
    "011673": ["a person jumps in place", "someone hops up and down"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(humanml3d_samples: Path, tmp_path_factory) -> Path:
    """The three real HumanML3D sample clips in the HumanML3D layout, with captions."""
    root = tmp_path_factory.mktemp("h3d")
    (root / "new_joint_vecs").mkdir()
    (root / "texts").mkdir()
    for clip, caps in CAPTIONS.items():
        (root / "new_joint_vecs" / f"{clip}.npy").write_bytes(
            (humanml3d_samples / "new_joint_vecs" / f"{clip}.npy").read_bytes()
        )
        (root / "texts" / f"{clip}.txt").write_text("".join(f"{c}#{c}#0.0#0.0\n" for c in caps))
    (root / "train.txt").write_text("\n".join(CAPTIONS) + "\n")
    for split in ("val", "test"):
        (root / f"{split}.txt").write_text("007005\n")
    for name in ("Mean.npy", "Std.npy"):
        (root / name).write_bytes((humanml3d_samples / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def short_config(tmp_path_factory) -> Path:
    """The tiny config, saving every 2 steps, with a fixed LR-schedule horizon (stopping early changes nothing)."""
    config = read_config_file("tiny")
    for kind in ("vae", "denoiser"):
        config["train"][kind].update(save_every=2, schedule_steps=40)
    path = tmp_path_factory.mktemp("cfg") / "short.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict:
    """Tiny VAE, then tiny denoiser over it, each trained with the shipped tiny config."""
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for kind, extra in (("vae", {}), ("denoiser", {"vae": runs / "vae"})):
        t0 = time.perf_counter()
        out[kind] = train(kind, dataset, runs / kind, config="tiny", progress=False, **extra)
        out[f"{kind}_seconds"] = time.perf_counter() - t0
        print(
            f"tiny {kind}: {len(out[kind])} steps in {out[f'{kind}_seconds']:.1f} s, loss "
            f"{out[kind][0]['loss']:.3f} -> {out[kind][-1]['loss']:.3f}"
        )
    out["vae_dir"], out["run"] = runs / "vae", runs / "denoiser"
    return out


def _mean_loss(history: list[dict]) -> float:
    return float(np.mean([h["loss"] for h in history]))


@pytest.mark.parametrize("kind", ["vae", "denoiser"])
def test_tiny_training_loss_falls(trained, kind):
    history = trained[kind]
    assert [h["step"] for h in history] == list(range(1, 41))
    assert all(np.isfinite(h["loss"]) for h in history)
    assert _mean_loss(history[-8:]) < 0.6 * _mean_loss(history[:4])
    run = trained["run"] if kind == "denoiser" else trained["vae_dir"]
    curve = (run / "loss.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss") and len(curve) == 41
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_run_folder_is_a_generation_checkpoint(trained):
    run = trained["run"]
    config = load_config(run)
    assert config["kind"] == "pipeline" and config["step"] == 40 and config["latent_scale"] > 0
    assert config["rotation_channels"] == "humanml3d"  # HumanML3D's own clips: generation reads them so
    assert load_config(trained["vae_dir"])["kind"] == "vae"
    pipe = MotionPipeline.from_checkpoint(run, device="cpu")
    for seconds in (0.3, 2.0, 7.45):
        motion = pipe("a person walks forward", seconds=seconds, steps=8)
        frames = round(seconds * 20)
        assert motion.features.shape == (frames, 263) and motion.positions.shape == (frames, 22, 3)
        assert motion.rotations.shape == (frames, 22, 4) and motion.root_translation.shape == (frames, 3)
        assert all(np.isfinite(a).all() for a in (motion.features, motion.positions, motion.rotations))
    with pytest.raises(ValueError, match="'vae' run, not a generation checkpoint"):
        MotionPipeline.from_checkpoint(trained["vae_dir"])


def test_generate_cli_writes_npz_bvh_and_preview(trained, tmp_path, capsys):
    run = str(trained["run"])
    assert (
        generate.main(
            [
                "a person jumps in place",
                "--seconds",
                "2.5",
                "--steps",
                "5",
                "--seed",
                "3",
                "--checkpoint",
                run,
                "--out",
                str(tmp_path / "m.npz"),
                "--preview",
                str(tmp_path / "m.png"),
            ]
        )
        == 0
    )
    assert "50 frames (2.50 s at 20 fps)" in capsys.readouterr().out
    data = np.load(tmp_path / "m.npz")
    assert data["features"].shape == (50, 263) and data["rotations"].shape == (50, 22, 4)
    assert str(data["prompt"]) == "a person jumps in place" and int(data["seed"]) == 3
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        generate.main(
            ["a person walks", "--seconds", "1", "--steps", "3", "--checkpoint", run, "--out", str(tmp_path / "m.bvh")]
        )
        == 0
    )
    bvh = (tmp_path / "m.bvh").read_text()
    assert bvh.startswith("HIERARCHY") and "Frames: 20" in bvh
    pipe = MotionPipeline.from_checkpoint(run, device="cpu")  # same seed and settings, same motion
    again = pipe("a person jumps in place", seconds=2.5, steps=5, seed=3)
    np.testing.assert_array_equal(again.features, data["features"])


def test_denoiser_with_another_local_text_encoder(dataset, trained, tmp_path):
    clip = tmp_path / "my-clip"
    make_clip_folder(clip)
    run = tmp_path / "clip_run"
    history = train(
        "denoiser", dataset, run, config="tiny", steps=2, vae=trained["vae_dir"], text_encoder=clip, progress=False
    )
    assert len(history) == 2 and load_config(run)["text_encoder"]["path"] == str(clip)
    pipe = MotionPipeline.from_checkpoint(run, device="cpu")
    assert pipe.describe()["text_encoder"] == "my-clip" and pipe.text_encoder.dim == 32
    assert np.isfinite(pipe("a person walks", seconds=1.0, steps=2).positions).all()


def test_v_prediction_denoiser(dataset, trained, tmp_path):
    config = read_config_file("tiny")
    config["diffusion"]["prediction"] = "v"
    path = tmp_path / "v.json"
    path.write_text(json.dumps(config))
    history = train("denoiser", dataset, tmp_path / "v", config=path, steps=3, vae=trained["vae_dir"], progress=False)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    pipe = MotionPipeline.from_checkpoint(tmp_path / "v", device="cpu")
    assert pipe.diffusion.prediction == "v"
    assert np.isfinite(pipe("a person walks", seconds=1.0, steps=3).features).all()


def test_generate_cli_bad_input(trained, tmp_path, capsys):
    run = str(trained["run"])
    for args, message in (
        (["", "--checkpoint", run], "prompt is empty"),
        (["walk", "--seconds", "0", "--checkpoint", run], "'seconds' must be between 0.025 and 120.0, got 0.0"),
        (["walk", "--seconds", "1e4", "--checkpoint", run], "'seconds' must be between 0.025 and 120.0, got 10000.0"),
        (["walk", "--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["walk", "--checkpoint", run, "--steps", "0"], "'steps' must be between 1 and"),
    ):
        assert generate.main([*args, "--out", str(tmp_path / "x.npz")]) == 2
        assert message in capsys.readouterr().err
    assert generate.main(["walk", "--checkpoint", run, "--out", str(tmp_path / "x.fbx")]) == 2
    assert "unsupported output" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lcm_config(tmp_path_factory) -> Path:
    """Consistency distillation for the tests: batches of 4, saving every 2 steps, a fixed LR horizon; 2-4 fast
    steps are the student's own (LCM's multistep sampling: ``test_fast_sampler_refined_by_the_teacher`` sets the
    teacher's refinement)."""
    config = read_config_file("lcm")
    config["train"]["lcm"].update(batch_size=4, max_frames=64, save_every=2, schedule_steps=40)
    config["lcm"]["refine_from"] = 0
    path = tmp_path_factory.mktemp("cfg") / "lcm.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind", ["vae", "denoiser", "lcm"])
def test_resume_reproduces_the_uninterrupted_run(dataset, short_config, lcm_config, trained, tmp_path, kind):
    extra = {"vae": {"vae": trained["vae_dir"]}, "denoiser": {"vae": trained["vae_dir"]},
             "lcm": {"teacher": trained["run"]}}[kind]
    config = lcm_config if kind == "lcm" else short_config
    full = train(kind, dataset, tmp_path / "full", config=config, steps=6, progress=False, **extra)
    part = train(
        kind, dataset, tmp_path / "cut", config=config, steps=6, progress=False, stop_after=5, **extra
    )  # a "kill" after step 5: the last checkpoint is step 4
    assert len(part) == 5 and load_state(tmp_path / "cut" / "train_state.pt")["step"] == 4
    resumed = train(kind, dataset, tmp_path / "cut", steps=6, resume=True, progress=False)  # no --vae needed
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]  # steps 5 and 6 recomputed exactly
    name = f"{kind}.safetensors"  # lcm: the student (its target network resumed too, or step 5 would differ)
    a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_a_run_saved_when_the_vae_decoded_in_windows(dataset, short_config, tmp_path):
    """A training state written before the VAE decoded in one pass names its decode windows: it still resumes
    (those keys mean nothing now), and the run's config no longer carries them."""
    run = tmp_path / "old"
    train("vae", dataset, run, config=short_config, steps=4, progress=False, stop_after=3)  # last save: step 2
    state = load_state(run / "train_state.pt")
    state["config"]["vae"].update(window=8, context=2)
    save_state(run / "train_state.pt", state)
    resumed = train("vae", dataset, run, steps=4, resume=True, progress=False)
    saved = load_state(run / "train_state.pt")
    assert len(resumed) == 4 and saved["step"] == 4
    written = json.loads((run / "config.json").read_text())
    assert "window" not in saved["config"]["vae"] and "window" not in written["vae"]


def _subprocess_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _train_vae_module_args(dataset: Path, run: Path, config: Path, steps: int) -> list[str]:
    """``-m backend.train vae ...`` as a user types it, for ``python`` or ``torchrun``."""
    return ["-m", "backend.train", "vae", "--data", str(dataset), "--out", str(run), "--config", str(config),
            "--steps", str(steps)]


def test_resume_after_sigkill(dataset, short_config, tmp_path):
    config = json.loads(short_config.read_text())
    config["train"]["vae"]["save_every"] = 1
    cfg = tmp_path / "every_step.json"
    cfg.write_text(json.dumps(config))
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *_train_vae_module_args(dataset, run, cfg, 40)],
        cwd=ROOT,
        env=_subprocess_env(torch.get_num_threads()),  # same float reductions as here
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state = run / "train_state.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and load_state(state)["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # possibly in the middle of writing a checkpoint
    proc.wait()
    proc.stderr.close()
    step = load_state(state)["step"]  # every file of the run folder is whole and readable
    assert 3 <= step <= 38
    assert load_config(run)["kind"] == "vae"
    load_file(run / "vae.safetensors")
    resumed = train("vae", dataset, run, steps=step + 2, resume=True, progress=False)
    full = train("vae", dataset, tmp_path / "full", config=cfg, steps=step + 2, progress=False)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]


def test_ddp_two_processes_gloo(dataset, short_config, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         *_train_vae_module_args(dataset, run, short_config, 3)],
        cwd=ROOT,
        env=_subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp: 2 processes, parameters identical on every rank" in proc.stdout
    state = load_state(run / "train_state.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert all(np.isfinite(h["loss"]) for h in state["history"])
    # the two ranks saw different clips at every step
    for step in range(3):
        assert batch_indices(step, 0, 2, 4, 3, 0) != batch_indices(step, 1, 2, 4, 3, 0)


def test_data_order_depends_only_on_seed_and_step():
    a = [batch_indices(s, 0, 1, 4, 10, 7) for s in range(10)]
    assert a == [batch_indices(s, 0, 1, 4, 10, 7) for s in range(10)]
    flat = [i for batch in a[:5] for i in batch]  # 20 draws = two epochs: each clip twice
    assert sorted(flat) == sorted(list(range(10)) * 2)
    assert a != [batch_indices(s, 0, 1, 4, 10, 8) for s in range(10)]


def test_train_bad_input(dataset, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="dataset folder"):
        train("vae", tmp_path / "nothing", tmp_path / "r")
    with pytest.raises(ValueError, match="needs a trained VAE"):
        train("denoiser", dataset, tmp_path / "r", config="tiny")
    with pytest.raises(FileNotFoundError, match=r"has no train_state\.pt"):
        train("vae", dataset, tmp_path / "fresh", resume=True)
    with pytest.raises(FileNotFoundError, match="config 'huge' not found"):
        train("vae", dataset, tmp_path / "r", config="huge")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in read_config_file("tiny").items() if k != "train"}))
    with pytest.raises(ValueError, match=r"no train\.vae section"):
        train("vae", dataset, tmp_path / "r", config=bare)
    assert main(["denoiser", "--data", str(dataset), "--out", str(tmp_path / "r"), "--config", "tiny"]) == 2
    assert "--vae RUN_DIR" in capsys.readouterr().err


@pytest.mark.parametrize(("section", "key"), [
    ((), "fsp"), (("vae",), "widht"), (("denoiser",), "grups"), (("diffusion",), "schedule"),
    (("text_encoder",), "lenght"), (("train",), "sead"), (("train", "vae"), "epochs"),
    (("train", "denoiser"), "dropp"), (("evaluator",), "tempature"), (("evaluator", "text_encoder"), "pth"),
])  # fmt: skip
def test_training_rejects_an_unknown_key_in_any_section_by_name(dataset, trained, tmp_path, section, key):
    """A config file, and a run's recorded config when resuming, with a misspelt key: a ValueError naming it
    before anything is trained (a resumed run used to ignore it)."""

    def misspell(config: dict) -> dict:
        config["evaluator"] = {"hidden": 8, "embed_dim": 8, "text_encoder": {}}  # tiny has no evaluator section
        node = config
        for name in section:
            node = node[name]
        node[key] = 1
        return config

    where = r"\.".join(section)
    message = rf"{where}: unknown key '{key}'" if section else rf"unknown key '{key}'"
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(misspell(read_config_file("tiny"))))
    with pytest.raises(ValueError, match=message):
        train("vae", dataset, tmp_path / "fresh", config=path, progress=False)
    state = load_state(trained["vae_dir"] / "train_state.pt")
    state["config"] = misspell(state["config"])
    save_state(tmp_path / "run" / "train_state.pt", state)
    with pytest.raises(ValueError, match=message):
        train("vae", dataset, tmp_path / "run", resume=True, progress=False)
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "train_state.pt"]  # nothing written


def make_clip_folder(folder) -> None:
    """A small random CLIP (text + vision towers) saved like a Hugging Face download, with a WordPiece
    tokenizer borrowed from the offline MiniLM (CLIP's own BPE files ship with real CLIP weights)."""
    from transformers import CLIPConfig, CLIPModel

    from backend.models.text_encoder import default_encoder_path

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 30522, "max_position_embeddings": 64},
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((default_encoder_path() / name).read_bytes())


def test_text_encoder_clip_folder_uses_the_text_tower(tmp_path):
    make_clip_folder(tmp_path)
    enc = TextEncoder(tmp_path)
    assert enc.kind == "clip" and enc.dim == 32 and enc.name == tmp_path.name
    assert not hasattr(enc.model, "vision_model")
    batch = enc(["a person walks", "someone waves the right hand"])
    assert batch.tokens.shape[::2] == (2, 32) and batch.pooled.shape == (2, 32)
    assert torch.isfinite(batch.pooled).all()


def test_a_denoiser_run_carries_its_caption_index(trained):
    """What the model knows: the run's training captions (the val clip's are the calibration's known side)."""
    pipe = MotionPipeline.from_checkpoint(trained["run"], device="cpu")
    expected = {c for clip in CAPTIONS.values() for c in clip}
    assert pipe.captions is not None and set(pipe.captions.captions) == expected
    assert "walks forward" in pipe.captions.actions
    c = pipe.coverage("someone walks straight ahead", k=2)
    assert c.known and c.nearest[0][0] == "someone walks straight ahead", c
    assert not pipe.coverage("a man plays the violin on a stage").known


def test_lcm_student_starts_as_its_teacher(trained):
    """Zero-initialised guidance embedding: before training, the student at any guidance scale is its teacher's
    conditional denoiser, so distillation starts from what the teacher knows."""
    config = ModelConfig.from_dict(load_config(trained["run"]))
    teacher = MotionPipeline.from_checkpoint(trained["run"], device="cpu").denoiser
    student = build_student(config, 4, teacher.text.token_proj.in_features).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("guidance_mlp.") for name in missing)
    x, t = torch.randn(2, 9, 4), torch.tensor([999, 379])
    tokens, mask, pooled = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 384)
    with torch.no_grad():
        expected = teacher(x, t, tokens, mask, pooled)
        for scale in (1.0, 4.5):
            assert torch.equal(student(x, t, tokens, mask, pooled, guidance=torch.full((2,), scale)), expected)
        with pytest.raises(ValueError, match="pass the guidance scale"):
            student(x, t, tokens, mask, pooled)


def test_lcm_run_is_a_checkpoint_with_a_fast_sampler(dataset, trained, lcm_config, tmp_path):
    run = tmp_path / "lcm"
    history = train("lcm", dataset, run, config=lcm_config, steps=4, teacher=trained["run"], progress=False)
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
    config = load_config(run)
    assert config["kind"] == "pipeline" and config["lcm"]["step"] == 4
    assert config["lcm"]["teacher"] == str(Path(trained["run"]).resolve())
    pipe = MotionPipeline.from_checkpoint(run, device="cpu")
    teacher = MotionPipeline.from_checkpoint(trained["run"], device="cpu")
    assert pipe.student is not None and teacher.student is None
    assert pipe.describe()["fast_steps"] == 4 and teacher.describe()["fast_steps"] == 0
    assert [pipe.uses_student(n) for n in (1, 2, 4, 5, 50)] == [True, True, True, False, False]
    assert [pipe.sampler(n) for n in (4, 5)] == ["fast", "DDIM"] and teacher.sampler(1) == "DDIM"
    # more steps than the student covers: DDIM on the teacher, exactly as the teacher's own folder generates
    ddim = pipe("a person walks forward", seconds=2.0, seed=3, steps=6)
    alone = teacher("a person walks forward", seconds=2.0, seed=3, steps=6)
    np.testing.assert_array_equal(ddim.features, alone.features)
    fast = {n: pipe("a person walks forward", seconds=2.0, seed=3, steps=n) for n in (1, 2, 4)}
    for motion in fast.values():
        assert motion.features.shape == (40, 263) and np.isfinite(motion.rotations).all()
        assert not np.allclose(motion.features, ddim.features)  # the student's path, not DDIM's
    again = pipe("a person walks forward", seconds=2.0, seed=3, steps=2)
    np.testing.assert_array_equal(again.features, fast[2].features)  # seeded, also the noise between steps
    other = pipe("a person walks forward", seconds=2.0, seed=4, steps=2)
    assert not np.allclose(other.features, fast[2].features)
    # guidance is the student's input, clamped to the range it learned
    high = pipe("a person walks forward", seconds=2.0, seed=3, steps=1, guidance=30.0)
    top = pipe("a person walks forward", seconds=2.0, seed=3, steps=1, guidance=config["lcm"]["guidance_max"])
    np.testing.assert_array_equal(high.features, top.features)
    # timelines and edits take the fast sampler too: rows blend, kept frames stay exactly
    rows = parse_timeline("0 1 a person walks forward\n1 2 a person waves")
    shot = collect(pipe.timeline(rows, seed=1, steps=2))[0]
    assert shot.frames == 40 and np.isfinite(shot.rotations).all()
    more = pipe.continue_motion(fast[2].root_translation, fast[2].rotations, 1.0, "a person waves", steps=2)
    assert more.frames == 60 and np.allclose(more.rotations[:40], fast[2].rotations, atol=1e-6)


def test_fast_sampler_refined_by_the_teacher(dataset, trained, lcm_config, tmp_path):
    """``lcm.refine_from``: 2+ fast steps are the student's one step, its sample noised to refine_from with the
    seed's next noise, then the teacher's guided DDIM steps from there: exactly that composition, by hand."""
    run = tmp_path / "lcm"
    train("lcm", dataset, run, config=lcm_config, steps=2, teacher=trained["run"], progress=False)
    config = load_config(run)
    config["lcm"]["refine_from"] = 300
    for bad, says in ((1000, "refine_from must be a timestep in 1..999"), (-1, "refine_from must be a timestep")):
        save_json(run / "config.json", {**config, "lcm": {**config["lcm"], "refine_from": bad}})
        with pytest.raises(ValueError, match=f"lcm section: {re.escape(says)}"):
            MotionPipeline.from_checkpoint(run, device="cpu")
    save_json(run / "config.json", config)
    pipe = MotionPipeline.from_checkpoint(run, device="cpu")
    assert pipe.lcm.refine_from == 300 and pipe.uses_student(4) and not pipe.uses_student(5)
    calls = []
    for name in ("student", "denoiser"):
        forward = getattr(pipe, name).forward

        def spy(x, t, *args, _forward=forward, _name=name, **kwargs):
            calls.append((_name, int(t[0]), x.shape[0]))
            return _forward(x, t, *args, **kwargs)

        getattr(pipe, name).forward = spy
    guidance, seed, frames = 2.5, 3, 40
    got = pipe("a person walks forward", seconds=frames / pipe.fps, seed=seed, steps=3, guidance=guidance)
    assert calls == [("student", 999, 1), ("denoiser", 300, 2), ("denoiser", 150, 2)]
    calls.clear()
    text = pipe.text_encoder(["a person walks forward"])
    generator = torch.Generator().manual_seed(seed)
    tokens = frames // 4
    x = torch.randn(tokens, pipe.vae.latent_dim, generator=generator)[None]
    with torch.inference_mode():
        t = torch.tensor([999])
        out = pipe.student(x, t, text.tokens, text.mask, text.pooled, None, None, torch.tensor([guidance]))
        x = consistency_x0(pipe.diffusion, out, x, t)
        noise = torch.randn(tokens, pipe.vae.latent_dim, generator=generator)[None]
        x = pipe.diffusion.add_noise(x, noise, torch.tensor([300]))
        for t, t_prev in ((300, 150), (150, None)):
            cond, uncond = pipe.denoiser(x.repeat(2, 1, 1), torch.tensor([t, t]), text.tokens.repeat(2, 1, 1),
                                         text.mask.repeat(2, 1), text.pooled.repeat(2, 1),
                                         torch.tensor([False, True])).chunk(2)
            x = pipe.diffusion.ddim_step(uncond + guidance * (cond - uncond), x, t, t_prev)
        expected = pipe.vae.decode(x / pipe.latent_scale)
    decoded = expected[0].numpy() * pipe.std + pipe.mean
    np.testing.assert_allclose(got.features, plant_feet(smooth_pose(decoded)), atol=1e-5)
    # an edit takes the same schedule: the kept frames stay exactly, the new ones come from the refined sample
    calls.clear()
    more = pipe.continue_motion(got.root_translation, got.rotations, 1.0, "a person waves", steps=2)
    assert [c[:2] for c in calls] == [("student", 999), ("denoiser", 300)]
    assert more.frames == 60 and np.allclose(more.rotations[:40], got.rotations, atol=1e-6)


def test_lcm_endpoint_pairs_are_the_teachers_own_samples(dataset, trained, lcm_config, tmp_path):
    """With ``endpoint_weight`` the run samples training captions with the teacher once (guided DDIM from seeded
    noise, padded clips masked) and adds the student's one-step error on them; the pairs are kept in the run's
    state, so a resume reuses them (``test_resume_reproduces_the_uninterrupted_run`` covers the plain loss)."""
    config = json.loads(lcm_config.read_text())
    config["lcm"].update(endpoint_weight=0.5, endpoint_pairs=6, endpoint_teacher_steps=3)
    path = tmp_path / "endpoint.json"
    path.write_text(json.dumps(config))
    history = train("lcm", dataset, tmp_path / "run", config=path, steps=2, teacher=trained["run"], progress=False)
    for h in history:
        assert h["loss"] == pytest.approx(h["consistency"] + 0.5 * h["endpoint"], rel=1e-5)
        assert h["endpoint"] > 0 and np.isfinite(h["endpoint"])
    pairs = load_state(tmp_path / "run" / "train_state.pt")["task"]["endpoints"]
    assert len(pairs["captions"]) == 6 and pairs["noise"].shape == pairs["sample"].shape
    assert ((pairs["guidance"] >= 1.0) & (pairs["guidance"] <= 5.0)).all()
    teacher = MotionPipeline.from_checkpoint(trained["run"], device="cpu")
    for k in range(6):  # each sample is the teacher's, alone and unpadded, from its noise
        valid = pairs["mask"][k]
        assert not pairs["sample"][k][~valid].any()
        x = pairs["noise"][k][valid][None]
        text = teacher.text_encoder([pairs["captions"][k]])
        cond = (text.tokens.repeat(2, 1, 1), text.mask.repeat(2, 1), text.pooled.repeat(2, 1))
        timesteps = teacher.diffusion.ddim_timesteps(3)
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                both = teacher.denoiser(x.repeat(2, 1, 1), torch.full((2,), t), *cond, torch.tensor([False, True]))
                guided = both[1:] + pairs["guidance"][k] * (both[:1] - both[1:])
                x = teacher.diffusion.ddim_step(guided, x, t, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        torch.testing.assert_close(x[0], pairs["sample"][k][valid], atol=1e-4, rtol=1e-4)


def test_lcm_bad_teacher(dataset, trained, lcm_config, tmp_path):
    with pytest.raises(ValueError, match="pass --teacher DIR"):
        train("lcm", dataset, tmp_path / "a", config=lcm_config, steps=1, progress=False)
    with pytest.raises(ValueError, match="not a generation checkpoint"):
        train("lcm", dataset, tmp_path / "b", config=lcm_config, steps=1, teacher=trained["vae_dir"], progress=False)
    with pytest.raises(ValueError, match="needs a motion_mamba denoiser"):
        build_student(ModelConfig.from_dict(read_config_file("mld_transformer_tiny")), 4, 384)
