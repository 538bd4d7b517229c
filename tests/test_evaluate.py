"""The evaluator and the evaluation report, end to end on tiny models trained for a few steps on real clips."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import evaluate, metrics
from backend.models.evaluator import MotionEncoder, load_evaluator
from backend.motion import features_to_positions
from backend.train import train

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".data" / "bandai"
SPLIT_SIZES = {"train": 40, "val": 12, "test": 36, "test_unseen_pairs": 32}
MAX_FRAMES = 48  # clips are cut to this many frames: tiny generation, tiny evaluator


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one torch thread is as fast and far kinder to the neighbours; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prepare_from_archive(archive: Path, tmp: Path) -> Path:
    """Prepare a slice of the real Bandai archive (1 clip in 16, chosen by a hash of its name) with its labels."""
    from backend.data.captions import stable_seed
    from backend.data.prepare import prepare_bvh

    src = tmp / "bvh"
    with tarfile.open(archive, mode="r|*") as tf:
        for member in tf:
            name = Path(member.name)
            keep = name.name.endswith("label.txt") or name.name == "LICENSE"
            keep = keep or (name.suffix in (".bvh", ".json") and stable_seed(name.stem) % 16 == 0)
            if member.isfile() and keep:
                tf.extract(member, src, filter="data")
    out = tmp / "prepared"
    prepare_bvh(src, out, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def mini_dataset(tmp_path_factory, request) -> Path:
    """A HumanML3D-layout dataset of ~120 real clips cut to MAX_FRAMES frames, split for R-precision (>= 32 test).

    From the prepared dataset at .data/bandai when present, else from a slice of the real archive."""
    tmp = tmp_path_factory.mktemp("mini")
    if (PREPARED / "all.txt").is_file():
        source = PREPARED
    else:
        source = _prepare_from_archive(request.getfixturevalue("bandai_archive"), tmp)
    ids = (source / "all.txt").read_text().split()
    ids = [ids[i] for i in np.linspace(0, len(ids) - 1, min(len(ids), sum(SPLIT_SIZES.values()))).astype(int)]
    if len(ids) < sum(SPLIT_SIZES.values()):
        pytest.skip(f"only {len(ids)} clips prepared")
    out = tmp / "dataset"
    for sub in ("new_joint_vecs", "texts"):
        (out / sub).mkdir(parents=True)
    for clip in ids:
        features = np.load(source / "new_joint_vecs" / f"{clip}.npy")[:MAX_FRAMES]
        np.save(out / "new_joint_vecs" / f"{clip}.npy", features)
        shutil.copy(source / "texts" / f"{clip}.txt", out / "texts" / f"{clip}.txt")
    for name in ("Mean.npy", "Std.npy"):
        shutil.copy(source / name, out / name)
    start = 0
    for split, n in SPLIT_SIZES.items():
        (out / f"{split}.txt").write_text("\n".join(ids[start : start + n]) + "\n")
        start += n
    (out / "all.txt").write_text("\n".join(ids) + "\n")
    return out


@pytest.fixture(scope="module")
def runs(mini_dataset, tmp_path_factory) -> dict[str, Path]:
    """Tiny VAE, Motion Mamba and transformer denoisers over it, and the tiny evaluator, a few steps each."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {name: tmp / name for name in ("vae", "mamba", "mld", "evaluator")}
    train("vae", mini_dataset, out["vae"], "tiny", steps=6, device="cpu", progress=False)
    train("denoiser", mini_dataset, out["mamba"], "tiny", steps=4, vae=out["vae"], device="cpu", progress=False)
    train(
        "denoiser",
        mini_dataset,
        out["mld"],
        "mld_transformer_tiny",
        steps=4,
        vae=out["vae"],
        device="cpu",
        progress=False,
    )
    train("evaluator", mini_dataset, out["evaluator"], "evaluator_tiny", steps=20, device="cpu", progress=False)
    return out


def _args(mini_dataset: Path, runs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(mini_dataset),
        "--evaluator",
        str(runs["evaluator"]),
        "--repeats",
        "2",
        "--steps",
        "3",
        "--mm-prompts",
        "3",
        "--mm-samples",
        "4",
        "--mm-pairs",
        "2",
        "--aits-prompts",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def _real_quality(data: Path, evaluator: Path, repeats: int) -> tuple[float, float]:
    """Jerk and foot skate ratio of the real test clips, as the report's real row should hold them: per repeat
    the mean over the clips drawn with that repeat's seed, then the mean over the repeats."""
    from backend.data.dataset import MotionDataset, load_normalizer

    max_frames = json.loads((evaluator / "config.json").read_text())["train"]["evaluator"]["max_frames"]
    mean, std = (a.astype(np.float32) for a in load_normalizer(data))
    test_set = MotionDataset(data, "test", max_frames=max_frames, unit=4)
    jerks, skates = [], []
    for r in range(repeats):
        joints = [features_to_positions(it.features) for it in evaluate.draw_items(test_set, mean, std, 1000 * r)]
        jerks.append(np.mean([metrics.jerk(p, 20.0) for p in joints]))
        skates.append(np.mean([metrics.foot_skate_ratio(p, (10, 11), 20.0) for p in joints]))
    return float(np.mean(jerks)), float(np.mean(skates))


def test_trained_evaluator_reports_held_out_retrieval(runs):
    config = json.loads((runs["evaluator"] / "config.json").read_text())
    assert config["kind"] == "evaluator"
    val = config["val"]
    assert {"R@1", "R@2", "R@3", "chance_R@1"} <= set(val)
    assert 0.0 <= val["R@1"] <= val["R@2"] <= val["R@3"] <= 1.0
    model = load_evaluator(runs["evaluator"])
    assert not any(k.startswith("text_encoder.") for k in model.state_dict())  # the frozen encoder is not saved


def test_evaluation_report_has_every_metric_with_a_ci(mini_dataset, runs, tmp_path):
    report = evaluate.main(
        _args(
            mini_dataset,
            runs,
            tmp_path / "report.json",
            "--checkpoint",
            str(runs["mamba"]),
            "--baseline",
            str(runs["mld"]),
            "--previews",
            "1",
        )
    )
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["real", "motion_mamba", "mld_transformer", "retrieval"]
    for name, row in rows.items():
        expected = set(evaluate.METRICS) - ({"MultiModality"} if name == "real" else set())
        assert set(row["metrics"]) == expected, name
        for value in row["metrics"].values():
            assert np.isfinite(value["mean"]) and value["ci"] >= 0.0
        assert (row["aits_s"] is None) == (name == "real")
    assert rows["motion_mamba"]["aits_s"] > 0
    # The reference row: real motions sit on the reference distribution, far closer than untrained generators
    fid_real = rows["real"]["metrics"]["FID"]["mean"]
    assert fid_real < 0.1 * min(rows[n]["metrics"]["FID"]["mean"] for n in ("motion_mamba", "mld_transformer"))
    assert report["device"].startswith("cpu")
    # The motion-quality columns: the real row holds the real clips' own jerk and skate (recomputed here), and
    # generators trained for 4 steps put out motion far jerkier than real
    for name, row in rows.items():
        assert row["metrics"]["Jerk"]["mean"] > 0.0 and 0.0 <= row["metrics"]["Foot skate"]["mean"] <= 1.0, name
    real_jerk, real_skate = _real_quality(mini_dataset, runs["evaluator"], repeats=2)
    assert rows["real"]["metrics"]["Jerk"]["mean"] == pytest.approx(real_jerk, rel=1e-5)
    assert rows["real"]["metrics"]["Foot skate"]["mean"] == pytest.approx(real_skate, abs=1e-9)
    assert min(rows[n]["metrics"]["Jerk"]["mean"] for n in ("motion_mamba", "mld_transformer")) > 2 * real_jerk
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][0]["metrics"]["FID"] == rows["real"]["metrics"]["FID"]
    previews = sorted(p.name for p in (tmp_path / "report_previews").iterdir())
    assert previews == [f"00_{name}.png" for name in sorted(rows)]
    table = (tmp_path / "report.md").read_text()
    assert table.startswith("| Method |") and "motion_mamba" in table and "±" in table
    assert "Jerk (m/s³) →" in table and "Foot skate ↓" in table
    assert "Jerk / the real row's: motion_mamba " in table
    print(table)


def test_rows_without_inputs_are_skipped_with_a_note(mini_dataset, runs, tmp_path):
    report = evaluate.main(
        _args(
            mini_dataset,
            runs,
            tmp_path / "r.json",
            "--split",
            "test_unseen_pairs",
            "--no-retrieval",
            "--aits-prompts",
            "0",
        )
    )
    assert [row["name"] for row in report["rows"]] == ["real"]
    notes = " ".join(report["notes"])
    assert "motion_mamba row skipped" in notes and "mld_transformer row skipped" in notes and "retrieval" in notes


def test_bad_evaluation_arguments_are_value_errors(mini_dataset, runs, tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        evaluate.main(_args(mini_dataset, runs, tmp_path / "r.json", "--repeats", "0"))
    with pytest.raises(ValueError, match="not an evaluator"):
        evaluate.main(["--data", str(mini_dataset), "--evaluator", str(runs["vae"])])
    with pytest.raises(ValueError, match="R-precision needs"):
        evaluate.main(_args(mini_dataset, runs, tmp_path / "r.json", "--max-clips", "10"))
    with pytest.raises(ValueError, match="mm-pairs"):
        evaluate.main(_args(mini_dataset, runs, tmp_path / "r.json", "--mm-pairs", "5"))
    with pytest.raises(FileNotFoundError):
        evaluate.main(_args(mini_dataset, runs, tmp_path / "r.json", "--checkpoint", str(tmp_path / "missing")))


def test_cli_reports_bad_input_in_one_line(mini_dataset, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["evaluate", *_args(mini_dataset, runs, tmp_path / "r.json", "--repeats", "0")])
    assert evaluate.cli() == 2
    assert capsys.readouterr().err.strip() == "error: --repeats must be >= 1, got 0"


def test_motion_embedding_does_not_depend_on_batch_padding():
    torch.manual_seed(0)
    enc = MotionEncoder(263, 16, 8).eval()
    x = torch.randn(2, 40, 263)
    lengths = torch.tensor([40, 24])
    x[1, 24:] = 0.0
    with torch.no_grad():
        both = enc(x, lengths)
        alone = enc(x[1:, :24], lengths[1:])
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError):
        enc(x, torch.tensor([40, 2]))
    with pytest.raises(ValueError):
        enc(x[..., :100], lengths)


def test_one_table_for_several_step_counts_and_the_fast_sampler(mini_dataset, runs, tmp_path):
    """``--steps 3 1`` on a checkpoint with a distilled sampler: a Motion Mamba row per step count (1 step on the
    student, 3 above its range on DDIM), the baseline at the first."""
    lcm = tmp_path / "lcm"
    train("lcm", mini_dataset, lcm, steps=2, teacher=runs["mamba"], device="cpu", progress=False)
    args = _args(mini_dataset, runs, tmp_path / "report.json", "--checkpoint", str(lcm), "--baseline",
                 str(runs["mld"]), "--no-retrieval", "--mm-prompts", "0")
    args[args.index("--steps") + 1: args.index("--steps") + 2] = ["5", "1"]
    report = evaluate.main(args)
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["real", "motion_mamba (DDIM, 5 steps)", "motion_mamba (fast, 1 step)",
                          "mld_transformer (DDIM, 5 steps)"]
    assert rows["motion_mamba (fast, 1 step)"]["describe"]["sampler"] == "consistency"
    assert rows["motion_mamba (DDIM, 5 steps)"]["describe"]["sampler"] == "ddim"
    assert rows["mld_transformer (DDIM, 5 steps)"]["describe"]["steps"] == 5 and report["steps"] == [5, 1]
    fids = [rows[n]["metrics"]["FID"]["mean"] for n in rows if n != "real"]
    assert len(set(fids)) == 3  # three different generators' motions
