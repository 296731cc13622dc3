"""MQTT v5 transport: protocol v1 over per-session topics on a broker (aiomqtt).

Topics, with P the prefix (default "streamvz") and S a session id the client picks:
  P/S/control  JSON open | status | cancel | close          (QoS 1)
  P/S/frames   binary JPEG or header+payload; user property t = seconds  (QoS 0)
  P/S/ask      JSON ask, with the MQTT v5 response topic + correlation data  (QoS 1)
  P/S/events   what the server says without a response topic: opened, status, errors
Answers go to the ask's response topic (default P/S/answers), each message carrying the
ask's correlation data: `token` deltas at QoS 0 with `seq` (reorder/gap detection) and one
`done` (or `error`) at QoS 1. The server reconnects when the broker goes away and keeps its
sessions meanwhile; clients re-publish to the same topics. A response topic must lie in the
session's own reply space (see topics.py); retained requests are ignored.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.transports import presence
from streamvz.transports.service import PeerGone, Service
from streamvz.transports.topics import Topics

log = logging.getLogger("streamvz.mqtt")


class MqttServer:
    """`async with MqttServer(service, port=1883) as srv:` runs until exit, reconnecting as needed."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 1883, prefix: str = "streamvz",
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 client_id: str | None = None, idle_s: float | None = 600.0, keepalive: int = 10,
                 worker_id: str | None = None, reply_prefixes: tuple[str, ...] = (), session_expiry_s: int = 300):
        self.service, self.host, self.port, self.prefix = service, host, port, prefix
        self.topics = Topics(prefix, tuple(reply_prefixes))
        self.username, self.password, self.tls = username, password, tls
        # A stable client id and a broker session that outlives a disconnect: QoS 1 requests
        # published while the server is off the broker (restarting, reconnecting) wait there
        # for up to `session_expiry_s` and are answered when it is back. Two servers sharing a
        # broker and prefix need distinct ids.
        # Pool workers (a worker_id) get one each: two clients with one id knock each other off the broker.
        self.client_id = client_id or f"streamvz-server-{prefix}" + (f"-{worker_id}" if worker_id else "")
        self.session_expiry_s = session_expiry_s
        self.idle_s = idle_s  # close a session after this long without a message for it (None: never)
        # The broker declares us dead (and publishes our will) 1.5 x keepalive after we go silent.
        self.keepalive = keepalive
        self.worker_id = worker_id or client_id or presence.new_worker_id()  # named in `opened`
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
        await self._say_down()
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
                    await self._sender(self.topics.events(sid), None)("closed", session=sid, reason="idle")
                except PeerGone:
                    pass

    async def run(self):
        delay = 0.2
        while True:
            try:
                connect = Properties(PacketTypes.CONNECT)
                connect.SessionExpiryInterval = self.session_expiry_s
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          tls_context=self.tls, identifier=self.client_id,
                                          protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.keepalive,
                                          will=presence.will(self.prefix, self.worker_id),
                                          clean_start=self.session_expiry_s == 0, properties=connect) as client:
                    for topic, qos in self.subscriptions():
                        await client.subscribe(topic, options=self.subscribe_options(topic, qos))
                    self.client = client
                    await self.announce()
                    self.connects += 1
                    self.connected.set()
                    delay = 0.2
                    log.info("mqtt: connected to %s:%d", self.host, self.port)
                    async for message in client.messages:
                        await self.dispatch(message)
            except aiomqtt.MqttError as e:
                log.warning("mqtt: broker connection lost (%s); retrying in %.1fs", e, delay)
            self.client = None
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def subscribe_options(self, topic: str, qos: int) -> SubscribeOptions:
        """retainHandling=2 on request topics: the broker sends no retained request on subscribe (a
        retained `close` or `ask` must not act again after a restart). Worker announcements
        (P/workers/...) are retained state a pool reads on subscribe, so those keep it."""
        state = topic.startswith(f"{self.prefix}/workers/")
        return SubscribeOptions(qos=qos, retainHandling=0 if state else 2)

    # --- hooks a pool worker (streamvz/transports/pool.py) overrides ----------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters (with QoS) to subscribe on every (re)connect: here every session's."""
        return [(f"{self.prefix}/+/{leaf}", qos) for leaf, qos in (("control", 1), ("frames", 0), ("ask", 1))]

    async def dispatch(self, message: aiomqtt.Message) -> None:
        await self._on_message(message)

    def load(self) -> dict:
        """Fields of the retained `up` announcement on P/workers/<id>."""
        return {"sessions": len(self.service.entries), "capacity": self.service.limits.max_sessions}

    async def announce(self) -> None:
        try:
            if self.client is not None:
                await self.client.publish(presence.worker_topic(self.prefix, self.worker_id),
                                          presence.up_message(self.worker_id, **self.load()), qos=1, retain=True)
        except aiomqtt.MqttError:
            pass  # reconnecting: run() announces again once connected

    async def _say_down(self) -> None:
        """A clean shutdown sends no will, so say what the will would have said, at once."""
        client = self.client
        if client is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await client.publish(presence.worker_topic(self.prefix, self.worker_id),
                                     presence.down_message(self.worker_id, "shutdown"), qos=1,
                                     retain=True, properties=presence.down_properties())
        except (aiomqtt.MqttError, asyncio.TimeoutError):
            pass

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
        except (aiomqtt.MqttError, ValueError):  # ValueError: paho refused the topic or payload
            # One failed publish fails the request it belongs to, never the connection.
            raise PeerGone() from None

    def _sender(self, topic: str, correlation: bytes | None):
        async def send(op, **fields):
            # Deltas ride QoS 0 (cheap, ordered on one connection, `seq` exposes gaps); the
            # final message is QoS 1 so a client always learns that the answer ended.
            await self.publish(topic, protocol.dump(op, **fields), 0 if op == "token" else 1, correlation)
        return send

    # --- incoming ------------------------------------------------------------------------
    async def _on_message(self, message: aiomqtt.Message):
        if message.retain:  # a retained request would act again on every (re)subscribe
            log.debug("mqtt: ignored a retained message on %s", message.topic.value)
            return
        parsed = self.topics.parse(message.topic.value)
        if parsed is None:
            return
        sid, leaf = parsed
        props = message.properties
        reply_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        rid = None
        # Errors about the request itself go to the session's events topic until its own
        # response topic has been checked; a session id that is no id gets nothing back.
        send = self._sender(self.topics.events(sid), None) if protocol.SESSION_ID_RE.match(sid) else None
        try:
            self.topics.session(sid)
            correlation = self.topics.correlation(correlation)
            send = self._sender(self.topics.events(sid), correlation)
            default = self.topics.answers(sid) if leaf == "ask" else self.topics.events(sid)
            send = self._sender(self.topics.reply(reply_topic, sid, default), correlation)
            payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload).encode()
            if leaf == "frames":
                entry = self.service.get(sid, "mqtt")
                t = _user_property(props, "t")
                await self.service.frame(entry, bytes(payload), protocol.frame_time(t) if t is not None else None)
            elif leaf == "ask":
                msg = self._parse(payload, default_op="ask")
                if msg["op"] != "ask":
                    raise StreamError("unknown_op", "the ask topic takes only `ask`")
                rid = msg["id"]
                self.service.ask(self.service.get(sid, "mqtt"), msg, send)
            else:
                msg = self._parse(payload)
                rid = msg.get("id")
                await self._control(sid, msg, send)
        except StreamError as e:
            if send is not None:
                await _quiet(send("error", **protocol.error_fields(e, rid), session=sid))
        except PeerGone:
            pass
        except Exception as e:  # a bug must cost one message, not the transport
            log.exception("mqtt message on %s failed", message.topic.value)
            if send is not None:
                await _quiet(send("error", code="internal_error", message=f"{type(e).__name__}: {e}"[:300], session=sid))

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
            if resumed and self.service.entries[sid].transport != "mqtt":  # another transport's session
                raise StreamError("session_exists", f"session {sid!r} exists on another transport")
            if resumed:
                entry = self.service.get(sid, "mqtt")
            else:
                events = self._sender(self.topics.events(sid), None)
                # Over MQTT the broker's ACLs decide who may publish to a session's topics, so
                # the per-client cap is per session topic; the server-wide cap still holds.
                entry = await self.service.open({k: v for k, v in msg.items() if k != "session"}, f"mqtt:{sid}",
                                                events, session_id=sid, transport="mqtt")
            await send("opened", session=sid, resumed=resumed, worker=self.worker_id,
                       limits=self.service.limits.public(), **self.service.status(entry))
            self.service.start(entry)
        elif op == "status":
            entry = self.service.get(sid, "mqtt")
            await send("status", session=sid, **self.service.status(entry))
        elif op == "preview":
            entry = self.service.get(sid)
            await send("preview", session=sid, **await self.service.preview(entry))
        elif op == "cancel":
            self.service.cancel(self.service.get(sid, "mqtt"), msg["id"])
        elif op == "close":
            await self.service.close(self.service.get(sid, "mqtt"))
            await send("closed", session=sid)
        else:
            raise StreamError("unknown_op", f"the control topic takes open/status/preview/cancel/close, not {op!r}")


def _user_property(props, key: str):
    for k, v in (getattr(props, "UserProperty", None) or []) if props else []:
        if k == key:
            return v
    return None


async def _quiet(aw) -> None:
    try:
        await aw
    except PeerGone:
        pass
