"""The websocket protocol tests, run again against a gateway (`serve --backend mqtt://...`) with
two pool workers behind a real mosquitto: clients see the same protocol, sessions live on workers.

The tests imported here talk to the server only over the wire; those that inspect a server's
in-process state (the grace-period and per-client-cap tests) stay with the plain server.
"""
from __future__ import annotations

import asyncio

import pytest

from clients.ws_chat import WsChat
from fixtures_pool import PoolWatch, gateway_thread, pool_worker_thread, up
from fixtures_serve import broker  # noqa: F401  (fixture)
from streamvz.errors import StreamError
from test_ws import LIMITS, media  # noqa: F401  (fixture)
from videos import pattern_frame


@pytest.fixture(scope="module")
def workers(tiny_llava, broker, media):  # noqa: F811
    ws = [pool_worker_thread(tiny_llava, broker.port, w, LIMITS, media_roots=[media], grace_s=1.5).start()
          for w in ("gw-w1", "gw-w2")]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def server(workers, broker, media):  # noqa: F811
    """What test_ws calls `server`: here a gateway, no model in it."""
    gw = gateway_thread(broker.port, LIMITS, media_roots=[media], grace_s=1.5).start()

    async def pool_seen():
        async with PoolWatch(broker.port) as watch:
            await watch.until(up("gw-w1", "gw-w2"), 30)
    asyncio.run(pool_seen())
    yield gw
    gw.stop()


async def test_sessions_opened_through_the_gateway_live_on_both_workers(server):
    chats = [WsChat(server.url) for _ in range(4)]
    try:
        opened = [await (await c.__aenter__()).open() for c in chats]
        assert {o["worker"] for o in opened} == {"gw-w1", "gw-w2"}
        for i, c in enumerate(chats):
            await c.push(pattern_frame(i), t=0.0)
            assert await c.ask("What is shown?", max_tokens=4).result()
            assert (await c.status())["frames_seen"] == 1
        # Resume after a dropped connection reaches the same worker.
        sid = opened[0]["session"]
        await chats[0].__aexit__(None, None, None)
        async with WsChat(server.url) as again:
            resumed = await again.open(session=sid, resume=opened[0]["resume"])
            assert resumed["resumed"] is True and resumed["worker"] == opened[0]["worker"]
            assert resumed["frames_seen"] == 1
            await again.close()
        with pytest.raises(StreamError) as ei:  # closed means gone
            async with WsChat(server.url) as late:
                await late.open(session=sid, resume=opened[0]["resume"])
        assert ei.value.code == "unknown_session"
    finally:
        for c in chats[1:]:
            await c.close()
            await c.__aexit__(None, None, None)


async def test_gateway_resume_needs_the_secret_and_nothing_else(server):
    """As on a plain server: a session id without its `resume` secret resumes nothing, and a resume
    carries no other field; the owner still resumes afterwards."""
    async with WsChat(server.url) as owner:
        opened = await owner.open()
    sid, secret = opened["session"], opened["resume"]
    for fields, code in ((dict(session=sid), "unknown_session"), (dict(session=sid, resume="guess"), "unknown_session"),
                         (dict(session=sid, resume=secret, fps=2.0), "bad_field")):
        with pytest.raises(StreamError) as ei:
            async with WsChat(server.url) as other:
                await other.open(**fields)
        assert ei.value.code == code, fields
    async with WsChat(server.url) as again:
        assert (await again.open(session=sid, resume=secret))["resumed"] is True
        await again.close()


@pytest.mark.parametrize("args,says", [
    (["--transport", "mqtt", "--backend", "mqtt://127.0.0.1:1"], "--backend makes a websocket gateway"),
    (["--broker", "http://127.0.0.1:1883"], "--broker takes mqtt://HOST:PORT"),
])
def test_gateway_and_broker_flags_misused_are_told_before_any_model_loads(args, says):
    import subprocess
    import sys
    from pathlib import Path

    run = Path(__file__).resolve().parents[1] / "run_stream.py"
    proc = subprocess.run([sys.executable, str(run), "serve", "--model", "/nonexistent", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error [bad_argument]" in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# test_ws's wire-level tests, in test_ws's order (pytest runs a module's tests in the order they are bound).
from test_ws import (test_push_frames_ask_stream_and_status, test_server_side_source,  # noqa: E402,F401
                     test_hostile_inputs_get_their_errors_while_another_session_streams, test_cancel_mid_answer,
                     test_oversized_beyond_backstop_closes_with_1009, test_http_page_and_video_list,
                     test_terminal_client_pushes_a_local_video_and_streams_answers, test_server_side_live_http_source,
                     test_many_clients_stream_at_once)
