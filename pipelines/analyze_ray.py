"""Analysis jobs on Ray: one engine per Ray actor, the files (or time segments of long files)
spread across the actors, one progress bar for the whole job, one merged report.

    python run_stream.py analyze --ray a.mp4 b.mp4 c.mp4 -q "What is shown?" --out job
    python run_stream.py analyze --ray=ray://head:10001 --segments 8 lecture.mp4 --summary-every 60

Needs the `scale` extra (`pip install 'streamvz[scale]'`, which brings Ray). Actors ask for
one GPU each where the cluster has GPUs, one CPU each otherwise. A file that fails (missing,
corrupt, ...) is reported under `errors` with its code; the others finish. With `--segments N`
each file is cut into N equal time segments, one session each; the file's report merges them
in time order, every summary entry and answer marked with its segment. Workers on a remote
cluster must have streamvz installed; a local Ray started here runs this checkout's code.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from streamvz.errors import StreamError


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (ray://host:port, host:port, auto) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address in (None, "local"):
        here = str(Path(__file__).resolve().parents[1])  # actors import the same streamvz as we do
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        ray.init(address=address, log_to_driver=False)


def plan(videos: list[str], segments: int = 1, fps: float = 1.0) -> tuple[list[dict], list[dict], int]:
    """-> (jobs, errors of files that fail to probe, frames expected). Probing here is cheap and
    fails bad files before any actor loads a model."""
    from streamvz.sources import probe

    jobs, errors, frames = [], [], 0
    for video in videos:
        try:
            duration = float(probe(str(video)).duration or 0)
        except StreamError as e:
            errors.append({"video": str(video), "code": e.code, "message": e.message})
            continue
        frames += max(1, int(duration * fps))
        n = max(1, segments) if duration > 0 else 1
        for i in range(n):
            job = {"video": str(video)}
            if n > 1:
                job.update(segment=i, start=duration * i / n, end=duration * (i + 1) / n)
            jobs.append(job)
    return jobs, errors, frames


def _actor_classes():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Frames done so far, across every actor (the driver's bar polls it)."""

        def __init__(self):
            self.n = 0

        def add(self, k: int = 1):
            self.n += k

        def count(self) -> int:
            return self.n

    @ray.remote
    class Analyzer:
        """One engine for the actor's lifetime; jobs run one after another on its event loop."""

        def __init__(self, engine_kwargs: dict):
            self.engine_kwargs = engine_kwargs
            self.engine = None

        async def run(self, job: dict, options: dict, progress) -> dict:
            from pipelines.analyze import analyze
            from streamvz.engine import Engine

            try:
                if self.engine is None:
                    kw = dict(self.engine_kwargs)
                    if kw.get("dtype"):
                        import torch

                        kw["dtype"] = getattr(torch, kw["dtype"])
                    self.engine = Engine(**kw)
                return await analyze(self.engine, job["video"], progress=False, start=job.get("start", 0.0),
                                     end=job.get("end"), on_frame=lambda: progress.add.remote(1), **options)
            except StreamError as e:
                return {"video": job["video"], "error": {"code": e.code, "message": e.message, **(
                    {"last_good_t": e.details["last_good_t"]} if "last_good_t" in e.details else {})}}

    return Progress, Analyzer


async def analyze_on_ray(videos: list[str], engine_kwargs: dict, questions: list[str] = (),
                         summary_every: float | None = None, fps: float = 1.0, max_tokens: int = 64,
                         address: str | None = None, actors: int | None = None, segments: int = 1,
                         progress: bool = True) -> dict:
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    jobs, errors, total = plan(videos, segments, fps)
    report = {"ray": True, "fps": fps, "videos": [], "errors": errors}
    if not jobs:
        return report
    connect(address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    n = max(1, min(len(jobs), actors or gpus or cpus))
    Progress, Analyzer = _actor_classes()
    counter = Progress.remote()
    pool = [Analyzer.options(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1).remote(engine_kwargs)
            for _ in range(n)]
    options = {"questions": list(questions), "summary_every": summary_every, "fps": fps, "max_tokens": max_tokens}
    todo, running, done = list(jobs), {}, []
    bar = tqdm(total=total, unit="frame", desc=f"{len(jobs)} jobs on {n} actors", disable=not progress)
    try:
        for actor in pool:  # one job per actor at a time; the next goes to whichever finishes first
            if todo:
                job = todo.pop(0)
                running[actor.run.remote(job, options, counter)] = (actor, job)
        while running:
            ready, _ = await asyncio.to_thread(ray.wait, list(running), num_returns=1, timeout=0.5)
            bar.n = min(total, await asyncio.to_thread(ray.get, counter.count.remote()))
            bar.refresh()
            for ref in ready:
                actor, job = running.pop(ref)
                try:
                    done.append((job, await asyncio.to_thread(ray.get, ref)))
                except ray.exceptions.RayError as e:  # the actor died (out of memory, node lost)
                    done.append((job, {"video": job["video"], "error": {"code": "internal_error",
                                                                        "message": f"ray: {type(e).__name__}"}}))
                if todo:
                    nxt = todo.pop(0)
                    running[actor.run.remote(nxt, options, counter)] = (actor, nxt)
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)
    report.update(merge(videos, done, report["errors"]), actors=n, wall_s=round(time.perf_counter() - t0, 2))
    return report


async def analyze_here(engine, videos: list[str], questions: list[str] = (), summary_every: float | None = None,
                       fps: float = 1.0, max_tokens: int = 64, progress: bool = True) -> dict:
    """The same job in this process, one file after another (the reference a Ray run must match)."""
    from pipelines.analyze import analyze

    t0 = time.perf_counter()
    jobs, errors, _ = plan(videos, 1, fps)
    done = []
    for job in jobs:
        try:
            done.append((job, await analyze(engine, job["video"], questions, summary_every, fps, max_tokens,
                                            progress=progress)))
        except StreamError as e:
            done.append((job, {"video": job["video"], "error": {"code": e.code, "message": e.message}}))
    return {"ray": False, "fps": fps, **merge(videos, done, errors), "wall_s": round(time.perf_counter() - t0, 2)}


def merge(videos: list[str], done: list[tuple[dict, dict]], errors: list[dict]) -> dict:
    """Per file, in the order given: its report, or its segments' reports merged in time order."""
    by_video: dict[str, list[tuple[dict, dict]]] = {}
    for job, result in done:
        by_video.setdefault(job["video"], []).append((job, result))
    out = []
    for video in dict.fromkeys(map(str, videos)):
        parts = sorted(by_video.get(video, []), key=lambda jr: jr[0].get("start", 0.0))
        failed = [r for _, r in parts if "error" in r]
        if failed:  # a file is reported failed as a whole; its good segments are not half a report
            errors.append({"video": video, **failed[0]["error"]})
            continue
        if not parts:
            continue
        if len(parts) == 1 and "segment" not in parts[0][0]:
            out.append(parts[0][1])
            continue
        first = parts[0][1]
        merged = {"video": video, "fps": first["fps"], "duration_s": first["duration_s"], "summary": [],
                  "answers": [], "segments": [], "frames": 0, "wall_s": 0.0}
        for job, r in parts:
            i = job["segment"]
            merged["segments"].append({"segment": i, **r["segment"], "frames": r.get("frames", 0)})
            merged["summary"] += [{**e, "segment": i} for e in r["summary"]]
            merged["answers"] += [{**a, "segment": i} for a in r["answers"]]
            merged["frames"] += r.get("frames", 0)
            merged["wall_s"] = max(merged["wall_s"], r.get("wall_s", 0.0))
        out.append(merged)
    return {"videos": out, "errors": errors}


def to_markdown(report: dict) -> str:
    from pipelines.analyze import to_markdown as one

    parts = [f"# Analysis job: {len(report['videos'])} done, {len(report['errors'])} failed"
             + (f" ({report['actors']} Ray actors, {report.get('wall_s', 0):.1f} s)" if "actors" in report else ""), ""]
    for r in report["videos"]:
        if r.get("segments"):  # mark each timeline entry and answer with its segment
            r = {**r, "summary": [{**e, "text": f"[segment {e['segment']}] {e['text']}"} for e in r["summary"]],
                 "answers": [{**a, "question": f"[segment {a['segment']}] {a['question']}"} for a in r["answers"]]}
        text = one(r)
        if r.get("segments"):
            text += "\nSegments: " + ", ".join(f"#{s['segment']} {s['start']:.1f}-{s['end']:.1f} s"
                                                for s in r["segments"]) + "\n"
        parts.append(text.replace("\n# ", "\n## ").replace("# Analysis", "## Analysis", 1))
    if report["errors"]:
        parts += ["## Failed", ""] + [f"- `{e['video']}`: [{e['code']}] {e['message']}" for e in report["errors"]]
    return "\n".join(parts) + "\n"
