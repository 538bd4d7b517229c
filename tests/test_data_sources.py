"""Every mocap format a studio has (issue 17): real clips of the more-mocap archive in each format and rig (CC3 BVH,
DAZ BVH, CMU's ASF-named BVH, HDM05 ASF/AMC, DeepMimic JSON) prepare as a human doing what the text says, with the
issue-15 rotation convention; several sources make one dataset with provenance, duplicates kept once, captions,
held-out takes, and bad files named with their reasons."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.data.__main__ import main as cli
from backend.data.catalog import clip_captions, clip_spec, description_phrases, load_texts, skip_reason
from backend.data.dataset import MotionDataset
from backend.data.prepare import clip_features, prepare
from backend.data.readers import clip_kind, context_member, drop_calibration_frame, read_clip
from backend.data.retarget import (
    choose_map,
    geometry_problems,
    load_map,
    mapping_report,
    reference_points,
    retarget_rotations,
)
from backend.data.source_motion import SourceMotion
from backend.motion import canonicalize_rotations, features_to_positions
from backend.skeleton import SMPL22

ROOT = Path(__file__).resolve().parents[1]
MORE_MOCAP = Path(os.environ.get("MOTION_MAMBA_DATA", ROOT.parent / "shared" / "data")) / "more-mocap.tar.xz"
spec = importlib.util.spec_from_file_location("measure_rotations", ROOT / "tools" / "measure_rotations.py")
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)

P = "more-mocap/"
CLIPS = {  # member -> (expected map, what the motion must show)
    P + "cmu-cc3/002_04.bvh": ("cc3", "jump"),  # "jump, balance"
    P + "cmu-daz/13_39.bvh": ("daz", "jump"),  # "jump", starts with the converter's calibration T-pose
    P + "cmu-daz/16_01.bvh": ("cmu_asf_bvh", "jump"),  # "jump", CMU's own ASF-named BVH
    P + "cmu-deepmimic/cmu01-09/02/02_04.txt": ("deepmimic", "jump"),
    P + "cmu-deepmimic/cmu46-56/49/49_06.txt": ("deepmimic", "cartwheel"),
    P + "hdm05/train/10/HDM_bd_squat1Reps_001_120.amc": ("acclaim", "squat"),
    P + "hdm05/train/7/HDM_bd_lieDownFloor_001_120.amc": ("acclaim", "lie down"),
    P + "hdm05/test/10/HDM_mm_squat1Reps_037_120.amc": ("acclaim", "squat"),  # a held-back performer
}
CONTEXT = [P + "hdm05/train/10/HDM_bd.asf", P + "hdm05/train/7/HDM_bd.asf", P + "hdm05/test/10/HDM_mm.asf",
           P + "cmu-deepmimic/skeleton/humanoid3d.txt", P + "texts/cmu_index.csv", P + "texts/kitml_cmu_captions.json"]
DUPLICATES = [P + "cmu-daz/02_04.bvh"]  # the same trial as cmu-cc3/002_04 and the DeepMimic 02_04


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """The clips, their skeleton files and the texts, read from the real archive in one pass."""
    if not MORE_MOCAP.is_file():
        pytest.skip(f"more-mocap archive not found at {MORE_MOCAP}")
    wanted = set(CLIPS) | set(CONTEXT) | set(DUPLICATES)
    out = {}
    with tarfile.open(MORE_MOCAP, mode="r|xz") as tf:
        for member in tf:
            if member.name in wanted:
                out[member.name] = tf.extractfile(member).read()
    assert set(out) == wanted
    return out


@pytest.fixture(scope="module")
def prepared(files) -> dict[str, dict]:
    """Each clip read, mapped and featurised as ``prepare`` does."""
    out = {}
    for member in CLIPS:
        kind = clip_kind(member, files[member][:400])
        context = context_member(member, kind, files)
        motion = read_clip(member, kind, files[member], files[context] if context else None)
        jmap = choose_map(motion)
        motion, dropped = drop_calibration_frame(motion, jmap)
        features, canonical = clip_features(motion, jmap)
        root, rotations = retarget_rotations(motion, jmap)
        _, rotations = canonicalize_rotations(root, rotations)
        out[member] = {"motion": motion, "map": jmap, "dropped": dropped, "features": features.astype(np.float32),
                       "positions": canonical, "rotations": rotations}
    return out


def _joint(name: str) -> int:
    return SMPL22.joint_names.index(name)


@pytest.mark.parametrize("member", list(CLIPS))
def test_each_format_prepares_a_human_doing_what_the_text_says(prepared, member) -> None:
    clip, (expected_map, action) = prepared[member], CLIPS[member]
    assert clip["map"].name == expected_map
    reference = reference_points(clip["motion"], clip["map"]).numpy()  # the performer's T-pose, metres, unscaled
    height = reference[_joint("head"), 1] - reference[[_joint("left_ankle"), _joint("right_ankle")], 1].min()
    assert 1.25 < height < 1.75, height  # ankle to head joint: a 1.5-1.9 m person
    p = clip["positions"]
    feet = p[:, [_joint(n) for n in ("left_ankle", "right_ankle", "left_foot", "right_foot")], 1]
    pelvis, head = p[:, 0, 1], p[:, _joint("head"), 1]
    assert abs(p[..., 1].min()) < 1e-6  # on the floor
    if action in ("jump", "squat", "lie down"):
        assert np.median(feet.min(axis=1)) < 0.05  # a foot on the floor most of the time
        assert 0.75 < np.median(pelvis[:5]) < 1.1  # starts standing
    if action == "jump":
        assert pelvis.max() - pelvis[:5].mean() > 0.2 and feet.min(axis=1).max() > 0.15  # both feet leave the floor
    elif action == "squat":
        assert pelvis.min() < 0.7 * pelvis[:5].mean()
    elif action == "lie down":
        assert head[-5:].max() < 0.4 and pelvis[-5:].max() < 0.35
    elif action == "cartwheel":
        assert (head < pelvis).any()  # upside down at some point
    # the stored features reproduce the positions, and the stream's forward kinematics lands on them (issue 15)
    assert np.abs(features_to_positions(clip["features"].astype(np.float64)) - p[:-1]).max() < 1e-4
    position, _ = measure.stream_errors(clip["features"])
    assert position.mean() < 0.003 and position.max() < 0.01, (position.mean(), position.max())


@pytest.mark.parametrize("member", list(CLIPS))
def test_twist_follows_the_tpose_convention(prepared, member) -> None:
    """Standing at the first frame, the legs and spine are near the pure swing from the canonical rest (a squat stance
    turns the feet out ~40 degrees), and so are
    arms hanging down (a wrong quarter turn in a map's tpose shows as ~90 degrees here): the canonical rest is the
    performer's T-pose swung onto SMPL by the shortest arc."""
    clip = prepared[member]
    rotations = clip["rotations"][:1]
    twists = {name: abs(float(measure.bone_twist(rotations, name)[0]))
              for j, name in enumerate(SMPL22.joint_names) if len(SMPL22.children[j]) == 1}
    assert max(v for k, v in twists.items() if "hip" in k or "knee" in k or "spine" in k) < 45, twists
    p = clip["positions"][0]
    for side in ("left", "right"):
        arm = p[_joint(f"{side}_elbow")] - p[_joint(f"{side}_shoulder")]
        if arm[1] < -0.85 * np.linalg.norm(arm):  # hanging within ~30 degrees of straight down
            assert twists[f"{side}_shoulder"] < 60 and twists[f"{side}_elbow"] < 60, twists


def test_calibration_start_is_dropped(prepared) -> None:
    assert prepared[P + "cmu-daz/13_39.bvh"]["dropped"] == 12  # 0.1 s at 120 fps: T-pose and blend
    assert prepared[P + "cmu-cc3/002_04.bvh"]["dropped"] == 0
    assert prepared[P + "hdm05/train/10/HDM_bd_squat1Reps_001_120.amc"]["dropped"] == 0


def test_mapping_report_names_what_was_dropped_and_why(prepared) -> None:
    cc3 = prepared[P + "cmu-cc3/002_04.bvh"]
    report = mapping_report(cc3["motion"], cc3["map"], "bone names and rest geometry")
    assert report["mapped"]["left_knee"] == "CC_Base_L_Calf"
    dropped = {name: reason for reason, names in report["dropped"].items() for name in names}
    assert "twist" in dropped["CC_Base_L_ForearmTwist01"] and "fingers" in dropped["CC_Base_R_Index2"]
    assert not any(n.endswith("_End") for n in dropped)  # End Sites are end points, not dropped joints
    acclaim = prepared[P + "hdm05/train/10/HDM_bd_squat1Reps_001_120.amc"]
    report = mapping_report(acclaim["motion"], acclaim["map"], "--map")
    assert report["mapped"]["spine3"] == "0.2 of thorax -> lowerneck" and report["chosen_by"] == "--map"
    assert sorted(n for names in report["dropped"].values() for n in names) == sorted(
        ["lhipjoint", "rhipjoint", "lowerback", "upperneck", "lhand", "rhand", "lfingers", "rfingers", "lthumb",
         "rthumb"])


def test_maps_are_checked_against_rest_geometry(prepared) -> None:
    """Bone names alone do not choose a map: a skeleton whose legs stand up, or in the wrong units, is refused."""
    daz = prepared[P + "cmu-daz/13_39.bvh"]["motion"]
    upside_down = SourceMotion(daz.name, daz.joint_names, daz.parents, daz.translations * torch.tensor([1, -1, 1]),
                               daz.rotations, daz.fps, daz.tips)
    with pytest.raises(ValueError, match=r"rest geometry does not.*daz: the left leg does not hang below the hip"):
        choose_map(upside_down)
    reference = reference_points(daz, load_map("daz")).numpy()
    assert geometry_problems(reference, SMPL22) == []
    assert any("wrong units_per_metre" in p for p in geometry_problems(reference * 100, SMPL22))
    mirrored = reference * np.array([-1, 1, 1])
    assert any("left arm does not reach out to +X" in p for p in geometry_problems(mirrored, SMPL22))


def test_captions_from_kit_descriptions_and_classes(files) -> None:
    texts = load_texts(files)
    captions, origin = clip_captions(clip_spec(P + "cmu-deepmimic/cmu46-56/49/49_06.txt"), texts, 4)
    assert captions[0] == "a human does a cartwheel." and origin == "KIT-ML + CMU description" and len(captions) == 4
    assert any("cartwheel" in c for c in captions[1:])
    captions, origin = clip_captions(clip_spec(P + "cmu-cc3/002_04.bvh"), texts, 4)
    assert origin == "CMU description" and len(set(captions)) == 4 and all("jumps and balances" in c for c in captions)
    spec = clip_spec(P + "hdm05/test/10/HDM_mm_squat1Reps_037_120.amc")
    assert spec.clip_id == "hdm05_mm_squat1Reps_037" and spec.held_out
    assert not clip_spec(P + "hdm05/train/10/HDM_bd_squat1Reps_001_120.amc").held_out
    captions, origin = clip_captions(spec, texts, 4)
    assert origin == "class name 'squat1Reps'" and all("squat" in c for c in captions)
    jog = clip_captions(clip_spec(P + "hdm05/train/5/HDM_bd_jogLeftCircle4StepsRstart_001_120.amc"), texts, 4)[0]
    assert any(c.endswith("jogs in a circle to the left") for c in jog)
    assert description_phrases("playground - climb, jump down") == ("climbs and jumps down", "on a playground")
    assert description_phrases("basketball - forward dribble")[0] == "dribbles forward"
    assert description_phrases("Run Jump Over")[0] == "runs, then jumps over"
    assert description_phrases("slow walk")[0] == "walks slowly"
    for bad in ("unknown", "calibration", "T-pose"):
        assert skip_reason(f"{bad} motion") is not None
    assert skip_reason("walk") is None


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_prepare_several_sources(files, tmp_path: Path, capsys) -> None:
    """Two sources (an archive of CMU clips, a folder of HDM05 takes) into one dataset, with bad files in both."""
    cmu = {m: files[m] for m in files if "hdm05" not in m}
    cmu[P + "cmu-daz/99_01.bvh"] = files[P + "cmu-daz/13_39.bvh"]  # a take whose description says "unknown"
    cmu[P + "texts/cmu_index.csv"] = files[P + "texts/cmu_index.csv"] + b'99,1,"unknown",120\n'
    cmu[P + "cmu-cc3/empty.bvh"] = b""
    cmu[P + "cmu-deepmimic/cmu01-09/02/02_99.txt"] = b'{"Loop": "none", "Frames": [[0.033, 1, 2, 3]]}'
    source_a = _archive(tmp_path / "cmu.tar.gz", cmu)
    source_b = tmp_path / "hdm"
    for member in files:
        if "hdm05" in member:
            (source_b / member).parent.mkdir(parents=True, exist_ok=True)
            (source_b / member).write_bytes(files[member])
    amc = files[P + "hdm05/train/10/HDM_bd_squat1Reps_001_120.amc"]
    (source_b / P / "hdm05/train/10/HDM_bd_squat1Reps_002_120.amc").write_bytes(amc[: len(amc) // 2] + b"\nlfoot x\n")
    (source_b / P / "hdm05/lost").mkdir()
    (source_b / P / "hdm05/lost/HDM_xx_squat1Reps_003_120.amc").write_bytes(amc)

    out = tmp_path / "merged"
    assert cli(["prepare", str(source_a), str(source_b), str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "dataset.json").read_text())
    failures = {f["member"]: f["error"] for f in info["failures"]}
    assert set(failures) == {P + "cmu-cc3/empty.bvh", P + "cmu-deepmimic/cmu01-09/02/02_99.txt",
                             P + "hdm05/train/10/HDM_bd_squat1Reps_002_120.amc",
                             P + "hdm05/lost/HDM_xx_squat1Reps_003_120.amc"}
    assert "no MOTION section" in failures[P + "cmu-cc3/empty.bvh"]
    assert "expected frames of 44 numbers" in failures[P + "cmu-deepmimic/cmu01-09/02/02_99.txt"]
    assert "non-numeric" in failures[P + "hdm05/train/10/HDM_bd_squat1Reps_002_120.amc"]
    assert "no ASF skeleton" in failures[P + "hdm05/lost/HDM_xx_squat1Reps_003_120.amc"]
    skipped = {s["member"]: s["reason"] for s in info["skipped"]}
    assert "'unknown' is not plain human motion" in skipped[P + "cmu-daz/99_01.bvh"]
    for copy in (P + "cmu-daz/02_04.bvh", P + "cmu-deepmimic/cmu01-09/02/02_04.txt"):
        assert skipped[copy].startswith("duplicate of CMU trial 02_04: kept cmu-cc3_02_04")
    assert info["duplicates"]["trials"] == [{"trial": "02_04", "kept": "cmu-cc3_02_04",
                                             "dropped": ["cmu-daz_02_04", "cmu-deepmimic_02_04"]}]
    clips = info["clips"]
    assert set(clips) == {"cmu-cc3_02_04", "cmu-daz_13_39", "cmu-daz_16_01", "cmu-deepmimic_49_06",
                          "hdm05_bd_squat1Reps_001", "hdm05_bd_lieDownFloor_001", "hdm05_mm_squat1Reps_037"}
    assert info["counts"] == {**info["counts"], "prepared": 7, "failed": 4, "skipped": 3}
    assert clips["hdm05_mm_squat1Reps_037"]["split"] == "test"  # the held-back performer
    assert clips["hdm05_mm_squat1Reps_037"]["source"] == "hdm05" and "no commercial" in clips[
        "hdm05_mm_squat1Reps_037"]["license"]
    assert clips["cmu-deepmimic_49_06"]["captions_from"] == "KIT-ML + CMU description"
    assert clips["cmu-daz_13_39"]["notes"] == ["dropped the first 12 frames: a calibration T-pose and the blend out "
                                               "of it"]
    assert clips["cmu-cc3_02_04"]["joint_map"] == "cc3" and clips["cmu-cc3_02_04"]["input"] == "cmu.tar.gz"
    assert "twist and share bones (helpers that follow their limb)" in clips["cmu-cc3_02_04"]["dropped_joints"]
    assert (out / "texts" / "cmu-deepmimic_49_06.txt").read_text().startswith("a human does a cartwheel.#")
    split_ids = [i for s in ("train", "val", "test", "test_unseen_pairs")
                 for i in (out / f"{s}.txt").read_text().split()]
    assert sorted(split_ids) == sorted(clips)
    for clip_id in clips:
        features = np.load(out / "new_joint_vecs" / f"{clip_id}.npy")
        assert features.shape[1] == 263 and np.isfinite(features).all()
    assert set(info["sources"]) == {"cmu-cc3", "cmu-daz", "cmu-deepmimic", "hdm05"}
    assert info["sources"]["hdm05"]["failed"] == 2 and info["sources"]["hdm05"]["prepared"] == 3
    assert "no commercial rights" in info["license"] and "mocap.cs.cmu.edu" in info["attribution"]
    assert "prepared 7 of 14 clips (4 failed, 3 skipped)" in printed and "hdm05" in printed
    assert "failed: more-mocap/cmu-cc3/empty.bvh: " in printed

    # training and evaluation read the sources: a per-source mix for training, one family for evaluation
    every = MotionDataset(out, "all", unit=4)
    hdm = MotionDataset(out, "all", unit=4, sources=["hdm05"])
    assert sorted(hdm.ids) == sorted(i for i in clips if clips[i]["source"] == "hdm05") and len(hdm.ids) == 3
    mixed = MotionDataset(out, "all", unit=4, source_repeats={"hdm05": 3})
    assert len(mixed) == len(every) + 2 * 3 and mixed.ids.count("hdm05_bd_squat1Reps_001") == 3
    copies = [mixed.features[k] for k, i in enumerate(mixed.ids) if i == "hdm05_bd_squat1Reps_001"]
    assert all(c is copies[0] for c in copies)  # repeats share the arrays
    for bad, message in (({"sources": ["bandai-namco"]}, "unknown source 'bandai-namco'"),
                         ({"source_repeats": {"hdm05": 0}}, "hdm05: 0"),
                         ({"source_repeats": {"hdm05": 1.5}}, "hdm05: 1.5")):
        with pytest.raises(ValueError, match=message):
            MotionDataset(out, "all", unit=4, **bad)


def test_every_source_must_hold_clips(files, tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "cmu_index.csv").write_bytes(files[P + "texts/cmu_index.csv"])
    good = _archive(tmp_path / "good.tar.gz", {P + "cmu-cc3/002_04.bvh": files[P + "cmu-cc3/002_04.bvh"]})
    with pytest.raises(ValueError, match="holds no motion clips"):
        prepare([good, tmp_path / "texts"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="the same source is given twice"):
        prepare([good, good], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_whole_more_mocap_archive(tmp_path: Path) -> None:
    """Must-show of issue 17: every clip of the archive prepared or named with its reason, per source."""
    if not MORE_MOCAP.is_file():
        pytest.skip(f"more-mocap archive not found at {MORE_MOCAP}")
    info = prepare([MORE_MOCAP], tmp_path / "mm", workers=2, progress=False)
    assert info["failures"] == []
    assert info["counts"]["clip_files"] == 453 and info["counts"]["prepared"] == 416
    reasons = [s["reason"] for s in info["skipped"]]
    assert sum(r.startswith("duplicate of CMU trial") for r in reasons) == 36 and len(reasons) == 37
    assert {k: v["prepared"] for k, v in info["sources"].items()} == {
        "cmu-cc3": 52, "cmu-dance": 43, "cmu-daz": 33, "cmu-deepmimic": 52, "deepmimic": 10, "hdm05": 226}
    assert info["sources"]["hdm05"]["splits"]["test"] >= 100  # the held-back performers' takes
    assert info["checks"]["roundtrip_max_error_m"] < 1e-4
    print(f"whole more-mocap archive: {info['seconds']} s with {info['workers']} workers")
