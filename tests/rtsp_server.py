"""A minimal RTSP server that offers RTP over UDP only (as some cameras do): it answers a
SETUP that asks for RTP over TCP (interleaved) with 461 Unsupported Transport. Video comes
from the ffmpeg program (Motion JPEG over RTP, RFC 2435), started at PLAY and sent to the
client's UDP port. Enough of RFC 2326 for FFmpeg's RTSP client; loopback only.

    with UdpOnlyRtspServer() as cam:
        cam.url                        # rtsp://127.0.0.1:PORT/cam
        cam.setups                     # the Transport headers the clients asked for
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading

FFMPEG = shutil.which("ffmpeg")
SDP = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=streamvz test camera\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=video 0 RTP/AVP 26\r\na=control:track0\r\n")


class UdpOnlyRtspServer:
    def __init__(self, fps: int = 10, size: str = "160x96"):
        self.fps, self.size = fps, size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.setups: list[str] = []  # Transport header of every SETUP received
        self._senders: list[subprocess.Popen] = []
        self._closed = False

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._closed = True
        self.sock.close()
        for p in self._senders:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, sender = b"", None
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        if sender is not None and sender.poll() is None:
                            sender.kill()  # the client went away: stop streaming to it
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, url = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:] if ":" in h)}
                n = int(headers.get("content-length", 0))
                while len(buf) < n:
                    buf += conn.recv(4096)
                buf = buf[n:]
                reply, body = {"CSeq": headers.get("cseq", "0")}, ""
                status = "200 OK"
                if method == "OPTIONS":
                    reply["Public"] = "OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER"
                elif method == "DESCRIBE":
                    reply.update({"Content-Type": "application/sdp", "Content-Base": self.url + "/"})
                    body = SDP
                elif method == "SETUP":
                    transport = headers.get("transport", "")
                    self.setups.append(transport)
                    ports = re.search(r"client_port=(\d+)-(\d+)", transport)
                    if "TCP" in transport.upper() or not ports:
                        status = "461 Unsupported Transport"
                    else:
                        client_rtp = int(ports.group(1))
                        reply["Transport"] = (f"RTP/AVP;unicast;client_port={ports.group(1)}-{ports.group(2)};"
                                              "server_port=6970-6971")
                        reply["Session"] = "4242;timeout=60"
                elif method == "PLAY":
                    reply["Session"] = "4242"
                    if sender is None:
                        sender = self._send(client_rtp)
                elif method == "TEARDOWN":
                    if sender is not None and sender.poll() is None:
                        sender.kill()
                elif method != "GET_PARAMETER":
                    status = "405 Method Not Allowed"
                msg = f"RTSP/1.0 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in reply.items())
                msg += f"Content-Length: {len(body)}\r\n\r\n{body}"
                conn.sendall(msg.encode("latin-1"))

    def _send(self, port: int) -> subprocess.Popen:
        p = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi",
                              "-i", f"testsrc2=size={self.size}:rate={self.fps}", "-c:v", "mjpeg",
                              "-pix_fmt", "yuvj420p", "-huffman", "default", "-q:v", "5", "-f", "rtp",
                              f"rtp://127.0.0.1:{port}?rtcpport={port + 1}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._senders.append(p)
        return p
