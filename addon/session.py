"""The add-on's runtime: one backend connection, the running generation, and the timer that polls them.

Nothing here blocks: requests are sent without waiting and `Session.tick()` (run by bpy.app.timers, or by a
test directly) handles whatever replies have arrived, keying frames into new Actions as they stream in.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np

from . import wire
from .canonical import SMPL22_BUILTIN, CanonicalSkeleton
from .keying import ActionKeyer, remove_partial_actions
from .retarget import BoneMap, Retargeter, TargetRig, map_bones, natural_name

HELLO_INTERVAL = 3.0  # seconds between hellos while idle (how the status line notices a backend come and go)
HELLO_TIMEOUT = 7.0  # no hello reply for this long: the backend is reported unreachable


@dataclass
class Settings:
    """What one Generate asks for."""

    prompt: str
    seconds: float = 4.0
    seed: int = 0
    guidance: float = 2.5
    steps: int = 50
    samples: int = 1
    preset: str = "AUTO"
    root_motion: bool = True
    keep_timing: bool = False  # key the source frames (fractional scene frames) instead of whole frames
    nla_strip: bool = False  # place the result as an NLA strip at the current frame, not as the active action
    foot_lock: bool = True  # feet planted in the motion stay planted

    def check(self) -> None:
        """Raise ValueError with a message for the UI when a field cannot be sent."""
        if not self.prompt.strip():
            raise ValueError("Type a prompt first (describe the motion, e.g. 'a person walks forward').")


@dataclass
class Job:
    """One generate request and the Actions it is filling (one per sample)."""

    request_id: str
    settings: Settings
    target: str  # object name
    bone_map: BoneMap
    retargeters: dict[int, Retargeter] = field(default_factory=dict)
    keyers: dict[int, ActionKeyer] = field(default_factory=dict)
    step: int = 0
    total: int = 0
    frames: int = 0

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0


class Session:
    """The connection to one backend endpoint and at most one running generation."""

    def __init__(
        self, endpoint: str = wire.DEFAULT_ENDPOINT, keys_dir: str = "", timeout: float = 10.0,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:  # fmt: skip
        self.endpoint, self.keys_dir, self.hello_timeout = endpoint, keys_dir, hello_timeout
        self.error = ""  # the last failure, shown in red until the next Generate
        curve = None
        if keys_dir:
            try:
                curve = wire.CurveKeys.from_dir(keys_dir)
            except (OSError, ValueError) as exc:
                self.error = f"Could not load the remote backend keys from {keys_dir}: {exc}"
        self.client = wire.MotionClient(endpoint, timeout=timeout, curve=curve)
        self.server: dict | None = None
        self.skeleton: CanonicalSkeleton | None = None
        self.job: Job | None = None
        self.result = ""  # the last success
        self.backend_process: subprocess.Popen | None = None
        self.backend_log = Path(tempfile.gettempdir()) / "motion_mamba_backend.log"
        self._hello_sent = 0.0
        self._hello_heard = 0.0
        self._backlog: deque[wire.Message] = deque()  # replies polled but not handled yet (see tick)
        self._send_hello()

    # -- connection ---------------------------------------------------------------------------------------
    def _send_hello(self) -> None:
        self._hello_sent = time.monotonic()
        try:  # a zero timeout only sends: the reply is picked up by tick(), unless it is already here
            reply = self.client.hello(timeout=0.0)
        except (TimeoutError, wire.ServerError, ConnectionError):
            return
        self.handle(wire.Message(reply))

    @property
    def connected(self) -> bool:
        return self.server is not None and time.monotonic() - self._hello_heard < self.hello_timeout

    def describe(self) -> str:
        """One status line: the backend, its model and device, or why there is none."""
        if self.connected:
            model = self.server.get("model", {})
            name = (model.get("name") or model.get("model") or "model") if isinstance(model, dict) else str(model)
            return f"Backend: {name} on {self.server['device']} ({self.endpoint})"
        process = self.backend_process
        if process is not None and process.poll() is not None:
            return f"The local backend exited (code {process.returncode}); its output: {self.backend_log}"
        if time.monotonic() - self._hello_sent < self.hello_timeout and self._hello_heard == 0.0:
            return f"Connecting to {self.endpoint}..."
        return f"No backend at {self.endpoint}: start it (Start local backend) or check the address"

    def close(self) -> None:
        """Forget the running job (discarding its partial actions) and close the socket."""
        if self.job is not None:
            self._fail("Cancelled: the add-on was disabled")
        self.client.close()

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, settings: Settings, target) -> Job:
        """Validate and send a generate request for armature object `target`; raise ValueError for the UI."""
        settings.check()
        if self.job is not None:
            raise ValueError("A generation is already running: wait for it or press Cancel.")
        if target is None or getattr(target, "type", None) != "ARMATURE":
            raise ValueError("No target armature: select one, or press 'Create canonical armature'.")
        if not self.connected:
            raise ValueError(self.describe())
        bone_map = map_bones([b.name for b in target.data.bones], settings.preset)
        bone_map.require(target.name, [b.name for b in target.data.bones])  # UnmappableArmatureError
        request_id = self.client.submit(settings.prompt, settings.seconds, settings.seed, settings.guidance,
                                        settings.steps, settings.samples)  # fmt: skip
        bpy.ops.ed.undo_push(message="Before motion generation")  # so one undo removes what follows
        self.job = Job(request_id, settings, target.name, bone_map)
        self.error = self.result = ""
        return self.job

    def cancel(self) -> None:
        """Stop the running generation now: its partial actions are removed, the server is told to stop."""
        if self.job is None:
            return
        self._tell_server_cancel()
        self._fail("Cancelled")

    def abandon(self, message: str) -> None:
        """Stop the running generation without touching Blender data (an undo or a file load is about to replace
        it, taking the partial actions with it); the server is told to stop."""
        if self.job is None:
            return
        self._tell_server_cancel()
        self.job = None
        self.error = message

    def _tell_server_cancel(self) -> None:
        try:
            self.client.cancel(self.job.request_id)
        except (ConnectionError, ValueError):
            pass  # the backend is gone: nothing to stop there

    def keyed_actions(self) -> set[str]:
        """Names of the actions the running generation is keying."""
        return {k.action_name for k in self.job.keyers.values()} if self.job is not None else set()

    def _fail(self, message: str) -> None:
        job, self.job = self.job, None
        for keyer in job.keyers.values():
            keyer.discard()
        remove_partial_actions()  # one renamed while keying, which discard() could not find by name
        self.error = message

    def _retargeter(self, job: Job, obj) -> Retargeter:
        """The retargeter for one sample of `job` onto armature `obj` (all its options are passed here)."""
        return Retargeter(self.skeleton or SMPL22_BUILTIN, TargetRig.from_armature(obj), job.bone_map,
                          job.settings.root_motion, foot_lock=job.settings.foot_lock)

    def _frames(self, message: wire.Message) -> None:
        job = self.job
        obj = bpy.data.objects.get(job.target)
        if obj is None or obj.type != "ARMATURE":
            raise ValueError(f"the target armature '{job.target}' is gone")
        sample = message["sample"]
        root, rotations = wire.unpack_motion(message.data)
        keyer = job.keyers.get(sample)
        if keyer is None:
            if message["start"] != 0:
                raise ValueError(f"sample {sample} started at frame {message['start']}, not 0")
            job.retargeters[sample] = self._retargeter(job, obj)
            fps = float(self.server.get("fps", 20.0))
            options = job.settings
            settings = {
                "prompt": options.prompt, "seed": options.seed + sample, "seconds": options.seconds,
                "guidance": options.guidance, "steps": options.steps, "sample": sample,
                "preset": job.bone_map.preset, "root_motion": options.root_motion, "fps": fps,
                "device": str(self.server.get("device", "")), "keep_timing": options.keep_timing,
                "foot_lock": options.foot_lock,
            }  # fmt: skip
            place = "NONE" if sample else "NLA" if options.nla_strip else "ACTIVE"
            keyer = job.keyers[sample] = ActionKeyer.for_generation(
                obj, bpy.context.scene, settings, fps, place=place, keep_timing=options.keep_timing
            )
        elif message["start"] != keyer.received:
            raise ValueError(f"sample {sample}: frames arrived out of order (got {message['start']}, "
                             f"expected {keyer.received})")  # fmt: skip
        keyer.append(job.retargeters[sample](root, rotations))

    def _done(self, message: wire.Message) -> None:
        job = self.job
        got = [job.keyers[s].received if s in job.keyers else 0 for s in range(job.settings.samples)]
        if got != [message["frames"]] * job.settings.samples:
            raise ValueError(f"the backend announced {message['frames']} frames per sample but sent {got}")
        for keyer in job.keyers.values():
            keyer.finish()
        self.job = None
        scene = bpy.context.scene
        last = int(np.ceil(max(k.end_frame() for k in job.keyers.values())))
        scene.frame_end = max(scene.frame_end, last)  # the whole motion on the timeline
        names = ", ".join(k.action_name for k in job.keyers.values())
        keyed = max(k.keyed for k in job.keyers.values())
        self.result = f"Created {names} ({keyed} frames at {scene.render.fps / scene.render.fps_base:g} fps)"
        bpy.ops.ed.undo_push(message=f"Generate motion: {natural_name(job.settings.prompt)}")

    def handle(self, message: wire.Message) -> None:
        """Apply one reply to the connection state or the running job."""
        if message.type == "hello":
            try:
                limits = wire.Limits.from_json(message["limits"])
                self.skeleton = CanonicalSkeleton.from_json(message["skeleton"])
            except (ValueError, TypeError) as exc:
                self.error = f"The backend at {self.endpoint} announced an unusable skeleton or limits: {exc}"
                return
            self.server = self.client.server = message.header
            self.client.limits = limits
            self._hello_heard = time.monotonic()
            return
        if message.type != "error":
            self._hello_heard = time.monotonic()  # the server is alive (client-side failures are errors)
        job = self.job
        if job is None or message.id != job.request_id:
            return  # a reply to a cancelled or old request
        try:
            if message.type == "progress":
                job.step, job.total = message["step"], message["total"]
            elif message.type == "frames":
                self._frames(message)
            elif message.type == "done":
                self._done(message)
            elif message.type == "error":
                self._fail(f"Backend error ({message['code']}): {message['message']}")
                if message["code"] in ("timeout", "disconnected"):
                    self.server = None
        except (ValueError, TypeError, KeyError) as exc:  # KeyingStopped is a ValueError
            self.cancel()
            self.error = f"Generation failed, nothing was kept: {exc}"

    def tick(self) -> float:
        """Handle arrived messages, keying at most one chunk of frames (the panel and viewport redraw between
        two ticks, so keys appear as they stream); returns the seconds until the next tick."""
        self._backlog.extend(self.client.poll())
        while self._backlog:
            message = self._backlog.popleft()
            self.handle(message)
            if message.type == "frames":
                break
        if self.job is None and time.monotonic() - self._hello_sent > HELLO_INTERVAL:
            if not self.connected:
                self.client.connect()  # a fresh socket: unanswered hellos must not pile up in its queue
            self._send_hello()
        return 0.01 if self._backlog else 0.05 if self.job is not None else 0.5

    # -- local backend ------------------------------------------------------------------------------------
    def start_backend(self, python: str, project: str, arguments: str = "") -> None:
        """Run `python -m backend.serve --bind <endpoint> [arguments]` in `project`, output to `backend_log`."""
        if self.backend_process is not None and self.backend_process.poll() is None:
            raise ValueError("The local backend is already running.")
        command = [python or sys.executable, "-m", "backend.serve", "--bind", self.endpoint, *shlex.split(arguments)]
        with open(self.backend_log, "wb") as log:
            self.backend_process = subprocess.Popen(command, cwd=project or None, stdout=log, stderr=subprocess.STDOUT)
        self._hello_heard = 0.0
        self._send_hello()

    def stop_backend(self) -> None:
        """Terminate the backend this session started, if any."""
        process, self.backend_process = self.backend_process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
