"""One answer as a client sees it, over either transport: text deltas, then `usage` or an error."""
from __future__ import annotations

import asyncio
import sys

from streamvz.errors import StreamError


class Answer:
    """Deltas of one ask, in `seq` order; `usage` once done. Raises StreamError on an `error`.

    `chat` provides `_answers` (rid -> Answer), `timeout` (seconds per message or None) and
    `_cancel(rid)`. With `reorder`, deltas that overtake an earlier one are held and released
    in seq order (MQTT QoS 0 makes no ordering promise across reconnects); a websocket is
    ordered, so its client takes deltas as they come and `seqs` shows what the server sent.
    """

    def __init__(self, chat, rid: str, reorder: bool = False):
        self.chat, self.id, self.reorder = chat, rid, reorder
        self.queue: asyncio.Queue = asyncio.Queue()
        self.usage: dict | None = None
        self.text = ""
        self.seqs: list[int] = []
        self._held: dict[int, dict] = {}

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        while True:
            expected = len(self.seqs)
            if expected in self._held:
                msg = self._held.pop(expected)
            else:
                try:
                    async with asyncio.timeout(self.chat.timeout):
                        msg = await self.queue.get()
                except TimeoutError:  # told as an error, like every other way an answer can fail
                    self.chat._answers.pop(self.id, None)
                    raise StreamError("request_expired", f"no answer within {self.chat.timeout:g} s: the server "
                                      "is away, and the request expires in the broker") from None
            if msg["op"] == "token":
                if self.reorder and msg["seq"] != expected:
                    self._held[msg["seq"]] = msg
                    continue
                self.seqs.append(msg["seq"])
                self.text += msg["text"]
                return msg["text"]
            self.chat._answers.pop(self.id, None)
            if msg["op"] == "done":
                self.usage = msg["usage"]
                raise StopAsyncIteration
            raise StreamError(msg["code"], msg["message"])

    async def cancel(self):
        await self.chat._cancel(self.id)

    async def result(self) -> str:
        async for _ in self:
            pass
        return self.text


# -- terminal helpers shared by the websocket and MQTT command-line clients ------------------


async def push_local(chat, path: str, fps: float) -> None:
    """Decode a local video (or camera device) here and push its frames through `chat.push`;
    a file plays at its own pace, like a camera (and within the server's fps cap)."""
    from streamvz.sources import open_source

    async with open_source(path, fps=fps, realtime=not path.startswith("/dev/")) as src:
        async for frame in src:
            await chat.push(frame.image, frame.t)


async def questions(asked: list[str]):
    """The --ask questions, or else lines typed on stdin (stripped) until end of input."""
    for q in asked:
        yield q
    if asked:
        return
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line.strip()


def usage_line(u: dict) -> str:
    """`3 tokens, first after 0.04s, 25.1 tok/s, stop`; no rate for a one-token answer (undefined)."""
    rate = f", {u['tokens_per_s']:.1f} tok/s" if u.get("tokens_per_s") else ""
    return f"{u.get('completion_tokens')} tokens, first after {u.get('ttft_s') or 0:.2f}s{rate}, {u.get('finish_reason')}"


async def print_answer(answer: Answer, question: str) -> None:
    """Print a question, its streamed answer and its usage line; an error is printed, not raised."""
    print(f"Q: {question}\nA: ", end="", flush=True)
    try:
        async for delta in answer:
            print(delta, end="", flush=True)
        print(f"\n   [{usage_line(answer.usage)}]", flush=True)
    except StreamError as e:
        print(f"\nerror [{e.code}]: {e.message}", flush=True)
