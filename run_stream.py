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
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time

from streamvz.config import DEFAULTS
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
    g.add_argument("--tokens-per-frame", type=int, default=DEFAULTS.tokens_per_frame,
                   help="VisionZip tokens kept per frame (64 = 54 dominant + 10 contextual)")
    g.add_argument("--window", type=int, default=None,
                   help="frames kept in each session's KV cache (default: as many as the context holds)")
    g.add_argument("--temporal", choices=["off", "drop"], default=DEFAULTS.temporal,
                   help="static cameras: 'drop' writes only the tokens that changed since the last frame "
                        "(a still frame costs nothing; key frames keep all)")
    g.add_argument("--key-frame-every", type=int, default=DEFAULTS.key_frame_every,
                   help="with --temporal drop: frames between key frames")
    g.add_argument("--temporal-threshold", type=float, default=DEFAULTS.temporal_threshold,
                   help="with --temporal drop: a token changed when its cosine similarity to the last frame's "
                        "nearest token is below 1 - this")
    g.add_argument("--max-sessions", type=int, default=DEFAULTS.max_sessions,
                   help="sessions the engine holds at once (KV memory: max sessions x cache budget, fixed at start)")


def make_engine(a, **limits):
    import torch

    from streamvz.engine import Engine

    dtype = getattr(torch, a.dtype) if a.dtype else None
    return Engine(model=a.model, device=a.device, dtype=dtype, tokens_per_frame=a.tokens_per_frame,
                  window_frames=a.window, max_sessions=a.max_sessions, temporal=a.temporal,
                  key_frame_every=a.key_frame_every, temporal_threshold=a.temporal_threshold, **limits)


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

    a.broker, a.broker_port = broker_address(a.broker, a.broker_port)
    limits = Limits(max_sessions=a.max_sessions, max_sessions_per_client=a.sessions_per_client,
                    max_push_fps=a.max_push_fps, max_question_chars=a.max_question_chars)
    cfg = ServeConfig(transport=a.transport, host=a.host, port=a.port, broker=a.broker, broker_port=a.broker_port,
                      mqtt_user=a.mqtt_user, mqtt_password=a.mqtt_password or os.environ.get("STREAMVZ_MQTT_PASSWORD"),
                      mqtt_ca=a.mqtt_ca, mqtt_idle_s=a.mqtt_idle or None, mqtt_reply_prefixes=a.mqtt_reply_prefix,
                      mqtt_client_id=a.mqtt_client_id, mqtt_session_expiry_s=a.mqtt_session_expiry, media_roots=a.media_root,
                      allow_private_sources=a.allow_private_sources,
                      allow_source_networks=a.allow_source_network, token=a.token or os.environ.get("STREAMVZ_TOKEN"),
                      origins=a.origin, grace_s=a.grace, limits=limits, group=a.group, worker_id=a.worker_id,
                      keepalive=a.keepalive, backend=broker_address(a.backend, 1883) if a.backend else None)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    if hasattr(signal, "SIGUSR1"):  # POSIX: the loop takes signal handlers
        loop.add_signal_handler(signal.SIGUSR1, dump_state)
    if a.backend and a.transport != "ws":
        raise StreamError("bad_argument", "--backend makes a websocket gateway: use it with --transport ws")
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
    # A gateway holds no model: its sessions live on the pool workers.
    async with (contextlib.nullcontext() if a.backend else make_engine(a, max_question_chars=a.max_question_chars)) as engine:
        ready = loop.create_future()
        task = asyncio.create_task(serve(engine, cfg, ready, stop))
        # From here a signal ends serve through its own cleanup (sessions closed, transports shut).
        stopper.on_stop = stop.set
        port = await ready
        if port is not None:
            print(f"streamvz: web page http://{a.host}:{port}/  websocket ws://{a.host}:{port}/ws", flush=True)
        if a.transport in ("mqtt", "both"):
            print(f"streamvz: MQTT via {a.broker}:{a.broker_port}, topics streamvz/<session>/..."
                  + (f", pool {a.group!r}" if a.group else ""), flush=True)
        try:
            await task
        finally:
            if watcher is not None:
                watcher.cancel()
    return 0


def broker_address(broker: str, port: int) -> tuple[str, int]:
    """--broker takes a host (with --broker-port) or a URL mqtt://HOST:PORT."""
    if "://" not in broker:
        return broker, port
    from urllib.parse import urlsplit

    url = urlsplit(broker)
    if url.scheme != "mqtt" or not url.hostname:
        raise StreamError("bad_argument", f"--broker takes mqtt://HOST:PORT, not {broker!r} (TLS: --mqtt-ca)")
    return url.hostname, url.port or 1883


def session_server_args(p: argparse.ArgumentParser) -> None:
    """What `serve` and `worker` share: MQTT account and session idling, which sources clients may
    open, and the per-session caps."""
    p.add_argument("--mqtt-user", help="MQTT username")
    p.add_argument("--mqtt-password", help="MQTT password (or env STREAMVZ_MQTT_PASSWORD)")
    p.add_argument("--mqtt-ca", help="CA certificate file: connect to the broker over TLS")
    p.add_argument("--mqtt-idle", type=float, default=600.0,
                   help="close an MQTT session after this many seconds without a message for it (0: never)")
    p.add_argument("--mqtt-reply-prefix", action="append", default=[], metavar="PREFIX",
                   help="also allow MQTT response topics under PREFIX (repeatable); by default answers go only "
                        "to <prefix>/<session>/answers[/...] or .../events")
    p.add_argument("--media-root", action="append", default=[],
                   help="directory whose videos clients may open by relative name (repeatable); none: no files")
    p.add_argument("--allow-private-sources", action="store_true",
                   help="let clients name source URLs on loopback, private or link-local hosts (refused by default)")
    p.add_argument("--allow-source-network", action="append", default=[], metavar="CIDR",
                   help="let clients name sources in this non-public network only (repeatable), "
                        "e.g. 192.168.1.0/24 for the cameras")
    p.add_argument("--max-push-fps", type=float, default=30.0, help="frames/s a client may push to a session")
    p.add_argument("--max-question-chars", type=int, default=DEFAULTS.max_question_chars,
                   help="longest question accepted")


def pool_args(p: argparse.ArgumentParser, group: str | None) -> None:
    g = p.add_argument_group("worker pool (MQTT v5; docs/scale-out.md)")
    g.add_argument("--group", default=group, help="be a pool worker of this group: sessions split across workers "
                                                  f"by a shared subscription (default: {group or 'no pool'})")
    g.add_argument("--worker-id", help="this worker's name in `opened` and on streamvz/workers/<id> (default: random)")
    g.add_argument("--keepalive", type=int, default=10,
                   help="MQTT keepalive seconds: the broker announces this server dead 1.5x this after it goes silent")


# --- analyze -------------------------------------------------------------------------------

async def cmd_analyze(a, stopper) -> int:
    if a.ray and not _ray_address(a.ray):  # `--ray FILE ...`: argparse took the first file for the address
        a.video.insert(0, a.ray)
        a.ray = "local"
    if a.ray or len(a.video) > 1 or a.segments > 1:
        return await cmd_analyze_job(a)
    a.video = a.video[0]
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


def _ray_address(s: str) -> bool:
    return s in ("local", "auto") or "://" in s or (":" in s and not os.path.exists(s))


async def cmd_analyze_job(a) -> int:
    """Several files, or time segments: on Ray actors with --ray, else one after another here."""
    from pipelines import analyze_ray

    if not a.question and not a.summary_every:
        a.summary_every = 30.0
    opts = dict(questions=a.question, summary_every=a.summary_every, fps=a.fps, max_tokens=a.max_tokens,
                progress=not a.quiet)
    if a.ray:
        engine_kwargs = dict(model=a.model, device=a.device, dtype=a.dtype, tokens_per_frame=a.tokens_per_frame,
                             window_frames=a.window, max_sessions=a.max_sessions)
        report = await analyze_ray.analyze_on_ray(a.video, engine_kwargs, address=a.ray, actors=a.actors,
                                                  segments=a.segments, **opts)
    else:
        if a.segments > 1:
            raise StreamError("bad_argument", "--segments splits files across Ray actors: add --ray")
        async with make_engine(a) as engine:
            report = await analyze_ray.analyze_here(engine, a.video, **opts)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(a.out + ".md", "w") as f:
            f.write(analyze_ray.to_markdown(report))
        print(f"wrote {a.out}.json and {a.out}.md", file=sys.stderr)
    else:
        print(analyze_ray.to_markdown(report))
    return 0 if report["videos"] else 2


# --- live ----------------------------------------------------------------------------------

async def cmd_live(a, stopper) -> int:
    from pipelines.console import StdinLines
    from pipelines.live_qa import LiveQA
    from pipelines.live_report import Printer

    show = Printer(json_lines=a.json)
    async with make_engine(a) as engine:
        options = {"rtsp_transport": a.rtsp_transport} if a.source.lower().startswith(("rtsp://", "rtsps://")) else {}
        live = LiveQA(engine, a.source, a.watch, every=a.every, fps=a.fps, realtime=a.realtime,
                      on_alert=show, on_event=show, source_options=options, watch_window=a.watch_window or None)

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
    session_server_args(s)
    s.add_argument("--mqtt-client-id", help="MQTT client id (default streamvz-server-streamvz); unique per server")
    s.add_argument("--mqtt-session-expiry", type=int, default=300, metavar="S",
                   help="seconds the broker keeps this server's subscriptions and queued requests while it is "
                        "away (0: none)")
    s.add_argument("--token", help="require this bearer token from websocket clients (or env STREAMVZ_TOKEN)")
    s.add_argument("--origin", action="append", help="allowed Origin header for websocket clients (repeatable)")
    s.add_argument("--grace", type=float, default=30.0, help="seconds a disconnected client's session is kept")
    s.add_argument("--sessions-per-client", type=int, default=4, help="sessions one client address may hold")
    pool_args(s, None)
    s.add_argument("--backend", metavar="mqtt://HOST:PORT",
                   help="be a websocket gateway: same protocol and page, sessions on the worker pool behind this broker")

    w = sub.add_parser("worker", help="a pool worker: serve sessions over MQTT v5 next to other workers",
                       description="Join a worker pool behind an MQTT v5 broker: take `open` requests from the "
                                   "shared subscription of --group, keep each session's topics to this worker. "
                                   "Same as `serve --transport mqtt --group G`. See docs/scale-out.md.")
    engine_args(w)
    w.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="the broker, mqtt://HOST:PORT")
    session_server_args(w)
    pool_args(w, "streamvz")
    # A worker is `serve --transport mqtt --group G`: what serve's other flags would say, fixed. (Its broker
    # session expiry is 0 whatever this says: see PoolWorker.)
    w.set_defaults(transport="mqtt", host="127.0.0.1", port=0, broker_port=1883, token=None, origin=None, grace=30.0,
                   sessions_per_client=4, backend=None, mqtt_client_id=None, mqtt_session_expiry=0)

    an = sub.add_parser("analyze", help="analyse a video file: answers and a timestamped summary (JSON + Markdown)",
                        description="Walk VIDEO at --fps, write a timeline summary every --summary-every seconds "
                                    "and answer the --question(s) once, at the end of the video, from the frames "
                                    "still in the window (the last --window frames). Exits 2 on bad input; "
                                    "Ctrl-C/SIGTERM writes the report so far, marked partial.")
    engine_args(an)
    an.add_argument("video", nargs="+", help="video file(s)")
    an.add_argument("-q", "--question", action="append", default=[], help="a question, answered at the end of the video (repeatable)")
    an.add_argument("--summary-every", type=float, default=None,
                    help="seconds of video between timeline entries (default 30 when no question is given)")
    an.add_argument("--fps", type=float, default=1.0, help="frames per second sampled from the video")
    an.add_argument("--max-tokens", type=int, default=64, help="longest answer")
    an.add_argument("--out", help="write OUT.json and OUT.md (default: print Markdown)")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    rj = an.add_argument_group("jobs on Ray (the `scale` extra; docs/scale-out.md)")
    rj.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="run on Ray: one engine per actor, files spread across actors; ADDRESS ray://HOST:PORT or "
                         "auto (default: start a local Ray)")
    rj.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    rj.add_argument("--segments", type=int, default=1,
                    help="cut each file into this many time segments, one session each (merged in time order)")

    lv = sub.add_parser("live", help="live camera Q&A: standing questions alert on changed answers",
                        description="Read SOURCE (rtsp/http URL, /dev/video0, or a file with --realtime); ask the "
                                    "--watch questions every --every seconds and print an alert (JSON line) when an "
                                    "answer changes. Lines typed on stdin are ad-hoc questions.")
    engine_args(lv)
    lv.add_argument("source", help="URL, capture device or file")
    lv.add_argument("--watch", action="append", default=[], help="a standing question (repeatable)")
    lv.add_argument("--every", type=float, default=10.0, help="seconds of video between standing checks")
    lv.add_argument("--watch-window", type=float, default=10.0, metavar="SECONDS",
                    help="standing questions see only the frames of the last SECONDS (0: the whole window)")
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
    commands = {"serve": cmd_serve, "worker": cmd_serve, "analyze": cmd_analyze, "live": cmd_live, "demo": cmd_demo}
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
