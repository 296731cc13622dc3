"""Scale-out bench: 1 vs 2 pool workers behind a real mosquitto (run_stream.py worker processes).

    python bench/scale_bench.py                               # embedded model, this machine
    python bench/scale_bench.py --workers 1 2 4 --device cuda --capacity 16 --seconds 60   # a GPU box

For each pool size: open sessions through the shared topic until the pool answers
`too_many_sessions` (sessions served), then push frames to every session at --push-fps for
--seconds and count the frames the workers took in (frames/s, from each session's status).
Prints a table and writes JSON (bench/results/scale_<machine>.json unless --out).
On 2 shared CPU cores a second worker adds sessions but little throughput: the point is the
figure and the command to run on a real cluster.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import RESULTS, machine, machine_name  # noqa: E402
from fixtures_pool import PoolWatch, Worker, up  # noqa: E402
from fixtures_serve import Broker  # noqa: E402

from clients.mqtt_client import MqttChat  # noqa: E402
from streamvz.errors import StreamError  # noqa: E402


async def one_pool(n: int, a) -> dict:
    broker = Broker().start()
    ids = [f"b{i}" for i in range(n)]
    extra = ("--device", a.device) if a.device else ()
    workers = [Worker(broker.port, a.model, w, max_sessions=a.capacity, keepalive=5, extra=extra) for w in ids]
    chats = []
    try:
        async with PoolWatch(broker.port) as watch:
            await watch.until(up(*ids), 600)
        while True:  # open until the pool is full
            c = MqttChat("127.0.0.1", broker.port, session=f"s{len(chats)}", pool=True, timeout=120)
            await c.__aenter__()
            try:
                await c.open()
            except StreamError as e:
                await c.__aexit__(None, None, None)
                assert e.code == "too_many_sessions", e
                break
            chats.append(c)
        from videos import pattern_frame

        frames = [pattern_frame(i) for i in range(16)]
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < a.seconds:  # every session gets push_fps frames/s
            await asyncio.gather(*(c.push(frames[k % 16], t=k / a.push_fps) for c in chats))
            k += 1
            await asyncio.sleep(max(0.0, t0 + k / a.push_fps - time.perf_counter()))
        await asyncio.sleep(1.0)  # frames in flight
        seen = 0
        for c in chats:
            seen += (await c.status())["frames_seen"]
        wall = time.perf_counter() - t0
        pushed = k * len(chats)
        return {"workers": n, "sessions": len(chats), "frames_pushed": pushed, "frames_taken": seen,
                "frames_per_s": round(seen / wall, 2), "seconds": round(wall, 1)}
    finally:
        for c in chats:
            await c.__aexit__(None, None, None)
        for w in workers:
            w.stop()
        broker.stop()


async def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to measure")
    p.add_argument("--model", default="streamvz-tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--capacity", type=int, default=4, help="--max-sessions of each worker")
    p.add_argument("--push-fps", type=float, default=4.0, help="frames/s pushed to every session")
    p.add_argument("--seconds", type=float, default=15.0, help="how long frames are pushed")
    p.add_argument("--out", help="JSON file (default bench/results/scale_<machine>.json)")
    a = p.parse_args(argv)
    rows = [await one_pool(n, a) for n in a.workers]
    print(f"\npool scale-out ({a.model}, capacity {a.capacity}/worker, {a.push_fps:g} frames/s per session pushed)")
    print("| workers | sessions served | frames pushed | frames taken | frames/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['sessions']} | {r['frames_pushed']} | {r['frames_taken']} | {r['frames_per_s']} |")
    out = a.out or os.path.join(RESULTS, f"scale_{machine_name(a.device or 'cpu')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine(a.device or "cpu"), "args": vars(a), "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
