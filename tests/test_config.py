"""Config files: names, paths, and ``"base"`` inheritance."""

import json

import pytest

from backend.checkpoint import read_config_file


def test_named_config_and_path_agree(tmp_path):
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(read_config_file("default")))
    assert read_config_file(path) == read_config_file("default")


def test_base_replaces_whole_top_level_sections(tmp_path):
    (tmp_path / "parent.json").write_text(json.dumps({"base": "tiny", "name": "parent", "fps": 30}))
    (tmp_path / "child.json").write_text(
        json.dumps({"base": "parent.json", "denoiser": {"arch": "mld_transformer", "d_model": 8, "layers": 1}})
    )
    tiny, child = read_config_file("tiny"), read_config_file(tmp_path / "child.json")
    assert child["denoiser"] == {"arch": "mld_transformer", "d_model": 8, "layers": 1}  # replaced: no Mamba keys
    assert child["fps"] == 30 and child["name"] == "child"
    assert child["vae"] == tiny["vae"] and child["train"] == tiny["train"]
    assert "base" not in child


def test_shipped_cpu_configs_share_everything_but_the_denoiser():
    mamba, baseline = read_config_file("bandai_cpu"), read_config_file("bandai_cpu_mld")
    assert mamba["denoiser"]["arch"] == "motion_mamba" and baseline["denoiser"]["arch"] == "mld_transformer"
    assert {k for k in mamba if mamba[k] != baseline.get(k)} == {"name", "denoiser"}
    assert mamba["vae"] == read_config_file("default")["vae"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"base": "loop.json"}', "names itself"),
        ('{"base": "no_such_config"}', "not found"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    (tmp_path / "loop.json").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_config_file(tmp_path / "loop.json")


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json"):
        read_config_file(tmp_path / "broken.json")


def test_every_shipped_config_and_checkpoint_is_typed():
    from backend.checkpoint import CONFIGS_DIR, load_config
    from backend.config import MLDTransformerConfig, ModelConfig, MotionMambaConfig

    for path in sorted(CONFIGS_DIR.glob("*.json")):
        config = ModelConfig.from_dict(read_config_file(path), path.name)
        assert config.denoiser is None or isinstance(config.denoiser, (MotionMambaConfig, MLDTransformerConfig))
    weights = CONFIGS_DIR.parent / "backend" / "weights"
    shipped = ModelConfig.from_dict(load_config(weights / "default"))
    assert shipped.kind == "pipeline" and shipped.diffusion.num_timesteps == 1000 and shipped.train.vae.lr > 0
    assert ModelConfig.from_dict(load_config(weights / "evaluator")).evaluator.embed_dim > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vae": {"latent_dim": 4, "widht": 32}}, r"\.vae: unknown key 'widht' \(known: latent_dim, width"),
        ({"denoiser": {"arch": "motion_mamba", "dims": [8], "scans": [1], "grups": 2}},
         r"\.denoiser: unknown key 'grups'"),
        ({"denoiser": {"arch": "mld_transformer", "d_model": 8, "layers": 1, "dims": [8]}},
         r"\.denoiser: unknown key 'dims'"),
        ({"diffusion": {"num_timesteps": 1000, "schedule": "linear"}}, r"\.diffusion: unknown key 'schedule'"),
        ({"train": {"seed": 0, "vae": {"batch_size": 4, "lr": 0.1, "steps": 2, "max_frames": 8, "epochs": 3}}},
         r"\.train\.vae: unknown key 'epochs'"),
        ({"fsp": 30}, r"child\.json: unknown key 'fsp'"),
        ({"fps": "thirty"}, r"child\.json\.fps must be int, got str 'thirty'"),
        ({"denoiser": {"arch": "motion_mamba", "dims": [8, "x"], "scans": [1, 1]}},
         r"\.denoiser\.dims\[1\] must be int"),
        ({"train": {"vae": {"lr": 0.1}}}, r"\.train\.vae: missing key 'batch_size'"),
    ],
)
def test_unknown_or_mistyped_keys_are_rejected_by_name(tmp_path, change, message):
    (tmp_path / "child.json").write_text(json.dumps({"base": "tiny", **change}))
    with pytest.raises(ValueError, match=message):
        read_config_file(tmp_path / "child.json")
