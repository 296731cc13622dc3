"""Pipelines and the CLI on the tiny LLaVA engine: analysis job, live Q&A alerts, demo, --help."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_serve import broker  # noqa: F401  (fixture)
from pipelines.analyze import analyze
from pipelines.live_qa import LiveQA, normalise
from videos import write_h264

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run_stream.py is a script at the top, not a package module


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_h264(str(tmp_path_factory.mktemp("v") / "clip.mp4"), 40, fps=10, size=(160, 96))  # 4 s


@pytest.fixture
async def engine(tiny_llava):
    from streamvz.engine import Engine

    async with Engine(model=tiny_llava, tokens_per_frame=8) as eng:
        yield eng


async def test_analyze_writes_timeline_and_answers(engine, clip, tmp_path):
    out = str(tmp_path / "report")
    report = await analyze(engine, clip, ["What is shown?", "Is there a cup?"], summary_every=1.5, fps=2,
                           max_tokens=6, progress=False, out=out)
    assert report["frames"] == 8
    assert [e["t"] for e in report["summary"]] == [1.5, 3.0, 4.0]  # every 1.5 s of video, plus the end
    assert [a["question"] for a in report["answers"]] == ["What is shown?", "Is there a cup?"]
    assert all(a["usage"]["completion_tokens"] >= 1 for a in report["answers"])
    saved = json.loads(Path(out + ".json").read_text())
    assert saved["summary"] == report["summary"]
    md = Path(out + ".md").read_text()
    assert "## Timeline" in md and "**0:00:03**" in md and "**Q:** Is there a cup?" in md
    assert not engine.sessions  # the job's session is closed


async def test_live_qa_checks_on_schedule_and_alerts_exactly_on_changes(engine, clip):
    alerts = []
    live = LiveQA(engine, clip, ["What is shown?", "Is it moving?"], every=1.0, fps=4, max_tokens=4,
                  on_alert=alerts.append)
    await live.run()
    times = sorted({h["t"] for h in live.history})
    assert times == [0.0, 1.0, 2.0, 3.0]
    assert len(live.history) == 8
    expected = []
    last = {}
    for h in live.history:
        now = normalise(h["answer"])
        if h["question"] in last and last[h["question"]] != now:
            expected.append((h["question"], h["t"], last[h["question"]], now))
        last[h["question"]] = now
    assert [(a["alert"], a["t"], a["before"], a["after"]) for a in alerts] == expected
    assert [h["changed"] for h in live.history].count(True) == len(alerts)
    assert normalise("Yes.") == normalise("yes, it is") == "yes"


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "run_stream.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_help_explains_each_command(capsys):
    from run_stream import build_parser

    for argv in (["--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as ei:
            build_parser().parse_args(argv)
        assert ei.value.code == 0
    out = capsys.readouterr().out
    for word in ("serve", "analyze", "live", "demo", "--transport", "--media-root", "--token", "--broker",
                 "--tokens-per-frame", "--window", "--model"):
        assert word in out


def test_analyze_cli_bad_input_exits_2_with_the_code(tmp_path, capsys):
    from run_stream import main

    assert main(["analyze", str(tmp_path / "nope.mp4")]) == 2
    assert "error [file_not_found]" in capsys.readouterr().err
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video at all\n" * 50)
    assert main(["analyze", str(junk)]) == 2
    assert "error [not_a_video]" in capsys.readouterr().err


def test_demo_end_to_end(tiny_llava):
    r = run_cli("demo", "--model", tiny_llava, "--tokens-per-frame", "8", "--seconds", "2", "--max-tokens", "6",
                "--ask", "What colour is it?", "--ask", "How many?")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\nQ: ") == 2 and r.stdout.count("tokens, first after") == 2
    assert "demo: done" in r.stdout


async def test_serve_command_both_transports(tiny_llava, broker):  # noqa: F811
    import asyncio
    import re
    import signal

    from clients.mqtt_client import MqttChat
    from clients.ws_chat import WsChat

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run_stream.py"), "serve", "--model", tiny_llava, "--tokens-per-frame", "8",
        "--transport", "both", "--port", "0", "--broker-port", str(broker.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "serve exited early"
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
            port = m and int(m.group(1))
        async with WsChat(f"ws://127.0.0.1:{port}/ws") as chat:
            await chat.open()
            assert await chat.ask("Over the websocket?", max_tokens=3).result()
        async with MqttChat("127.0.0.1", broker.port, session="served", timeout=60) as chat:
            await chat.open()
            assert await chat.ask("Over MQTT?", max_tokens=3).result()
        proc.send_signal(signal.SIGUSR1)  # the operator's state dump: tasks and threads, and it keeps serving
        dump = b""
        while b"Current thread" not in dump:
            chunk = await asyncio.wait_for(proc.stderr.read(4096), 30)
            assert chunk, f"serve exited on SIGUSR1: {dump[-2000:]}"
            dump += chunk
        assert b"asyncio tasks" in dump and b"Stack for <Task" in dump, dump[-2000:]
        async with WsChat(f"ws://127.0.0.1:{port}/ws") as chat:
            await chat.open()
            assert await chat.ask("Still there?", max_tokens=3).result()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert await asyncio.wait_for(proc.wait(), 30) in (0, 130)
        except TimeoutError:  # show where shutdown hangs before failing
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(2)
            proc.kill()
            pytest.fail("serve did not exit within 30 s of SIGINT; its state:\n"
                        + (await proc.stderr.read()).decode(errors="replace")[-6000:])


@pytest.mark.tiny
def test_demo_on_the_embedded_model():
    """`make demo`: the default model (streamvz-tiny), the generated clip, three streamed answers."""
    from streamvz.errors import StreamError
    from streamvz.tiny import weights

    try:
        weights.verify(full=False)
    except StreamError as e:
        pytest.skip(f"streamvz-tiny not installed: {e.message}")
    if not (ROOT / "streamvz" / "tiny" / "assets" / "projector.safetensors").exists():
        pytest.skip("streamvz-tiny projector not trained yet")
    r = run_cli("demo", "--seconds", "4", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\nQ: ") == 3 and r.stdout.count("expected at the end of the clip") == 3
    answers = [line[3:].strip().lower() for line in r.stdout.splitlines() if line.startswith("A: ")]
    expected = [line.rsplit(": ", 1)[1].strip() for line in r.stdout.splitlines() if "expected at the end" in line]
    assert answers == expected, r.stdout
    # The last ("how many ... now?") is asked once the whole clip is in: 4 s at 2 fps = 8 frames.
    assert re.findall(r"\[(\d+) frames seen", r.stdout)[-1] == "8", r.stdout
