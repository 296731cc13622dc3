"""The web page in real headless chromium: served by the server, streams an answer over the websocket."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest

from fixtures_serve import CHROMIUM, Chromium, ServerThread
from videos import write_h264

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps installs it)")


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_h264(str(root / "clip.mp4"), 20, fps=10, size=(160, 96))
    from streamvz.protocol import Limits

    # Every browser here comes from 127.0.0.1 and leaves its session for the grace period.
    srv = ServerThread(tiny_llava, media_roots=[root], limits=Limits(max_sessions_per_client=16),
                       allow_private_sources=True).start()  # the tests' cameras are on loopback
    yield srv
    srv.stop()


async def poll(browser: Chromium, expression: str, timeout: float = 90):
    for _ in range(int(timeout * 10)):
        value = await browser.evaluate(expression)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}: {await browser.evaluate('JSON.stringify(window.svz)')}")


async def test_page_streams_an_answer_about_a_server_video(server):
    url = f"{server.http}/?source=clip.mp4&ask={quote('What is shown?')}&ask_after=1.5&max_tokens=12"
    browser = await Chromium().start(url)
    try:
        await poll(browser, "window.svz && window.svz.done.q1")
        svz = json.loads(await browser.evaluate("JSON.stringify(window.svz)"))
        assert svz["session"] and not svz["errors"]
        assert svz["tokens"] >= 2  # streamed as several deltas, not one blob
        assert svz["answers"]["q1"] and svz["done"]["q1"]["completion_tokens"] >= 2
        shown = await browser.evaluate("document.querySelector('#log .a').textContent")
        assert shown == svz["answers"]["q1"]  # rendered on the page as it streamed
        assert "tokens, first after" in await browser.evaluate("document.querySelector('#log .meta').textContent")
        status = await poll(browser, "document.getElementById('status').textContent.includes('frames seen') && "
                                     "document.getElementById('status').textContent")
        assert "2 frames seen" in status  # the 2 s clip at the page's default 1 fps
    finally:
        await browser.stop()


async def test_page_pushes_the_browser_camera(server):
    browser = await Chromium().start(f"{server.http}/")
    try:
        await poll(browser, "document.readyState === 'complete' && window.svz")
        await browser.evaluate("document.querySelector('input[value=camera]').checked = true;"
                               "document.getElementById('fps').value = '5'; document.getElementById('start').click()")
        await poll(browser, "window.svz.session && window.svz.frames >= 3", timeout=60)
        sid = await browser.evaluate("window.svz.session")

        async def seen():
            return server.service.entries[sid].session.stats()["frames_seen"]
        assert server.call(seen) >= 1
        await browser.evaluate("document.getElementById('question').value = 'What do you see?';"
                               "document.getElementById('ask').requestSubmit()")
        await poll(browser, "window.svz.done.q1")
        assert await browser.evaluate("window.svz.answers.q1.length > 0")
    finally:
        await browser.stop()


async def test_page_shows_what_the_model_sees(server, tmp_path):
    """A server video picked: the latest frame and a strip of the window's frames with their times
    appear on the page; the screenshot shows the frame (the clip's black and white index bars)."""
    import numpy as np
    from PIL import Image

    browser = await Chromium().start(f"{server.http}/?source=clip.mp4")
    try:
        await poll(browser, "window.svz.preview && window.svz.preview.window >= 2 && "
                            "document.getElementById('latest').naturalWidth > 0")
        captions = await browser.evaluate("[...document.querySelectorAll('#strip figcaption')].map(c => c.textContent)")
        assert len(captions) >= 2 and all(c.endswith(" s") for c in captions)
        times = [float(c[:-2]) for c in captions]
        assert times == sorted(times)  # oldest first
        assert "the latest frame, t = " in await browser.evaluate("document.getElementById('latest-caption').textContent")
        box = await browser.evaluate("JSON.stringify(document.getElementById('latest').getBoundingClientRect())")
        shot = await browser.screenshot(str(tmp_path / "page.png"))
    finally:
        await browser.stop()
    box = json.loads(box)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    x0, y0 = int(box["x"]), int(box["y"])
    frame = img[y0 + 2:y0 + int(box["height"]) - 2, x0 + 2:x0 + int(box["width"]) - 2]
    assert frame.shape[0] > 40 and frame.shape[1] > 80  # drawn at a visible size
    top = frame[: frame.shape[0] // 2]  # the clip's index bars: pure black and white, not a blank box
    assert (top < 40).mean() > 0.2 and (top > 215).mean() > 0.05


async def test_badge_keeps_a_dead_camera_visible(server):
    """The camera (a real ffmpeg process) dies: the badge says reconnecting, gone since HH:MM:SS,
    and the status poll (every 2 s) does not overwrite it."""
    import re

    from camera import FFMPEG, FfmpegCamera

    if FFMPEG is None:
        pytest.skip("ffmpeg not installed (make system-deps installs it)")
    badge = "document.getElementById('camera').textContent"
    with FfmpegCamera() as cam:
        browser = await Chromium().start(f"{server.http}/?source={quote(cam.url)}")
        try:
            await poll(browser, "window.svz.camera && window.svz.camera.state === 'live'")
            assert await browser.evaluate(badge) == "● camera live"
            await poll(browser, "document.getElementById('status').textContent.includes('frames seen')")
            cam.kill()
            text = await poll(browser, f"window.svz.camera.state === 'reconnecting' && {badge}.includes('attempt') && {badge}")
            assert re.fullmatch(r"camera reconnecting \(attempt \d+\), gone since \d\d:\d\d:\d\d", text), text
            since = re.search(r"\d\d:\d\d:\d\d", text).group(0)
            await asyncio.sleep(4.5)  # two status polls later
            later = await browser.evaluate(badge)
            assert "gone since " + since in later and "frames seen" in await browser.evaluate(
                "document.getElementById('status').textContent")
            assert await browser.evaluate("getComputedStyle(document.getElementById('camera')).display") != "none"
            assert "camera lost at" in await browser.evaluate("document.getElementById('log').textContent")
        finally:
            await browser.stop()


async def test_page_reads_a_udp_only_rtsp_camera(server):
    """A stream URL with RTSP over "auto" (the page's default): TCP is refused, UDP works."""
    from rtsp_server import FFMPEG, UdpOnlyRtspServer

    if FFMPEG is None:
        pytest.skip("ffmpeg not installed (make system-deps installs it)")
    with UdpOnlyRtspServer() as cam:
        browser = await Chromium().start(f"{server.http}/")
        try:
            await poll(browser, "document.readyState === 'complete' && window.svz")
            assert await browser.evaluate("document.getElementById('rtsp-transport').value") == "auto"
            await browser.evaluate(f"document.querySelector('input[value=url]').checked = true;"
                                   f"document.getElementById('url').value = {json.dumps(cam.url)};"
                                   "document.getElementById('start').click()")
            await poll(browser, "window.svz.camera && window.svz.camera.state === 'live'", timeout=60)
            assert "camera connected (RTSP over UDP)" in await browser.evaluate(
                "document.getElementById('log').textContent")
            assert not await browser.evaluate("window.svz.errors.length")
        finally:
            await browser.stop()
    assert ["TCP" in t for t in cam.setups] == [True, False]
