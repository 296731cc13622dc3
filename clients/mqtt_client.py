"""Chat with a streamvz server over MQTT v5 (through a broker): watch a video, ask questions.

    python clients/mqtt_client.py --broker 127.0.0.1 --session cam1 --source clips/lobby.mp4
    python clients/mqtt_client.py --session desk --video ~/Videos/cat.mp4 --ask "What is on the desk?"

`MqttChat` is the library client: answers come back on this client's own response topic,
matched to asks by MQTT v5 correlation data, deltas in `seq` order.

    async with MqttChat("127.0.0.1", 1883, session="cam1") as chat:
        await chat.open(source="lobby.mp4")
        print(await chat.ask("Anyone at the door?").result())
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from clients.answer import Answer, print_answer, push_local, questions
from streamvz import protocol
from streamvz.errors import StreamError


class MqttChat:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883, session: str | None = None,
                 prefix: str = "streamvz", username: str | None = None, password: str | None = None,
                 tls=None, timeout: float = 120, connect_timeout: float = 10, pool: bool = False):
        self.host, self.port, self.prefix, self.timeout = host, port, prefix, timeout
        self.connect_timeout = connect_timeout
        self.pool = pool  # open through a worker pool's shared topic (P/open/S) instead of P/S/control
        self.worker: str | None = None  # the server holding the session, named by `opened`
        self.session = session or secrets.token_urlsafe(9)
        self.username, self.password, self.tls = username, password, tls
        self.me = secrets.token_hex(6)
        self.reply_topic = f"{prefix}/{self.session}/answers/{self.me}"
        self.events: asyncio.Queue = asyncio.Queue()
        self._answers: dict[str, Answer] = {}
        self._n = 0

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{self.session}/{leaf}"

    async def __aenter__(self):
        self.client = aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                     tls_context=self.tls, protocol=aiomqtt.ProtocolVersion.V5,
                                     timeout=self.connect_timeout)
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        await self.client.subscribe(self.topic("events"), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc):
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.__aexit__(*exc)

    async def _read(self):
        async for m in self.client.messages:
            msg = json.loads(m.payload)
            if msg.get("op") == "worker":  # our worker's retained announcement; `down` is its will
                if msg.get("worker") == self.worker and msg.get("state") == "down":
                    self._worker_lost(msg)
                continue
            corr = getattr(m.properties, "CorrelationData", None) if m.properties else None
            answer = self._answers.get(corr.decode()) if corr else None
            (answer.queue if answer else self.events).put_nowait(msg)

    def _worker_lost(self, msg: dict) -> None:
        lost = {"op": "error", "code": "worker_lost",
                "message": f"worker {self.worker} is gone ({msg.get('reason')}); its sessions are lost: open again"}
        self.events.put_nowait(lost)
        for answer in list(self._answers.values()):
            answer.queue.put_nowait(lost)

    async def _publish(self, leaf: str, payload: bytes, qos: int, correlation: str | None = None,
                       user: list[tuple[str, str]] | None = None):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic if correlation else self.topic("events")
        if leaf != "frames" and self.timeout:
            # A request the server cannot take while this client still waits (the server is off
            # the broker longer than that) expires in the broker instead of running later.
            props.MessageExpiryInterval = max(1, int(self.timeout))
        if correlation:
            props.CorrelationData = correlation.encode()
        if user:
            props.UserProperty = user
        await self.client.publish(self.topic(leaf), payload, qos=qos, properties=props)

    async def expect(self, *ops: str) -> dict:
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    msg = await self.events.get()
            except TimeoutError:
                raise StreamError("request_expired", f"no reply within {self.timeout:g} s: the server is away, "
                                  "and the request expires in the broker") from None
            if msg["op"] == "error":
                raise StreamError(msg["code"], msg["message"])
            if msg["op"] in ops:
                return msg

    async def _cancel(self, rid: str):
        await self.control(op="cancel", id=rid)

    async def control(self, **msg):
        await self._publish("control", json.dumps({"v": protocol.VERSION, **msg}).encode(), 1)

    async def open(self, source: str | None = None, fps: float | None = None, system_prompt: str | None = None):
        fields = {k: v for k, v in dict(source=source, fps=fps, system_prompt=system_prompt).items() if v is not None}
        if self.pool:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.topic("events")
            body = json.dumps({"v": protocol.VERSION, "op": "open", **fields}).encode()
            await self.client.publish(f"{self.prefix}/open/{self.session}", body, qos=1, properties=props)
        else:
            await self.control(op="open", **fields)
        opened = await self.expect("opened")
        if opened.get("worker") and opened["worker"] != self.worker:
            self.worker = opened["worker"]  # watch it: its will tells us when it dies
            await self.client.subscribe(f"{self.prefix}/workers/{self.worker}", qos=1)
        return opened

    async def push(self, image, t: float | None = None):
        user = [("t", repr(float(t)))] if t is not None else None
        await self._publish("frames", protocol.encode_frame(image), 0, user=user)

    def ask(self, text: str, max_tokens: int | None = None, **kw) -> Answer:
        self._n += 1
        rid = f"{self.me}-{self._n}"
        answer = self._answers[rid] = Answer(self, rid, reorder=True)
        if max_tokens is not None:  # None: the server's default
            kw["max_tokens"] = max_tokens
        body = json.dumps({"v": protocol.VERSION, "op": "ask", "id": rid, "text": text, **kw})
        asyncio.ensure_future(self._publish("ask", body.encode(), 1, correlation=rid))
        return answer

    async def status(self) -> dict:
        await self.control(op="status")
        return await self.expect("status")

    async def close(self) -> dict:
        await self.control(op="close")
        return await self.expect("closed")


async def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat about a video with a streamvz server over MQTT v5.")
    p.add_argument("--broker", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--session", help="session id (the topic level); default: a new random one")
    p.add_argument("--pool", action="store_true", help="open through a worker pool's shared topic (docs/scale-out.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--source", help="a URL or a file under the server's media root: the SERVER opens it")
    g.add_argument("--video", help="a local video file: decoded here and published as JPEG frames")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--ask", action="append", default=[], help="ask this and exit (repeatable); else interactive")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to let frames arrive before --ask questions")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer (default: the server's)")
    a = p.parse_args(argv)
    async with MqttChat(a.broker, a.port, a.session, username=a.username, password=a.password, pool=a.pool) as chat:
        try:
            opened = await chat.open(source=a.source, fps=a.fps if a.source else None)
        except StreamError as e:
            print(f"error [{e.code}]: {e.message}", file=sys.stderr)
            return 2
        print(f"session {opened['session']}", file=sys.stderr)
        pusher = None
        if a.video:
            pusher = asyncio.create_task(push_local(chat, a.video, a.fps))
        if a.ask:
            await asyncio.sleep(a.wait)
        else:
            print("type a question (empty line to quit)", file=sys.stderr)
        async for q in questions(a.ask):
            if not q:
                break
            await print_answer(chat.ask(q, max_tokens=a.max_tokens), q)
        if pusher:
            pusher.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
