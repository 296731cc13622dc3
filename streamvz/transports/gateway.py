"""Websocket gateway: the websocket protocol and web page, with sessions on MQTT pool workers.

    python run_stream.py serve --transport ws --backend mqtt://broker:1883 --port 8765

Browsers and `clients/ws_chat.py` connect as to any streamvz server (same messages, same
page); the gateway holds no model. Each websocket `open` goes to the pool's shared topic
(P/open/S) and the worker that takes it answers; from then on the gateway relays: JSON ops
to P/S/ask (response topic P/S/answers/<gateway id>, correlation = ask id) or P/S/control,
binary frames to P/S/frames, and whatever arrives on the session's events and answers
topics back to the websocket, verbatim. Messages are validated here with the same limits
(so malformed input never reaches a worker); the worker checks the rest (sources, frames).
Connection-level rules stay the gateway's: `no_session`, `session_in_use`, resume within
the grace period, per-client caps. When a worker's will says it is gone, its sessions'
clients get `worker_lost` and may open again (onto a live worker).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from dataclasses import dataclass, field

import aiomqtt
import websockets
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from streamvz.transports import presence
from streamvz.transports.security import SourcePolicy, check_resume
from streamvz.transports.service import PeerGone

log = logging.getLogger("streamvz.gateway")


@dataclass
class Route:
    """One session as the gateway knows it: who is attached, which worker holds it."""
    sid: str
    conn: "GatewayConn | None"  # None while detached (grace period)
    client: str
    worker: str | None = None  # set by the worker's `opened`
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))  # proves a resume is the owner's
    asks: set[str] = field(default_factory=set)  # running asks (cancelled if the client goes)
    expiry: asyncio.TimerHandle | None = None


class Gateway:
    """`async with Gateway(port=1883, limits=...) as gw:` then `WsServer(gw, conn=GatewayConn)`.
    Exposes `limits` and `sources` as WsServer expects of its service."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, prefix: str = "streamvz",
                 limits: Limits = Limits(), sources: SourcePolicy | None = None, grace_s: float = 30.0,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 open_timeout: float = 30.0):
        self.host, self.port, self.prefix = host, port, prefix
        self.limits, self.sources, self.grace_s = limits, sources or SourcePolicy(), grace_s
        self.username, self.password, self.tls, self.open_timeout = username, password, tls, open_timeout
        self.id = "gw-" + secrets.token_hex(4)
        self.routes: dict[str, Route] = {}
        self.view = presence.PoolView()
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def __aenter__(self):
        self._task = asyncio.create_task(self.run())
        async with asyncio.timeout(30):
            await self.connected.wait()
        return self

    async def __aexit__(self, *exc):
        for route in list(self.routes.values()):  # a gateway going away closes the sessions it opened
            await self._publish(route.sid, "control", {"op": "close"})
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)

    async def run(self):
        delay = 0.2
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          tls_context=self.tls, protocol=aiomqtt.ProtocolVersion.V5,
                                          keepalive=10) as client:
                    await client.subscribe(presence.worker_topic(self.prefix, "+"), qos=1)
                    for sid in self.routes:
                        await self._subscribe(client, sid)
                    self.client = client
                    self.connected.set()
                    delay = 0.2
                    async for message in client.messages:
                        await self._on_message(message)
            except aiomqtt.MqttError as e:
                log.warning("gateway: broker connection lost (%s); retrying in %.1fs", e, delay)
            self.client = None
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _topics(self, sid: str) -> list[str]:
        return [f"{self.prefix}/{sid}/events", f"{self.prefix}/{sid}/answers/{self.id}"]

    async def _subscribe(self, client, sid: str) -> None:
        for topic in self._topics(sid):
            await client.subscribe(topic, qos=1)

    async def _publish(self, sid: str, leaf: str, msg: dict | bytes, correlation: str | None = None,
                       topic: str | None = None) -> None:
        client = self.client
        if client is None:
            raise StreamError("no_workers", "the gateway is reconnecting to its broker; try again")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._topics(sid)[1 if correlation else 0]
        if correlation:
            props.CorrelationData = correlation.encode()
        payload = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        try:
            await client.publish(topic or f"{self.prefix}/{sid}/{leaf}", payload, qos=0 if leaf == "frames" else 1,
                                 properties=props)
        except aiomqtt.MqttError:
            raise StreamError("no_workers", "the gateway lost its broker connection; try again") from None

    # --- what the websocket side asks for --------------------------------------------------
    async def open(self, msg: dict, conn: "GatewayConn") -> str:
        if "session" in msg:  # resume, as on a plain server: within the grace period, only `session`
            route = self.routes.get(msg["session"])
            check_resume(msg, route and route.secret, route is not None and route.conn is not None)  # as a plain server
            if route.expiry is not None:
                route.expiry.cancel()
                route.expiry = None
            route.conn = conn
            await self._publish(route.sid, "control", {"op": "open"})  # its worker answers `resumed: true`
            return route.sid
        if sum(r.client == conn.client for r in self.routes.values()) >= self.limits.max_sessions_per_client:
            raise StreamError("too_many_sessions", f"at most {self.limits.max_sessions_per_client} sessions per client")
        if not self.view.live():
            raise StreamError("no_workers", "no live worker in the pool behind this gateway")
        sid = secrets.token_urlsafe(12)
        self.routes[sid] = route = Route(sid, conn, conn.client)
        await self._subscribe(self.client, sid)
        body = {k: v for k, v in msg.items() if k != "session"}
        await self._publish(sid, "open", body, topic=presence.open_topic(self.prefix, sid))
        asyncio.get_running_loop().call_later(self.open_timeout, self._open_timeout, route)
        return sid

    def _open_timeout(self, route: Route) -> None:
        if route.worker is None and self.routes.get(route.sid) is route:
            asyncio.ensure_future(self._end(route, StreamError("no_workers", "no worker answered the open")))

    async def forward(self, sid: str, msg: dict) -> None:
        route = self.routes[sid]
        if msg["op"] == "ask":
            route.asks.add(msg["id"])
            await self._publish(sid, "ask", msg, correlation=msg["id"])
        else:  # status, cancel, close: the worker answers on the events topic
            await self._publish(sid, "control", msg)

    async def frame(self, sid: str, data: bytes) -> None:
        await self._publish(sid, "frames", data)

    def detach(self, sid: str) -> None:
        route = self.routes.get(sid)
        if route is None:
            return
        route.conn = None
        for rid in list(route.asks):  # the client is gone: stop its answers, keep the session a while
            asyncio.ensure_future(_quiet(self._publish(sid, "control", {"op": "cancel", "id": rid})))
        route.expiry = asyncio.get_running_loop().call_later(self.grace_s, self._expire, route)

    def _expire(self, route: Route) -> None:
        if route.conn is None and self.routes.get(route.sid) is route:
            asyncio.ensure_future(_quiet(self._publish(route.sid, "control", {"op": "close"})))
            asyncio.ensure_future(self._end(route, None))

    async def _end(self, route: Route, error: StreamError | None) -> None:
        """Forget a session; tell its client why if there is one to tell."""
        if self.routes.pop(route.sid, None) is None:
            return
        if route.expiry is not None:
            route.expiry.cancel()
        conn, route.conn = route.conn, None
        if conn is not None:
            conn.session_gone(route.sid)
            if error is not None:
                await _quiet(conn.send("error", code=error.code, message=error.message))
        client = self.client
        if client is not None:
            for topic in self._topics(route.sid):
                await _quiet(client.unsubscribe(topic))

    # --- what the workers say --------------------------------------------------------------
    async def _on_message(self, message: aiomqtt.Message) -> None:
        parts = message.topic.value.split("/")
        payload = bytes(message.payload or b"")
        if len(parts) == 3 and parts[1] == "workers":
            info = self.view.update(parts[2], payload)
            if info is not None and info["state"] == "down":
                for route in [r for r in self.routes.values() if r.worker == parts[2]]:
                    await self._end(route, StreamError("worker_lost", f"worker {parts[2]} is gone "
                                                       f"({info.get('reason')}); its sessions are lost: open again"))
            return
        route = self.routes.get(parts[1]) if len(parts) >= 3 else None
        if route is None:
            return
        try:
            msg = json.loads(payload)
            op = msg.pop("op")
            msg.pop("v", None)
        except (ValueError, KeyError, AttributeError):
            return
        if op == "opened":
            route.worker = msg.get("worker")
            msg["resume"] = route.secret  # the websocket client's proof of ownership, as a plain server gives it
        elif op in ("done", "error") and "id" in msg:
            route.asks.discard(msg["id"])
        conn = route.conn
        if conn is not None:
            await _quiet(conn.send(op, **msg))
        if op == "closed" or (op == "error" and route.worker is None and "id" not in msg):
            await self._end(route, None)  # closed, or the open failed (bad source, pool full, ...)


class GatewayConn:
    """One websocket connection on a gateway (WsServer's `conn` for `--backend`)."""

    def __init__(self, gateway: Gateway, ws, client: str):
        self.gw, self.ws, self.client = gateway, ws, client
        self.sid: str | None = None

    async def send(self, op: str, **fields) -> None:
        try:
            await self.ws.send(protocol.dump(op, **fields))
        except websockets.ConnectionClosed:
            raise PeerGone() from None

    def session_gone(self, sid: str) -> None:
        if self.sid == sid:
            self.sid = None

    async def on_message(self, message: str | bytes) -> None:
        rid = None
        try:
            if isinstance(message, bytes):
                if self.sid is None:
                    raise StreamError("no_session", "send `open` before frames")
                if len(message) > self.gw.limits.max_frame_bytes:
                    raise StreamError("frame_too_large", f"frames are limited to {self.gw.limits.max_frame_bytes} bytes")
                await self.gw.frame(self.sid, message)
                return
            msg = protocol.parse_message(message, self.gw.limits)
            rid = msg.get("id")
            if msg["op"] == "open":
                if self.sid is not None:
                    raise StreamError("session_in_use", f"this connection is attached to session {self.sid}; close it first")
                self.sid = await self.gw.open(msg, self)
                return
            if self.sid is None:
                raise StreamError("no_session", "send `open` first")
            sid = self.sid
            if msg["op"] == "close":
                self.sid = None  # as on a plain server: the connection is free at once; `closed` follows
            await self.gw.forward(sid, msg)
        except StreamError as e:
            await _quiet(self.ws.send(protocol.error_message(e, rid if "id" not in e.details else None)))
        except PeerGone:
            pass

    def detach(self) -> None:
        if self.sid is not None:
            self.gw.detach(self.sid)
            self.sid = None


async def _quiet(aw) -> None:
    """Await a send to a peer that may be gone; a gone peer is not an error here."""
    try:
        await aw
    except (PeerGone, StreamError, aiomqtt.MqttError, websockets.ConnectionClosed) as e:
        log.debug("send failed: %s", e)
