"""Live camera Q&A: a source URL, standing questions that alert when their answer changes,
and ad-hoc questions at any time.

    python run_stream.py live rtsp://cam/back --watch "Is the back door open?" --every 10

Every `every` seconds of video the standing questions are asked again; an alert fires when
an answer differs from the last one (compared on its normalised first word, so "Yes." and
"yes" agree). Alerts go to `on_alert(dict)`. What a person watching needs besides alerts goes
to `on_event(dict)`: the camera's connects, disconnects and reconnect attempts, and the first
answer of every standing question (pipelines/live_report.py words them; `--json` prints them).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

CAMERA_EVENTS = ("connected", "disconnected", "reconnecting", "stalled", "ended", "warning")


def normalise(answer: str) -> str:
    words = answer.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""


class LiveQA:
    def __init__(self, engine, source: str, standing: list[str] = (), every: float = 10.0, fps: float = 1.0,
                 max_tokens: int = 16, on_alert: Callable[[dict], None] = print, realtime: bool = False,
                 on_event: Callable[[dict], None] | None = None, source_options: dict | None = None,
                 watch_window: float | None = 10.0):
        """`watch_window`: standing questions see only the frames of the last this-many seconds (the
        camera's now, not its past minutes: see `ask(since=...)`); None: the whole window."""
        self.engine, self.source, self.standing = engine, source, list(standing)
        self.watch_window = watch_window
        self.every, self.fps, self.max_tokens, self.on_alert = every, fps, max_tokens, on_alert
        self.on_event = on_event or (lambda event: None)
        self.realtime = realtime
        self.source_options = dict(source_options or {})  # e.g. rtsp_transport for open_source
        self.session = None
        self.last: dict[str, str] = {}  # question -> last normalised answer
        self.history: list[dict] = []  # every standing answer: {t, question, answer, changed}

    async def run(self) -> None:
        """Read the source until it ends; ask the standing questions every `every` seconds of video."""
        from streamvz.sources import open_source, is_live_url

        self.session = self.engine.session()
        next_check = 0.0
        options = dict(self.source_options)
        if self.realtime or is_live_url(self.source):  # camera events exist for live sources only
            options["on_status"] = self._camera
        try:
            async with open_source(self.source, fps=self.fps, realtime=self.realtime, **options) as src:
                async for frame in src:
                    await self.session.add_frame(frame.image, t=frame.t)
                    if self.standing and frame.t >= next_check:
                        await self.check(frame.t)
                        next_check = frame.t + self.every
        finally:
            await self.session.close()

    def _camera(self, status: dict) -> None:
        if status.get("event") in CAMERA_EVENTS:
            self.on_event(dict(status))

    async def check(self, t: float) -> list[dict]:
        alerts = []
        for q in self.standing:
            text = (await self.session.ask(q, max_new_tokens=self.max_tokens, since=self.watch_window).result()).strip()
            now = normalise(text)
            before = self.last.get(q)
            changed = before is not None and now != before
            self.last[q] = now
            self.history.append({"t": round(t, 2), "question": q, "answer": text, "changed": changed})
            if before is None:  # the first answer: what the question stands at, before any change
                self.on_event({"event": "first_answer", "question": q, "t": round(t, 2), "answer": text,
                               "time": time.time()})
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
