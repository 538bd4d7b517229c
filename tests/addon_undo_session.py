"""Undo pressed at every phase of a generation, in real Blender against a real backend.

    python tests/addon_undo_session.py tcp://127.0.0.1:PORT [ROUNDS]

Run in a subprocess by tests/test_addon_backend.py, so that a crash (Blender segfaulting on freed data) fails the
test. Prints one line `RESULT <json>`: for every round and phase, what the scene and the server showed after the
undo. Phases: queued (the server busy with another client's request), denoising, keying, keying with an undo step
of the user's own in between (then redone), done.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bpy

import addon
from addon import operators
from addon.client import MotionClient

RIG, USER, ELBOW = "MotionSkeleton", "users own", "left_elbow"


def tick_until(condition, seconds: float = 120.0) -> None:
    """Run the add-on's timer (what Blender's event loop does) until `condition()`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(operators.current_session().describe())
        addon._timer()
        time.sleep(0.005)


def server_outcome(client: MotionClient, request_id: str, seconds: float = 60.0) -> str:
    """How the server ended `request_id` ('done' or 'error <code>: <message>'), read from the socket directly
    (the session ignores replies to a request it no longer runs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for message in client.poll(timeout=0.1):
            if message.id == request_id and message.type == "done":
                return "done"
            if message.id == request_id and message.type == "error":
                return f"error {message['code']}: {message['message']}"
    return "no reply"


def scene_state() -> dict:
    """The generated actions, the rig's active action and rotation modes, the user's action's state."""
    rig = bpy.data.objects[RIG]
    bpy.context.scene.frame_set(1)
    anim = rig.animation_data
    user = bpy.data.actions[USER]
    active = anim.action
    anim.action = user  # evaluate the user's own Euler key (as re-assigning it in the Action editor)
    bpy.context.scene.frame_set(1)
    elbow = rig.pose.bones[ELBOW].rotation_euler.x
    anim.action = active
    return {
        "generated": sorted(a.name for a in bpy.data.actions if "motion_mamba" in a),
        "active": active.name if active is not None else None,
        "nla_tracks": len(anim.nla_tracks),
        "elbow_mode": rig.pose.bones[ELBOW].rotation_mode,
        "elbow_x": round(elbow, 6),
        "user_fake": user.use_fake_user,
    }


def main() -> None:
    endpoint = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    os.environ["MOTION_MAMBA_ENDPOINT"] = endpoint
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon.register()
    session = operators.session(bpy.context)
    tick_until(lambda: session.connected, 60)
    bpy.ops.motion_mamba.create_armature()
    rig = bpy.context.scene.motion_mamba.target
    rig.animation_data_create().action = bpy.data.actions.new(USER)
    elbow = rig.pose.bones[ELBOW]
    elbow.rotation_mode = "XYZ"
    elbow.rotation_euler = (1.2, 0.0, 0.0)
    rig.keyframe_insert(f'pose.bones["{ELBOW}"].rotation_euler', frame=1)
    props = bpy.context.scene.motion_mamba
    props.prompt, props.randomise_seed, props.seed, props.seconds = "a person walks", False, 3, 6.0
    bpy.ops.ed.undo_push(message="user work")
    blocker = MotionClient(endpoint)
    results = []

    def generate(steps: int) -> str:
        bpy.context.scene.motion_mamba.steps = steps  # looked up again: an undo frees the scene's data
        assert bpy.ops.motion_mamba.generate() == {"FINISHED"}
        return session.job.generation.id

    def record(rnd: int, phase: str, **extra) -> None:
        for _ in range(20):  # late replies to the undone request must not bring anything back
            addon._timer()
            time.sleep(0.01)
        results.append({"round": rnd, "phase": phase, "job": session.job is not None, "error": session.error,
                        **scene_state(), **extra})  # fmt: skip

    for rnd in range(rounds):
        # queued: another client's long request occupies the server
        busy = blocker.submit("a person runs in a circle", seconds=10.0, steps=1000)
        deadline = time.monotonic() + 60
        while not any(m.type == "progress" for m in blocker.poll(timeout=0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError("the server never started the other client's request")
        rid = generate(50)
        bpy.ops.ed.undo()
        outcome = server_outcome(session.client, rid, 10)
        blocker.cancel(busy)
        server_outcome(blocker, busy)
        record(rnd, "queued", server=outcome)

        # denoising: progress has arrived, no frames yet
        rid = generate(1000)
        tick_until(lambda: session.job.generation.step > 0)
        keyed_before = sum(k.keyed for k in session.job.keyers.values())
        bpy.ops.ed.undo()
        record(rnd, "denoising", server=server_outcome(session.client, rid), keyed_before=keyed_before)

        # keying: frames are being keyed, chunk by chunk, tick by tick
        generate(3)
        tick_until(lambda: session.job is None or any(k.keyed for k in session.job.keyers.values()))
        keyed_before = max(k.keyed for k in session.job.keyers.values()) if session.job else -1
        bpy.ops.ed.undo()
        record(rnd, "keying", keyed_before=keyed_before)

        # keying, with an undo step the user made meanwhile (it holds a partial action), undone then redone
        generate(3)
        tick_until(lambda: session.job is None or any(k.keyed for k in session.job.keyers.values()))
        keyed_before = max(k.keyed for k in session.job.keyers.values()) if session.job else -1
        bpy.ops.ed.undo_push(message="the user's own edit")
        bpy.ops.ed.undo()
        bpy.ops.ed.redo()
        record(rnd, "keying+redo", keyed_before=keyed_before)
        bpy.ops.ed.undo()  # back before the generation, for the next phase

        # done: one undo removes the whole generation, redo brings it back whole
        generate(3)
        tick_until(lambda: session.job is None)
        after_generate = scene_state()
        bpy.ops.ed.undo()
        after_undo = scene_state()
        bpy.ops.ed.redo()
        after_redo = scene_state()
        bpy.ops.ed.undo()
        record(rnd, "done", after_generate=after_generate, after_undo=after_undo, after_redo=after_redo)
    blocker.close()
    print("RESULT " + json.dumps(results), flush=True)
    addon.unregister()


if __name__ == "__main__":
    main()
