"""Faults are told (issue 23.6): a server that stops or is away from the broker never leaves
a client waiting in silence -- every answer ends with `done` or `error`."""
from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

from clients.mqtt_client import MqttChat
from clients.ws_chat import WsChat
from fixtures_serve import ServerThread, broker  # noqa: F401  (fixture)
from streamvz.errors import StreamError
from videos import pattern_frame

ROOT = Path(__file__).resolve().parents[1]


async def _end(answer) -> str:
    """How an answer ended: its finish_reason, or 'error:<code>'."""
    try:
        await answer.result()
    except StreamError as e:
        return f"error:{e.code}"
    return answer.usage["finish_reason"]


async def test_sigterm_ends_every_answer_on_both_transports(tiny_llava, broker):  # noqa: F811
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run_stream.py"), "serve", "--model", tiny_llava, "--tokens-per-frame", "8",
        "--transport", "both", "--port", "0", "--broker-port", str(broker.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "serve exited early"
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
            port = m and int(m.group(1))
        async with WsChat(f"ws://127.0.0.1:{port}/ws") as ws, \
                MqttChat("127.0.0.1", broker.port, session="term", timeout=60) as mq:
            await ws.open()
            await ws.push(pattern_frame(1))
            await mq.open()
            asks = [c.ask(f"Question {i}: describe it all.", max_tokens=500) for c in (ws, mq) for i in range(3)]
            first = asks[0]
            await first.__anext__()  # answers are streaming now
            proc.send_signal(signal.SIGTERM)
            ends = await asyncio.wait_for(asyncio.gather(*(_end(a) for a in asks)), 60)
        assert all(e in ("stop", "length", "shutdown") or e.startswith("error:") for e in ends), ends
        assert "shutdown" in ends[:3] and "shutdown" in ends[3:], ends  # in flight on each transport
        assert await asyncio.wait_for(proc.wait(), 30) == 143  # stopped by SIGTERM, through its own cleanup
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_requests_sent_while_the_server_is_off_the_broker_are_answered(tiny_llava, broker):  # noqa: F811
    limits = dict(ws=False, broker_port=broker.port, mqtt_kwargs=dict(prefix="away"))
    ServerThread(tiny_llava, **limits).start().stop()  # it was here once; now it is away
    async with MqttChat("127.0.0.1", broker.port, session="late", prefix="away", timeout=60) as chat:
        await chat.control(op="open")
        answer = chat.ask("Anyone there?", max_tokens=3)
        await asyncio.sleep(0.5)  # both requests now wait in the broker
        srv = await asyncio.to_thread(lambda: ServerThread(tiny_llava, **limits).start())
        try:
            opened = await chat.expect("opened")
            assert opened["session"] == "late" and opened["resumed"] is False
            assert await answer.result() and answer.usage["finish_reason"] in ("stop", "length")
        finally:
            await asyncio.to_thread(srv.stop)


async def test_requests_the_client_gave_up_on_expire_and_never_run(tiny_llava, broker):  # noqa: F811
    limits = dict(ws=False, broker_port=broker.port, mqtt_kwargs=dict(prefix="gone"))
    ServerThread(tiny_llava, **limits).start().stop()
    async with MqttChat("127.0.0.1", broker.port, session="stale", prefix="gone", timeout=2) as chat:
        with pytest.raises(StreamError) as ei:
            await chat.open()
        assert ei.value.code == "request_expired"
        answer = chat.ask("Too late?", max_tokens=3)
        with pytest.raises(StreamError) as ei:
            await answer.result()
        assert ei.value.code == "request_expired"
    await asyncio.sleep(1.0)  # past the requests' 2 s message expiry
    srv = await asyncio.to_thread(lambda: ServerThread(tiny_llava, **limits).start())
    try:
        await asyncio.sleep(1.0)

        async def ids():
            return set(srv.service.entries)
        assert srv.call(ids) == set()  # the stale `open` expired in the broker: it never ran
    finally:
        await asyncio.to_thread(srv.stop)
