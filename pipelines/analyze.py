"""Long-video analysis job: walk a file, answer questions and/or write a timestamped summary.

    python run_stream.py analyze lecture.mp4 --question "Who speaks?" --summary-every 60 --out report

writes report.json and report.md. The video streams through one session (rolling window),
so an hour of video needs the memory of one window; a summary entry describes the frames
in the window at its time. The questions are answered once, at the end of the video, from
the frames still in the window (the last `--window` frames).
Bad input (missing file, not a video, ...) raises StreamError; the CLI prints
`error [code]: message` and exits 2. A job stopped part way (Ctrl-C, SIGTERM: the task is
cancelled) keeps what it has: `report["partial"]` is True, `stopped_at_t` says how far it got,
and the files are written before the cancellation goes on.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

SUMMARY_PROMPT = "Describe what happens in the video."


class Analysis:
    """One job; `report` holds what is known so far (also after a cancellation)."""

    def __init__(self, engine, video: str, questions: list[str] = (), summary_every: float | None = None,
                 fps: float = 1.0, max_tokens: int = 64, progress: bool = True, out: str | None = None,
                 start: float = 0.0, end: float | None = None, on_frame=None):
        """`start`/`end` (seconds) analyse one time segment of the file (Ray jobs split long files so);
        `on_frame()` is called per frame (a job-wide progress bar counts with it)."""
        self.engine, self.video, self.questions = engine, str(video), list(questions)
        self.summary_every, self.fps, self.max_tokens = summary_every, fps, max_tokens
        self.progress, self.out = progress, out
        self.start, self.end, self.on_frame = start, end, on_frame
        self.report = {"video": self.video, "fps": fps, "duration_s": 0.0, "partial": False,
                       "summary": [], "answers": []}

    async def run(self) -> dict:
        from streamvz.sources import probe

        info = probe(self.video)  # fails fast, with a precise code, before any model work
        duration = self.report["duration_s"] = float(getattr(info, "duration", 0) or 0)
        if self.end is not None and duration:
            self.end = min(self.end, duration)
        if self.segment:
            self.report["segment"] = {"start": self.start, "end": self.stop}
        session = self.engine.session()
        t0 = time.perf_counter()
        try:
            await self._walk(session)
        except asyncio.CancelledError:
            self.report["partial"] = True
            raise
        finally:
            self.report["frames"] = session.stats()["frames_seen"]
            self.report["wall_s"] = round(time.perf_counter() - t0, 2)
            if self.out:  # written before a cancellation goes on: a stopped job keeps its work
                self.write(self.out)
            await session.close()
        return self.report

    async def _walk(self, session) -> None:
        from tqdm import tqdm

        from streamvz.sources import open_source

        report, every, stop = self.report, self.summary_every, self.stop
        report["stopped_at_t"] = self.start
        window = {"start": self.start, "end": self.end} if self.segment else {}
        with tqdm(total=int((stop - self.start) * self.fps) or None, unit="frame", disable=not self.progress,
                  desc=Path(self.video).name) as bar:
            next_summary = self.start + every if every else None
            async with open_source(self.video, fps=self.fps, **window) as src:
                async for frame in src:
                    await session.add_frame(frame.image, t=frame.t)
                    report["stopped_at_t"] = round(frame.t, 2)
                    bar.update(1)
                    if self.on_frame is not None:
                        self.on_frame()
                    if every and frame.t >= next_summary:
                        await self._summarise(session, frame.t)
                        next_summary += every
        if every and (not report["summary"] or report["summary"][-1]["t"] < stop - 1e-6):
            await self._summarise(session, stop)
        for q in self.questions:
            answer = session.ask(q, max_new_tokens=self.max_tokens)
            text = await answer.result()
            report["answers"].append({"question": q, "answer": text.strip(), "t": report["stopped_at_t"],
                                      "usage": answer.usage})
        report.pop("stopped_at_t")  # the whole video was walked

    @property
    def segment(self) -> bool:
        return self.start > 0 or self.end is not None

    @property
    def stop(self) -> float:
        """Where the walk ends: the segment's end, else the video's."""
        return self.end if self.end is not None else self.report["duration_s"]

    async def _summarise(self, session, t: float) -> None:
        text = await session.ask(SUMMARY_PROMPT, max_new_tokens=self.max_tokens).result()
        self.report["summary"].append({"t": round(t, 2), "text": text.strip()})

    def write(self, out: str) -> None:
        Path(out + ".json").write_text(json.dumps(self.report, indent=2))
        Path(out + ".md").write_text(to_markdown(self.report))


async def analyze(engine, video: str, questions: list[str] = (), summary_every: float | None = None,
                  fps: float = 1.0, max_tokens: int = 64, progress: bool = True, out: str | None = None,
                  start: float = 0.0, end: float | None = None, on_frame=None) -> dict:
    """Run one Analysis to its end; returns the report (see Analysis for a stopped job)."""
    return await Analysis(engine, video, questions, summary_every, fps, max_tokens, progress, out,
                          start, end, on_frame).run()


def to_markdown(report: dict) -> str:
    lines = [f"# Analysis of `{report['video']}`", ""]
    if report.get("partial"):
        lines += [f"**Partial report**: the job was stopped at {_clock(report.get('stopped_at_t', 0))} of "
                  f"{_clock(report['duration_s'])}; questions not yet answered are missing.", ""]
    lines += [f"{report.get('frames', 0)} frames at {report['fps']:g} fps over {report['duration_s']:.1f} s "
              f"(took {report.get('wall_s', 0):.1f} s).", ""]
    if report["summary"]:
        lines += ["## Timeline", ""]
        lines += [f"- **{_clock(e['t'])}** {e['text'] or '(no answer)'}" for e in report["summary"]]
        lines.append("")
    if report["answers"]:
        at = _clock(report["answers"][0]["t"])
        lines += [f"## Questions (answered at the end of the video, {at}, from the frames still in the window)", ""]
        for a in report["answers"]:
            lines += [f"**Q:** {a['question']}  ", f"**A:** {a['answer'] or '(no answer)'}", ""]
    return "\n".join(lines)


def _clock(t: float) -> str:
    t = int(t)
    return f"{t // 3600:d}:{t // 60 % 60:02d}:{t % 60:02d}"
