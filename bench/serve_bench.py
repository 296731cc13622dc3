"""Transport overhead: websocket and MQTT vs calling the engine directly, 8 concurrent sessions.

One server (engine + websocket + MQTT through a local mosquitto) runs on its own thread and
event loop, as in production. Each round, for each mode, 8 sessions get the same 2 JPEG
frames and then all ask the same question at once (greedy, so every mode generates the same
tokens); we time from the asks to the last `done`, as the client sees it:

  direct  `session.ask` on the server's loop (no transport: the baseline)
  ws      8 websocket clients (clients/ws_chat.py) in this process
  mqtt    8 MQTT v5 clients (clients/mqtt_client.py) through mosquitto

overhead per token = (wall(mode) - wall(direct)) / tokens generated, best of `--rounds`
interleaved rounds (the wall figure moves with the machine's load); transport CPU per token =
(CPU seconds of the server's event-loop thread over the round, mode minus direct) / tokens,
which barely does (the model runs on the engine's worker thread, not the loop thread). The clients share this machine's cores with the server (they run in a separate process), so on a small machine
the figure includes some of the clients' own cost: an upper bound on the server's.

    python bench/serve_bench.py                       # tiny random LLaVA (transport cost dominates)
    python bench/serve_bench.py --model streamvz-tiny --tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
from common import machine, machine_name, table, write_json  # noqa: E402

from clients.mqtt_client import MqttChat  # noqa: E402
from clients.ws_chat import WsChat  # noqa: E402
from fixtures_serve import MOSQUITTO, Broker, ServerThread  # noqa: E402
from streamvz import protocol  # noqa: E402
from streamvz.protocol import Limits  # noqa: E402
from videos import pattern_frame  # noqa: E402

QUESTION = "What is in the video?"


def frames() -> list[tuple[bytes, float]]:
    return [(protocol.encode_frame(pattern_frame(i, (224, 224))), float(i)) for i in range(2)]


async def consume(answer, t0: float) -> tuple[float, int]:
    first, n = None, 0
    async for _ in answer:
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    return first, answer.usage["completion_tokens"]


def direct_round(server: ServerThread, n_sessions: int, tokens: int) -> dict:
    async def run():
        engine = server.service.engine
        sessions = [engine.session() for _ in range(n_sessions)]
        for s in sessions:
            for data, t in frames():  # the same decoded JPEGs the transports deliver
                await s.add_frame(protocol.parse_frame(data).image, t=t)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(consume(s.ask(QUESTION, max_new_tokens=tokens), t0) for s in sessions))
        wall = time.perf_counter() - t0
        await asyncio.gather(*(s.close() for s in sessions))
        return wall, results

    cpu = loop_cpu(server)
    wall, results = server.call(run, timeout=600)
    return _row("direct", wall, results, loop_cpu(server) - cpu)


async def transport_round(kind: str, chats: list, push, tokens: int) -> dict:
    """Open every chat, push the frames with `push(chat, jpeg, t)`, then time one concurrent ask each."""
    for c in chats:
        await c.__aenter__()
        await c.open()
        for data, t in frames():
            await push(c, data, t)
    await _settled(chats)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(consume(c.ask(QUESTION, max_tokens=tokens), t0) for c in chats))
    wall = time.perf_counter() - t0
    for c in chats:
        await c.close()
        await c.__aexit__(None, None, None)
    return _row(kind, wall, results)


async def ws_round(url: str, n_sessions: int, tokens: int) -> dict:
    return await transport_round("ws", [WsChat(url) for _ in range(n_sessions)],
                                 lambda c, data, t: c.ws.send(_with_t(data, t)), tokens)


async def mqtt_round(port: int, n_sessions: int, tokens: int, k: int) -> dict:
    return await transport_round("mqtt", [MqttChat("127.0.0.1", port, session=f"bench{k}-{i}") for i in range(n_sessions)],
                                 lambda c, data, t: c._publish("frames", data, 0, user=[("t", repr(t))]), tokens)


def _with_t(jpeg: bytes, t: float) -> bytes:
    import struct

    header = json.dumps({"t": t, "format": "jpeg"}).encode()
    return protocol.FRAME_MAGIC + struct.pack(">I", len(header)) + header + jpeg


async def _settled(chats):
    """Wait until every session has both frames in its cache, so only the answers are timed."""
    for c in chats:
        for _ in range(600):
            if (await c.status())["frames_in_window"] == 2:
                break
            await asyncio.sleep(0.05)


def _row(mode, wall, results, server_cpu_s=None) -> dict:
    n = sum(r[1] for r in results)
    return {"mode": mode, "wall_s": wall, "tokens": n, "tokens_per_s": n / wall,
            "ttft_median_ms": 1000 * statistics.median(r[0] for r in results), "server_cpu_s": server_cpu_s}


def loop_cpu(server: ServerThread) -> float:
    """CPU seconds of the server's event-loop thread: scheduling, protocol, sockets. The model
    itself runs on the engine's worker thread, so this is where a transport's cost shows."""
    async def now():
        return time.thread_time()
    return server.call(now)


def client_round(server: ServerThread, mode: str, target: str, a, k: int) -> dict:
    """The clients run in their own process (as they would on other machines), so they do not
    compete with the server for this process's GIL; they still share the machine's cores."""
    cmd = [sys.executable, os.path.abspath(__file__), "--client", mode, "--target", target,
           "--sessions", str(a.sessions), "--tokens", str(a.tokens), "--round", str(k)]
    cpu = loop_cpu(server)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["server_cpu_s"] = loop_cpu(server) - cpu
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or streamvz-tiny (default: a tiny random LLaVA)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--client", choices=["ws", "mqtt"], help=argparse.SUPPRESS)  # internal: be the clients
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client == "ws":
        print(json.dumps(asyncio.run(ws_round(a.target, a.sessions, a.tokens))))
        return
    if a.client == "mqtt":
        print(json.dumps(asyncio.run(mqtt_round(int(a.target), a.sessions, a.tokens, a.round))))
        return
    model = a.model
    if model is None:
        from tiny_models import make_tiny_llava

        model = make_tiny_llava(tempfile.mkdtemp(prefix="serve-bench-"))
    broker = Broker().start() if MOSQUITTO else None
    limits = Limits(max_sessions=2 * a.sessions + 2, max_sessions_per_client=2 * a.sessions + 2, max_new_tokens=512)
    server = ServerThread(model, broker_port=broker.port if broker else None, limits=limits,
                          tokens_per_frame=8 if a.model is None else 64).start()
    best: dict[str, dict] = {}
    try:
        for k in range(a.rounds):
            modes = [lambda: direct_round(server, a.sessions, a.tokens), lambda: client_round(server, "ws", server.url, a, k)]
            if broker:
                modes.append(lambda: client_round(server, "mqtt", str(broker.port), a, k))
            rows = [m() for m in modes[k % len(modes):] + modes[:k % len(modes)]]  # rotate: no mode always first
            for r in rows:
                if r["mode"] not in best or r["wall_s"] < best[r["mode"]]["wall_s"]:
                    best[r["mode"]] = dict(r)
                cpu = min(best[r["mode"]].get("min_server_cpu_s", float("inf")), r["server_cpu_s"])
                best[r["mode"]]["min_server_cpu_s"] = cpu
    finally:
        server.stop()
        if broker:
            broker.stop()
    base = best["direct"]
    for r in best.values():
        r["overhead_ms_per_token"] = 1000 * (r["wall_s"] - base["wall_s"]) / max(1, r["tokens"])
        r["overhead_pct"] = 100 * (r["wall_s"] / base["wall_s"] - 1)
        # CPU of the server's event-loop thread per token (a whole round: open, frames, answers);
        # its excess over direct is the transport's own cost, and barely moves with load.
        r["loop_cpu_ms_per_token"] = 1000 * r["min_server_cpu_s"] / max(1, r["tokens"])
        r["transport_cpu_ms_per_token"] = 1000 * (r["min_server_cpu_s"] - base["min_server_cpu_s"]) / max(1, r["tokens"])
    rows = list(best.values())
    caption = (f"Serve: transport overhead, {a.sessions} concurrent sessions x {a.tokens} new tokens "
               f"({'tiny random LLaVA' if a.model is None else a.model}, {machine_name()}, best of {a.rounds}):")
    print(caption)
    print(table(rows, ["mode", "wall_s", "tokens", "tokens_per_s", "ttft_median_ms", "overhead_ms_per_token",
                       "overhead_pct", "loop_cpu_ms_per_token", "transport_cpu_ms_per_token"]))
    write_json("serve", {"machine": machine(), "sessions": a.sessions, "max_tokens": a.tokens, "rounds": a.rounds,
                         "model": a.model or "tiny random LLaVA", "rows": rows}, a.out)


if __name__ == "__main__":
    main()
