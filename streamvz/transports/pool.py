"""A pool worker: one of several MQTT servers that split sessions through the broker.

Every worker subscribes the shared topic `$share/G/P/open/+`; the broker hands each `open`
to one of them. The worker that creates the session then subscribes that session's own
topics (P/S/control, P/S/frames, P/S/ask) and no other worker does, so the session's frames
and asks reach the one process holding its KV cache: affinity by topic, which any MQTT v5
broker (mosquitto, EMQX, HiveMQ) provides without a sticky-routing feature.

A full worker does not drop an `open`: it passes it to the live worker that announced the
most room (P/workers/W/open/S, user property `tried` = the workers already asked), at most
`max_hops` times; when no worker has room the client gets `too_many_sessions`. An `open` for
a session another worker announces it holds goes to that worker (it answers `resumed`).
Topic names and the announcement/will: streamvz/transports/presence.py.
"""
from __future__ import annotations

import asyncio
import logging

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.transports import presence
from streamvz.transports.mqtt import MqttServer
from streamvz.transports.service import PeerGone, Service

log = logging.getLogger("streamvz.pool")
RESERVED = {"open", "workers"}  # topic levels the pool uses; never session ids


class PoolWorker(MqttServer):
    """`async with PoolWorker(service, port=..., group="g", worker_id="w1")` serves until exit."""

    def __init__(self, service: Service, *args, group: str = "streamvz", max_hops: int = 4, announce_s: float = 2.0,
                 **kw):
        kw["worker_id"] = kw.get("worker_id") or presence.new_worker_id()  # its own broker client id too
        # No broker session that outlives the worker: a dead worker's sessions die with its KV cache,
        # and a lingering shared subscription would keep being handed `open`s nobody answers.
        kw["session_expiry_s"] = 0
        super().__init__(service, *args, **kw)  # host, port, ... as MqttServer takes them
        self.group, self.max_hops, self.announce_s = group, max_hops, announce_s
        self.view = presence.PoolView()
        self.frames_in = 0  # frame messages received; announced, so a test can see none went astray
        self.passed_on = 0  # opens handed to another worker because this one was full
        self._announced: dict | None = None
        service.on_close.append(self._closed)

    async def __aenter__(self):
        await super().__aenter__()
        self._heartbeat = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc):
        self._heartbeat.cancel()
        await asyncio.gather(self._heartbeat, return_exceptions=True)
        await super().__aexit__(*exc)

    # --- what we subscribe and announce ----------------------------------------------------
    def _session_topics(self, sid: str) -> list[tuple[str, int]]:
        return [(f"{self.prefix}/{sid}/{leaf}", qos) for leaf, qos in (("control", 1), ("frames", 0), ("ask", 1))]

    def subscriptions(self) -> list[tuple[str, int]]:
        # Re-run on every reconnect: after a broker restart the sessions we hold are resubscribed.
        subs = [(presence.shared_open(self.prefix, self.group), 1), (presence.inbox(self.prefix, self.worker_id), 1),
                (presence.worker_topic(self.prefix, "+"), 1)]
        for sid in self.service.entries:
            subs += self._session_topics(sid)
        return subs

    def load(self) -> dict:
        return {**super().load(), "group": self.group, "session_ids": sorted(self.service.entries),
                "frames": self.frames_in, "passed_on": self.passed_on}

    async def announce(self) -> None:
        self._announced = self.load()
        await super().announce()

    async def _beat(self):
        """Re-announce when the load changed (frame counts move without opens or closes)."""
        while True:
            await asyncio.sleep(self.announce_s)
            if self.load() != self._announced:
                await self.announce()

    def _closed(self, sid: str) -> None:
        asyncio.ensure_future(self._drop(sid))

    async def _drop(self, sid: str) -> None:
        client = self.client
        if client is not None:
            try:
                for topic, _ in self._session_topics(sid):
                    await client.unsubscribe(topic)
            except aiomqtt.MqttError:
                pass  # disconnected: the next connect subscribes only the sessions we still hold
        await self.announce()

    # --- incoming ----------------------------------------------------------------------------
    async def dispatch(self, message: aiomqtt.Message) -> None:
        parts = message.topic.value.split("/")
        if parts[0] != self.prefix:
            return
        if message.retain and parts[1] != "workers":  # a retained request would act again on every subscribe
            return
        if len(parts) == 3 and parts[1] == "open":
            await self._open(parts[2], message)
        elif len(parts) == 3 and parts[1] == "workers":
            self.view.update(parts[2], bytes(message.payload or b""))
        elif len(parts) == 5 and parts[1] == "workers" and parts[3] == "open":
            if parts[2] == self.worker_id:
                await self._open(parts[4], message)
        else:
            if len(parts) == 3 and parts[2] == "frames":
                self.frames_in += 1
            await super().dispatch(message)

    async def _open(self, sid: str, message: aiomqtt.Message) -> None:
        props = message.properties
        reply = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        tried = [w for w in (_user_property(props, "tried") or "").split(",") if w]
        events, refused = f"{self.prefix}/{sid}/events", None
        try:  # the same rule as for every other request: answers go only to the session's reply space
            reply = self.topics.reply(reply, sid, events)
        except StreamError as e:
            reply, refused = events, e

        async def send(op, **fields):
            await self.publish(reply, protocol.dump(op, **fields), 1, correlation)

        try:
            if refused is not None:
                raise refused
            if not protocol.SESSION_ID_RE.match(sid) or sid in RESERVED:
                raise StreamError("bad_field", "session ids are 1-64 of [A-Za-z0-9_-], not open/workers", field="session")
            msg = protocol.parse_message(bytes(message.payload or b""), self.service.limits)
            if msg["op"] != "open":
                raise StreamError("unknown_op", "the open topic takes only `open`")
            if msg.pop("session", sid) != sid:
                raise StreamError("bad_field", "over MQTT the session id is the topic level", field="session")
            if "source" in msg:
                self.service.sources.check(msg["source"])
            entry = self.service.entries.get(sid)
            if entry is not None:  # ours already: a re-open
                await send("opened", session=sid, resumed=True, worker=self.worker_id,
                           limits=self.service.limits.public(), **self.service.status(entry))
                return
            owner = self.view.owner_of(sid)
            if owner is not None and owner != self.worker_id and owner not in tried:
                await self._pass(owner, sid, message, tried)  # someone else holds it: they answer
                return
            if len(self.service.entries) >= self.service.limits.max_sessions:
                asked = tried + [self.worker_id]
                peers = self.view.with_room(set(asked))
                if peers and len(asked) <= self.max_hops:
                    self.passed_on += 1
                    await self._pass(peers[0], sid, message, asked)
                    return
                raise StreamError("too_many_sessions", f"every worker of pool {self.group!r} is full "
                                                       f"(asked: {', '.join(asked)})")
            await self._create(sid, msg, send, tried)
        except StreamError as e:
            try:
                await send("error", code=e.code, message=e.message, session=sid)
            except PeerGone:
                pass
        except PeerGone:
            pass

    async def _create(self, sid: str, msg: dict, send, passed_by: list[str]) -> None:
        client = self.client
        if client is None:
            raise PeerGone()
        # Subscribe before `opened` goes out: frames the client sends right after it are ours.
        for topic, qos in self._session_topics(sid):
            await client.subscribe(topic, options=self.subscribe_options(topic, qos))
        events = f"{self.prefix}/{sid}/events"

        async def to_events(op, **fields):
            await self.publish(events, protocol.dump(op, **fields), 0 if op == "token" else 1)

        try:
            entry = await self.service.open(msg, f"mqtt:{sid}", to_events, session_id=sid, transport="mqtt")
        except BaseException:
            await self._drop(sid)
            raise
        await send("opened", session=sid, resumed=False, worker=self.worker_id, passed_by=passed_by,
                   limits=self.service.limits.public(), **self.service.status(entry))
        self.service.start(entry)
        await self.announce()

    async def _pass(self, worker: str, sid: str, message: aiomqtt.Message, tried: list[str]) -> None:
        """Hand the `open` on unchanged (payload, response topic, correlation data) to `worker`."""
        props = Properties(PacketTypes.PUBLISH)
        old = message.properties
        for name in ("ResponseTopic", "CorrelationData"):
            value = getattr(old, name, None) if old else None
            if value is not None:
                setattr(props, name, value)
        props.UserProperty = [("tried", ",".join(tried))]
        log.info("open %s passed on to %s (tried %s)", sid, worker, tried)
        try:
            await self.client.publish(presence.inbox(self.prefix, worker, sid), bytes(message.payload), qos=1,
                                      properties=props)
        except (aiomqtt.MqttError, AttributeError):
            raise PeerGone() from None


def _user_property(props, key: str):
    for k, v in (getattr(props, "UserProperty", None) or []) if props else []:
        if k == key:
            return v
    return None
