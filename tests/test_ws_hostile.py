"""Hostile websocket clients against a real server (issue 23): amplifying frames, invalid
Unicode, sessions driven by someone else. A bystander session answers throughout."""
from __future__ import annotations

import asyncio
import io
import json

import pytest
import websockets
from PIL import Image

from clients.ws_chat import WsChat
from fixtures_serve import ServerThread
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from test_images import claims
from videos import pattern_frame

LIMITS = Limits(max_message_bytes=8192, max_frame_bytes=300_000, max_question_chars=300, max_new_tokens=300,
                max_sessions=12, max_sessions_per_client=6, max_push_fps=50)


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    srv = ServerThread(tiny_llava, limits=LIMITS, grace_s=5.0).start()
    yield srv
    srv.stop()


async def request(ws, payload) -> dict:
    await ws.send(payload)
    return json.loads(await asyncio.wait_for(ws.recv(), 30))


async def bystander(server):
    chat = WsChat(server.url)
    await chat.__aenter__()
    await chat.open()
    await chat.push(pattern_frame(1))
    return chat, chat.ask("Describe the video in detail.", max_tokens=150)


async def settle(chat, answer):
    assert await answer.result() and answer.usage["finish_reason"] in ("stop", "length")
    assert (await chat.status())["frames_seen"] == 1
    await chat.__aexit__(None, None, None)


def encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


async def test_amplifying_frames_are_refused_with_their_codes(server):
    chat, answer = await bystander(server)
    async with websockets.connect(server.url) as ws:
        assert (await request(ws, '{"op":"open"}'))["op"] == "opened"
        thin = encode(Image.new("RGB", (65500, 1), (255, 0, 0)))  # 17 kB; gigabytes after a CLIP resize
        for payload, code in [(thin, "bad_aspect_ratio"), (encode(Image.new("RGB", (1, 3000))), "bad_aspect_ratio"),
                              (claims(20000, 20000), "frame_too_large"), (claims(65535, 65535), "frame_too_large")]:
            reply = await request(ws, payload)
            assert (reply["op"], reply["code"]) == ("error", code)
        await ws.send(encode(Image.new("RGB", (40, 3), (255, 0, 0))))  # 3 rows high: a fine frame
        for _ in range(100):  # (a frame being encoded is neither pending nor in the window yet)
            st = await request(ws, '{"op":"status"}')
            if st["frames_in_window"]:
                break
            await asyncio.sleep(0.1)
        assert st["frames_seen"] == 1 and st["frames_in_window"] == 1, st
    await settle(chat, answer)


async def test_invalid_unicode_gets_a_coded_error_and_the_connection_stays(server):
    chat, answer = await bystander(server)
    async with websockets.connect(server.url) as ws:
        cases = [  # JSON escapes of lone UTF-16 surrogates: valid JSON text, no valid Unicode
            (r'{"op":"open","system_prompt":"be \ud800 nice"}', "bad_field", "system_prompt"),
            (r'{"op":"open","source":"clip\udc80.mp4"}', "bad_field", "source"),
            (r'{"op":"open","\udfffx":1}', "bad_message", None),
            (r'{"op":"\ud83d"}', "unknown_op", None),
        ]
        for payload, code, field in cases:
            reply = await request(ws, payload)
            assert (reply["op"], reply["code"], reply.get("field")) == ("error", code, field), payload
        assert (await request(ws, '{"op":"open"}'))["op"] == "opened"
        for payload, field in [(r'{"op":"ask","id":"q1","text":"what \udbff is it?"}', "text"),
                               (r'{"op":"cancel","id":"\ud800"}', "id")]:
            reply = await request(ws, payload)
            assert (reply["op"], reply["code"], reply.get("field")) == ("error", "bad_field", field), payload
        await ws.send(json.dumps({"op": "ask", "id": "ok", "text": "Still there? \U0001F600", "max_tokens": 3}))
        ops = []
        while not ops or ops[-1]["op"] != "done":
            ops.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        assert ops[-1]["id"] == "ok"
    await settle(chat, answer)


async def test_sources_on_private_networks_are_refused_by_default(server):
    chat, answer = await bystander(server)
    async with websockets.connect(server.url) as ws:
        for source in ["http://127.0.0.1:9/x.ts", f"http://127.0.0.1:{server.port}/", "http://localhost/live",
                       "http://2130706433/x.ts", "http://127.1/x.ts", "http://[::1]/x", "http://[::ffff:127.0.0.1]/x",
                       "rtsp://10.1.2.3/cam", "rtsp://192.168.0.10:554/s", "http://169.254.169.254/latest/meta-data/",
                       "rtmp://0.0.0.0/live"]:
            reply = await request(ws, json.dumps({"op": "open", "source": source}))
            assert (reply["op"], reply["code"]) == ("error", "source_not_allowed"), source
            assert "--allow-private-sources" in reply["message"]
    assert all(e.source is None for e in list(server.service.entries.values()))  # none was opened
    await settle(chat, answer)


async def test_source_errors_do_not_tell_what_answers_on_a_port(tiny_llava):
    """With private sources allowed (--allow-private-sources), a closed port and a port where
    something that is no video answers fail alike."""
    from fixtures_serve import free_port

    srv = ServerThread(tiny_llava, limits=LIMITS, allow_private_sources=True).start()
    try:
        errors = []
        for source in [f"http://127.0.0.1:{free_port()}/cam.ts", f"http://127.0.0.1:{srv.port}/"]:
            async with WsChat(srv.url) as chat:
                await chat.open(source=source, fps=1)
                while True:
                    msg = await asyncio.wait_for(chat.events.get(), 60)
                    assert msg["op"] != "status" or "reason" not in msg, msg  # no connection details
                    if msg["op"] == "error":
                        errors.append((msg["code"], msg["message"]))
                        break
        assert errors[0] == errors[1] and errors[0][0] == "unreachable_url", errors
    finally:
        srv.stop()


async def test_lists_need_the_token_and_resuming_needs_the_owners_secret(tiny_llava):
    import urllib.error
    import urllib.request

    srv = ServerThread(tiny_llava, limits=LIMITS, token="s3cret", grace_s=10).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"{srv.http}/api/videos", timeout=10)
        assert ei.value.code == 401
        req = urllib.request.Request(f"{srv.http}/api/videos", headers={"Authorization": "Bearer s3cret"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == []
        assert urllib.request.urlopen(f"{srv.http}/api/videos?token=s3cret", timeout=10).status == 200

        async with WsChat(srv.url, token="s3cret") as owner:
            opened = await owner.open()
            sid, secret = opened["session"], opened["resume"]
            assert secret and len(secret) >= 16
            await owner.push(pattern_frame(1))
        async with WsChat(srv.url, token="s3cret") as other:  # knows the id (a log, a shoulder) but not the secret
            for resume in (None, "wrong", secret[:-1]):
                with pytest.raises(StreamError) as ei:
                    await other.open(session=sid, resume=resume)
                assert ei.value.code == "unknown_session"
            resumed = await other.open(session=sid, resume=secret)
            assert resumed["resumed"] is True and resumed["frames_seen"] == 1
    finally:
        srv.stop()


async def test_a_finite_http_file_is_fetched_once_not_forever(tiny_llava, tmp_path):
    import functools
    import http.server
    import threading

    from videos import write_h264

    write_h264(str(tmp_path / "clip.mp4"), 10, fps=10, size=(64, 48), faststart=True)
    gets = []

    class Handler(http.server.SimpleHTTPRequestHandler):  # a plain file server: Content-Length, no chunking
        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    srv = ServerThread(tiny_llava, limits=LIMITS, allow_private_sources=True).start()
    try:
        async with WsChat(srv.url) as chat:
            await chat.open(source=f"http://127.0.0.1:{httpd.server_address[1]}/clip.mp4", fps=5)

            async def ended():
                while True:
                    msg = await chat.events.get()
                    assert msg["op"] != "error", msg
                    if msg.get("event") == "source_ended":
                        return

            await asyncio.wait_for(ended(), 60)  # (a source re-fetching forever never ends)
            fetched = len(gets)
            await asyncio.sleep(3.0)  # a re-fetch loop would have come back by now (backoff starts at 0.5 s)
            assert len(gets) == fetched <= 3, gets  # the policy's header check and the decoder's reads
            assert (await chat.status())["source"] == "ended"
    finally:
        srv.stop()
        httpd.shutdown()


async def test_redirects_are_checked_hop_by_hop(tiny_llava, tmp_path):
    """Cameras on 127.0.0.1 are allowed (--allow-source-network 127.0.0.1/32); a redirect from
    there to another loopback address is refused like a direct URL to it."""
    import http.server
    import threading

    port_box = []

    class Redirector(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            target = {"/out": "http://127.0.0.2:{p}/cam.ts", "/name": "http://2130706434:{p}/cam.ts", "/v6": "http://[::1]:{p}/cam.ts",
                      "/in": "/cam.ts"}.get(self.path)
            if target:
                self.send_response(302)
                self.send_header("Location", target.format(p=port_box[0]))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    port_box.append(httpd.server_address[1])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    srv = ServerThread(tiny_llava, limits=LIMITS, source_networks=("127.0.0.1/32",)).start()
    base = f"http://127.0.0.1:{port_box[0]}"
    try:
        async with websockets.connect(srv.url) as ws:  # an address literal is refused at once
            reply = await request(ws, json.dumps({"op": "open", "source": f"http://127.0.0.2:{port_box[0]}/x"}))
            assert reply["code"] == "source_not_allowed"
        for path in ("/out", "/name", "/v6"):  # hops are checked when the source starts, after `opened`
            async with WsChat(srv.url) as chat:
                await chat.open(source=base + path)
                with pytest.raises(StreamError) as ei:
                    await chat.expect("never")
                assert ei.value.code == "source_not_allowed", path
        async with WsChat(srv.url) as chat:  # a redirect that stays inside the allowed network is followed
            await chat.open(source=base + "/in")
            with pytest.raises(StreamError) as ei:
                await chat.expect("never")
            assert ei.value.code == "unreachable_url"  # (404 there: no camera, but not refused)
    finally:
        srv.stop()
        httpd.shutdown()
