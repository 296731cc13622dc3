"""Counts that add up: for a server-side source, frames_seen + frames_dropped is every frame the
source produced at the requested fps, whether the session kept up or not (file and live URL)."""
from __future__ import annotations

import asyncio

import pytest

import videos as V
from clients.ws_chat import WsChat
from fixtures_serve import ServerThread

N, FPS, SIZE = 120, 60, (640, 480)  # 2 s at 60 fps (the protocol's most)


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    V.write_h264(str(root / "clip.mp4"), N, fps=FPS, size=SIZE)
    # One frame per engine step (no batching of a backlog) and loopback sources allowed (the test's camera).
    srv = ServerThread(tiny_llava, media_roots=[root], realtime_files=True, tokens_per_frame=32,
                       engine_kwargs={"max_batch_frames": 1}, allow_private_sources=True).start()
    yield srv
    srv.stop()


async def settled(chat: WsChat, seconds: float = 120) -> dict:
    """The status once nothing moves any more (the source's queue drained into the session)."""
    last = None
    for _ in range(int(seconds)):
        st = await chat.status()
        key = (st["frames_seen"], st["frames_dropped"], st["frames_pending"])
        if key == last and not st["frames_pending"]:
            return st
        last = key
        await asyncio.sleep(1.0)
    raise AssertionError(f"status never settled: {st}")


async def long_answer(chat: WsChat, opened: dict) -> None:
    """Ask for the longest answer the server allows (its `opened` limits). While a session
    answers, its new frames wait until the turn closes (the slot is one sequence), so a camera
    keeps sending while the session takes none: the source's queue overflows and drops, however
    fast the machine (no reliance on the engine being slower than 60 fps, which a quick CI
    machine was not)."""
    answer = chat.ask("Describe everything you see, in detail.", max_tokens=opened["limits"]["max_new_tokens"])
    await answer.result()


async def test_a_server_file_played_in_real_time_accounts_for_every_frame(server):
    async with WsChat(server.url) as chat:
        await long_answer(chat, await chat.open(source="clip.mp4", fps=FPS))
        ended = await chat.expect("status", timeout=60)
        while ended.get("event") != "source_ended":
            ended = await chat.expect("status", timeout=60)
    assert ended["frames_dropped"] > 0  # the session took no frames while it answered: some were dropped ...
    assert ended["frames_seen"] + ended["frames_dropped"] == N  # ... and counted, not lost


async def test_a_live_url_accounts_for_every_frame(server):
    port = V.free_port()
    with V.MpegTsSender("http", port, n_frames=N, fps=FPS, size=SIZE) as snd:
        async with WsChat(server.url) as chat:
            await long_answer(chat, await chat.open(source=snd.reader_url, fps=FPS))
            snd.wait(30)  # the camera sent all its frames and hung up
            st = await settled(chat)
            await chat.close()
    assert st["frames_dropped"] > 0
    assert st["frames_seen"] + st["frames_dropped"] == N


async def test_a_slow_consumer_of_a_real_time_file_sees_or_drops_every_frame(tmp_path):
    from streamvz.sources import open_source

    clip = V.write_h264(str(tmp_path / "c.mp4"), 45, fps=30, size=(160, 96))  # 1.5 s
    got = 0
    async with open_source(clip, fps=30, realtime=True) as src:
        async for _ in src:
            got += 1
            await asyncio.sleep(0.2)  # 6x slower than the clip
    assert src.frames_read == 45 and src.frames_dropped > 0
    assert got + src.frames_dropped == 45  # still true once the source is closed
