"""Headless batch generation: prompts in; keyed Actions (.blend), BVH/FBX/glTF files and GIF previews out.

    blender -b [scene.blend] --python tools/batch_generate.py -- --prompts prompts.csv --out out [options]
    python tools/batch_generate.py --prompts prompts.csv --out out [options]       (Python with the bpy module)

Prompts: ``--prompt TEXT`` (repeatable) and/or ``--prompts FILE``: .txt (one prompt a line; blank lines and
``#`` comments skipped), .csv (a header row naming ``prompt`` and any of seconds, seed, guidance, steps, name)
or .json (a list of prompts or of objects with those keys). Missing values take the ``--seconds``, ``--seed``,
``--guidance`` and ``--steps`` defaults.

Backend: the server at ``--backend`` (``python -m backend.serve``) when one answers there; else the tool starts
one itself (``--start-backend subprocess`` (default) or ``inprocess``) with ``--checkpoint DIR`` or random
weights of ``--config NAME``, and stops it at the end. Requests are kept ``--parallel`` deep so the server
batches them.

Each motion is retargeted onto ``--armature NAME`` of ``--blend FILE`` (or of the scene Blender opened), or onto
a new canonical armature, with the add-on's ``Retargeter`` and keyed into a new Action by its ``ActionKeyer``.
Outputs under ``--out DIR``: the .blend with every Action (``--blend-out``, default ``motions.blend``), per-prompt
``--export bvh|fbx|glb`` files, ``--preview`` GIFs, and ``summary.json`` (per prompt: settings, key, status,
error, outputs, timings; totals with throughput). A failed prompt is reported and the batch goes on. A re-run
skips every prompt whose key (a hash of prompt and settings) is already done with all requested outputs present
(``--force`` redoes them). Exit status: 0 when every prompt is done, 1 when any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/batch_generate.py` and `blender --python` start outside the repo
    sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

try:
    import zmq  # noqa: F401  (addon.wire's transport)
except ImportError:
    sys.exit("error: pyzmq is missing in this Python: install the Motion Mamba extension in Blender (it bundles "
             "pyzmq), or run `python -m pip install pyzmq` with this Python")  # fmt: skip

from addon import wire  # noqa: E402
from addon.armature import create_canonical_armature  # noqa: E402
from addon.canonical import CanonicalSkeleton  # noqa: E402
from addon.client import Generation, MotionClient, ServerError, backend_output, start_backend  # noqa: E402
from addon.keying import GENERATION_PROPERTY, ActionKeyer, assign_action  # noqa: E402
from addon.retarget import PRESETS, Retargeter, TargetRig, map_bones  # noqa: E402

SUMMARY = "summary.json"
CANONICAL_ARMATURE = "MotionSkeleton"
EXPORTS = ("bvh", "fbx", "glb")
ROW_FIELDS = ("prompt", "seconds", "seed", "guidance", "steps", "name")


def script_args(argv: list[str], blender: bool | None = None) -> list[str]:
    """The tool's own arguments: what follows ``--`` (Blender's convention); without one, none inside the Blender
    program (its argv is Blender's own) and everything after argv[0] in a Python with the bpy module."""
    if "--" in argv:
        return argv[argv.index("--") + 1 :]
    blender = bool(bpy.app.binary_path) if blender is None else blender
    return [] if blender else argv[1:]


# ---------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Row:
    """One prompt of the batch; ``error`` is set when the row cannot be generated (``request`` then holds what
    could be read)."""

    row: int  # 1-based position in the batch (command-line prompts first, then the file's rows)
    request: wire.GenerateRequest
    name: str = ""  # the Action's name when given (else one made from the prompt)
    stem: str = ""  # the output files' name: the given name, or the prompt's slug and key; unique in the batch
    error: str = ""

    @property
    def settings(self) -> dict[str, Any]:
        """What determines the motion (one sample per row)."""
        return {k: v for k, v in self.request.to_header().items() if k != "samples"}

    @property
    def key(self) -> str:
        """A stable hash of what determines the motion (resume skips a row whose key is already done)."""
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]


def _number(value: Any, kind: type, name: str) -> float | int:
    """A row value as int or float; ValueError naming the field otherwise."""
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def make_row(index: int, values: dict[str, Any], defaults: argparse.Namespace, limits: wire.Limits) -> Row:
    """A Row from one record (missing or empty fields take the defaults); problems go into ``row.error``."""
    fields = {name: getattr(defaults, name) for name in ("seconds", "seed", "guidance", "steps")}
    row = Row(index, wire.GenerateRequest("", **fields))
    try:
        if None in values:  # csv.DictReader's key for the values beyond the header's columns
            raise ValueError(f"the row has {len(values[None])} more value(s) than the header has columns (quote a "
                             "prompt that contains commas)")  # fmt: skip
        unknown = sorted(set(values) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
        prompt = values.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {prompt!r}")
        row.request = replace(row.request, prompt=prompt.strip())
        row.name = str(values.get("name") or "").strip()
        for name, kind in (("seconds", float), ("seed", int), ("guidance", float), ("steps", int)):
            if values.get(name) not in (None, ""):
                row.request = replace(row.request, **{name: _number(values[name], kind, name)})
        row.request.check(limits)
    except ValueError as exc:
        row.error = str(exc)
    return row


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Records of a .txt, .csv or .json prompts file; raises ValueError when the file itself is unusable."""
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = (line.strip() for line in text.splitlines())
        return [{"prompt": line} for line in lines if line and not line.startswith("#")]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "prompt" not in columns:
            raise ValueError(f"{path}: the first row must name the columns, one of them 'prompt'; got {columns}")
        unknown = sorted(set(columns) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
        return [{c: (v or "") for c, v in zip([*columns, None], record.values())} for record in reader]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of prompts (strings or objects with a 'prompt')")
        return [{"prompt": item} if not isinstance(item, dict) else item for item in data]
    raise ValueError(f"{path}: prompts files must be .txt, .csv or .json")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit].strip("_").lower() or "motion"


def load_rows(args: argparse.Namespace, limits: wire.Limits = wire.DEFAULT_LIMITS) -> list[Row]:
    """Every prompt of the batch, validated, each with a unique file-safe stem."""
    records = [{"prompt": p} for p in args.prompt or []]
    if args.prompts:
        records += read_prompt_file(Path(args.prompts))
    if not records:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    rows = [make_row(i, record, args, limits) for i, record in enumerate(records, 1)]
    keys: dict[str, int] = {}
    stems: dict[str, int] = {}
    for row in rows:
        row.stem = re.sub(r"[^\w.\-]+", "_", row.name).strip("._") or f"{_slug(row.request.prompt)}-{row.key[:8]}"
        if row.error:
            continue
        if row.key in keys:
            row.error = f"same prompt and settings as row {keys[row.key]}"
        elif row.stem in stems:
            row.error = f"name {row.stem!r} is already used by row {stems[row.stem]}"
        else:
            keys[row.key], stems[row.stem] = row.row, row.row
    return rows


# ---------------------------------------------------------------------------------------------------------
# Backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """A connected ``MotionClient``: to the server at ``args.backend``, or to one this object starts."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.process: subprocess.Popen | None = None
        self.server: Any = None  # an in-process backend.serve.Server
        self.thread: threading.Thread | None = None
        self.started = ""  # "", "subprocess" or "inprocess"
        self.start_s = 0.0
        self.client: MotionClient | None = None
        try:
            self.client = self._connect()
        except BaseException:  # a backend started for nothing must not outlive the tool
            self.close()
            raise

    def _hello(self, endpoint: str, timeout: float) -> MotionClient | None:
        client = MotionClient(endpoint, timeout=self.args.timeout)
        try:
            client.hello(timeout=timeout)
            return client
        except (TimeoutError, ConnectionError, ServerError):
            client.close()
            return None

    def _connect(self) -> MotionClient:
        args = self.args
        client = self._hello(args.backend, args.probe_timeout)
        if client is not None:
            return client
        if args.start_backend == "never":
            raise ConnectionError(f"no backend answers at {args.backend} (and --start-backend never)")
        start = time.perf_counter()
        if args.start_backend == "inprocess":
            endpoint = self._start_inprocess()
        else:
            endpoint = self._start_subprocess()
        self.started = args.start_backend
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConnectionError(f"the backend exited with status {self.process.returncode} while starting:\n"
                                      f"{self.log_tail()}")  # fmt: skip
            client = self._hello(endpoint, 1.0)
            if client is not None:
                self.start_s = time.perf_counter() - start
                return client
        raise ConnectionError(f"the backend started at {endpoint} did not answer within {args.start_timeout} s")

    def _model_args(self) -> list[str]:
        if self.args.checkpoint:
            return ["--checkpoint", self.args.checkpoint]
        return ["--config", self.args.config] if self.args.config else []

    def _start_subprocess(self) -> str:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        arguments = ("--device", self.args.device, *self._model_args())
        print(f"starting a backend at {endpoint} ({' '.join(arguments)}; log: {self.log_path})", flush=True)
        self.process = start_backend(endpoint, self.args.backend_python, ROOT, arguments, self.log_path)
        return endpoint

    def _start_inprocess(self) -> str:
        try:
            from backend.serve import Server, load_pipeline
        except ImportError as exc:
            hint = "use --start-backend subprocess --backend-python PYTHON"
            raise ConnectionError(f"--start-backend inprocess needs torch in this Python ({exc}); {hint}") from None
        print("starting a backend in this process", flush=True)
        pipe = load_pipeline(self.args.checkpoint, self.args.config, self.args.device)
        self.server = Server(pipe, "tcp://127.0.0.1:*")
        self.thread = threading.Thread(target=self.server.serve_forever, name="batch-backend", daemon=True)
        self.thread.start()
        return self.server.endpoint

    def gone(self, probe: bool) -> str:
        """Why the backend can serve no more ("" while it can); ``probe`` asks it (after a connection error)."""
        if self.process is not None and self.process.poll() is not None:
            return f"the backend exited (status {self.process.returncode}):\n{self.log_tail()}"
        if probe:
            try:
                self.client.hello(timeout=self.args.probe_timeout)
            except (TimeoutError, ConnectionError, ServerError):
                return f"the backend at {self.client.endpoint} stopped answering"
        return ""

    def log_tail(self) -> str:
        return backend_output(self.log_path)

    def describe(self) -> dict[str, Any]:
        server = self.client.server or {}
        return {"endpoint": self.client.endpoint, "started": self.started or "no (already running)",
                "start_s": round(self.start_s, 3), "model": server.get("model"), "device": server.get("device"),
                "fps": server.get("fps")}  # fmt: skip

    def close(self) -> None:
        """Close the connection; stop a backend this object started."""
        if self.client is not None:
            self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.server is not None:
            self.server.stop()
            self.thread.join(timeout=15)


# ---------------------------------------------------------------------------------------------------------
# Blender side


@contextlib.contextmanager
def blender_output_to(log_path: Path):
    """Send what Blender's exporters print (C and Python, file descriptor 1) to a log, not over the progress bar."""
    sys.stdout.flush()
    saved = os.dup(1)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


class Target:
    """The scene, the target armature, and everything written from Blender: Actions, exports, the .blend."""

    def __init__(self, args: argparse.Namespace, blend_out: Path | None) -> None:
        self.args, self.blend_out = args, blend_out
        self.own_scene = False  # an empty scene this tool made (its frame rate is ours to set)
        if blend_out is not None and blend_out.is_file() and not args.force:
            bpy.ops.wm.open_mainfile(filepath=str(blend_out))  # earlier runs' Actions are kept and added to
        elif args.blend:
            bpy.ops.wm.open_mainfile(filepath=str(args.blend))
        elif not bpy.data.filepath:  # no scene given: an empty one (Blender's startup cube is no use here)
            bpy.ops.wm.read_factory_settings(use_empty=True)
            self.own_scene = True
        self.scene = bpy.context.scene
        self.obj = None
        if args.armature:
            self.obj = bpy.data.objects.get(args.armature)
            if self.obj is None or self.obj.type != "ARMATURE":
                armatures = [o.name for o in bpy.data.objects if o.type == "ARMATURE"]
                raise ValueError(f"no armature object {args.armature!r} in the scene; armatures: {armatures or 'none'}")
        elif (existing := bpy.data.objects.get(CANONICAL_ARMATURE)) is not None and existing.type == "ARMATURE":
            self.obj = existing
        self.rig: TargetRig | None = None
        self.dirty = False  # whether there is anything new to save

    def actions(self) -> dict[str, Any]:
        """The batch's Actions in the scene by key."""
        return {a[GENERATION_PROPERTY]["key"]: a for a in bpy.data.actions if "key" in a.get(GENERATION_PROPERTY, {})}

    def prepare(self, skeleton: CanonicalSkeleton, fps: float) -> None:
        """Create the canonical armature when no target was named; read the target's bones."""
        if self.own_scene:  # one key per generated frame
            self.scene.render.fps, self.scene.render.fps_base = round(fps), 1.0
        if self.obj is None:
            self.obj = create_canonical_armature(self.scene.collection, skeleton, CANONICAL_ARMATURE)
        self.skeleton, self.fps = skeleton, fps
        self.rig = TargetRig.from_armature(self.obj)
        self.bone_map = map_bones(self.rig.names, self.args.preset).require(self.obj.name, self.rig.names)

    def add(self, row: Row, root: np.ndarray, rotations: np.ndarray) -> Any:
        """Retarget and key one motion into a new Action (replacing the batch's Action of the same key)."""
        old = self.actions().get(row.key)
        if old is not None:
            bpy.data.actions.remove(old)
        retarget = Retargeter(self.skeleton, self.rig, self.bone_map, root_motion=not self.args.in_place)
        settings = {
            **row.settings, "sample": 0, "preset": self.bone_map.preset, "root_motion": not self.args.in_place,
            "fps": self.fps, "key": row.key, "stem": row.stem,
        }  # fmt: skip
        keyer = ActionKeyer.for_generation(
            self.obj, self.scene, settings, self.fps, name=row.name or None, place="NONE", keep_timing=True
        )
        keyer.append(retarget(root, rotations))
        keyer.finish()
        self.dirty = True
        last = math.ceil(keyer.end_frame())
        if self.obj.name == CANONICAL_ARMATURE and self.scene.frame_end < last:
            self.scene.frame_end = last
        return bpy.data.actions[keyer.action_name]

    def export(self, action: Any, fmt: str, path: Path) -> None:
        """Write the armature (and the meshes under it) animated by ``action`` as BVH, FBX or GLB."""
        anim = self.obj.animation_data
        previous = (anim.action, getattr(anim, "action_slot", None)) if anim else (None, None)
        assign_action(self.obj, action)
        layer = bpy.context.view_layer
        chosen = {self.obj, *self.obj.children_recursive}
        for obj in layer.objects:
            obj.select_set(obj in chosen)
        layer.objects.active = self.obj
        start, end = self.scene.frame_start, math.ceil(action.frame_range[1])
        frame_end = self.scene.frame_end
        try:
            if fmt == "bvh":
                result = bpy.ops.export_anim.bvh(filepath=str(path), frame_start=start, frame_end=end)
            elif fmt == "fbx":
                self.scene.frame_end = end
                result = bpy.ops.export_scene.fbx(
                    filepath=str(path), use_selection=True, object_types={"ARMATURE", "MESH"}, bake_anim=True,
                    bake_anim_use_all_actions=False, bake_anim_use_nla_strips=False, add_leaf_bones=False,
                )  # fmt: skip
            else:
                self.scene.frame_end = end
                result = bpy.ops.export_scene.gltf(
                    filepath=str(path),
                    export_format="GLB",
                    use_selection=True,
                    export_animations=True,
                    export_animation_mode="ACTIVE_ACTIONS",
                )
        finally:
            self.scene.frame_end = frame_end
            self.obj.animation_data.action = previous[0]
            if previous[0] is not None and previous[1] is not None:
                self.obj.animation_data.action_slot = previous[1]
        if "FINISHED" not in result or not path.is_file():
            raise RuntimeError(f"Blender's {fmt.upper()} exporter did not write {path}")

    def save(self) -> None:
        """Write the .blend with every Action (atomically: a temporary file, then a rename)."""
        if self.blend_out is None or not self.dirty:
            return
        if self.obj.animation_data is None or self.obj.animation_data.action is None:  # open on something animated
            actions = list(self.actions().values())
            if actions:
                assign_action(self.obj, actions[0])
        tmp = self.blend_out.with_name(self.blend_out.stem + ".partial.blend")
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp), copy=True, compress=True)
        os.replace(tmp, self.blend_out)
        self.dirty = False


def write_preview(
    skeleton_name: str, root: np.ndarray, rotations: np.ndarray, fps: float, title: str, path: Path
) -> None:
    """A stick-figure GIF of the generated (canonical) motion, with the backend's own preview code."""
    try:
        from backend.motion import forward_kinematics
        from backend.preview import render_preview
        from backend.skeleton import SKELETONS
    except ImportError as exc:
        raise RuntimeError(f"--preview needs the project's Python packages (torch, matplotlib): {exc}") from None
    skeleton = SKELETONS[skeleton_name]
    positions = forward_kinematics(root.astype(np.float64), rotations.astype(np.float64), skeleton)
    render_preview(positions, path, skeleton=skeleton, title=title[:60], fps=fps)


# ---------------------------------------------------------------------------------------------------------
# The batch


@dataclass
class Item:
    """A row's record in summary.json."""

    row: int
    name: str
    prompt: str
    seconds: float
    seed: int
    guidance: float
    steps: int
    key: str
    status: str = "pending"  # done | skipped | failed
    error: str = ""
    frames: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Row) -> Item:
        return cls(row.row, row.stem, **row.settings, key=row.key, status="failed" if row.error else "pending",
                   error=row.error)  # fmt: skip


class Progress:
    """tqdm's bar with ETA when tqdm is importable (the project's Python), else one line per prompt (Blender)."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="prompt", desc="generating", file=sys.stderr) if tqdm else None
        self.total, self.count, self.start = total, 0, time.perf_counter()

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, line: str) -> None:
        """One prompt finished; ``line`` says how."""
        self.count += 1
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.count * (self.total - self.count)
        print(f"[{self.count}/{self.total}, ETA {eta:.0f} s] {line}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Batch:
    """Runs the rows: skips finished ones, generates the rest through the backend, writes every output."""

    def __init__(self, args: argparse.Namespace, rows: list[Row]) -> None:
        self.wall_start = time.perf_counter()
        self.args, self.rows = args, rows
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.out / SUMMARY
        blend_out = None if args.no_blend_out else self.out / args.blend_out
        if blend_out is not None and args.blend and Path(args.blend).resolve() == blend_out.resolve():
            raise ValueError(f"--blend-out {blend_out} would overwrite the input --blend; pick another name")
        self.blender_log = self.out / "blender.log"
        with blender_output_to(self.blender_log):
            self.target = Target(args, blend_out)
        self.items = [Item.of(row) for row in rows]
        self.by_row = {item.row: item for item in self.items}
        self.backend: Backend | None = None
        self.generate_start = self.generate_end = 0.0
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # -- resume -------------------------------------------------------------------------------------------
    def wanted(self, row: Row) -> dict[str, Path]:
        """The per-prompt files this run asks for."""
        files = {fmt: self.out / f"{row.stem}.{fmt}" for fmt in self.args.export}
        if self.args.preview:
            files["gif"] = self.out / f"{row.stem}.gif"
        return files

    def finished_before(self) -> set[int]:
        """Rows whose key an earlier run finished with every output this run asks for still in place."""
        if self.args.force or not self.summary_path.is_file():
            return set()
        try:
            previous = json.loads(self.summary_path.read_text())["items"]
        except (ValueError, KeyError, TypeError):
            return set()
        done = {p["key"]: p for p in previous if isinstance(p, dict) and p.get("status") in ("done", "skipped")}
        actions = self.target.actions()
        rows = set()
        for row in self.rows:
            prior = done.get(row.key)
            if row.error or prior is None or prior.get("name") != row.stem:
                continue
            if self.target.blend_out is not None and row.key not in actions:
                continue
            if all(path.is_file() for path in self.wanted(row).values()):
                item = self.by_row[row.row]
                item.status, item.frames = "skipped", int(prior.get("frames", 0))
                item.outputs, item.timings = dict(prior.get("outputs", {})), dict(prior.get("timings", {}))
                rows.add(row.row)
        return rows

    # -- generation ---------------------------------------------------------------------------------------
    def run(self) -> int:
        skipped = self.finished_before()
        todo = deque(row for row in self.rows if not row.error and row.row not in skipped)
        progress = None
        try:
            if todo:
                self.backend = Backend(self.args, self.out / "backend.log")
                info = self.backend.describe()
                model = info["model"] or {}
                print(f"backend {info['endpoint']}: {model.get('model', 'model')} ({model.get('source', '?')}) on "
                      f"{info['device']}, started: {info['started']}", flush=True)  # fmt: skip
                hello = self.backend.client.server
                self.skeleton_name = hello["skeleton"].get("name", "SMPL22")
                self.target.prepare(CanonicalSkeleton.from_json(hello["skeleton"]), float(hello["fps"]))
                progress = Progress(len(todo))
                self.generate_start = time.perf_counter()
                self._generate(todo, progress)
                self.generate_end = time.perf_counter()
        except (OSError, ValueError) as exc:  # no backend (ConnectionError, no weights: FileNotFoundError), bad rig
            print(f"error: {exc}", file=sys.stderr)
            for row in todo:
                self._fail(row.row, f"no generation: {exc}")
        finally:
            if progress is not None:
                progress.close()
            if self.backend is not None:
                self.backend.close()
        with blender_output_to(self.blender_log):
            self.target.save()
        summary = self.write_summary()
        return self.report(summary)

    def _generate(self, todo: deque[Row], progress: Progress) -> None:
        client = self.backend.client
        pending: dict[str, Row] = {}  # request id -> row
        finished: list[tuple[Row, Generation]] = []

        def ended(gen: Generation) -> None:
            finished.append((pending.pop(gen.id), gen))

        # keep `parallel` requests at the server, so that it batches them; at most this client's share of its
        # queue (announced in hello) plus the one it runs
        parallel = min(self.args.parallel, client.limits.max_client_queue + 1)

        def top_up() -> None:
            while todo and len(pending) < parallel:
                row = todo.popleft()
                try:
                    gen = client.start(row.request, on_progress=lambda g: progress.step(f"step {g.step}/{g.total}"),
                                       on_done=ended, on_error=ended)
                except (ValueError, ConnectionError) as exc:
                    progress.update(self._fail(row.row, str(exc)))
                    continue
                pending[gen.id] = row

        while todo or pending:
            top_up()
            finished.clear()
            client.poll(timeout=0.1)
            lost = any(gen.error is not None and gen.error.code in ("timeout", "disconnected") for _, gen in finished)
            reason = self.backend.gone(probe=lost)
            if reason:  # fail what is left at once rather than one timeout after another
                for row in list(pending.values()) + list(todo):
                    progress.update(self._fail(row.row, reason))
                pending.clear()
                todo.clear()
            top_up()  # the server generates the next ones while Blender keys and exports these
            for row, gen in finished:
                if gen.error is not None and gen.error.code == "busy":  # other clients' turn: try again later
                    todo.appendleft(row)
                    continue
                if gen.error is not None:
                    progress.update(self._fail(row.row, f"backend error ({gen.error.code}): {gen.error.message}"))
                    continue
                timings = {"request_s": time.perf_counter() - gen.submitted, **gen.motion.timings}
                try:
                    progress.update(self._finish(row, gen.motion.root_translation[0], gen.motion.rotations[0], timings))
                except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # e.g. an exporter that failed
                    progress.update(self._fail(row.row, f"{type(exc).__name__}: {exc}"))

    def _finish(self, row: Row, root: np.ndarray, rotations: np.ndarray, timings: dict[str, float]) -> str:
        item = self.by_row[row.row]
        item.frames = len(root)
        start = time.perf_counter()
        action = self.target.add(row, root, rotations)
        item.outputs["action"] = action.name
        if self.target.blend_out is not None:
            item.outputs["blend"] = str(self.target.blend_out)
        timings["keying_s"] = time.perf_counter() - start
        with blender_output_to(self.blender_log):
            for fmt, path in self.wanted(row).items():
                start = time.perf_counter()
                if fmt == "gif":
                    write_preview(self.skeleton_name, root, rotations, self.target.fps, row.request.prompt, path)
                else:
                    self.target.export(action, fmt, path)
                timings[f"{fmt}_s"] = time.perf_counter() - start
                item.outputs[fmt] = str(path)
            start = time.perf_counter()
            self.target.save()  # after every prompt: an interrupted batch resumes from here
            timings["save_s"] = time.perf_counter() - start
        item.timings = {k: round(float(v), 4) for k, v in timings.items()}
        item.status = "done"
        self.write_summary()
        return f"done   row {row.row} {row.stem}: {item.frames} frames in {timings['request_s']:.1f} s"

    def _fail(self, row: int, error: str) -> str:
        item = self.by_row[row]
        item.status, item.error = "failed", error
        self.write_summary()
        return f"FAILED row {row} {item.name}: {error.splitlines()[0] if error else ''}"

    # -- reporting ----------------------------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        count = {s: sum(i.status == s for i in self.items) for s in ("done", "skipped", "failed", "pending")}
        done = [i for i in self.items if i.status == "done"]
        generate_s = max(self.generate_end - self.generate_start, 0.0) if done else 0.0
        fps = self.target.fps if done else 20.0
        motion_s = sum(i.frames for i in done) / fps
        return {
            "prompts": len(self.items), **count,
            "wall_s": round(time.perf_counter() - self.wall_start, 3),
            "backend_start_s": round(self.backend.start_s, 3) if self.backend else 0.0,
            "generate_s": round(generate_s, 3),
            "motion_s": round(motion_s, 3),
            "prompts_per_minute": round(60.0 * len(done) / generate_s, 3) if generate_s else 0.0,
            "motion_s_per_s": round(motion_s / generate_s, 4) if generate_s else 0.0,
        }  # fmt: skip

    def write_summary(self) -> dict[str, Any]:
        """Write summary.json (atomically); returns it."""
        args = self.args
        summary = {
            "started": self.started_at,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": vars(args),
            "backend": self.backend.describe() if self.backend else {"endpoint": args.backend, "started": "no",
                                                                      "contacted": False},
            "target": {"armature": self.target.obj.name if self.target.obj else None,
                       "blend": args.blend, "blend_out": str(self.target.blend_out or ""), "preset": args.preset,
                       "root_motion": not args.in_place},
            "totals": self.totals(),
            "items": [asdict(item) for item in self.items],
        }  # fmt: skip
        tmp = self.summary_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.summary_path)
        return summary

    def report(self, summary: dict[str, Any]) -> int:
        t = summary["totals"]
        for item in self.items:
            if item.status == "failed":
                print(f"failed: row {item.row} ({item.prompt[:40]!r}): {item.error.splitlines()[0]}")
        print(f"summary: {self.summary_path}")
        print(f"prompts: {t['prompts']}  done: {t['done']}  skipped: {t['skipped']}  failed: {t['failed']}  "
              f"wall: {t['wall_s']:.1f} s (backend start {t['backend_start_s']:.1f} s)")  # fmt: skip
        if t["done"]:
            print(f"throughput: {t['prompts_per_minute']:.2f} prompts/minute, {t['motion_s_per_s']:.3f} seconds of "
                  f"motion per second ({t['motion_s']:.1f} s of motion in {t['generate_s']:.1f} s)")  # fmt: skip
        if t["failed"]:
            print(f"FAILED: {t['failed']} of {t['prompts']} prompts failed (details in {self.summary_path})")
            return 1
        print(f"OK: all {t['prompts']} prompts done ({t['done']} generated, {t['skipped']} skipped)")
        return 0


def default_backend_python() -> str:
    """The project's venv Python when there is one (Blender's own Python lacks torch), else this one."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_generate.py", description=__doc__.split("\n\n")[0],
        epilog="Run as: blender -b [scene.blend] --python tools/batch_generate.py -- ARGS, or "
               "python tools/batch_generate.py ARGS",
    )  # fmt: skip
    src = parser.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="a .txt / .csv / .json prompts file")
    defaults = wire.GenerateRequest.defaults()  # the protocol's, as everywhere
    src.add_argument("--seconds", type=float, default=defaults["seconds"], help="default duration (%(default)s)")
    src.add_argument("--seed", type=int, default=defaults["seed"], help="default seed (%(default)s)")
    src.add_argument("--guidance", type=float, default=defaults["guidance"],
                     help="classifier-free guidance (%(default)s)")
    src.add_argument("--steps", type=int, default=defaults["steps"], help="denoising steps (%(default)s)")
    tgt = parser.add_argument_group("target")
    tgt.add_argument("--blend", help="the .blend holding the target armature (default: the open scene)")
    tgt.add_argument("--armature", help="target armature object (default: a new canonical armature)")
    tgt.add_argument("--preset", default="AUTO", choices=("AUTO", *PRESETS), help="bone-map preset")
    tgt.add_argument("--in-place", action="store_true", help="drop horizontal root motion")
    be = parser.add_argument_group("backend")
    be.add_argument(
        "--backend", default=wire.DEFAULT_ENDPOINT, help=f"server address (default {wire.DEFAULT_ENDPOINT})"
    )
    be.add_argument(
        "--start-backend",
        default="subprocess",
        choices=("subprocess", "inprocess", "never"),
        help="when none answers at --backend: start one (default: as a subprocess)",
    )
    be.add_argument("--checkpoint", help="checkpoint folder for a started backend (default: the shipped weights)")
    be.add_argument("--config", help="random weights of configs/<CONFIG>.json for a started backend (tests)")
    be.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    be.add_argument("--backend-python", default=default_backend_python(), help="Python for a subprocess backend")
    be.add_argument("--parallel", type=int, default=16, help="requests in flight (the server batches them)")
    be.add_argument("--timeout", type=float, default=60.0, help="seconds of backend silence before a request fails")
    be.add_argument("--probe-timeout", type=float, default=1.5, help="seconds to wait for an existing backend")
    be.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for a started backend")
    out = parser.add_argument_group("outputs")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--blend-out", default="motions.blend", help="the .blend with every Action, in --out")
    out.add_argument("--no-blend-out", action="store_true", help="write no .blend")
    out.add_argument("--export", action="append", default=[], choices=EXPORTS, help="per-prompt file (repeatable)")
    out.add_argument("--preview", action="store_true", help="per-prompt stick-figure GIF")
    out.add_argument("--force", action="store_true", help="redo every prompt (no resume)")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if args.checkpoint and args.config:
        parser.error("give --checkpoint or --config, not both")
    args.export = list(dict.fromkeys(args.export))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(script_args(sys.argv) if argv is None else argv)
    try:
        rows = load_rows(args)
        batch = Batch(args, rows)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return batch.run()


if __name__ == "__main__":
    sys.exit(main())
