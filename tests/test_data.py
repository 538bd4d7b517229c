"""prepare-bvh on real Bandai-Namco clips: counts, features, round trip, captions, splits, errors, Dataset, previews."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.data.__main__ import main as cli
from backend.data.bvh import parse_bvh
from backend.data.captions import label_key, make_captions, parse_caption_file, phrasings
from backend.data.dataset import MotionDataset, collate_motion, load_normalizer, motion_loader
from backend.data.prepare import prepare_bvh
from backend.data.retarget import find_map, retarget_rotations
from backend.data.splits import make_splits
from backend.motion import (
    canonicalize_rotations,
    features_to_positions,
    features_to_rotations,
    forward_kinematics,
    rotation_channels,
)
from backend.preview import render_preview
from backend.skeleton import SMPL22

CLIPS = [  # a walk, a run and waves in several styles, from both Bandai sets
    "dataset-1_walk_normal_001", "dataset-1_bye_happy_001", "dataset-2_walk_normal_001", "dataset-2_walk_elderly_001",
    "dataset-2_run_normal_001", "dataset-2_run_active_001", "dataset-2_wave-left-hand_normal_001",
    "dataset-2_wave-right-hand_normal_001", "dataset-2_wave-right-hand_youthful_002",
    "dataset-2_wave-both-hands_feminine_003",
]
SPLITS = ("train", "val", "test", "test_unseen_pairs")


@pytest.fixture(scope="session")
def bandai_subset(bandai_archive: Path, tmp_path_factory) -> dict:
    """A small .tar.gz of real clips (with their label .json, cfg/ and LICENSE files) pulled from the archive with
    tarfile in one pass, plus the (content, style) of every clip in the whole archive, from the file names."""
    out = tmp_path_factory.mktemp("bandai") / "subset.tar.gz"
    labels, texts = {}, {}
    with tarfile.open(bandai_archive, mode="r|xz") as src, tarfile.open(out, mode="w:gz") as dst:
        for member in src:
            name = Path(member.name)
            if name.suffix == ".bvh":
                _, content, style, _ = name.stem.split("_")
                labels[name.stem] = (content, style)
            keep = name.stem in CLIPS or name.parent.name == "cfg" or name.name == "LICENSE"
            if member.isfile() and keep:
                data = src.extractfile(member).read()
                dst.addfile(member, io.BytesIO(data))
                if name.suffix == ".bvh":
                    texts[name.stem] = data.decode()
    assert set(texts) == set(CLIPS)
    return {"archive": out, "labels": labels, "bvh": texts}


@pytest.fixture(scope="session")
def prepared(bandai_subset: dict, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "bandai"
    info = prepare_bvh(bandai_subset["archive"], out, workers=2, progress=False)
    return out, info


def _ids(root: Path, split: str) -> list[str]:
    return (root / f"{split}.txt").read_text().split()


def test_prepare_layout_and_counts(prepared) -> None:
    root, info = prepared
    assert info == json.loads((root / "dataset.json").read_text())
    assert info["counts"]["clip_files"] == len(CLIPS) and info["counts"]["prepared"] == len(CLIPS)
    assert info["failures"] == [] and info["counts"]["failed"] == 0
    assert info["fps"] == 20 and info["feature_dim"] == 263
    assert info["skeleton"]["joint_names"] == list(SMPL22.joint_names)
    assert info["license"] == "CC BY-NC 4.0" and "Bandai Namco" in info["attribution"]
    assert sorted(p.stem for p in (root / "new_joint_vecs").glob("*.npy")) == sorted(CLIPS)
    assert sorted(p.stem for p in (root / "texts").glob("*.txt")) == sorted(CLIPS)
    assert sum(info["counts"]["splits"].values()) == len(CLIPS)
    assert sorted(i for s in SPLITS for i in _ids(root, s)) == sorted(CLIPS)
    frames = 0
    for clip in CLIPS:
        features = np.load(root / "new_joint_vecs" / f"{clip}.npy")
        joints = np.load(root / "new_joints" / f"{clip}.npy")
        assert features.dtype == np.float32 and features.shape[1] == 263 and np.isfinite(features).all()
        assert joints.shape == (features.shape[0], 22, 3)
        np.testing.assert_allclose(features_to_positions(features.astype(np.float64)), joints, atol=1e-5)
        frames += features.shape[0]
    assert info["counts"]["frames"] == frames
    mean, std = load_normalizer(root)
    assert mean.shape == std.shape == (263,) and np.isfinite(mean).all() and (std > 0).all()


def test_features_reproduce_retargeted_positions_within_1cm(prepared, bandai_subset) -> None:
    """Independently retarget every source clip again; the prepared features must land on it (< 1 cm)."""
    root, info = prepared
    for clip, text in bandai_subset["bvh"].items():
        bvh = parse_bvh(text, clip)
        canonical, _ = canonicalize_rotations(*retarget_rotations(bvh, find_map(bvh.joint_names)))
        features = np.load(root / "new_joint_vecs" / f"{clip}.npy").astype(np.float64)
        assert features.shape[0] == canonical.shape[0] - 1 == (bvh.num_frames - 1) * 2 // 3
        assert np.abs(features_to_positions(features) - canonical[:-1]).max() < 0.01, clip
    assert info["checks"]["roundtrip_max_error_m"] < 0.01


def test_stream_reproduces_every_prepared_clip(prepared) -> None:
    """The rotation channels hold the mocap's rotations ("local"), and the stream's forward kinematics lands on
    each clip's positions (issue 15: mean <= 0.3%, max <= 1% of height; the positions-only preparation gave 2.4/4.7)."""
    root, info = prepared
    assert info["provenance"]["rotation_channels"].startswith("local")
    height = 1.56  # canonical rest: floor to head joint
    for clip in CLIPS:
        features = np.load(root / "new_joint_vecs" / f"{clip}.npy")
        assert rotation_channels(features) == "local", clip
        error = np.linalg.norm(forward_kinematics(*features_to_rotations(features)) - np.load(
            root / "new_joints" / f"{clip}.npy"), axis=-1) / height
        assert error.mean() <= 0.003 and error.max() <= 0.01, clip


def test_motion_semantics(prepared) -> None:
    """Left is +X when facing +Z: the left-hand wave raises the left wrist; walks go forward along +Z."""
    root, _ = prepared
    j = {n: i for i, n in enumerate(SMPL22.joint_names)}

    def joints(clip: str) -> np.ndarray:
        return np.load(root / "new_joints" / f"{clip}.npy")

    for clip, up, down in [("dataset-2_wave-left-hand_normal_001", "left_wrist", "right_wrist"),
                           ("dataset-2_wave-right-hand_normal_001", "right_wrist", "left_wrist")]:
        p = joints(clip)
        assert p[:, j[up], 1].max() > p[:, j["head"], 1].max(), clip
        assert p[:, j[down], 1].max() < p[:, j["pelvis"], 1].max(), clip
        assert p[0, j["left_hip"], 0] > p[0, j["right_hip"], 0]
    walk, run = joints("dataset-2_walk_normal_001"), joints("dataset-2_run_normal_001")
    assert walk[-1, 0, 2] > 5 and abs(walk[-1, 0, 0]) < 2
    walk_speed = np.linalg.norm(np.diff(walk[:, 0, [0, 2]], axis=0), axis=-1).mean() * 20
    run_speed = np.linalg.norm(np.diff(run[:, 0, [0, 2]], axis=0), axis=-1).mean() * 20
    assert 0.8 < walk_speed < 2.0 and run_speed > 1.5 * walk_speed


def test_captions(prepared) -> None:
    root, _ = prepared
    for clip in CLIPS:
        lines = parse_caption_file((root / "texts" / f"{clip}.txt").read_text())
        _, content, style, _ = clip.split("_")
        assert [line["caption"] for line in lines] == make_captions(clip, content, style)
        assert len(lines) == 4 and len({line["caption"] for line in lines}) == 4
        for line in lines:
            assert line["start"] == 0.0 and line["end"] == 0.0
            assert all(tok.count("/") == 1 and tok.split("/")[1].isupper() for tok in line["tokens"])
            assert any(tok.endswith("/VERB") for tok in line["tokens"])
    text = (root / "texts" / "dataset-2_wave-left-hand_normal_001.txt").read_text()
    assert "left hand" in text and "right" not in text
    elderly = (root / "texts" / "dataset-2_walk_elderly_001.txt").read_text()
    assert all(("elderly" in line or "old" in line or "senior" in line) for line in elderly.splitlines())
    assert make_captions("x", "walk", "old") != make_captions("y", "walk", "old")  # seeded by clip id
    with pytest.raises(ValueError, match="no caption templates for content 'moonwalk'"):
        phrasings("moonwalk", "normal")
    with pytest.raises(ValueError, match="line 1"):
        parse_caption_file("a caption without fields\n")


def test_splits_on_the_whole_archive(bandai_subset) -> None:
    labels = bandai_subset["labels"]
    assert len(labels) == 2766
    splits = make_splits(labels)
    assert splits == make_splits(dict(reversed(list(labels.items()))))  # deterministic, order-free
    sets = {k: set(v) for k, v in splits.items()}
    assert sum(len(s) for s in sets.values()) == len(labels) and set().union(*sets.values()) == set(labels)
    for name in ("val", "test", "test_unseen_pairs"):
        assert 0.03 * len(labels) < len(sets[name]) < 0.10 * len(labels), name

    def pairs(ids):
        return {(label_key(labels[i][0]), label_key(labels[i][1])) for i in ids}

    seen = pairs(sets["train"])
    unseen = pairs(sets["test_unseen_pairs"])
    assert unseen and not unseen & (seen | pairs(sets["val"]) | pairs(sets["test"]))
    assert pairs(sets["test"]) <= seen  # test = unseen takes of seen pairs
    for content, style in unseen:  # compositional: each part was seen in training, just not together
        assert any(c == content for c, _ in seen) and any(s == style for _, s in seen)
    # Adding clips does not move existing clips between train/val/test (except held-out pairs).
    fewer = make_splits({k: v for k, v in labels.items() if not k.endswith("_001")})
    for name in ("val", "test"):
        assert set(fewer[name]) - sets[name] <= sets["test_unseen_pairs"] | set(fewer["test_unseen_pairs"])


def test_prepare_is_deterministic_across_worker_counts(prepared, bandai_subset, tmp_path: Path) -> None:
    root, info = prepared
    again = prepare_bvh(bandai_subset["archive"], tmp_path / "again", workers=1, progress=False)
    assert again["counts"] == info["counts"] and again["splits"] == info["splits"]
    for clip in CLIPS:
        text = (root / "texts" / f"{clip}.txt").read_text()
        assert (tmp_path / "again" / "texts" / f"{clip}.txt").read_text() == text
        np.testing.assert_array_equal(np.load(tmp_path / "again" / "new_joint_vecs" / f"{clip}.npy"),
                                      np.load(root / "new_joint_vecs" / f"{clip}.npy"))


def test_bad_clips_are_reported_and_the_rest_prepared(bandai_subset, tmp_path: Path) -> None:
    """A folder source with a truncated BVH, an unknown skeleton and a clip without labels beside good clips."""
    src = tmp_path / "src"
    (src / "cfg").mkdir(parents=True)
    with tarfile.open(bandai_subset["archive"]) as tf:
        for member in tf.getmembers():
            if "/cfg/" in member.name and "dataset-2" in member.name:
                (src / "cfg" / Path(member.name).name).write_bytes(tf.extractfile(member).read())
    good = ["dataset-2_run_normal_001", "dataset-2_walk_normal_001"]
    for clip in good:
        (src / f"{clip}.bvh").write_text(bandai_subset["bvh"][clip])
        (src / f"{clip}.json").write_text(json.dumps({"content": "run" if "run" in clip else "walk", "style": 5}))
    text = bandai_subset["bvh"]["dataset-2_walk_elderly_001"]
    (src / "truncated.bvh").write_text(text[: len(text) * 2 // 3])
    (src / "alien.bvh").write_text(text.replace("Hips", "Pelvis"))
    (src / "nolabel.bvh").write_text(text)
    for clip in ("truncated", "alien"):
        (src / f"{clip}.json").write_text('{"content": 0, "style": 1}')
    info = prepare_bvh(src, tmp_path / "out", workers=2, progress=False)
    errors = {f["member"]: f["error"] for f in info["failures"]}
    assert set(errors) == {"truncated.bvh", "alien.bvh", "nolabel.bvh"}
    assert "truncated or padded motion data" in errors["truncated.bvh"]
    assert "unknown skeleton" in errors["alien.bvh"] and "--map" in errors["alien.bvh"]
    assert "no labels" in errors["nolabel.bvh"]
    assert info["counts"]["prepared"] == 2 and info["counts"]["failed"] == 3
    assert sorted(p.stem for p in (tmp_path / "out" / "new_joint_vecs").glob("*.npy")) == good
    assert info["license"].startswith("unknown")


def test_bad_arguments(bandai_subset, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(ValueError, match=r"holds no motion clips"):
        prepare_bvh(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(ValueError, match=r"output parent folder .* does not exist"):
        prepare_bvh(bandai_subset["archive"], tmp_path / "missing" / "out", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        prepare_bvh(tmp_path / "nothing.tar.xz", tmp_path / "out", progress=False)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a folder or one of"):
        prepare_bvh(tmp_path / "notes.txt", tmp_path / "out", progress=False)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        prepare_bvh(broken, tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="--force"):
        prepare_bvh(bandai_subset["archive"], tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="joint map 'nope' not found"):
        prepare_bvh(bandai_subset["archive"], tmp_path / "out", joint_map="nope", progress=False)
    assert cli(["prepare-bvh", str(empty), str(tmp_path / "missing" / "out")]) == 2
    assert "error: output parent folder" in capsys.readouterr().err


def test_zip_source_with_labels_file_and_cli(bandai_subset, tmp_path: Path, capsys) -> None:
    clips = ["dataset-2_walk_normal_001", "dataset-2_run_active_001"]
    with zipfile.ZipFile(tmp_path / "clips.zip", "w") as zf:
        for clip in clips:
            zf.writestr(f"mocap/{clip}.bvh", bandai_subset["bvh"][clip])
    labels = {clip: {"content": clip.split("_")[1], "style": clip.split("_")[2]} for clip in clips}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    args = ["prepare-bvh", str(tmp_path / "clips.zip"), str(tmp_path / "out"),
            "--labels", str(tmp_path / "labels.json"), "--map", "bandai_namco", "--workers", "1"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "prepared 2 of 2 clips (0 failed, 0 skipped)" in out and "round trip max error" in out
    assert sorted(_ids(tmp_path / "out", "all")) == sorted(clips)
    assert cli(args) == 2  # OUT exists now
    assert cli([*args, "--force"]) == 0


def test_dataset_and_loader(prepared) -> None:
    root, _ = prepared
    mean, std = load_normalizer(root)
    ds = MotionDataset(root, "all", max_frames=40, unit=4)
    assert len(ds) == len(CLIPS) and ds.skipped == []
    torch.manual_seed(0)
    for k in range(len(ds)):
        item = ds[k]
        raw = np.load(root / "new_joint_vecs" / f"{item['id']}.npy")
        assert item["length"] % 4 == 0 and item["length"] == min(40, raw.shape[0] // 4 * 4)
        assert item["features"].shape == (item["length"], 263) and item["features"].dtype == torch.float32
        # The window is a normalised crop of the clip.
        windows = np.lib.stride_tricks.sliding_window_view((raw - mean) / std, item["length"], axis=0)
        assert np.abs(windows.transpose(0, 2, 1) - item["features"].numpy()).max(axis=(1, 2)).min() < 1e-5
        captions = [line["caption"] for line in parse_caption_file((root / "texts" / f"{item['id']}.txt").read_text())]
        assert item["caption"] in captions
    batch = collate_motion([ds[0], MotionDataset(root, "all", max_frames=12)[1]])
    assert batch["features"].shape == (2, batch["lengths"].max(), 263)
    assert batch["mask"].sum(1).tolist() == batch["lengths"].tolist()
    assert batch["features"][1, 12:].abs().sum() == 0 and batch["ids"] == [ds.ids[0], ds.ids[1]]
    long_only = MotionDataset(root, "all", min_frames=10_000)
    assert len(long_only) == 0 and sorted(long_only.skipped) == sorted(ds.ids)
    loader = motion_loader(root, "all", batch_size=4, max_frames=40)
    assert sum(len(b["ids"]) for b in loader) == len(CLIPS)
    with pytest.raises(ValueError, match="no split file"):
        MotionDataset(root, "nope")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        load_normalizer(root / "texts")


def test_previews(prepared, tmp_path: Path, capsys) -> None:
    root, _ = prepared
    joints = np.load(root / "new_joints" / "dataset-2_run_normal_001.npy")
    png = render_preview(joints, tmp_path / "run.png", title="run")
    with Image.open(png) as im:
        assert im.width > 3 * im.height and len(np.unique(np.asarray(im.convert("L")))) > 10
    gif = render_preview(joints[:30], tmp_path / "run.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 30
    assert cli(["preview", str(root), "dataset-2_run_normal_001", "--out", str(tmp_path / "run.gif")]) == 0
    assert cli(["preview", str(root / "new_joint_vecs" / "dataset-2_walk_normal_001.npy"), "--out",
                str(tmp_path / "walk.png")]) == 0
    assert (tmp_path / "run.gif").stat().st_size > 1000 and (tmp_path / "walk.png").stat().st_size > 1000
    assert cli(["preview", str(root), "dataset-2_run_normal_001", "dataset-2_wave-left-hand_normal_001", "--out",
                str(tmp_path / "both.png")]) == 0
    with Image.open(tmp_path / "both.png") as both, Image.open(png) as one:
        assert both.width == one.width and both.height == 2 * one.height
    assert cli(["preview", str(root), "no_such_clip", "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\.png .* or a \.gif"):
        render_preview(joints, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="shape"):
        render_preview(joints[..., :2], tmp_path / "x.png")


@pytest.mark.slow
def test_prepare_whole_archive(bandai_archive: Path, tmp_path: Path) -> None:
    info = prepare_bvh(bandai_archive, tmp_path / "bandai", progress=False)
    counts = info["counts"]
    assert counts["clip_files"] == 2766 and counts["prepared"] + counts["failed"] == 2766
    assert counts["failed"] == len(info["failures"]) <= 5  # only the known features round-trip cases, by name
    assert info["checks"]["roundtrip_max_error_m"] < 0.01
    assert sum(counts["splits"].values()) == counts["prepared"]
    print(f"whole archive: {info['seconds']} s with {info['workers']} workers")
