"""The benchmark tools run as their docstrings say (smoke runs on random tiny weights): a tool nobody runs breaks
unnoticed when the APIs it calls change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_bench_generate_times_every_sampler_and_profiles_the_stages():
    text = _run("tools/bench_generate.py", "--config", "tiny", "--seconds", "2", "--repeats", "1", "--ddim", "3", "1",
                "--profile")
    times, profile = text.split("where the time")
    rows = re.findall(r"^\| DDIM (\d+) steps?,.*?\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", times, re.M)
    assert [r[0] for r in rows] == ["3", "1"], text
    assert float(rows[0][3]) == 1.0 and 0 < float(rows[1][3]) < 1.0  # one step costs less than three
    number = r" \| (-?[\d.]+)"
    stages = re.findall(r"^\| DDIM 3 steps,[^|]*" + number * 7 + r" \|$", profile, re.M)
    assert len(stages) == 1, text
    *parts, total = map(float, stages[0])
    assert all(p > 0 for p in parts[:5]) and abs(sum(parts) - total) < 0.2, stages  # the stages add up


def test_bench_generate_against_an_old_checkout_alternates_and_prints_ratios():
    """Before/after against a checkout (here this one: the tool itself is what is checked): both sides measured in
    fresh processes, each row's ratio now / before computed from the printed times, both profiles."""
    text = _run("tools/bench_generate.py", "--config", "tiny", "--seconds", "2", "--repeats", "1", "--ddim", "2",
                "--fast", "--profile", "--against", str(ROOT), "--rounds", "1")
    rows = re.findall(r"^\| DDIM 2 steps,[^|]*" + r"\| ([\d.]+) " * 5 + r"\|$", text, re.M)
    assert len(rows) == 1, text
    before, now, ratio, before_same, now_same = map(float, rows[0])
    assert min(before, now, before_same, now_same) > 0 and abs(ratio - now / before) < 0.01, rows
    assert re.search(r"^\| before: DDIM 2 steps", text, re.M) and re.search(r"^\| now: DDIM 2 steps", text, re.M), text
    bad = subprocess.run([sys.executable, "tools/bench_generate.py", "--against", str(ROOT / "no-such-checkout")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "--against needs a checkout" in bad.stderr, bad.stderr


def test_bench_scaling_quick_run_measures_both_models():
    text = _run("tools/bench_scaling.py", "--quick")
    points = re.findall(r"^cpu (\w+) +(\d+) s: +([\d.]+) s", text, re.M)
    assert sorted({p[0] for p in points}) == ["mld_transformer", "motion_mamba"] and len(points) == 6, text
    assert all(float(p[2]) > 0 for p in points)


def test_bench_mamba_layer_compares_both_paths_at_every_shape():
    from backend.models.ssm import uses_compiled_scan

    if not uses_compiled_scan():
        pytest.skip("the compiled CPU scan could not be built here: the tool has nothing to compare")
    text = _run("tools/bench_mamba_layer.py")
    rows = re.findall(r"^\| (\d+), (\d+), (\d+)" + r" \| ([\d.]+)" * 6 + r" \|$", text, re.M)
    assert len(rows) == 6, text
    assert all(float(v) > 0 for row in rows for v in row[3:]), text
