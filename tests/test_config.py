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
        json.dumps({"base": "parent.json", "denoiser": {"arch": "mld_transformer", "d_model": 8}})
    )
    tiny, child = read_config_file("tiny"), read_config_file(tmp_path / "child.json")
    assert child["denoiser"] == {"arch": "mld_transformer", "d_model": 8}  # replaced, no Mamba keys left over
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
