"""`analyze`, `demo` and `serve` stop on the first SIGINT/SIGTERM within a few seconds, as real
processes, and leave things tidy: analyze writes its partial report, the demo its temp files."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

from camera import LiveProcess
from test_live_cli import STOP_WITHIN_S, assert_clean_stop
from videos import write_h264


def test_analyze_stopped_part_way_writes_a_partial_report(tiny_llava, tmp_path):
    clip = write_h264(str(tmp_path / "long.mp4"), 600, fps=1, size=(160, 96))  # 10 minutes at 1 fps
    out = tmp_path / "report"
    with LiveProcess(clip, "--model", tiny_llava, "--tokens-per-frame", "8", "-q", "What is shown?",
                     "--summary-every", "20", "--max-tokens", "4", "--out", str(out),
                     command="analyze", stdin=None) as job:
        job.wait_for(r"long\.mp4:\s+\d+%.*\|\s*[1-9]\d*/600", stream="err")  # frames are going in
        job.signal(signal.SIGINT)
        rc, waited = job.wait_exit(STOP_WITHIN_S + 20)
        assert_clean_stop(job, rc, waited, 130)
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["partial"] is True
    assert 0 < report["frames"] < 600 and 0 <= report["stopped_at_t"] < 599
    assert report["answers"] == []  # the questions are answered at the end, which never came
    md = Path(f"{out}.md").read_text()
    assert md.count("**Partial report**") == 1 and "questions not yet answered" in md
    assert any("wrote partial report" in line for line in job.err)


def test_demo_stopped_mid_run_exits_and_removes_its_temp_files(tiny_llava, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)  # the child inherits it: mkdtemp goes here
    try:
        with LiveProcess("--model", tiny_llava, "--tokens-per-frame", "8", "--seconds", "30", "--max-tokens", "6",
                         command="demo", stdin="pty") as demo:
            demo.wait_for(r"demo: session \S+ watching")
            assert list(tmp.glob("streamvz-demo-*"))  # the generated clip is there while it runs
            demo.ctrl_c()
            rc, waited = demo.wait_exit(STOP_WITHIN_S + 20)
            assert_clean_stop(demo, rc, waited, 130)
    finally:
        del os.environ["TMPDIR"]
    assert not list(tmp.glob("streamvz-demo-*"))


async def test_serve_stops_on_sigterm_mid_answer(tiny_llava):
    from clients.ws_chat import WsChat

    with LiveProcess("--model", tiny_llava, "--tokens-per-frame", "8", "--port", "0",
                     command="serve", stdin=None) as srv:
        port = int((await asyncio.to_thread(srv.wait_for, r"ws://127\.0\.0\.1:(\d+)/ws")).group(1))
        async with WsChat(f"ws://127.0.0.1:{port}/ws") as chat:
            await chat.open()
            answer = chat.ask("Tell me everything.", max_tokens=500)
            await anext(aiter(answer))  # the answer is streaming
            srv.signal(signal.SIGTERM)
            rc, waited = await asyncio.to_thread(srv.wait_exit, STOP_WITHIN_S + 20)
        assert_clean_stop(srv, rc, waited, 143)
    assert not re.search(r"Traceback|Error", "\n".join(srv.err))


def test_serve_both_without_a_broker_says_so_once_and_how_to_start_one(tiny_llava):
    from fixtures_serve import MOSQUITTO, Broker, free_port

    port = free_port()
    with LiveProcess("--model", tiny_llava, "--tokens-per-frame", "8", "--port", "0", "--transport", "both",
                     "--broker-port", str(port), command="serve", stdin=None) as srv:
        srv.wait_for(r"ws://127\.0\.0\.1:\d+/ws")  # the websocket serves meanwhile
        srv.wait_for(rf"no MQTT broker reachable at 127\.0\.0\.1:{port} \(Connection refused\)", stream="err")
        srv.wait_for(rf"Start one, e\.g\. `mosquitto -p {port}`", stream="err")
        time.sleep(6)  # several of the transport's retries
        assert sum("no MQTT broker" in line for line in srv.err) == 1
        assert not any("broker connection lost" in line for line in srv.err), srv.err
        if MOSQUITTO is not None:
            broker = Broker(port=port).start()
            try:
                srv.wait_for(rf"MQTT broker at 127\.0\.0\.1:{port} is up; connecting", stream="err", timeout=30)
            finally:
                srv.signal(signal.SIGINT)
                rc, waited = srv.wait_exit(STOP_WITHIN_S + 20)
                broker.stop()
        else:
            srv.signal(signal.SIGINT)
            rc, waited = srv.wait_exit(STOP_WITHIN_S + 20)
        assert_clean_stop(srv, rc, waited, 130)
