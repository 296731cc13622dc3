"""The `preview` op: the latest frame and the window's thumbnails, over a real websocket."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import videos as V
from clients.ws_chat import WsChat
from fixtures_serve import ServerThread
from streamvz.errors import StreamError


@pytest.fixture(scope="module")
def server(tiny_llava):
    srv = ServerThread(tiny_llava).start()
    yield srv
    srv.stop()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


async def test_preview_shows_the_pushed_frames_in_the_window(server):
    async with WsChat(server.url) as chat:
        await chat.send(op="preview")
        with pytest.raises(StreamError) as e:
            await chat.expect("preview")
        assert e.value.code == "no_session"
        await chat.open()
        await chat.send(op="preview")
        empty = await chat.expect("preview")
        assert empty["latest"] is None and empty["window"] == []
        for i in range(3):
            await chat.push(V.pattern_frame(100 + i, (640, 480)), t=1.0 + i)
        st = await chat.status()
        while st["frames_in_window"] < 3:
            st = await chat.status()
        await chat.send(op="preview")
        p = await chat.expect("preview")
    assert p["latest"]["t"] == 3.0 and [f["t"] for f in p["window"]] == [1.0, 2.0, 3.0]
    latest = decode(p["latest"]["jpeg"])
    assert latest.shape == (360, 480, 3) and V.index_of(latest) == 102  # scaled to 480 px, the last frame
    thumbs = [decode(f["jpeg"]) for f in p["window"]]
    assert all(max(t.shape[:2]) <= 96 for t in thumbs)
    assert [V.index_of(t) for t in thumbs] == [100, 101, 102]
