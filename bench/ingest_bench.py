"""Live ingest: how many frames per second a session sustains, alone and with 4/8 neighbours.

Each session feeds frames back to back with `await session.add_frame` (encode + VisionZip +
projector + prefill before it returns), all sessions at once, so the engine batches frames
across sessions. The sustained rate is frames / wall time: a live source at or below it
never drops. Rows for VisionZip tokens and full tokens, on the embedded default model
(streamvz-tiny: DINOv2-S + SmolLM2-135M) unless --model names another checkpoint.
A second table is the backlog rate (all of a session's frames queued at once, as in a file
job or a live source that fell behind) with one frame per LM prefill vs groups of 8.

    python bench/ingest_bench.py
    python bench/ingest_bench.py --model path/to/llava --device cuda --sessions 1 4 8 16
    python bench/ingest_bench.py --profile          # torch profiler: top ops of one ingest batch
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, machine_name, table, write_json  # noqa: E402

from streamvz.engine import Engine  # noqa: E402


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]  # a panning camera


async def sustained(engine: Engine, n_sessions: int, n_frames: int) -> float:
    sessions = [engine.session(session_id=f"s{i}-{time.monotonic_ns()}") for i in range(n_sessions)]
    clip = frames(n_frames)
    await sessions[0].add_frame(clip[0], t=0.0)  # warm up

    async def feed(s):
        for i, f in enumerate(clip):
            await s.add_frame(f, t=1.0 + i)

    t = time.perf_counter()
    await asyncio.gather(*(feed(s) for s in sessions))
    took = time.perf_counter() - t
    for s in sessions:
        await s.close()
    return n_frames / took


async def backlog(engine: Engine, n_frames: int) -> float:
    """Frames per second through one session whose frames are all queued at once (a file job,
    or a live source that fell behind): the engine prefills them in groups."""
    s = engine.session(session_id=f"backlog-{time.monotonic_ns()}")
    await s.add_frame(frames(1)[0], t=0.0)  # warm up
    clip = frames(n_frames)
    t = time.perf_counter()
    for i, f in enumerate(clip):
        s.submit_frame(f, t=1.0 + i)
    await s.ask("ok?", max_new_tokens=1).result()  # answered once every queued frame is in
    took = time.perf_counter() - t
    await s.close()
    return n_frames / took


async def run(args) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        tpf = None if tokens == 0 else tokens
        engine = Engine(model=args.model, device=args.device, tokens_per_frame=tpf,
                        window_frames=args.window, max_batch_frames=max(args.sessions))
        try:
            for n in sorted(set(args.sessions)):  # warm up every batch shape the runs will see
                engine.adapter.encode_frames(np.stack(frames(n)))
            for n in args.sessions:
                fps = await sustained(engine, n, args.frames)
                rows.append({"tokens_per_frame": tokens or engine.adapter.tokens_per_frame, "sessions": n,
                             "fps_per_session": fps, "fps_total": fps * n})
                print(f"  {tokens or 'full'} tokens, {n} sessions: {fps:.2f} fps/session", flush=True)
        finally:
            await engine.aclose()
    return rows


async def run_backlog(args) -> list[dict]:
    """Grouped prefill (the default, up to 8 frames per LM call) against one frame per call,
    interleaved on the same engine so both see the same machine."""
    engine = Engine(model=args.model, device=args.device, tokens_per_frame=args.tokens[0] or None,
                    window_frames=args.window, max_batch_frames=8, max_backlog_frames=args.frames)
    best = {}
    try:
        engine.adapter.encode_frames(np.stack(frames(8)))
        for _ in range(args.repeats):
            for group in (1, 8):
                engine.max_prefill_frames = group
                best[group] = max(best.get(group, 0.0), await backlog(engine, args.frames))
    finally:
        await engine.aclose()
    rows = [{"tokens_per_frame": engine.adapter.tokens_per_frame, "frames_per_prefill": g, "backlog_fps": fps,
             "speedup": fps / best[1]} for g, fps in best.items()]
    return rows


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    engine = Engine(model=args.model, device=args.device, tokens_per_frame=args.tokens[0] or None,
                    window_frames=args.window)
    clip = np.stack(frames(8))
    engine.adapter.encode_frames(clip)  # warm up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tprofile(activities=acts) as prof:
        engine.adapter.encode_frames(clip)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="streamvz-tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 0], help="tokens per frame; 0 = full")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--frames", type=int, default=16, help="frames per session")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the backlog comparison")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.profile:
        return profile(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Ingest bench: {args.model} on {device}", flush=True)
    rows = asyncio.run(run(args))
    print(table(rows, ["tokens_per_frame", "sessions", "fps_per_session", "fps_total"]))
    print("\nBacklog: one session's queued frames, prefilled one per LM call vs in groups of 8:")
    backlog_rows = asyncio.run(run_backlog(args))
    print(table(backlog_rows, ["tokens_per_frame", "frames_per_prefill", "backlog_fps", "speedup"]))
    path = write_json(f"ingest-{machine_name(device)}", {"machine": machine(device), "model": args.model,
                                                          "rows": rows, "backlog_rows": backlog_rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
