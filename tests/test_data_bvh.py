"""BVH reader, writer (checked against Blender's own importer) and retargeting onto SMPL22."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.data.bvh import BvhError, parse_bvh, read_bvh, resample, write_bvh
from backend.data.retarget import JointMap, find_map, load_map, retarget, unmapped_joints
from backend.motion import canonicalize_positions, features_to_rotations, forward_kinematics
from backend.quaternion import qmul
from backend.skeleton import SMPL22

WALK = "Bandai-Namco-Research-Motiondataset-1/data/dataset-1_walk_normal_001.bvh"  # early in the archive


@pytest.fixture(scope="module")
def bandai_walk(bandai_archive: Path) -> str:
    """One real Bandai-Namco walk, read straight from the archive (stops as soon as it is found)."""
    with tarfile.open(bandai_archive, mode="r|xz") as tf:
        for member in tf:
            if member.name == WALK:
                return tf.extractfile(member).read().decode()
    pytest.fail(f"{WALK} not in {bandai_archive}")


@pytest.fixture(scope="module")
def humanml3d_motion(humanml3d_samples: Path) -> tuple[np.ndarray, np.ndarray]:
    """Root translation and local rotations of a real HumanML3D clip (backend.motion.features_to_rotations)."""
    features = np.load(sorted((humanml3d_samples / "new_joint_vecs").glob("*.npy"))[0]).astype(np.float64)
    return features_to_rotations(features[:80])


def test_reads_real_bandai_clip(bandai_walk: str) -> None:
    bvh = parse_bvh(bandai_walk, "walk")
    assert len(bvh.joint_names) == 22 and bvh.joint_names[:2] == ("joint_Root", "Hips")
    assert bvh.fps == pytest.approx(30.0, rel=1e-4)
    frames = int(bandai_walk.split("Frames:")[1].split()[0])
    assert bvh.motion.shape == (frames, 22 * 6)
    positions = bvh.world_positions().numpy()
    hips, head = bvh.joint_names.index("Hips"), bvh.joint_names.index("Head")
    # Frame 0 of the file: Hips at its own position channels (cm), the head ~47 cm above them.
    np.testing.assert_allclose(positions[0, hips], bvh.motion[0, 6:9])
    assert 35 < positions[0, head, 1] - positions[0, hips, 1] < 60


def test_retarget_bandai_left_is_plus_x_facing_plus_z(bandai_walk: str) -> None:
    bvh = parse_bvh(bandai_walk, "walk")
    jmap = find_map(bvh.joint_names)
    assert jmap.name == "bandai_namco" and unmapped_joints(bvh, jmap) == []
    positions = retarget(bvh, jmap)
    assert positions.shape == (int((bvh.num_frames - 1) * 20 / 30) + 1, 22, 3)
    canonical = canonicalize_positions(positions)
    j = {n: i for i, n in enumerate(SMPL22.joint_names)}
    assert canonical[0, j["left_hip"], 0] > canonical[0, j["right_hip"], 0] + 0.1  # left side at +X
    assert canonical[0, j["left_shoulder"], 0] > canonical[0, j["right_shoulder"], 0] + 0.2
    assert canonical[-1, 0, 2] > 3.0  # walked forward along +Z
    toes = canonical[:, j["left_foot"]] - canonical[:, j["left_ankle"]]
    assert np.median(toes[:, 2]) > 0.05  # feet point forward
    assert 1.3 < canonical[0, j["head"], 1] < 1.8  # metres, on the floor
    # spine3 lies on the Chest -> Neck segment, 20.7 % of the way.
    spine2, spine3, neck = (positions[:, j[n]] for n in ("spine2", "spine3", "neck"))
    np.testing.assert_allclose(spine3, spine2 + 0.207 * (neck - spine2), atol=1e-9)


def test_resample_30_to_20_is_exact_on_shared_frames(bandai_walk: str) -> None:
    bvh = parse_bvh(bandai_walk, "walk")
    trans, quats = bvh.local_transforms()
    t20, q20 = resample(trans, quats, 30.0, 20.0)
    assert t20.shape[0] == (trans.shape[0] - 1) * 2 // 3 + 1
    torch.testing.assert_close(t20[::2], trans[::3][: len(t20[::2])])  # every 2nd new frame is every 3rd old one
    dots = (q20[::2] * quats[::3][: len(q20[::2])]).sum(-1).abs()
    assert torch.all(dots > 1 - 1e-12)


def test_bad_bvh_gives_clear_errors(bandai_walk: str) -> None:
    head, motion = bandai_walk.split("MOTION")
    with pytest.raises(BvhError, match="truncated or padded motion data"):
        parse_bvh(bandai_walk[: len(bandai_walk) // 2], "cut.bvh")
    with pytest.raises(BvhError, match="no MOTION section"):
        parse_bvh(head[:500], "cut-early.bvh")
    with pytest.raises(BvhError, match="non-numeric"):
        first_value = motion.split("\n", 3)[3].split()[0]
        parse_bvh(head + "MOTION" + motion.replace(f" {first_value} ", " abc ", 1), "garbage.bvh")
    with pytest.raises(BvhError, match="unbalanced"):
        parse_bvh(head.rsplit("}", 1)[0] + "MOTION" + motion, "braces.bvh")
    with pytest.raises(BvhError, match="does not start with HIERARCHY"):
        parse_bvh("hello MOTION", "text.bvh")


def test_unknown_skeleton_needs_a_map(bandai_walk: str, tmp_path: Path) -> None:
    renamed = parse_bvh(bandai_walk.replace("Hips", "Pelvis").replace("Chest", "Torso"), "renamed")
    with pytest.raises(ValueError, match=r"unknown skeleton .*pass it with --map"):
        find_map(renamed.joint_names)
    with pytest.raises(ValueError, match=r"missing source joints \['Chest', 'Hips'\]"):
        retarget(renamed, load_map("bandai_namco"))
    # A user map for the renamed skeleton works, and reads the same motion.
    data = json.loads(Path(load_map("bandai_namco").source).read_text())
    data["joints"].update(pelvis="Pelvis", spine2="Torso", spine3={"between": ["Torso", "Neck"], "t": 0.207})
    (tmp_path / "renamed.json").write_text(json.dumps(data))
    expected = retarget(parse_bvh(bandai_walk), load_map("bandai_namco"))
    np.testing.assert_allclose(retarget(renamed, load_map(tmp_path / "renamed.json")), expected)


def test_map_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_map("no_such_map")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_map(tmp_path / "bad.json")
    data = json.loads(Path(load_map("bandai_namco").source).read_text())
    del data["joints"]["head"]
    with pytest.raises(ValueError, match=r"missing target joints \['head'\]"):
        JointMap.from_json(data, "x")
    data["joints"]["head"] = {"between": ["Neck"], "t": 2}
    with pytest.raises(ValueError, match="joint 'head'"):
        JointMap.from_json(data, "x")


def test_z_up_source_is_turned_y_up(humanml3d_motion, tmp_path: Path) -> None:
    root, quats = humanml3d_motion
    path = write_bvh(tmp_path / "m.bvh", SMPL22, root, quats, 20)
    # Rotate the whole motion to Z up: (x, y, z) -> (x, -z, y), i.e. +90 degrees about X.
    turn = torch.tensor([np.cos(np.pi / 4), np.sin(np.pi / 4), 0.0, 0.0], dtype=torch.float64)
    quats_z = torch.as_tensor(np.asarray(quats)).clone()
    quats_z[:, 0] = qmul(turn.expand(len(quats_z), 4), quats_z[:, 0])
    root_z = np.stack([root[:, 0], -root[:, 2], root[:, 1]], axis=-1)
    write_bvh(tmp_path / "z.bvh", SMPL22, root_z, quats_z, 20)
    data = json.loads(Path(load_map("smpl22").source).read_text())
    z_map = JointMap.from_json({**data, "up_axis": "Z"}, "z")
    expected = retarget(read_bvh(path), load_map("smpl22"))
    np.testing.assert_allclose(retarget(read_bvh(tmp_path / "z.bvh"), z_map), expected, atol=1e-5)


def test_write_bvh_round_trip(humanml3d_motion, tmp_path: Path) -> None:
    root, quats = humanml3d_motion
    expected = forward_kinematics(root, quats)
    bvh = read_bvh(write_bvh(tmp_path / "m.bvh", SMPL22, root, quats, 20))
    assert bvh.fps == pytest.approx(20.0) and set(bvh.joint_names) == set(SMPL22.joint_names)
    # The shipped identity map reads the canonical skeleton back (what generated motion looks like on disk).
    assert find_map(bvh.joint_names).name == "smpl22"
    np.testing.assert_allclose(retarget(bvh, load_map("smpl22")), expected, atol=1e-5)


def test_write_bvh_any_rotation(tmp_path: Path) -> None:
    """Random rotations, and X rotations of exactly +-90 degrees (the Euler gimbal lock), survive the round trip."""
    rng = np.random.default_rng(0)
    quats = rng.normal(size=(40, 22, 4))
    quats[:2, 3] = [[np.cos(np.pi / 4), np.sin(np.pi / 4), 0, 0], [np.cos(np.pi / 4), -np.sin(np.pi / 4), 0, 0]]
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    root = rng.normal(size=(40, 3))
    bvh = read_bvh(write_bvh(tmp_path / "r.bvh", SMPL22, root, quats, 30))
    np.testing.assert_allclose(retarget(bvh, load_map("smpl22"), fps=30), forward_kinematics(root, quats), atol=1e-5)


def test_write_bvh_rejects_bad_input(humanml3d_motion, tmp_path: Path) -> None:
    root, quats = humanml3d_motion
    with pytest.raises(ValueError, match=r"local_quats_wxyz \(T, 22, 4\)"):
        write_bvh(tmp_path / "x.bvh", SMPL22, root, quats[:, :21], 20)
    bad = np.array(root, copy=True)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_bvh(tmp_path / "x.bvh", SMPL22, bad, quats, 20)
    with pytest.raises(ValueError, match="fps"):
        write_bvh(tmp_path / "x.bvh", SMPL22, root, quats, 0)


def test_blender_imports_written_bvh(humanml3d_motion, tmp_path: Path) -> None:
    """Blender's own BVH importer lands every joint where our forward kinematics puts it."""
    bpy = pytest.importorskip("bpy")
    root, quats = humanml3d_motion
    expected = forward_kinematics(root, quats)
    path = write_bvh(tmp_path / "m.bvh", SMPL22, root, quats, 20)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    assert bpy.ops.import_anim.bvh(filepath=str(path), update_scene_fps=True) == {"FINISHED"}
    armature = next(o for o in bpy.context.scene.objects if o.type == "ARMATURE")
    scene = bpy.context.scene
    assert scene.render.fps == 20 and len(armature.pose.bones) == 22
    for frame in (0, 37, len(expected) - 1):
        scene.frame_set(scene.frame_start + frame)
        for j, name in enumerate(SMPL22.joint_names):
            head = armature.matrix_world @ armature.pose.bones[name].head
            # Blender imports Y-up BVH into its Z-up world: (x, y, z) -> (x, -z, y).
            np.testing.assert_allclose([head.x, head.z, -head.y], expected[frame, j], atol=1e-4, err_msg=name)
