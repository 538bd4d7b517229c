"""The wire between Blender (or any client) and the generation backend: schema, framing, validation.

This module is the one place the protocol lives (the client is ``addon.client``). It imports only the standard
library, numpy and pyzmq, so Blender's Python, the batch tool and the backend all use it.

Framing: every message is a ZeroMQ multipart. Frame 0 is a UTF-8 JSON object (the header) with ``type``,
``id`` and ``version``; ``frames`` replies add frame 1, raw little-endian float32 data whose ``shape`` and
``dtype`` the header gives. Nothing is ever pickled.

Requests (client -> server)             Replies (server -> client, same ``id``)
  hello                                   hello {model, device, fps, skeleton, limits, defaults[, actions]}
  generate {prompt | timeline[, seconds,  accepted {queue[, coverage]}, progress {step, total}*,
            seed, guidance, steps,        frames {sample, start, count, shape, dtype}* + data,
            samples, edit]}[+ data]       done {frames, timings}
  cancel   (id = the request to stop)     (the generate stream ends with error {code: "cancelled"})
  ping                                    pong {queued, running}
  anything wrong                          error {code, message[, step, cancel_step]}

A ``generate`` request is a ``GenerateRequest``: a ``prompt``, or a ``timeline`` ([[start, end, prompt], ...]
in seconds, ``addon.timeline``: one continuous motion as long as its last end); every other field takes the
default announced in ``hello`` (``defaults``), and ``limits`` bound timelines (``max_timeline_rows``,
``max_timeline_seconds``). A bad timeline row gets ``bad_request`` naming the row. ``edit`` ([start, stop]
frames) regenerates that range of a motion the request carries as a data frame (``pack_motion``'s layout, with
``shape`` and ``dtype`` in the header), keeping its other frames exactly; a range starting at the motion's end
continues it, and a client bridges two motions by sending them with placeholder frames between. The reply
streams the whole resulting motion.

A model that knows its training captions announces the actions it was trained on (``actions``, a list of
phrases) and says in ``accepted`` how close the prompt comes to them (``coverage``: {known: bool, similarity:
number, nearest: [[caption, similarity], ...]}; for a timeline, its row least like the training captions). Every
reply is built by ``reply()``/``error_reply()``, which validate it against the schema before it is sent.

A ``frames`` data block is float32 (count, 3 + 4 * J): the root translation (metres, Y up) then one local
rotation quaternion (w, x, y, z) per joint of the skeleton announced in ``hello``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zmq

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DTYPE = "<f4"

REQUEST_TYPES = ("hello", "generate", "cancel", "ping")
REPLY_TYPES = ("hello", "accepted", "progress", "frames", "done", "error", "pong")
ERROR_CODES = (
    "bad_request",  # malformed or out-of-range input; the message says what and why
    "version",  # the client speaks another protocol version
    "busy",  # the server's queue is full; retry later
    "cancelled",  # the client cancelled the request
    "shutting_down",  # the server is stopping
    "internal",  # the model failed; the server keeps serving
    "timeout",  # client side: the server went silent
    "disconnected",  # client side: the connection to the server dropped
    "unauthorized",  # client side: the server refused this client's CurveZMQ keys (or their absence)
)
_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_INT_RANGE = (-(2**53), 2**53)
MAX_ERROR_CHARS = 300  # error texts (replies and log lines) are cut to this length


@dataclass(frozen=True)
class Limits:
    """What the server accepts; it announces its own values in the ``hello`` reply."""

    max_prompt_chars: int = 1000
    min_seconds: float = 0.5
    max_seconds: float = 120.0  # the server announces its model's own maximum
    min_samples: int = 1
    max_samples: int = 8
    min_steps: int = 1
    max_steps: int = 1000
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    min_seed: int = 0
    max_seed: int = 2**31 - 1
    max_message_bytes: int = 4 * 2**20  # one whole message, all its frames together
    max_queue: int = 32
    max_client_queue: int = 8  # requests one client may have waiting (its share of the queue)
    max_cost: int = 500_000  # frames x samples x steps of one request (120 s x 20 fps x 200 steps)
    fps: float = 20.0  # the frame rate ``max_cost`` counts frames at (the server's model's)
    max_timeline_rows: int = 64  # rows of one prompt timeline (addon.timeline)
    max_timeline_seconds: float = 600.0  # a timeline's length: composed from windows, so beyond max_seconds
    max_context_seconds: float = 600.0  # the motion an edit request carries (its frames at ``fps``)

    def to_json(self) -> dict[str, Any]:
        """The limits as a JSON-able dict (the ``limits`` field of ``hello``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        """Limits from a ``hello`` reply, ignoring keys this version does not know."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


DEFAULT_LIMITS = Limits()
REPLY_LIMITS = Limits(max_message_bytes=64 * 2**20)  # what a client accepts from a server


# ---------------------------------------------------------------------------------------------------------
# The generate request: its fields, their wire kinds, defaults and checks, defined once here.
_GENERATE_KINDS = {"prompt": "str", "seconds": "number", "seed": "int", "guidance": "number", "steps": "int",
                   "samples": "int", "timeline": "list", "edit": "list"}
_DATA_KINDS = {"shape": "list", "dtype": "str"}  # a generate with ``edit`` carries the motion as a data frame


@dataclass(frozen=True)
class GenerateRequest:
    """What one ``generate`` asks for: a ``prompt``, or a ``timeline`` of (start, end, prompt) rows
    (``addon.timeline``; its last end is then the length and ``seconds`` is not used). The other defaults are the
    protocol's (announced in ``hello``). ``check(limits)`` raises WireError (a ValueError) naming the first bad
    field or timeline row."""

    prompt: str = ""
    seconds: float = 4.0
    seed: int = 0
    guidance: float = 2.5
    steps: int = 4  # the knee of quality against time for the shipped model: its fast sampler (README,
    # docs/fast_sampler.md); where a checkpoint has none, 4 DDIM steps
    samples: int = 1
    timeline: tuple | None = None  # of addon.timeline.TimelineRow
    edit: tuple[int, int] | None = None  # (start, stop): frames of the motion sent along to (re)generate

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The optional settings and their defaults (the ``defaults`` field of ``hello``)."""
        return {name: f.default for name, f in cls.__dataclass_fields__.items()
                if name not in ("prompt", "timeline", "edit")}

    @property
    def title(self) -> str:
        """A name for what is asked: the prompt, or the timeline's prompts joined by " / "."""
        return self.prompt or " / ".join(self.prompts)

    @property
    def prompts(self) -> list[str]:
        """The texts this request asks for: its prompt, or its timeline rows' prompts (each once)."""
        return list(dict.fromkeys(row.prompt for row in self.timeline)) if self.timeline else [self.prompt]

    @classmethod
    def from_header(cls, header: dict[str, Any], limits: Limits | None = None) -> GenerateRequest:
        """The request a ``generate`` header (or any dict with these keys) holds; missing optional fields take
        their defaults, other keys are ignored. Checked against ``limits`` when given; raises WireError."""
        from .timeline import timeline_from_json

        if "prompt" not in header and "timeline" not in header:
            raise WireError("'generate' is missing field 'prompt' (or 'timeline')")
        for name in _GENERATE_KINDS:
            if name in header:
                _check_kind(name, header[name], _GENERATE_KINDS[name])
        fields = {k: header[k] for k in _GENERATE_KINDS if k in header}
        if "timeline" in fields:
            fields["timeline"] = timeline_from_json(fields["timeline"])
        if "edit" in fields:
            edit = fields["edit"]
            if len(edit) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in edit):
                raise WireError(f"'edit' must be [start, stop], two frame numbers, got {_short(edit)}")
            fields["edit"] = (edit[0], edit[1])
        request = cls(**fields)
        return request.check(limits) if limits is not None else request

    def to_header(self) -> dict[str, Any]:
        """The fields as a ``generate`` header's JSON values (no ``timeline`` key without one: servers that
        predate timelines take such headers as before)."""
        header = {name: getattr(self, name) for name in _GENERATE_KINDS if name not in ("timeline", "edit")}
        if self.timeline is not None:
            header["timeline"] = [row.to_json() for row in self.timeline]
        if self.edit is not None:
            header["edit"] = list(self.edit)
        return header

    def frames(self, fps: float) -> int:
        """The motion's length in frames at ``fps`` (at least one): ``seconds``, or the timeline's end."""
        from .timeline import timeline_seconds

        if self.edit is not None:
            return self.edit[1] - self.edit[0]
        seconds = timeline_seconds(self.timeline) if self.timeline else float(self.seconds)
        return max(1, round(seconds * fps))

    def cost(self, fps: float) -> int:
        """The work this request asks for: frames x samples x denoising steps."""
        return self.frames(fps) * self.samples * self.steps

    def check(self, limits: Limits = DEFAULT_LIMITS) -> GenerateRequest:
        """Types, ranges, prompt and cost against ``limits``; returns self or raises WireError."""
        from .timeline import check_timeline

        for name, kind in _GENERATE_KINDS.items():
            if name not in ("timeline", "edit"):
                _check_kind(name, getattr(self, name), kind)
        for name in ("seed", "guidance", "steps", "samples"):
            _check_range(name, getattr(self, name), getattr(limits, f"min_{name}"), getattr(limits, f"max_{name}"))
        if self.timeline is not None:
            if self.prompt:
                raise WireError("give a prompt or a timeline, not both")
            if not isinstance(self.timeline, tuple):
                raise WireError(f"timeline must be a tuple of TimelineRow, got {type(self.timeline).__name__}")
            check_timeline(self.timeline, limits)
        elif self.edit is not None:
            check_prompt(self.prompt, limits)
            start, stop = self.edit
            if not 0 <= start < stop <= round(limits.max_context_seconds * limits.fps):
                raise WireError(f"'edit' must be [start, stop] with 0 <= start < stop <= "
                                f"{round(limits.max_context_seconds * limits.fps)} frames, got [{start}, {stop}]")
            _check_range("edit's length in seconds", (stop - start) / limits.fps, 1 / limits.fps,
                         limits.max_seconds)
            if self.samples != 1:
                raise WireError("an edit makes one motion: samples must be 1")
        else:
            check_prompt(self.prompt, limits)
            _check_range("seconds", self.seconds, limits.min_seconds, limits.max_seconds)
        cost = self.cost(limits.fps)
        if cost > limits.max_cost:
            raise WireError(f"the request costs {cost} frame-steps ({self.frames(limits.fps)} frames x "
                            f"{self.samples} samples x {self.steps} steps); the limit is {limits.max_cost}")
        return self



def check_prompt(prompt: str, limits: Limits, what: str = "prompt") -> None:
    """A prompt's text against ``limits``: not empty, not too long, valid Unicode; WireError naming ``what``."""
    if len(prompt) > limits.max_prompt_chars:
        raise WireError(f"{what} is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}")
    if not prompt.strip():
        raise WireError(f"{what} is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireError(f"{what} is not valid Unicode text: a lone surrogate at character {exc.start}") from None


# ---------------------------------------------------------------------------------------------------------
# Schema: for every message type, its fields (name -> kind) and which are optional.
# Kinds: "str", "int" (not bool), "number" (int or float, finite), "object", "list".
_REQUESTS: dict[str, tuple[dict[str, str], frozenset[str]]] = {
    "hello": ({}, frozenset()),
    "generate": ({**_GENERATE_KINDS, **_DATA_KINDS}, frozenset(_GENERATE_KINDS) | frozenset(_DATA_KINDS)),
    "cancel": ({}, frozenset()),
    "ping": ({}, frozenset()),
}
_REPLIES: dict[str, tuple[dict[str, str], frozenset[str]]] = {
    "hello": ({"model": "object", "device": "str", "fps": "number", "skeleton": "object", "limits": "object",
               "defaults": "object", "actions": "list"},
              frozenset({"defaults", "actions"})),  # older servers: no defaults; models without a caption index
    "accepted": ({"queue": "int", "coverage": "object"}, frozenset({"coverage"})),
    "progress": ({"step": "int", "total": "int"}, frozenset()),
    "frames": ({"sample": "int", "start": "int", "count": "int", "shape": "list", "dtype": "str"},
               frozenset()),
    "done": ({"frames": "int", "timings": "object"}, frozenset()),
    "error": ({"code": "str", "message": "str", "step": "int", "cancel_step": "int"},
              frozenset({"step", "cancel_step"})),
    "pong": ({"queued": "int", "running": "int"}, frozenset()),
}
_HEADER_KEYS = ("type", "id", "version")


class WireError(ValueError):
    """A message that breaks the protocol; ``code`` is the error code to answer with."""

    def __init__(self, message: str, code: str = "bad_request", request_id: str | None = None):
        super().__init__(truncate(message))
        self.code = code
        self.request_id = request_id


@dataclass
class Message:
    """One decoded wire message: the JSON header and, for ``frames``, its float32 data."""

    header: dict[str, Any]
    data: np.ndarray | None = None

    @property
    def type(self) -> str:
        return self.header["type"]

    @property
    def id(self) -> str | None:
        return self.header["id"]

    def __getitem__(self, key: str) -> Any:
        return self.header[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def _check_kind(name: str, value: Any, kind: str) -> None:
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "object": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise WireError(f"field '{name}' must be {_KIND_WORDS[kind]}, "
                        f"got {type(value).__name__} {_short(value)}")
    if kind in ("int", "number") and isinstance(value, int) and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise WireError(f"field '{name}' is out of range: {_short(value)}")
    if kind == "number" and not math.isfinite(value):
        raise WireError(f"field '{name}' must be a finite number, got {value}")


_KIND_WORDS = {"str": "a string", "int": "an integer", "number": "a number", "object": "a JSON object",
               "list": "a JSON array"}


def _short(value: Any, n: int = 40) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {len(str(abs(value)))} digits" if value.bit_length() < 40_000 else "a huge integer"
    return truncate(repr(value), n)


def truncate(text: str, n: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to at most ``n`` characters (error replies and log lines stay small)."""
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise WireError(f"field '{name}' must be between {lo} and {hi}, got {_short(value)}")


def validate_header(header: Any, *, reply: bool, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check a decoded header against the schema (requests when ``reply`` is False); returns it or raises.

    The id is read first so that errors can name the request they answer (``WireError.request_id``).
    """
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    rid = header.get("id")
    rid = rid if isinstance(rid, str) and _ID.match(rid) else None
    for key in _HEADER_KEYS:
        if key not in header:
            raise WireError(f"header is missing '{key}'", request_id=rid)
    version = header["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError(f"'version' must be an integer, got {_short(version)}", request_id=rid)
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version} is not supported; this side speaks version "
                        f"{PROTOCOL_VERSION}", code="version", request_id=rid)
    mtype = header["type"]
    table = _REPLIES if reply else _REQUESTS
    if not isinstance(mtype, str) or mtype not in table:
        raise WireError(f"unknown message type {_short(mtype)}; expected one of {', '.join(table)}",
                        request_id=rid)
    if rid is None and not (reply and mtype == "error" and header.get("id") is None):
        raise WireError(f"'id' must be a string of 1-64 letters, digits or _.:- , got {_short(header['id'])}")
    fields, optional = table[mtype]
    unknown = sorted(set(header) - set(fields) - set(_HEADER_KEYS))
    if unknown:
        names = ", ".join(_short(name, 30).strip("'") for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise WireError(f"unknown field(s) for '{mtype}': {names}{more}", request_id=rid)
    try:
        for name, kind in fields.items():
            if name not in header:
                if name in optional:
                    continue
                raise WireError(f"'{mtype}' is missing field '{name}'")
            _check_kind(name, header[name], kind)
        if mtype == "generate" and not reply:
            GenerateRequest.from_header(header, limits)
    except WireError as exc:
        exc.request_id = rid
        raise
    return header


def encode(header: dict[str, Any], data: np.ndarray | None = None) -> list[bytes]:
    """Frames for one message: the JSON header (with ``version`` filled in) and the optional float32 data."""
    header = {"version": PROTOCOL_VERSION, **header}
    if data is None:
        return [json.dumps(header, allow_nan=False, separators=(",", ":")).encode()]
    array = np.ascontiguousarray(data, dtype=DTYPE)
    header.update(shape=list(array.shape), dtype=DTYPE)
    return [json.dumps(header, allow_nan=False, separators=(",", ":")).encode(), array.tobytes()]


def decode(frames: list[bytes], *, reply: bool, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one multipart message; raises WireError with a clear message on anything wrong."""
    if not frames:
        raise WireError("empty message")
    size = sum(len(f) for f in frames)
    if size > limits.max_message_bytes:
        raise WireError(f"message is {size} bytes; the limit is {limits.max_message_bytes}",
                        request_id=sniff_id(frames[0]))
    try:
        header = json.loads(bytes(frames[0]).decode("utf-8"))  # NaN/Infinity: refused by field checks
    except UnicodeDecodeError:
        raise WireError("header is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer, or arrays nested 100000 deep
        raise WireError(f"header is not acceptable JSON ({_short(str(exc), 80)})") from None
    header = validate_header(header, reply=reply, limits=limits)
    wants_data = header["type"] == ("frames" if reply else "generate") and (reply or "edit" in header)
    if len(frames) != (2 if wants_data else 1):
        raise WireError(f"'{header['type']}' carries {'one data frame' if wants_data else 'no data frame'}, "
                        f"got {len(frames) - 1}", request_id=header["id"])
    if not wants_data:
        return Message(header)
    return Message(header, _decode_array(header, frames[1]))


def _decode_array(header: dict[str, Any], blob: bytes) -> np.ndarray:
    if "shape" not in header or "dtype" not in header:
        raise WireError("the data frame's 'shape' and 'dtype' are missing from the header", request_id=header["id"])
    shape, rid = header["shape"], header["id"]
    if header["dtype"] != DTYPE:
        raise WireError(f"data dtype must be '{DTYPE}', got {_short(header['dtype'])}", request_id=rid)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) or len(shape) != 2:
        raise WireError(f"data shape must be two non-negative integers, got {_short(shape)}", request_id=rid)
    if shape[0] != header.get("count", shape[0]) or shape[1] < 7 or (shape[1] - 3) % 4:
        count = f"count {header['count']} and " if "count" in header else ""
        raise WireError(f"data shape {shape} does not match {count}3 + 4 * joints columns", request_id=rid)
    if len(blob) != 4 * shape[0] * shape[1]:
        raise WireError(f"data frame has {len(blob)} bytes; shape {shape} needs {4 * shape[0] * shape[1]}",
                        request_id=rid)
    return np.frombuffer(blob, dtype=DTYPE).reshape(shape)


def pack_motion(root_translation: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(n,3) root translation + (n,J,4) wxyz local quaternions -> the (n, 3 + 4J) float32 ``frames`` block."""
    root = np.asarray(root_translation, dtype=np.float32)
    rot = np.asarray(rotations, dtype=np.float32)
    if root.ndim != 2 or root.shape[1] != 3 or rot.ndim != 3 or rot.shape[2] != 4 or len(root) != len(rot):
        raise ValueError(f"expected (n,3) and (n,J,4) arrays, got {root.shape} and {rot.shape}")
    return np.concatenate([root, rot.reshape(len(rot), -1)], axis=1)


def unpack_motion(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of pack_motion: (n, 3 + 4J) -> root translation (n,3), rotations (n,J,4)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2 or data.shape[1] < 7 or (data.shape[1] - 3) % 4:
        raise ValueError(f"expected an (n, 3 + 4J) array, got shape {data.shape}")
    return data[:, :3], data[:, 3:].reshape(len(data), -1, 4)


def request(mtype: str, request_id: str | None = None, limits: Limits = DEFAULT_LIMITS,
            data: np.ndarray | None = None, **fields: Any) -> tuple[str, list[bytes]]:
    """Build a request, validated as the server will (bad fields raise WireError, a ValueError); returns
    (id, frames). A fresh random id is used unless ``request_id`` is given. ``data``: the motion a ``generate``
    with ``edit`` carries (``pack_motion``'s layout)."""
    rid = request_id or uuid.uuid4().hex[:16]
    if (mtype == "generate" and "edit" in fields) != (data is not None):
        raise WireError("a 'generate' with 'edit' carries the motion to edit as data, and only then")
    header = {"type": mtype, "id": rid, "version": PROTOCOL_VERSION, **fields}
    return rid, encode(validate_header(header, reply=False, limits=limits), data)


_SNIFF_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:\-]{1,64})"')


def sniff_id(header: bytes) -> str | None:
    """The request id of a header too large (or too broken) to parse, found without parsing it; or None."""
    found = _SNIFF_ID.search(header)
    return found.group(1).decode() if found else None


def recv_bounded(sock: zmq.Socket, max_frames: int) -> tuple[list[bytes], int]:
    """Receive one multipart message a frame at a time, without copying: returns its first ``max_frames``
    frames (as bytes) and its frame count. Frames past the budget are released as they are read, never
    copied or joined, so a message of many frames costs the receiver nothing beyond the transport's buffer."""
    kept: list[bytes] = []
    count, more = 0, True
    while more:
        frame = sock.recv(copy=False)
        more = frame.more
        count += 1
        if count <= max_frames:
            kept.append(frame.bytes)
    return kept, count


def reply(mtype: str, request_id: str | None, data: np.ndarray | None = None, **fields: Any) -> list[bytes]:
    """Frames of a reply, checked against the schema before they leave (a wrong field raises WireError)."""
    frames = encode({"type": mtype, "id": request_id, **fields}, data)
    decode(frames, reply=True, limits=REPLY_LIMITS)
    return frames


def error_reply(request_id: str | None, code: str, message: str, **extra: int) -> list[bytes]:
    """Frames of an ``error`` reply; the message is cut to MAX_ERROR_CHARS."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return reply("error", request_id, code=code, message=truncate(message), **extra)


def is_ipv6(endpoint: str) -> bool:
    """Whether a tcp endpoint names an IPv6 address (``tcp://[::1]:5557``): its socket needs ZMQ_IPV6."""
    return endpoint.startswith("tcp://[")


# ---------------------------------------------------------------------------------------------------------
# Reassembly and transport facts a client and the server share


@dataclass
class GeneratedMotion:
    """A finished generate request reassembled from its ``frames``: one entry per sample."""

    root_translation: list[np.ndarray]  # per sample (T,3)
    rotations: list[np.ndarray]  # per sample (T,J,4)
    timings: dict[str, float] = field(default_factory=dict)


class MotionAssembler:
    """Collects the ``frames`` messages of one request into whole samples; checks nothing is missing."""

    def __init__(self) -> None:
        self._chunks: dict[int, dict[int, np.ndarray]] = {}

    def add(self, message: Message) -> None:
        """Store one ``frames`` message; a repeated (sample, start) is a protocol error."""
        chunks = self._chunks.setdefault(message["sample"], {})
        if message["start"] in chunks:
            raise WireError(f"duplicate frames for sample {message['sample']} at frame {message['start']}")
        chunks[message["start"]] = message.data

    def result(self, frames: int, timings: dict[str, float] | None = None) -> GeneratedMotion:
        """The whole motion, once ``done`` said each sample has ``frames`` frames; raises if any are
        missing."""
        roots, rots = [], []
        for sample in sorted(self._chunks):
            chunks = self._chunks[sample]
            starts = sorted(chunks)
            expected = 0
            for s in starts:
                if s != expected:
                    raise WireError(f"sample {sample}: frames {expected}..{s - 1} are missing")
                expected += len(chunks[s])
            if expected != frames:
                raise WireError(f"sample {sample}: got {expected} frames, the server announced {frames}")
            root, rot = unpack_motion(np.concatenate([chunks[s] for s in starts]))
            roots.append(root)
            rots.append(rot)
        if sorted(self._chunks) != list(range(len(self._chunks))):
            raise WireError(f"samples are missing: got {sorted(self._chunks)}")
        return GeneratedMotion(roots, rots, dict(timings or {}))


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
