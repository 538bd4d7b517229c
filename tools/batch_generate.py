"""Headless batch generation: prompts in; keyed Actions (.blend), BVH/FBX/glTF files and GIF previews out.

    blender -b [scene.blend] --python tools/batch_generate.py -- --prompts prompts.csv --out out [options]
    python tools/batch_generate.py --prompts prompts.csv --out out [options]       (Python with the bpy module)

Each prompt (``--prompt``, or a .txt/.csv/.json ``--prompts`` file) becomes an ``addon.wire.GenerateRequest``
sent through ``addon.client`` to the backend at ``--backend`` (or one the tool starts), is retargeted and keyed
with the add-on's ``Retargeter`` and ``ActionKeyer``, and is written out; a re-run skips what is done. Exit
status: 0 when every prompt is done, 1 when any failed, 2 for bad arguments. Usage and outputs: docs/batch.md.
This module runs the batch (backend, requests, summary); ``batch_prompts`` reads the prompts into rows and
``batch_blender`` writes each motion into Blender and out of it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tools"):  # `python tools/batch_generate.py` and `blender --python` start elsewhere
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import bpy  # noqa: E402

try:
    import zmq  # noqa: F401  (addon.wire's transport)
except ImportError:
    sys.exit("error: pyzmq is missing in this Python: install the Motion Mamba extension in Blender (it bundles "
             "pyzmq), or run `python -m pip install pyzmq` with this Python")  # fmt: skip

from batch_blender import EXPORTS, Target, blender_output_to, write_preview  # noqa: E402
from batch_prompts import DEFAULTS, Row, load_rows  # noqa: E402

from addon import wire  # noqa: E402
from addon.canonical import CanonicalSkeleton  # noqa: E402
from addon.client import Generation, MotionClient, ServerError, backend_output, start_backend  # noqa: E402
from addon.retarget import PRESETS  # noqa: E402

SUMMARY = "summary.json"


def script_args(argv: list[str], blender: bool | None = None) -> list[str]:
    """The tool's own arguments: what follows ``--`` (Blender's convention); without one, none inside the Blender
    program (its argv is Blender's own) and everything after argv[0] in a Python with the bpy module."""
    if "--" in argv:
        return argv[argv.index("--") + 1 :]
    blender = bool(bpy.app.binary_path) if blender is None else blender
    return [] if blender else argv[1:]


# ---------------------------------------------------------------------------------------------------------
# Backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """A connected ``MotionClient``: to the server at ``args.backend``, or to one this object starts (with
    ``addon.client.start_backend``, or in this process) and stops in ``close``."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.process: subprocess.Popen | None = None
        self.server: Any = None  # an in-process backend.serve.Server, and its thread
        self.thread: threading.Thread | None = None
        self.started, self.start_s = "", 0.0  # started: "", "subprocess" or "inprocess"
        self.client: MotionClient | None = None
        try:
            self.client = self._hello(args.backend, args.probe_timeout) or self._start()
        except BaseException:  # a backend started for nothing must not outlive the tool
            self.close()
            raise

    def _hello(self, endpoint: str, timeout: float) -> MotionClient | None:
        """A client of ``endpoint`` once its server said hello within ``timeout`` seconds; else None."""
        client = MotionClient(endpoint, timeout=self.args.timeout)
        try:
            client.hello(timeout=timeout)
            return client
        except (TimeoutError, ConnectionError, ServerError):
            client.close()
            return None

    def _start(self) -> MotionClient:
        args = self.args
        if args.start_backend == "never":
            raise ConnectionError(f"no backend answers at {args.backend} (and --start-backend never)")
        start = time.perf_counter()
        if args.start_backend == "inprocess":
            try:
                from backend.serve import Server, load_pipeline
            except ImportError as exc:
                raise ConnectionError(f"--start-backend inprocess needs torch in this Python ({exc}); use "
                                      "--start-backend subprocess --backend-python PYTHON") from None  # fmt: skip
            print("starting a backend in this process", flush=True)
            self.server = Server(load_pipeline(args.checkpoint, args.config, args.device), "tcp://127.0.0.1:*")
            self.thread = threading.Thread(target=self.server.serve_forever, name="batch-backend", daemon=True)
            self.thread.start()
            endpoint = self.server.endpoint
        else:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            model = ("--checkpoint", args.checkpoint) if args.checkpoint else ("--config", args.config)
            arguments = ("--device", args.device, *(model if model[1] else ()))
            print(f"starting a backend at {endpoint} ({' '.join(arguments)}; log: {self.log_path})", flush=True)
            self.process = start_backend(endpoint, args.backend_python, ROOT, arguments, self.log_path)
        self.started = args.start_backend
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConnectionError(f"the backend exited with status {self.process.returncode} while starting:\n"
                                      f"{backend_output(self.log_path)}")  # fmt: skip
            client = self._hello(endpoint, 1.0)
            if client is not None:
                self.start_s = time.perf_counter() - start
                return client
        raise ConnectionError(f"the backend started at {endpoint} did not answer within {args.start_timeout} s")

    def gone(self, probe: bool) -> str:
        """Why the backend can serve no more ("" while it can); ``probe`` asks it (after a connection error)."""
        if self.process is not None and self.process.poll() is not None:
            return f"the backend exited (status {self.process.returncode}):\n{backend_output(self.log_path)}"
        if probe:
            try:
                self.client.hello(timeout=self.args.probe_timeout)
            except (TimeoutError, ConnectionError, ServerError):
                return f"the backend at {self.client.endpoint} stopped answering"
        return ""

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
# The batch


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
        self.backend: Backend | None = None
        self.generate_start = self.generate_end = 0.0
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.finished = 0  # prompts done or failed in this run (the progress count)

    def wanted(self, row: Row) -> dict[str, Path]:
        """The per-prompt files this run asks for."""
        files = {fmt: self.out / f"{row.stem}.{fmt}" for fmt in self.args.export}
        if self.args.preview:
            files["gif"] = self.out / f"{row.stem}.gif"
        return files

    def skip_finished(self) -> None:
        """Mark "skipped" the rows whose key an earlier run finished with every output this run asks for still in
        place (unless --force)."""
        if self.args.force or not self.summary_path.is_file():
            return
        try:
            previous = json.loads(self.summary_path.read_text())["items"]
        except (ValueError, KeyError, TypeError):
            return
        done = {p["key"]: p for p in previous if isinstance(p, dict) and p.get("status") in ("done", "skipped")}
        actions = self.target.actions()
        for row in self.rows:
            prior = done.get(row.key)
            if row.error or prior is None or prior.get("name") != row.stem:
                continue
            if self.target.blend_out is not None and row.key not in actions:
                continue
            if all(path.is_file() for path in self.wanted(row).values()):
                row.status, row.frames = "skipped", int(prior.get("frames", 0))
                row.outputs, row.timings = dict(prior.get("outputs", {})), dict(prior.get("timings", {}))

    def run(self) -> int:
        """Generate what is left, write the summary and report; the exit status."""
        self.skip_finished()
        todo = deque(row for row in self.rows if row.status == "pending")
        try:
            if todo:
                self.backend = Backend(self.args, self.out / "backend.log")
                info, hello = self.backend.describe(), self.backend.client.server
                model = info["model"] or {}
                print(f"backend {info['endpoint']}: {model.get('model', 'model')} ({model.get('source', '?')}) on "
                      f"{info['device']}, started: {info['started']}", flush=True)  # fmt: skip
                self.skeleton_name = hello["skeleton"].get("name", "SMPL22")
                self.target.prepare(CanonicalSkeleton.from_json(hello["skeleton"]), float(hello["fps"]))
                self.total, self.generate_start = len(todo), time.perf_counter()
                self._generate(todo)
                self.generate_end = time.perf_counter()
        except (OSError, ValueError) as exc:  # no backend (ConnectionError, no weights: FileNotFoundError), bad rig
            print(f"error: {exc}", file=sys.stderr)
            for row in todo:
                self._fail(row, f"no generation: {exc}", report=False)
        finally:
            if self.backend is not None:
                self.backend.close()
        with blender_output_to(self.blender_log):
            self.target.save()
        return self.report(self.write_summary())

    def _progress(self, line: str) -> None:
        """One prompt finished; ``line`` says how (with the count and an ETA)."""
        self.finished += 1
        elapsed = time.perf_counter() - self.generate_start
        eta = elapsed / self.finished * (self.total - self.finished)
        print(f"[{self.finished}/{self.total}, ETA {eta:.0f} s] {line}", flush=True)

    def _generate(self, todo: deque[Row]) -> None:
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
                    pending[client.start(row.request, on_done=ended, on_error=ended).id] = row
                except (ValueError, ConnectionError) as exc:
                    self._fail(row, str(exc))

        while todo or pending:
            top_up()
            finished.clear()
            client.poll(timeout=0.1)
            lost = any(gen.error is not None and gen.error.code in ("timeout", "disconnected") for _, gen in finished)
            reason = self.backend.gone(probe=lost)
            if reason:  # fail what is left at once rather than one timeout after another
                for row in [*pending.values(), *todo]:
                    self._fail(row, reason)
                pending.clear()
                todo.clear()
            top_up()  # the server generates the next ones while Blender keys and exports these
            for row, gen in finished:
                if gen.error is not None and gen.error.code == "busy":  # other clients' turn: try again later
                    todo.appendleft(row)
                elif gen.error is not None:
                    self._fail(row, f"backend error ({gen.error.code}): {gen.error.message}")
                else:
                    try:
                        self._finish(row, gen)
                    except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # e.g. an exporter that failed
                        self._fail(row, f"{type(exc).__name__}: {exc}")

    def _finish(self, row: Row, gen: Generation) -> None:
        """Key, export and save one generated motion."""
        root, rotations = gen.motion.root_translation[0], gen.motion.rotations[0]
        timings = {"request_s": time.perf_counter() - gen.submitted, **gen.motion.timings}
        row.frames = len(root)
        start = time.perf_counter()
        action = self.target.add(row, root, rotations)
        row.outputs["action"] = action.name
        if self.target.blend_out is not None:
            row.outputs["blend"] = str(self.target.blend_out)
        timings["keying_s"] = time.perf_counter() - start
        with blender_output_to(self.blender_log):
            for fmt, path in self.wanted(row).items():
                start = time.perf_counter()
                if fmt == "gif":
                    write_preview(self.skeleton_name, root, rotations, self.target.fps, row.request.title, path)
                else:
                    self.target.export(action, fmt, path)
                timings[f"{fmt}_s"] = time.perf_counter() - start
                row.outputs[fmt] = str(path)
            start = time.perf_counter()
            self.target.save()  # after every prompt: an interrupted batch resumes from here
            timings["save_s"] = time.perf_counter() - start
        row.timings = {k: round(float(v), 4) for k, v in timings.items()}
        row.status = "done"
        self.write_summary()
        self._progress(f"done   row {row.row} {row.stem}: {row.frames} frames in {timings['request_s']:.1f} s")

    def _fail(self, row: Row, error: str, report: bool = True) -> None:
        row.status, row.error = "failed", error
        self.write_summary()
        if report:
            self._progress(f"FAILED row {row.row} {row.stem}: {error.splitlines()[0] if error else ''}")

    def totals(self) -> dict[str, Any]:
        count = {s: sum(r.status == s for r in self.rows) for s in ("done", "skipped", "failed", "pending")}
        done = [r for r in self.rows if r.status == "done"]
        generate_s = max(self.generate_end - self.generate_start, 0.0) if done else 0.0
        motion_s = sum(r.frames for r in done) / (self.target.fps if done else 20.0)
        return {
            "prompts": len(self.rows), **count,
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
            "items": [row.record() for row in self.rows],
        }  # fmt: skip
        tmp = self.summary_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.summary_path)
        return summary

    def report(self, summary: dict[str, Any]) -> int:
        """Print the failures and totals; the exit status."""
        t = summary["totals"]
        for row in self.rows:
            if row.status == "failed":
                print(f"failed: row {row.row} ({row.request.title[:40]!r}): {row.error.splitlines()[0]}")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The tool's arguments (see the module's docstring); exits with status 2 on bad ones."""
    parser = argparse.ArgumentParser(
        prog="batch_generate.py", description=__doc__.split("\n\n")[0],
        epilog="Run as: blender -b [scene.blend] --python tools/batch_generate.py -- ARGS, or "
               "python tools/batch_generate.py ARGS",
    )  # fmt: skip
    src = parser.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="a .txt / .csv / .json prompts file")
    for name, default in DEFAULTS.items():  # the protocol's defaults, as everywhere
        src.add_argument(f"--{name}", type=type(default), default=default, help=f"{name} where a row gives none "
                         "(%(default)s)")  # fmt: skip
    tgt = parser.add_argument_group("target")
    tgt.add_argument("--blend", help="the .blend holding the target armature (default: the open scene)")
    tgt.add_argument("--armature", help="target armature object (default: a new canonical armature)")
    tgt.add_argument("--preset", default="AUTO", choices=("AUTO", *PRESETS), help="bone-map preset")
    tgt.add_argument("--in-place", action="store_true", help="drop horizontal root motion")
    be = parser.add_argument_group("backend")
    be.add_argument("--backend", default=wire.DEFAULT_ENDPOINT, help="server address (%(default)s)")
    be.add_argument("--start-backend", default="subprocess", choices=("subprocess", "inprocess", "never"),
                    help="when none answers at --backend: start one (default: as a subprocess)")
    be.add_argument("--checkpoint", help="checkpoint folder for a started backend (default: the shipped weights)")
    be.add_argument("--config", help="random weights of configs/<CONFIG>.json for a started backend (tests)")
    be.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    venv = ROOT / ".venv" / "bin" / "python"  # Blender's own Python lacks torch
    be.add_argument("--backend-python", default=str(venv) if venv.is_file() else sys.executable,
                    help="Python for a subprocess backend (the project's .venv when there is one)")
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
    """Run the tool; its exit status (0 all done, 1 some failed, 2 bad arguments)."""
    args = parse_args(script_args(sys.argv) if argv is None else argv)
    try:
        batch = Batch(args, load_rows(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return batch.run()


if __name__ == "__main__":
    sys.exit(main())
