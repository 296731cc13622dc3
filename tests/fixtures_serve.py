"""Real parts for the serving tests: a mosquitto broker on a free port, headless chromium.

Import the fixtures into a test module (`from fixtures_serve import broker`); helpers are
plain classes so a test can stop and restart the broker mid-session.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, up: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if up:
                return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'}")


class Broker:
    """mosquitto 2.x (a real MQTT v5 broker) on 127.0.0.1:port, anonymous, no persistence."""

    def __init__(self, port: int | None = None, users: dict[str, str] | None = None, tls: bool = False,
                 acl: str | None = None):
        """`users`: require these username/passwords; `tls`: serve TLS with a fresh CA (`self.ca`);
        `acl`: a mosquitto acl_file (docs/mosquitto-acl.conf)."""
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mosq")
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        import getpass

        # `user`: as root, mosquitto would switch to user mosquitto, who cannot read our temp dir.
        conf = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence false",
                f"log_dest file {self.dir}/log", "max_packet_size 16777216"]
        if users:
            pw = os.path.join(self.dir, "passwd")
            open(pw, "w").close()
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", pw, user, password], check=True)
            os.chmod(pw, 0o600)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf.append("allow_anonymous true")
        if acl:
            conf.append(f"acl_file {acl}")
        self.ca = None
        if tls:
            self.ca = self._make_certs()
            conf += [f"cafile {self.ca}", f"certfile {self.dir}/server.crt", f"keyfile {self.dir}/server.key"]
        with open(self.conf, "w") as f:
            f.write("\n".join(conf) + "\n")

    def _make_certs(self) -> str:
        """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
        d = self.dir
        run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=streamvz test CA",
            "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", f"{d}/server.key",
            "-out", f"{d}/server.csr")
        with open(f"{d}/ext.cnf", "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{d}/ext.cnf", "-out", f"{d}/server.crt")
        return f"{d}/ca.crt"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
            wait_port(self.port, up=False)

    def pub(self, topic: str, message: str | None = None, file: str | None = None, props: list[str] = (), qos=1):
        """Stock mosquitto_pub, MQTT v5; props like ["response-topic", "x/y"] -> -D publish ..."""
        cmd = ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(self.port), "-t", topic, "-q", str(qos)]
        for i in range(0, len(props), 2):
            cmd += ["-D", "publish", props[i], *props[i + 1].split(" ", 1)] if props[i] == "user-property" \
                else ["-D", "publish", props[i], props[i + 1]]
        cmd += ["-f", file] if file else ["-m", message]
        subprocess.run(cmd, check=True, timeout=10)

    def sub(self, topic: str, count: int, timeout: int = 60) -> subprocess.Popen:
        """Stock mosquitto_sub printing `count` messages then exiting; read .stdout when done."""
        cmd = ["mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(self.port), "-t", topic,
               "-C", str(count), "-W", str(timeout), "-q", "1"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def broker():
    if MOSQUITTO is None or shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto not installed (make system-deps installs it)")
    b = Broker().start()
    yield b
    b.stop()


class Chromium:
    """Headless chromium driven over the DevTools protocol with the `websockets` package."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="chrome")
        self.proc = None
        self.ws = None
        self._id = 0

    async def start(self, url: str):
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={self.dir}", "--remote-debugging-port=0",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", url]
        self.proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.PIPE)
        browser_ws = None
        while browser_ws is None:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 60)
            if not line:
                raise RuntimeError("chromium exited before DevTools came up")
            m = re.search(rb"DevTools listening on (ws://\S+)", line)
            if m:
                browser_ws = m.group(1).decode()
        asyncio.ensure_future(self._drain())
        port = int(re.search(r":(\d+)/", browser_ws).group(1))
        page_ws = None
        for _ in range(100):  # the page target appears shortly after the browser
            targets = json.loads(await asyncio.to_thread(_http_get, port, "/json/list"))
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                page_ws = pages[0]["webSocketDebuggerUrl"]
                break
            await asyncio.sleep(0.1)
        import websockets

        self.ws = await websockets.connect(page_ws, max_size=None)
        return self

    async def _drain(self):
        while self.proc and await self.proc.stderr.readline():
            pass

    async def evaluate(self, expression: str):
        self._id += 1
        my = self._id
        await self.ws.send(json.dumps({"id": my, "method": "Runtime.evaluate",
                                       "params": {"expression": expression, "returnByValue": True}}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my:
                return msg.get("result", {}).get("result", {}).get("value")

    async def screenshot(self, path: str) -> str:
        """A PNG of the page as it is rendered now (DevTools Page.captureScreenshot)."""
        import base64

        self._id += 1
        my = self._id
        await self.ws.send(json.dumps({"id": my, "method": "Page.captureScreenshot", "params": {"format": "png"}}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my:
                with open(path, "wb") as f:
                    f.write(base64.b64decode(msg["result"]["data"]))
                return path

    async def stop(self):
        if self.ws is not None:
            await self.ws.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _http_get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


class ServerThread:
    """A real streamvz server (engine + websocket and/or MQTT transports) on its own thread and
    event loop, as in production; tests talk to it over real sockets from their own loop."""

    def __init__(self, model: str, *, ws: bool = True, broker_port: int | None = None, limits=None,
                 media_roots=(), grace_s: float = 30.0, token: str | None = None, tokens_per_frame: int = 8,
                 realtime_files: bool = False, engine_kwargs: dict | None = None, origins: list[str] | None = None,
                 mqtt_kwargs: dict | None = None, allow_private_sources: bool = False,
                 source_networks: tuple[str, ...] = ()):
        import threading

        self.model, self.ws, self.broker_port = model, ws, broker_port
        self.limits, self.media_roots, self.grace_s, self.token = limits, list(media_roots), grace_s, token
        self.tokens_per_frame, self.realtime_files = tokens_per_frame, realtime_files
        self.engine_kwargs = engine_kwargs or {}
        self.origins = origins
        self.mqtt_kwargs = mqtt_kwargs or {}
        self.allow_private_sources = allow_private_sources  # loopback test servers as sources need it
        self.source_networks = source_networks
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.loop = None
        self.port = None
        self.service = self.mqtt = None
        self.error = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.thread.start()
        if not self.ready.wait(120) or self.error:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def _main(self):
        try:
            asyncio.run(self._serve())
        except Exception as e:  # surfaced by start()
            self.error = e
            self.ready.set()

    async def _serve(self):
        from contextlib import AsyncExitStack
        from pathlib import Path

        from streamvz.engine import Engine
        from streamvz.protocol import Limits
        from streamvz.transports.mqtt import MqttServer
        from streamvz.transports.security import SourcePolicy
        from streamvz.transports.service import Service
        from streamvz.transports.ws import WsServer

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        limits = self.limits or Limits()
        engine = Engine(model=self.model, tokens_per_frame=self.tokens_per_frame, max_sessions=limits.max_sessions,
                        max_question_chars=limits.max_question_chars, max_new_tokens_limit=limits.max_new_tokens,
                        **self.engine_kwargs)
        self.service = Service(engine, limits, SourcePolicy(roots=[Path(r) for r in self.media_roots],
                                                            allow_private=self.allow_private_sources,
                                                            allow_networks=self.source_networks),
                               grace_s=self.grace_s, realtime_files=self.realtime_files)
        async with AsyncExitStack() as stack:
            if self.ws:
                srv = await stack.enter_async_context(WsServer(self.service, port=0, token=self.token, origins=self.origins))
                self.port = srv.port
            if self.broker_port:
                self.mqtt = await stack.enter_async_context(MqttServer(self.service, port=self.broker_port,
                                                                                **self.mqtt_kwargs))
                await asyncio.wait_for(self.mqtt.connected.wait(), 30)
            self.ready.set()
            await self._stop.wait()
            await self.service.aclose()
        await engine.aclose()

    def call(self, coro_fn, timeout: float = 60):
        """Run `coro_fn()` on the server's loop (to inspect its state) and return the result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def stop(self):
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(60)
