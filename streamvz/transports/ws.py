"""Websocket transport: protocol v1 over `websockets`, plus the web page over plain HTTP.

One connection is attached to at most one session at a time (`open` attaches, `close`
ends it, a dropped connection detaches it for the grace period). JSON text messages are
control; binary messages are frames. GET / serves clients/web; the websocket lives at /ws.
"""
from __future__ import annotations

import json
import logging
import mimetypes
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.transports.security import client_key, token_ok
from streamvz.transports.service import PeerGone, Service

log = logging.getLogger("streamvz.ws")
WEB_ROOT = Path(__file__).resolve().parents[2] / "clients" / "web"


class WsServer:
    """`async with WsServer(service, port=0) as srv:` -> srv.port, srv.url (ws://.../ws)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 origins: list[str] | None = None, web_root: Path | None = WEB_ROOT, conn: type | None = None):
        self.service, self.host, self.port = service, host, port
        # `conn(service, ws, client)` handles one connection; the gateway passes its own (gateway.py)
        self.conn = conn or _Conn
        self.token, self.origins, self.web_root = token, origins, web_root
        self._server = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    async def __aenter__(self):
        lim = self.service.limits
        # websockets' own cap is a backstop above ours, so an oversized message up to twice
        # the limit still gets a protocol `error` (beyond that: close code 1009, with reason).
        hard = 2 * max(lim.max_frame_bytes, lim.max_message_bytes)
        self._server = await serve(self._handle, self.host, self.port, process_request=self._http,
                                   origins=self.origins, max_size=hard, max_queue=64, ping_interval=20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        await self._server.wait_closed()

    async def serve_forever(self):
        await self._server.serve_forever()

    # --- HTTP: auth for /ws, static files for everything else ---------------------------
    def _http(self, conn: ServerConnection, request) -> Response | None:
        url = urlsplit(request.path)
        if url.path in ("/ws", "/api/videos"):  # everything that reaches sessions or lists server data
            given = parse_qs(url.query).get("token", [None])[0]  # browsers cannot set headers on WebSocket
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[len("Bearer "):]
            if not token_ok(self.token, given):
                return conn.respond(401, "unauthorized: missing or wrong bearer token\n")
        if url.path == "/ws":
            return None
        if url.path == "/api/videos":
            return _response(200, json.dumps(self.service.sources.list_files()).encode(), "application/json")
        if self.web_root is None:
            return conn.respond(404, "not found\n")
        name = "index.html" if url.path in ("", "/") else url.path.lstrip("/")
        root = self.web_root.resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            return conn.respond(404, "not found\n")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return _response(200, path.read_bytes(), ctype)

    # --- one websocket connection ----------------------------------------------------------
    async def _handle(self, ws: ServerConnection):
        client = client_key(str(ws.remote_address[0]))  # the token is one server-wide secret, not an identity
        conn = self.conn(self.service, ws, client)
        try:
            async for message in ws:
                await conn.on_message(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            conn.detach()


class _Conn:
    def __init__(self, service: Service, ws: ServerConnection, client: str):
        self.service, self.ws, self.client = service, ws, client
        self.entry = None

    async def send(self, op: str, **fields) -> None:
        try:
            await self.ws.send(protocol.dump(op, **fields))
        except websockets.ConnectionClosed:
            raise PeerGone() from None

    async def on_message(self, message: str | bytes) -> None:
        rid = None
        try:
            if isinstance(message, bytes):
                if self.entry is None:
                    raise StreamError("no_session", "send `open` before frames")
                if len(message) > self.service.limits.max_frame_bytes:  # before any parsing
                    raise StreamError("frame_too_large", f"frames are limited to {self.service.limits.max_frame_bytes} bytes")
                await self.service.frame(self.entry, message)
                return
            msg = protocol.parse_message(message, self.service.limits)
            rid = msg.get("id")
            await getattr(self, "op_" + msg["op"])(msg)
        except StreamError as e:
            await self._send_error(e, rid)
        except PeerGone:
            pass
        except Exception as e:  # a bug must cost one message, not the server
            log.exception("message failed")
            await self._send_error(StreamError("internal_error", f"{type(e).__name__}: {e}"[:300]), rid)

    async def _send_error(self, e: StreamError, rid) -> None:
        try:
            await self.ws.send(protocol.error_message(e, rid if "id" not in e.details else None))
        except websockets.ConnectionClosed:
            pass

    def _need_session(self):
        if self.entry is None:
            raise StreamError("no_session", "send `open` first")
        return self.entry

    async def op_open(self, msg):
        if self.entry is not None:
            raise StreamError("session_in_use", f"this connection is attached to session {self.entry.id}; close it first")
        resumed = "session" in msg
        self.entry = await self.service.open(msg, self.client, self.send)
        await self.send("opened", session=self.entry.id, resumed=resumed, resume=self.entry.secret,
                        limits=self.service.limits.public(), **self.service.status(self.entry))
        self.service.start(self.entry)

    async def op_ask(self, msg):
        self.service.ask(self._need_session(), msg)

    async def op_cancel(self, msg):
        self.service.cancel(self._need_session(), msg["id"])

    async def op_status(self, msg):
        entry = self._need_session()
        await self.send("status", session=entry.id, **self.service.status(entry))

    async def op_preview(self, msg):
        entry = self._need_session()
        await self.send("preview", session=entry.id, **await self.service.preview(entry))

    async def op_close(self, msg):
        entry = self._need_session()
        self.entry = None
        await self.service.close(entry)
        await self.send("closed", session=entry.id)

    def detach(self):
        if self.entry is not None:
            self.service.detach(self.entry)
            self.entry = None


def _response(status: int, body: bytes, ctype: str) -> Response:
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status, "OK" if status == 200 else "Error", headers, body)
