"""The generation backend: one long-lived process that holds the model and serves it over ZeroMQ.

    python -m backend.serve [--bind tcp://127.0.0.1:5557] [--checkpoint DIR | --config tiny]
                            [--device auto|cpu|cuda] [--max-queue N] [--batch/--no-batch] [--keys DIR]
    python -m backend.serve keygen DIR [--client NAME ...]

A ROUTER socket speaks the protocol of ``addon.wire``. The socket loop (main thread) never waits on the
model: one worker thread runs the pipeline and hands events back through a queue plus an inproc "doorbell"
socket, so ``ping`` and ``cancel`` are answered mid-generation. Requests wait in a bounded queue (a full queue
answers ``busy``); compatible requests (same seconds, steps, guidance, samples) waiting together run as one
batched denoising pass. Loopback binds serve as is; any other address needs CurveZMQ keys (``keygen``), and
then only clients whose public key is in DIR/authorized get through.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import queue
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from addon.wire import DEFAULT_ENDPOINT, Limits, WireError, decode, encode, error_reply, pack_motion

log = logging.getLogger("backend.serve")


class Cancelled(Exception):
    """Raised from the pipeline callback when every request of a batch has been cancelled."""


@dataclass(eq=False)
class Job:
    """One accepted ``generate`` request."""

    client: bytes  # ROUTER routing id
    id: str
    prompt: str
    seconds: float
    seed: int
    guidance: float
    steps: int
    samples: int
    received: float = field(default_factory=time.perf_counter)
    cancel_requested: bool = False  # set by the socket loop, read by the worker
    cancel_step: int = 0  # the denoising steps finished when the cancel arrived
    cancel_reported: bool = False  # worker side
    finished: bool = False  # socket loop side: the client got done/error, send nothing more

    @property
    def key(self) -> tuple[float, int, float, int]:
        """Requests with equal keys can share one denoising pass."""
        return (self.seconds, self.steps, self.guidance, self.samples)


@dataclass(eq=False)
class Batch:
    """The jobs of one denoising pass; ``step`` is written by the worker as it goes."""

    jobs: list[Job]
    step: int = 0
    started: float = field(default_factory=time.perf_counter)


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: tcp on 127.0.0.0/8, ::1 or localhost, ipc, inproc."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name
        return False


def check_bind(bind: str, keys: str | Path | None) -> None:
    """Refuse (PermissionError) to listen on a non-loopback address without CurveZMQ keys."""
    if keys is None and not is_loopback(bind):
        raise PermissionError(
            f"refusing to listen on {bind} without authentication: a non-loopback address needs CurveZMQ "
            "keys. Create them with `python -m backend.serve keygen DIR`, start with `--keys DIR`, and give "
            "clients DIR/server.key and their DIR/<client>.key_secret. Or bind tcp://127.0.0.1:PORT.")


def keygen(directory: str | Path, clients: tuple[str, ...] = ("client",)) -> Path:
    """Write a server key pair (kept) and client key pairs into ``directory``; each client's public key is
    copied into ``directory/authorized``. Give ``<client>.key_secret`` and ``server.key`` to that client."""
    directory = Path(directory)
    authorized = directory / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    if not (directory / "server.key_secret").exists():
        Path(zmq.auth.create_certificates(directory, "server")[1]).chmod(0o600)
    for name in clients:
        public, secret = zmq.auth.create_certificates(directory, name)
        Path(secret).chmod(0o600)
        shutil.copy(public, authorized / Path(public).name)
    return directory


class Server:
    """The ROUTER server around one loaded pipeline. ``serve_forever()`` in one thread, ``stop()`` from any."""

    def __init__(self, pipe: Any, bind: str = DEFAULT_ENDPOINT, *, keys: str | Path | None = None,
                 max_queue: int = 32, batch: bool = True, max_batch: int = 16,
                 context: zmq.Context | None = None):
        check_bind(bind, keys)
        self.pipe = pipe
        self.batch = batch
        self.max_batch = max_batch
        self.limits = Limits(max_seconds=float(pipe.max_seconds), max_queue=max_queue)
        self._hello = {"model": pipe.describe(), "device": str(pipe.device), "fps": float(pipe.fps),
                       "skeleton": _skeleton_json(), "limits": self.limits.to_json()}
        self._context = context or zmq.Context.instance()
        self._auth: ThreadAuthenticator | None = None
        self._router = self._make_router(bind, keys)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._doorbell_address = f"inproc://serve-{uuid.uuid4().hex}"
        self._doorbell = self._context.socket(zmq.PAIR)
        self._doorbell.bind(self._doorbell_address)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[Job] = []
        self._active: Batch | None = None
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="serve-worker", daemon=True)

    def _make_router(self, bind: str, keys: str | Path | None) -> zmq.Socket:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of dropping
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            if keys is not None:
                self._configure_curve(sock, Path(keys))
            sock.bind(bind)
        except BaseException:
            sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            raise
        return sock

    def _configure_curve(self, sock: zmq.Socket, keys: Path) -> None:
        """Make ``sock`` a CurveZMQ server that admits only the public keys in ``keys/authorized``."""
        authorized = keys / "authorized"
        if not (keys / "server.key_secret").is_file() or not authorized.is_dir():
            raise FileNotFoundError(f"{keys} holds no server.key_secret and authorized/ folder; create them "
                                    "with `python -m backend.serve keygen DIR`")
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(authorized))
        public, secret = zmq.auth.load_certificate(keys / "server.key_secret")
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    # -- lifecycle ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop (thread- and signal-safe); in-flight requests get ``shutting_down``."""
        self._stopping.set()

    def serve_forever(self) -> None:
        """Run the socket loop until ``stop()``; then answer everything left and close."""
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._doorbell, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(0 if not self._events.empty() else 100))
                if self._doorbell in ready:
                    while self._doorbell.poll(0):
                        self._doorbell.recv()
                for _ in range(1000):  # worker events first: they free the worker
                    try:
                        self._on_event(self._events.get_nowait())
                    except queue.Empty:
                        break
                for _ in range(100):
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_request(frames[0], frames[1:])
                    except Exception:  # a bug must cost one request, not the server
                        log.exception("unexpected error while handling a request")
                self._dispatch()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for job in self._pending + (self._active.jobs if self._active else []):
            job.cancel_requested = True
            self._finish(job, error_reply(job.id, "shutting_down", "the server is shutting down"))
        self._pending.clear()
        self._todo.put(None)
        self._worker.join(timeout=10)
        self._router.close(linger=1000)
        self._doorbell.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        log.info("stopped")

    # -- socket side -------------------------------------------------------------------------------------
    def _send(self, client: bytes, frames: list[bytes]) -> bool:
        """Send to one client; a client that vanished (or stopped reading) loses its requests, nothing else."""
        try:
            self._router.send_multipart([client, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.info("client %s unreachable (%s): dropping its requests", client.hex(), exc.strerror)
            self._drop_client(client)
            return False

    def _finish(self, job: Job, frames: list[bytes]) -> None:
        if not job.finished:
            job.finished = True
            self._send(job.client, frames)

    def _drop_client(self, client: bytes) -> None:
        self._pending = [job for job in self._pending if job.client != client]
        for job in self._active.jobs if self._active else []:
            if job.client == client and not job.finished:
                job.finished = True
                self._request_cancel(job)

    def _request_cancel(self, job: Job) -> None:
        job.cancel_step = self._active.step if self._active else 0
        job.cancel_requested = True

    def _find(self, client: bytes, rid: str) -> Job | None:
        jobs = self._pending + (self._active.jobs if self._active else [])
        return next((job for job in jobs if job.client == client and job.id == rid and not job.finished), None)

    def _on_request(self, client: bytes, frames: list[bytes]) -> None:
        try:
            message = decode(frames, reply=False, limits=self.limits)
        except WireError as exc:
            log.info("bad request from %s: %s", client.hex(), exc)
            self._send(client, error_reply(exc.request_id, exc.code, str(exc)))
            return
        rid = message.id
        if message.type == "hello":
            self._send(client, encode({"type": "hello", "id": rid, **self._hello}))
        elif message.type == "ping":
            running = sum(not job.finished for job in self._active.jobs) if self._active else 0
            self._send(client, encode({"type": "pong", "id": rid, "queued": len(self._pending),
                                       "running": running}))
        elif message.type == "cancel":
            self._cancel(client, rid)
        else:
            self._submit(client, message.header)

    def _cancel(self, client: bytes, rid: str) -> None:
        """Cancel a queued request at once, a running one after its current denoising step; unknown or
        finished ids are ignored (the request may have just completed)."""
        job = self._find(client, rid)
        if job is None:
            return
        if job in self._pending:
            self._pending.remove(job)
            self._finish(job, error_reply(rid, "cancelled", "cancelled before it started", step=0,
                                          cancel_step=0))
        elif not job.cancel_requested:
            self._request_cancel(job)

    def _submit(self, client: bytes, header: dict[str, Any]) -> None:
        rid = header["id"]
        if self._find(client, rid) is not None:
            self._send(client, error_reply(rid, "bad_request", f"request id {rid!r} is already in use"))
            return
        if len(self._pending) >= self.limits.max_queue:
            self._send(client, error_reply(rid, "busy", f"the server's queue is full ({len(self._pending)} "
                                                        "requests waiting); try again later"))
            return
        fields = {k: header[k] for k in ("prompt", "seed", "steps", "samples")}
        job = Job(client, rid, seconds=float(header["seconds"]), guidance=float(header["guidance"]), **fields)
        ahead = len(self._pending) + (self._active is not None)
        self._pending.append(job)
        self._send(client, encode({"type": "accepted", "id": rid, "queue": ahead}))

    def _dispatch(self) -> None:
        """Hand the oldest waiting request, plus compatible ones when batching, to an idle worker."""
        if self._active is not None or not self._pending:
            return
        first = self._pending[0]
        jobs, size = [], 0
        for job in self._pending if self.batch else [first]:
            if job.key == first.key and size + job.samples <= max(self.max_batch, first.samples):
                jobs.append(job)
                size += job.samples
        self._pending = [job for job in self._pending if job not in jobs]
        self._active = Batch(jobs)
        self._todo.put(self._active)

    def _on_event(self, event: tuple) -> None:
        kind, batch, *args = event
        if kind == "progress":
            step, total = args
            for job in batch.jobs:
                if not job.finished:
                    self._send(job.client, encode({"type": "progress", "id": job.id, "step": step, "total": total}))
        elif kind == "frames":
            job, sample, start, data = args
            if not job.finished:
                self._send(job.client, encode({"type": "frames", "id": job.id, "sample": sample, "start": start,
                                               "count": len(data)}, data))
        elif kind == "cancelled":
            job, step = args
            self._finish(job, error_reply(job.id, "cancelled", f"cancelled after denoising step {step} (the "
                                          f"cancel arrived after step {job.cancel_step})", step=step,
                                          cancel_step=job.cancel_step))
        elif kind == "done":
            frames, generate_s = args
            for job in batch.jobs:
                timings = {"queued_s": batch.started - job.received, "generate_s": generate_s,
                           "total_s": time.perf_counter() - job.received, "batch": len(batch.jobs)}
                self._finish(job, encode({"type": "done", "id": job.id, "frames": frames, "timings": timings}))
            self._active = None
        elif kind == "failed":
            (message,) = args
            for job in batch.jobs:
                self._finish(job, error_reply(job.id, "internal", message))
            self._active = None

    # -- worker side -------------------------------------------------------------------------------------
    def _work(self) -> None:
        doorbell = self._context.socket(zmq.PAIR)
        doorbell.connect(self._doorbell_address)

        def emit(*event: Any) -> None:
            self._events.put(event)
            with contextlib.suppress(zmq.Again):  # a full doorbell already says "events waiting"
                doorbell.send(b"", zmq.NOBLOCK)

        try:
            while (batch := self._todo.get()) is not None:
                self._run(batch, emit)
        finally:
            doorbell.close(linger=0)

    def _run(self, batch: Batch, emit: Any) -> None:
        jobs = batch.jobs
        first = jobs[0]

        def check_cancel() -> None:
            for job in jobs:
                if job.cancel_requested and not job.cancel_reported:
                    job.cancel_reported = True
                    emit("cancelled", batch, job, batch.step)
            if all(job.cancel_requested for job in jobs):
                raise Cancelled

        def callback(step: int, total: int) -> None:
            batch.step = step
            emit("progress", batch, step, total)
            check_cancel()

        batch.started = time.perf_counter()
        frames = 0
        try:
            check_cancel()
            stream = self.pipe.stream([job.prompt for job in jobs], seconds=first.seconds,
                                      seed=[job.seed for job in jobs], guidance=first.guidance, steps=first.steps,
                                      samples=first.samples, callback=callback)
            for index, start, chunk in stream:
                check_cancel()
                job, sample = jobs[index // first.samples], index % first.samples
                if not job.cancel_requested:
                    emit("frames", batch, job, sample, start, pack_motion(chunk.root_translation, chunk.rotations))
                if index == 0:
                    frames = max(frames, start + len(chunk.root_translation))
            emit("done", batch, frames, time.perf_counter() - batch.started)
        except Cancelled:
            emit("failed", batch, "cancelled")  # every job already got its own 'cancelled' error
        except Exception as exc:  # the model failed on this input: tell its clients, keep serving
            log.exception("generation failed")
            emit("failed", batch, f"generation failed: {type(exc).__name__}: {exc}")


def _skeleton_json() -> dict[str, Any]:
    from backend.skeleton import SMPL22

    return SMPL22.to_json()


def load_pipeline(checkpoint: str | None, config: str | None, device: str) -> Any:
    """The pipeline the server holds: random weights of a config (tests), or a checkpoint."""
    from backend.pipeline import MotionPipeline

    if config is not None:
        return MotionPipeline.random(config=config, device=device, seed=0)
    return MotionPipeline.from_checkpoint(checkpoint, device=device)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")
    if argv[:1] == ["keygen"]:
        parser = argparse.ArgumentParser(prog="python -m backend.serve keygen",
                                         description="Create CurveZMQ keys for a non-loopback server.")
        parser.add_argument("directory")
        parser.add_argument("--client", action="append", help="client key pair name(s) (default: client)")
        args = parser.parse_args(argv[1:])
        directory = keygen(args.directory, tuple(args.client or ["client"]))
        print(f"keys in {directory}: start the server with --keys {directory}; give each client server.key and "
              f"its <name>.key_secret")
        return 0
    parser = argparse.ArgumentParser(prog="python -m backend.serve", description=__doc__.split("\n\n")[0],
                                     epilog="Keys for a non-loopback address: python -m backend.serve keygen DIR")
    parser.add_argument("--bind", default=DEFAULT_ENDPOINT, help=f"ZeroMQ endpoint (default {DEFAULT_ENDPOINT}; "
                        "tcp://127.0.0.1:* picks a free port)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped weights)")
    parser.add_argument("--config", default=None, help="serve random weights of configs/<CONFIG>.json (tests)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before 'busy' (default 32)")
    parser.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                        help="run compatible waiting requests as one denoising pass")
    parser.add_argument("--keys", default=None, help="CurveZMQ key folder from `keygen` (required off loopback)")
    args = parser.parse_args(argv)
    try:
        check_bind(args.bind, args.keys)  # before spending time on the model
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.checkpoint, args.config, args.device)
    server = Server(pipe, args.bind, keys=args.keys, max_queue=args.max_queue, batch=args.batch)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    log.info("serving %s on %s (device %s, batching %s, %s)", pipe.describe().get("model", "model"),
             server.endpoint, pipe.device, "on" if args.batch else "off",
             "CurveZMQ" if args.keys else "loopback, no authentication")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
