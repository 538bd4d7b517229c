"""Prompt timelines (issue 18): the text format, the checks that name the bad row, and one continuous motion from
the pipeline whose segments follow their rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from addon.timeline import TimelineRow, check_timeline, parse_timeline, timeline_from_json, timeline_seconds
from addon.wire import GenerateRequest, Limits, WireError
from backend.generate import main as generate_cli
from backend.pipeline import MotionPipeline, collect

GOOD = """# a shot
0 4 a person walks forward
4 7 the person waves with the right hand   # then
7 12.5 a person runs away
"""


def test_the_text_format_reads_rows_and_skips_comments():
    rows = check_timeline(parse_timeline(GOOD))
    assert rows == (TimelineRow(0.0, 4.0, "a person walks forward"),
                    TimelineRow(4.0, 7.0, "the person waves with the right hand"),
                    TimelineRow(7.0, 12.5, "a person runs away"))
    assert timeline_seconds(rows) == 12.5
    assert timeline_from_json([r.to_json() for r in rows]) == rows
    overlapping = check_timeline(parse_timeline("0 6 a person walks\n2 4 a person waves\n"))  # two at once
    assert timeline_seconds(overlapping) == 6.0


@pytest.mark.parametrize("text, message", [
    ("", "no rows"),
    ("# only a comment\n\n", "no rows"),
    ("0 4\n", "line 1: expected 'START END PROMPT'"),
    ("0 4 walk\nzero 7 wave\n", "line 2: START and END are seconds"),
    ("0 4 walk\n5 7 wave\n", r"row 2 \(5-7 s\): leaves 4-5 s with no prompt"),
    ("1 4 walk\n", r"row 1 \(1-4 s\): leaves 0-1 s with no prompt"),
    ("0 4 walk\n4 3 wave\n", r"row 2 \(4-3 s\): lasts -1 s"),
    ("0 4 walk\n4 4.1 wave\n", "lasts 0.1 s; each row needs at least 0.5 s"),
    ("0 4 walk\n-1 7 wave\n", "row 2 .*starts before 0"),
    ("0 4 walk\n3 9 wave\n2 10 run\n", "row 3 .*starts before row 2"),
    ("0 nan walk\n", "row 1: start and end must be finite"),
    ("0 inf walk\n", "row 1: start and end must be finite"),
    ("0 700 walk\n", "ends at 700 s; the limit is 600 s"),
])
def test_bad_timelines_name_the_row(text, message):
    with pytest.raises(WireError, match=message) as info:
        check_timeline(parse_timeline(text))
    assert info.value.code == "bad_request"


def test_bad_rows_on_the_wire_and_in_code():
    for value, message in [([], "non-empty list"), ("0 4 walk", "non-empty list"), ([[0, 4]], "row 1: expected"),
                           ([[0, 4, "walk"], [4, "7", "wave"]], "row 2: expected"),
                           ([[0, 4, "walk"], [4, True, "wave"]], "row 2: expected"),
                           ([[0, 4, "walk"], [4, 7, None]], "row 2: expected")]:
        with pytest.raises(WireError, match=message):
            timeline_from_json(value)
    with pytest.raises(WireError, match=r"row 1 \(0-4 s\): the prompt is empty"):
        check_timeline([TimelineRow(0, 4, "   ")])
    with pytest.raises(WireError, match="the prompt is 1001 characters"):
        check_timeline([TimelineRow(0, 4, "w" * 1001)])
    with pytest.raises(WireError, match="has 3 rows; the limit is 2"):
        check_timeline([TimelineRow(k, k + 1, "walk") for k in range(3)], Limits(max_timeline_rows=2))
    with pytest.raises(WireError, match="row 1 is a tuple"):
        check_timeline([(0, 4, "walk")])
    with pytest.raises(WireError, match="a timeline is text"):
        parse_timeline(b"0 4 walk")


@pytest.fixture(scope="module")
def tiny():
    return MotionPipeline.random("tiny")


def test_a_timeline_is_one_motion_as_long_as_its_rows(tiny):
    rows = parse_timeline(GOOD)
    steps = []
    motions = collect(tiny.timeline(rows, seed=3, steps=4, samples=2, callback=lambda s, n: steps.append(s)))
    assert len(motions) == 2 and steps == [1, 2, 3, 4]
    frames = round(12.5 * tiny.fps)
    for motion in motions:
        assert motion.frames == frames and np.isfinite(motion.positions).all()
        assert "0-4 s: a person walks forward" in motion.prompt and "7-12.5 s: a person runs away" in motion.prompt
    assert not np.allclose(motions[0].features, motions[1].features)  # sample k uses seed + k
    again = collect(tiny.timeline(rows, seed=3, steps=4))[0]
    np.testing.assert_array_equal(again.features, motions[0].features)


def test_a_one_row_timeline_is_the_plain_generation(tiny):
    """One row covering the whole motion: the same windows, weights and noise as a plain request."""
    timeline = collect(tiny.timeline([TimelineRow(0, 3, "a person walks")], seed=5, steps=3))[0]
    plain = tiny("a person walks", seconds=3.0, seed=5, steps=3)
    np.testing.assert_allclose(timeline.features, plain.features, atol=1e-5)


def test_each_row_conditions_its_own_frames():
    """The shipped model: changing the last row's prompt changes the end of the motion far more than its start
    (windows reach 1 s beyond their rows; the tiny random model ignores text, its output layer starts at zero)."""
    shipped = MotionPipeline.from_checkpoint(device="cpu")
    a = collect(shipped.timeline(parse_timeline("0 5 a person walks\n5 10 a person waves\n"), steps=5))[0]
    b = collect(shipped.timeline(parse_timeline("0 5 a person walks\n5 10 a person runs fast\n"), steps=5))[0]
    fps = shipped.fps
    # DDIM mixes neighbouring tokens through the denoiser, so the start differs a little; the end much more
    start = np.abs(a.features[: 2 * fps] - b.features[: 2 * fps]).mean()
    end = np.abs(a.features[-3 * fps:] - b.features[-3 * fps:]).mean()
    assert end > 5 * start, (start, end)


def test_timeline_arguments_are_checked(tiny):
    with pytest.raises(WireError, match="leaves 2-3 s"):
        tiny.timeline([TimelineRow(0, 2, "walk"), TimelineRow(3, 4, "run")])
    with pytest.raises(ValueError, match="must share seconds, guidance, steps, samples and timeline"):
        tiny.stream([GenerateRequest(timeline=(TimelineRow(0, 2, "walk"),)),
                     GenerateRequest(timeline=(TimelineRow(0, 3, "walk"),))])
    with pytest.raises(WireError, match="steps"):
        tiny.timeline([TimelineRow(0, 2, "walk")], steps=0)


def test_the_cli_takes_a_timeline_file(tmp_path, capsys):
    path = tmp_path / "shot.txt"
    path.write_text(GOOD, encoding="utf-8")
    out = tmp_path / "shot.npz"
    assert generate_cli(["--timeline", str(path), "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "250 frames (12.50 s at 20 fps) of a timeline of 3 rows" in printed
    saved = np.load(out)
    assert saved["features"].shape == (250, 263) and math.isclose(float(saved["fps"]), 20)
    path.write_text("0 4 walk\n5 7 wave\n", encoding="utf-8")
    assert generate_cli(["--timeline", str(path), "--out", str(out)]) == 2
    assert "row 2 (5-7 s): leaves 4-5 s with no prompt" in capsys.readouterr().err
    assert generate_cli(["a person walks", "--timeline", str(path), "--out", str(out)]) == 2
    assert "give a prompt or --timeline FILE" in capsys.readouterr().err
