"""tools/batch_generate.py end to end: the real CLI (python + bpy), a real tiny-model backend process on a free
loopback port, Blender's own importers reading back what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from addon.armature import build_armature, canonical_bones  # noqa: E402
from addon.canonical import SMPL22_BUILTIN  # noqa: E402
from addon.client import MotionClient  # noqa: E402
from addon.keying import action_fcurves  # noqa: E402
from addon.retarget import PRESETS  # noqa: E402
from addon.wire import GenerateRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "batch_generate.py"
sys.path.insert(0, str(ROOT / "tools"))
import batch_generate  # noqa: E402

STEPS = "2"  # denoising steps: the tests check plumbing, not motion quality


def free_port() -> int:
    return batch_generate.free_port()


@contextlib.contextmanager
def serve_tiny(*options: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m backend.serve --config tiny [options]` on a free loopback port: (endpoint, process)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "backend.serve", "--config", "tiny", "--bind", endpoint,
                                *options], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with MotionClient(endpoint, timeout=5.0) as client:
            deadline = time.monotonic() + 180
            while True:
                assert process.poll() is None, "the backend exited while starting"
                try:
                    client.hello(timeout=1.0)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the backend did not answer within 180 s"
        yield endpoint, process
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def backend():
    """A tiny-model backend process for the whole module; its endpoint."""
    with serve_tiny() as (endpoint, _):
        yield endpoint


def run_tool(*args: str, blender_argv: bool = False) -> tuple[int, list[str]]:
    """Run the tool as a user would (`python tools/batch_generate.py -- ARGS`); (exit status, stdout lines).

    ``blender_argv`` runs it the way `blender -b scene.blend --python TOOL -- ARGS` does: as __main__ with
    __file__ set, and Blender's own options in sys.argv before the `--`."""
    tool_args = ["--", "--steps", STEPS, *args]
    if blender_argv:
        argv = ["blender", "-b", "scene.blend", "--python", str(TOOL), *tool_args]
        code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(TOOL)!r}, run_name='__main__')"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, str(TOOL), *tool_args]
    done = subprocess.run(command, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr[-3000:], sep="\n")
    return done.returncode, done.stdout.strip().splitlines()


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("prompt,seconds,seed,name\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def mixamo_blend(tmp_path_factory) -> Path:
    """A .blend at 24 fps holding 'Rig', a Mixamo-named armature 1.1x the canonical size (not the source)."""
    path = tmp_path_factory.mktemp("scene") / "rig.blend"
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    scene = bpy.context.scene
    scene.render.fps = 24
    heads, tails = canonical_bones(SMPL22_BUILTIN, height_scale=1.1)
    names = [PRESETS["MIXAMO"][n] for n in SMPL22_BUILTIN.names]
    build_armature(scene.collection, "Rig", names, SMPL22_BUILTIN.parents, heads, tails)
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    return path


def batch_actions() -> dict[str, object]:
    return {a["motion_mamba"]["prompt"]: a for a in bpy.data.actions if "motion_mamba" in a}


def world_heads(obj, frame: int) -> np.ndarray:
    bpy.context.scene.frame_set(frame)
    return np.array([obj.matrix_world @ b.head for b in obj.pose.bones])


@pytest.fixture(scope="module")
def three_prompts(backend, mixamo_blend, tmp_path_factory):
    """One batch of three prompts onto the Mixamo rig with BVH exports; (command args, out folder, stdout)."""
    out = tmp_path_factory.mktemp("batch")
    prompts = write_csv(out.parent / "three.csv", ["a person walks forward,1.0,1,", "a person jumps,0.5,2,jump",
                                                   '"waves, then sits",1.5,3,'])  # fmt: skip
    args = ["--prompts", str(prompts), "--blend", str(mixamo_blend), "--armature", "Rig", "--backend", backend,
            "--start-backend", "never", "--export", "bvh", "--out", str(out)]  # fmt: skip
    status, lines = run_tool(*args)
    assert status == 0, lines
    return args, out, lines


def test_three_prompts_make_actions_on_the_target_armature(three_prompts):
    _, out, lines = three_prompts
    assert lines[-1] == "OK: all 3 prompts done (3 generated, 0 skipped)"
    assert any(line.startswith("throughput: ") and "prompts/minute" in line for line in lines)
    bpy.ops.wm.open_mainfile(filepath=str(out / "motions.blend"))
    rig = bpy.data.objects["Rig"]
    assert bpy.context.scene.render.fps == 24  # the user's scene keeps its frame rate
    actions = batch_actions()
    assert sorted(actions) == ["a person jumps", "a person walks forward", "waves, then sits"]
    assert actions["a person jumps"].name == "jump"  # the row's name column
    bones = {b.name for b in rig.data.bones}
    values = []
    for prompt, seconds in (("a person walks forward", 1.0), ("a person jumps", 0.5), ("waves, then sits", 1.5)):
        action = actions[prompt]
        frames = round(seconds * 20)  # the backend's 20 fps, keyed on the scene's 24 fps timeline
        curves = action_fcurves(action)
        assert len(curves) == 22 * 4 + 3  # a quaternion per mapped bone, the root location
        for fc in curves:
            assert fc.data_path.split('"')[1] in bones
            assert len(fc.keyframe_points) == frames
        assert tuple(action.frame_range) == pytest.approx((1.0, 1.0 + (frames - 1) * 24 / 20), abs=1e-4)
        assert action.use_fake_user and action["motion_mamba"]["seconds"] == seconds
        values.append(np.array([k.co[1] for k in curves[0].keyframe_points[:10]]))
    assert not np.allclose(values[0], values[1])  # three motions, not one keyed three times


def test_each_bvh_reimports_in_blender_and_matches_its_action(three_prompts):
    _, out, _ = three_prompts
    items = summary(out)["items"]
    for item in items:
        bpy.ops.wm.open_mainfile(filepath=str(out / "motions.blend"))
        rig = bpy.data.objects["Rig"]
        rig.animation_data.action = bpy.data.actions[item["outputs"]["action"]]
        rig.animation_data.action_slot = rig.animation_data.action.slots[0]
        end = round(item["seconds"] * 24)  # the exporter samples the scene's 24 fps timeline
        assert bpy.ops.import_anim.bvh(filepath=item["outputs"]["bvh"], axis_forward="Y", axis_up="Z",
                                       use_fps_scale=False, update_scene_duration=False) == {"FINISHED"}  # fmt: skip
        imported = bpy.context.object
        assert imported.type == "ARMATURE" and imported is not rig
        assert [b.name for b in imported.data.bones] == [b.name for b in rig.data.bones]
        assert tuple(imported.animation_data.action.frame_range) == (1.0, float(end))
        for frame in (1, end // 2, end):
            got, want = world_heads(imported, frame), world_heads(rig, frame)
            assert np.abs(got - want).max() < 1e-3, (item["name"], frame)


def test_summary_records_each_prompt(three_prompts):
    _, out, _ = three_prompts
    data = summary(out)
    assert data["totals"]["done"] == 3 and data["totals"]["failed"] == 0
    assert data["totals"]["prompts_per_minute"] > 0 and data["totals"]["motion_s_per_s"] > 0
    for item, (prompt, seed) in zip(data["items"], [("a person walks forward", 1), ("a person jumps", 2),
                                                    ("waves, then sits", 3)]):  # fmt: skip
        assert (item["prompt"], item["seed"], item["status"], item["error"]) == (prompt, seed, "done", "")
        assert item["frames"] == round(item["seconds"] * 20)
        assert Path(item["outputs"]["bvh"]).is_file()
        assert item["timings"]["request_s"] > 0 and item["timings"]["generate_s"] > 0
    assert data["backend"]["started"] == "no (already running)"


def test_a_second_run_does_no_work(three_prompts):
    args, out, _ = three_prompts
    files = [*sorted(out.glob("*.bvh")), out / "motions.blend"]
    stamps = [f.stat().st_mtime_ns for f in files]
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there: any generation would fail
    status, lines = run_tool(*args, "--backend", dead, blender_argv=True)  # the last --backend wins
    assert status == 0
    assert lines[-1] == "OK: all 3 prompts done (0 generated, 3 skipped)"
    data = summary(out)
    assert [i["status"] for i in data["items"]] == ["skipped"] * 3
    assert data["backend"]["contacted"] is False and data["totals"]["generate_s"] == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    print(f"second run: {data['totals']['wall_s']:.2f} s in the tool, nothing generated")


def test_a_missing_output_is_remade_alone(three_prompts, backend):
    args, out, _ = three_prompts
    item = summary(out)["items"][1]
    Path(item["outputs"]["bvh"]).unlink()
    status, lines = run_tool(*args)
    assert status == 0 and lines[-1] == "OK: all 3 prompts done (1 generated, 2 skipped)"
    assert [i["status"] for i in summary(out)["items"]] == ["skipped", "done", "skipped"]
    bpy.ops.wm.open_mainfile(filepath=str(out / "motions.blend"))
    assert len(batch_actions()) == 3  # the remade motion replaced its Action, it did not add a fourth


def test_bad_rows_are_reported_and_the_rest_is_done(tmp_path):
    prompts = write_csv(tmp_path / "bad.csv", ["a person runs,1.0,0,", ",1.0,0,empty", "a person crawls,-2,0,",
                                               "a person kicks,1.0,abc,", "a person bows,1.0,4,"])  # fmt: skip
    out = tmp_path / "out"
    status, lines = run_tool("--prompts", str(prompts), "--backend", f"tcp://127.0.0.1:{free_port()}",
                             "--start-backend", "inprocess", "--config", "tiny", "--no-blend-out", "--export", "bvh",
                             "--out", str(out))  # fmt: skip
    assert status == 1
    assert summary(out)["backend"]["started"] == "inprocess"
    assert lines[-1] == f"FAILED: 3 of 5 prompts failed (details in {out / 'summary.json'})"
    items = summary(out)["items"]
    assert [i["status"] for i in items] == ["done", "failed", "failed", "failed", "done"]
    assert items[1]["error"] == "prompt is empty"
    assert items[2]["error"] == "field 'seconds' must be between 0.5 and 120.0, got -2.0"
    assert items[3]["error"] == "seed must be an integer, got 'abc'"
    assert sorted(p.name for p in out.glob("*.bvh")) == sorted(Path(items[i]["outputs"]["bvh"]).name for i in (0, 4))
    assert any("row 3" in line and "'seconds' must be between" in line for line in lines)


def test_a_backend_dying_mid_batch_fails_the_rest_at_once(tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seconds,seed,steps\nquick,0.5,0,2\nlong,10,1,1000\nnever started,10,2,1000\n")
    out = tmp_path / "out"
    with serve_tiny() as (endpoint, server):
        tool = subprocess.Popen([sys.executable, str(TOOL), "--prompts", str(prompts), "--backend", endpoint,
                                 "--start-backend", "never", "--parallel", "1", "--timeout", "10", "--no-blend-out",
                                 "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (out / "summary.json").is_file() or summary(out)["items"][0]["status"] != "done":
            assert tool.poll() is None and time.monotonic() < deadline, tool.stdout.read()
            time.sleep(0.2)
        server.kill()
        killed = time.monotonic()
        output = tool.communicate(timeout=120)[0]
    print(output)
    assert tool.returncode == 1 and time.monotonic() - killed < 30
    items = summary(out)["items"]
    assert [i["status"] for i in items] == ["done", "failed", "failed"]
    assert items[1]["error"].startswith(("backend error (disconnected)", "backend error (timeout)"))
    assert items[2]["error"] == f"the backend at {endpoint} stopped answering"
    assert output.strip().splitlines()[-1].startswith("FAILED: 2 of 3 prompts failed")


def test_it_starts_its_own_backend_and_writes_fbx_glb_and_gif(tmp_path):
    out = tmp_path / "out"
    status, lines = run_tool("--prompt", "a person turns around", "--seconds", "1", "--backend",
                             f"tcp://127.0.0.1:{free_port()}", "--config", "tiny", "--export", "fbx", "--export",
                             "glb", "--preview", "--out", str(out))  # fmt: skip
    assert status == 0, lines
    data = summary(out)
    assert data["backend"]["started"] == "subprocess" and data["backend"]["model"]["source"] == "random:tiny"
    item = data["items"][0]
    bpy.ops.wm.open_mainfile(filepath=str(out / "motions.blend"))
    skeleton = bpy.data.objects["MotionSkeleton"]  # no --armature: the canonical armature
    assert sorted(b.name for b in skeleton.data.bones) == sorted(SMPL22_BUILTIN.names)
    assert bpy.context.scene.render.fps == 20 and skeleton.animation_data.action.frame_range[1] == 20

    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    assert bpy.ops.import_scene.fbx(filepath=item["outputs"]["fbx"]) == {"FINISHED"}
    armature = next(o for o in bpy.data.objects if o.type == "ARMATURE")
    assert len(armature.data.bones) == 22 and armature.animation_data.action.frame_range[1] >= 20

    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    assert bpy.ops.import_scene.gltf(filepath=item["outputs"]["glb"]) == {"FINISHED"}
    armature = next(o for o in bpy.data.objects if o.type == "ARMATURE")
    assert len(armature.data.bones) == 22 and len(bpy.data.actions) >= 1

    from PIL import Image

    with Image.open(item["outputs"]["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 20


# ---- arguments and prompt files (no backend) ----------------------------------------------------------------


def rows(tmp_path: Path, name: str, text: str, *extra: str) -> list[batch_generate.Row]:
    path = tmp_path / name
    path.write_text(text)
    return batch_generate.load_rows(batch_generate.parse_args(["--prompts", str(path), "--out", "x", *extra]))


def test_script_args_follow_the_double_dash_like_blender():
    blender = ["blender", "-b", "scene.blend", "--python", "tools/batch_generate.py", "--", "--prompt", "walk"]
    assert batch_generate.script_args(blender, blender=True) == ["--prompt", "walk"]
    assert batch_generate.script_args(blender[:5], blender=True) == []  # Blender's own options are not ours
    python = ["tools/batch_generate.py", "--prompt", "walk"]
    assert batch_generate.script_args(python, blender=False) == ["--prompt", "walk"]
    assert batch_generate.script_args(python) == ["--prompt", "walk"]  # the bpy module has no Blender program


def test_prompt_files_txt_csv_json(tmp_path):
    txt = rows(tmp_path, "p.txt", "# a comment\nwalk\n\n  jump  \n", "--seconds", "3", "--seed", "7")
    assert [(r.request.prompt, r.request.seconds, r.request.seed, r.error) for r in txt] == [
        ("walk", 3.0, 7, ""), ("jump", 3.0, 7, "")]
    csv_rows = rows(tmp_path, "p.csv", "prompt,seconds,seed,guidance,steps,name\nwalk,2,,3.5,20,my walk\n")
    assert csv_rows[0].request == GenerateRequest("walk", seconds=2.0, seed=0, guidance=3.5, steps=20)
    assert (csv_rows[0].name, csv_rows[0].stem) == ("my walk", "my_walk")
    unquoted = rows(tmp_path, "q.csv", "prompt,seconds\nwalk, then sit,2\n")[0].error
    assert unquoted == "the row has 1 more value(s) than the header has columns (quote a prompt that contains commas)"
    js = rows(tmp_path, "p.json", json.dumps(["run", {"prompt": "sit", "seconds": 1.5, "speed": 2}]))
    assert js[0].error == "" and js[0].stem.startswith("run-")
    assert js[1].error == "unknown field(s) speed; known: prompt, seconds, seed, guidance, steps, name, timeline"


def test_rows_may_be_timelines(tmp_path):
    (tmp_path / "shot.txt").write_text("0 2 a person walks\n2 3.5 a person waves\n")
    (tmp_path / "gap.txt").write_text("0 2 a person walks\n3 4 a person waves\n")
    csv_rows = rows(tmp_path, "t.csv", "timeline,name,seed\nshot.txt,shot one,3\ngap.txt,,\nmissing.txt,,\n")
    shot = csv_rows[0].request
    assert csv_rows[0].error == "" and shot.prompt == "" and shot.seed == 3 and shot.frames(20) == 70
    assert [r.prompt for r in shot.timeline] == ["a person walks", "a person waves"]
    assert csv_rows[1].error == "timeline row 2 (3-4 s): leaves 2-3 s with no prompt (a gap)"
    assert csv_rows[2].error.startswith("timeline file ") and csv_rows[2].error.endswith("does not exist")
    js = rows(tmp_path, "t.json", json.dumps([{"timeline": [[0, 2, "a person runs"], [2, 4, "a person sits"]]},
                                              {"timeline": [[0, 2, "walk"]], "prompt": "walk"},
                                              {"timeline": 5}]))
    assert js[0].error == "" and js[0].stem.startswith("a_person_runs_a_person_sits-")
    assert js[0].settings["timeline"] == [[0.0, 2.0, "a person runs"], [2.0, 4.0, "a person sits"]]
    assert js[1].error == "give a prompt or a timeline, not both"
    assert js[2].error.startswith("timeline must be a file name or a list")


def test_the_key_is_stable_and_follows_the_settings(tmp_path):
    records = [{"prompt": "walk", "seed": 1}, {"prompt": "walk ", "seed": 1, "name": "again"},
               {"prompt": "walk", "seed": 2, "name": "w"}, {"prompt": "run", "name": "w"}]  # fmt: skip
    a, b, c, d = rows(tmp_path, "k.json", json.dumps(records))
    assert a.key == b.key != c.key
    assert a.key == rows(tmp_path, "k.txt", "walk\n", "--seed", "1")[0].key  # the same in any file format
    assert b.error == "same prompt and settings as row 1"  # one Action per key: a copy would replace the first
    assert (c.error, d.error) == ("", "name 'w' is already used by row 3")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.yaml", "walk", "prompts files must be .txt, .csv or .json"),
    ("p.csv", "text,seconds\nwalk,2\n", "the first row must name the columns, one of them 'prompt'"),
    ("p.csv", "prompt,second\nwalk,2\n", "unknown column(s) second"),
    ("p.json", "{not json", "is not valid JSON"),
    ("p.json", '{"walk": 1}', "expected a list of prompts"),
])  # fmt: skip
def test_unusable_prompt_files_raise_a_clear_error(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rows(tmp_path, name, text)


def test_bad_arguments_exit_with_status_2(tmp_path, mixamo_blend, capsys):
    out = str(tmp_path / "out")
    assert batch_generate.main(["--out", out]) == 2
    assert "no prompts: give --prompt TEXT or --prompts FILE" in capsys.readouterr().err
    assert batch_generate.main(["--prompt", "walk", "--blend", str(mixamo_blend), "--armature", "Nope", "--out",
                                out]) == 2  # fmt: skip
    assert "no armature object 'Nope' in the scene; armatures: ['Rig']" in capsys.readouterr().err


def test_a_busy_server_makes_the_tool_wait_its_turn(tmp_path):
    out = tmp_path / "out"
    with serve_tiny("--max-queue", "2", "--max-client-queue", "1") as (endpoint, _), \
            MotionClient(endpoint, timeout=20) as other:
        running = other.submit("a person walks", seconds=2.0, steps=1000)
        waiting = other.submit("a person runs", seconds=2.0, steps=1000)  # the queue's second place: taken
        tool = subprocess.Popen([sys.executable, str(TOOL), "--prompt", "a person jumps", "--prompt", "a person sits",
                                 "--seconds", "1", "--steps", STEPS, "--backend", endpoint, "--start-backend", "never",
                                 "--no-blend-out", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(3.0)  # the tool meets a full queue ('busy') meanwhile
        other.cancel(running)
        other.cancel(waiting)
        output = tool.communicate(timeout=120)[0]
    assert tool.returncode == 0, output
    assert [i["status"] for i in summary(out)["items"]] == ["done", "done"]
