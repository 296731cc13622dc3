"""Sessions as the transports see them: one engine, many clients, many sessions.

Both transports (websocket, MQTT) hand validated messages to a `Service`; it owns the map
session id -> `Entry` (engine session, its server-side source task, its running asks, its
frame rate bucket, who is attached) and turns asks into ordered `token`/`done` messages
through a `send(op, **fields)` callback the transport supplies. Nothing here knows about
sockets or topics.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits
from streamvz.transports.preview import Previews, render as render_previews
from streamvz.transports.security import SourcePolicy, TokenBucket, check_resume

log = logging.getLogger("streamvz.serve")
Send = Callable[..., Awaitable[None]]  # send(op, **fields)


class PeerGone(Exception):
    """Raised by a transport's send when the client is gone; the answer just stops."""


@dataclass
class Entry:
    id: str
    session: object  # streamvz.session.Session from the engine
    client: str  # who opened it (remote address or token), for the per-client cap
    bucket: TokenBucket
    transport: str = "ws"  # the transport that owns it: no other may drive it
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))  # proves a resume is the owner's
    send: Send | None = None  # None while detached (client gone, grace period running)
    source: tuple[str, float, dict] | None = None  # (what to open, fps, open_source options) for a server-side source
    source_task: asyncio.Task | None = None
    source_state: str | None = None  # running | ended | failed
    reader: object = None  # the open server-side source: its drops count in frames_dropped
    previews: Previews = field(default_factory=Previews)  # what the model sees, for the `preview` op
    asks: dict[str, asyncio.Task] = field(default_factory=dict)
    answers: dict[str, object] = field(default_factory=dict)  # engine Answers of running asks
    cancelled: set[str] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None
    t0: float = field(default_factory=time.monotonic)  # stamps frames that come without `t`
    last_active: float = field(default_factory=time.monotonic)  # last message from a client
    closing: str | None = None  # why its running asks end: "cancelled" (client close) or "shutdown"

    def emit(self, op: str, **fields) -> Awaitable[None] | None:
        return self.send(op, **fields) if self.send is not None else None


class Service:
    def __init__(self, engine, limits: Limits = Limits(), sources: SourcePolicy | None = None,
                 grace_s: float = 30.0, realtime_files: bool = True):
        self.engine = engine
        self.limits = limits
        self.sources = sources or SourcePolicy()
        self.grace_s = grace_s
        self.realtime_files = realtime_files  # play server-side files at their own pace, like a camera
        self.entries: dict[str, Entry] = {}
        self.on_close: list[Callable[[str], None]] = []  # told each closed session's id (a pool worker unsubscribes)

    # --- sessions ---------------------------------------------------------------------
    async def open(self, msg: dict, client: str, send: Send, session_id: str | None = None,
                   transport: str = "ws") -> Entry:
        """`open`: resume msg["session"] if given, else create (with `session_id` if the transport names it).

        Resuming needs the secret `opened` gave the session's owner (`resume`), on the same
        transport: a session id alone, seen in a log or guessed, opens nothing."""
        if "session" in msg and session_id is None:
            entry = self.entries.get(msg["session"])
            mine = entry is not None and entry.transport == transport
            check_resume(msg, entry.secret if mine else None, mine and entry.send is not None)
            if entry.expiry is not None:
                entry.expiry.cancel()
                entry.expiry = None
            entry.send = send
            return entry
        if "resume" in msg:  # without `session` it would be silently ignored
            raise StreamError("bad_field", "`resume` goes with `session` (resuming a websocket session)", field="resume")
        if len(self.entries) >= self.limits.max_sessions:
            raise StreamError("too_many_sessions", f"the server holds {self.limits.max_sessions} sessions")
        if sum(e.client == client for e in self.entries.values()) >= self.limits.max_sessions_per_client:
            raise StreamError("too_many_sessions", f"at most {self.limits.max_sessions_per_client} sessions per client")
        source = self.sources.check(msg["source"]) if "source" in msg else None  # names resolve in _pump
        if "rtsp_transport" in msg and not (source or "").lower().startswith(("rtsp://", "rtsps://")):
            raise StreamError("bad_field", "`rtsp_transport` applies to an rtsp:// source only", field="rtsp_transport")
        sid = session_id or secrets.token_urlsafe(12)
        kwargs = {"session_id": sid}
        if "system_prompt" in msg:
            kwargs["system_prompt"] = msg["system_prompt"]
        session = self.engine.session(**kwargs)
        entry = Entry(sid, session, client, TokenBucket(self.limits.max_push_fps), transport, send=send)
        self.entries[sid] = entry
        if source is not None:
            entry.source = (source, msg.get("fps", 1.0), {k: msg[k] for k in ("rtsp_transport",) if k in msg})
        return entry

    def start(self, entry: Entry) -> None:
        """Start reading the session's server-side source (after `opened` went out, so that a
        source error never reaches the client before the session it belongs to)."""
        if entry.source is not None and entry.source_task is None:
            entry.source_state = "running"
            entry.source_task = asyncio.create_task(self._pump(entry, *entry.source))

    def get(self, sid: str, transport: str | None = None) -> Entry:
        entry = self.entries.get(sid)
        if entry is None or (transport is not None and entry.transport != transport):
            raise StreamError("unknown_session", f"no session {sid!r}")
        entry.last_active = time.monotonic()
        return entry

    async def close_idle(self, idle_s: float, prefix: str = "") -> list[str]:
        """Close sessions (whose client key starts with `prefix`) that heard nothing from a
        client for `idle_s` and are not answering: MQTT has no connection whose end says so."""
        now = time.monotonic()
        idle = [e for e in self.entries.values()
                if e.client.startswith(prefix) and not e.asks and now - e.last_active > idle_s]
        for e in idle:
            log.info("session %s closed after %.0fs idle", e.id, idle_s)
            await self.close(e)
        return [e.id for e in idle]

    def detach(self, entry: Entry) -> None:
        """The client went away: stop its answers, keep the session for `grace_s` to resume."""
        entry.send = None
        for rid, task in list(entry.asks.items()):
            entry.cancelled.add(rid)
            task.cancel()
        if entry.id in self.entries and entry.expiry is None:
            loop = asyncio.get_running_loop()
            entry.expiry = loop.call_later(self.grace_s, lambda: asyncio.ensure_future(self._expire(entry)))

    async def _expire(self, entry: Entry) -> None:
        if entry.send is None and self.entries.get(entry.id) is entry:
            log.info("session %s expired after %.0fs detached", entry.id, self.grace_s)
            await self.close(entry)

    async def close(self, entry: Entry, reason: str = "cancelled") -> None:
        """Close a session; each running ask still ends with `done` (finish_reason `reason`)."""
        if self.entries.pop(entry.id, None) is None:
            return
        entry.closing = reason
        for notify in self.on_close:
            notify(entry.id)
        if entry.expiry is not None:
            entry.expiry.cancel()
        tasks = list(entry.asks.values()) + ([entry.source_task] if entry.source_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await entry.session.close()

    async def aclose(self) -> None:
        """Server shutdown: every answer in flight ends with `done` (finish_reason "shutdown")."""
        await asyncio.gather(*(self.close(e, "shutdown") for e in list(self.entries.values())), return_exceptions=True)

    async def preview(self, entry: Entry) -> dict:
        """The latest frame and thumbnails of the frames in the window (JPEG, base64)."""
        return await asyncio.to_thread(render_previews, *entry.previews.pick(entry.session.stats()["frames_in_window"]))

    def status(self, entry: Entry) -> dict:
        stats = dict(entry.session.stats())
        stats["source"] = entry.source_state
        if entry.reader is not None:  # frames the source sampled that the session has not seen (yet)
            stats["frames_dropped"] += entry.reader.frames_dropped
            stats["frames_pending"] += entry.reader.frames_queued
        return stats

    # --- frames -------------------------------------------------------------------------
    async def frame(self, entry: Entry, data: bytes, t: float | None = None) -> bool:
        """A pushed binary frame. Returns False if dropped by the rate cap (caller may warn)."""
        if entry.source is not None:
            raise StreamError("source_busy", "this session reads a server-side source; it takes no pushed frames")
        if not entry.bucket.take():
            if entry.bucket.should_warn():
                raise StreamError("rate_limited", f"more than {self.limits.max_push_fps:g} frames/s; extra frames dropped")
            return False
        # JPEG decoding off the event loop: other sessions keep streaming meanwhile.
        frame = await asyncio.to_thread(protocol.parse_frame, data, self.limits, t)
        stamp = frame.t if frame.t is not None else time.monotonic() - entry.t0
        entry.session.submit_frame(frame.image, stamp)
        entry.previews.add(frame.image, stamp)
        return True

    async def _pump(self, entry: Entry, source: str, fps: float, options: dict) -> None:
        network = "://" in source
        try:
            from streamvz.sources import open_source

            def on_status(ev: dict) -> None:  # live sources: connected / disconnected / reconnecting / stalled
                if ev.get("event") in ("connected", "disconnected", "reconnecting", "stalled"):
                    keep = ("attempt", "delay", "rtsp_transport") if network else \
                        ("attempt", "delay", "reason", "rtsp_transport")
                    fields = {k: v for k, v in ev.items() if k in keep and v is not None}
                    asyncio.ensure_future(_maybe(entry.emit("status", session=entry.id, event="source_" + ev["event"],
                                                            **fields, **self.status(entry))))

            # Resolve the host, follow HTTP redirects (each hop checked): on a thread, after
            # `opened`, so that a slow name server holds up neither this transport nor others.
            source = await asyncio.to_thread(self.sources.check_network, source)
            async with open_source(source, fps=fps, realtime=self.realtime_files and "://" not in source,
                                   on_status=on_status, **options) as src:
                entry.reader = src
                async for frame in src:
                    await entry.session.add_frame(frame.image, t=frame.t)
                    entry.previews.add(frame.image, frame.t)
            entry.source_state = "ended"
            await _maybe(entry.emit("status", session=entry.id, event="source_ended", **self.status(entry)))
        except asyncio.CancelledError:
            raise
        except StreamError as e:
            entry.source_state = "failed"
            if network and e.code not in ("resolution_too_large", "source_not_allowed"):
                # One code and one message for every network failure: a client must not learn
                # from the server whether a port is open or what answers there.
                e = StreamError("unreachable_url", "the source could not be opened or read")
            await _maybe(entry.emit("error", code=e.code, message=e.message))
        except Exception as e:  # a broken source must not take the server down
            entry.source_state = "failed"
            log.exception("source %s failed", source)
            await _maybe(entry.emit("error", code="internal_error", message=f"source failed: {type(e).__name__}"))

    # --- asks ---------------------------------------------------------------------------
    def ask(self, entry: Entry, msg: dict, send: Send | None = None) -> None:
        """Start answering; `send` (default: the session's) gets ordered token deltas, then done."""
        rid = msg["id"]
        if rid in entry.asks:
            raise StreamError("request_in_use", f"ask {rid!r} is still running", id=rid)
        if len(entry.asks) >= self.limits.max_queued_asks:
            raise StreamError("too_many_requests", f"at most {self.limits.max_queued_asks} asks per session at once", id=rid)
        send = send or entry.send
        task = asyncio.create_task(self._answer(entry, msg, send))
        entry.asks[rid] = task
        task.add_done_callback(lambda _t: (entry.asks.pop(rid, None), entry.answers.pop(rid, None),
                                           entry.cancelled.discard(rid)))

    def cancel(self, entry: Entry, rid: str) -> None:
        task = entry.asks.get(rid)
        if task is None:
            raise StreamError("unknown_request", f"no running ask {rid!r}", id=rid)
        entry.cancelled.add(rid)
        answer = entry.answers.get(rid)
        if answer is not None:
            answer.cancel()  # the engine stops it; the loop in _answer then sends `done`
        else:
            task.cancel()

    async def _answer(self, entry: Entry, msg: dict, send: Send) -> None:
        rid = msg["id"]
        t_start = time.monotonic()
        answer, seq, ttft = None, 0, None
        try:
            # The engine queues asks of one session in order (turns of one conversation).
            # no max_tokens: the engine's default (never above its limit; protocol.Limits reads the same config)
            answer = entry.session.ask(msg["text"], max_new_tokens=msg.get("max_tokens"),
                                       temperature=msg.get("temperature", 0.0), top_p=msg.get("top_p", 1.0),
                                       since=msg.get("since"))
            entry.answers[rid] = answer
            async for delta in answer:
                if not delta:
                    continue
                if ttft is None:
                    ttft = time.monotonic() - t_start
                await send("token", id=rid, seq=seq, text=delta)
                seq += 1
            usage = dict(answer.usage or {})
            usage.update(queued_ttft_s=ttft, wall_s=time.monotonic() - t_start, deltas=seq)
            if rid in entry.cancelled:
                usage["finish_reason"] = "cancelled"
            await send("done", id=rid, usage=usage)
        except asyncio.CancelledError:
            if answer is not None:
                answer.cancel()
            reason = "cancelled" if rid in entry.cancelled else entry.closing
            if reason is None:
                raise  # not ours to report (the event loop itself is going away)
            usage = dict(getattr(answer, "usage", None) or {}) if answer is not None else {}
            usage.update(finish_reason=reason, deltas=seq, wall_s=time.monotonic() - t_start)
            await _maybe(send("done", id=rid, usage=usage))  # to a detached client this fails quietly
        except PeerGone:
            if answer is not None:
                answer.cancel()
        except StreamError as e:
            await _maybe(send("error", code=e.code, message=e.message, id=rid))
        except Exception as e:
            if answer is not None:
                answer.cancel()
            log.exception("ask %s failed", rid)
            await _maybe(send("error", code="internal_error", message=f"answer failed: {type(e).__name__}: {e}"[:300], id=rid))


async def _maybe(aw) -> None:
    """Await a send that may fail because the peer is gone; a gone peer is not an error here."""
    if aw is None:
        return
    try:
        await aw
    except Exception as e:
        log.debug("send failed: %s", e)
