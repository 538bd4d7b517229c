"""The add-on against a real backend process (`python -m backend.serve --config tiny`) on loopback.

The timer/poll loop is driven by hand (bpy.app.timers do not fire without Blender's event loop).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKEND_PYTHON

bpy = pytest.importorskip("bpy")
# The backend needs torch, which a Blender-only venv (e.g. the newest bpy on Python 3.13) lacks: it can run
# under another interpreter.
if BACKEND_PYTHON == sys.executable:
    pytest.importorskip("torch", reason="the backend needs torch: set MOTION_MAMBA_BACKEND_PYTHON to a Python with it")

import addon  # noqa: E402
from addon import live, operators  # noqa: E402
from addon.client import MotionClient  # noqa: E402
from addon.keying import LIVE_PROPERTY, action_fcurves, source_motion  # noqa: E402
from addon.session import Session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_backend(*model: str) -> tuple[subprocess.Popen, str]:
    """A backend (default: the tiny config's random weights) on a free loopback port, once it answers hello."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    command = [BACKEND_PYTHON, "-m", "backend.serve", *(model or ("--config", "tiny")), "--bind", endpoint]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    with MotionClient(endpoint) as client:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"backend exited: {process.stderr.read().decode()[-2000:]}")
            try:
                client.hello(timeout=1.0)
                return process, endpoint
            except TimeoutError:
                pass
    process.kill()
    pytest.fail("backend did not answer hello within 180 s")


def stop_backend(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def backend():
    process, endpoint = start_backend()
    yield endpoint
    stop_backend(process)


@pytest.fixture
def scene(backend, monkeypatch):
    """Empty scene, add-on registered, connected to the backend, a canonical armature wearing a user action."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    monkeypatch.setenv("MOTION_MAMBA_ENDPOINT", backend)
    addon.register()
    session = operators.session(bpy.context)
    run_until(lambda: session.connected, 30)
    bpy.ops.motion_mamba.create_armature()  # from the skeleton the server announced
    rig = bpy.context.scene.motion_mamba.target
    user = bpy.data.actions.new("users own")
    rig.animation_data_create().action = user
    rig.keyframe_insert("location", frame=1)
    bpy.ops.ed.undo_push(message="user work")
    props = bpy.context.scene.motion_mamba
    props.prompt, props.seconds, props.steps, props.randomise_seed, props.seed = "a person walks", 2.0, 3, False, 5
    yield session, rig
    addon.unregister()


def run_until(condition, seconds: float, each=None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out; status: {operators.current_session().describe()}"
        addon._timer()
        if each is not None:
            each()
        time.sleep(0.01)


def pump(session: Session, until, seconds: float, each=None) -> None:
    """Tick the session (a tick keys at most one chunk) until ``until()``, calling ``each`` after every tick: the
    tiny model can send a whole motion between two timer ticks, and this sees every keying state in between."""
    deadline = time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, f"timed out; status: {session.describe()}"
        session.tick()
        if each is not None:
            each()
        time.sleep(0.002)


def generated() -> list:
    return [a for a in bpy.data.actions if "motion_mamba" in a]


def test_generate_keys_new_actions_streaming_and_one_undo(scene):
    session, rig = scene
    user = rig.animation_data.action
    user_keys = [tuple(fc.keyframe_points[0].co) for fc in action_fcurves(user)]
    bpy.context.scene.motion_mamba.samples = 2
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    seen = set()
    pump(session, lambda: session.job is None, 180,
         each=lambda: seen.update(k.received for k in (session.job.keyers if session.job else {}).values()))
    assert session.error == "", session.error
    actions = generated()
    assert sorted(a["motion_mamba"]["seed"] for a in actions) == [5, 6]
    expected = round(2.0 * session.server["fps"])
    print(f"generated {[a.name for a in actions]}; keyed frame counts seen while streaming: {sorted(seen)}")
    # keys on whole frames at the scene's rate (24 fps by default) over the source's duration (20 fps)
    fps_ratio = bpy.context.scene.render.fps / session.server["fps"]
    whole_frames = 1 + np.arange(int((expected - 1) * fps_ratio) + 1)
    for action in actions:
        curves = action_fcurves(action)
        assert len(curves) == 22 * 4 + 3
        for fc in curves:
            assert np.array_equal([k.co[0] for k in fc.keyframe_points], whole_frames), fc.data_path
        assert action["motion_mamba"]["prompt"] == "a person walks"
        assert action["motion_mamba"]["steps"] == 3
    anim = rig.animation_data
    assert anim.action in actions
    assert not hasattr(anim, "action_slot") or anim.action_slot is not None  # slotted actions (4.4+)
    assert min(seen) < expected, "keys should appear before the whole motion has arrived"
    assert session.result.endswith(f"({len(whole_frames)} frames at 24 fps)"), session.result
    assert [tuple(fc.keyframe_points[0].co) for fc in action_fcurves(user)] == user_keys
    assert not user.use_fake_user and user.users == 1  # kept alive by the generated action, not a fake user

    name = rig.name
    bpy.ops.ed.undo()  # one step removes the whole generation (Python references are stale after undo)
    assert generated() == []
    rig = bpy.data.objects[name]
    assert rig.animation_data.action.name == "users own" and not rig.animation_data.action.use_fake_user


def test_a_timeline_of_rows_keys_one_action_as_long_as_the_rows(scene):
    """The panel's timeline: rows added, edited and reordered with the operator (each one undo step), then one
    Generate makes one action whose length is the rows' total, carrying the timeline as text."""
    session, _rig = scene
    props = bpy.context.scene.motion_mamba
    props.use_timeline = True
    for prompt, seconds in (("a person walks", 1.0), ("a person runs", 1.5), ("a person waves", 1.0)):
        assert bpy.ops.motion_mamba.timeline_edit(action="ADD") == {"FINISHED"}
        row = props.timeline[props.timeline_index]
        row.prompt, row.seconds = prompt, seconds
    assert [r.prompt for r in props.timeline] == ["a person walks", "a person runs", "a person waves"]
    props.timeline_index = 2
    assert bpy.ops.motion_mamba.timeline_edit(action="UP") == {"FINISHED"} and props.timeline_index == 1
    assert bpy.ops.motion_mamba.timeline_edit(action="DOWN") == {"FINISHED"} and props.timeline_index == 2
    props.timeline_index = 0
    assert bpy.ops.motion_mamba.timeline_edit(action="UP") == {"CANCELLED"}  # already first
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    assert session.error == "", session.error
    (action,) = generated()
    info = action["motion_mamba"]
    assert info["timeline"] == "0 1 a person walks\n1 2.5 a person runs\n2.5 3.5 a person waves\n"
    assert info["prompt"] == "a person walks / a person runs / a person waves"
    assert action.name.startswith("a person walks / a person runs")
    last = max(k.co[0] for fc in action_fcurves(action) for k in fc.keyframe_points)
    fps_ratio = bpy.context.scene.render.fps / session.server["fps"]
    assert last == 1 + int((round(3.5 * session.server["fps"]) - 1) * fps_ratio)  # 3.5 s at the scene's rate

    props.timeline[1].prompt = "  "  # a bad row: refused before anything is sent, the row named
    with pytest.raises(RuntimeError, match=r"timeline row 2 \(1-2.5 s\): the prompt is empty"):
        bpy.ops.motion_mamba.generate()
    assert "timeline row 2" in session.error and session.job is None and len(generated()) == 1
    assert bpy.ops.motion_mamba.timeline_edit(action="REMOVE") == {"FINISHED"} and len(props.timeline) == 2


def _values(action, frames) -> np.ndarray:
    """Every F-curve of ``action`` evaluated at ``frames`` (curves in data-path order)."""
    curves = sorted(action_fcurves(action), key=lambda fc: (fc.data_path, fc.array_index))
    return np.array([[fc.evaluate(f) for f in frames] for fc in curves])


def test_continue_and_regenerate_range_make_new_actions_and_keep_the_rest(scene):
    """Continue a generated action from its end, then regenerate a preview range of it: each makes a new action
    (the original untouched), keeps the original's keys outside what it generates, and is one undo step."""
    session, rig = scene
    props = bpy.context.scene.motion_mamba
    assert not bpy.ops.motion_mamba.continue_action.poll()  # the user's own action: nothing stored to continue
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    (original,) = generated()
    source = source_motion(original, 22)
    assert source.shape == (40, 91)  # the 2 s the backend sent, kept on the action
    before = _values(original, range(1, 40))
    props.prompt, props.seconds = "a person runs", 1.0
    assert bpy.ops.motion_mamba.continue_action() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    assert session.error == "", session.error
    longer = rig.animation_data.action
    assert longer != original and source_motion(longer, 22).shape == (60, 91)
    assert np.array_equal(source_motion(longer, 22)[:40], source)  # the motion it continued, exactly
    np.testing.assert_allclose(_values(longer, range(1, 40)), before, atol=1e-4)  # and so its keys
    assert list(longer["motion_mamba"]["edit"]) == [40, 60]
    assert np.array_equal(_values(original, range(1, 40)), before)  # the original is untouched

    scene_ = bpy.context.scene
    scene_.use_preview_range, scene_.frame_preview_start, scene_.frame_preview_end = True, 13, 30
    assert bpy.ops.motion_mamba.regenerate_range() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    assert session.error == "", session.error
    edited = rig.animation_data.action
    info = edited["motion_mamba"]
    assert list(info["edit"]) == [10, 25]  # scene frames 13-30 at 24 fps are source frames 10-24 at 20 fps
    motion = source_motion(edited, 22)
    assert np.array_equal(motion[:10], source_motion(longer, 22)[:10])
    assert np.array_equal(motion[25:], source_motion(longer, 22)[25:])
    assert not np.allclose(motion[12:23], source_motion(longer, 22)[12:23])
    np.testing.assert_allclose(_values(edited, range(1, 11)), _values(longer, range(1, 11)), atol=1e-4)
    assert len(generated()) == 3
    bpy.ops.ed.undo()
    assert len(generated()) == 2


def test_live_regenerates_in_place_debounced_and_keeps_the_last(scene, monkeypatch):
    """Live on: prompt and seed changes regenerate (several quick changes: one generation), each result replaces
    the previous preview action; a change while a preview is still generating replaces that generation; the
    user's action is never touched; Live off keeps the last preview as a normal generated action."""
    session, rig = scene
    user = rig.animation_data.action
    props = bpy.context.scene.motion_mamba
    monkeypatch.setattr(live, "DELAY_S", 0.05)
    started = []
    original = session.generate
    monkeypatch.setattr(session, "generate", lambda settings, target: started.append(settings) or
                        original(settings, target))  # fmt: skip

    def previews() -> list:
        return [a for a in bpy.data.actions if LIVE_PROPERTY in a]

    def settled(prompt: str, seed: int):
        return lambda: (session.job is None and len(previews()) == 1 and
                        previews()[0]["motion_mamba"]["prompt"] == prompt and
                        previews()[0]["motion_mamba"]["seed"] == seed)  # fmt: skip

    props.live = True
    for text in ("a person", "a person waves", "a person waves twice"):  # typing: one regeneration at the end
        props.prompt = text
    run_until(settled("a person waves twice", 5), 120)
    assert [s.request.prompt for s in started] == ["a person waves twice"] and started[0].live
    assert started[0].request.steps == live.live_steps(3, session.fast_steps) and started[0].request.samples == 1
    assert (live.live_steps(10, 4), live.live_steps(10, 1), live.live_steps(7, 0)) == (live.LIVE_STEPS, 1, 7)
    first = previews()[0].name
    assert rig.animation_data.action.name == first
    props.seed = 9
    run_until(settled("a person waves twice", 9), 120)
    assert first not in bpy.data.actions and len(generated()) == 1  # replaced in place, not piled up
    props.prompt = "a person runs"  # and while that one generates, another change replaces it
    run_until(lambda: session.job is not None, 60)
    props.prompt = "a person jumps"
    run_until(settled("a person jumps", 9), 120)
    assert [s.request.prompt for s in started][-2:] == ["a person runs", "a person jumps"]
    assert len(generated()) == 1 and user.name in bpy.data.actions and len(action_fcurves(user)) == 3
    last = previews()[0].name
    props.live = False
    assert previews() == [] and [a.name for a in generated()] == [last]  # kept, as a normal generated action
    props.seed = 11  # Live off: changes regenerate nothing
    time.sleep(0.2)
    addon._timer()
    assert session.job is None and len(started) == 4
    props.live = True  # Live off while a preview generates: that one stops, the last finished one stays
    props.prompt = "a person bows"
    run_until(lambda: session.job is not None, 60)
    props.live = False
    assert session.job is None and session.error == "" and previews() == []
    assert [a.name for a in generated()] == [last] and len(started) == 5


def test_cancel_leaves_no_half_action(scene):
    session, rig = scene
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    with pytest.raises(RuntimeError, match="already running"):
        bpy.ops.motion_mamba.generate()
    pump(session, lambda: session.job is not None and session.job.keyers, 180)
    assert 0 < session.job.keyers[0].received < 40
    assert bpy.ops.motion_mamba.cancel() == {"FINISHED"}
    assert generated() == [] and rig.animation_data.action.name == "users own"
    assert not rig.animation_data.action.use_fake_user
    assert session.error == "Cancelled"
    for _ in range(100):  # the rest of the cancelled request's replies are ignored
        addon._timer()
        time.sleep(0.01)
    assert generated() == [] and session.job is None


def test_action_renamed_while_keying_stops_the_generation_cleanly(scene):
    session, rig = scene
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is not None and session.job.keyers, 180)
    bpy.data.actions[session.job.keyers[0].action_name].name = "renamed by the user"
    pump(session, lambda: session.job is None, 180)
    assert session.error.startswith("Generation failed, nothing was kept: the action being keyed"), session.error
    assert generated() == [] and rig.animation_data.action.name == "users own"


def test_file_saved_mid_generation_opens_without_the_partial_action(scene, tmp_path):
    """Opening a file stops the running generation; a partial action saved in a file is removed when it opens,
    and the object gets back the action it replaced."""
    session, rig = scene
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is not None and session.job.keyers, 180)
    path = str(tmp_path / "mid-generation.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path, copy=True)
    bpy.ops.wm.open_mainfile(filepath=path)
    assert session.job is None and session.error.startswith("Stopped by undo, redo or a file load")
    assert generated() == []
    rig = bpy.data.objects["MotionSkeleton"]
    assert rig.animation_data.action.name == "users own" and not rig.animation_data.action.use_fake_user


def test_users_euler_action_still_drives_its_bones(scene):
    """Keys go into each bone's own rotation mode: the rig is not switched to quaternions, so the user's own
    Euler-keyed action still moves the bone when assigned again."""
    session, rig = scene
    user = rig.animation_data.action
    elbow = rig.pose.bones["left_elbow"]
    elbow.rotation_mode = "XYZ"
    elbow.rotation_euler = (1.2, 0.0, 0.0)
    rig.keyframe_insert('pose.bones["left_elbow"].rotation_euler', frame=1)
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    assert session.error == "", session.error
    (action,) = generated()
    paths = {fc.data_path for fc in action_fcurves(action)}
    assert 'pose.bones["left_elbow"].rotation_euler' in paths
    assert 'pose.bones["left_elbow"].rotation_quaternion' not in paths
    assert rig.pose.bones["left_elbow"].rotation_mode == "XYZ"
    assert not user.use_fake_user
    rig.animation_data.action = user  # as the Action editor's browse menu does
    bpy.context.scene.frame_set(1)
    elbow = rig.pose.bones["left_elbow"]
    assert elbow.rotation_euler.x == pytest.approx(1.2)
    assert elbow.matrix_basis.to_euler("XYZ").x == pytest.approx(1.2, abs=1e-5)


def test_streamed_keys_appear_tick_by_tick(scene, monkeypatch):
    """Each timer tick keys at most one streamed chunk (the panel and viewport redraw in between), so keys are
    on the armature while the motion is still arriving, even when chunks arrive faster than ticks."""
    session, _rig = scene
    bpy.context.scene.motion_mamba.seconds = 6.0
    handled: list[str] = []
    key = session._frames
    monkeypatch.setattr(session, "_frames", lambda job, m: (handled.append(m.type), key(job, m))[1])
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    per_tick, keyed_while_running = [], []
    deadline = time.monotonic() + 180
    while session.job is not None:
        assert time.monotonic() < deadline, session.describe()
        time.sleep(0.2)  # slow ticks: several chunks wait in the socket
        before = handled.count("frames")
        addon._timer()
        per_tick.append(handled.count("frames") - before)
        if session.job is not None and session.job.keyers:
            keyer = session.job.keyers[0]
            curve = action_fcurves(bpy.data.actions[keyer.action_name])[0]
            keyed_while_running.append((keyer.keyed, len(curve.keyframe_points)))
    assert session.error == "", session.error
    print(f"frames messages per tick: {per_tick}; (keyed, keys on the curve) while streaming: "
          f"{keyed_while_running}")  # fmt: skip
    assert handled.count("frames") >= 3 and max(per_tick) == 1
    assert len(keyed_while_running) >= 2 and all(k == n > 0 for k, n in keyed_while_running)
    final = len(action_fcurves(generated()[0])[0].keyframe_points)
    assert keyed_while_running[0][0] < keyed_while_running[-1][0] <= final  # keys grew while streaming


def test_nla_strip_option(scene):
    session, rig = scene
    user = rig.animation_data.action
    props = bpy.context.scene.motion_mamba
    props.nla_strip = True
    bpy.context.scene.frame_current = 30
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    pump(session, lambda: session.job is None, 180)
    assert session.error == "", session.error
    (action,) = generated()
    anim = rig.animation_data
    assert anim.action == user and not user.use_fake_user  # the active action is untouched
    (track,) = anim.nla_tracks
    (strip,) = track.strips
    assert strip.action == action and strip.frame_start == 30
    assert strip.frame_end == pytest.approx(30 + action.frame_range[1] - action.frame_range[0])
    name = rig.name
    bpy.ops.ed.undo()
    assert generated() == [] and len(bpy.data.objects[name].animation_data.nla_tracks) == 0


def test_limits_from_hello_set_the_panel_ranges(scene):
    session, _rig = scene
    addon._timer()
    limits = session.client.limits
    props = bpy.context.scene.motion_mamba
    assert props.bl_rna.properties["seconds"].hard_max == limits.max_seconds == 120.0  # tiny config's maximum
    props.seconds = 100.0  # the panel used to cap it at 60 s
    assert props.seconds == 100.0
    assert props.bl_rna.properties["steps"].hard_max == limits.max_steps
    assert props.bl_rna.properties["samples"].hard_max == limits.max_samples


def test_undo_at_every_phase_is_safe(backend):
    """Ctrl+Z while queued, denoising, keying (also with an undo step of the user's in between, redone) and after
    the generation, three times each, in a Blender subprocess (a crash fails the test): a running generation is
    cancelled on the server and leaves nothing; a finished one goes in one step; the user's rig and action stay
    as they were."""
    rounds = 3
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "addon_undo_session.py"), backend, str(rounds)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert out.returncode == 0 and line is not None, f"code {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    results = json.loads(line[len("RESULT ") :])
    phases = ["queued", "denoising", "keying", "keying+redo", "done"]
    assert [r["phase"] for r in results] == phases * rounds
    user_scene = {"generated": [], "active": "users own", "nla_tracks": 0, "elbow_mode": "XYZ", "elbow_x": 1.2,
                  "user_fake": False}  # fmt: skip
    for r in results:
        print({k: v for k, v in r.items() if not k.startswith("after_")})
        assert {k: r[k] for k in user_scene} == user_scene, r
        assert not r["job"], r
        if r["phase"] == "done":
            assert len(r["after_generate"]["generated"]) == 1, r
            assert r["after_generate"]["active"] == r["after_generate"]["generated"][0], r
            assert r["after_undo"] == user_scene, r
            assert r["after_redo"] == r["after_generate"], r
            continue
        assert r["error"] == "Stopped by undo, redo or a file load: the generation was cancelled, nothing was kept", r
        if r["phase"] == "queued":
            assert r["server"] == "error cancelled: cancelled before it started", r
        elif r["phase"] == "denoising":
            assert r["server"].startswith("error cancelled: cancelled after denoising step"), r
            assert r["keyed_before"] == 0, r
        else:
            assert r["keyed_before"] > 0, r


def test_dead_backend_gives_a_clear_status(monkeypatch):
    process, endpoint = start_backend()
    try:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        monkeypatch.setenv("MOTION_MAMBA_ENDPOINT", endpoint)
        addon.register()
        session = operators._session = Session(endpoint, timeout=3.0, hello_timeout=3.0)
        run_until(lambda: session.connected, 30)
        bpy.ops.motion_mamba.create_armature()
        props = bpy.context.scene.motion_mamba
        props.prompt, props.seconds, props.steps = "a person jumps", 2.0, 50
        assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
        pump(session, lambda: session.job is not None and session.job.generation.total > 0, 120)  # working on it
        process.kill()
        start = time.monotonic()
        run_until(lambda: session.job is None, 30)
        print(f"dead backend noticed after {time.monotonic() - start:.1f} s: {session.error}")
        assert "Backend error (disconnected)" in session.error or "Backend error (timeout)" in session.error
        assert generated() == []
        run_until(lambda: session.describe().startswith("No backend at"), 10)
        with pytest.raises(RuntimeError, match="No backend at"):
            bpy.ops.motion_mamba.generate()
    finally:
        stop_backend(process)
        addon.unregister()


def test_start_local_backend_from_the_addon(tmp_path, monkeypatch):
    """What the 'Start local backend' button runs: backend.serve as a subprocess the session owns, logging in the
    user's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = Session(f"tcp://127.0.0.1:{port}")
    try:
        session.start_backend(BACKEND_PYTHON, str(ROOT), "--config tiny")
        deadline = time.monotonic() + 180
        while not session.connected:
            assert time.monotonic() < deadline and session.backend_process.poll() is None, session.describe()
            session.tick()
            time.sleep(0.05)
        assert session.describe() == f"Backend: tiny on cpu (tcp://127.0.0.1:{port})"
        assert session.backend_log == tmp_path / "motion_mamba" / "backend.log"
        assert f"serving tiny on tcp://127.0.0.1:{port}" in session.backend_log.read_text()
        process = session.backend_process
    finally:
        session.stop_backend()
        session.close()
    assert process.poll() is not None


def test_the_panel_says_when_the_model_has_seen_nothing_like_the_prompt(monkeypatch):
    """The shipped model (it carries a caption index): hello's actions reach the session, an unknown prompt
    leaves a notice naming the closest training captions (and is still generated), a known one none."""
    process, endpoint = start_backend("--checkpoint", str(ROOT / "backend" / "weights" / "default"))
    try:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        monkeypatch.setenv("MOTION_MAMBA_ENDPOINT", endpoint)
        addon.register()
        session = operators.session(bpy.context)
        run_until(lambda: session.connected, 30)
        assert "walks forward" in session.actions and "waves the right hand" in session.actions
        # the shipped fast sampler, announced in hello: up to 4 steps (the distilled one, then the teacher refines);
        # Live takes one
        assert session.fast_steps == 4 and live.live_steps(10, session.fast_steps) == 1
        bpy.ops.motion_mamba.create_armature()
        props = bpy.context.scene.motion_mamba
        props.seconds, props.steps = 1.0, 2
        notices = {}
        for prompt in ("a person sits down on a chair", "a person walks forward"):
            props.prompt = prompt
            assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
            pump(session, lambda: session.job is None, 120)
            assert not session.error and session.result.startswith("Created"), (session.error, session.result)
            notices[prompt] = session.notice
        print(notices)
        unknown = notices["a person sits down on a chair"]
        assert unknown.startswith("This model has not seen anything like 'a person sits down on a chair'")
        assert unknown.count("'") >= 8  # the prompt and three closest captions, quoted
        assert notices["a person walks forward"] == ""
    finally:
        addon.unregister()
        stop_backend(process)
