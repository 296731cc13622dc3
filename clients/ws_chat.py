"""Terminal chat with a streamvz server over a websocket: watch a video, type questions.

    python clients/ws_chat.py --source clips/lobby.mp4          # the server opens the file/URL
    python clients/ws_chat.py --video ~/Videos/cat.mp4           # this machine decodes, pushes JPEGs
    python clients/ws_chat.py --webcam /dev/video0 --ask "What do you see?"

`WsChat` is also the library client (the demo, the bench and the tests use it):

    async with WsChat("ws://127.0.0.1:8765/ws") as chat:
        await chat.open(source="clip.mp4", fps=2)
        answer = chat.ask("What is happening?")
        async for delta in answer: print(delta, end="")
        print(answer.usage)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

import websockets

from clients.answer import Answer, print_answer, push_local, questions
from streamvz import protocol
from streamvz.errors import StreamError


class WsChat:
    def __init__(self, url: str, token: str | None = None, max_size: int = 16 * 2**20):
        self.url, self.token, self.max_size = url, token, max_size
        self.ws = None
        self.session: str | None = None
        self.resume: str | None = None  # the session's resume secret (from `opened`)
        self.events: asyncio.Queue = asyncio.Queue()  # opened/status/closed/errors without a live ask
        self._answers: dict[str, Answer] = {}
        self._n = 0
        self._reader = None
        self.timeout: float | None = None  # an answer waits as long as the connection lives

    async def __aenter__(self):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.ws = await websockets.connect(self.url, additional_headers=headers, max_size=self.max_size)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self):
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                answer = self._answers.get(msg.get("id")) if msg.get("op") in ("token", "done", "error") else None
                (answer.queue if answer else self.events).put_nowait(msg)
        except websockets.ConnectionClosed:
            pass
        finally:  # wake whoever waits: the connection is gone
            gone = {"op": "error", "code": "connection_closed", "message": "the server closed the connection"}
            for a in self._answers.values():
                a.queue.put_nowait(gone)
            self.events.put_nowait(gone)

    async def _cancel(self, rid: str):
        await self.send(op="cancel", id=rid)

    async def send(self, **msg):
        await self.ws.send(json.dumps({"v": protocol.VERSION, **msg}))

    async def expect(self, *ops: str, timeout: float = 60) -> dict:
        """Next event whose op is in `ops`; an `error` raises StreamError."""
        while True:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel (demo's Ctrl-C)
                msg = await self.events.get()
            if msg["op"] == "error":
                raise StreamError(msg["code"], msg["message"])
            if msg["op"] in ops:
                return msg

    async def open(self, source: str | None = None, fps: float | None = None, session: str | None = None,
                   system_prompt: str | None = None, resume: str | None = None) -> dict:
        """A new session, or resume `session` with its `resume` secret (from the `opened` that
        created it: `chat.resume`)."""
        fields = {k: v for k, v in dict(source=source, fps=fps, session=session, system_prompt=system_prompt,
                                        resume=resume).items() if v is not None}
        await self.send(op="open", **fields)
        opened = await self.expect("opened")
        self.session, self.resume = opened["session"], opened.get("resume")
        return opened

    async def push(self, image, t: float | None = None):
        await self.ws.send(protocol.encode_frame(image, t))

    def ask(self, text: str, max_tokens: int | None = None, **kw) -> Answer:
        self._n += 1
        rid = f"q{self._n}"
        answer = self._answers[rid] = Answer(self, rid)
        if max_tokens is not None:  # None: the server's default
            kw["max_tokens"] = max_tokens
        asyncio.ensure_future(self.send(op="ask", id=rid, text=text, **kw))
        return answer

    async def status(self) -> dict:
        await self.send(op="status")
        return await self.expect("status")

    async def close(self) -> dict:
        await self.send(op="close")
        return await self.expect("closed")


async def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat about a video with a streamvz server (websocket).")
    p.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="server websocket URL")
    p.add_argument("--token", help="bearer token, if the server wants one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--source", help="a URL or a file under the server's media root: the SERVER opens it")
    g.add_argument("--video", help="a local video file: decoded here and pushed as JPEG frames")
    g.add_argument("--webcam", nargs="?", const="/dev/video0", help="a local camera device (default /dev/video0)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second to sample")
    p.add_argument("--session", help="resume this session id (with --resume)")
    p.add_argument("--resume", help="the session's resume secret, printed when it was opened")
    p.add_argument("--ask", action="append", default=[], help="ask this and exit (repeatable); else interactive")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to let frames arrive before --ask questions")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer (default: the server's)")
    a = p.parse_args(argv)
    async with WsChat(a.url, a.token) as chat:
        try:
            opened = await chat.open(source=a.source, fps=a.fps if a.source else None, session=a.session,
                                     resume=a.resume)
        except StreamError as e:
            print(f"error [{e.code}]: {e.message}", file=sys.stderr)
            return 2
        print(f"session {opened['session']} ({'resumed' if opened['resumed'] else 'new'}; "
              f"resume secret {opened['resume']})", file=sys.stderr)
        pusher = None
        if a.video or a.webcam:
            pusher = asyncio.create_task(push_local(chat, a.video or a.webcam, a.fps))
        if a.ask:
            await asyncio.sleep(a.wait)
        else:
            print("type a question (or /status, /quit)", file=sys.stderr)
        async for q in questions(a.ask):
            if q in ("/quit", "/exit"):
                break
            if q == "/status":
                print(json.dumps(await chat.status()))
                continue
            if not q:
                continue
            await print_answer(chat.ask(q, max_tokens=a.max_tokens), q)
        if pusher:
            pusher.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
