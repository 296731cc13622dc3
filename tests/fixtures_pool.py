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
