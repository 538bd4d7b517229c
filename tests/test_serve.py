"""The generation backend over real ZeroMQ sockets on 127.0.0.1, with the tiny random-weight pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from addon.client import CurveKeys, MotionClient, ServerError
from addon.wire import (
    PROTOCOL_VERSION,
    GenerateRequest,
    Message,
    WireError,
    decode,
    encode,
    pack_motion,
    request,
    unpack_motion,
)
from backend.serve import Server, is_loopback, keygen

pipeline = pytest.importorskip("backend.pipeline")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)
PROMPT = "a person walks forward and waves"


@pytest.fixture(scope="module")
def pipe():
    return pipeline.MotionPipeline.random(config="tiny", device="cpu", seed=0)


@contextlib.contextmanager
def running(pipe, bind: str = "tcp://127.0.0.1:*", **options) -> Iterator[Server]:
    """A server on a random free loopback port, in a thread; stopped and joined afterwards."""
    server = Server(pipe, bind, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe) as srv:
        yield srv


@pytest.fixture
def client(server):
    with MotionClient(server.endpoint, timeout=20) as c:
        yield c


def collect_all(client: MotionClient, rids: list[str], until: float = 60.0) -> dict[str, list[Message]]:
    """All messages of several requests, each through its final done/error."""
    out: dict[str, list[Message]] = {rid: [] for rid in rids}
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        for message in client.poll(0.05):
            if message.id in out:
                out[message.id].append(message)
        if all(msgs and msgs[-1].type in ("done", "error") for msgs in out.values()):
            return out
    raise AssertionError(f"requests did not finish: { {rid: [m.type for m in msgs] for rid, msgs in out.items()} }")


def collect(client: MotionClient, rid: str) -> list[Message]:
    """All messages of one request, through its final done/error."""
    return collect_all(client, [rid])[rid]


def wait_for(client: MotionClient, rid: str, mtype: str) -> list[Message]:
    """Messages of ``rid`` up to and including the first of type ``mtype``."""
    out: list[Message] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for message in client.poll(0.05):
            assert message.id == rid, message.header
            out.append(message)
            if message.type == mtype:
                return out
            assert message.type not in ("done", "error"), message.header
    raise AssertionError(f"no {mtype} for {rid}")


def assert_serves(endpoint: str, pipe) -> None:
    """The server still answers a good request correctly."""
    with MotionClient(endpoint, timeout=20) as c:
        motion = c.generate_motion(PROMPT, seconds=1.0, seed=1, steps=2)
    expected = pipe(PROMPT, seconds=1.0, seed=1, steps=2)
    np.testing.assert_allclose(motion.rotations[0], expected.rotations, atol=1e-5)


def test_hello_announces_model_skeleton_and_limits(client, pipe):
    from backend.skeleton import SMPL22

    hello = client.hello()
    assert hello["skeleton"] == json.loads(json.dumps(SMPL22.to_json()))
    assert hello["fps"] == pipe.fps and hello["device"] == str(pipe.device)
    assert hello["model"] == json.loads(json.dumps(pipe.describe()))
    assert hello["limits"]["max_seconds"] == pipe.max_seconds
    assert client.limits.max_seconds == hello["limits"]["max_seconds"] == pipe.max_seconds
    assert client.server == hello
    with MotionClient(client.endpoint) as late:  # a hello answered after hello() stopped waiting still counts
        with contextlib.suppress(TimeoutError):
            late.hello(timeout=0)  # send only, unless the reply is already there
        deadline = time.monotonic() + 10
        while late.server is None and time.monotonic() < deadline:
            assert [m.type for m in late.poll(0.05)] in ([], ["hello"])
        assert late.server["device"] == hello["device"]


def test_stream_reassembles_to_the_in_process_result(client, pipe):
    types: list[str] = []
    motion = client.generate_motion(PROMPT, seconds=3.0, seed=7, guidance=3.0, steps=4, samples=2,
                                    on_message=lambda m: types.append(m.type))
    expected = pipe(PROMPT, seconds=3.0, seed=7, guidance=3.0, steps=4, samples=2)
    assert len(motion.rotations) == len(expected) == 2
    for got_root, got_rot, want in zip(motion.root_translation, motion.rotations, expected):
        assert np.array_equal(got_root, want.root_translation.astype(np.float32))
        assert np.array_equal(got_rot, want.rotations.astype(np.float32))
    assert types[0] == "accepted" and types[1:5] == ["progress"] * 4 and types[-1] == "done"
    assert types.count("frames") >= 2, "frames must be streamed"
    assert set(motion.timings) >= {"queued_s", "generate_s", "total_s"}


def test_a_timeline_streams_as_one_motion_like_the_in_process_one(client, pipe):
    from addon.timeline import TimelineRow

    rows = (TimelineRow(0.0, 1.5, "a person walks"), TimelineRow(1.5, 3.0, "a person waves"))
    request = GenerateRequest(timeline=rows, seed=2, steps=3)
    assert request.to_header()["timeline"] == [[0.0, 1.5, "a person walks"], [1.5, 3.0, "a person waves"]]
    assert "timeline" not in GenerateRequest("a person walks").to_header()  # older servers take it as before
    motion = client.generate_motion(request)
    expected = pipeline.collect(pipe.timeline(rows, seed=2, steps=3))[0]
    assert motion.rotations[0].shape[0] == 60 == expected.frames
    assert np.array_equal(motion.rotations[0], expected.rotations.astype(np.float32))


def _walk(pipe, seconds: float = 3.0) -> np.ndarray:
    made = pipe("a person walks", seconds=seconds, seed=1, steps=2)
    return pack_motion(made.root_translation, made.rotations)


def test_an_edit_streams_the_whole_motion_like_the_in_process_one(client, pipe):
    motion = _walk(pipe)
    request = GenerateRequest("a person jumps", seed=4, steps=3, edit=(20, 40))
    got = client.generate_motion(request, motion=motion)
    root, rot = unpack_motion(motion)
    want = pipe.edit(root, rot, 20, 40, "a person jumps", seed=4, steps=3)
    assert np.array_equal(got.root_translation[0], want.root_translation.astype(np.float32))
    assert np.array_equal(got.rotations[0], want.rotations.astype(np.float32))
    assert np.array_equal(got.rotations[0][:20], rot[:20]) and np.array_equal(got.rotations[0][40:], rot[40:])
    more = client.generate_motion(GenerateRequest("a person runs", steps=2, edit=(60, 90)), motion=motion)
    assert len(more.rotations[0]) == 90 and np.array_equal(more.rotations[0][:60], rot)  # a continuation


def test_bad_edits_get_a_clear_error(client, server, pipe):
    motion = _walk(pipe)
    with pytest.raises(WireError, match="carries the motion to edit as data, and only then"):
        client.submit(GenerateRequest("a person jumps", edit=(2, 10)))
    with pytest.raises(WireError, match="carries the motion to edit as data, and only then"):
        client.submit(GenerateRequest("a person jumps"), motion=motion)
    with pytest.raises(WireError, match="samples must be 1"):
        client.submit(GenerateRequest("a person jumps", samples=2, edit=(2, 10)), motion=motion)
    with pytest.raises(WireError, match=r"'edit' must be \[start, stop\] with 0 <= start < stop"):
        client.submit(GenerateRequest("a person jumps", edit=(10, 2)), motion=motion)
    cases = {
        "joints": (motion[:, :87], (2, 10), "carries the motion as (T, 91) float32 data"),
        "columns": (motion[:, :50], (2, 10), "data shape [60, 50] does not match 3 + 4 * joints columns"),
        "NaN": (np.where(np.arange(len(motion))[:, None] == 3, np.nan, motion), (2, 10), "NaN or infinite"),
        "past the end": (motion, (70, 90), "does not fit the 60 frames sent"),
        "nothing kept": (motion, (0, 60), "nothing is kept"),
    }
    for data, edit, words in cases.values():
        with pytest.raises(ServerError, match=re.escape(words)):
            client.generate_motion(GenerateRequest("a person jumps", steps=2, edit=edit), motion=data)
    with contextlib.closing(raw_socket(server.endpoint)) as sock:  # an edit header without its data frame
        sock.send_multipart(js({**GOOD, "edit": [2, 10]}))
        reply = raw_reply(sock)
    assert reply["code"] == "bad_request" and "carries one data frame, got 0" in reply["message"]
    assert_serves(server.endpoint, pipe)


def test_cancel_stops_within_one_denoising_step(client, server):
    rid = client.submit(PROMPT, seconds=2.0, steps=400)
    seen = wait_for(client, rid, "progress")
    client.cancel(rid)
    rest = collect(client, rid)
    error = rest[-1]
    assert error.type == "error" and error["code"] == "cancelled", error.header
    assert error["step"] - error["cancel_step"] <= 1, error["message"]
    assert error["step"] < 400
    steps = [m["step"] for m in seen + rest if m.type == "progress"]
    assert max(steps) <= error["step"]
    assert not any(m.type == "frames" for m in rest)
    client.cancel(rid)  # cancelling a finished request is harmless
    assert_serves(server.endpoint, server.pipe)


def test_leaving_the_generate_iterator_early_cancels_the_request(client):
    stream = client.generate(PROMPT, seconds=2.0, steps=400)
    assert next(stream).type == "accepted"
    assert next(stream).type == "progress"
    stream.close()
    deadline = time.monotonic() + 30
    while client.ping()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    pong = client.ping()
    assert (pong["running"], pong["queued"]) == (0, 0)


def test_an_idle_client_is_not_timed_out_on_its_next_request(server):
    with MotionClient(server.endpoint, timeout=1.0, ping_interval=0.2) as c:
        c.hello()
        time.sleep(1.5)  # idle for longer than the timeout
        types = [m.type for m in c.generate(PROMPT, seconds=1.0, steps=3)]
    assert types[0] == "accepted" and types[-1] == "done"


def test_cancel_of_a_queued_request_is_immediate(client):
    first = client.submit(PROMPT, seconds=2.0, steps=400)
    second = client.submit(PROMPT, seconds=1.0, steps=400)  # other settings: not batched with the first
    client.cancel(second)
    error = collect(client, second)[-1]
    assert error["code"] == "cancelled" and error["step"] == 0
    client.cancel(first)
    assert collect(client, first)[-1]["code"] == "cancelled"


def test_ping_is_answered_during_a_generation(client):
    rid = client.submit(PROMPT, seconds=2.0, steps=400)
    wait_for(client, rid, "progress")
    pongs = [client.ping(timeout=5) for _ in range(3)]
    assert all(pong["running"] == 1 for pong in pongs), pongs
    progress = [m for m in client.poll(0.2) if m.type == "progress"]
    assert progress, "the generation went on while pings were answered"
    client.cancel(rid)
    assert collect(client, rid)[-1]["code"] == "cancelled"


def test_two_clients_interleaved_get_their_own_streams(server, pipe):
    with MotionClient(server.endpoint, timeout=20) as a, MotionClient(server.endpoint, timeout=20) as b:
        ra = a.submit(PROMPT, seconds=2.0, seed=11, steps=6)
        rb = b.submit("a person jumps twice", seconds=1.5, seed=12, steps=5)
        got = {ra: [], rb: []}
        while not all(msgs and msgs[-1].type in ("done", "error") for msgs in got.values()):
            for c, rid in ((a, ra), (b, rb)):
                for m in c.poll(0.02):
                    assert m.id == rid, f"{m.id} leaked to the wrong client"
                    got[rid].append(m)
    for rid, prompt, seconds, seed, steps in ((ra, PROMPT, 2.0, 11, 6), (rb, "a person jumps twice", 1.5, 12, 5)):
        frames = [m for m in got[rid] if m.type == "frames"]
        assert got[rid][-1].type == "done"
        rot = np.concatenate([m.data[:, 3:] for m in sorted(frames, key=lambda m: m["start"])])
        want = pipe(prompt, seconds=seconds, seed=seed, steps=steps)
        np.testing.assert_allclose(rot.reshape(want.rotations.shape), want.rotations, atol=1e-5)


def test_compatible_waiting_requests_are_batched(pipe):
    with running(pipe, batch=True) as srv, MotionClient(srv.endpoint, timeout=20) as c:
        blocker = c.submit(PROMPT, seconds=1.0, steps=30)
        wait_for(c, blocker, "progress")
        rids = [c.submit(p, seconds=2.0, seed=s, steps=3) for p, s in ((PROMPT, 3), ("a person sits down", 4))]
        results = collect_all(c, [blocker, *rids])
    for rid, (prompt, seed) in zip(rids, ((PROMPT, 3), ("a person sits down", 4))):
        done = results[rid][-1]
        assert done.type == "done" and done["timings"]["batch"] == 2, done.header
        frames = sorted((m for m in results[rid] if m.type == "frames"), key=lambda m: m["start"])
        rot = np.concatenate([m.data[:, 3:] for m in frames])
        want = pipe(prompt, seconds=2.0, seed=seed, steps=3)
        np.testing.assert_allclose(rot.reshape(want.rotations.shape), want.rotations, atol=1e-4)


def test_a_full_queue_answers_busy(pipe):
    with running(pipe, max_queue=2, max_client_queue=2, batch=False) as srv, \
            MotionClient(srv.endpoint, timeout=20) as c:
        running_id = c.submit(PROMPT, seconds=2.0, steps=400)
        wait_for(c, running_id, "progress")
        queued = [c.submit(PROMPT, seconds=2.0, steps=400) for _ in range(2)]
        with pytest.raises(ServerError, match=r"busy: the server's queue is full \(2 requests waiting\)"):
            list(c.generate(PROMPT, seconds=1.0, steps=2))
        for rid in [running_id, *queued]:
            c.cancel(rid)
            assert collect(c, rid)[-1]["code"] == "cancelled"
        assert_serves(srv.endpoint, pipe)


def test_a_reused_request_id_is_refused(client):
    rid = client.submit(PROMPT, seconds=2.0, steps=400)
    client.submit("x", seconds=1.0, steps=1, request_id=rid)
    refusal = None
    while refusal is None:
        refusal = next((m for m in client.poll(0.05) if m.type == "error" and m["code"] == "bad_request"), None)
    assert "already in use" in refusal["message"]
    client.cancel(rid)
    assert collect(client, rid)[-1]["code"] == "cancelled"


GOOD = {"type": "generate", "id": "bad-1", "version": PROTOCOL_VERSION, "prompt": PROMPT, "seconds": 1.0,
        "seed": 0, "guidance": 2.5, "steps": 2, "samples": 1}


def js(header) -> list[bytes]:
    return [json.dumps(header).encode()]


BAD_INPUT = {
    "non-JSON header": ([b"\x00\x01 not json {"], "bad_request", "not valid"),
    "JSON that is not an object": ([b"[1, 2, 3]"], "bad_request", "must be a JSON object"),
    "unknown type": (js({**GOOD, "type": "explode"}), "bad_request", "unknown message type 'explode'"),
    "missing fields": (js({"type": "generate", "id": "bad-1", "version": 1, "seconds": 2.0}), "bad_request",
                       "missing field 'prompt'"),
    "wrong types": (js({**GOOD, "seconds": "ten"}), "bad_request", "'seconds' must be a number"),
    "NaN": ([json.dumps({**GOOD, "guidance": float("nan")}).encode()], "bad_request", "finite number, got nan"),
    "inf": ([json.dumps({**GOOD, "seconds": float("inf")}).encode()], "bad_request", "finite number, got inf"),
    "negative": (js({**GOOD, "seconds": -3.0}), "bad_request", "'seconds' must be between"),
    "huge number": (js({**GOOD, "steps": 10**12}), "bad_request", "'steps' must be between 1 and 1000"),
    "enormous duration": (js({**GOOD, "seconds": 1e9}), "bad_request", "'seconds' must be between 0.5 and 120.0"),
    "too many samples": (js({**GOOD, "samples": 1000}), "bad_request", "'samples' must be between 1 and 8"),
    "empty prompt": (js({**GOOD, "prompt": " "}), "bad_request", "prompt is empty"),
    "huge integer literal": ([b'{"type":"ping","id":"bad-1","version":1,"n":' + b"9" * 10_000 + b"}"],
                             "bad_request", "not acceptable JSON"),
    "unknown field": (js({**GOOD, "eval": "rm -rf /"}), "bad_request", "unknown field(s) for 'generate': eval"),
    "1 MB prompt": (js({**GOOD, "prompt": "walk " * 200_000}), "bad_request",
                    "prompt is 1000000 characters long; the limit is 1000"),
    "unknown protocol version": (js({**GOOD, "version": 99}), "version", "protocol version 99 is not supported"),
    "garbage data frame": ([*js({**GOOD}), os.urandom(1000)], "bad_request", "carries no data frame"),
    "a reply type sent as request": (js({"type": "done", "id": "bad-1", "version": 1}), "bad_request",
                                     "unknown message type 'done'"),
    "timeline with a gap": (js({**GOOD, "prompt": "", "timeline": [[0, 2, "walk"], [3, 4, "run"]]}), "bad_request",
                            "timeline row 2 (3-4 s): leaves 2-3 s with no prompt"),
    "timeline row of the wrong shape": (js({**GOOD, "prompt": "", "timeline": [[0, 2, "walk"], [2, 4]]}),
                                        "bad_request", "timeline row 2: expected [start, end, prompt]"),
    "timeline with an empty prompt": (js({**GOOD, "prompt": "", "timeline": [[0, 2, " "]]}), "bad_request",
                                      "timeline row 1 (0-2 s): the prompt is empty"),
    "timeline and prompt": (js({**GOOD, "timeline": [[0, 2, "walk"]]}), "bad_request",
                            "give a prompt or a timeline, not both"),
    "timeline too long": (js({**GOOD, "prompt": "", "timeline": [[0, 900, "walk"]]}), "bad_request",
                          "the timeline ends at 900 s; the limit is 600 s"),
    "timeline not a list": (js({**GOOD, "prompt": "", "timeline": "0 2 walk"}), "bad_request",
                            "'timeline' must be a JSON array"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_a_clear_error_and_the_server_survives(server, pipe, case):
    frames, code, words = BAD_INPUT[case]
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(server.endpoint)
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {case}"
        reply = decode(sock.recv_multipart(), reply=True)
    assert reply.type == "error" and reply["code"] == code, reply.header
    assert words in reply["message"], reply["message"]
    if case not in ("non-JSON header", "JSON that is not an object", "huge integer literal"):  # unparseable
        assert reply.id == "bad-1"
    assert_serves(server.endpoint, pipe)


def test_a_100_mb_message_is_dropped_by_the_transport_and_the_server_survives(server, pipe):
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(server.endpoint)
        sock.send_multipart([b"{" + b" " * 100 * 2**20])
        assert not sock.poll(1000), "an oversized message must not be processed"
        sock.send_multipart(request("ping", "after")[1])  # the DEALER reconnects by itself
        assert sock.poll(10_000)
        assert decode(sock.recv_multipart(), reply=True).type == "pong"
    with MotionClient(server.endpoint) as c, pytest.raises(ValueError, match="at most 4194304"):
        c._send([b" " * 100 * 2**20])  # the client refuses to send one at all
    assert_serves(server.endpoint, pipe)


def test_a_client_vanishing_mid_stream_costs_only_its_own_request(server, pipe):
    with MotionClient(server.endpoint, timeout=20) as other:
        other_id = other.submit(PROMPT, seconds=2.0, seed=5, steps=40)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(server.endpoint)
        sock.send_multipart(request("generate", "gone", prompt="a person runs", seconds=2.0, seed=1,
                                    guidance=2.5, steps=400, samples=1)[1])
        while decode(sock.recv_multipart(), reply=True).type != "progress":
            pass
        sock.close(linger=0)  # vanish mid-stream
        messages = collect(other, other_id)
        assert messages[-1].type == "done"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the vanished request is dropped, not run to its end
            pong = other.ping()
            if pong["running"] == 0 and pong["queued"] == 0:
                break
        assert pong["running"] == 0 and pong["queued"] == 0
    assert_serves(server.endpoint, pipe)


def test_is_loopback():
    for endpoint in ("tcp://127.0.0.1:5557", "tcp://127.1.2.3:1", "tcp://[::1]:5557", "tcp://localhost:1",
                     "ipc:///tmp/x", "inproc://x"):
        assert is_loopback(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://192.168.1.4:5557", "tcp://eth0:5557",
                     "tcp://[::]:1", "tcp://example.com:1", "udp://127.0.0.1:1"):
        assert not is_loopback(endpoint), endpoint


def test_a_non_loopback_bind_without_keys_refuses_to_start(pipe):
    with pytest.raises(PermissionError, match=r"refusing to listen on tcp://0\.0\.0\.0:5557 without authentication"):
        Server(pipe, "tcp://0.0.0.0:5557")
    proc = subprocess.run([sys.executable, "-m", "backend.serve", "--bind", "tcp://*:5557", "--config", "tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on tcp://*:5557 without authentication" in proc.stderr
    assert "keygen" in proc.stderr


def test_with_keys_only_authorized_clients_get_through(pipe, tmp_path, caplog):
    """D7: a refused client learns why at once (not a timeout) and the server logs it."""
    keygen(tmp_path / "keys", ("alice",))
    keygen(tmp_path / "other", ("mallory",))  # a valid key pair the server does not know
    alice = CurveKeys.from_dir(tmp_path / "keys", "alice")
    mallory_keys = CurveKeys.from_dir(tmp_path / "other", "mallory")
    mallory = CurveKeys(alice.server_public, mallory_keys.public, mallory_keys.secret)
    ctx = zmq.Context()  # the authenticator is per context
    try:
        with running(pipe, keys=tmp_path / "keys", context=ctx) as srv:
            with MotionClient(srv.endpoint, curve=mallory, timeout=5) as c, \
                    pytest.raises(ServerError, match=r"unauthorized: .* refused this client's CurveZMQ key"):
                c.hello()
            with MotionClient(srv.endpoint, timeout=5) as c, \
                    pytest.raises(ServerError, match=r"unauthorized: the security handshake .* failed"):
                c.hello()  # no keys at all
            assert any("refused a client" in r.getMessage() for r in caplog.records), caplog.text
            with MotionClient(srv.endpoint, curve=alice, timeout=20) as c:
                assert c.hello()["device"] == str(pipe.device)
                assert c.generate_motion(PROMPT, seconds=1.0, steps=2).rotations[0].shape[1:] == (22, 4)
        with running(pipe, "tcp://0.0.0.0:*", keys=tmp_path / "keys", context=ctx) as srv:  # keys: allowed
            port = srv.endpoint.rsplit(":", 1)[1]
            with MotionClient(f"tcp://127.0.0.1:{port}", curve=alice, timeout=20) as c:
                assert c.hello()["fps"] == pipe.fps
            with MotionClient(f"tcp://127.0.0.1:{port}", timeout=5) as c, pytest.raises(ServerError):
                c.hello()
    finally:
        ctx.term()


def test_keygen_cli_writes_private_keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backend.serve", "keygen", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=True).stdout
    assert f"--keys {tmp_path}" in out
    assert (tmp_path / "server.key_secret").is_file() and (tmp_path / "authorized" / "client.key").is_file()
    assert (tmp_path / "server.key_secret").stat().st_mode & 0o077 == 0, "secret keys must be private"
    assert not (tmp_path / "authorized" / "client.key_secret").exists()
    assert CurveKeys.from_dir(tmp_path).secret


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "backend.serve", "--config", "tiny", *args], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"on (tcp://\S+)", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the log
            return proc, found.group(1)
    raise AssertionError(f"server did not start (exit {proc.wait()})")


def test_cli_survives_hangs_crashes_and_restarts_and_shuts_down_gracefully(pipe):
    proc, endpoint = _start("--bind", "tcp://127.0.0.1:*")
    try:
        with MotionClient(endpoint, timeout=20) as c:
            assert c.hello()["fps"] > 0
            rid = c.submit(PROMPT, seconds=2.0, steps=1000)
            wait_for(c, rid, "progress")
            c.timeout = 2.0
            proc.send_signal(signal.SIGSTOP)  # a hung server: silent, connection still up
            try:
                error = collect(c, rid)[-1]
            finally:
                proc.send_signal(signal.SIGCONT)
            assert error["code"] == "timeout", error.header
            c.timeout = 20.0
            rid = c.submit(PROMPT, seconds=2.0, steps=1000)
            wait_for(c, rid, "progress")
            proc.kill()  # no goodbye at all: the client notices the dropped connection
            error = collect(c, rid)[-1]
            assert error["code"] == "disconnected", error.header
            proc.wait(timeout=30)

            proc, _ = _start("--bind", endpoint)  # same address, new process
            motion = c.generate_motion(PROMPT, seconds=1.5, seed=4, steps=3)  # the same client object works
            expected = pipe(PROMPT, seconds=1.5, seed=4, steps=3)  # and the CLI serves the same model
            assert np.array_equal(motion.rotations[0], expected.rotations)
            assert np.array_equal(motion.root_translation[0], expected.root_translation)
            rid = c.submit(PROMPT, seconds=2.0, steps=1000)
            wait_for(c, rid, "progress")
            proc.send_signal(signal.SIGTERM)
            error = collect(c, rid)[-1]
            assert error["code"] == "shutting_down", error.header
            assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_server_refuses_keys_folder_without_keys(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="keygen"):
        Server(pipe, "tcp://127.0.0.1:*", keys=tmp_path)


def test_replies_validate_against_the_schema():
    frames = encode({"type": "progress", "id": "r", "step": 1, "total": 2})
    assert decode(frames, reply=True).header == {"version": PROTOCOL_VERSION, "type": "progress", "id": "r",
                                                 "step": 1, "total": 2}


# --- D1-D12: defects found by a soak and fuzz run; each test fails on the server before the fix -----------------


def raw_socket(endpoint: str, **options: int) -> zmq.Socket:
    """A bare DEALER (no client-side checks) connected to ``endpoint``."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.IPV6, endpoint.startswith("tcp://["))
    for option, value in options.items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(endpoint)
    return sock


def raw_reply(sock: zmq.Socket, timeout_ms: int = 10_000) -> Message:
    assert sock.poll(timeout_ms), "no reply"
    return decode(sock.recv_multipart(), reply=True)


def peak_rss(pid: int) -> int:
    """The peak resident memory of a process, in bytes (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_d1_a_message_of_many_frames_is_answered_and_never_joined(pipe):
    """ZeroMQ delivers a multipart message whole, so the transport holds one in-flight message (its size); the
    server must add nothing to that (no copy, no join) and answer it with its id and why."""
    proc, endpoint = _start("--bind", "tcp://127.0.0.1:*")
    try:
        with MotionClient(endpoint, timeout=30) as c:
            c.hello()
        before = peak_rss(proc.pid)
        chunk = bytes(4 * 2**20)  # 49 frames of 4 MiB: each within the per-frame limit, 196 MiB in all
        with contextlib.closing(raw_socket(endpoint)) as sock:
            sock.send_multipart([json.dumps({"type": "ping", "id": "big-1", "version": 1}).encode(), *[chunk] * 49])
            error = raw_reply(sock, 60_000)
        grown = peak_rss(proc.pid) - before
        assert error.type == "error" and error["code"] == "bad_request" and error.id == "big-1", error.header
        assert "50 frames" in error["message"], error["message"]
        assert grown < 1.25 * 49 * len(chunk), f"the server grew by {grown / 2**20:.0f} MiB for a 196 MiB message"
        assert_serves(endpoint, pipe)
    finally:
        proc.kill()
        proc.wait(timeout=30)


class FailingPipeline:
    """The tiny pipeline, except that a batch holding the prompt ``explode`` fails inside the model."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, requests, **options):
        if any(r.prompt == "explode" for r in requests):
            raise RuntimeError(f"the model cannot take this prompt (see {ROOT / 'backend' / 'cannot.txt'})")
        return self._pipe.stream(requests, **options)


@pytest.mark.parametrize("bad", ["lone surrogate", "model failure"])
def test_d2_a_bad_request_never_fails_the_requests_batched_with_it(pipe, bad):
    server_pipe = FailingPipeline(pipe) if bad == "model failure" else pipe
    with running(server_pipe, batch=True) as srv, MotionClient(srv.endpoint, timeout=20) as c, \
            contextlib.closing(raw_socket(srv.endpoint)) as sock:
        blocker = c.submit(PROMPT, seconds=1.0, steps=30)
        wait_for(c, blocker, "progress")
        good = c.submit(PROMPT, seconds=2.0, seed=3, steps=3)
        prompt = "\ud800 walks" if bad == "lone surrogate" else "explode"
        sock.send_multipart([json.dumps({**GOOD, "id": "bad-2", "prompt": prompt, "seconds": 2.0, "seed": 3,
                                         "steps": 3}).encode()])
        results = collect_all(c, [blocker, good])
        answers = [raw_reply(sock)]
        while answers[-1].type not in ("done", "error"):
            answers.append(raw_reply(sock))
    assert results[good][-1].type == "done", results[good][-1].header
    frames = sorted((m for m in results[good] if m.type == "frames"), key=lambda m: m["start"])
    want = pipe(PROMPT, seconds=2.0, seed=3, steps=3)
    np.testing.assert_allclose(np.concatenate([m.data[:, 3:] for m in frames]).reshape(want.rotations.shape),
                               want.rotations, atol=1e-5)
    error = answers[-1]
    if bad == "lone surrogate":
        assert (error["code"], error.id) == ("bad_request", "bad-2") and "lone surrogate" in error["message"]
    else:
        assert (error["code"], error.id) == ("internal", "bad-2"), error.header
        assert error["message"].endswith("the model cannot take this prompt (see cannot.txt)"), error["message"]


def test_d3_keygen_creates_private_folders_and_secrets(tmp_path):
    code = f"import os; os.umask(0); from backend.serve import keygen; keygen({str(tmp_path / 'k')!r}, ('a', 'b'))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    folder = tmp_path / "k"
    for path in (folder, folder / "authorized"):
        assert path.stat().st_mode & 0o777 == 0o700, f"{path} is {oct(path.stat().st_mode & 0o777)}"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"server.key_secret", "a.key_secret", "b.key_secret", "a.key", "b.key"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, f"{path} is {oct(path.stat().st_mode & 0o777)}"
    assert not list(folder.rglob("*.tmp"))
    assert CurveKeys.from_dir(folder, "b").secret  # still readable by zmq.auth


@pytest.mark.parametrize("field", ["seconds", "guidance", "steps", "seed"])
def test_d4_huge_numbers_get_bad_request(server, field):
    huge = b"9" * 400
    header = json.dumps({**GOOD, "id": "huge-1", field: 0}).encode().replace(f'"{field}": 0'.encode(),
                                                                                 f'"{field}": '.encode() + huge)
    with contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart([header])
        error = raw_reply(sock)
    assert (error.type, error["code"], error.id) == ("error", "bad_request", "huge-1"), error.header
    assert "out of range" in error["message"] and len(error["message"]) < 200
    with pytest.raises(ValueError, match="out of range"):
        request("generate", prompt=PROMPT, **{**{k: GOOD[k] for k in ("seconds", "seed", "guidance", "steps")},
                                              field: 10**400})


def test_d5_error_texts_and_logs_stay_small(server, caplog):
    fields = {f"f{i:06d}": 0 for i in range(250_000)}  # 3.5 MB of unknown fields
    frame = json.dumps({**GOOD, "id": "wide-1", **fields}).encode()
    assert 3_000_000 < len(frame) < 4 * 2**20
    with caplog.at_level("INFO", logger="backend.serve"), contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart([frame])
        assert sock.poll(10_000)
        raw = sock.recv_multipart()
    error = decode(raw, reply=True)
    assert (error["code"], error.id) == ("bad_request", "wide-1")
    assert "unknown field(s) for 'generate': f000000, f000001" in error["message"]
    assert "and 249995 more" in error["message"]
    assert len(raw[0]) < 1000, f"a {len(raw[0])}-byte error reply"
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


def test_d5_the_log_file_is_capped_and_rotated(tmp_path):
    log_file = tmp_path / "cache" / "backend.log"
    proc, endpoint = _start("--bind", "tcp://127.0.0.1:*", "--log-file", str(log_file))
    try:
        unknown = {f"{'x' * 40}{i}": 0 for i in range(6)}  # a ~250-byte log line each
        bad = json.dumps({"type": "ping", "id": "x", "version": 1, **unknown}).encode()
        with contextlib.closing(raw_socket(endpoint)) as sock:
            for _ in range(5000):
                sock.send_multipart([bad])
                raw_reply(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from backend.serve import LOG_BYTES, LOG_FILES

    logs = sorted(log_file.parent.iterdir())
    assert "backend.log.1" in [p.name for p in logs] and len(logs) <= LOG_FILES + 1, logs
    assert all(p.stat().st_size <= LOG_BYTES for p in logs)
    assert "and 1 more" in log_file.read_text()
    assert log_file.parent.stat().st_mode & 0o777 == 0o700


def test_d6_a_client_that_never_reads_is_dropped(pipe, caplog):
    with running(pipe) as srv, caplog.at_level("INFO", logger="backend.serve"):
        flooder = raw_socket(srv.endpoint, RCVHWM=1, RCVBUF=4096)
        try:
            flooder.send_multipart(request("generate", "flood-gen", prompt=PROMPT, seconds=2.0, seed=0,
                                           guidance=2.5, steps=1000, samples=1)[1])
            for i in range(30_000):  # 30,000 pongs it never reads
                flooder.send_multipart(request("ping", f"p{i}")[1])
            deadline = time.monotonic() + 30
            with MotionClient(srv.endpoint, timeout=20) as c:
                while c.ping()["running"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert c.ping()["running"] == 0, "the non-reading client's generation still runs"
        finally:
            flooder.close(linger=0)
        assert any("not reading" in r.getMessage() for r in caplog.records)
        assert sum("not reading" in r.getMessage() for r in caplog.records) < 5, "one log line per client"
        assert_serves(srv.endpoint, pipe)


def test_d8_ipv6_loopback_serves(pipe):
    with running(pipe, "tcp://[::1]:*") as srv, MotionClient(srv.endpoint, timeout=20) as c:
        assert srv.endpoint.startswith("tcp://[::1]:")
        assert c.hello()["fps"] == pipe.fps
        assert c.generate_motion(PROMPT, seconds=1.0, steps=2).rotations[0].shape[1:] == (22, 4)


def test_d9_clients_take_turns_and_one_client_cannot_fill_the_queue(pipe):
    with running(pipe, max_queue=8, batch=False) as srv, MotionClient(srv.endpoint, timeout=20) as a, \
            MotionClient(srv.endpoint, timeout=20) as b:
        hello = a.hello()
        assert hello["limits"]["max_client_queue"] == 2 and hello["limits"]["max_cost"] > 0
        first = a.submit(PROMPT, seconds=1.0, steps=200)  # runs while the others queue up
        wait_for(a, first, "progress")
        flood = [a.submit(PROMPT, seconds=1.0, seed=i, steps=3) for i in range(4)]
        answers = collect_all(a, flood[2:])  # past this client's share of 2
        assert all(m[-1]["code"] == "busy" and "share" in m[-1]["message"] for m in answers.values())
        late = b.submit(PROMPT, seconds=1.0, steps=3)
        done_order = []
        pending = {first: a, flood[0]: a, flood[1]: a, late: b}
        while pending:
            for client in (a, b):
                for message in client.poll(0.02):
                    if message.id in pending and message.type in ("done", "error"):
                        assert message.type == "done", message.header
                        done_order.append(message.id)
                        del pending[message.id]
        assert done_order.index(late) < done_order.index(flood[1]), done_order  # b's turn came before a's 2nd


def test_d9_a_timeline_over_the_cost_cap_is_refused(server):
    with contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart(js({**GOOD, "prompt": "", "steps": 1000, "timeline": [[0, 100, "a person walks"]]}))
        reply = raw_reply(sock)
    assert reply["code"] == "bad_request" and "costs 2000000 frame-steps" in reply["message"], reply.header


def test_d9_a_request_over_the_cost_cap_is_refused(server):
    with contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart([json.dumps({**GOOD, "id": "costly", "seconds": 120.0, "samples": 8,
                                         "steps": 1000}).encode()])
        error = raw_reply(sock)
    assert (error["code"], error.id) == ("bad_request", "costly"), error.header
    assert "frame-steps (2400 frames x 8 samples x 1000 steps); the limit is 500000" in error["message"]


def test_d10_an_oversized_frame_is_answered_with_its_id(server):
    frame = json.dumps({**GOOD, "id": "fat-1", "prompt": "p" * (5 * 2**20)}).encode()  # 5 MiB
    with contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart([frame])
        error = raw_reply(sock)
    assert (error["code"], error.id) == ("bad_request", "fat-1"), error.header
    assert "the limit is 4194304" in error["message"]


def test_d10_a_port_in_use_is_a_clear_error():
    with contextlib.closing(zmq.Context.instance().socket(zmq.ROUTER)) as holder:
        port = holder.bind_to_random_port("tcp://127.0.0.1")
        proc = subprocess.run([sys.executable, "-m", "backend.serve", "--config", "tiny", "--bind",
                               f"tcp://127.0.0.1:{port}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: cannot listen on tcp://127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_d5_a_log_file_that_is_a_symbolic_link_is_refused(tmp_path):
    victim, log = tmp_path / "victim", tmp_path / "backend.log"
    log.symlink_to(victim)
    proc = subprocess.run([sys.executable, "-m", "backend.serve", "--config", "tiny", "--log-file", str(log)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr, proc.stderr
    assert not victim.exists() and "Traceback" not in proc.stderr


def test_d12_hello_names_no_absolute_path(server):
    shipped = pipeline.MotionPipeline.from_checkpoint(device="cpu")
    with running(shipped) as srv, MotionClient(srv.endpoint, timeout=20) as c:
        hello = c.hello()
    texts = re.findall(r'"([^"]*)"', json.dumps(hello))
    assert not [t for t in texts if t.startswith("/") or re.match(r"^[A-Za-z]:\\", t)], texts
    assert hello["model"]["source"] == "default"


def test_a_raw_client_sending_only_prompt_and_seconds_gets_a_motion(server, pipe):
    from addon.wire import GenerateRequest

    with contextlib.closing(raw_socket(server.endpoint)) as sock:
        sock.send_multipart([b'{"type":"hello","id":"h","version":1}'])
        assert raw_reply(sock)["defaults"] == GenerateRequest.defaults() == {
            "seconds": 4.0, "seed": 0, "guidance": 2.5, "steps": 4, "samples": 1}
        sock.send_multipart([json.dumps({"type": "generate", "id": "g1", "version": 1, "prompt": PROMPT,
                                         "seconds": 1.0}).encode()])
        stream = [raw_reply(sock, 60_000)]
        while stream[-1].type not in ("done", "error"):
            stream.append(raw_reply(sock, 60_000))
    assert stream[0].type == "accepted" and stream[-1].type == "done", stream[-1].header
    assert sum(m.type == "progress" for m in stream) == GenerateRequest.steps  # the default steps
    frames = sorted((m for m in stream if m.type == "frames"), key=lambda m: m["start"])
    want = pipe(PROMPT, seconds=1.0)  # the defaults: seed 0, guidance 2.5, GenerateRequest.steps steps, one sample
    got = np.concatenate([m.data for m in frames])
    assert np.array_equal(got[:, 3:].reshape(want.rotations.shape), want.rotations.astype(np.float32))


def test_a_generation_handle_drives_callbacks_and_gives_the_result(client, pipe):
    from addon.wire import GenerateRequest

    seen: dict[str, list] = {"progress": [], "frames": [], "done": [], "error": []}
    gen = client.start(GenerateRequest(PROMPT, seconds=2.0, seed=7, steps=4, samples=2),
                       on_progress=lambda g: seen["progress"].append(g.step),
                       on_frames=lambda g, m: seen["frames"].append((m["sample"], m["start"])),
                       on_done=seen["done"].append, on_error=seen["error"].append)
    motion = gen.result(timeout=60)
    want = pipe(PROMPT, seconds=2.0, seed=7, steps=4, samples=2)
    for got, expected in zip(motion.rotations, want):
        assert np.array_equal(got, expected.rotations.astype(np.float32))
    assert seen["progress"] == [1, 2, 3, 4] and gen.progress == 1.0 and gen.queue == 0
    assert {s for s, _ in seen["frames"]} == {0, 1} and len(seen["frames"]) >= 4
    assert seen["done"] == [gen] and seen["error"] == [] and gen.finished and gen.error is None

    slow = client.start(PROMPT, seconds=2.0, steps=400, on_error=seen["error"].append)
    while slow.step == 0:
        client.poll(0.05)
    slow.cancel()
    with pytest.raises(ServerError, match="cancelled"):
        slow.result(timeout=60)
    assert seen["error"] == [slow] and slow.error.code == "cancelled" and slow.motion is None


def test_start_backend_logs_to_a_private_capped_file_in_the_cache_folder(tmp_path, monkeypatch):
    from addon.client import backend_output, cache_dir, start_backend

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = cache_dir()
    assert folder == tmp_path / "cache" / "motion_mamba" and folder.stat().st_mode & 0o777 == 0o700
    proc = start_backend("tcp://127.0.0.1:*", sys.executable, ROOT, ("--config", "tiny"))
    try:
        deadline = time.monotonic() + 60
        while "serving tiny on tcp://" not in backend_output(folder / "backend.log") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "serving tiny on tcp://" in (folder / "backend.log").read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    (folder / "backend.err").unlink()
    (folder / "backend.err").symlink_to(tmp_path / "victim")  # a planted link is not followed
    with pytest.raises(OSError):
        start_backend("tcp://127.0.0.1:*", sys.executable, ROOT, ("--config", "tiny"))
    assert not (tmp_path / "victim").exists()
    proc = start_backend("tcp://127.0.0.1:*", sys.executable, ROOT, ("--no-such-option",), tmp_path / "b.log")
    assert proc.wait(timeout=60) == 2
    assert "unrecognized arguments: --no-such-option" in backend_output(tmp_path / "b.log")


def test_coverage_and_actions_come_from_the_checkpoints_caption_index(client):
    """With the shipped default's caption index: hello lists its actions, and every accepted reply says how
    close the prompt is to its training captions. The module's server (no index) sends neither."""
    from backend.coverage import CaptionIndex

    assert "actions" not in client.hello()
    plain = client.start("a person sits down on a chair", seconds=0.5, steps=2)
    plain.result(timeout=60)
    assert plain.coverage is None

    indexed = pipeline.MotionPipeline.random(config="tiny", device="cpu", seed=0)
    indexed.captions = CaptionIndex.load(pipeline.DEFAULT_WEIGHTS)
    assert indexed.captions is not None
    with running(indexed) as srv, MotionClient(srv.endpoint, timeout=20) as c:
        assert c.hello()["actions"] == indexed.captions.actions and "waves the right hand" in c.hello()["actions"]
        rids = {prompt: c.submit(prompt, seconds=0.5, steps=2)
                for prompt in ("a person sits down on a chair", "someone waves their right hand")}
        replies = collect_all(c, list(rids.values()))
        for prompt, rid in rids.items():
            accepted = next(m for m in replies[rid] if m.type == "accepted")
            coverage = accepted["coverage"]
            print(f"\n{prompt!r}: {coverage}")
            assert coverage == json.loads(json.dumps(indexed.coverage(prompt).to_wire()))
            assert len(coverage["nearest"]) == 3 and replies[rid][-1].type == "done"
        assert not replies[rids["a person sits down on a chair"]][0]["coverage"]["known"]
        assert replies[rids["someone waves their right hand"]][0]["coverage"]["known"]
