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
    srv = ServerThread(tiny_llava, media_roots=[root]).start()
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
