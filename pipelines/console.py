"""The terminal side of the CLI commands: stopping on a signal, and reading typed lines.

`Stopper`: the first SIGINT/SIGTERM (Ctrl-C) says so on stderr and runs the command's own
stop (cancel its task, or set serve's stop event), so the command cleans up as it does at
a normal end; a second signal exits at once. A clean stop that takes longer than `grace_s`
(a decoder thread stuck in a C call, say) is ended the same way, so one Ctrl-C always stops.

`quiet_libraries()`: no library deprecation notices or weight-loading bars on the console.

`StdinLines`: lines typed on stdin as an async iterator. The event loop watches the
descriptor (terminal or pipe); nothing blocks in a thread that shutdown would wait for
(`run_in_executor(None, sys.stdin.readline)` held the process after Ctrl-C until Enter).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import warnings
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def say(text: str) -> None:
    """One line to stderr with a plain write(2): safe inside a signal handler, where print()
    may hit a reentrant call on the stream the main thread was writing."""
    try:
        os.write(2, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class Stopper:
    """`with Stopper() as stopper:` around the whole command; `attach(loop, on_stop)` once the loop
    runs (`on_stop` may be replaced later, e.g. by serve's stop event). `signum`: what stopped us."""

    def __init__(self, grace_s: float = 8.0):
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_stop: Callable[[], None] = lambda: None
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def attach(self, loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]) -> None:
        self.loop, self.on_stop = loop, on_stop

    def __enter__(self) -> "Stopper":
        # signal.signal, not loop.add_signal_handler: a Python handler also runs while the loop
        # is busy in synchronous code (loading the model), and it can always force the exit.
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            say(f"streamvz: second {signal.Signals(signum).name}: exiting now")
            os._exit(128 + signum)
        self.signum = signum
        say(f"\nstreamvz: {signal.Signals(signum).name} received, stopping"
            " (press Ctrl-C again to exit at once)")
        if self.loop is None:  # nothing started yet, nothing to clean up
            os._exit(128 + signum)
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()
        try:
            self.loop.call_soon_threadsafe(lambda: self.on_stop())  # the on_stop of that moment
        except RuntimeError:  # the loop is already closed: we are on the way out anyway
            pass

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace_s)
        say(f"streamvz: still stopping after {self.grace_s:g} s: exiting now")
        os._exit(self.exit_code)


class StdinLines:
    """`async with StdinLines() as lines: async for line in lines:` (stripped, non-empty)."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._buf = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False

    async def __aenter__(self) -> "StdinLines":
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_reader(self.fd, self._readable)
            self._watching = True
        except (OSError, ValueError, NotImplementedError):
            # A regular file cannot be watched (epoll refuses it); it never blocks either, so a
            # daemon thread reads it, and a daemon thread never holds the process at exit.
            threading.Thread(target=self._read_all, name="stdin", daemon=True).start()
        return self

    async def __aexit__(self, *exc) -> None:
        if self._watching:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._feed(data)
        if not data and self._watching:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def _read_all(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            try:
                self._loop.call_soon_threadsafe(self._feed, data)
            except RuntimeError:  # loop closed
                return
            if not data:
                return

    def _feed(self, data: bytes) -> None:
        """Bytes read (b"" at the end) -> complete lines on the queue, then None at the end."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if not data:
            lines, self._buf = lines + [self._buf], b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._queue.put_nowait(line)
        if not data:
            self._queue.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        line = await self._queue.get()
        if line is None:
            self._queue.put_nowait(None)  # later readers see the end too
            raise StopAsyncIteration
        return line


def quiet_libraries() -> None:
    """No library chatter on a user's console (without -v): deprecation notices from transformers
    and torch are about how streamvz calls them, which a user cannot act on, and weight-loading
    progress bars say nothing. Our own warnings and errors still show."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|huggingface_hub)\.")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
