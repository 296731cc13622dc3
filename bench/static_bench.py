"""Static cameras: VisionZip alone vs VisionZip + temporal drop, at one KV budget, in one run.

Two generated 1 fps clips (the embedded model's scene generator, held-out backgrounds, sensor noise):
  static  a fixed background; a few events: an object enters, stays `--stay` s, leaves
  busy    the same length, every frame different everywhere (a camera panning over a photo, objects
          crossing it)

For each clip and mode: the window's span in seconds at the end, visual tokens per written frame
and per seen frame (prefill cost), frames skipped, and, on the static clip, what the embedded
model answers at the end: "Was there a <colour> <shape>?" for every event (recall) and for
objects never shown (absent-object accuracy). Each question goes to its own session fed the same
clip (the sessions are ingested together, one forward per step).

    python bench/static_bench.py                 # CPU, the embedded model
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, machine_name, table, write_json  # noqa: E402

from streamvz.engine import Engine  # noqa: E402
from streamvz.tiny import data, questions  # noqa: E402


def noisy(frame: np.ndarray, rng) -> np.ndarray:
    """A camera never sends the same pixels twice."""
    return np.clip(frame.astype(np.int16) + rng.normal(0, 2.0, frame.shape).round().astype(np.int16), 0, 255).astype(np.uint8)


def static_clip(rng, frames: int, events: int, stay: int):
    bg = data.random_background(rng, "test")
    pairs = [(c, s) for c in data.COLOURS for s in data.SHAPES]
    order = rng.permutation(len(pairs))
    shown, absent = [pairs[i] for i in order[:events]], [pairs[i] for i in order[events:2 * events]]
    starts = np.linspace(0, frames - stay - 1, events + 1)[1:].round().astype(int)  # the last ends at the clip's end
    scenes = [data.Scene(bg) for _ in range(frames)]
    for (c, s), t0 in zip(shown, starts):
        o = data.Obj(s, c, float(rng.uniform(60, 164)), float(rng.uniform(60, 164)), float(rng.uniform(60, 100)))
        for t in range(t0, t0 + stay):
            scenes[t] = data.Scene(bg, (o,))
    return [noisy(data.render(sc), rng) for sc in scenes], shown, absent, [int(t) for t in starts]


def busy_clip(rng, frames: int):
    """A panning camera over a photo with objects crossing it: every frame differs everywhere."""
    import skimage.data

    name = str(rng.choice(data.TEST_PHOTOS))
    h, w = getattr(skimage.data, name)().shape[:2]
    crop = min(h, w) // 2
    objs = list(data.random_objects(rng, 3))
    out = []
    for t in range(frames):
        x = int((w - crop) * (0.5 + 0.5 * np.sin(t / 7)))  # pan back and forth
        y = int((h - crop) * (0.5 + 0.5 * np.cos(t / 11)))
        moved = tuple(replace(o, cx=float((o.cx + 23 * t) % 180 + 22), cy=float((o.cy + 11 * t) % 180 + 22))
                      for o in objs)
        out.append(noisy(data.render(data.Scene(("photo", name, x, y, crop), moved)), rng))
    return out


async def run(clip, asks, args, temporal):
    """Feed the clip to one session per question (and one when there are none); answers + stats."""
    n = max(1, len(asks))
    async with Engine("streamvz-tiny", tokens_per_frame=64, cache_budget_tokens=args.budget, max_sessions=n,
                      temporal=temporal) as engine:
        ss = [engine.session() for _ in range(n)]
        t0 = time.perf_counter()
        for t, f in enumerate(clip):
            await asyncio.gather(*(s.add_frame(f, t=float(t)) for s in ss))
        ingest = (time.perf_counter() - t0) / len(clip)
        st = ss[0].stats()
        answers = await asyncio.gather(*(s.ask(q, max_new_tokens=2).result() for s, q in zip(ss, asks)))
    written = st["frames_seen"] - st["frames_skipped"]
    return dict(span_s=st["window_span_s"], frames_in_window=st["frames_in_window"],
                tokens_per_written_frame=st["frame_tokens_mean"],
                tokens_per_seen_frame=st["frame_tokens_mean"] * written / st["frames_seen"],
                frames_skipped=st["frames_skipped"], ingest_ms_per_frame=1e3 * ingest / n,
                cache_tokens=st["cache_tokens"]), [questions.normalise(a) for a in answers]


async def main_async(args):
    rng = np.random.default_rng(args.seed)
    clip, shown, absent, starts = static_clip(rng, args.frames, args.events, args.stay)
    busy = busy_clip(rng, args.frames)
    qs = [f"Was there a {c} {s}?" for c, s in shown] + [f"Was there a {c} {s}?" for c, s in absent]
    rows, by = [], {}
    for temporal in ("off", "drop"):
        if "static" in args.clips:
            st, answers = await run(clip, qs, args, temporal)
            recall = sum(a == "yes" for a in answers[:len(shown)]) / len(shown)
            absent_acc = sum(a == "no" for a in answers[len(shown):]) / len(absent)
            in_window = sum(t + args.stay - 1 >= args.frames - 1 - st["span_s"] for t in starts)
            rows.append(dict(clip="static", temporal=temporal, **st, event_recall=recall,
                             absent_accuracy=absent_acc, events_in_window=in_window))
            by["static", temporal] = rows[-1]
            print(f"  static {temporal}: {rows[-1]}", flush=True)
        if "busy" in args.clips:
            bst, _ = await run(busy, [], args, temporal)
            rows.append(dict(clip="busy", temporal=temporal, **bst))
            by["busy", temporal] = rows[-1]
            print(f"  busy {temporal}: {rows[-1]}", flush=True)
    summary = dict(events=len(shown), event_starts_s=starts)
    if "static" in args.clips:
        off, on = by["static", "off"], by["static", "drop"]
        summary.update(span_ratio=(on["span_s"] or 0) / max(off["span_s"] or 1e-9, 1e-9),
                       prefill_ratio=on["tokens_per_seen_frame"] / off["tokens_per_seen_frame"])
    if "busy" in args.clips:
        summary["busy_tokens_ratio"] = (by["busy", "drop"]["tokens_per_seen_frame"]
                                        / by["busy", "off"]["tokens_per_seen_frame"])
    return rows, summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60, help="clip length in frames (1 fps)")
    p.add_argument("--events", type=int, default=3)
    p.add_argument("--stay", type=int, default=4, help="seconds an event's object stays")
    p.add_argument("--budget", type=int, default=768, help="KV budget per session (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", nargs="+", default=["static", "busy"], choices=["static", "busy"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    rows, summary = asyncio.run(main_async(args))
    print(table(rows, ["clip", "temporal", "span_s", "frames_in_window", "tokens_per_written_frame",
                       "tokens_per_seen_frame", "frames_skipped", "ingest_ms_per_frame", "event_recall",
                       "absent_accuracy", "events_in_window"]))
    print(summary)
    path = write_json(f"static-{machine_name()}", {"machine": machine(), "args": vars(args), "rows": rows,
                                                   "summary": summary}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
