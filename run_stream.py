#!/usr/bin/env python
"""streamvz command line: serve, analyze, live, demo.

    python run_stream.py demo                                  # server + sample clip + a client asking
    python run_stream.py serve --transport both --media-root ./videos
    python run_stream.py analyze talk.mp4 -q "What is on the slide?" --summary-every 30 --out report
    python run_stream.py live rtsp://cam/door --watch "Is the door open?" --every 10

Every command takes the engine options (--model, --device, --tokens-per-frame, --window).
`python run_stream.py COMMAND --help` explains each option.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
import time

from streamvz.errors import StreamError

try:  # uvloop when installed: a faster event loop for many sockets; asyncio otherwise
    import uvloop

    _run = uvloop.run
except ImportError:  # pragma: no cover
    _run = asyncio.run


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="streamvz-tiny",
                   help="a checkpoint directory or Hugging Face id (llava-hf/llava-1.5-7b-hf, ...); "
                        "default: the embedded streamvz-tiny (installed by `make weights`)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype")
    g.add_argument("--tokens-per-frame", type=int, default=64,
                   help="VisionZip tokens kept per frame (64 = 54 dominant + 10 contextual)")
    g.add_argument("--window", type=int, default=None,
                   help="frames kept in each session's KV cache (default: as many as the context holds)")
    g.add_argument("--max-sessions", type=int, default=16, help="sessions the engine holds at once")


def make_engine(a, **limits):
    import torch

    from streamvz.engine import Engine

    dtype = getattr(torch, a.dtype) if a.dtype else None
    return Engine(model=a.model, device=a.device, dtype=dtype, tokens_per_frame=a.tokens_per_frame,
                  window_frames=a.window, max_sessions=a.max_sessions, **limits)


# --- serve ---------------------------------------------------------------------------------

def dump_state() -> None:
    """Every asyncio task's stack and every thread's, to stderr: `kill -USR1 <pid>` on a server
    that seems stuck (on shutdown, say) shows what it is waiting on, without stopping it."""
    import faulthandler

    tasks = asyncio.all_tasks()
    print(f"streamvz: {len(tasks)} asyncio tasks", file=sys.stderr)
    for t in tasks:
        t.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()  # before faulthandler writes to the same descriptor directly
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


async def cmd_serve(a, stopper) -> int:
    from pipelines.ws_chat import QuietUntilBrokerUp, ServeConfig, broker_problem, serve
    from streamvz.protocol import Limits

    limits = Limits(max_sessions=a.max_sessions, max_sessions_per_client=a.sessions_per_client,
                    max_push_fps=a.max_push_fps, max_question_chars=a.max_question_chars)
    cfg = ServeConfig(transport=a.transport, host=a.host, port=a.port, broker=a.broker, broker_port=a.broker_port,
                      mqtt_user=a.mqtt_user, mqtt_password=a.mqtt_password or os.environ.get("STREAMVZ_MQTT_PASSWORD"),
                      mqtt_ca=a.mqtt_ca, mqtt_idle_s=a.mqtt_idle or None, media_roots=a.media_root, token=a.token or os.environ.get("STREAMVZ_TOKEN"),
                      origins=a.origin, grace_s=a.grace, limits=limits)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    if hasattr(signal, "SIGUSR1"):  # POSIX: the loop takes signal handlers
        loop.add_signal_handler(signal.SIGUSR1, dump_state)
    watcher = None
    if a.transport in ("mqtt", "both"):
        problem = await broker_problem(a.broker, a.broker_port)
        if problem:  # said once, here; the transport's retry warnings stay quiet until the broker is up
            print(f"streamvz: no MQTT broker reachable at {a.broker}:{a.broker_port} ({problem}).\n"
                  f"  Start one, e.g. `mosquitto -p {a.broker_port}` (Debian: apt-get install mosquitto), or point "
                  f"--broker/--broker-port at yours.\n  "
                  + ("The websocket serves meanwhile; " if a.transport == "both" else "")
                  + "MQTT connects as soon as the broker is up.", file=sys.stderr, flush=True)
            quiet = QuietUntilBrokerUp(a.broker, a.broker_port)
            logging.getLogger("streamvz.mqtt").addFilter(quiet)
            watcher = asyncio.create_task(quiet.watch(lambda text: print(text, file=sys.stderr, flush=True)))
    async with make_engine(a, max_question_chars=a.max_question_chars) as engine:
        ready = loop.create_future()
        task = asyncio.create_task(serve(engine, cfg, ready, stop))
        # From here a signal ends serve through its own cleanup (sessions closed, transports shut).
        stopper.on_stop = stop.set
        port = await ready
        if port is not None:
            print(f"streamvz: web page http://{a.host}:{port}/  websocket ws://{a.host}:{port}/ws", flush=True)
        if a.transport in ("mqtt", "both"):
            print(f"streamvz: MQTT via {a.broker}:{a.broker_port}, topics streamvz/<session>/...", flush=True)
        try:
            await task
        finally:
            if watcher is not None:
                watcher.cancel()
    return 0


# --- analyze -------------------------------------------------------------------------------

async def cmd_analyze(a, stopper) -> int:
    from pipelines.analyze import Analysis, to_markdown
    from streamvz.sources import probe

    probe(a.video)  # bad input fails here, in a second, not after loading the model
    if not a.question and not a.summary_every:
        a.summary_every = 30.0
    job = None
    try:
        async with make_engine(a) as engine:
            job = Analysis(engine, a.video, a.question, a.summary_every, a.fps, a.max_tokens,
                           progress=not a.quiet, out=a.out)
            await job.run()
    finally:
        if job is not None and (job.report["partial"] or not sys.exc_info()[0]):
            if a.out:
                kind = "partial report" if job.report["partial"] else "report"
                print(f"wrote {kind} {a.out}.json and {a.out}.md", file=sys.stderr)
            else:
                print(to_markdown(job.report), flush=True)
    return 0


# --- live ----------------------------------------------------------------------------------

async def cmd_live(a, stopper) -> int:
    from pipelines.console import StdinLines
    from pipelines.live_qa import LiveQA
    from pipelines.live_report import Printer

    show = Printer(json_lines=a.json)
    async with make_engine(a) as engine:
        options = {"rtsp_transport": a.rtsp_transport} if a.source.lower().startswith(("rtsp://", "rtsps://")) else {}
        live = LiveQA(engine, a.source, a.watch, every=a.every, fps=a.fps, realtime=a.realtime,
                      on_alert=show, on_event=show, source_options=options)

        async def questions():
            async with StdinLines() as lines:
                async for line in lines:
                    show({"question": line, "answer": await live.ask(line), "time": time.time()})

        run = asyncio.create_task(live.run())
        asking = asyncio.create_task(questions()) if not a.no_stdin else None
        try:
            await run
        except StreamError as e:  # the camera never came back (or never answered): say so, then exit 2
            show({"event": "gone", "code": e.code, "message": e.message, "time": time.time()})
            raise
        finally:  # stopped or ended: nothing left running when the engine closes
            for task in (run, asking):
                if task is not None:
                    task.cancel()
            await asyncio.gather(run, *([asking] if asking else []), return_exceptions=True)
    return 0


# --- demo ----------------------------------------------------------------------------------

async def cmd_demo(a, stopper) -> int:
    from pipelines.demo import demo

    return await demo(lambda: make_engine(a), a.model, video=a.video, asks=a.ask, seconds=a.seconds, fps=a.fps,
                      max_tokens=a.max_tokens)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default in (None, False, [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help keeps the module docstring's layout (its examples)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_stream.py", description=__doc__, formatter_class=TopHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the server does")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    s = sub.add_parser("serve", help="run the server: websocket (+ web page) and/or MQTT",
                       description="Serve streamvz over a websocket (web page at /) and/or MQTT v5. "
                                   "Protocol: docs/protocol.md.")
    engine_args(s)
    s.add_argument("--transport", choices=["ws", "mqtt", "both"], default="ws", help="which transports to run")
    s.add_argument("--host", default="127.0.0.1", help="websocket bind address (0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8765, help="websocket/HTTP port")
    s.add_argument("--broker", default="127.0.0.1", help="MQTT broker host")
    s.add_argument("--broker-port", type=int, default=1883, help="MQTT broker port")
    s.add_argument("--mqtt-user", help="MQTT username")
    s.add_argument("--mqtt-password", help="MQTT password (or env STREAMVZ_MQTT_PASSWORD)")
    s.add_argument("--mqtt-ca", help="CA certificate file: connect to the broker over TLS")
    s.add_argument("--mqtt-idle", type=float, default=600.0,
                   help="close an MQTT session after this many seconds without a message for it (0: never)")
    s.add_argument("--media-root", action="append", default=[],
                   help="directory whose videos clients may open by relative name (repeatable); none: no files")
    s.add_argument("--token", help="require this bearer token from websocket clients (or env STREAMVZ_TOKEN)")
    s.add_argument("--origin", action="append", help="allowed Origin header for websocket clients (repeatable)")
    s.add_argument("--grace", type=float, default=30.0, help="seconds a disconnected client's session is kept")
    s.add_argument("--sessions-per-client", type=int, default=4, help="sessions one client address may hold")
    s.add_argument("--max-push-fps", type=float, default=30.0, help="frames/s a client may push to a session")
    s.add_argument("--max-question-chars", type=int, default=2000, help="longest question accepted")

    an = sub.add_parser("analyze", help="analyse a video file: answers and a timestamped summary (JSON + Markdown)",
                        description="Walk VIDEO at --fps, write a timeline summary every --summary-every seconds "
                                    "and answer the --question(s) once, at the end of the video, from the frames "
                                    "still in the window (the last --window frames). Exits 2 on bad input; "
                                    "Ctrl-C/SIGTERM writes the report so far, marked partial.")
    engine_args(an)
    an.add_argument("video", help="video file")
    an.add_argument("-q", "--question", action="append", default=[], help="a question, answered at the end of the video (repeatable)")
    an.add_argument("--summary-every", type=float, default=None,
                    help="seconds of video between timeline entries (default 30 when no question is given)")
    an.add_argument("--fps", type=float, default=1.0, help="frames per second sampled from the video")
    an.add_argument("--max-tokens", type=int, default=64, help="longest answer")
    an.add_argument("--out", help="write OUT.json and OUT.md (default: print Markdown)")
    an.add_argument("--quiet", action="store_true", help="no progress bar")

    lv = sub.add_parser("live", help="live camera Q&A: standing questions alert on changed answers",
                        description="Read SOURCE (rtsp/http URL, /dev/video0, or a file with --realtime); ask the "
                                    "--watch questions every --every seconds and print an alert (JSON line) when an "
                                    "answer changes. Lines typed on stdin are ad-hoc questions.")
    engine_args(lv)
    lv.add_argument("source", help="URL, capture device or file")
    lv.add_argument("--watch", action="append", default=[], help="a standing question (repeatable)")
    lv.add_argument("--every", type=float, default=10.0, help="seconds of video between standing checks")
    lv.add_argument("--fps", type=float, default=1.0, help="frames per second sampled")
    lv.add_argument("--realtime", action="store_true", help="play a file at its own pace, as if live")
    lv.add_argument("--no-stdin", action="store_true", help="do not read ad-hoc questions from stdin")
    lv.add_argument("--rtsp-transport", choices=["auto", "tcp", "udp"], default="auto",
                    help="how an rtsp:// camera sends its video: auto tries TCP, then UDP")
    lv.add_argument("--json", action="store_true",
                    help="print one JSON object per line (camera events, first answers, alerts, answers) "
                         "instead of plain words")

    d = sub.add_parser("demo", help="start a server, stream a generated sample clip, ask questions, print answers",
                       description="The end-to-end demo on the embedded model: a server on a free port, a generated "
                                   "sample clip played in real time, a websocket client asking questions while it "
                                   "plays and printing the streamed answers.")
    engine_args(d)
    d.add_argument("--video", help="use this video instead of the generated sample")
    d.add_argument("--ask", action="append", default=[], help="a question (repeatable; default: about the sample)")
    d.add_argument("--seconds", type=float, default=8.0, help="length of the generated sample clip")
    d.add_argument("--fps", type=float, default=2.0, help="frames per second streamed")
    d.add_argument("--max-tokens", type=int, default=24, help="longest answer")
    return p


async def run_command(command, a, stopper) -> int:
    """Run one command as a task that the first SIGINT/SIGTERM cancels (serve: stops)."""
    task = asyncio.ensure_future(command(a, stopper))
    stopper.attach(asyncio.get_running_loop(), task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if stopper.signum is None:
            raise
        return stopper.exit_code


def main(argv=None) -> int:
    from pipelines.console import Stopper, quiet_libraries, say

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not a.verbose:
        quiet_libraries()
    commands = {"serve": cmd_serve, "analyze": cmd_analyze, "live": cmd_live, "demo": cmd_demo}
    with Stopper() as stopper:
        try:
            code = _run(run_command(commands[a.cmd], a, stopper))
        except StreamError as e:
            print(f"error [{e.code}]: {e.message}", file=sys.stderr)
            return 2
        if stopper.signum is not None:
            say("streamvz: stopped")
            return stopper.exit_code
        return code


if __name__ == "__main__":
    sys.exit(main())
