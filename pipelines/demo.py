"""The end-to-end demo (`python run_stream.py demo`, `make demo`): a server on a free port on the
given engine, a generated sample clip played in real time as a server video, and a websocket
client asking questions while it plays and printing the streamed answers. The generated clip
lives in a temp directory that is removed at the end, also when the demo is stopped.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time


async def _until(chat, ok, seconds: float) -> None:
    """Poll the session's status until ok(status), or give up after `seconds`."""
    for _ in range(int(seconds * 20)):
        if ok(await chat.status()):
            return
        await asyncio.sleep(0.05)


async def demo(open_engine, model: str, video: str | None = None, asks: list[str] = (), seconds: float = 8.0,
               fps: float = 2.0, max_tokens: int = 24) -> int:
    """Start a server on a free port, generate a sample clip (unless `video`), stream it, ask,
    print the answers. `open_engine()` returns the engine's async context manager."""
    media = tempfile.mkdtemp(prefix="streamvz-demo-")
    try:
        return await _demo(open_engine, model, media, video, list(asks), seconds, fps, max_tokens)
    finally:
        shutil.rmtree(media, ignore_errors=True)  # the generated clip, also when stopped part way


async def _demo(open_engine, model, media, video, asks, seconds, fps, max_tokens) -> int:
    from clients.answer import usage_line
    from clients.ws_chat import WsChat
    from pipelines.sample import write_sample
    from pipelines.ws_chat import ServeConfig, serve

    clip = video or os.path.join(media, "sample.mp4")
    questions = [(q, None) for q in asks]
    if not video:
        generated = write_sample(clip, seconds=seconds, fps=4)
        questions = questions or generated
    questions = questions or [("What is in the video?", None)]
    print(f"demo: clip {clip}; loading {model} ...", flush=True)
    t0 = time.perf_counter()
    async with open_engine() as engine:
        print(f"demo: model ready in {time.perf_counter() - t0:.1f}s", flush=True)
        cfg = ServeConfig(port=0, media_roots=[os.path.dirname(os.path.abspath(clip))])
        ready = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        server = asyncio.create_task(serve(engine, cfg, ready, stop))
        port = await ready
        print(f"demo: server on ws://127.0.0.1:{port}/ws (web page http://127.0.0.1:{port}/)", flush=True)
        try:
            async with WsChat(f"ws://127.0.0.1:{port}/ws") as chat:
                opened = await chat.open(source=os.path.basename(clip), fps=fps)
                print(f"demo: session {opened['session']} watching {os.path.basename(clip)} at {fps:g} fps "
                      "(played in real time)", flush=True)
                await _until(chat, lambda st: st["frames_in_window"] >= 2, 30)  # the first question once a couple are in
                interval = seconds / (len(questions) + 1)
                for i, (q, expected) in enumerate(questions):
                    if i and i == len(questions) - 1:  # the last once the whole clip is in: its "now" is the end
                        await _until(chat, lambda st: st["source"] != "running" and not st["frames_pending"],
                                     seconds + 60)
                    elif i:
                        await asyncio.sleep(interval)  # ask while the clip streams
                    st = await chat.status()
                    print(f"\n[{st['frames_seen']} frames seen, {st['frames_in_window']} in window, "
                          f"{st['cache_tokens']} cache tokens]\nQ: {q}\nA: ", end="", flush=True)
                    answer = chat.ask(q, max_tokens=max_tokens)
                    async for delta in answer:
                        print(delta, end="", flush=True)
                    print(f"\n   ({usage_line(answer.usage)})"
                          + (f"  expected at the end of the clip: {expected}" if expected else ""), flush=True)
                await chat.close()
        finally:
            stop.set()
            await server
    print("\ndemo: done", flush=True)
    return 0
