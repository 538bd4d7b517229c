"""The add-on against a real backend process (`python -m backend.serve --config tiny`) on loopback.

The timer/poll loop is driven by hand (bpy.app.timers do not fire without Blender's event loop).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("backend.serve")

import addon  # noqa: E402
from addon import operators, wire  # noqa: E402
from addon.keying import action_fcurves  # noqa: E402
from addon.session import Session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_backend() -> tuple[subprocess.Popen, str]:
    """A tiny-config backend on a free loopback port, once it answers hello."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "backend.serve", "--config", "tiny", "--bind", endpoint],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    with wire.MotionClient(endpoint) as client:
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


def pump(session: Session, until, seconds: float, each=None) -> list:
    """Hand the session its replies one at a time (what a timer tick does in a loop), checking ``until`` and
    calling ``each`` after every one: the tiny model can send a whole motion between two ticks, and this sees
    every state in between. Returns the replies not handled yet."""
    deadline = time.monotonic() + seconds
    while True:
        assert time.monotonic() < deadline, f"timed out; status: {session.describe()}"
        messages = session.client.poll(timeout=0.05)
        while messages:
            if until():
                return messages
            session.handle(messages.pop(0))
            if each is not None:
                each()
        if until():
            return []


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
         each=lambda: seen.update(len(k.frames) for k in (session.job.keyers if session.job else {}).values()))
    assert session.error == "", session.error
    actions = generated()
    assert sorted(a["motion_mamba"]["seed"] for a in actions) == [5, 6]
    expected = round(2.0 * session.server["fps"])
    print(f"generated {[a.name for a in actions]}; keyed frame counts seen while streaming: {sorted(seen)}")
    for action in actions:
        curves = action_fcurves(action)
        assert len(curves) == 22 * 4 + 3
        assert {len(fc.keyframe_points) for fc in curves} == {expected}
        assert action["motion_mamba"]["prompt"] == "a person walks"
        assert action["motion_mamba"]["steps"] == 3
        # keys at the scene's frame rate (24 fps by default) from the source's 20 fps: same duration in seconds
        fps_ratio = bpy.context.scene.render.fps / session.server["fps"]
        assert curves[0].keyframe_points[-1].co[0] == pytest.approx(1 + (expected - 1) * fps_ratio, abs=1e-3)
    assert rig.animation_data.action in actions and rig.animation_data.action_slot is not None
    assert min(seen) < expected, "keys should appear before the whole motion has arrived"
    assert [tuple(fc.keyframe_points[0].co) for fc in action_fcurves(user)] == user_keys
    assert user.name in bpy.data.actions and bpy.data.actions[user.name].use_fake_user  # kept alive

    name = rig.name
    bpy.ops.ed.undo()  # one step removes the whole generation (Python references are stale after undo)
    assert generated() == []
    rig = bpy.data.objects[name]
    assert rig.animation_data.action.name == "users own"


def test_cancel_leaves_no_half_action(scene):
    session, rig = scene
    assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
    with pytest.raises(RuntimeError, match="already running"):
        bpy.ops.motion_mamba.generate()
    late = pump(session, lambda: session.job is not None and session.job.keyers, 180)
    assert 0 < len(session.job.keyers[0].frames) < 40
    assert bpy.ops.motion_mamba.cancel() == {"FINISHED"}
    assert generated() == [] and rig.animation_data.action.name == "users own"
    assert session.error == "Cancelled"
    for message in late:  # the rest of the cancelled request's replies are ignored
        session.handle(message)
    for _ in range(100):
        addon._timer()
        time.sleep(0.01)
    assert generated() == [] and session.job is None


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
        pump(session, lambda: session.job is not None and session.job.total > 0, 120)  # working on it
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


def test_start_local_backend_from_the_addon():
    """What the 'Start local backend' button runs: backend.serve as a subprocess the session owns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    session = Session(f"tcp://127.0.0.1:{port}")
    try:
        session.start_backend(sys.executable, str(ROOT), "--config tiny")
        deadline = time.monotonic() + 180
        while not session.connected:
            assert time.monotonic() < deadline and session.backend_process.poll() is None, session.describe()
            session.tick()
            time.sleep(0.05)
        assert session.describe() == f"Backend: tiny on cpu (tcp://127.0.0.1:{port})"
        process = session.backend_process
    finally:
        session.stop_backend()
        session.close()
    assert process.poll() is not None
