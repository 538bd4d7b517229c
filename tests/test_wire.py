"""The wire schema on its own: validation messages, framing, limits, reassembly (no server needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from addon.client import MotionClient
from addon.wire import (
    PROTOCOL_VERSION,
    GenerateRequest,
    Limits,
    Message,
    MotionAssembler,
    WireError,
    decode,
    encode,
    pack_motion,
    request,
    unpack_motion,
)

GOOD = {"type": "generate", "id": "r1", "version": PROTOCOL_VERSION, "prompt": "a person walks", "seconds": 2.0,
        "seed": 3, "guidance": 2.5, "steps": 10, "samples": 1}


def raw(header) -> list[bytes]:
    return [json.dumps(header).encode()]


def test_import_needs_no_torch_or_bpy():
    code = "import sys, addon.wire; print(sorted(m for m in ('torch', 'bpy', 'backend') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_good_request_round_trips():
    rid, frames = request("generate", prompt="a person walks", seconds=2.0, seed=3, guidance=2.5, steps=10,
                          samples=1)
    message = decode(frames, reply=False)
    assert message.type == "generate" and message.id == rid and message["version"] == PROTOCOL_VERSION
    assert message["prompt"] == "a person walks" and message.data is None
    for mtype in ("hello", "ping", "cancel"):
        assert decode(request(mtype, "abc")[1], reply=False).type == mtype


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        ([b"\xff\xfe"], "bad_request", "not valid UTF-8"),
        ([b"{not json"], "bad_request", "not valid JSON"),
        ([b"[1, 2]"], "bad_request", "must be a JSON object"),
        ([b'"hello"'], "bad_request", "must be a JSON object"),
        ([b'{"type": "generate", "id": "x", "version": 1, "prompt": "a", "seconds": NaN, "seed": 0, '
          b'"guidance": 1, "steps": 1, "samples": 1}'], "bad_request", "'seconds' must be a finite number, got nan"),
        ([b'{"type": "ping", "id": "x", "version": 1, "pad": 1' + b"0" * 5000 + b"}"], "bad_request",
         "not acceptable JSON"),
        ([b"[" * 100_000 + b"]" * 100_000], "bad_request", "not acceptable JSON"),
        (raw({"id": "x", "version": 1}), "bad_request", "missing 'type'"),
        (raw({"type": "ping", "version": 1}), "bad_request", "missing 'id'"),
        (raw({"type": "ping", "id": "x"}), "bad_request", "missing 'version'"),
        (raw({"type": "ping", "id": "x", "version": 2}), "version", "version 2 is not supported"),
        (raw({"type": "ping", "id": "x", "version": "1"}), "bad_request", "'version' must be an integer"),
        (raw({"type": "teleport", "id": "x", "version": 1}), "bad_request", "unknown message type 'teleport'"),
        (raw({"type": "done", "id": "x", "version": 1}), "bad_request", "unknown message type 'done'"),
        (raw({"type": "ping", "id": "", "version": 1}), "bad_request", "'id' must be a string"),
        (raw({"type": "ping", "id": 7, "version": 1}), "bad_request", "'id' must be a string"),
        (raw({"type": "ping", "id": "x" * 65, "version": 1}), "bad_request", "'id' must be a string"),
        (raw({"type": "ping", "id": "x", "version": 1, "extra": 1}), "bad_request", "unknown field(s) for 'ping'"),
        (raw({**GOOD, "temperature": 1}), "bad_request", "unknown field(s) for 'generate': temperature"),
        (raw({k: v for k, v in GOOD.items() if k != "prompt"}), "bad_request", "missing field 'prompt'"),
        (raw({**GOOD, "prompt": 5}), "bad_request", "'prompt' must be a string"),
        (raw({**GOOD, "seconds": "2"}), "bad_request", "'seconds' must be a number"),
        (raw({**GOOD, "seconds": True}), "bad_request", "'seconds' must be a number"),
        (raw({**GOOD, "steps": 2.5}), "bad_request", "'steps' must be an integer"),
        (raw({**GOOD, "seed": None}), "bad_request", "'seed' must be an integer"),
        (raw({**GOOD, "samples": [1]}), "bad_request", "'samples' must be an integer"),
        (raw({**GOOD, "prompt": ""}), "bad_request", "prompt is empty"),
        (raw({**GOOD, "prompt": "   "}), "bad_request", "prompt is empty"),
        (raw({**GOOD, "prompt": "x" * 1001}), "bad_request", "prompt is 1001 characters long; the limit is 1000"),
        (raw({**GOOD, "seconds": -1}), "bad_request", "'seconds' must be between"),
        (raw({**GOOD, "seconds": 1e300}), "bad_request", "'seconds' must be between"),
        (raw({**GOOD, "seconds": 0}), "bad_request", "'seconds' must be between"),
        (raw({**GOOD, "steps": 0}), "bad_request", "'steps' must be between 1 and 1000"),
        (raw({**GOOD, "steps": 10**9}), "bad_request", "'steps' must be between"),
        (raw({**GOOD, "steps": 10**30}), "bad_request", "'steps' is out of range"),
        (raw({**GOOD, "samples": 9}), "bad_request", "'samples' must be between 1 and 8"),
        (raw({**GOOD, "seed": -1}), "bad_request", "'seed' must be between"),
        (raw({**GOOD, "guidance": -0.5}), "bad_request", "'guidance' must be between"),
        ([b'{"type":"generate","id":"x","version":1,"prompt":"a","seconds":1e999,"seed":0,"guidance":1,'
          b'"steps":1,"samples":1}'], "bad_request", "'seconds' must be a finite number"),
        ([b'{"type":"generate","id":"x","version":1,"prompt":"a","seconds":-Infinity,"seed":0,"guidance":1,'
          b'"steps":1,"samples":1}'], "bad_request", "'seconds' must be a finite number, got -inf"),
        ([*raw({"type": "ping", "id": "x", "version": 1}), b"\x00" * 8], "bad_request", "carries no data frame"),
        ([], "bad_request", "empty message"),
        ([b" " * (4 * 2**20 + 1)], "bad_request", "the limit is 4194304"),
    ],
)
def test_bad_requests_are_rejected_clearly(frames, code, words):
    with pytest.raises(WireError) as info:
        decode(frames, reply=False)
    assert info.value.code == code
    assert words in str(info.value)


def test_errors_name_the_request_when_they_can():
    with pytest.raises(WireError) as info:
        decode(raw({**GOOD, "id": "req-9", "seconds": float("inf")}), reply=False)
    assert info.value.request_id == "req-9"
    with pytest.raises(WireError) as info:
        decode([b"[]"], reply=False)
    assert info.value.request_id is None


def test_limits_come_from_the_server():
    small = Limits(max_seconds=3.0, max_prompt_chars=10)
    with pytest.raises(WireError, match=r"between 0\.5 and 3\.0"):
        decode(raw({**GOOD, "prompt": "walk", "seconds": 4.0}), reply=False, limits=small)
    with pytest.raises(WireError, match="limit is 10"):
        request("generate", limits=small, **{k: GOOD[k] for k in GOOD if k not in ("type", "id", "version")})
    assert Limits.from_json({**small.to_json(), "future_limit": 1}) == small


def test_frames_round_trip_exactly():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(7, 3)).astype(np.float32)
    rot = rng.normal(size=(7, 22, 4)).astype(np.float32)
    frames = encode({"type": "frames", "id": "r", "sample": 1, "start": 14, "count": 7}, pack_motion(root, rot))
    assert len(frames) == 2 and len(frames[1]) == 7 * (3 + 88) * 4
    message = decode(frames, reply=True)
    assert message["shape"] == [7, 91] and message["dtype"] == "<f4"
    back_root, back_rot = unpack_motion(message.data)
    assert np.array_equal(back_root, root) and np.array_equal(back_rot, rot)
    assert message.data.dtype == np.dtype("<f4")


@pytest.mark.parametrize(
    ("patch", "blob", "words"),
    [
        ({}, b"\x00" * 10, "data frame has 10 bytes"),
        ({"dtype": "<f8"}, None, "dtype must be '<f4'"),
        ({"shape": [2, 91]}, None, "does not match count"),
        ({"shape": [3, 90]}, None, "does not match count"),
        ({"shape": [3, -91]}, None, "non-negative integers"),
        ({"shape": [3]}, None, "two non-negative integers"),
    ],
)
def test_bad_frames_are_rejected(patch, blob, words):
    header = {"type": "frames", "id": "r", "version": 1, "sample": 0, "start": 0, "count": 3, "shape": [3, 91],
              "dtype": "<f4", **patch}
    with pytest.raises(WireError, match=words):
        decode([json.dumps(header).encode(), blob or b"\x00" * (3 * 91 * 4)], reply=True)
    with pytest.raises(WireError, match="carries one data frame"):
        decode([json.dumps(header).encode()], reply=True)


def test_encode_refuses_nan():
    with pytest.raises(ValueError):
        encode({"type": "progress", "id": "r", "step": float("nan"), "total": 1})


def test_pack_motion_checks_shapes():
    with pytest.raises(ValueError, match=r"\(n,3\) and \(n,J,4\)"):
        pack_motion(np.zeros((4, 3)), np.zeros((5, 22, 4)))
    with pytest.raises(ValueError, match=r"\(n, 3 \+ 4J\)"):
        unpack_motion(np.zeros((4, 10)))


def _frames_message(sample: int, start: int, data: np.ndarray) -> Message:
    return decode(encode({"type": "frames", "id": "r", "sample": sample, "start": start, "count": len(data)},
                         data), reply=True)


def test_assembler_reassembles_and_detects_gaps():
    data = np.arange(10 * 11, dtype=np.float32).reshape(10, 11)  # 2 joints
    assembler = MotionAssembler()
    for sample in (1, 0):
        for start in (6, 0, 3):  # out of order on purpose
            assembler.add(_frames_message(sample, start, data[start:start + 3 if start < 6 else 10] + sample))
    result = assembler.result(frames=10, timings={"total_s": 1.0})
    assert len(result.rotations) == 2 and result.rotations[0].shape == (10, 2, 4)
    assert np.array_equal(result.root_translation[1], data[:, :3] + 1)
    with pytest.raises(WireError, match="announced 11"):
        assembler.result(frames=11)
    with pytest.raises(WireError, match="duplicate frames"):
        assembler.add(_frames_message(0, 3, data[3:6]))
    gappy = MotionAssembler()
    gappy.add(_frames_message(0, 0, data[:3]))
    gappy.add(_frames_message(0, 6, data[6:]))
    with pytest.raises(WireError, match=r"frames 3\.\.5 are missing"):
        gappy.result(frames=10)


def test_client_refuses_bad_arguments_before_sending():
    with MotionClient("tcp://127.0.0.1:9", timeout=0.5) as client:  # nothing listens there
        with pytest.raises(ValueError, match="prompt is empty"):
            client.submit("")
        with pytest.raises(ValueError, match="'seconds' must be a finite number"):
            client.submit("walk", seconds=float("nan"))
        with pytest.raises(ValueError, match="'steps' must be an integer"):
            client.submit("walk", steps=2.0)
        with pytest.raises(TimeoutError, match="no 'pong' reply"):
            client.ping(timeout=0.3)
def test_generate_request_defaults_checks_and_header():
    request = GenerateRequest("a person walks")
    assert GenerateRequest.defaults() == {"seconds": 4.0, "seed": 0, "guidance": 2.5, "steps": 4, "samples": 1}
    assert request.check() is request and request.cost(20) == 80 * 1 * 4
    assert GenerateRequest.from_header({"prompt": "a person walks", "type": "generate"}) == request
    assert GenerateRequest.from_header(request.to_header()) == request
    with pytest.raises(WireError, match="costs 2400000 frame-steps"):
        GenerateRequest("walk", seconds=120.0, samples=1, steps=1000).check()
    with pytest.raises(WireError, match="lone surrogate at character 5"):
        GenerateRequest("walk \ud800").check()
    with pytest.raises(WireError, match="'seed' must be an integer"):
        GenerateRequest("walk", seed=1.5).check()
    with pytest.raises(WireError, match="missing field 'prompt'"):
        GenerateRequest.from_header({"seconds": 2.0})


def test_accepted_may_carry_coverage_and_hello_actions():
    from addon.wire import WireError, reply

    coverage = {"known": False, "similarity": 0.37, "nearest": [["a person raises the left hand.", 0.37]]}
    message = decode(reply("accepted", "r1", queue=0, coverage=coverage), reply=True)
    assert message["coverage"] == coverage and message.get("coverage") is not None
    assert decode(reply("accepted", "r1", queue=0), reply=True).get("coverage") is None  # optional
    with pytest.raises(WireError, match="coverage"):
        reply("accepted", "r1", queue=0, coverage=[True, 0.3])
    hello = {"model": {}, "device": "cpu", "fps": 20.0, "skeleton": {}, "limits": {}}
    assert decode(reply("hello", "h", **hello, actions=["walks forward"]), reply=True)["actions"] == ["walks forward"]
    with pytest.raises(WireError, match="actions"):
        reply("hello", "h", **hello, actions="walks forward")
