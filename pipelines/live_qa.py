"""Live camera Q&A: a source URL, standing questions that alert when their answer changes,
and ad-hoc questions at any time.

    python run_stream.py live rtsp://cam/back --watch "Is the back door open?" --every 10

Every `every` seconds of video the standing questions are asked again; an alert fires when
an answer differs from the last one (compared on its normalised first word, so "Yes." and
"yes" agree). Alerts go to `on_alert(dict)` (the CLI prints JSON lines).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable


def normalise(answer: str) -> str:
    words = answer.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""


class LiveQA:
    def __init__(self, engine, source: str, standing: list[str] = (), every: float = 10.0, fps: float = 1.0,
                 max_tokens: int = 16, on_alert: Callable[[dict], None] = print, realtime: bool = False):
        self.engine, self.source, self.standing = engine, source, list(standing)
        self.every, self.fps, self.max_tokens, self.on_alert = every, fps, max_tokens, on_alert
        self.realtime = realtime
        self.session = None
        self.last: dict[str, str] = {}  # question -> last normalised answer
        self.history: list[dict] = []  # every standing answer: {t, question, answer, changed}

    async def run(self) -> None:
        """Read the source until it ends; ask the standing questions every `every` seconds of video."""
        from streamvz.sources import open_source

        self.session = self.engine.session()
        next_check = 0.0
        try:
            async with open_source(self.source, fps=self.fps, realtime=self.realtime) as src:
                async for frame in src:
                    await self.session.add_frame(frame.image, t=frame.t)
                    if self.standing and frame.t >= next_check:
                        await self.check(frame.t)
                        next_check = frame.t + self.every
        finally:
            await self.session.close()

    async def check(self, t: float) -> list[dict]:
        alerts = []
        for q in self.standing:
            text = (await self.session.ask(q, max_new_tokens=self.max_tokens).result()).strip()
            now = normalise(text)
            before = self.last.get(q)
            changed = before is not None and now != before
            self.last[q] = now
            self.history.append({"t": round(t, 2), "question": q, "answer": text, "changed": changed})
            if changed:
                alert = {"alert": q, "t": round(t, 2), "before": before, "after": now, "answer": text,
                         "time": time.time()}
                alerts.append(alert)
                self.on_alert(alert)
        return alerts

    async def ask(self, question: str) -> str:
        """An ad-hoc question, answered from the frames seen so far."""
        while self.session is None:
            await asyncio.sleep(0.05)
        return (await self.session.ask(question, max_new_tokens=64).result()).strip()
