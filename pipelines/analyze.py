"""Long-video analysis job: walk a file, answer questions and/or write a timestamped summary.

    python run_stream.py analyze lecture.mp4 --question "Who speaks?" --summary-every 60 --out report

writes report.json and report.md. The video streams through one session (rolling window),
so an hour of video needs the memory of one window; a summary entry describes the frames
in the window at its time, the questions are answered at the end (over the last window).
Bad input (missing file, not a video, ...) raises StreamError; the CLI prints
`error [code]: message` and exits 2.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

SUMMARY_PROMPT = "Describe what happens in the video."


async def analyze(engine, video: str, questions: list[str] = (), summary_every: float | None = None,
                  fps: float = 1.0, max_tokens: int = 64, progress: bool = True, out: str | None = None,
                  start: float = 0.0, end: float | None = None, on_frame=None) -> dict:
    """`start`/`end` (seconds) analyse one time segment of the file (Ray jobs split long files so);
    `on_frame()` is called per frame (a job-wide progress bar counts with it)."""
    from tqdm import tqdm

    from streamvz.sources import open_source, probe

    info = probe(str(video))  # fails fast, with a precise code, before any model work
    duration = float(getattr(info, "duration", 0) or 0)
    segment = start > 0 or end is not None
    end = min(end, duration) if end is not None and duration else end
    stop = end if end is not None else duration
    session = engine.session()
    report = {"video": str(video), "fps": fps, "duration_s": duration, "summary": [], "answers": []}
    if segment:
        report["segment"] = {"start": start, "end": stop}
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=int((stop - start) * fps) or None, unit="frame", disable=not progress, desc=Path(video).name)
        next_summary = start + summary_every if summary_every else None
        async with open_source(str(video), fps=fps, **({"start": start, "end": end} if segment else {})) as src:
            async for frame in src:
                await session.add_frame(frame.image, t=frame.t)
                bar.update(1)
                if on_frame is not None:
                    on_frame()
                if summary_every and frame.t >= next_summary:
                    text = await session.ask(SUMMARY_PROMPT, max_new_tokens=max_tokens).result()
                    report["summary"].append({"t": round(frame.t, 2), "text": text.strip()})
                    next_summary += summary_every
        bar.close()
        if summary_every and (not report["summary"] or report["summary"][-1]["t"] < stop - 1e-6):
            text = await session.ask(SUMMARY_PROMPT, max_new_tokens=max_tokens).result()
            report["summary"].append({"t": round(stop, 2), "text": text.strip()})
        for q in questions:
            answer = session.ask(q, max_new_tokens=max_tokens)
            text = await answer.result()
            report["answers"].append({"question": q, "answer": text.strip(), "usage": answer.usage})
        report["frames"] = session.stats()["frames_seen"]
        report["wall_s"] = round(time.perf_counter() - t0, 2)
    finally:
        await session.close()
    if out:
        Path(out + ".json").write_text(json.dumps(report, indent=2))
        Path(out + ".md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    lines = [f"# Analysis of `{report['video']}`", "",
             f"{report.get('frames', 0)} frames at {report['fps']:g} fps over {report['duration_s']:.1f} s "
             f"(took {report.get('wall_s', 0):.1f} s).", ""]
    if report["summary"]:
        lines += ["## Timeline", ""]
        lines += [f"- **{_clock(e['t'])}** {e['text'] or '(no answer)'}" for e in report["summary"]]
        lines.append("")
    if report["answers"]:
        lines += ["## Questions", ""]
        for a in report["answers"]:
            lines += [f"**Q:** {a['question']}  ", f"**A:** {a['answer'] or '(no answer)'}", ""]
    return "\n".join(lines)


def _clock(t: float) -> str:
    t = int(t)
    return f"{t // 3600:d}:{t // 60 % 60:02d}:{t % 60:02d}"
