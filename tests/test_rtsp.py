"""RTSP transport choice end to end: a camera that offers RTP over UDP only (tests/rtsp_server.py,
video from the ffmpeg program), opened by the server through the protocol and by `live`."""
from __future__ import annotations

import pytest

from clients.ws_chat import WsChat
from fixtures_serve import ServerThread
from rtsp_server import FFMPEG, UdpOnlyRtspServer
from streamvz.errors import StreamError

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (make system-deps installs it)")


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "clip.mp4").write_bytes(b"")
    srv = ServerThread(tiny_llava, media_roots=[root], allow_private_sources=True).start()  # loopback cameras
    yield srv
    srv.stop()


async def first_connect(chat: WsChat) -> dict:
    while True:
        st = await chat.expect("status", timeout=60)
        if st.get("event") == "source_connected":
            return st


@pytest.mark.parametrize("field", [{}, {"rtsp_transport": "auto"}, {"rtsp_transport": "udp"}])
async def test_the_default_and_udp_read_a_udp_only_camera(server, field):
    with UdpOnlyRtspServer() as cam:
        async with WsChat(server.url) as chat:
            await chat.send(op="open", source=cam.url, fps=2, **field)
            await chat.expect("opened")
            st = await first_connect(chat)
            assert st["rtsp_transport"] == "udp"
            while st["frames_seen"] < 2:
                st = await chat.status()
            await chat.close()


async def test_tcp_only_is_refused_by_a_udp_only_camera(server):
    with UdpOnlyRtspServer() as cam:
        async with WsChat(server.url) as chat:
            await chat.send(op="open", source=cam.url, fps=2, rtsp_transport="tcp")
            await chat.expect("opened")
            with pytest.raises(StreamError) as e:
                await first_connect(chat)
            assert e.value.code == "unreachable_url"
            assert cam.setups and all("TCP" in t for t in cam.setups)


@pytest.mark.parametrize("msg,why", [({"source": "clip.mp4", "rtsp_transport": "udp"}, "rtsp:// source only"),
                                     ({"rtsp_transport": "udp"}, "rtsp:// source only"),
                                     ({"source": "rtsp://127.0.0.1:1/x", "rtsp_transport": "http"}, "must be one of")])
async def test_rtsp_transport_is_checked(server, msg, why):
    async with WsChat(server.url) as chat:
        await chat.send(op="open", **msg)
        with pytest.raises(StreamError) as e:
            await chat.expect("opened")
        assert e.value.code == "bad_field" and why in e.value.message
        await chat.open()  # the connection is fine afterwards


def test_live_reads_a_udp_only_camera_by_default(tiny_llava):
    from camera import LiveProcess

    with UdpOnlyRtspServer() as cam, LiveProcess(cam.url, "--model", tiny_llava, "--tokens-per-frame", "8",
                                                 "--watch", "What is shown?", stdin=None) as live:
        live.wait_for(r"camera connected: rtsp://127\.0\.0\.1:\d+/cam \(RTSP over UDP\)")
        live.wait_for(r'"What is shown\?" -> ')
