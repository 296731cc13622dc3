"""A real camera for the CLI tests: the ffmpeg program (Debian's ffmpeg, installed by
`make system-deps`) streaming a test pattern in real time, and a `live` process to watch it.

    with FfmpegCamera() as cam:            # HTTP MPEG-TS server on a free port, one client
        with LiveProcess(model, cam.url, "--watch", "What is shown?") as live:
            live.wait_for("camera connected")
            cam.kill()                       # the camera dies
            live.wait_for("reconnecting")
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

FFMPEG = shutil.which("ffmpeg")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FfmpegCamera:
    """`ffmpeg -re` encoding lavfi's testsrc2 to H.264 MPEG-TS, served over HTTP (listen mode)."""

    def __init__(self, fps: int = 10, size: str = "160x96", port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi",
                     "-i", f"testsrc2=size={size}:rate={fps}", "-c:v", "libx264", "-preset", "ultrafast",
                     "-tune", "zerolatency", "-g", str(fps), "-f", "mpegts", "-listen", "1", self.url]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FfmpegCamera":
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


class LiveProcess:
    """`run_stream.py live ...` in a child process. stdin: "pty" (a pseudo-terminal that is its
    controlling terminal, so typing ^C sends SIGINT as a real Ctrl-C does) or None (no stdin:
    /dev/null and --no-stdin). stdout/stderr are collected line by line."""

    def __init__(self, *args: str, stdin: str | None = "pty", command: str = "live"):
        self.args = [sys.executable, str(ROOT / "run_stream.py"), command, *args]
        self.stdin = stdin
        self.master = None
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LiveProcess":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if self.stdin == "pty":
            self.master, slave = pty.openpty()
            self.proc = subprocess.Popen(self.args, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True, env=env, cwd=ROOT,
                                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
            os.close(slave)
        else:
            args = self.args + (["--no-stdin"] if self.args[2] == "live" else [])
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd=ROOT)
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()
        return self

    def _collect(self, stream, lines: list[str]) -> None:
        """Lines end at \n or \r (a progress bar redraws its line with \r)."""
        buf = b""
        while chunk := stream.read1(65536):
            *done, buf = re.split(rb"[\r\n]", buf + chunk)
            with self._cond:
                lines.extend(d.decode("utf-8", "replace") for d in done if d)
                self._cond.notify_all()
        with self._cond:
            if buf:
                lines.append(buf.decode("utf-8", "replace"))
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120, stream: str = "out") -> re.Match:
        """The first line (stdout, or stderr) matching `pattern`; fails if the process exits first."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line matching {pattern!r} ({'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'timed out'})"
                                         f"\nstdout:\n" + "\n".join(self.out[-30:]) + "\nstderr:\n" + "\n".join(self.err[-30:]))
                self._cond.wait(min(left, 0.5))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ctrl_c(self) -> None:
        """^C typed on the terminal: the line discipline sends SIGINT to the foreground group."""
        self.type("\x03")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> tuple[int | None, float]:
        """(return code or None if still running after `timeout`, seconds waited)."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
