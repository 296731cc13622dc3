"""Test videos made with PyAV: real encoded files and a live MPEG-TS sender.

A plain importable module (pytest puts tests/ on sys.path, so `from videos import ...`),
reused by every test that needs a clip. Frames carry their index as 12 black/white
bars (`pattern_frame` / `index_of`), which survives lossy coding, so tests can check
order and drops after a real encode/decode round trip.

    write_h264(path, 50, fps=25, size=(160, 96))        # 2 s pattern clip
    write_h264(path, frames_array, fps=2)                # your own frames [T,H,W,3]
    with MpegTsSender("tcp", port, n_frames=100): ...    # live MPEG-TS on loopback

Run `python tests/videos.py send --proto tcp --port N ...` for a sender process.
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np

BITS = 12  # index bars per frame: indices 0..4095


def pattern_frame(i: int, size: tuple[int, int] = (160, 96)) -> np.ndarray:
    """uint8 [H,W,3] RGB: top 2/3 = index `i` as BITS vertical bars, bottom = a moving gradient."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    top = 2 * h // 3
    for b in range(BITS):
        if (i >> b) & 1:
            img[:top, b * w // BITS:(b + 1) * w // BITS] = 255
    ramp = (np.arange(w, dtype=np.int32) * 4 + i * 8) % 256
    img[top:, :, 0] = ramp[None, :].astype(np.uint8)
    img[top:, :, 1] = 128
    return img


def index_of(image: np.ndarray) -> int:
    """Inverse of pattern_frame after lossy coding (and after any resize that keeps the layout)."""
    h, w = image.shape[:2]
    top = 2 * h // 3
    gray = image[: top, :, :].mean(axis=(0, 2))
    i = 0
    for b in range(BITS):
        lo, hi = b * w // BITS, (b + 1) * w // BITS
        margin = max(1, (hi - lo) // 4)  # skip bar edges, where coding blurs
        if gray[lo + margin:hi - margin].mean() > 128:
            i |= 1 << b
    return i


def _frames(frames_or_count, size) -> Iterable[np.ndarray]:
    if isinstance(frames_or_count, int):
        return (pattern_frame(i, size) for i in range(frames_or_count))
    return frames_or_count


def write_video(path, frames_or_count=50, fps: float = 25, size: tuple[int, int] = (160, 96),
                codec: str = "libx264", pix_fmt: str = "yuv420p", format: str | None = None,
                options: dict | None = None, container_options: dict | None = None) -> str:
    """Encode frames (an int = that many pattern frames, or uint8 [H,W,3] arrays) to `path`."""
    path = os.fspath(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w", format=format, options=container_options or {}) as out:
        st = out.add_stream(codec, rate=rate)
        st.width, st.height = size
        st.pix_fmt = pix_fmt
        st.options = options or {}
        for i, img in enumerate(_frames(frames_or_count, size)):
            if img.shape[1] != st.width or img.shape[0] != st.height:
                raise ValueError(f"frame {i} is {img.shape[1]}x{img.shape[0]}, stream is {size}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def write_h264(path, frames_or_count=50, fps: float = 25, size=(160, 96), faststart=False,
               gop: int | None = None, preset: str = "ultrafast", crf: int = 23) -> str:
    """libx264 in mp4. `faststart` puts the index first (so a truncated copy still opens)."""
    opts = {"preset": preset, "crf": str(crf)}
    if gop:
        opts["g"] = str(gop)
    return write_video(path, frames_or_count, fps, size, "libx264", options=opts,
                       container_options={"movflags": "faststart"} if faststart else None)


def write_mjpeg(path, frames_or_count=50, fps: float = 25, size=(160, 96)) -> str:
    """Motion JPEG in AVI (`path` should end in .avi)."""
    return write_video(path, frames_or_count, fps, size, "mjpeg", pix_fmt="yuvj420p",
                       options={"qscale": "3"})


def write_av1(path, frames_or_count=10, fps: float = 25, size=(160, 96)) -> str:
    """AV1 (SVT-AV1) in mp4: a codec decord's bundled FFmpeg 4.1 cannot decode."""
    return write_video(path, frames_or_count, fps, size, "libsvtav1", options={"preset": "12"})


def write_empty(path, size=(160, 96)) -> str:
    """A well-formed file with one H.264 video stream and zero frames (`path` should end in
    .avi: the mp4 muxer drops a track without samples, AVI keeps it)."""
    path = os.fspath(path)
    with av.open(path, "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        out.start_encoding()  # write the header even though no packet follows
    return path


def write_audio_only(path, seconds: float = 1.0) -> str:
    """A valid media file with no video stream (AAC in mp4)."""
    path = os.fspath(path)
    with av.open(path, "w") as out:
        st = out.add_stream("aac", rate=16000, layout="mono")
        n = 1024
        for k in range(int(seconds * 16000 / n)):
            t = (np.arange(n) + k * n) / 16000
            data = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            fr = av.AudioFrame.from_ndarray(data, format="fltp", layout="mono")
            fr.sample_rate = 16000
            fr.pts = k * n
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def truncate_copy(src, dst, fraction: float = 0.5) -> str:
    """Copy the first `fraction` of `src`'s bytes, as a download cut short would."""
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return os.fspath(dst)


def write_random_bytes(path, n: int = 64 * 1024, seed: int = 0) -> str:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return os.fspath(path)


# ---- live MPEG-TS on loopback -------------------------------------------------------

def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_mpegts(url: str, n_frames: int, fps: float, size=(160, 96), start_index: int = 0,
                realtime: bool = True, pause_at: int = -1, pause_s: float = 0.0,
                fmt: str = "mpegts", options: dict | None = None) -> None:
    """Encode pattern frames to `url` (udp://..., tcp://...?listen=1, or a file-like object),
    paced to real time: H.264 in MPEG-TS (every frame a keyframe, so a reader can join at
    any point), or fmt="mpjpeg" for MJPEG as IP cameras serve it over HTTP.
    `pause_at`/`pause_s`: go silent for pause_s seconds before frame pause_at (a stall)."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(url, "w", format=fmt, options=options or {}) as out:  # url: str or file-like
        if fmt == "mpjpeg":
            st = out.add_stream("mjpeg", rate=rate)
            st.pix_fmt = "yuvj420p"
        else:
            st = out.add_stream("libx264", rate=rate)
            st.pix_fmt = "yuv420p"
            st.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "1"}
        st.width, st.height = size
        t0 = time.monotonic()
        for k in range(n_frames):
            if k == pause_at:
                time.sleep(pause_s)
                t0 += pause_s
            if realtime:
                time.sleep(max(0.0, t0 + k / fps - time.monotonic()))
            fr = av.VideoFrame.from_ndarray(pattern_frame(start_index + k, size), format="rgb24")
            fr.pts = k
            fr.time_base = 1 / rate
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


class _SocketWriter:
    """File-like `write` onto a socket, for PyAV's custom-IO output."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def write(self, data) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


def serve_http(port: int, n_frames: int, fps: float, size=(160, 96), start_index: int = 0,
               fmt: str = "mpegts", **kw) -> None:
    """A one-client HTTP server on 127.0.0.1:port streaming like an IP camera: MPEG-TS
    (video/mp2t) or MJPEG (multipart/x-mixed-replace). FFmpeg's own HTTP server cannot be
    driven through PyAV's output (its options do not reach the protocol), so this is a
    minimal one: read the request, send the headers, let PyAV write the body."""
    with socket.create_server(("127.0.0.1", port)) as srv:
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            ctype = ("multipart/x-mixed-replace;boundary=ffmpeg" if fmt == "mpjpeg"
                     else "video/mp2t")
            conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Type: {ctype}\r\n"
                         f"Cache-Control: no-cache\r\n\r\n".encode())
            send_mpegts(_SocketWriter(conn), n_frames, fps, size, start_index, fmt=fmt, **kw)


class MpegTsSender:
    """A sender in a child process (so a test can kill it like a camera that dies).

    proto "tcp"/"http": the sender listens on 127.0.0.1:port (one client) and the reader
    connects to tcp://127.0.0.1:port or http://127.0.0.1:port; proto "udp": the sender
    sends to udp://127.0.0.1:port. fmt: "mpegts" (H.264) or "mpjpeg" (MJPEG, http only).
    """

    def __init__(self, proto: str, port: int, n_frames: int = 100, fps: float = 25,
                 size=(160, 96), start_index: int = 0, pause_at: int = -1, pause_s: float = 0.0,
                 fmt: str = "mpegts"):
        self.proto, self.port = proto, port
        self.args = [sys.executable, os.path.abspath(__file__), "send", "--proto", proto,
                     "--port", str(port), "--frames", str(n_frames), "--fps", str(fps),
                     "--size", f"{size[0]}x{size[1]}", "--start", str(start_index),
                     "--pause-at", str(pause_at), "--pause", str(pause_s), "--format", fmt]
        self.proc: subprocess.Popen | None = None

    @property
    def reader_url(self) -> str:
        return f"{self.proto}://127.0.0.1:{self.port}"

    def start(self, wait: float = 20.0) -> "MpegTsSender":
        """Start the sender and wait until it is about to listen/send (imports take a while)."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"sender did not start: {self.args}")
        time.sleep(0.05)  # from "ready" to listen() is a few FFmpeg calls
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(10)
            if self.proc.stdout:
                self.proc.stdout.close()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="send pattern frames as MPEG-TS on loopback")
    s.add_argument("--proto", choices=["tcp", "udp", "http"], default="tcp")
    s.add_argument("--format", choices=["mpegts", "mpjpeg"], default="mpegts")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--frames", type=int, default=100)
    s.add_argument("--fps", type=float, default=25)
    s.add_argument("--size", default="160x96")
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--pause-at", type=int, default=-1)
    s.add_argument("--pause", type=float, default=0.0)
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.split("x"))
    kw = dict(pause_at=a.pause_at, pause_s=a.pause, fmt=a.format)
    try:
        if a.proto == "http":
            serve_http(a.port, a.frames, a.fps, (w, h), a.start, **kw)
        else:
            url = (f"tcp://127.0.0.1:{a.port}?listen=1" if a.proto == "tcp"
                   else f"udp://127.0.0.1:{a.port}?pkt_size=1316")
            print("ready", flush=True)
            send_mpegts(url, a.frames, a.fps, (w, h), a.start, **kw)
    except (BrokenPipeError, ConnectionResetError, av.error.FFmpegError, OSError):
        pass  # the reader went away: normal end for a live sender


if __name__ == "__main__":
    _main()
