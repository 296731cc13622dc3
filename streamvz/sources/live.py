"""Live video with PyAV: RTSP, HTTP(S) (MPEG-TS, MJPEG), UDP/TCP MPEG-TS, v4l2 capture
devices (/dev/videoN), and a local file played in real time (demos and tests).

A live source never hangs the pipeline: every network read has a timeout (`stall_timeout`).
A read that times out, an end of stream, or a connection error closes the connection and
reconnects with capped exponential backoff (`backoff=(first, cap)` seconds), reporting
status events on the way:
  {"event": "stalled", ...}                  no data for stall_timeout seconds
  {"event": "disconnected", "reason": ...}   the connection ended or failed
  {"event": "reconnecting", "attempt": n, "delay": s}
  {"event": "connected", "reconnects": n}
  {"event": "ended"}                         a file played in real time, or a file served over
                                             HTTP(S) (it has a duration), reached its end
After `max_reconnects` failed attempts in a row (None = keep trying) the iterator raises
SourceError("source_stalled") (or "unreachable_url" if the source never came back after
an error). Problems with the stream itself (no video, unknown codec, too many pixels) are
not retried.

RTSP: `rtsp_transport` "tcp" (RTP interleaved in the RTSP connection), "udp", or "auto" (the
default: TCP, then UDP, so cameras that offer only UDP work too); "connected" events carry
the `rtsp_transport` that worked.

Timestamps come from the stream's clock: seconds since the first frame. After a reconnect
(the sender's clock may restart at zero) they continue from the wall-clock time since the
source started, so `t` never goes backwards. A realtime file is paced to its own clock.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import av

from .file import DEFAULT_MAX_PIXELS, probe
from .frame import Frame, SourceError
from .stream import RateSampler, StatusCallback, ThreadedSource

log = logging.getLogger(__name__)
RTSP_TRANSPORTS = ("auto", "tcp", "udp")
_FATAL = ("not_a_video", "unsupported_codec", "resolution_too_large", "file_not_found",
          "empty_video", "corrupt_video")


def _redact(url: str) -> str:
    """Drop credentials (rtsp://user:pass@host) from a URL before it goes into messages."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class LiveSource(ThreadedSource):
    """A live stream as an async iterable of Frames; drops the oldest frames when the
    consumer is slower than real time (counted in `frames_dropped`)."""

    def __init__(self, url, fps: float | None = None, *, realtime: bool = False, loop: bool = False,
                 rtsp_transport: str = "auto", format: str | None = None, options: dict | None = None,
                 open_timeout: float = 5.0, stall_timeout: float = 5.0, open_retries: int = 2,
                 reconnect: bool = True, max_reconnects: int | None = None,
                 backoff: tuple[float, float] = (0.5, 8.0), max_pixels: int = DEFAULT_MAX_PIXELS,
                 queue_size: int = 8, drop_oldest: bool = True, stop_timeout: float = 2.0,
                 on_status: StatusCallback | None = None):
        super().__init__(queue_size=queue_size, drop_oldest=drop_oldest, on_status=on_status,
                         stop_timeout=stop_timeout)
        if fps is not None and not fps > 0:
            raise ValueError("fps must be > 0")
        if rtsp_transport not in RTSP_TRANSPORTS:
            raise ValueError(f"rtsp_transport must be one of {RTSP_TRANSPORTS}")
        self.url = os.fspath(url)
        self.name = _redact(self.url)
        self.fps, self.realtime, self.loop = fps, realtime, loop
        self.rtsp_transport, self.format, self.options = rtsp_transport, format, dict(options or {})
        self.open_timeout, self.stall_timeout = open_timeout, stall_timeout
        self.open_retries, self.reconnect, self.max_reconnects = open_retries, reconnect, max_reconnects
        self.backoff, self.max_pixels = backoff, max_pixels
        self.reconnects = 0  # successful reconnections so far
        # RTSP: the lower transports to try, in order ("auto": TCP, then UDP for servers that offer
        # only UDP); the one that worked goes first on a reconnect. `rtsp_transport_used` says which.
        self._rtsp_order = ["tcp", "udp"] if rtsp_transport == "auto" else [rtsp_transport]
        self.rtsp_transport_used: str | None = None
        self.device = self.url.startswith("/dev/video")
        self.is_file = not self.device and "://" not in self.url
        if self.is_file and not realtime:
            raise ValueError("a local file is a live source only with realtime=True")
        self._container = None
        self._t_start = None  # monotonic time of the first frame
        self._last_t = None
        self._base = None  # (stream time, source time) of this connection's first frame

    # -- connecting --
    def _connect(self):
        if not self.url.lower().startswith(("rtsp://", "rtsps://")) or "rtsp_transport" in self.options:
            return self._connect_with({})
        failed: list[SourceError] = []
        for transport in list(self._rtsp_order):
            if failed and self.stopping:
                break
            try:
                c = self._connect_with({"rtsp_transport": transport})
            except SourceError as e:
                if e.code != "unreachable_url":
                    raise
                failed.append(e)
                continue
            self.rtsp_transport_used = transport
            self._rtsp_order.remove(transport)
            self._rtsp_order.insert(0, transport)
            return c
        if len(failed) == 1:
            raise failed[0]
        tried = "; ".join(f"over {t.upper()}: {e.message}" for t, e in zip(self._rtsp_order, failed))
        raise SourceError("unreachable_url", f"cannot open {self.name} {tried}", url=self.name)

    def _via(self) -> dict:
        return {"rtsp_transport": self.rtsp_transport_used} if self.rtsp_transport_used else {}

    def _connect_with(self, extra: dict):
        opts = {**self.options, **extra}
        fmt = self.format
        timeout = None
        low = self.url.lower()
        if not self.is_file:
            timeout = (self.open_timeout, self.stall_timeout)
            opts.setdefault("analyzeduration", "1000000")  # 1 s: live streams start fast
            opts.setdefault("probesize", "1000000")
        if low.startswith("udp://"):
            opts.setdefault("overrun_nonfatal", "1")
            opts.setdefault("fifo_size", "100000")
        elif self.device and fmt is None:
            fmt = "v4l2"
        try:
            c = av.open(self.url, format=fmt, options=opts, timeout=timeout, metadata_errors="ignore")
        except av.error.FFmpegError as e:
            raise SourceError("unreachable_url", f"cannot open {self.name}: {e.strerror or e}",
                              url=self.name) from None
        except OSError as e:  # ConnectionRefusedError and friends
            raise SourceError("unreachable_url", f"cannot open {self.name}: {e.strerror or e}",
                              url=self.name) from None
        try:
            if not c.streams.video:
                raise SourceError("not_a_video", f"no video stream in {self.name}", url=self.name)
            vs = c.streams.video[0]
            cc = vs.codec_context
            if cc is None or cc.codec is None:
                raise SourceError("unsupported_codec", f"no decoder for the video of {self.name}",
                                  url=self.name)
            if cc.width * cc.height > self.max_pixels:
                raise SourceError("resolution_too_large", f"{cc.width}x{cc.height} is above the "
                                  f"limit of {self.max_pixels} pixels", url=self.name)
        except BaseException:
            c.close()
            raise
        return c

    def _open(self) -> None:
        if self.is_file:
            probe(self.url, self.max_pixels)  # precise errors for a bad file
        delay = self.backoff[0]
        for attempt in range(self.open_retries + 1):
            try:
                self._container = self._connect()
                if self.stopping:  # cancelled while connecting
                    self._close()
                    return
                self._status("connected", reconnects=0, **self._via())
                return
            except SourceError as e:
                if e.code != "unreachable_url" or attempt == self.open_retries or self.stopping:
                    raise
                self._status("reconnecting", attempt=attempt + 1, delay=delay, message=e.message)
                if self._stop.wait(delay):  # told to stop while waiting to retry
                    return
                delay = min(self.backoff[1], delay * 2)

    def _close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None

    # -- reading --
    def _time(self, stream_t: float | None) -> float:
        """Source time of a frame: stream clock, rebased at each (re)connection."""
        now = time.monotonic()
        if self._t_start is None:
            self._t_start = now
        wall = now - self._t_start
        if stream_t is None:
            t = wall
        else:
            if self._base is not None:
                t = self._base[1] + (stream_t - self._base[0])
                # a clock jump (sender restarted, MPEG-TS wrap): rebase on the wall clock
                if t < self._last_t - 1.0 or t > wall + self.stall_timeout + 1.0:
                    self._base = None
            if self._base is None:
                start = 0.0 if self._last_t is None else max(wall, self._last_t)
                self._base = (stream_t, start)
            t = self._base[1] + (stream_t - self._base[0])
        if self._last_t is not None:
            t = max(t, self._last_t)
        self._last_t = t
        return t

    def _read(self, c, emit: Callable[[Frame], bool], sampler: RateSampler) -> str:
        """Decode one connection until it ends; returns 'stop', 'eof', 'stalled' or an error."""
        vs = c.streams.video[0]
        pace_t0 = None  # realtime file: (source t, monotonic) of the first frame
        try:
            for packet in c.demux(vs):
                if self.stopping:
                    return "stop"
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:  # one damaged packet: skip it, keep the stream
                    continue
                for fr in frames:
                    t = self._time(fr.time)
                    if self.realtime:
                        if pace_t0 is None:
                            pace_t0 = (t, time.monotonic())
                        wait = pace_t0[1] + (t - pace_t0[0]) - time.monotonic()
                        if wait > 0 and self._stop.wait(wait):
                            return "stop"
                    if not sampler.take(t):
                        continue
                    if not emit(Frame(t, fr.to_ndarray(format="rgb24"))):
                        return "stop"
        except av.error.ExitError:  # the read timeout fired (or we were told to stop)
            return "stop" if self.stopping else "stalled"
        except (av.error.FFmpegError, OSError) as e:
            return "stop" if self.stopping else f"error: {getattr(e, 'strerror', None) or e}"
        return "eof"

    def _produce(self, emit: Callable[[Frame], bool]) -> None:
        sampler = RateSampler(self.fps)
        while True:
            c, self._container = self._container, None
            if c is None:  # stopped while connecting
                return
            try:
                reason = self._read(c, emit, sampler)
                # A file served over HTTP(S) has a duration; a camera's stream has none.
                finite = c.duration is not None and self.url.lower().startswith(("http://", "https://"))
            finally:
                c.close()
            if reason == "stop" or self.stopping:
                return
            self._base = None  # the next connection's clock starts afresh
            if self.is_file:
                if reason != "eof":  # a damaged file: replaying it would loop forever
                    raise SourceError("corrupt_video", f"{self.name}: {reason}", path=self.url,
                                      last_good_t=self._last_t)
                if not self.loop:
                    self._status("ended")
                    return
                self._container = self._connect()  # loop: play it again
                continue
            if reason == "eof" and finite:  # its end is the end: fetching it again would loop forever
                self._status("ended")
                return
            if reason == "stalled":
                self._status("stalled", code="source_stalled",
                             message=f"no data for {self.stall_timeout:.1f}s")
            self._status("disconnected", reason=reason)
            if not self.reconnect:
                if reason == "eof":
                    self._status("ended")
                    return
                raise SourceError("source_stalled", f"{self.name}: {reason}", url=self.name)
            self._container = self._reconnect(reason)
            if self._container is None:
                return

    def _reconnect(self, reason: str):
        """Reconnect with capped exponential backoff; None if told to stop."""
        delay = self.backoff[0]
        attempt = 0
        while True:
            attempt += 1
            self._status("reconnecting", attempt=attempt, delay=delay)
            if self._stop.wait(delay):
                return None
            try:
                c = self._connect()
            except SourceError as e:
                if e.code in _FATAL:
                    raise
                if self.max_reconnects is not None and attempt >= self.max_reconnects:
                    code = "source_stalled" if reason == "stalled" else "unreachable_url"
                    raise SourceError(code, f"{self.name}: gave up after {attempt} reconnect "
                                      f"attempts ({e.message})", url=self.name) from None
                delay = min(self.backoff[1], delay * 2)
                continue
            if self.stopping:
                c.close()
                return None
            self.reconnects += 1
            self._status("connected", reconnects=self.reconnects, **self._via())
            return c
