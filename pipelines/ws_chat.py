"""Chat server: one engine behind the websocket transport (and/or MQTT), the web page at /.

    python run_stream.py serve --transport both --media-root ./videos
    # then: open http://127.0.0.1:8765/ , or python clients/ws_chat.py --source clip.mp4

`serve()` is the whole pipeline as a coroutine; `run_stream.py serve` and the demo call it.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from streamvz.protocol import Limits
from streamvz.transports.security import SourcePolicy
from streamvz.transports.service import Service

log = logging.getLogger("streamvz.serve")


@dataclass
class ServeConfig:
    transport: str = "ws"  # ws | mqtt | both
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (see `ready`)
    broker: str = "127.0.0.1"
    broker_port: int = 1883
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    mqtt_ca: str | None = None  # CA file: connect to the broker over TLS
    mqtt_idle_s: float | None = 600.0  # MQTT sessions close after this long without a message
    mqtt_reply_prefixes: list[str] = field(default_factory=list)  # response topics allowed beyond P/S/answers
    mqtt_client_id: str | None = None  # default streamvz-server-<prefix>
    mqtt_session_expiry_s: int = 300  # the broker keeps requests for an absent server this long
    media_roots: list[str] = field(default_factory=list)
    allow_private_sources: bool = False  # let clients name sources on loopback/private networks
    allow_source_networks: list[str] = field(default_factory=list)  # or only these CIDRs
    token: str | None = None
    origins: list[str] | None = None
    grace_s: float = 30.0
    limits: Limits = field(default_factory=Limits)
    realtime_files: bool = True
    group: str | None = None  # MQTT: be a pool worker of this group (streamvz/transports/pool.py)
    worker_id: str | None = None  # MQTT: this server's name in `opened` and on P/workers/<id> (default: random)
    keepalive: int = 10  # MQTT: the broker publishes our will 1.5 x this after we go silent
    backend: tuple[str, int] | None = None  # ws gateway: sessions live on the pool behind this broker


async def serve_gateway(cfg: ServeConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None):
    """The websocket server and page with no engine: sessions on pool workers (streamvz/transports/gateway.py)."""
    from streamvz.transports.gateway import Gateway, GatewayConn
    from streamvz.transports.ws import WsServer

    tls = ssl.create_default_context(cafile=cfg.mqtt_ca) if cfg.mqtt_ca else None
    sources = SourcePolicy(roots=[Path(r) for r in cfg.media_roots], allow_private=cfg.allow_private_sources,
                           allow_networks=tuple(cfg.allow_source_networks))
    async with Gateway(*cfg.backend, limits=cfg.limits, sources=sources, grace_s=cfg.grace_s, username=cfg.mqtt_user,
                       password=cfg.mqtt_password, tls=tls) as gw, \
            WsServer(gw, cfg.host, cfg.port, token=cfg.token, origins=cfg.origins, conn=GatewayConn) as ws:
        log.info("gateway %s: websocket on ws://%s:%d/ws, pool behind %s:%d", gw.id, cfg.host, ws.port, *cfg.backend)
        if ready is not None and not ready.done():
            ready.set_result(ws.port)
        await (stop or asyncio.Event()).wait()


async def serve(engine, cfg: ServeConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None):
    """Run the transports until `stop` is set (or the task is cancelled). `ready` gets the ws port,
    or the exception that stopped the start (its awaiter would otherwise wait forever)."""
    try:
        await (serve_gateway(cfg, ready, stop) if cfg.backend else _serve(engine, cfg, ready, stop))
    except BaseException as e:
        if ready is not None and not ready.done():
            ready.set_exception(e) if isinstance(e, Exception) else ready.cancel()
        raise


async def _serve(engine, cfg: ServeConfig, ready: asyncio.Future | None, stop: asyncio.Event | None):
    from streamvz.transports.mqtt import MqttServer
    from streamvz.transports.pool import PoolWorker
    from streamvz.transports.ws import WsServer

    service = Service(engine, cfg.limits, SourcePolicy(roots=[Path(r) for r in cfg.media_roots],
                                                       allow_private=cfg.allow_private_sources,
                                                       allow_networks=tuple(cfg.allow_source_networks)),
                      grace_s=cfg.grace_s, realtime_files=cfg.realtime_files)
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        port = None
        if cfg.transport in ("ws", "both"):
            ws = await stack.enter_async_context(
                WsServer(service, cfg.host, cfg.port, token=cfg.token, origins=cfg.origins))
            port = ws.port
            log.info("websocket on ws://%s:%d/ws, web page on http://%s:%d/", cfg.host, port, cfg.host, port)
        if cfg.transport in ("mqtt", "both"):
            tls = ssl.create_default_context(cafile=cfg.mqtt_ca) if cfg.mqtt_ca else None
            kind, extra = (PoolWorker, {"group": cfg.group}) if cfg.group else (MqttServer, {})
            await stack.enter_async_context(kind(service, cfg.broker, cfg.broker_port, username=cfg.mqtt_user,
                                                 password=cfg.mqtt_password, tls=tls, idle_s=cfg.mqtt_idle_s,
                                                 keepalive=cfg.keepalive, worker_id=cfg.worker_id,
                                                 reply_prefixes=tuple(cfg.mqtt_reply_prefixes),
                                                 client_id=cfg.mqtt_client_id,
                                                 session_expiry_s=cfg.mqtt_session_expiry_s, **extra))
            log.info("mqtt: broker %s:%d, topics streamvz/<session>/{control,frames,ask}", cfg.broker, cfg.broker_port)
        if ready is not None and not ready.done():
            ready.set_result(port)
        try:
            await stop.wait()
        finally:
            await service.aclose()


async def broker_problem(host: str, port: int, timeout: float = 2.0) -> str | None:
    """Why the MQTT broker at host:port cannot be reached (a TCP connect), or None if it can."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)
    writer.close()
    return None


class QuietUntilBrokerUp(logging.Filter):
    """While the broker is known to be down (and the user was told once, with how to start one),
    drop the MQTT transport's retry warnings; `watch()` polls the port and says when it is up."""

    def __init__(self, host: str, port: int):
        super().__init__()
        self.host, self.port, self.down = host, port, True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.down and record.getMessage().startswith("mqtt: broker connection lost"))

    async def watch(self, say, every: float = 2.0) -> None:
        while self.down:
            await asyncio.sleep(every)
            if await broker_problem(self.host, self.port) is None:
                self.down = False
                say(f"streamvz: MQTT broker at {self.host}:{self.port} is up; connecting")

