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
    media_roots: list[str] = field(default_factory=list)
    token: str | None = None
    origins: list[str] | None = None
    grace_s: float = 30.0
    limits: Limits = field(default_factory=Limits)
    realtime_files: bool = True


async def serve(engine, cfg: ServeConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None):
    """Run the transports until `stop` is set (or the task is cancelled). `ready` gets the ws port."""
    from streamvz.transports.mqtt import MqttServer
    from streamvz.transports.ws import WsServer

    service = Service(engine, cfg.limits, SourcePolicy(roots=[Path(r) for r in cfg.media_roots]),
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
            await stack.enter_async_context(MqttServer(service, cfg.broker, cfg.broker_port, username=cfg.mqtt_user,
                                                       password=cfg.mqtt_password, tls=tls,
                                                       idle_s=cfg.mqtt_idle_s))
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
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
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

