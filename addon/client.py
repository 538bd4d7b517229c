"""The client of the generation backend: one DEALER connection, and a handle per generate request.

    with MotionClient("tcp://127.0.0.1:5557") as client:
        gen = client.start(GenerateRequest("a person walks", seconds=2.0), on_progress=print)
        motion = gen.result()                       # or, in a Blender timer: client.poll() until gen.finished

``MotionClient.poll()`` drives every handle (``Generation``): its callbacks (accepted, progress, frames, done,
error) run from inside ``poll`` as the replies arrive, and the handle keeps the state (step, motion, error).
The protocol itself (schema, framing, validation) is ``addon.wire``. Standard library, numpy and pyzmq only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .wire import (
    DEFAULT_ENDPOINT,
    DEFAULT_LIMITS,
    HANDSHAKE_FAILED,
    PROTOCOL_VERSION,
    REPLY_LIMITS,
    GeneratedMotion,
    GenerateRequest,
    Limits,
    Message,
    MotionAssembler,
    WireError,
    decode,
    is_ipv6,
    request,
)


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys for a client: the server's public key and this client's key pair (z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_dir(cls, directory: str | Path, client: str = "client") -> CurveKeys:
        """Keys as written by ``python -m backend.serve keygen DIR``: DIR/server.key and
        DIR/<client>.key_secret."""
        import zmq.auth

        directory = Path(directory)
        server_public, _ = zmq.auth.load_certificate(directory / "server.key")
        public, secret = zmq.auth.load_certificate(directory / f"{client}.key_secret")
        if secret is None:
            raise ValueError(f"{directory / (client + '.key_secret')} holds no secret key")
        return cls(server_public, public, secret)


def as_request(prompt: str | GenerateRequest, *args: Any, **fields: Any) -> GenerateRequest:
    """A GenerateRequest as given, or built from its fields in their order (prompt, seconds, seed, ...)."""
    if isinstance(prompt, GenerateRequest):
        if args or fields:
            raise TypeError("give a GenerateRequest or its fields, not both")
        return prompt
    return GenerateRequest(prompt, *args, **fields)


def handshake_failure(event: dict[str, Any], endpoint: str) -> str:
    """A readable reason for a failed ZeroMQ handshake (a socket monitor event)."""
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"{endpoint} refused this client's CurveZMQ key (status {event['value']}): ask the server's "
                "operator to authorize it (keygen) or use the right key folder")
    return (f"the security handshake with {endpoint} failed (a missing, wrong or unexpected CurveZMQ key; "
            f"zmq error {event['value']})")


class ServerError(RuntimeError):
    """The server answered a request with ``error``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Refused(ServerError, ConnectionRefusedError):
    """The server refused this client's handshake (CurveZMQ keys wrong, unknown or missing)."""

    def __init__(self, message: str):
        super().__init__("unauthorized", message)


@dataclass(eq=False)
class Generation:
    """One generate request in flight: a handle driven by ``MotionClient.poll()`` (like a future).

    Its callbacks run inside ``poll`` as replies arrive: ``on_progress(gen)`` after each denoising step,
    ``on_frames(gen, message)`` per ``frames`` message (``message["sample"]``, ``["start"]``, ``.data``),
    ``on_done(gen)`` with ``gen.motion`` reassembled, ``on_error(gen)`` with ``gen.error`` set (a server error,
    a cancel, or the client's ``timeout`` / ``disconnected`` / ``unauthorized``). An exception a callback raises
    propagates out of ``poll``."""

    id: str
    request: GenerateRequest
    client: MotionClient
    on_progress: Callable[[Generation], None] | None = None
    on_frames: Callable[[Generation, Message], None] | None = None
    on_done: Callable[[Generation], None] | None = None
    on_error: Callable[[Generation], None] | None = None
    queue: int | None = None  # requests ahead of this one when the server accepted it
    coverage: dict | None = None  # how close the prompt is to the model's training captions (if it says)
    step: int = 0
    total: int = 0
    motion: GeneratedMotion | None = None
    error: ServerError | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _assembler: MotionAssembler = field(default_factory=MotionAssembler)

    @property
    def finished(self) -> bool:
        return self.motion is not None or self.error is not None

    @property
    def progress(self) -> float:
        """Denoising progress, 0..1."""
        return self.step / self.total if self.total else 0.0

    def cancel(self) -> None:
        """Ask the server to stop; the handle then ends with ``error`` code ``cancelled``."""
        if not self.finished:
            self.client.cancel(self.id)

    def result(self, timeout: float | None = None) -> GeneratedMotion:
        """Poll the client until this request is finished; returns the motion or raises its ServerError
        (TimeoutError after ``timeout`` seconds, if given)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            self.client._inbox.extend(m for m in self.client.poll(0.05) if m.id != self.id)  # kept for others
        if self.error is not None:
            raise self.error
        return self.motion

    def _handle(self, message: Message) -> None:
        """Apply one reply of this request (called by ``poll``)."""
        if message.type == "accepted":
            self.queue = message["queue"]
            self.coverage = message.get("coverage")
        elif message.type == "progress":
            self.step, self.total = message["step"], message["total"]
            if self.on_progress is not None:
                self.on_progress(self)
        elif message.type == "frames":
            self._assembler.add(message)
            if self.on_frames is not None:
                self.on_frames(self, message)
        elif message.type == "done":
            try:
                self.motion = self._assembler.result(message["frames"], message["timings"])
            except WireError as exc:
                self.error = ServerError("bad_request", f"unusable reply: {exc}")
            else:
                if self.on_done is not None:
                    self.on_done(self)
                return
        elif message.type == "error":
            self.error = ServerError(message["code"], message["message"])
        if self.error is not None and self.on_error is not None:
            self.on_error(self)


class MotionClient:
    """DEALER client of the generation backend.

    Non-blocking use (Blender timers): ``gen = client.start(request, on_frames=...)`` (or ``rid =
    client.submit(...)``), then call ``client.poll()`` from a timer; it drives every ``Generation`` handle,
    returns the messages that have arrived (``accepted``, ``progress``, ``frames``, ``done``, ``error``) and
    never blocks. Blocking use (scripts, tests): ``hello()``, ``ping()``, ``start(...).result()``,
    ``generate()`` (an iterator of messages) and ``generate_motion()`` (the reassembled result).

    Liveness: while requests are in flight, ``poll`` pings the server after ``ping_interval`` seconds of
    silence; after ``timeout`` seconds without any message, or when the connection drops, every in-flight
    request ends with a client-side ``error`` (code ``timeout`` / ``disconnected``) and the socket is
    recreated, so the client keeps working once the server is back (e.g. after a restart).
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 10.0, ping_interval: float = 1.0,
                 curve: CurveKeys | None = None, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.curve = curve
        self.limits = DEFAULT_LIMITS
        self.server: dict[str, Any] | None = None  # the last hello reply (poll() keeps it up to date)
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._inbox: deque[Message] = deque()
        self._in_flight: dict[str, float] = {}  # generate ids -> submit time
        self._handles: dict[str, Generation] = {}  # requests started with start()
        self._last_heard = time.monotonic()
        self._last_ping = 0.0
        self._keepalive_pings: set[str] = set()
        self.refused = ""  # why the server refused this client's handshake (keys), if it did
        self._dropped = False
        self.connect()

    # -- connection -------------------------------------------------------------------------------------
    def connect(self) -> None:
        """(Re)create the DEALER socket and connect; stale replies of an old connection are dropped."""
        self.close()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, REPLY_LIMITS.max_message_bytes)
        sock.setsockopt(zmq.IPV6, is_ipv6(self.endpoint))
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        sock.connect(self.endpoint)
        self._socket = sock
        self._last_heard = time.monotonic()
        self._dropped, self.refused = False, ""

    def close(self) -> None:
        """Close the socket (pending requests are forgotten)."""
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._monitor.close(linger=0)
            self._socket = self._monitor = None
        self._inbox.clear()
        self._in_flight.clear()
        self._handles.clear()

    def __enter__(self) -> MotionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ----------------------------------------------------------------------------------------
    def _send(self, frames: list[bytes]) -> None:
        size = sum(len(f) for f in frames)
        if size > self.limits.max_message_bytes:
            raise ValueError(f"message is {size} bytes; the server accepts at most "
                             f"{self.limits.max_message_bytes}")
        try:
            self._socket.send_multipart(frames)
        except zmq.Again:
            self._watch_connection()
            if self.refused:
                raise Refused(self.refused) from None
            raise ConnectionError(f"could not send to {self.endpoint} within {self.timeout} s") from None

    def submit(self, prompt: str | GenerateRequest, *args: Any, request_id: str | None = None,
               motion: np.ndarray | None = None, **fields: Any) -> str:
        """Send a ``generate`` request without waiting; returns its id. Takes a GenerateRequest, or its fields
        (``submit("walk", 2.0, steps=10)``); an ``edit`` request also takes the ``motion`` it edits
        (``pack_motion``'s (T, 3 + 4J) layout, in the skeleton and frame rate of ``hello``). Bad arguments raise
        ValueError (WireError)."""
        generate = as_request(prompt, *args, **fields)
        rid, frames = request("generate", request_id, self.limits, data=motion, **generate.to_header())
        if not self._in_flight:  # the silence clock and old connection events start over
            self._last_heard = time.monotonic()
            self._watch_connection()
            self._dropped = False
        self._send(frames)
        self._in_flight[rid] = time.monotonic()
        return rid

    def start(self, prompt: str | GenerateRequest, *args: Any, request_id: str | None = None,
              on_progress: Callable[[Generation], None] | None = None,
              on_frames: Callable[[Generation, Message], None] | None = None,
              on_done: Callable[[Generation], None] | None = None,
              on_error: Callable[[Generation], None] | None = None, motion: np.ndarray | None = None,
              **fields: Any) -> Generation:
        """Send a ``generate`` request (as ``submit``) and return its handle; ``poll`` drives it."""
        generate = as_request(prompt, *args, **fields)
        rid = self.submit(generate, request_id=request_id, motion=motion)
        handle = Generation(rid, generate, self, on_progress, on_frames, on_done, on_error)
        self._handles[rid] = handle
        return handle

    def cancel(self, request_id: str) -> None:
        """Ask the server to stop a request; its stream then ends with ``error`` code ``cancelled``."""
        self._send(request("cancel", request_id)[1])

    # -- receiving --------------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> list[Message]:
        """Messages that have arrived (waiting at most ``timeout`` seconds for the first); never raises on
        server trouble: in-flight requests end with a client-side ``error`` message instead."""
        out = list(self._inbox)
        self._inbox.clear()
        if not out:
            self._socket.poll(int(timeout * 1000), zmq.POLLIN)
        new: list[Message] = []
        while self._socket.poll(0, zmq.POLLIN):
            frames = self._socket.recv_multipart()
            self._last_heard = time.monotonic()
            try:
                message = decode(frames, reply=True, limits=REPLY_LIMITS)
            except WireError as exc:  # a broken reply: fail the request it names, if any
                if exc.request_id is None:
                    continue
                message = Message({"type": "error", "id": exc.request_id, "version": PROTOCOL_VERSION,
                                   "code": "bad_request", "message": f"unreadable reply: {exc}"})
            if message.type in ("done", "error"):
                self._in_flight.pop(message.id, None)
            if message.type == "hello":  # also when hello() gave up waiting: the reply still counts
                self.server = message.header
                self.limits = Limits.from_json(message["limits"])
            if message.type == "pong" and message.id in self._keepalive_pings:
                self._keepalive_pings.discard(message.id)
                continue
            new.append(message)
        failed = self._liveness()
        for message in new + failed:  # the handles see each message once (the inbox holds ones already seen)
            handle = self._handles.get(message.id)
            if handle is not None:
                if message.type in ("done", "error"):
                    del self._handles[message.id]
                handle._handle(message)
        if failed:
            self.connect()  # a fresh socket: the client works again once the server is back
        return out + new + failed

    def _watch_connection(self) -> None:
        """Drain the socket monitor: a dropped connection sets ``_dropped``; a failed handshake (the server
        refused our keys, or wants keys we lack) is kept in ``refused``."""
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor.poll(0, zmq.POLLIN):
            event = parse_monitor_message(self._monitor.recv_multipart())
            if event["event"] & HANDSHAKE_FAILED:
                self.refused = handshake_failure(event, self.endpoint)
            self._dropped = True

    def _liveness(self) -> list[Message]:
        """Client-side errors for in-flight requests when the connection dropped or the server went silent
        (``poll`` then delivers them and reconnects)."""
        self._watch_connection()
        dropped, self._dropped = self._dropped, False
        now = time.monotonic()
        silent = now - self._last_heard
        if not self._in_flight:
            return []
        if dropped or silent > self.timeout:
            code, text = ("timeout", f"no reply from {self.endpoint} for {silent:.1f} s")
            if dropped:
                code, text = ("unauthorized", self.refused) if self.refused else \
                    ("disconnected", f"lost the connection to {self.endpoint}")
            return [Message({"type": "error", "id": rid, "version": PROTOCOL_VERSION, "code": code,
                             "message": text}) for rid in self._in_flight]
        if silent > self.ping_interval and now - self._last_ping > self.ping_interval:
            self._last_ping = now
            rid, frames = request("ping")
            self._keepalive_pings.add(rid)
            self._send(frames)
        return []

    def _wait_for(self, request_id: str, types: tuple[str, ...], timeout: float | None) -> Message:
        """Block until the reply ``types`` (or an error) for ``request_id`` arrives; others stay queued."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        kept: list[Message] = []
        try:
            while True:
                for message in self.poll(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
                    if message.id == request_id and message.type in (*types, "error"):
                        if message.type == "error":
                            raise ServerError(message["code"], message["message"])
                        return message
                    kept.append(message)
                self._watch_connection()
                if self.refused:
                    raise Refused(self.refused)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no '{types[0]}' reply from {self.endpoint} within "
                                       f"{self.timeout if timeout is None else timeout} s")
        finally:
            self._inbox.extend(kept)

    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server who it is; returns the ``hello`` reply (model, device, fps, skeleton, limits)."""
        rid, frames = request("hello")
        self._send(frames)
        return self._wait_for(rid, ("hello",), timeout).header  # poll() stored it in .server and .limits

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's state: ``{"queued": waiting requests, "running": requests being generated,
        "rtt_s": round-trip time in seconds}``."""
        rid, frames = request("ping")
        start = time.monotonic()
        self._send(frames)
        pong = self._wait_for(rid, ("pong",), timeout)
        return {"queued": pong["queued"], "running": pong["running"], "rtt_s": time.monotonic() - start}

    def generate(self, prompt: str | GenerateRequest, *args: Any,
                 on_message: Callable[[Message], None] | None = None, **fields: Any) -> Iterator[Message]:
        """Submit a request (as ``submit``) and yield its messages up to and including ``done``; an ``error``
        reply raises ServerError (after being passed to ``on_message``). Closing the iterator early cancels."""
        rid = self.submit(prompt, *args, **fields)
        finished = False
        kept: list[Message] = []
        try:
            while not finished:
                for message in self.poll(timeout=0.05):
                    if message.id != rid or message.type in ("hello", "pong"):
                        kept.append(message)
                        continue
                    if on_message is not None:
                        on_message(message)
                    if message.type == "error":
                        finished = True
                        raise ServerError(message["code"], message["message"])
                    finished = message.type == "done"
                    yield message
        finally:
            self._inbox.extend(kept)
            if not finished and rid in self._in_flight:
                self._in_flight.pop(rid, None)
                self.cancel(rid)

    def generate_motion(self, prompt: str | GenerateRequest, *args: Any,
                        on_message: Callable[[Message], None] | None = None, **fields: Any) -> GeneratedMotion:
        """Generate (as ``submit``) and reassemble the whole motion (all samples); raises ServerError /
        WireError."""
        assembler = MotionAssembler()
        for message in self.generate(prompt, *args, on_message=on_message, **fields):
            if message.type == "frames":
                assembler.add(message)
            elif message.type == "done":
                return assembler.result(message["frames"], message["timings"])
        raise WireError("the stream ended without 'done'")


# ---------------------------------------------------------------------------------------------------------
# A local backend process


def cache_dir() -> Path:
    """Motion Mamba's folder in the user's cache, created 0700: $XDG_CACHE_HOME (or ~/.cache) on Linux,
    ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "motion_mamba"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if sys.platform != "win32":
        folder.chmod(0o700)  # also when it existed with looser permissions
    return folder


def default_log() -> Path:
    """Where a local backend started by ``start_backend`` logs unless told otherwise."""
    return cache_dir() / "backend.log"


def start_backend(endpoint: str, python: str = "", project: str | Path = "", arguments: tuple[str, ...] = (),
                  log_file: str | Path = "") -> subprocess.Popen:
    """Run ``python -m backend.serve --bind ENDPOINT --log-file LOG [arguments]`` in ``project``. The server
    logs to LOG (size-capped and rotated; default ``default_log()``; never through a symbolic link); its errors
    and crash output go to LOG's ``.err`` sibling, truncated at each start. ``backend_output(LOG)`` reads them
    back."""
    log = Path(log_file) if log_file else default_log()
    if log.is_symlink():
        raise OSError(f"{log} is a symbolic link: the backend's log is not written through one")
    command = [python or sys.executable, "-m", "backend.serve", "--bind", endpoint, "--log-file", str(log),
               *arguments]
    fd = os.open(log.with_suffix(".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    with os.fdopen(fd, "wb") as err:
        return subprocess.Popen(command, cwd=project or None, stdout=subprocess.DEVNULL, stderr=err)


def backend_output(log_file: str | Path, lines: int = 15) -> str:
    """The last ``lines`` lines a backend started by ``start_backend`` wrote: its errors, else its log."""
    for path in (Path(log_file).with_suffix(".err"), Path(log_file)):
        if path.is_file() and path.stat().st_size:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""

