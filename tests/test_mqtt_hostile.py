"""Hostile MQTT messages against a real server and a real mosquitto (issue 23).

Each test has a bystander session answering meanwhile: a bad message costs its sender an
`error` and nothing else -- no lost broker connection, no lost answer elsewhere.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from clients.mqtt_client import MqttChat
from fixtures_serve import Broker, ServerThread, broker  # noqa: F401  (fixture)
from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from videos import pattern_frame

LIMITS = Limits(max_message_bytes=8192, max_frame_bytes=300_000, max_question_chars=300, max_new_tokens=300,
                max_sessions=8, max_push_fps=20)
ACL = Path(__file__).resolve().parents[1] / "docs" / "mosquitto-acl.conf"


@pytest.fixture(scope="module")
def server(tiny_llava, broker):  # noqa: F811
    srv = ServerThread(tiny_llava, ws=False, broker_port=broker.port, limits=LIMITS).start()
    yield srv
    srv.stop()


class Raw:
    """A plain MQTT v5 client that sets any properties (what a hostile client can send)."""

    def __init__(self, port: int, *subscriptions: str, **kw):
        self.port, self.subscriptions, self.kw = port, subscriptions, kw
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self):
        self.client = aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5, **self.kw)
        await self.client.__aenter__()
        for topic in self.subscriptions:
            await self.client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc):
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.__aexit__(*exc)

    async def _read(self):
        async for m in self.client.messages:
            corr = getattr(m.properties, "CorrelationData", None) if m.properties else None
            self.inbox.put_nowait((m.topic.value, corr, json.loads(m.payload)))

    async def publish(self, topic, payload, qos=1, response_topic=None, correlation=None, user=None, retain=False):
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        if user:
            props.UserProperty = user
        await self.client.publish(topic, payload, qos=qos, properties=props, retain=retain)

    async def next(self, timeout=30):
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def until_final(self, timeout=60):
        """Messages up to the first `done`/`error` (an answer's end)."""
        out = []
        while not out or out[-1][2]["op"] not in ("done", "error"):
            out.append(await self.next(timeout))
        return out


async def _bystander(port, session="victim", **kw):
    chat = MqttChat("127.0.0.1", port, timeout=60, session=session, **kw)
    await chat.__aenter__()
    await chat.open()
    await chat.push(pattern_frame(2), t=0.0)
    return chat


async def test_bad_response_topics_cost_one_request(server, broker):  # noqa: F811
    """An empty response topic once made the broker drop the server (every answer died)."""
    connects = server.mqtt.connects
    victim = await _bystander(broker.port)
    try:
        long = victim.ask("Describe everything.", max_tokens=200)
        async with Raw(broker.port, "streamvz/evil/events", "streamvz/evil/answers/#") as evil:
            await evil.publish("streamvz/evil/control", b'{"op":"open"}')
            assert (await evil.next())[2]["op"] == "opened"
            ask = b'{"text":"hi","max_tokens":3}'
            cases = [
                ("ask", ask, "", None, "bad_field", "response_topic"),
                ("control", b'{"op":"status"}', "", None, "bad_field", "response_topic"),
                ("ask", ask, "streamvz/evil/answers/" + "x" * 300, None, "bad_field", "response_topic"),
                ("ask", ask, "streamvz/victim/control", None, "topic_not_allowed", "response_topic"),
                ("ask", ask, "streamvz/victim/answers", None, "topic_not_allowed", "response_topic"),
                ("control", b'{"op":"status"}', "streamvz/victim/events", None, "topic_not_allowed", "response_topic"),
                ("ask", ask, "some/other/app", None, "topic_not_allowed", "response_topic"),
                ("ask", ask, "streamvz/evil/answers/me", b"c" * 1000, "bad_field", "correlation_data"),
            ]
            for leaf, payload, topic, corr, code, field in cases:
                await evil.publish(f"streamvz/evil/{leaf}", payload, response_topic=topic, correlation=corr)
                where, _, msg = await evil.next()
                assert where == "streamvz/evil/events", (topic, msg)
                assert (msg["op"], msg["code"], msg.get("field")) == ("error", code, field), (topic, msg)
            # The sender's own reply space works, with its correlation data on every message.
            await evil.publish("streamvz/evil/ask", ask, response_topic="streamvz/evil/answers/me", correlation=b"k1")
            answer = await evil.until_final()
            assert answer[-1][2]["op"] == "done" and {(t, c) for t, c, _ in answer} == {("streamvz/evil/answers/me", b"k1")}
        assert await long.result() and long.usage["finish_reason"] in ("stop", "length")
        assert server.mqtt.connects == connects  # the server never lost the broker
    finally:
        await victim.__aexit__(None, None, None)


async def test_stock_client_reply_prefix_is_refused_unless_allowed(tiny_llava, broker):  # noqa: F811
    srv = ServerThread(tiny_llava, ws=False, broker_port=broker.port, limits=LIMITS,
                       mqtt_kwargs=dict(prefix="pfx", reply_prefixes=("replies/",))).start()
    try:
        async with Raw(broker.port, "pfx/s1/events", "replies/#", "elsewhere/#") as c:
            await c.publish("pfx/s1/control", b'{"op":"open"}')
            assert (await c.next())[2]["op"] == "opened"
            await c.publish("pfx/s1/ask", b'{"text":"hi","max_tokens":2}', response_topic="replies/me", correlation=b"a")
            msgs = await c.until_final()
            assert msgs[-1][2]["op"] == "done" and msgs[-1][0] == "replies/me"
            await c.publish("pfx/s1/ask", b'{"text":"hi","max_tokens":2}', response_topic="elsewhere/me")
            where, _, msg = await c.next()
            assert where == "pfx/s1/events" and msg["code"] == "topic_not_allowed"
            await c.publish("pfx/s1/ask", b'{"text":"hi","max_tokens":2}', response_topic="repliesX/me")
            assert (await c.next())[2]["code"] == "topic_not_allowed"  # a prefix ends at a topic level
    finally:
        srv.stop()


async def test_retained_requests_never_act(tiny_llava, broker):  # noqa: F811
    """A retained `open`/`ask` left on the broker is not replayed to a (re)started server."""
    async with Raw(broker.port) as c:
        await c.publish("ret/ghost/control", b'{"op":"open"}', retain=True)
        await c.publish("ret/ghost2/control", b'{"op":"open"}', retain=True)
        await c.publish("ret/ghost2/ask", b'{"text":"again?","max_tokens":2}', retain=True)
    srv = ServerThread(tiny_llava, ws=False, broker_port=broker.port, limits=LIMITS,
                       mqtt_kwargs=dict(prefix="ret")).start()
    try:
        async with Raw(broker.port, "ret/ghost2/answers") as c:
            await asyncio.sleep(1.0)
            assert c.inbox.empty()
            assert srv.call(lambda: _ids(srv)) == set()
            # A live message still works, also one sent with the retain flag: it acts once, now.
            await c.publish("ret/live/control", b'{"op":"open"}')
            for _ in range(100):
                if "live" in srv.call(lambda: _ids(srv)):
                    break
                await asyncio.sleep(0.05)
            assert srv.call(lambda: _ids(srv)) == {"live"}
    finally:
        async with Raw(broker.port) as c:  # clear the retained messages for other tests
            for t in ("ret/ghost/control", "ret/ghost2/control", "ret/ghost2/ask"):
                await c.publish(t, b"", retain=True)
        srv.stop()


async def _ids(srv):
    return set(srv.service.entries)


async def test_acl_example_keeps_clients_in_their_own_session(tiny_llava):
    """docs/mosquitto-acl.conf: each user owns the session named like it; the server writes only
    events/answers. The server's own topic check stops what the ACL cannot (its account may write
    every session's answers)."""
    users = {"streamvz": "srv-pw", "alice": "a-pw", "bob": "b-pw"}
    secure = Broker(users=users, acl=str(ACL)).start()
    srv = ServerThread(tiny_llava, ws=False, broker_port=secure.port, limits=LIMITS,
                       mqtt_kwargs=dict(username="streamvz", password="srv-pw")).start()
    try:
        async with MqttChat("127.0.0.1", secure.port, session="alice", username="alice", password="a-pw",
                            timeout=30) as alice, \
                MqttChat("127.0.0.1", secure.port, session="bob", username="bob", password="b-pw", timeout=30) as bob:
            await alice.open()
            await bob.open()
            await bob.push(pattern_frame(1), t=0.0)
            assert await alice.ask("Mine?", max_tokens=3).result()
            bobs = bob.ask("Long answer please.", max_tokens=120)
            async with Raw(secure.port, "streamvz/bob/#", "streamvz/alice/events",
                           username="alice", password="a-pw") as mallory:
                await mallory.publish("streamvz/bob/control", b'{"op":"close"}')  # the broker drops it
                await mallory.publish("streamvz/alice/ask", b'{"text":"x"}', response_topic="streamvz/bob/answers/x")
                where, _, msg = await mallory.next()
                assert where == "streamvz/alice/events" and msg["code"] == "topic_not_allowed"
                assert await bobs.result() and bobs.usage["finish_reason"] in ("stop", "length")
                assert (await bob.status())["frames_seen"] == 1  # bob's session is still open
                await asyncio.sleep(0.3)
                assert mallory.inbox.empty()  # nothing of bob's reached alice's account
    finally:
        srv.stop()
        secure.stop()


async def test_user_properties_and_unicode_are_checked_and_errors_name_the_field(server, broker):  # noqa: F811
    victim = await _bystander(broker.port, session="victim2")
    try:
        async with MqttChat("127.0.0.1", broker.port, timeout=30, session="badt") as bad:
            await bad.open()
            frame = protocol.encode_frame(pattern_frame(1))
            for t in ("nan", "inf", "-1", "1e400", "soon", "1e10"):
                await bad._publish("frames", frame, 1, user=[("t", t)])
                with pytest.raises(StreamError) as ei:
                    await bad.expect("never")
                assert ei.value.code == "bad_frame", t
            assert (await bad.status())["frames_seen"] == 0
            async with Raw(broker.port, "streamvz/badt/events", "streamvz/badt/answers") as raw:
                await raw.publish("streamvz/badt/ask", b'{"text":5}')
                msg = (await raw.next())[2]
                assert (msg["code"], msg["field"]) == ("bad_field", "text")
                await raw.publish("streamvz/badt/frames", frame, user=[("t", "-5")])
                msg = (await raw.next())[2]
                assert (msg["code"], msg["field"]) == ("bad_frame", "t")
                # Lone surrogates (JSON escapes) never reach the tokenizer or an error message.
                await raw.publish("streamvz/badt/ask", rb'{"text":"hi \ud800"}')
                msg = (await raw.next())[2]
                assert (msg["code"], msg["field"]) == ("bad_field", "text")
                await raw.publish("streamvz/badt/control", rb'{"op":"open","system_prompt":"\udfff"}')
                msg = (await raw.next())[2]
                assert (msg["code"], msg["field"]) == ("bad_field", "system_prompt")
        assert (await victim.status())["frames_seen"] == 1
    finally:
        await victim.__aexit__(None, None, None)


async def test_one_transport_cannot_drive_the_others_sessions(tiny_llava, broker):  # noqa: F811
    from clients.ws_chat import WsChat

    srv = ServerThread(tiny_llava, broker_port=broker.port, limits=LIMITS, mqtt_kwargs=dict(prefix="both")).start()
    try:
        async with WsChat(srv.url) as web, MqttChat("127.0.0.1", broker.port, session="mq", prefix="both",
                                                    timeout=30) as mq:
            sid = (await web.open())["session"]
            await web.push(pattern_frame(1))
            await mq.open()
            async with Raw(broker.port, f"both/{sid}/events", f"both/{sid}/answers") as raw:
                await raw.publish(f"both/{sid}/ask", b'{"text":"hijack?"}')
                assert (await raw.next())[2]["code"] == "unknown_session"
                await raw.publish(f"both/{sid}/control", b'{"op":"close"}')
                assert (await raw.next())[2]["code"] == "unknown_session"
                await raw.publish(f"both/{sid}/control", b'{"op":"open"}')
                assert (await raw.next())[2]["code"] == "session_exists"
            async with WsChat(srv.url) as other:
                with pytest.raises(StreamError) as ei:
                    await other.open(session="mq", resume="guess")
                assert ei.value.code == "unknown_session"
            assert (await web.status())["frames_seen"] == 1  # untouched
            assert await mq.ask("Mine still?", max_tokens=2).result()
    finally:
        srv.stop()
