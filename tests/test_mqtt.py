"""MQTT v5 transport against a real mosquitto broker, with our client and the stock CLI clients."""
from __future__ import annotations

import asyncio
import json

import pytest

from clients.mqtt_client import MqttChat
from fixtures_serve import ServerThread, broker  # noqa: F401  (fixture)
from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from videos import pattern_frame

LIMITS = Limits(max_message_bytes=8192, max_frame_bytes=300_000, max_question_chars=300, max_new_tokens=300,
                max_sessions=8, max_push_fps=20)


@pytest.fixture(scope="module")
def server(tiny_llava, broker):  # noqa: F811
    srv = ServerThread(tiny_llava, ws=False, broker_port=broker.port, limits=LIMITS).start()
    yield srv
    srv.stop()


async def test_ask_streams_ordered_deltas_with_correlation(server, broker):  # noqa: F811
    async with MqttChat("127.0.0.1", broker.port, timeout=30, session="cam1") as chat:
        opened = await chat.open()
        assert opened["session"] == "cam1" and opened["resumed"] is False
        for i in range(3):
            await chat.push(pattern_frame(i), t=i * 0.5)
        await asyncio.sleep(0.5)
        answer = chat.ask("What is in the video?", max_tokens=12)
        deltas = [d async for d in answer]
        assert deltas and answer.seqs == list(range(len(deltas)))
        assert answer.usage["finish_reason"] in ("stop", "length") and answer.usage["ttft_s"] > 0
        st = await chat.status()
        assert st["frames_seen"] == 3 and st["frames_in_window"] == 3
        # Two asks in flight from one client: each answer's deltas come back under its own correlation data.
        a, b = chat.ask("first?", max_tokens=5), chat.ask("second?", max_tokens=5)
        ta, tb = await asyncio.gather(a.result(), b.result())
        assert ta and tb and a.usage["completion_tokens"] >= 1 and b.usage["completion_tokens"] >= 1


async def test_stock_mosquitto_clients(server, broker, tmp_path):  # noqa: F811
    frame = tmp_path / "f.jpg"
    frame.write_bytes(protocol.encode_frame(pattern_frame(5)))
    events = broker.sub("streamvz/stock/events", count=1)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(broker.pub, "streamvz/stock/control", '{"op":"open"}')
    out, _ = await asyncio.to_thread(events.communicate, timeout=30)
    assert json.loads(out)["op"] == "opened"
    for t in ("0.5", "1.0"):
        await asyncio.to_thread(broker.pub, "streamvz/stock/frames", file=str(frame), props=["user-property", f"t {t}"], qos=0)
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "streamvz/stock/answers/me", "-W", "60",
        stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(broker.pub, "streamvz/stock/ask", '{"text":"What do you see?","max_tokens":8}',
                            props=["response-topic", "streamvz/stock/answers/me", "correlation-data", "abc"])
    msgs = []
    while not msgs or msgs[-1]["op"] not in ("done", "error"):
        msgs.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
    proc.terminate()
    await proc.wait()
    assert msgs[-1]["op"] == "done", msgs[-1]
    tokens = [m for m in msgs if m["op"] == "token"]
    assert [m["seq"] for m in tokens] == list(range(len(tokens))) and tokens
    status_sub = broker.sub("streamvz/stock/events", count=1)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(broker.pub, "streamvz/stock/control", '{"op":"status"}')
    out, _ = await asyncio.to_thread(status_sub.communicate, timeout=30)
    assert json.loads(out)["frames_seen"] == 2


async def test_hostile_messages_get_errors_on_the_events_topic(server, broker):  # noqa: F811
    async with MqttChat("127.0.0.1", broker.port, timeout=30, session="good") as good, \
            MqttChat("127.0.0.1", broker.port, timeout=30, session="bad") as bad:
        await good.open()
        await good.push(pattern_frame(2))
        background = good.ask("Describe.", max_tokens=30)
        for leaf, payload in [("ask", b'{"text":"hi"}'), ("frames", protocol.encode_frame(pattern_frame(1)))]:
            await bad._publish(leaf, payload, 1)  # before `open`
            with pytest.raises(StreamError) as ei:
                await bad.expect("never")
            assert ei.value.code == "unknown_session"
        await bad.open()
        cases = [
            ("control", b"{nope", "bad_json"),
            ("control", b'{"op":"explode"}', "unknown_op"),
            ("control", json.dumps({"op": "open", "source": "../../etc/passwd"}).encode(), "source_not_allowed"),
            ("control", b'{"op":"cancel","id":"zz"}', "unknown_request"),
            ("ask", b'{"text": 5}', "bad_field"),
            ("ask", json.dumps({"text": "x" * 301}).encode(), "question_too_long"),
            ("ask", b'{"op":"close"}', "unknown_op"),
            ("ask", b'{"text":"hi","max_tokens":0}', "bad_field"),
            ("ask", b"\xc3\x28", "bad_json"),
            ("frames", b"PNG....", "bad_frame"),
            ("frames", b"\xff\xd8\xff" + bytes(400_000), "frame_too_large"),
        ]
        for leaf, payload, code in cases:
            await bad._publish(leaf, payload, 1)
            with pytest.raises(StreamError) as ei:
                await bad.expect("never")
            assert ei.value.code == code, (leaf, payload[:30])
        frame = protocol.encode_frame(pattern_frame(3))
        for _ in range(60):  # a flood: 20 frames/s allowed here, the rest dropped with one error
            await bad._publish("frames", frame, 0)
        with pytest.raises(StreamError) as ei:
            await bad.expect("never")
        assert ei.value.code == "rate_limited"
        await asyncio.sleep(0.5)
        assert 15 <= (await bad.status())["frames_seen"] <= 30
        await bad.client.publish("streamvz/bad.dot/control", b'{"op":"open"}', qos=1)  # topic level not an id
        assert await background.result()
        assert (await good.status())["frames_seen"] == 1


async def test_broker_restart_keeps_sessions(server, broker):  # noqa: F811
    async with MqttChat("127.0.0.1", broker.port, timeout=30, session="survivor") as chat:
        await chat.open()
        await chat.push(pattern_frame(7), t=1.0)
        assert await chat.ask("Before?", max_tokens=4).result()
    connects = server.mqtt.connects
    broker.stop()
    await asyncio.sleep(0.5)
    broker.start()
    for _ in range(200):
        if server.mqtt.connects > connects and server.mqtt.connected.is_set():
            break
        await asyncio.sleep(0.05)
    assert server.mqtt.connects == connects + 1
    async with MqttChat("127.0.0.1", broker.port, timeout=30, session="survivor") as chat:
        opened = await chat.open()  # re-open after reconnect: the server still has it
        assert opened["resumed"] is True and opened["frames_seen"] == 1
        assert await chat.ask("After?", max_tokens=4).result()
        await chat.close()


async def test_terminal_mqtt_client(server, broker):  # noqa: F811
    import sys
    from pathlib import Path

    client = str(Path(__file__).resolve().parents[1] / "clients" / "mqtt_client.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, client, "--port", str(broker.port), "--session", "cli", "--ask", "What is shown?",
        "--max-tokens", "4", "--wait", "0.2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().startswith("Q: What is shown?\nA: ") and len(out.decode().splitlines()) >= 2
    assert "session cli" in err.decode()


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs the openssl CLI for a test CA")
async def test_username_password_and_tls(tiny_llava):
    import ssl

    import aiomqtt

    from fixtures_serve import Broker

    secure = Broker(users={"svz": "s3cret"}, tls=True).start()
    tls = ssl.create_default_context(cafile=secure.ca)
    srv = ServerThread(tiny_llava, ws=False, broker_port=secure.port, limits=LIMITS,
                       mqtt_kwargs=dict(username="svz", password="s3cret", tls=tls)).start()
    try:
        async with MqttChat("127.0.0.1", secure.port, session="tls1", username="svz", password="s3cret",
                            tls=tls, timeout=30) as chat:
            await chat.open()
            await chat.push(pattern_frame(4), t=0.0)
            assert await chat.ask("Over TLS?", max_tokens=4).result()
        with pytest.raises(aiomqtt.MqttError):  # wrong password: the broker refuses
            async with MqttChat("127.0.0.1", secure.port, session="x", username="svz", password="nope", tls=tls):
                pass
        with pytest.raises(aiomqtt.MqttError):  # plain TCP to the TLS listener
            async with MqttChat("127.0.0.1", secure.port, session="x", username="svz", password="s3cret",
                                connect_timeout=1):
                pass
    finally:
        srv.stop()
        secure.stop()


async def test_idle_sessions_close(tiny_llava, broker):  # noqa: F811
    srv = ServerThread(tiny_llava, ws=False, broker_port=broker.port, limits=LIMITS,
                       mqtt_kwargs=dict(idle_s=1.0, prefix="idle")).start()  # own topics: the module's server shares the broker
    try:
        async with MqttChat("127.0.0.1", broker.port, session="sleepy", prefix="idle", timeout=30) as chat:
            await chat.open()
            await asyncio.sleep(0.6)
            assert (await chat.status())["frames_seen"] == 0  # activity keeps it open...
            closed = await chat.expect("closed")  # ...silence closes it
            assert closed["reason"] == "idle"
            with pytest.raises(StreamError) as ei:
                await chat.status()
            assert ei.value.code == "unknown_session"
    finally:
        srv.stop()
