"""Websocket transport against a real server (tiny LLaVA engine) over real sockets."""
from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from PIL import Image

from clients.ws_chat import WsChat
from fixtures_serve import ServerThread
from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from videos import pattern_frame, write_h264

LIMITS = Limits(max_message_bytes=8192, max_frame_bytes=300_000, max_frame_pixels=512 * 512, max_question_chars=300,
                max_new_tokens=400, max_sessions=12, max_sessions_per_client=6, max_push_fps=20, max_queued_asks=3)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_h264(str(root / "clip.mp4"), 20, fps=10, size=(160, 96))
    outside = tmp_path_factory.mktemp("outside")
    write_h264(str(outside / "secret.mp4"), 5, fps=10)
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    return root


@pytest.fixture(scope="module")
def server(tiny_llava, media):
    # The live-source test serves its stream on loopback: allowed here explicitly (off by default).
    srv = ServerThread(tiny_llava, limits=LIMITS, media_roots=[media], grace_s=1.5, allow_private_sources=True).start()
    yield srv
    srv.stop()


def jpeg(w=64, h=48, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


async def raw_request(ws, payload) -> dict:
    """Send one message, return the server's next reply (decoded)."""
    await ws.send(payload)
    return json.loads(await asyncio.wait_for(ws.recv(), 30))


async def test_push_frames_ask_stream_and_status(server):
    async with WsChat(server.url) as chat:
        opened = await chat.open()
        assert opened["resumed"] is False and opened["limits"]["max_question_chars"] == 300
        for i in range(3):
            await chat.push(pattern_frame(i), t=i * 0.5)
        answer = chat.ask("What is in the video?", max_tokens=12)
        deltas = [d async for d in answer]
        assert len(deltas) >= 2 and "".join(deltas) == answer.text
        assert answer.seqs == list(range(len(deltas)))
        u = answer.usage
        assert u["completion_tokens"] >= 1 and u["finish_reason"] in ("stop", "length")
        assert u["ttft_s"] > 0 and u["prompt_tokens"] > 0 and u["deltas"] == len(deltas)
        st = await chat.status()
        assert st["frames_seen"] == 3 and st["frames_in_window"] == 3 and st["cache_tokens"] > 0
        assert (await chat.close())["session"] == opened["session"]


async def test_server_side_source(server):
    async with WsChat(server.url) as chat:
        await chat.open(source="clip.mp4", fps=5)
        ended = await chat.expect("status")
        assert ended["event"] == "source_ended" and ended["source"] == "ended"
        assert ended["frames_seen"] == 10 and ended["frames_in_window"] == 10  # a 2 s clip sampled at 5 fps
        text = await chat.ask("What happens?", max_tokens=5).result()
        assert text
        await chat.send(op="status")
        assert (await chat.expect("status"))["frames_seen"] == 10


async def test_hostile_inputs_get_their_errors_while_another_session_streams(server, media):
    async with WsChat(server.url) as other, websockets.connect(server.url, max_size=None) as ws:
        await other.open()
        await other.push(pattern_frame(1))
        background = other.ask("Describe the video.", max_tokens=60)  # streams through the barrage

        big = Image.new("RGB", (2000, 1000))
        buf = io.BytesIO()
        big.save(buf, "JPEG")
        bomb = buf.getvalue()
        before_open = [
            ("{oops", "bad_json"),
            ("[]", "bad_message"),
            (json.dumps({"op": "format_disk"}), "unknown_op"),
            (json.dumps({"op": "open", "v": 99}), "unsupported_version"),
            (json.dumps({"op": "ask", "id": "a", "text": "hi"}), "no_session"),
            (b"\xff\xd8\xff" + b"x" * 50, "no_session"),
            (json.dumps({"op": "open", "session": "doesNotExist"}), "unknown_session"),
            (json.dumps({"op": "open", "source": "../outside/secret.mp4"}), "source_not_allowed"),
            (json.dumps({"op": "open", "source": "link.mp4"}), "source_not_allowed"),
            (json.dumps({"op": "open", "source": "/etc/passwd"}), "source_not_allowed"),
            (json.dumps({"op": "open", "source": "file:///etc/passwd"}), "source_not_allowed"),
            (json.dumps({"op": "open", "source": "gopher://x/1"}), "source_not_allowed"),
            (json.dumps({"op": "open", "fps": "fast"}), "bad_field"),
            (json.dumps({"op": "open", "exec": "rm -rf /"}), "unknown_field"),
            ("x" * 9000, "message_too_large"),
        ]
        for payload, code in before_open:
            reply = await raw_request(ws, payload)
            assert (reply["op"], reply["code"]) == ("error", code), payload[:60]
        opened = await raw_request(ws, json.dumps({"op": "open"}))
        assert opened["op"] == "opened"
        after_open = [
            (json.dumps({"op": "open"}), "session_in_use"),
            (json.dumps({"op": "ask", "id": "q1", "text": "x" * 301}), "question_too_long"),
            (json.dumps({"op": "ask", "id": "q1", "text": "hi", "max_tokens": 401}), "bad_field"),
            (json.dumps({"op": "ask", "id": "q1", "text": "hi", "max_tokens": True}), "bad_field"),
            (json.dumps({"op": "ask", "id": "q1", "text": 42}), "bad_field"),
            (json.dumps({"op": "ask", "id": "q1"}), "missing_field"),
            (json.dumps({"op": "cancel", "id": "nope"}), "unknown_request"),
            (b"GIF89a" + b"\0" * 64, "bad_frame"),
            (b"\xff\xd8\xff\xe0corrupt" * 10, "bad_frame"),
            (protocol.FRAME_MAGIC + struct.pack(">I", 3) + b"{x}", "bad_frame"),
            (bomb, "frame_too_large"),
            (b"\xff\xd8\xff" + bytes(400_000), "frame_too_large"),
        ]
        for payload, code in after_open:
            reply = await raw_request(ws, payload)
            assert (reply["op"], reply["code"]) == ("error", code), payload[:60]
        bad = await raw_request(ws, json.dumps({"op": "ask", "id": "q7", "text": 1}))
        assert bad["id"] == "q7"  # the error names the ask it concerns

        # A flood of frames: the bucket lets ~1 s worth through, the rest are dropped with one error.
        frame = jpeg()
        for _ in range(80):
            await ws.send(frame)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert reply["code"] == "rate_limited"
        st = await raw_request(ws, json.dumps({"op": "status"}))
        assert st["op"] == "status" and 15 <= st["frames_seen"] <= 25

        # Still a working connection and session after all of it.
        await ws.send(json.dumps({"op": "ask", "id": "ok", "text": "Still there?", "max_tokens": 4}))
        ops = []
        while not ops or ops[-1] != "done":
            ops.append(json.loads(await asyncio.wait_for(ws.recv(), 60))["op"])
        assert ops.count("token") >= 1

        text = await background.result()
        assert text and background.usage["finish_reason"] in ("stop", "length")
        assert background.seqs == list(range(len(background.seqs)))


async def test_cancel_mid_answer(server):
    async with WsChat(server.url) as chat:
        await chat.open()
        answer = chat.ask("Tell me everything.", max_tokens=300)
        first = await answer.__anext__()
        assert first
        await answer.cancel()
        rest = [d async for d in answer]
        assert answer.usage["finish_reason"] == "cancelled"
        assert len(rest) < 290
    async with websockets.connect(server.url) as ws:  # a running ask's id cannot be reused
        assert (await raw_request(ws, '{"op":"open"}'))["op"] == "opened"
        await ws.send('{"op":"ask","id":"x","text":"long","max_tokens":300}')
        await ws.send('{"op":"ask","id":"x","text":"again","max_tokens":3}')
        seen = []
        while "request_in_use" not in seen:
            m = json.loads(await asyncio.wait_for(ws.recv(), 30))
            seen.append(m.get("code", m["op"]))
        await ws.send('{"op":"cancel","id":"x"}')
        while seen[-1] != "done":
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30))["op"])


async def test_disconnect_mid_answer_cancels_then_resume(server):
    chat = WsChat(server.url)
    await chat.__aenter__()
    sid = (await chat.open())["session"]
    secret = chat.resume
    await chat.push(pattern_frame(3), t=1.0)
    answer = chat.ask("Describe it at length.", max_tokens=300)
    await answer.__anext__()

    async def engine_answer():
        return server.service.entries[sid].answers[answer.id]
    generating = server.call(engine_answer)  # the engine's own Answer object
    await chat.ws.close()  # vanish mid-answer
    await chat.__aexit__(None, None, None)

    async def server_state():
        for _ in range(100):
            entry = server.service.entries[sid]
            if not entry.asks and entry.send is None:
                return entry.session.stats()["frames_seen"], entry.expiry is not None
            await asyncio.sleep(0.05)
        return None

    assert server.call(server_state) == (1, True)  # answer stopped, session kept for the grace period
    for _ in range(100):
        if generating.done:
            break
        await asyncio.sleep(0.05)
    assert generating.usage["finish_reason"] == "cancelled" and generating.usage["completion_tokens"] < 300

    async with WsChat(server.url) as again:
        with pytest.raises(StreamError) as ei:
            await again.open(session=sid, resume=secret, source="clip.mp4")
        assert ei.value.code == "bad_field"
        opened = await again.open(session=sid, resume=secret)
        assert opened["resumed"] is True and opened["frames_seen"] == 1
        assert await again.ask("And now?", max_tokens=3).result()
        await again.ws.close()
    await asyncio.sleep(2.5)  # past the 1.5 s grace: gone
    async with WsChat(server.url) as late:
        with pytest.raises(StreamError) as ei:
            await late.open(session=sid, resume=secret)
        assert ei.value.code == "unknown_session"


async def test_per_client_session_cap(server):
    chats = [WsChat(server.url) for _ in range(7)]
    try:
        for c in chats:
            await c.__aenter__()
        for c in chats[:6 - len(server.service.entries)]:
            await c.open()
        with pytest.raises(StreamError) as ei:
            await chats[-1].open()
        assert ei.value.code == "too_many_sessions"
    finally:
        for c in chats:
            await c.__aexit__(None, None, None)


async def test_oversized_beyond_backstop_closes_with_1009(server):
    async with websockets.connect(server.url, max_size=None) as ws:
        await ws.send(b"\xff\xd8\xff" + bytes(2 * 300_000 + 10))
        with pytest.raises(websockets.ConnectionClosed) as ei:
            await asyncio.wait_for(ws.recv(), 30)
        assert ei.value.rcvd.code == 1009


def test_http_page_and_video_list(server):
    html = urllib.request.urlopen(server.http + "/").read().decode()
    assert "<script src=\"app.js\">" in html
    assert "new WebSocket" in urllib.request.urlopen(server.http + "/app.js").read().decode()
    assert json.loads(urllib.request.urlopen(server.http + "/api/videos").read()) == ["clip.mp4", "link.mp4"]
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/nope.js"):
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(server.http + path)
        assert ei.value.code == 404


async def test_bearer_token(tiny_llava):
    srv = ServerThread(tiny_llava, token="s3cret", limits=LIMITS).start()
    try:
        with pytest.raises(websockets.InvalidStatus) as ei:
            async with websockets.connect(srv.url):
                pass
        assert ei.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            async with WsChat(srv.url, token="wrong"):
                pass
        async with WsChat(srv.url, token="s3cret") as chat:
            assert (await chat.open())["session"]
        async with websockets.connect(srv.url + "?token=s3cret") as ws:  # the browser's way
            assert (await raw_request(ws, '{"op":"status"}'))["code"] == "no_session"
    finally:
        srv.stop()


async def test_origin_check(tiny_llava):
    srv = ServerThread(tiny_llava, origins=["http://good.example"], limits=LIMITS).start()
    try:
        with pytest.raises(websockets.InvalidStatus) as ei:
            async with websockets.connect(srv.url, origin="http://evil.example"):
                pass
        assert ei.value.response.status_code == 403
        async with websockets.connect(srv.url, origin="http://good.example") as ws:
            assert (await raw_request(ws, '{"op":"open"}'))["op"] == "opened"
    finally:
        srv.stop()


async def test_terminal_client_pushes_a_local_video_and_streams_answers(server, media):
    import sys
    from pathlib import Path

    client = str(Path(__file__).resolve().parents[1] / "clients" / "ws_chat.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, client, "--url", server.url, "--video", str(media / "clip.mp4"), "--fps", "4",
        "--ask", "What is shown?", "--ask", "Anything else?", "--max-tokens", "4", "--wait", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    out = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.count("Q: ") == 2 and out.count("tokens, first after") == 2
    assert "session " in err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, client, "--url", server.url, "--source", "../../etc/passwd", "--ask", "x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and "error [source_not_allowed]" in err.decode()


async def test_server_side_live_http_source(server):
    import threading

    from videos import free_port, serve_http

    port = free_port()
    def camera():  # a 2 s MPEG-TS "IP camera"; it may see the reader hang up first
        import av

        try:
            serve_http(port, 20, 10)
        except (OSError, av.error.FFmpegError):  # a broken pipe, or PyAV's trailer write after one
            pass

    cam = threading.Thread(target=camera, daemon=True)
    cam.start()
    await asyncio.sleep(0.3)
    async with WsChat(server.url) as chat:
        await chat.open(source=f"http://127.0.0.1:{port}/live.ts", fps=5)
        connected = await chat.expect("status", timeout=60)  # the source's own events are forwarded
        assert connected["event"] == "source_connected" and connected["source"] == "running"
        for _ in range(200):
            st = await chat.status()
            if st["frames_seen"] >= 3:
                break
            await asyncio.sleep(0.1)
        assert st["frames_seen"] >= 3 and st["source"] == "running"
        assert await chat.ask("What did the camera show?", max_tokens=4).result()
        await chat.close()  # stops the reader, which would otherwise reconnect like to a camera
    cam.join(10)


async def test_many_clients_stream_at_once(server):
    chats = [WsChat(server.url) for _ in range(4)]
    try:
        for i, c in enumerate(chats):
            await c.__aenter__()
            await c.open()
            await c.push(pattern_frame(10 + i), t=0.0)
        answers = [c.ask(f"Question {i}?", max_tokens=10) for i, c in enumerate(chats)]
        texts = await asyncio.gather(*(a.result() for a in answers))
        assert all(texts)
        for a in answers:
            assert a.seqs == list(range(len(a.seqs))) and a.usage["finish_reason"] in ("stop", "length")
        sessions = {c.session for c in chats}
        assert len(sessions) == 4
    finally:
        for c in chats:
            await c.__aexit__(None, None, None)


async def test_ask_without_max_tokens_gets_the_engine_default_even_below_128(tiny_llava):
    """One config: with the engine's limit at 40, an ask without `max_tokens` is answered with the
    engine's default (capped at the limit), over the wire as through `session.ask` (it used to be
    refused with max_new_tokens_too_large: the service sent a hard-coded 128)."""
    srv = ServerThread(tiny_llava, limits=Limits(max_new_tokens=40)).start()
    try:
        async with websockets.connect(srv.url) as ws:
            assert (await raw_request(ws, '{"op":"open"}'))["op"] == "opened"
            await ws.send('{"op":"ask","id":"q1","text":"What is here?"}')
            while (msg := json.loads(await asyncio.wait_for(ws.recv(), 60)))["op"] not in ("done", "error"):
                pass
            assert msg["op"] == "done", msg
            assert 1 <= msg["usage"]["completion_tokens"] <= 40
    finally:
        srv.stop()
