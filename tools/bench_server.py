"""Load test of the generation backend: N clients x M requests against `python -m backend.serve`.

    .venv/bin/python tools/bench_server.py [--clients 8] [--requests 25] [--steps 10] [--seconds 2]
                                           [--config tiny] [--modes batch,no-batch,fairness] [--server-root DIR]

For the ``batch`` and ``no-batch`` modes it starts a fresh server process (random-weight ``--config`` model,
loopback, random port), runs every client in its own thread (closed loop: a client sends its next request when
the last one is done), checks that every request got exactly one complete answer (no loss, no duplicates, no
stray ids), and prints latency percentiles (submit -> done) and throughput; a line compares the two.

``fairness``: one client floods the server (keeps the whole queue's worth of requests in flight, resubmitting
whatever is answered ``busy``) while another sends ``--requests`` requests one after another (a different
length, so they are never batched together); prints the quiet client's p50/p99 latency beside the flooder's,
and the quiet client's latency alone as the baseline. ``--server-root`` runs the server of another checkout
(e.g. to compare with one before round robin).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addon.client import MotionClient, ServerError  # noqa: E402
from addon.wire import MotionAssembler  # noqa: E402

PROMPTS = ["a person walks forward", "a person jumps twice", "someone waves with the right hand",
           "a person sits down slowly", "a man runs in a circle", "a person kicks with the left leg"]


def start_server(config: str, batch: bool, max_queue: int, root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """A fresh server process (of the checkout at ``root``) on a random loopback port; returns it and its
    endpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "backend.serve", "--config", config, "--bind", "tcp://127.0.0.1:*",
                             "--max-queue", str(max_queue), "--batch" if batch else "--no-batch"],
                            cwd=root, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"on (tcp://\S+)", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1)
    raise RuntimeError(f"the server did not start (exit code {proc.wait()})")


def run_client(endpoint: str, index: int, requests: int, args: argparse.Namespace, out: dict) -> None:
    """One closed-loop client: its requests one after another; records latencies and what came back."""
    latencies, batches, ids, stray, errors = [], [], [], Counter(), []
    with MotionClient(endpoint, timeout=120) as client:
        for r in range(requests):
            seed = index * 1000 + r
            rid = client.submit(PROMPTS[seed % len(PROMPTS)], seconds=args.seconds, seed=seed, steps=args.steps,
                                request_id=f"c{index}-r{r}")
            ids.append(rid)
            start = time.perf_counter()
            assembler, finished = MotionAssembler(), False
            while not finished:
                for message in client.poll(0.01):
                    if message.id != rid:
                        stray[message.id] += 1
                    elif message.type == "frames":
                        assembler.add(message)  # raises on a duplicated chunk
                    elif message.type == "done":
                        motion = assembler.result(message["frames"])  # raises on a missing chunk
                        assert len(motion.rotations) == 1 and len(motion.rotations[0]) == message["frames"]
                        latencies.append(time.perf_counter() - start)
                        batches.append(message["timings"]["batch"])
                        finished = True
                    elif message.type == "error":
                        errors.append(f"{rid}: {message['code']}: {message['message']}")
                        finished = True
    out[index] = {"latencies": latencies, "batches": batches, "ids": ids, "stray": stray, "errors": errors}


def ping_while(endpoint: str, busy: threading.Event, rtts: list[float]) -> None:
    """Ping every 50 ms while the load runs: the socket loop must answer even mid-generation."""
    with MotionClient(endpoint, timeout=30) as client:
        while busy.is_set():
            rtts.append(client.ping()["rtt_s"])
            time.sleep(0.05)


def bench(args: argparse.Namespace, batch: bool) -> dict:
    """One mode: a fresh server, all clients at once; returns the measurements."""
    proc, endpoint = start_server(args.config, batch, max_queue=max(32, args.clients))
    try:
        with MotionClient(endpoint, timeout=120) as warm:  # first-call warm-up outside the measurement
            warm.generate_motion(PROMPTS[0], seconds=args.seconds, steps=args.steps)
        out: dict[int, dict] = {}
        threads = [threading.Thread(target=run_client, args=(endpoint, i, args.requests, args, out))
                   for i in range(args.clients)]
        busy, rtts = threading.Event(), []
        busy.set()
        pinger = threading.Thread(target=ping_while, args=(endpoint, busy, rtts))
        start = time.perf_counter()
        pinger.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        busy.clear()
        pinger.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies = np.array([x for o in out.values() for x in o["latencies"]])
    ids = [x for o in out.values() for x in o["ids"]]
    return {"wall": wall, "latencies": latencies, "answered": len(latencies), "sent": len(ids),
            "unique": len(set(ids)), "stray": sum(sum(o["stray"].values()) for o in out.values()),
            "errors": [e for o in out.values() for e in o["errors"]],
            "mean_batch": float(np.mean([b for o in out.values() for b in o["batches"]])),
            "ping": np.percentile(rtts, [50, 99]) * 1000}


def sequential(client: MotionClient, requests: int, seconds: float, steps: int) -> tuple[list[float], int]:
    """Latencies (first submit -> done) of ``requests`` requests sent one after another, a ``busy`` answer
    retried 20 ms later; returns them and the number of ``busy`` answers."""
    latencies, busy = [], 0
    for r in range(requests):
        start = time.perf_counter()
        while True:
            try:
                client.generate_motion(PROMPTS[r % len(PROMPTS)], seconds=seconds, seed=r, steps=steps)
                break
            except ServerError as exc:
                if exc.code != "busy":
                    raise
                busy += 1
                time.sleep(0.02)
        latencies.append(time.perf_counter() - start)
    return latencies, busy


def flood(endpoint: str, depth: int, seconds: float, steps: int, stop: threading.Event, out: list[float]) -> None:
    """Keep ``depth`` requests in flight until ``stop``; a ``busy`` answer is retried 20 ms later. Appends the
    latency (first submit -> done) of every request that completed."""
    with MotionClient(endpoint, timeout=120) as client:
        started: dict[str, float] = {}
        retry_at = 0.0
        while not stop.is_set():
            while len(started) < depth and time.monotonic() >= retry_at:
                started[client.submit(PROMPTS[len(out) % len(PROMPTS)], seconds=seconds, steps=steps)] = \
                    time.perf_counter()
            for message in client.poll(0.01):
                if message.type == "done":
                    out.append(time.perf_counter() - started.pop(message.id))
                elif message.type == "error":
                    started.pop(message.id, None)
                    if message["code"] != "busy":
                        raise RuntimeError(f"flood request failed: {message['message']}")
                    retry_at = time.monotonic() + 0.02


def fairness(args: argparse.Namespace) -> dict:
    """The quiet client's latency alone, then beside a flooding client; the flooder's latency too."""
    proc, endpoint = start_server(args.config, batch=True, max_queue=32, root=Path(args.server_root))
    try:
        with MotionClient(endpoint, timeout=300) as quiet:
            quiet.generate_motion(PROMPTS[0], seconds=args.seconds, steps=args.steps)  # warm-up
            alone, _ = sequential(quiet, args.requests, args.seconds * 0.75, args.steps)
            stop, flooded = threading.Event(), []
            flooder = threading.Thread(target=flood, args=(endpoint, 32, args.seconds, args.steps, stop, flooded))
            flooder.start()
            time.sleep(1.0)  # let the flood fill the queue
            try:
                beside, busy = sequential(quiet, args.requests, args.seconds * 0.75, args.steps)
            finally:
                stop.set()
                flooder.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"alone": np.array(alone), "beside": np.array(beside), "flooder": np.array(flooded), "busy": busy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    parser.add_argument("--seconds", type=float, default=2.0, help="motion length per request")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--modes", default="batch,no-batch,fairness")
    parser.add_argument("--server-root", default=str(ROOT), help="checkout whose backend.serve is benchmarked")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the server processes get stopped too
    total = args.clients * args.requests
    print(f"{args.clients} clients x {args.requests} requests = {total}; {args.steps} steps, {args.seconds} s of "
          f"motion each; model: random '{args.config}' on the CPU")
    results = {}
    ok = True
    for mode in args.modes.split(","):
        if mode == "fairness":
            f = fairness(args)
            p = {k: np.percentile(f[k], [50, 99]) if len(f[k]) else (np.nan, np.nan)
                 for k in ("alone", "beside", "flooder")}
            print(f"[fairness] quiet client ({args.requests} requests of {args.seconds * 0.75:g} s, one at a time): "
                  f"alone p50 {p['alone'][0]:.3f} s p99 {p['alone'][1]:.3f} s | beside a flooding client "
                  f"p50 {p['beside'][0]:.3f} s p99 {p['beside'][1]:.3f} s (x{p['beside'][1] / p['alone'][1]:.1f}, "
                  f"{f['busy']} busy answers) | "
                  f"flooder ({len(f['flooder'])} done, 32 in flight) p50 {p['flooder'][0]:.3f} s "
                  f"p99 {p['flooder'][1]:.3f} s")
            continue
        r = bench(args, batch=mode == "batch")
        results[mode] = r
        p50, p95, p99 = np.percentile(r["latencies"], [50, 95, 99]) if r["answered"] else (np.nan,) * 3
        complete = r["answered"] == total and r["unique"] == total and r["stray"] == 0 and not r["errors"]
        ok &= complete
        print(f"[{mode:8s}] answered {r['answered']}/{total} (unique ids {r['unique']}, stray messages "
              f"{r['stray']}, errors {len(r['errors'])}) | latency p50 {p50:.3f} s  p95 {p95:.3f} s  "
              f"p99 {p99:.3f} s | throughput {r['answered'] / r['wall']:.2f} req/s over {r['wall']:.1f} s | "
              f"mean batch {r['mean_batch']:.2f} | ping under load p50 {r['ping'][0]:.1f} ms "
              f"p99 {r['ping'][1]:.1f} ms")
        for error in r["errors"][:5]:
            print("   ", error)
    if {"batch", "no-batch"} <= results.keys():
        on, off = results["batch"], results["no-batch"]
        print(f"batching on vs off: throughput x{(on['answered'] / on['wall']) / (off['answered'] / off['wall']):.2f}, "
              f"p50 latency x{np.median(on['latencies']) / np.median(off['latencies']):.2f}")
    print("all requests answered exactly once" if ok else "FAILED: requests lost, duplicated or in error")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
