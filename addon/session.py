"""The add-on's runtime: one backend connection, the running generation, and the timer that polls them.

Nothing here blocks: a request is sent without waiting and `Session.tick()` (run by bpy.app.timers, or by a
test directly) polls the client, which drives the request's handle (``addon.client.Generation``); each tick
keys at most one streamed chunk into the new Actions, so keys appear as they arrive.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np

from . import client, wire
from .canonical import SMPL22_BUILTIN, CanonicalSkeleton
from .keying import ActionKeyer, generation_settings, remove_partial_actions, replace_live_preview
from .retarget import BoneMap, Retargeter, TargetRig, map_bones, natural_name

HELLO_INTERVAL = 3.0  # seconds between hellos while idle (how the status line notices a backend come and go)
HELLO_TIMEOUT = 7.0  # no hello reply for this long: the backend is reported unreachable


@dataclass(frozen=True)
class Settings:
    """What one Generate asks for: the request sent to the backend, and how its motion is put on the rig."""

    request: wire.GenerateRequest
    preset: str = "AUTO"
    root_motion: bool = True
    keep_timing: bool = False  # key the source frames (fractional scene frames) instead of whole frames
    nla_strip: bool = False  # place the result as an NLA strip at the current frame, not as the active action
    foot_lock: bool = True  # feet planted in the motion stay planted
    motion: np.ndarray | None = field(default=None, compare=False)  # an edit's motion (pack_motion's layout)
    live: bool = False  # a Live preview: its result replaces the previous preview (``addon.live``)


@dataclass
class Job:
    """One running generation: its request's handle and the Actions it is filling (one per sample)."""

    generation: client.Generation
    settings: Settings
    target: str  # object name
    bone_map: BoneMap
    pending: deque[wire.Message] = field(default_factory=deque)  # frames received, not keyed yet
    retargeters: dict[int, Retargeter] = field(default_factory=dict)
    sources: dict[int, list[np.ndarray]] = field(default_factory=dict)  # the frames as sent, per sample
    keyers: dict[int, ActionKeyer] = field(default_factory=dict)


def coverage_notice(prompt: str, coverage: dict) -> str:
    """The warning for a prompt the model has seen nothing like (``accepted``'s ``coverage``), else ""."""
    if coverage.get("known", True):
        return ""
    closest = "; ".join(f"'{caption}'" for caption, _ in coverage.get("nearest", []))
    return f"This model has not seen anything like '{prompt}'. Closest it knows: {closest}"


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
                curve = client.CurveKeys.from_dir(keys_dir)
            except (OSError, ValueError) as exc:
                self.error = f"Could not load the remote backend keys from {keys_dir}: {exc}"
        self.client = client.MotionClient(endpoint, timeout=timeout, curve=curve)
        self.server: dict | None = None
        self.skeleton: CanonicalSkeleton | None = None
        self.job: Job | None = None
        self.result = ""  # the last success
        self.notice = ""  # the last prompt's warning: the model has seen nothing like it
        self.backend_process: subprocess.Popen | None = None
        self.backend_log: Path | None = None  # where the local backend logs (set when it starts)
        self.backend_output = ""  # the end of its output, read once it has exited
        self._hello_sent = 0.0
        self._hello_heard = 0.0
        self._send_hello()

    # -- connection ---------------------------------------------------------------------------------------
    def _send_hello(self) -> None:
        self._hello_sent = time.monotonic()
        try:  # a zero timeout only sends: the reply is picked up by tick(), unless it is already here
            reply = self.client.hello(timeout=0.0)
        except (TimeoutError, client.ServerError, ConnectionError):
            return
        self._hello(wire.Message(reply))

    def _hello(self, message: wire.Message) -> None:
        """Take the server's announcement (the client has already taken its limits)."""
        try:
            self.skeleton = CanonicalSkeleton.from_json(message["skeleton"])
        except (ValueError, TypeError) as exc:
            self.error = f"The backend at {self.endpoint} announced an unusable skeleton: {exc}"
            return
        self.server = message.header
        self._hello_heard = time.monotonic()

    @property
    def actions(self) -> list[str]:
        """The actions the backend's model was trained on (empty when it does not say)."""
        actions = (self.server or {}).get("actions")
        return [str(a) for a in actions] if isinstance(actions, list) else []

    @property
    def fast_steps(self) -> int:
        """The most steps the backend's distilled fast sampler covers (0: it has none)."""
        model = (self.server or {}).get("model")
        steps = model.get("fast_steps", 0) if isinstance(model, dict) else 0
        return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0

    @property
    def connected(self) -> bool:
        return self.server is not None and time.monotonic() - self._hello_heard < self.hello_timeout

    def describe(self) -> str:
        """The status: the backend, its model and device, or why there is none (with the last lines a local
        backend wrote when it exited)."""
        if self.connected:
            model = self.server.get("model", {})
            name = (model.get("name") or model.get("model") or "model") if isinstance(model, dict) else str(model)
            return f"Backend: {name} on {self.server['device']} ({self.endpoint})"
        process = self.backend_process
        if process is not None and process.poll() is not None:
            if not self.backend_output:
                self.backend_output = client.backend_output(self.backend_log, lines=3) or "(no output)"
            return f"The local backend exited (code {process.returncode}): {self.backend_output}"
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
        try:
            settings.request.check(self.client.limits)
        except wire.WireError as exc:
            raise ValueError(f"Cannot generate: {exc}") from None
        if self.job is not None:
            raise ValueError("A generation is already running: wait for it or press Cancel.")
        if target is None or getattr(target, "type", None) != "ARMATURE":
            raise ValueError("No target armature: select one, or press 'Create canonical armature'.")
        if not self.connected:
            raise ValueError(self.describe())
        bone_map = map_bones([b.name for b in target.data.bones], settings.preset)
        bone_map.require(target.name, [b.name for b in target.data.bones])  # UnmappableArmatureError
        pending: deque[wire.Message] = deque()  # filled by client.poll() (tick), keyed one chunk a tick
        generation = self.client.start(settings.request, motion=settings.motion,
                                       on_frames=lambda _gen, message: pending.append(message))
        bpy.ops.ed.undo_push(message="Before motion generation")  # so one undo removes what follows
        self.job = Job(generation, settings, target.name, bone_map, pending)
        self.error = self.result = self.notice = ""
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
            self.job.generation.cancel()
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

    def _frames(self, job: Job, message: wire.Message) -> None:
        """Key one streamed chunk of frames."""
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
            options, request = job.settings, job.settings.request
            settings = generation_settings(request, sample, job.bone_map.preset, options.root_motion, fps,
                                           device=str(self.server.get("device", "")),
                                           keep_timing=options.keep_timing, foot_lock=options.foot_lock,
                                           frame_start=bpy.context.scene.frame_start)  # fmt: skip
            place = "NONE" if sample else "NLA" if options.nla_strip else "ACTIVE"
            keyer = job.keyers[sample] = ActionKeyer.for_generation(
                obj, bpy.context.scene, settings, fps, place=place, keep_timing=options.keep_timing
            )
        elif message["start"] != keyer.received:
            raise ValueError(f"sample {sample}: frames arrived out of order (got {message['start']}, "
                             f"expected {keyer.received})")  # fmt: skip
        keyer.append(job.retargeters[sample](root, rotations))
        job.sources.setdefault(sample, []).append(np.asarray(message.data, dtype=np.float32))

    def _done(self, job: Job) -> None:
        """Finish the Actions of a request whose whole motion has arrived and been keyed."""
        samples = len(job.generation.motion.rotations)
        if samples != job.settings.request.samples:
            raise ValueError(f"asked for {job.settings.request.samples} samples, the backend sent {samples}")
        for sample, keyer in job.keyers.items():
            keyer.finish(np.concatenate(job.sources[sample]))
        if job.settings.live:
            replace_live_preview([k.action_name for k in job.keyers.values()])
        self.job = None
        scene = bpy.context.scene
        last = int(np.ceil(max(k.end_frame() for k in job.keyers.values())))
        scene.frame_end = max(scene.frame_end, last)  # the whole motion on the timeline
        names = ", ".join(k.action_name for k in job.keyers.values())
        keyed = max(k.keyed for k in job.keyers.values())
        self.result = f"Created {names} ({keyed} frames at {scene.render.fps / scene.render.fps_base:g} fps)"
        bpy.ops.ed.undo_push(message=f"Generate motion: {natural_name(job.settings.request.title)}")

    def _advance(self, job: Job) -> None:
        """One step of the running job, from its handle's state: fail on an error, else key one pending chunk,
        else finish once the motion is whole."""
        generation = job.generation
        if generation.coverage is not None and not self.notice:
            self.notice = coverage_notice(job.settings.request.title, generation.coverage)
        try:
            if generation.error is not None:
                self._fail(f"Backend error ({generation.error.code}): {generation.error.message}")
                if generation.error.code in ("timeout", "disconnected"):
                    self.server = None
            elif job.pending:
                self._frames(job, job.pending.popleft())
            elif generation.motion is not None:
                self._done(job)
        except (ValueError, TypeError, KeyError) as exc:  # KeyingStopped is a ValueError
            self.cancel()
            self.error = f"Generation failed, nothing was kept: {exc}"

    def tick(self) -> float:
        """Poll the backend and advance the running job by one step (keying at most one chunk of frames: the
        panel and viewport redraw between two ticks, so keys appear as they stream); returns the seconds until
        the next tick."""
        for message in self.client.poll():  # drives the job's handle
            if message.type == "hello":
                self._hello(message)
            elif message.type != "error":  # the server is alive (client-side failures are errors)
                self._hello_heard = time.monotonic()
        if self.job is not None:
            self._advance(self.job)
        if self.job is None and time.monotonic() - self._hello_sent > HELLO_INTERVAL:
            if not self.connected:
                self.client.connect()  # a fresh socket: unanswered hellos must not pile up in its queue
            self._send_hello()
        return 0.5 if self.job is None else 0.01 if self.job.pending else 0.05

    # -- local backend ------------------------------------------------------------------------------------
    def start_backend(self, python: str, project: str, arguments: str = "", log_file: str | Path = "") -> None:
        """Run `python -m backend.serve --bind <endpoint> [arguments]` in `project` (``addon.client.start_backend``),
        logging to `log_file` (default: backend.log in the user's cache folder, capped, a link there not followed)."""
        if self.backend_process is not None and self.backend_process.poll() is None:
            raise ValueError("The local backend is already running.")
        log = Path(log_file) if log_file else client.default_log()
        self.backend_process = client.start_backend(self.endpoint, python, project, tuple(shlex.split(arguments)),
                                                    log)  # fmt: skip
        self.backend_log, self.backend_output = log, ""
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
