"""The add-on in real Blender (the bpy module): registration, panel drawing, bad input, a garbage backend.

Tests that need the real generation backend are in test_addon_backend.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKEND_PYTHON

bpy = pytest.importorskip("bpy")
zmq = pytest.importorskip("zmq")

import addon  # noqa: E402
from addon import operators, wire  # noqa: E402
from addon.canonical import SMPL22_BUILTIN  # noqa: E402
from addon.client import Generation, default_log  # noqa: E402
from addon.properties import generate_request  # noqa: E402
from addon.retarget import map_bones  # noqa: E402
from addon.session import Job, Session, Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def generated_actions() -> list[str]:
    return [a.name for a in bpy.data.actions if "motion_mamba" in a]


@pytest.fixture
def fresh():
    """An empty scene with the add-on registered (unregistered afterwards)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon.register()
    yield bpy.context
    addon.unregister()


@pytest.mark.parametrize("code", [
    "import sys, addon.wire; assert 'bpy' not in sys.modules",  # the backend imports the wire module
    "import sys, bpy, addon; addon.register(); import addon.session, addon.retarget, addon.armature; "
    "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'backend')], 'heavy imports'",
])  # fmt: skip
def test_addon_imports_stay_light(code):
    out = subprocess.run([sys.executable, "-c", code + "; print('ok')"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_register_unregister_twice():
    for _ in range(2):
        addon.register()
        assert hasattr(bpy.types.Scene, "motion_mamba")
        assert bpy.ops.motion_mamba.generate.get_rna_type().identifier == "MOTION_MAMBA_OT_generate"
        panel = bpy.types.MOTION_PT_panel
        assert (panel.bl_space_type, panel.bl_region_type, panel.bl_category) == ("VIEW_3D", "UI", "Motion")
        addon.unregister()
        assert not hasattr(bpy.types.Scene, "motion_mamba")
        assert not hasattr(bpy.types, "MOTION_PT_panel")
        assert operators.current_session() is None


DRAW_SCRIPT = """
import json, os, subprocess, sys, tempfile, traceback
from pathlib import Path
sys.path.insert(0, {root!r})
import bpy
import numpy as np
import addon
from addon import operators
from addon import ui
from addon.armature import build_armature, canonical_bones, create_canonical_armature
from addon.canonical import SMPL22_BUILTIN
from addon.keying import ActionKeyer
from addon.retarget import RetargetResult, map_bones
from addon.client import Generation
from addon.session import Job, Session, Settings
from addon.wire import GenerateRequest
from addon.ui import MOTION_PT_panel, MOTION_UL_history

bpy.ops.wm.read_factory_settings(use_empty=False)
addon.register()

class FakeList:  # filter_items only reads this flag
    bitflag_filter_item = 1 << 30

def draw(menu, context):
    states = []
    try:
        MOTION_PT_panel.draw(menu, context)  # no session, no armature
        states.append("empty")
        rig = create_canonical_armature(context.scene.collection, SMPL22_BUILTIN)
        context.view_layer.objects.active = rig
        action = bpy.data.actions.new("walk (seed 1)")
        action["motion_mamba"] = {{"prompt": "walk", "seed": 1}}
        operators._session = Session("tcp://127.0.0.1:9", hello_timeout=0.0)
        operators._session.error = "Backend error (bad_request): prompt is empty"
        MOTION_PT_panel.draw(menu, context)  # dead backend, an error, a history entry
        MOTION_UL_history.draw_item(None, context, menu.layout, bpy.data, action, 0, None, "", 0)
        flags, _ = MOTION_UL_history.filter_items(FakeList(), context, bpy.data, "actions")
        items = [a.name for a, f in zip(bpy.data.actions, flags) if f]
        states.append("error")
        log = Path(tempfile.mkdtemp()) / "backend.log"  # a local backend that exited with an error
        log.with_suffix(".err").write_text("Traceback (most recent call last):\\nRuntimeError: no checkpoint at x\\n")
        operators._session.backend_log = log
        operators._session.backend_process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        operators._session.backend_process.wait()
        MOTION_PT_panel.draw(menu, context)  # its exit code and last output in the status box
        exited = operators._session.describe()
        operators._session.backend_process = None
        states.append("exited")
        operators._session.server = {{"actions": ["walks forward", "waves the right hand"]}}
        operators._session.notice = "This model has not seen anything like 'a person jumps'. Closest it knows: 'x'"
        for shown in (False, True):  # the actions box folded, then open
            context.scene.motion_mamba.show_actions = shown
            MOTION_PT_panel.draw(menu, context)
        actions = operators._session.actions
        operators._session.server, operators._session.notice = None, ""
        states.append("unknown prompt")
        walk = GenerateRequest("walk")
        generation = Generation("id", walk, operators._session.client, step=3, total=10)
        operators._session.job = Job(generation, Settings(walk), rig.name, map_bones(SMPL22_BUILTIN.names))
        MOTION_PT_panel.draw(menu, context)  # a running generation: progress bar + cancel
        states.append("running")
        keyer = ActionKeyer(rig, "walk (seed 2)")
        keyer.append(RetargetResult(("pelvis",), np.tile([1.0, 0, 0, 0], (3, 1, 1)), "pelvis", np.zeros((3, 3))))
        operators._session.job.keyers[0] = keyer
        MOTION_PT_panel.draw(menu, context)  # keys streaming in: "Keyed N frames..."
        states.append("keying")
        operators._session.job = None
        odd = bpy.data.objects.new("Odd", bpy.data.armatures.new("Odd"))  # no bones: nothing maps
        context.scene.collection.objects.link(odd)
        context.scene.motion_mamba.target = odd
        MOTION_PT_panel.draw(menu, context)
        states.append("unmappable")
        heads, tails = canonical_bones(SMPL22_BUILTIN)  # a rig without its left toe bone
        keep = [i for i, n in enumerate(SMPL22_BUILTIN.names) if n != "left_foot"]
        index = {{old: new for new, old in enumerate(keep)}}
        partial = build_armature(context.scene.collection, "Partial", [SMPL22_BUILTIN.names[i] for i in keep],
                                 [index.get(SMPL22_BUILTIN.parents[i], -1) for i in keep], heads[keep], tails[keep])
        context.scene.motion_mamba.target = partial
        MOTION_PT_panel.draw(menu, context)
        states.append("warned")
        warnings = [w for ws in ui._warnings_cache.values() for w in ws]
        result = {{"states": states, "items": items, "exited": exited, "warnings": warnings, "actions": actions}}
    except Exception:
        result = {{"states": states, "error": traceback.format_exc()}}
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # popups cannot be shown headless: leave before Blender tries

window = bpy.context.window
area = next(a for a in window.screen.areas if a.type == "VIEW_3D")
region = next(r for r in area.regions if r.type == "UI")
with bpy.context.temp_override(window=window, area=area, region=region):
    bpy.context.window_manager.popup_menu(draw, title="Motion")
"""


def test_panel_draws_in_every_state(tmp_path):
    """Panel.draw with a real UILayout: a popup menu's draw callback gets one even headless (then we exit)."""
    script = tmp_path / "draw.py"
    script.write_text(textwrap.dedent(DRAW_SCRIPT.format(root=str(ROOT))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(line[len("RESULT ") :])
    assert "error" not in result, result.get("error")
    assert result["states"] == ["empty", "error", "exited", "unknown prompt", "running", "keying", "unmappable",
                                "warned"]
    assert result["actions"] == ["walks forward", "waves the right hand"]
    assert result["exited"].splitlines() == ["The local backend exited (code 3): Traceback (most recent call last):",
                                             "RuntimeError: no checkpoint at x"]
    assert any(w.startswith("21/22 joints mapped: no bone for left_foot") for w in result["warnings"])
    assert "walk (seed 1)" in result["items"]  # the history list drew the generated action


def use_session(monkeypatch, session: Session) -> Session:
    """Make `session` the add-on's connection (the preferences' address must match, or it is replaced)."""
    monkeypatch.setenv("MOTION_MAMBA_ENDPOINT", session.endpoint)
    operators._session = session
    return session


def test_bad_input_changes_nothing(fresh, monkeypatch):
    """Empty prompt, no armature, unmappable bones, no backend: a clear report and an untouched scene."""
    context = fresh
    settings = context.scene.motion_mamba
    session = use_session(monkeypatch, Session("tcp://127.0.0.1:9", hello_timeout=0.2))  # nothing listens
    time.sleep(0.3)

    def generate() -> str:
        with pytest.raises(RuntimeError) as err:
            bpy.ops.motion_mamba.generate()
        assert generated_actions() == [] and session.job is None
        assert session.error and session.error in str(err.value)
        return session.error

    settings.prompt = "   "
    assert "prompt is empty" in generate()
    settings.prompt = "a person walks forward"
    assert "No target armature" in generate()

    arm = bpy.data.armatures.new("Odd")
    rig = bpy.data.objects.new("Odd", arm)
    context.scene.collection.objects.link(rig)
    context.view_layer.objects.active = rig
    bpy.ops.object.mode_set(mode="EDIT")
    for name in ("Bone", "Bone.001", "Hips"):
        bone = arm.edit_bones.new(name)
        bone.tail = (0, 0, 1)
    bpy.ops.object.mode_set(mode="OBJECT")
    session.server = {"device": "cpu", "fps": 20.0, "model": {"model": "x"}}  # pretend connected
    session._hello_heard = time.monotonic() + 60
    message = generate()
    assert "'Odd'" in message and "left_knee" in message and "Bone.001" in message

    bpy.ops.motion_mamba.create_armature()
    session.client.limits = wire.Limits(max_seconds=10.0)  # as a backend announces them in hello
    settings.seconds = 30.0
    assert "seconds" in generate()
    settings.seconds = 4.0
    session.server = None
    assert "No backend at tcp://127.0.0.1:9" in generate()
    assert session.describe().startswith("No backend at")


class GarbageServer:
    """A real ROUTER socket that answers hello correctly and generate with the given broken replies."""

    def __init__(self, replies, skeleton=None, limits=wire.DEFAULT_LIMITS):
        self.replies, self.limits = replies, limits
        self.skeleton = skeleton or {"joint_names": list(SMPL22_BUILTIN.names),
                                     "parents": list(SMPL22_BUILTIN.parents),
                                     "rest_offsets": SMPL22_BUILTIN.offsets.tolist()}  # fmt: skip
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            peer, *frames = self.socket.recv_multipart()
            header = json.loads(frames[0])
            if header["type"] == "hello":
                reply = wire.encode({"type": "hello", "id": header["id"], "model": {"model": "garbage"},
                                     "device": "cpu", "fps": 20.0, "skeleton": self.skeleton,
                                     "limits": self.limits.to_json()})  # fmt: skip
                self.socket.send_multipart([peer, *reply])
            elif header["type"] == "generate":
                for reply in self.replies(header["id"]):
                    self.socket.send_multipart([peer, *reply])

    def close(self):
        self.stop.set()
        self.thread.join()
        self.socket.close()


def frames(rid: str, data: np.ndarray, start: int = 0) -> list[bytes]:
    data = np.asarray(data, dtype=np.float32)
    return wire.encode({"type": "frames", "id": rid, "sample": 0, "start": start, "count": len(data),
                        "shape": list(data.shape), "dtype": "<f4"}, data)  # fmt: skip


def good_chunk(n: int = 10) -> np.ndarray:
    return wire.pack_motion(np.zeros((n, 3)), np.tile([1.0, 0, 0, 0], (n, 22, 1)))


GARBAGE = {
    "NaN rotations": (lambda rid: [frames(rid, good_chunk() * np.nan)], "NaN"),
    "wrong joint count": (lambda rid: [frames(rid, np.zeros((10, 3 + 4 * 5)))], "rotations must be"),
    "not a motion array": (lambda rid: [frames(rid, np.zeros((10, 9)))], "does not match"),
    "frames out of order": (lambda rid: [frames(rid, good_chunk()), frames(rid, good_chunk(), start=30)],
                            "out of order"),
    "short motion": (lambda rid: [frames(rid, good_chunk()),
                                  wire.encode({"type": "done", "id": rid, "frames": 80, "timings": {}})],
                     "announced 80"),
    "unparseable header": (lambda rid: [[b"{not json", b""]], "no reply"),
    "unknown field": (lambda rid: [wire.encode({"type": "progress", "id": rid, "step": 1, "total": 2,
                                                "junk": 1})], "unreadable reply"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_from_the_backend_leaves_no_action(fresh, monkeypatch, case):
    replies, expected = GARBAGE[case]
    server = GarbageServer(replies)
    try:
        context = fresh
        bpy.ops.motion_mamba.create_armature()
        rig = context.scene.motion_mamba.target
        user_action = bpy.data.actions.new("users own")
        rig.animation_data_create().action = user_action
        modes = [pb.rotation_mode for pb in rig.pose.bones]
        session = use_session(monkeypatch, Session(server.endpoint, timeout=1.0))
        deadline = time.monotonic() + 10
        while not session.connected and time.monotonic() < deadline:
            addon._timer()
            time.sleep(0.02)
        assert session.connected, session.describe()
        context.scene.motion_mamba.prompt = "a person waves"
        assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
        while session.job is not None and time.monotonic() < deadline:
            addon._timer()
            time.sleep(0.02)
        assert session.job is None, "the job never ended"
        assert expected in session.error, session.error
        assert generated_actions() == []
        assert rig.animation_data.action == user_action and not user_action.use_fake_user
        assert [pb.rotation_mode for pb in rig.pose.bones] == modes
    finally:
        server.close()


def test_limits_announced_in_hello_set_the_panel_ranges(fresh, monkeypatch):
    limits = wire.Limits(min_seconds=1.0, max_seconds=10.0, max_steps=20, max_samples=2)
    server = GarbageServer(None, limits=limits)
    try:
        session = use_session(monkeypatch, Session(server.endpoint))
        deadline = time.monotonic() + 10
        while not session.connected and time.monotonic() < deadline:
            addon._timer()
            time.sleep(0.02)
        addon._timer()
        props = fresh.scene.motion_mamba
        rna = props.bl_rna.properties
        ranges = (rna["seconds"].hard_min, rna["seconds"].hard_max, rna["steps"].hard_max, rna["samples"].hard_max)
        assert ranges == (1.0, 10.0, 20, 2)
        props.seconds, props.steps, props.samples = 30.0, 500, 5
        assert (props.seconds, props.steps, props.samples) == (10.0, 20, 2)  # clamped to what the backend takes
    finally:
        server.close()


def test_local_backend_that_fails_to_start_is_reported(tmp_path):
    session = Session("tcp://127.0.0.1:9", hello_timeout=0.2)
    session.start_backend(BACKEND_PYTHON, str(ROOT), "--no-such-option", log_file=tmp_path / "backend.log")
    session.backend_process.wait(timeout=120)
    status = session.describe()
    print(status)
    assert status.startswith("The local backend exited (code 2): ")
    assert status.splitlines()[-1].endswith("unrecognized arguments: --no-such-option")  # the end of its output
    session.close()


def test_local_backend_logs_in_the_cache_folder_and_follows_no_planted_link(fresh, tmp_path, monkeypatch):
    """'Start local backend' logs to backend.log in the user's cache folder (0700), not to a fixed name in the
    shared temporary folder; a symbolic link planted where its output goes is refused, not followed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(operators, "preferences", lambda _context: type("Prefs", (), {
        "endpoint": "tcp://127.0.0.1:9", "keys_dir": "", "python": BACKEND_PYTHON, "project": str(ROOT),
        "arguments": "--no-such-option"}))  # fmt: skip
    folder = tmp_path / "cache" / "motion_mamba"
    folder.mkdir(parents=True)
    folder.chmod(0o755)  # made by someone else, readable by all: tightened
    assert bpy.ops.motion_mamba.start_backend() == {"FINISHED"}
    session = operators.current_session()
    session.backend_process.wait(timeout=120)
    assert session.backend_log == folder / "backend.log" == default_log()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert "unrecognized arguments: --no-such-option" in session.describe()

    victim = tmp_path / "victim"
    (folder / "backend.err").unlink()
    (folder / "backend.err").symlink_to(victim)
    with pytest.raises(RuntimeError, match="Could not start the backend"):
        bpy.ops.motion_mamba.start_backend()
    assert not victim.exists() and session.backend_process.returncode == 2  # nothing written, nothing started
    (folder / "backend.err").unlink()
    (folder / "backend.log").unlink(missing_ok=True)
    (folder / "backend.log").symlink_to(victim)  # the log itself
    with pytest.raises(RuntimeError, match="Could not start the backend"):
        bpy.ops.motion_mamba.start_backend()
    assert not victim.exists()


def test_panel_settings_start_from_the_requests_defaults(fresh):
    """The panel restates no default: its settings start as a request with only a prompt, and the backend's
    limits bound them."""
    props = fresh.scene.motion_mamba
    props.prompt = "a person waves"
    assert generate_request(props) == wire.GenerateRequest("a person waves")
    rna = props.bl_rna.properties
    assert {name: rna[name].default for name in wire.GenerateRequest.defaults()} == wire.GenerateRequest.defaults()
    limits = wire.DEFAULT_LIMITS
    assert (rna["seed"].hard_max, rna["guidance"].hard_max) == (limits.max_seed, limits.max_guidance)


def test_history_apply_and_delete(fresh):
    context = fresh
    bpy.ops.motion_mamba.create_armature()
    rig = context.scene.motion_mamba.target
    for seed in (1, 2):
        bpy.data.actions.new(f"walk (seed {seed})")["motion_mamba"] = {"prompt": "walk", "seed": seed}
    props = context.scene.motion_mamba
    props.history_index = bpy.data.actions.find("walk (seed 2)")
    assert bpy.ops.motion_mamba.apply_action() == {"FINISHED"}
    assert rig.animation_data.action.name == "walk (seed 2)"
    props.history_index = bpy.data.actions.find("walk (seed 1)")
    assert bpy.ops.motion_mamba.delete_action() == {"FINISHED"}
    assert generated_actions() == ["walk (seed 2)"]
    props.history_index = -1
    assert not bpy.ops.motion_mamba.apply_action.poll()


def test_backend_announcing_a_broken_skeleton_is_not_used():
    server = GarbageServer(None, skeleton={"joint_names": ["a"], "parents": [-1, 0], "rest_offsets": [[0, 0, 0]]})
    session = Session(server.endpoint, hello_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while not session.error and time.monotonic() < deadline:
            session.tick()
            time.sleep(0.02)
        assert "unusable skeleton" in session.error and "one parent and one (x, y, z) offset" in session.error
        assert not session.connected
    finally:
        session.close()
        server.close()


def test_a_long_absent_backend_never_blocks_the_ui():
    """Hellos to a dead address must not pile up until a send blocks (ZeroMQ's queue holds 1000)."""
    session = Session("tcp://127.0.0.1:9", timeout=5.0, hello_timeout=0.0)
    try:
        start = time.monotonic()
        for _ in range(1200):  # an hour of idle ticks without a backend
            session._hello_sent = 0.0  # as if HELLO_INTERVAL had passed
            session.tick()
        elapsed = time.monotonic() - start
        assert elapsed < 60, f"1200 idle ticks took {elapsed:.0f} s: sends are blocking"
        assert session.describe().startswith("No backend at")
    finally:
        session.close()


@pytest.mark.parametrize("foot_lock, root_motion", [(True, True), (False, True), (True, False)])
def test_panel_options_reach_the_retargeter(fresh, foot_lock, root_motion):
    bpy.ops.motion_mamba.create_armature()
    rig = bpy.context.scene.motion_mamba.target
    session = Session("tcp://127.0.0.1:9", hello_timeout=0.0)
    try:
        settings = Settings(wire.GenerateRequest("walk"), foot_lock=foot_lock, root_motion=root_motion)
        generation = Generation("id", settings.request, session.client)
        job = Job(generation, settings, rig.name, map_bones([b.name for b in rig.data.bones]))
        retargeter = session._retargeter(job, rig)
        assert (retargeter.foot_lock, retargeter.root_motion) == (foot_lock and root_motion, root_motion)
    finally:
        session.close()
