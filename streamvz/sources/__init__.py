"""Video ingest: files (decord), live streams (PyAV), one async frame interface.

    async with open_source("clip.mp4", fps=2) as src:          # or rtsp://, udp://, /dev/video0
        async for frame in src:                                  # Frame(t, image uint8 [H,W,3] RGB)
            ...
    src.frames_read, src.frames_dropped, src.status               # counters, latest status event

Decoding runs in a daemon thread behind a bounded queue. Files apply backpressure and
never drop; live sources drop the oldest queued frame when the consumer is slower than
real time and count it in `frames_dropped`. Leaving `async with` (or cancelling the
consuming task) stops the decoder thread.

Status events go to `on_status(dict)` (called on the event loop) and `src.status`:
    {"event": "connected" | "disconnected" | "reconnecting" | "stalled" | "warning" | "ended",
     "source": name, "time": unix seconds, ...}  plus e.g. "attempt", "delay", "code", "message".

Errors: `SourceError(code, message, **details)`, a `streamvz.errors.StreamError`. Codes:
    file_not_found        the path does not exist or is not a readable file
    not_a_video           not a media container FFmpeg recognises, or it has no video stream
    corrupt_video         a recognised container that cannot be parsed (e.g. mp4 cut before its
                          index), or decoding fails part way; frames before the damage are
                          yielded first, then this error with details["last_good_t"]
                          (FileSource(on_corrupt="warn") sends a "warning" status and ends instead)
    unsupported_codec     no decoder for the video codec (decoder="decord" on e.g. AV1)
    empty_video           0-byte file, no streams, a video stream with no frames, or nothing
                          in the requested [start, end)
    resolution_too_large  width*height above max_pixels (default 7680*4320)
    unreachable_url       a live URL/device could not be opened (after the open retries)
    source_stalled        a live source stopped delivering (no data for stall_timeout, or
                          the connection failed) and reconnect=False, or reconnecting failed
                          max_reconnects times in a row
    decode_failed         anything else FFmpeg reported while decoding
"""
from __future__ import annotations

import os

from .file import DEFAULT_MAX_PIXELS, FileSource, VideoInfo, probe
from .frame import CODES, Frame, SourceError
from .live import LiveSource
from .stream import ThreadedSource

__all__ = ["open_source", "FileSource", "LiveSource", "Frame", "SourceError", "CODES",
           "VideoInfo", "probe", "ThreadedSource", "DEFAULT_MAX_PIXELS", "is_live_url"]

_LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://",
                 "srt://", "rtp://")


def is_live_url(url_or_path: str) -> bool:
    s = str(url_or_path)
    return s.lower().startswith(_LIVE_SCHEMES) or s.startswith("/dev/video")


def open_source(url_or_path, fps: float | None = None, *, realtime: bool = False, **kwargs):
    """A FileSource for a local path, a LiveSource for a URL or capture device.
    `realtime=True` plays a local file as a live source (paced to its timestamps)."""
    s = os.fspath(url_or_path)
    if realtime or is_live_url(s):
        return LiveSource(s, fps, realtime=realtime, **kwargs)
    return FileSource(s, fps, **kwargs)
