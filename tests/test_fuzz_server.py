"""Property-based fuzzing (hypothesis) of the wire and of a live server on a real loopback socket.

Inputs are valid requests, mutations of them (a field dropped, retyped or added; the type, id or version
changed; odd prompts: lone surrogates, huge numbers) and raw bytes. The wire must answer each with a Message or
a WireError naming the right code and id; the live server must answer every input exactly as the wire says
(the right error code and id, or the right reply) or, for what the protocol leaves unanswered (a cancel of an
unknown id), nothing; and it must still produce the same motion, bit for bit, afterwards.
"""

from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from addon.client import MotionClient
from addon.wire import (
    ERROR_CODES,
    MAX_ERROR_CHARS,
    PROTOCOL_VERSION,
    GenerateRequest,
    Limits,
    Message,
    WireError,
    decode,
    request,
)

pipeline = pytest.importorskip("backend.pipeline")
pytestmark = pytest.mark.timeout(300)
IDS = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=10)
PROMPTS = st.one_of(st.text(min_size=0, max_size=60), st.sampled_from(["\ud800", "walk \udfff", " ", "x" * 1001,
                                                                       "a person walks forward"]))
NUMBERS = st.one_of(st.integers(-(10**400), 10**400), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-5, 2000), st.floats(0, 130))


def mostly(good: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` nine times in ten, else ``other``."""
    return st.integers(0, 9).flatmap(lambda n: good if n else other)


@st.composite
def generate_fields(draw: st.DrawFn) -> dict:
    """Generate fields: mostly in range and cheap to run, sometimes anything; some left out (defaults)."""
    fields = {"prompt": draw(mostly(st.just("a person walks"), PROMPTS)),
              "seconds": draw(mostly(st.floats(0.5, 2.0), NUMBERS)),
              "seed": draw(mostly(st.integers(0, 2**31 - 1), NUMBERS)),
              "guidance": draw(mostly(st.floats(0, 30), NUMBERS)),
              "steps": draw(mostly(st.integers(1, 3), NUMBERS)),
              "samples": draw(mostly(st.integers(1, 2), NUMBERS))}
    dropped = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2))
    return {k: v for k, v in fields.items() if k not in dropped}


@st.composite
def headers(draw: st.DrawFn) -> dict:
    """A request header, valid or mutated."""
    mtype = draw(st.sampled_from(["hello", "ping", "cancel", "generate", "generate"]))
    header = {"type": mtype, "id": draw(IDS), "version": PROTOCOL_VERSION}
    if mtype == "generate":
        header.update(draw(generate_fields()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        key = draw(st.sampled_from([*header, "extra", "eval", "data"]))
        mutation = draw(st.sampled_from(["drop", "retype", "add"]))
        if mutation == "drop":
            header.pop(key, None)
        else:
            header[key] = draw(JSON)
    return header


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    """Frames of one message: JSON of a (mutated) header, sometimes cut short, or raw bytes; sometimes an extra
    frame."""
    kind = draw(st.sampled_from(["json", "json", "json", "cut", "bytes"]))
    if kind == "bytes":
        frames = [draw(st.binary(max_size=200))]
    else:
        text = json.dumps(draw(headers()))
        frames = [text.encode() if kind == "json" else text[: draw(st.integers(0, len(text)))].encode()]
    if draw(st.integers(0, 9)) == 0:
        frames.append(draw(st.binary(max_size=64)))
    return frames


def expected(frames: list[bytes], limits: Limits) -> Message | WireError:
    """What the wire says about a request: its Message, or the WireError to answer with."""
    try:
        return decode(frames, reply=False, limits=limits)
    except WireError as exc:
        return exc


def _header_id(frames: list[bytes]) -> str | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        header = json.loads(frames[0])
        rid = header.get("id") if isinstance(header, dict) else None
        if isinstance(rid, str) and IDS_RE.fullmatch(rid):
            return rid
    return None


IDS_RE = __import__("re").compile(r"[A-Za-z0-9_.:\-]{1,64}")


@settings(max_examples=1500, deadline=None)
@given(messages())
def test_wire_answers_every_input_with_a_message_or_the_right_error(frames):
    result = expected(frames, Limits())
    if isinstance(result, Message):
        event(f"valid {result.type}")
        if result.type == "generate":  # what the wire accepts, the request type accepts, defaults filled in
            generate = GenerateRequest.from_header(result.header, Limits())
            assert generate.to_header() == {**GenerateRequest.defaults(), **{
                k: result[k] for k in generate.to_header() if k in result.header}}
        return
    event(f"error {result.code}")
    assert result.code in ERROR_CODES and len(str(result)) <= MAX_ERROR_CHARS
    header_id = _header_id(frames)
    if header_id is not None and result.request_id is not None:
        assert result.request_id == header_id
    if header_id is not None and "is not valid JSON" not in str(result):  # a parsed header with a good id
        assert result.request_id == header_id, str(result)


@settings(max_examples=300, deadline=None)
@given(st.builds(GenerateRequest, prompt=st.text(min_size=1, max_size=50).filter(str.strip),
                 seconds=st.floats(0.5, 120), seed=st.integers(0, 2**31 - 1), guidance=st.floats(0, 30),
                 steps=st.integers(1, 100), samples=st.integers(1, 8)))
def test_generate_requests_round_trip(generate):
    assert GenerateRequest.from_header(generate.to_header()) == generate
    _, frames = request("generate", limits=Limits(max_cost=10**9), **generate.to_header())
    assert GenerateRequest.from_header(decode(frames, reply=False, limits=Limits(max_cost=10**9)).header) == generate


@pytest.fixture(scope="module")
def pipe():
    return pipeline.MotionPipeline.random(config="tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def server(pipe):
    from backend.serve import Server

    srv = Server(pipe, "tcp://127.0.0.1:*", max_queue=4)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(timeout=20)


@pytest.fixture(scope="module")
def sock(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    yield sock
    sock.close()


def motion(endpoint: str) -> np.ndarray:
    with MotionClient(endpoint, timeout=30) as client:
        result = client.generate_motion("a person walks forward", seconds=1.0, seed=5, steps=3)
    return np.concatenate([result.root_translation[0], result.rotations[0].reshape(len(result.rotations[0]), -1)],
                          axis=1)


def replies_until_barrier(sock: zmq.Socket, barrier: str) -> list[Message]:
    """Every reply up to the ``pong`` of ping ``barrier`` (sent after the input: the server answers in order)."""
    sock.send_multipart(request("ping", barrier)[1])
    out = []
    while True:
        assert sock.poll(30_000), "the server stopped answering"
        message = decode(sock.recv_multipart(), reply=True)
        if message.id == barrier:
            return out
        out.append(message)


def test_live_server_answers_every_input_as_the_wire_says_and_still_serves_the_same_motion(server, sock, pipe):
    before = motion(server.endpoint)
    counts: dict[str, int] = {}
    barrier = iter(range(10**9))

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages())
    def check(frames):
        want = expected(frames, server.limits)
        sock.send_multipart(frames)
        if isinstance(want, Message) and want.type == "generate":
            first = decode(sock.recv_multipart(), reply=True) if sock.poll(30_000) else None
            assert first is not None and first.id == want.id, "no answer to a valid generate"
            assert first.type == "accepted", first.header
            sock.send_multipart(request("cancel", want.id)[1])
            stream = [first]
            while stream[-1].type not in ("done", "error"):
                assert sock.poll(30_000), "the stream stopped"
                message = decode(sock.recv_multipart(), reply=True)
                assert message.id == want.id, message.header
                stream.append(message)
            assert stream[-1].type == "done" or stream[-1]["code"] == "cancelled", stream[-1].header
            kind = "generate (accepted, cancelled or done)"
            got = replies_until_barrier(sock, f"barrier-{next(barrier)}")
            assert got == [], [m.header for m in got]
        else:
            got = replies_until_barrier(sock, f"barrier-{next(barrier)}")
            if isinstance(want, WireError):
                kind = f"error {want.code}"
                assert [(m.type, m["code"], m.id) for m in got] == [("error", want.code, want.request_id)], \
                    ([m.header for m in got], str(want))
                assert got[0]["message"] == str(want)
            elif want.type == "cancel":
                kind = "cancel of an unknown id (no reply by design)"
                assert got == []
            else:
                kind = f"valid {want.type}"
                assert [(m.type, m.id) for m in got] == [({"ping": "pong"}.get(want.type, want.type), want.id)]
        counts[kind] = counts.get(kind, 0) + 1

    check()
    print("live fuzz:", sum(counts.values()), "inputs:", dict(sorted(counts.items())))
    assert counts.get("valid hello") or counts.get("valid ping"), counts
    assert sum(v for k, v in counts.items() if k.startswith("error")) > 50, counts
    after = motion(server.endpoint)
    assert np.array_equal(before, after), "the server's output changed after the fuzz"
    want = pipe("a person walks forward", seconds=1.0, seed=5, steps=3)
    assert np.array_equal(after[:, 3:].reshape(want.rotations.shape), want.rotations.astype(np.float32))
