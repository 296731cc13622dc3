"""Live camera Q&A over ten minutes: do standing questions follow a scene that keeps changing?

A generated camera (H.264 file, 1 fps sampled, the embedded model's scene generator on a held-out
background photo) shows a red circle, then a blue square, switching every `--switch` seconds for
`--minutes`. pipelines/live_qa.LiveQA watches it with a standing question asked every `--every`
seconds of video, twice side by side on one engine (two sessions, one forward per step):
scoped to the last `--watch-window` seconds (`live`'s default) and over the whole cache window.

For every switch: was there an alert naming the new colour within one `--every` interval, and
how late; plus alerts that named the wrong colour (or fired with no switch), and the share of
standing answers that matched the picture at the time they were asked. Time is video time: the
file is read as fast as the engine takes it, so the figure is the model's and the window's, not
the CPU's.

    python bench/live_bench.py                    # 10 minutes, switch every 20 s, check every 10 s
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common import machine, machine_name, table, write_json  # noqa: E402
from videos import write_video  # noqa: E402

from pipelines.live_qa import LiveQA, normalise  # noqa: E402
from streamvz.engine import Engine  # noqa: E402
from streamvz.tiny import data  # noqa: E402

SHOWS = (("red", "circle"), ("blue", "square"))


def write_camera(path: str, seconds: int, switch: int, seed: int) -> list[str]:
    """An H.264 clip at 1 fps; returns the colour shown at each second."""
    rng = np.random.default_rng(seed)
    bg = data.random_background(rng, "test")
    objs = [data.Obj(s, c, float(rng.uniform(80, 144)), float(rng.uniform(80, 144)), 90.0) for c, s in SHOWS]
    shown = [(t // switch) % len(SHOWS) for t in range(seconds)]
    write_video(path, (data.render(data.Scene(bg, (objs[k],))) for k in shown), fps=1, size=(data.SIZE, data.SIZE))
    return [SHOWS[k][0] for k in shown]


def score(live: LiveQA, colours: list[str], switch: int, every: float) -> dict:
    """Per switch: the first alert at or after it that names the new colour, if it came before the
    next switch; `on_time` when within one `every` interval."""
    alerts = [h for h in live.history if h["changed"]]
    switches = list(range(switch, len(colours), switch))
    delays = []
    for s in switches:
        hit = [a["t"] - s for a in alerts if s <= a["t"] < s + switch and normalise(a["answer"]) == colours[s]]
        delays.append(hit[0] if hit else None)
    wrong = [a for a in alerts if normalise(a["answer"]) != colours[int(a["t"])]]
    right = [normalise(h["answer"]) == colours[int(h["t"])] for h in live.history]
    on_time = sum(d is not None and d <= every for d in delays)
    return dict(switches=len(switches), alerted_on_time=on_time, missed=sum(d is None for d in delays),
                worst_delay_s=max((d for d in delays if d is not None), default=None),
                median_delay_s=float(np.median([d for d in delays if d is not None])) if any(
                    d is not None for d in delays) else None,
                wrong_alerts=len(wrong), checks=len(right), answers_right=round(sum(right) / max(1, len(right)), 3))


async def run(args, path: str, colours: list[str]) -> list[dict]:
    """Both scopes side by side on one engine; each LiveQA reads the file in its own session."""
    quiet = lambda _: None  # noqa: E731 - the history is scored at the end
    async with Engine("streamvz-tiny", max_sessions=2) as engine:
        lives = {f"last {args.watch_window:g} s": args.watch_window, "whole window": None}
        lives = {name: LiveQA(engine, path, [args.question], every=args.every, fps=1.0, on_alert=quiet,
                              on_event=quiet, watch_window=w) for name, w in lives.items()}
        windows = {}  # frames in the window, last seen while the session was open (LiveQA closes it)

        async def one(name, live):
            task = asyncio.create_task(live.run())
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                if live.session is not None and not task.done():
                    windows[name] = live.session.stats()["frames_in_window"]
            await task

        t0 = time.perf_counter()
        await asyncio.gather(*(one(n, lv) for n, lv in lives.items()))
        wall = round(time.perf_counter() - t0)
    return [dict(scope=name, **score(live, colours, args.switch, args.every), frames_in_window=windows.get(name),
                 wall_s=wall) for name, live in lives.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--switch", type=int, default=20, help="seconds between scene changes")
    p.add_argument("--every", type=float, default=10.0, help="seconds of video between standing checks")
    p.add_argument("--watch-window", type=float, default=10.0, help="the scoped standing question's window (s)")
    p.add_argument("--question", default="What colour is the shape?")
    p.add_argument("--seed", type=int, default=4,
                   help="picks the held-out background (4: a grey photo of text, neither object's colour)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamvz-live-bench-") as tmp:
        path = os.path.join(tmp, "camera.mp4")
        colours = write_camera(path, int(args.minutes * 60), args.switch, args.seed)
        rows = asyncio.run(run(args, path, colours))
    print(table(rows, ["scope", "switches", "alerted_on_time", "missed", "median_delay_s", "worst_delay_s", "wrong_alerts", "checks",
                       "answers_right", "frames_in_window", "wall_s"]))
    path = write_json(f"live-{machine_name()}", {"machine": machine(), "args": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
