"""Decode in a thread, consume with `async for`: the bounded hand-off between the two.

A source subclass implements two blocking methods, both run off the event loop:
  _open()              check/connect; raise SourceError so `async with` fails up front
  _produce(emit)       decode and call emit(frame) per frame; return at the end;
                       emit returns False once the consumer has gone (stop then)
The queue between them is bounded. When it is full:
  drop_oldest=True  (live)  the oldest queued frame is discarded and counted in frames_dropped,
                            so the consumer always gets the freshest frames;
  drop_oldest=False (files) the decoder thread waits (backpressure): nothing is lost.
Leaving `async with` (or cancelling the consuming task) sets a stop flag that the decoder
checks between frames and while it waits on a full queue, so the thread ends promptly.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from .frame import Frame, SourceError

log = logging.getLogger(__name__)
StatusCallback = Callable[[dict], None]


class RateSampler:
    """Keep the first frame at or after each tick start + k/fps (None fps: keep all).
    After a gap (a stall, a reconnect) it resumes at the next tick after the gap."""

    done = False  # an open-ended sampler never runs out of ticks

    def __init__(self, fps: float | None, start: float = 0.0):
        self.fps, self.start = fps, start
        self.next = start

    def take(self, t: float) -> bool:
        if self.fps is None:
            return True
        if t < self.next - 1e-3:
            return False
        self.next = self.start + (math.floor((t - self.start) * self.fps + 1e-3) + 1) / self.fps
        return True


class _Channel:
    """Thread -> event loop queue with a drop-oldest or blocking policy."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int, drop_oldest: bool):
        self._loop, self._maxsize, self._drop_oldest = loop, maxsize, drop_oldest
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()  # touched only on the loop thread
        self._end: tuple[BaseException | None] | None = None  # set once the producer is done
        self.dropped = 0

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop already closed: nobody is listening any more
            pass

    # -- producer side (decoder thread) --
    def put(self, item: Frame, stop: threading.Event) -> bool:
        with self._cond:
            while len(self._items) >= self._maxsize:
                if stop.is_set():
                    return False
                if self._drop_oldest:
                    self._items.popleft()
                    self.dropped += 1
                else:
                    self._cond.wait(0.05)
            if stop.is_set():
                return False
            self._items.append(item)
        self._wake()
        return True

    def __len__(self) -> int:
        return len(self._items)  # a racy read is fine: it is a gauge

    def finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._end = (error,)
        self._wake()

    def release(self) -> None:
        """Wake a producer blocked on a full queue (after stop was set)."""
        with self._cond:
            self._cond.notify_all()

    # -- consumer side (event loop) --
    async def get(self) -> Frame | None:
        """Next frame; None at a clean end; raises the producer's error after its last frame."""
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify()
                    return item
                if self._end is not None:
                    if self._end[0] is not None:
                        raise self._end[0]
                    return None
                self._ready.clear()
            await self._ready.wait()


class ThreadedSource:
    """Async-iterable frame source whose decoding runs in a daemon thread."""

    name = "source"

    def __init__(self, *, queue_size: int, drop_oldest: bool,
                 on_status: StatusCallback | None = None, stop_timeout: float = 2.0):
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.queue_size, self.drop_oldest = queue_size, drop_oldest
        self.on_status = on_status
        self.stop_timeout = stop_timeout
        self.frames_read = 0  # frames decoded and sampled (handed to the queue or dropped)
        self.status: dict | None = None  # the latest status event
        self._chan: _Channel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- subclass API --
    def _open(self) -> None:
        raise NotImplementedError

    def _produce(self, emit: Callable[[Frame], bool]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release decoder resources; called on the decoder thread when it ends."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def frames_dropped(self) -> int:
        return self._chan.dropped if self._chan is not None else 0

    @property
    def frames_queued(self) -> int:
        """Frames decoded and waiting for the consumer: frames_read = taken + queued + dropped."""
        return len(self._chan) if self._chan is not None else 0

    def _status(self, event: str, **fields) -> None:
        """Report a status event (from any thread); the callback runs on the event loop."""
        msg = {"event": event, "source": self.name, "time": time.time(), **fields}
        self.status = msg
        log.info("%s: %s", self.name, msg)
        if self.on_status is None:
            return
        if self._loop is None:
            self._call_status(msg)
            return
        try:
            self._loop.call_soon_threadsafe(self._call_status, msg)
        except RuntimeError:
            pass

    def _call_status(self, msg: dict) -> None:
        try:
            self.on_status(msg)
        except Exception:  # a broken callback must not kill decoding
            log.exception("on_status callback failed")

    # -- async API --
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._chan = _Channel(self._loop, self.queue_size, self.drop_oldest)
        opened = self._loop.create_future()
        # The open (connect, retries) runs on the daemon decoder thread too: in the loop's default
        # executor a cancelled open would go on and hold the process at exit until it gave up.
        self._thread = threading.Thread(target=self._run, args=(opened,), name=f"decode:{self.name}", daemon=True)
        self._thread.start()
        try:
            await opened
        except asyncio.CancelledError:
            self._stop.set()
            raise

    def _resolve(self, fut: asyncio.Future, error: BaseException | None) -> None:
        def done():
            if not fut.done():
                fut.set_result(None) if error is None else fut.set_exception(error)
        try:
            self._loop.call_soon_threadsafe(done)
        except RuntimeError:  # loop closed: nobody waits any more
            pass

    def _run(self, opened: asyncio.Future) -> None:
        if not self._opened:
            try:
                self._open()
                self._opened = True
            except BaseException as e:  # raised from start(), where `async with` fails up front
                self._resolve(opened, e)
                self._chan.finish(e)
                return
        self._resolve(opened, None)
        error: BaseException | None = None

        def emit(frame: Frame) -> bool:
            if self._stop.is_set():
                return False
            self.frames_read += 1
            return self._chan.put(frame, self._stop)

        try:
            self._produce(emit)
        except SourceError as e:
            error = e
        except Exception as e:  # a decoder bug or an FFmpeg error nobody classified
            log.exception("decoder thread failed")
            error = SourceError("decode_failed", f"{type(e).__name__}: {e}")
        finally:
            try:
                self._close()
            finally:
                self._chan.finish(error)

    async def aclose(self) -> None:
        """Stop the decoder thread and wait (up to stop_timeout) for it to end."""
        self._stop.set()
        if self._chan is not None:
            self._chan.release()
        t = self._thread
        if t is None:
            if self._opened:
                await asyncio.to_thread(self._close)
            return
        deadline = time.monotonic() + self.stop_timeout
        while t.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if t.is_alive():  # blocked in a network read: it ends at its read timeout (a daemon: exit never waits)
            log.info("%s: decoder thread still in a blocking read; it exits on its own", self.name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Frame:
        if self._thread is None:
            await self.start()
        frame = await self._chan.get()
        if frame is None:
            raise StopAsyncIteration
        return frame
