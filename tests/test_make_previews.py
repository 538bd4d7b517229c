"""tools/make_previews.py: the measurements the model card's verdicts rest on, on motions with known answers."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from backend.motion import forward_kinematics
from backend.pipeline import Motion
from backend.skeleton import SMPL22

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_previews.py"
spec = importlib.util.spec_from_file_location("make_previews", TOOL)
make_previews = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_previews)


def _motion(root: np.ndarray, quats: np.ndarray) -> Motion:
    positions = forward_kinematics(root, quats).astype(np.float32)
    t = len(root)
    return Motion(np.zeros((t, 263), np.float32), positions, root, quats, fps=20, prompt="p", seed=0)


def _rest(t: int) -> np.ndarray:
    q = np.zeros((t, 22, 4))
    q[..., 0] = 1.0
    return q


def test_standing_t_pose_walked_three_metres_along_a_square_corner():
    t = 41
    root = np.zeros((t, 3))
    root[:, 1] = 0.95
    root[:21, 0] = np.linspace(0, 1.5, 21)  # 1.5 m along x, then 1.5 m along z
    root[21:, 0] = 1.5
    root[21:, 2] = np.linspace(0, 1.5, 21)[1:]
    m = make_previews.measure(_motion(root, _rest(t)))
    assert m["seconds"] == pytest.approx(41 / 20)
    assert m["path (m)"] == pytest.approx(3.0, abs=1e-5)
    assert m["net (m)"] == pytest.approx(1.5 * np.sqrt(2), abs=1e-5)
    assert m["max bend (deg)"] < 1.0  # the rest pose stands upright
    rest = forward_kinematics(root[:1], _rest(1))[0]
    assert m["L wrist max (m)"] == pytest.approx(rest[20, 1], abs=1e-5)
    assert m["R foot max (m)"] == pytest.approx(rest[11, 1], abs=1e-5)


def test_a_bow_and_a_raised_left_arm_show_in_the_numbers():
    t = 10
    root = np.tile([0.0, 0.95, 0.0], (t, 1))
    quats = _rest(t)
    half = np.radians(60) / 2  # spine1 turns 60 degrees about +X: the trunk pitches forward (+Z)
    quats[:, SMPL22.joint_names.index("spine1")] = [np.cos(half), np.sin(half), 0.0, 0.0]
    bow = make_previews.measure(_motion(root, quats))
    assert 40 < bow["max bend (deg)"] < 60  # less than 60: the pelvis-to-spine1 bone stays upright
    quats = _rest(t)
    half = np.radians(90) / 2  # left shoulder turns the T-pose arm (+X) up to +Y about +Z
    quats[:, SMPL22.joint_names.index("left_shoulder")] = [np.cos(half), 0.0, 0.0, np.sin(half)]
    raised = make_previews.measure(_motion(root, quats))
    assert raised["L wrist max (m)"] > raised["R wrist max (m)"] + 0.3


def test_file_names_are_safe_and_distinct():
    names = [make_previews.file_name(i, p, s) for i, (p, s) in enumerate(make_previews.PROMPTS)]
    assert len(set(names)) == len(names) == 14
    assert all(n.endswith(".png") and " " not in n for n in names)
    assert any(s == 60.0 for _, s in make_previews.PROMPTS)


def test_the_tool_renders_and_measures_with_the_shipped_model(tmp_path, capsys):
    assert make_previews.main(["--out", str(tmp_path), "--first", "2", "--steps", "3"]) == 0
    rows = [line for line in (tmp_path / "measurements.md").read_text().splitlines() if line.startswith("| a ")]
    assert len(rows) == 1 and "tired old man" in rows[0]  # the second prompt starts with "someone"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        make_previews.file_name(i, p, s) for i, (p, s) in enumerate(make_previews.PROMPTS[:2])
    )
    assert "wrote 2 previews" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_previews.main(["--out", str(tmp_path), "--first", "0"])


def test_a_jump_a_squat_and_lying_down_show_in_the_numbers():
    t = 20
    standing = np.tile([0.0, 0.95, 0.0], (t, 1))
    rest = make_previews.measure(_motion(standing, _rest(t)))
    assert rest["airborne (s)"] == 0.0 and rest["pelvis min (m)"] == pytest.approx(0.95, abs=1e-6)
    jump = standing.copy()
    jump[5:9, 1] += 0.3  # 4 frames (0.2 s) with the whole body 30 cm up
    assert make_previews.measure(_motion(jump, _rest(t)))["airborne (s)"] == pytest.approx(0.2)
    squat = standing.copy()
    squat[10:, 1] = 0.5
    assert make_previews.measure(_motion(squat, _rest(t)))["pelvis min (m)"] == pytest.approx(0.5, abs=1e-6)
    quats = _rest(t)
    half = np.radians(90) / 2  # the pelvis turns 90 degrees about +X: the body lies along +Z
    quats[:, 0] = [np.cos(half), np.sin(half), 0.0, 0.0]
    lying = make_previews.measure(_motion(np.tile([0.0, 0.1, 0.0], (t, 1)), quats))
    assert lying["head min (m)"] < 0.2 and lying["max bend (deg)"] > 80
    assert rest["head min (m)"] > 1.4
