"""Real pool workers for the scale-out tests and bench: `run_stream.py worker` subprocesses
behind a real mosquitto, and a reader of their retained announcements (streamvz/workers/+)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """One `run_stream.py worker` process; its stderr goes to a file shown when a test fails."""

    def __init__(self, broker_port: int, model: str, worker_id: str, group: str | None = "g", max_sessions: int = 3,
                 keepalive: int = 2, extra: tuple[str, ...] = ()):
        self.id = worker_id
        self.log = tempfile.NamedTemporaryFile(prefix=f"worker-{worker_id}-", suffix=".log", delete=False)
        # group None: a plain `serve --transport mqtt` (one server, no pool), for the will test
        how = ["worker", "--group", group] if group is not None else ["serve", "--transport", "mqtt"]
        cmd = [sys.executable, str(ROOT / "run_stream.py"), "-v", *how, "--broker", f"mqtt://127.0.0.1:{broker_port}",
               "--worker-id", worker_id, "--model", model, "--tokens-per-frame", "8",
               "--max-sessions", str(max_sessions), "--keepalive", str(keepalive), "--mqtt-idle", "0", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def kill(self):
        """SIGKILL: no clean DISCONNECT, so the broker publishes the worker's will."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]


class PoolWatch:
    """Subscribes streamvz/workers/+ and keeps each worker's latest announcement."""

    def __init__(self, port: int, prefix: str = "streamvz"):
        self.port, self.prefix = port, prefix
        self.workers: dict[str, dict] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self):
        self.client = aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5)
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.prefix}/workers/+", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc):
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.__aexit__(*exc)

    async def _read(self):
        async for m in self.client.messages:
            if m.payload:
                info = json.loads(m.payload)
                self.workers[info["worker"]] = info
                self._changed.set()

    async def until(self, ok, timeout: float = 120.0) -> dict[str, dict]:
        """Wait until ok(workers) holds; returns the announcements."""
        async def loop():
            while not ok(self.workers):
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)
        return self.workers


def up(*ids):
    return lambda ws: all(ws.get(i, {}).get("state") == "up" for i in ids)


class LoopThread:
    """Runs `main(stop_event)` (a coroutine function) on its own thread and event loop, as a
    separate server would; `start()` returns once main has set `self.ready`."""

    def __init__(self, main):
        import threading

        self.main, self.ready, self.error = main, threading.Event(), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop = self._stop = None

    def _run(self):
        async def run():
            self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.main(self)
        try:
            asyncio.run(run())
        except Exception as e:
            self.error = e
            self.ready.set()

    def start(self):
        self.thread.start()
        if not self.ready.wait(180) or self.error:
            raise RuntimeError(f"did not start: {self.error!r}")
        return self

    async def until_stopped(self):
        await self._stop.wait()

    def stop(self):
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(60)


def pool_worker_thread(model: str, broker_port: int, worker_id: str, limits, media_roots=(), group: str = "g",
                       grace_s: float = 30.0) -> LoopThread:
    """A pool worker in this process (engine + Service + PoolWorker) with the caller's Limits."""
    async def main(t):
        from streamvz.engine import Engine
        from streamvz.transports.pool import PoolWorker
        from streamvz.transports.security import SourcePolicy
        from streamvz.transports.service import Service

        engine = Engine(model=model, tokens_per_frame=8, max_sessions=limits.max_sessions,
                        max_question_chars=limits.max_question_chars, max_new_tokens_limit=limits.max_new_tokens)
        # loopback test servers serve as sources: the private-address guard is switched off, as --allow-private-sources
        service = Service(engine, limits, SourcePolicy(roots=[Path(r) for r in media_roots], allow_private=True),
                          grace_s=grace_s,
                          realtime_files=False)
        async with PoolWorker(service, port=broker_port, group=group, worker_id=worker_id, idle_s=None) as w:
            await asyncio.wait_for(w.connected.wait(), 30)
            t.ready.set()
            await t.until_stopped()
            await service.aclose()
        await engine.aclose()
    return LoopThread(main)


def gateway_thread(broker_port: int, limits, media_roots=(), grace_s: float = 30.0) -> LoopThread:
    """`serve --transport ws --backend mqtt://...` in this process; `.url`/`.http` as ServerThread."""
    async def main(t):
        from pipelines.ws_chat import ServeConfig, serve

        cfg = ServeConfig(port=0, backend=("127.0.0.1", broker_port), limits=limits, grace_s=grace_s,
                          media_roots=[str(r) for r in media_roots], allow_private_sources=True)
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(None, cfg, ready, t._stop))
        t.port = await ready
        t.url, t.http = f"ws://127.0.0.1:{t.port}/ws", f"http://127.0.0.1:{t.port}"
        t.ready.set()
        await task
    return LoopThread(main)
