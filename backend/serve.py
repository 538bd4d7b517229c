"""The generation backend: one long-lived process that holds the model and serves it over ZeroMQ.

    python -m backend.serve [--bind tcp://127.0.0.1:5557] [--checkpoint DIR | --config tiny]
                            [--device auto|cpu|cuda] [--max-queue N] [--max-client-queue N] [--max-cost N]
                            [--batch/--no-batch] [--keys DIR] [--log-file FILE]
    python -m backend.serve keygen DIR [--client NAME ...]

A ROUTER socket speaks the protocol of ``addon.wire``. The socket loop (main thread) never waits on the
model: one worker thread runs the pipeline and hands events back through a queue plus an inproc "doorbell"
socket, so ``ping`` and ``cancel`` are answered mid-generation. Requests wait in a bounded queue (a full queue
answers ``busy``), of which one client may hold ``--max-client-queue``; clients take turns (round robin), and
one request may cost at most ``--max-cost`` frames x samples x steps (both announced in ``hello``). Compatible
requests (same seconds, steps, guidance, samples) waiting together run as one batched denoising pass; if a
batch fails, each of its requests is retried alone, so one bad request never fails another.

Protection: a request is one frame; a message of more frames is read and released frame by frame (never joined)
and answered ``bad_request``, as is one over ``max_message_bytes``; a single frame over twice that is dropped
by the transport (ZMQ_MAXMSGSIZE). Each client's send queue is bounded (a client that stops reading loses its
requests). Loopback binds (127.0.0.0/8, [::1]) serve as is; any other address needs CurveZMQ keys
(``keygen``), and then only clients whose public key is in DIR/authorized get through; rejected handshakes are
logged. Replies never carry an absolute path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import itertools
import logging
import logging.handlers
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from addon.wire import (
    DEFAULT_ENDPOINT,
    HANDSHAKE_FAILED,
    GenerateRequest,
    Limits,
    Message,
    WireError,
    decode,
    error_reply,
    is_ipv6,
    pack_motion,
    recv_bounded,
    reply,
    sniff_id,
    truncate,
    unpack_motion,
)

log = logging.getLogger("backend.serve")
SEND_QUEUE = 1000  # messages queued for one client before it counts as not reading (ZMQ_SNDHWM)
SEND_BUFFER = 256 * 1024  # bytes of kernel send buffer per connection (SO_SNDBUF)
EDIT_CHUNK = 200  # frames per 'frames' message of an edit's result
LOG_BYTES, LOG_FILES = 1_000_000, 3  # --log-file rotates at this size and keeps this many old files


@dataclass(eq=False)
class Job:
    """One accepted ``generate`` request."""

    client: bytes  # ROUTER routing id
    id: str
    request: GenerateRequest
    received: float = field(default_factory=time.perf_counter)
    motion: tuple | None = None  # an edit's (root translation, rotations), frames appended for a continuation
    cancel_requested: bool = False  # set by the socket loop, read by the worker
    cancel_step: int = 0  # the denoising steps finished when the cancel arrived
    cancel_reported: bool = False  # worker side
    finished: bool = False  # socket loop side: the client got done/error, send nothing more

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one denoising pass."""
        r = self.request
        if r.edit is not None:  # an edit runs alone
            return (self.id,)
        return (r.seconds, r.steps, r.guidance, r.samples, r.timeline)


@dataclass(eq=False)
class Batch:
    """The jobs of one denoising pass; ``step`` is written by the worker as it goes."""

    jobs: list[Job]
    step: int = 0
    started: float = field(default_factory=time.perf_counter)
    streamed: bool = False  # worker side: frames went out (a failure can no longer be retried)


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
    copied into ``directory/authorized``. Give ``<client>.key_secret`` and ``server.key`` to that client.
    Folders are 0700 and every file is created 0600 under a temporary name, then renamed: no secret is ever
    readable by another user, not even for a moment."""
    directory = Path(directory)
    authorized = directory / "authorized"
    for folder in (directory, authorized):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    if not (directory / "server.key_secret").exists():
        _write_key_pair(directory, "server")
    for name in clients:
        public = _write_key_pair(directory, name)
        _write_private(authorized / f"{name}.key", _certificate(public))
    return directory


def _certificate(public: bytes, secret: bytes | None = None) -> str:
    """A ZeroMQ certificate file's text (the format ``zmq.auth.load_certificate`` reads)."""
    kind = "Secret" if secret else "Public"
    text = (f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by backend.serve keygen  ****\n"
            f"#   ZeroMQ CURVE {kind} Certificate\n\nmetadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    return text + (f"    secret-key = \"{secret.decode()}\"\n" if secret else "")


def _write_key_pair(directory: Path, name: str) -> bytes:
    """Write ``name.key`` (public) and ``name.key_secret``; returns the public key."""
    public, secret = zmq.curve_keypair()
    _write_private(directory / f"{name}.key", _certificate(public))
    _write_private(directory / f"{name}.key_secret", _certificate(public, secret))
    return public


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from its first byte (O_EXCL temporary file, then an atomic rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Server:
    """The ROUTER server around one loaded pipeline. ``serve_forever()`` in one thread, ``stop()`` from any."""

    def __init__(self, pipe: Any, bind: str = DEFAULT_ENDPOINT, *, keys: str | Path | None = None,
                 max_queue: int = 32, max_client_queue: int | None = None, max_cost: int | None = None,
                 batch: bool = True, max_batch: int = 16, context: zmq.Context | None = None):
        check_bind(bind, keys)
        self.pipe = pipe
        self.batch = batch
        self.max_batch = max_batch
        defaults = Limits()
        self.limits = Limits(max_seconds=float(pipe.max_seconds), max_queue=max_queue,
                             max_client_queue=max_client_queue or max(1, max_queue // 4),
                             max_cost=max_cost or defaults.max_cost, fps=float(pipe.fps))
        skeleton = _skeleton_json()
        self._joints = len(skeleton["joint_names"])  # an edit's motion has 3 + 4 x this many columns
        self._hello = {"model": pipe.describe(), "device": str(pipe.device), "fps": float(pipe.fps),
                       "skeleton": skeleton, "limits": self.limits.to_json(),
                       "defaults": GenerateRequest.defaults()}
        captions = getattr(pipe, "captions", None)  # what the model was trained on, when its checkpoint says
        if captions is not None:
            self._hello["actions"] = list(captions.actions)
        self._context = context or zmq.Context.instance()
        self._auth: ThreadAuthenticator | None = None
        self._router = self._make_router(bind, keys)
        self._auth_monitor = self._router.get_monitor_socket(HANDSHAKE_FAILED) if keys is not None else None
        self._refused, self._refused_logged = 0, 0.0
        self._quiet: dict[bytes, float] = {}  # clients found unreachable -> when (their log lines are muted)
        self._turns: list[bytes] = []  # clients with waiting requests, in the order they are served
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
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.limits.max_message_bytes)  # larger frames: dropped unread
        sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        sock.setsockopt(zmq.RCVHWM, SEND_QUEUE)
        sock.setsockopt(zmq.SNDBUF, SEND_BUFFER)
        sock.setsockopt(zmq.IPV6, is_ipv6(bind))
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
        for attempt in range(100):  # a server stopped just now in this context may still hold the ZAP address
            auth = ThreadAuthenticator(self._context)
            try:
                auth.start()
                break
            except zmq.ZMQError as exc:
                auth.zap_socket.close(linger=0)
                if exc.errno != zmq.EADDRINUSE or attempt == 99:
                    raise
                time.sleep(0.02)
        self._auth = auth
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
        if self._auth_monitor is not None:
            poller.register(self._auth_monitor, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(0 if not self._events.empty() else 100))
                if self._doorbell in ready:
                    while self._doorbell.poll(0):
                        self._doorbell.recv()
                if self._auth_monitor is not None and self._auth_monitor in ready:
                    self._log_refused()
                for _ in range(1000):  # worker events first: they free the worker
                    try:
                        self._on_event(self._events.get_nowait())
                    except queue.Empty:
                        break
                for _ in range(100):
                    if not self._router.poll(0, zmq.POLLIN):
                        break
                    frames, count = recv_bounded(self._router, 3)  # routing id + at most 2 to name the error
                    try:
                        self._on_request(frames[0], frames[1:], count - 1)
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
        if self._auth_monitor is not None:
            self._router.disable_monitor()
            self._auth_monitor.close(linger=0)
        self._router.close(linger=1000)
        self._doorbell.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        log.info("stopped")

    # -- socket side -------------------------------------------------------------------------------------
    def _log_refused(self) -> None:
        """Log clients whose security handshake failed (at most one line a second, with a count)."""
        while self._auth_monitor.poll(0):
            event = parse_monitor_message(self._auth_monitor.recv_multipart())
            self._refused += 1
            if time.monotonic() - self._refused_logged > 1.0:
                self._refused_logged = time.monotonic()
                reason = ("key not authorized" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                          else f"handshake failed (missing or wrong CurveZMQ keys, zmq error {event['value']})")
                log.warning("refused a client on %s: %s (%d refused so far)", self.endpoint, reason,
                            self._refused)

    def _send(self, client: bytes, frames: list[bytes]) -> bool:
        """Send to one client; a client that vanished (or stopped reading: its send queue is full) loses its
        requests, nothing else."""
        try:
            self._router.send_multipart([client, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            now = time.monotonic()
            if now - self._quiet.get(client, -60.0) > 10.0:  # one line per client per 10 s
                log.info("client %s unreachable or not reading (%s): dropping its requests", client.hex(),
                         exc.strerror)
            self._quiet = {c: t for c, t in self._quiet.items() if now - t < 10.0} | {client: now}
            self._drop_client(client)
            return False

    def _finish(self, job: Job, frames: list[bytes]) -> None:
        if not job.finished:
            job.finished = True
            self._send(job.client, frames)

    def _drop_client(self, client: bytes) -> None:
        self._pending = [job for job in self._pending if job.client != client]
        if client in self._turns:
            self._turns.remove(client)
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

    def _on_request(self, client: bytes, frames: list[bytes], count: int) -> None:
        """One request of ``count`` frames (``frames`` holds at most the first two)."""
        try:
            if count > 2:
                raise WireError(f"message has {count} frames; a request is one frame", request_id=sniff_id(frames[0]))
            message = decode(frames, reply=False, limits=self.limits)
        except WireError as exc:
            log.info("bad request from %s: %s", client.hex(), exc)
            self._send(client, error_reply(exc.request_id, exc.code, str(exc)))
            return
        rid = message.id
        if message.type == "hello":
            self._send(client, reply("hello", rid, **self._hello))
        elif message.type == "ping":
            running = sum(not job.finished for job in self._active.jobs) if self._active else 0
            self._send(client, reply("pong", rid, queued=len(self._pending), running=running))
        elif message.type == "cancel":
            self._cancel(client, rid)
        else:
            self._submit(client, message)

    def _cancel(self, client: bytes, rid: str) -> None:
        """Cancel a queued request at once, a running one after its current denoising step; unknown or
        finished ids are ignored (the request may have just completed)."""
        job = self._find(client, rid)
        if job is None:
            return
        if job in self._pending:
            self._pending.remove(job)
            if not any(j.client == client for j in self._pending):
                self._turns.remove(client)
            self._finish(job, error_reply(rid, "cancelled", "cancelled before it started", step=0,
                                          cancel_step=0))
        elif not job.cancel_requested:
            self._request_cancel(job)

    def _submit(self, client: bytes, message: Message) -> None:
        header, rid = message.header, message.id
        if self._find(client, rid) is not None:
            self._send(client, error_reply(rid, "bad_request", f"request id {rid!r} is already in use"))
            return
        if len(self._pending) >= self.limits.max_queue:
            self._send(client, error_reply(rid, "busy", f"the server's queue is full ({len(self._pending)} "
                                                        "requests waiting); try again later"))
            return
        mine = sum(job.client == client for job in self._pending)
        if mine >= self.limits.max_client_queue:
            self._send(client, error_reply(rid, "busy", f"you have {mine} requests waiting, this client's share "
                                                        "of the queue; try again when one has started"))
            return
        job = Job(client, rid, GenerateRequest.from_header(header))
        if job.request.edit is not None:
            try:
                job.motion = edit_motion(message.data, job.request.edit, self._joints)
            except ValueError as exc:
                self._send(client, error_reply(rid, "bad_request", str(exc)))
                return
        ahead = len(self._pending) + (self._active is not None)
        self._pending.append(job)
        if client not in self._turns:
            self._turns.append(client)
        coverage = None
        if getattr(self.pipe, "captions", None):  # a timeline: its row least like anything the model saw
            coverage = min((self.pipe.coverage(p) for p in job.request.prompts), key=lambda c: c.similarity)
        extra = {"coverage": coverage.to_wire()} if coverage is not None else {}
        self._send(client, reply("accepted", rid, queue=ahead, **extra))

    def _dispatch(self) -> None:
        """Hand a waiting request to an idle worker: clients take turns (round robin), each giving its oldest;
        when batching, compatible requests join it, taken one per client per round."""
        if self._active is not None or not self._pending:
            return
        client = self._turns.pop(0)
        waiting = {c: [job for job in self._pending if job.client == c] for c in [client, *self._turns]}
        first = waiting[client][0]
        jobs, size = [first], first.request.samples
        compatible = [[job for job in queue if job is not first and job.key == first.key]
                      for queue in waiting.values()] if self.batch else []
        for job in itertools.chain.from_iterable(itertools.zip_longest(*compatible)):
            if job is not None and size + job.request.samples <= self.max_batch:
                jobs.append(job)
                size += job.request.samples
        self._pending = [job for job in self._pending if job not in jobs]
        left = {job.client for job in self._pending}
        self._turns = [c for c in self._turns if c in left] + ([client] if client in left else [])
        self._active = Batch(jobs)
        self._todo.put(self._active)

    def _on_event(self, event: tuple) -> None:
        kind, batch, *args = event
        if kind == "progress":
            jobs, step, total = args
            for job in jobs:
                if not job.finished:
                    self._send(job.client, reply("progress", job.id, step=step, total=total))
        elif kind == "frames":
            job, sample, start, data = args
            if not job.finished:
                self._send(job.client, reply("frames", job.id, data, sample=sample, start=start, count=len(data)))
        elif kind == "cancelled":
            job, step = args
            self._finish(job, error_reply(job.id, "cancelled", f"cancelled after denoising step {step} (the "
                                          f"cancel arrived after step {job.cancel_step})", step=step,
                                          cancel_step=job.cancel_step))
        elif kind == "done":
            jobs, frames, generate_s = args
            for job in jobs:
                timings = {"queued_s": batch.started - job.received, "generate_s": generate_s,
                           "total_s": time.perf_counter() - job.received, "batch": len(jobs)}
                self._finish(job, reply("done", job.id, frames=frames, timings=timings))
        elif kind == "failed":
            job, message = args
            self._finish(job, error_reply(job.id, "internal", message))
        elif kind == "idle":
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
        """Run one batch. If it fails before any frames went out, each of its requests is retried alone, so a
        request the model cannot take fails only itself."""
        try:
            self._generate(batch, batch.jobs, emit)
        except Exception as exc:
            if len(batch.jobs) > 1 and not batch.streamed:
                log.warning("a batch of %d requests failed (%s): retrying each alone", len(batch.jobs),
                            truncate(f"{type(exc).__name__}: {exc}", 200))
                for job in batch.jobs:
                    try:
                        self._generate(batch, [job], emit)
                    except Exception as alone:
                        self._failed(batch, job, alone, emit)
            else:
                for job in batch.jobs:
                    self._failed(batch, job, exc, emit)
        finally:
            emit("idle", batch)

    @staticmethod
    def _failed(batch: Batch, job: Job, exc: Exception, emit: Any) -> None:
        log.error("generation failed for request %s: %s", job.id, truncate(f"{type(exc).__name__}: {exc}"),
                  exc_info=exc)
        emit("failed", batch, job, f"generation failed: {type(exc).__name__}: {without_folders(str(exc))}")

    def _generate(self, batch: Batch, jobs: list[Job], emit: Any) -> None:
        """Denoise and stream ``jobs`` (compatible requests of ``batch``) as one pass; exceptions propagate.
        Cancels are local checks: the pipeline asks ``all_cancelled`` before each step and window."""

        def all_cancelled() -> bool:
            for job in jobs:
                if job.cancel_requested and not job.cancel_reported:
                    job.cancel_reported = True
                    emit("cancelled", batch, job, batch.step)
            return all(job.cancel_requested for job in jobs)

        def progress(step: int, total: int) -> None:
            batch.step = step
            emit("progress", batch, jobs, step, total)

        batch.started = time.perf_counter()
        frames = 0
        samples = jobs[0].request.samples
        if all_cancelled():
            return
        if jobs[0].motion is not None:  # an edit: one job, the whole motion once it is made
            job, request = jobs[0], jobs[0].request
            motion = self.pipe.edit(*job.motion, *request.edit, request.prompt, seed=request.seed,
                                    guidance=request.guidance, steps=request.steps, callback=progress,
                                    stop_when=all_cancelled)
            if motion is None:
                return
            data = pack_motion(motion.root_translation, motion.rotations)
            for start in range(0, len(data), EDIT_CHUNK):
                batch.streamed = True
                emit("frames", batch, job, 0, start, data[start: start + EDIT_CHUNK])
            emit("done", batch, jobs, len(data), time.perf_counter() - batch.started)
            return
        for index, start, chunk in self.pipe.stream([job.request for job in jobs], callback=progress,
                                                    stop=all_cancelled):
            job, sample = jobs[index // samples], index % samples
            if not job.cancel_requested:
                batch.streamed = True
                emit("frames", batch, job, sample, start, pack_motion(chunk.root_translation, chunk.rotations))
            if index == 0:
                frames = max(frames, start + len(chunk.root_translation))
        if not all_cancelled():  # a stream that stopped early: every job already got its own 'cancelled'
            emit("done", batch, jobs, frames, time.perf_counter() - batch.started)


_FOLDERS = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:[\\/])(?:[^\s'\"/\\]+[/\\])*")


def without_folders(text: str) -> str:
    """``text`` with the folders of every absolute path left out (replies never show the server's paths)."""
    return _FOLDERS.sub("", text)


def edit_motion(data: np.ndarray | None, edit: tuple[int, int], joints: int) -> tuple[np.ndarray, np.ndarray]:
    """An edit request's motion (T, 3 + 4J) as (root translation, rotations), checked against its range; a
    range that starts at the end continues the motion (its frames are appended). ValueError says what is wrong."""
    if data is None or data.ndim != 2 or data.shape[1] != 3 + 4 * joints:
        raise ValueError(f"an edit carries the motion as (T, {3 + 4 * joints}) float32 data (root translation "
                         f"and {joints} quaternions a frame), got {None if data is None else list(data.shape)}")
    if not np.isfinite(data).all():
        raise ValueError("the motion to edit holds NaN or infinite values")
    start, stop = edit
    frames = data.shape[0]
    if start > frames or (stop > frames and start != frames):
        raise ValueError(f"'edit' [{start}, {stop}] does not fit the {frames} frames sent (a range past the end "
                         f"must start at frame {frames}: a continuation)")
    from backend.editing import with_gap

    root, rotations = unpack_motion(data)
    return with_gap(root, rotations, frames, stop - frames) if stop > frames else (root, rotations)


def _skeleton_json() -> dict[str, Any]:
    from backend.skeleton import SMPL22

    return SMPL22.to_json()


def load_pipeline(checkpoint: str | None, config: str | None, device: str) -> Any:
    """The pipeline the server holds: random weights of a config (tests), or a checkpoint."""
    from backend.pipeline import MotionPipeline

    if config is not None:
        return MotionPipeline.random(config=config, device=device, seed=0)
    return MotionPipeline.from_checkpoint(checkpoint, device=device)


def setup_logging(log_file: str | None) -> None:
    """Log to stderr or, if asked, to a size-capped rotating file (its folder made 0700 if new; stderr then
    gets errors only)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        if Path(log_file).is_symlink():
            raise ValueError(f"the log file {log_file} is a symbolic link: not writing through it")
        Path(log_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers[0].setLevel(logging.ERROR)
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_BYTES, backupCount=LOG_FILES,
                                                             encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s", handlers=handlers, force=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        parser = argparse.ArgumentParser(prog="python -m backend.serve keygen",
                                         description="Create CurveZMQ keys for a non-loopback server.")
        parser.add_argument("directory")
        parser.add_argument("--client", action="append", help="client key pair name(s) (default: client)")
        args = parser.parse_args(argv[1:])
        logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")
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
    parser.add_argument("--max-client-queue", type=int, default=None,
                        help="waiting requests one client may hold (default: a quarter of --max-queue)")
    parser.add_argument("--max-cost", type=int, default=None,
                        help=f"largest request in frames x samples x steps (default {Limits().max_cost})")
    parser.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                        help="run compatible waiting requests as one denoising pass")
    parser.add_argument("--keys", default=None, help="CurveZMQ key folder from `keygen` (required off loopback)")
    parser.add_argument("--log-file", default=None, help=f"also log here, rotated at {LOG_BYTES} bytes, "
                        f"{LOG_FILES} old files kept (the add-on's local backend logs to its cache folder)")
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_bind(args.bind, args.keys)  # before spending time on the model
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.checkpoint, args.config, args.device)
    try:
        server = Server(pipe, args.bind, keys=args.keys, max_queue=args.max_queue,
                        max_client_queue=args.max_client_queue, max_cost=args.max_cost, batch=args.batch)
    except zmq.ZMQError as exc:
        print(f"error: cannot listen on {args.bind}: {exc.strerror} (is another server using this port? "
              "pick another, or tcp://127.0.0.1:* for a free one)", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    security = "CurveZMQ" if args.keys else "loopback, no authentication"
    announce = (f"serving {pipe.describe().get('model', 'model')} on {server.endpoint} (device {pipe.device}, "
                f"batching {'on' if args.batch else 'off'}, {security})")
    log.info(announce)
    if args.log_file:  # stderr carries errors only: say where the server listens there too
        print(f"[serve] {announce}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
