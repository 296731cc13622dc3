"""MQTT v5 transport: protocol v1 over per-session topics on a broker (aiomqtt).

Topics, with P the prefix (default "streamvz") and S a session id the client picks:
  P/S/control  JSON open | status | cancel | close          (QoS 1)
  P/S/frames   binary JPEG or header+payload; user property t = seconds  (QoS 0)
  P/S/ask      JSON ask, with the MQTT v5 response topic + correlation data  (QoS 1)
  P/S/events   what the server says without a response topic: opened, status, errors
Answers go to the ask's response topic (default P/S/answers), each message carrying the
ask's correlation data: `token` deltas at QoS 0 with `seq` (reorder/gap detection) and one
`done` (or `error`) at QoS 1. The server reconnects when the broker goes away and keeps its
sessions meanwhile; clients re-publish to the same topics.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.transports.service import PeerGone, Service

log = logging.getLogger("streamvz.mqtt")


class MqttServer:
    """`async with MqttServer(service, port=1883) as srv:` runs until exit, reconnecting as needed."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 1883, prefix: str = "streamvz",
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 client_id: str | None = None, idle_s: float | None = 600.0):
        self.service, self.host, self.port, self.prefix = service, host, port, prefix
        self.username, self.password, self.tls, self.client_id = username, password, tls, client_id
        self.idle_s = idle_s  # close a session after this long without a message for it (None: never)
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()  # set while subscribed (tests and the CLI wait on it)
        self.connects = 0
        self._task = None
        self._n = 0

    async def __aenter__(self):
        self._task = asyncio.create_task(self.run())
        self._sweeper = asyncio.create_task(self._sweep()) if self.idle_s else None
        return self

    async def __aexit__(self, *exc):
        pending = {t for t in (self._task, self._sweeper) if t is not None}
        while pending:
            # Cancel again if a cancellation got lost: one inside the MQTT client's own waits
            # (Python 3.11's wait_for can swallow it) would otherwise leave us waiting forever.
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)

    async def _sweep(self):
        while True:
            await asyncio.sleep(max(0.1, self.idle_s / 4))
            for sid in await self.service.close_idle(self.idle_s, prefix="mqtt:"):
                try:
                    await self._sender(f"{self.prefix}/{sid}/events", None)("closed", session=sid, reason="idle")
                except PeerGone:
                    pass

    async def run(self):
        delay = 0.2
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          tls_context=self.tls, identifier=self.client_id,
                                          protocol=aiomqtt.ProtocolVersion.V5, keepalive=10) as client:
                    for leaf, qos in (("control", 1), ("frames", 0), ("ask", 1)):
                        await client.subscribe(f"{self.prefix}/+/{leaf}", qos=qos)
                    self.client = client
                    self.connects += 1
                    self.connected.set()
                    delay = 0.2
                    log.info("mqtt: connected to %s:%d", self.host, self.port)
                    async for message in client.messages:
                        await self._on_message(message)
            except aiomqtt.MqttError as e:
                log.warning("mqtt: broker connection lost (%s); retrying in %.1fs", e, delay)
            self.client = None
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # --- publishing ----------------------------------------------------------------------
    async def publish(self, topic: str, text: str, qos: int, correlation: bytes | None = None):
        client = self.client
        if client is None:
            raise PeerGone()
        props = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            props.CorrelationData = correlation
        try:
            await client.publish(topic, text.encode(), qos=qos, properties=props)
        except aiomqtt.MqttError:
            raise PeerGone() from None

    def _sender(self, topic: str, correlation: bytes | None):
        async def send(op, **fields):
            # Deltas ride QoS 0 (cheap, ordered on one connection, `seq` exposes gaps); the
            # final message is QoS 1 so a client always learns that the answer ended.
            await self.publish(topic, protocol.dump(op, **fields), 0 if op == "token" else 1, correlation)
        return send

    # --- incoming ------------------------------------------------------------------------
    async def _on_message(self, message: aiomqtt.Message):
        parts = message.topic.value.split("/")
        if len(parts) != 3 or parts[0] != self.prefix:
            return
        sid, leaf = parts[1], parts[2]
        props = message.properties
        reply_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        events = f"{self.prefix}/{sid}/events"
        rid = None
        send = self._sender(events, correlation)
        try:
            if not protocol.SESSION_ID_RE.match(sid):
                raise StreamError("bad_field", "session ids are 1-64 of [A-Za-z0-9_-]", field="session")
            if reply_topic is not None:
                if any(c in reply_topic for c in "+#") or reply_topic.startswith("$") or len(reply_topic) > 256:
                    raise StreamError("bad_field", "response topic must be a plain topic name", field="response_topic")
                send = self._sender(reply_topic, correlation)
            payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload).encode()
            if leaf == "frames":
                entry = self.service.get(sid)
                t = _user_property(props, "t")
                try:
                    t = float(t) if t is not None else None
                except ValueError:
                    raise StreamError("bad_frame", "user property t must be a number of seconds") from None
                await self.service.frame(entry, bytes(payload), t)
            elif leaf == "ask":
                msg = self._parse(payload, default_op="ask")
                if msg["op"] != "ask":
                    raise StreamError("unknown_op", "the ask topic takes only `ask`")
                rid = msg["id"]
                if reply_topic is None:
                    send = self._sender(f"{self.prefix}/{sid}/answers", correlation)
                self.service.ask(self.service.get(sid), msg, send)
            elif leaf == "control":
                msg = self._parse(payload)
                rid = msg.get("id")
                await self._control(sid, msg, send)
        except StreamError as e:
            try:
                await send("error", code=e.code, message=e.message, session=sid, **({"id": rid} if rid else {}))
            except PeerGone:
                pass
        except PeerGone:
            pass
        except Exception as e:  # a bug must cost one message, not the transport
            log.exception("mqtt message on %s failed", message.topic.value)
            try:
                await send("error", code="internal_error", message=f"{type(e).__name__}: {e}"[:300], session=sid)
            except PeerGone:
                pass

    def _parse(self, payload: bytes, default_op: str | None = None) -> dict:
        if len(payload) > self.service.limits.max_message_bytes:
            raise StreamError("message_too_large", f"messages are limited to {self.service.limits.max_message_bytes} bytes")
        try:
            obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=protocol._reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise StreamError("bad_json", f"not valid JSON: {str(e)[:120]}") from None
        if default_op and isinstance(obj, dict):
            obj.setdefault("op", default_op)
            if obj["op"] == default_op and "id" not in obj:
                self._n += 1
                obj["id"] = f"m{self._n}"
        return protocol.validate(obj, self.service.limits)

    async def _control(self, sid: str, msg: dict, send):
        op = msg["op"]
        if op == "open":
            if "session" in msg and msg["session"] != sid:
                raise StreamError("bad_field", "over MQTT the session id is the topic level", field="session")
            if "source" in msg:  # checked even on a re-open, so a bad path is never silently ignored
                self.service.sources.check(msg["source"])
            resumed = sid in self.service.entries
            if resumed:
                entry = self.service.get(sid)
            else:
                events = self._sender(f"{self.prefix}/{sid}/events", None)
                # Over MQTT the broker's ACLs decide who may publish to a session's topics, so
                # the per-client cap is per session topic; the server-wide cap still holds.
                entry = await self.service.open({k: v for k, v in msg.items() if k != "session"}, f"mqtt:{sid}",
                                                events, session_id=sid)
            await send("opened", session=sid, resumed=resumed, limits=self.service.limits.public(),
                       **self.service.status(entry))
            self.service.start(entry)
        elif op == "status":
            entry = self.service.get(sid)
            await send("status", session=sid, **self.service.status(entry))
        elif op == "preview":
            entry = self.service.get(sid)
            await send("preview", session=sid, **await self.service.preview(entry))
        elif op == "cancel":
            self.service.cancel(self.service.get(sid), msg["id"])
        elif op == "close":
            await self.service.close(self.service.get(sid))
            await send("closed", session=sid)
        else:
            raise StreamError("unknown_op", f"the control topic takes open/status/preview/cancel/close, not {op!r}")


def _user_property(props, key: str):
    for k, v in (getattr(props, "UserProperty", None) or []) if props else []:
        if k == key:
            return v
    return None
