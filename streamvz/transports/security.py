"""What a client may make the server do: which sources it may open, how fast it may push.

A client never names an arbitrary file: a server-side source is a URL with an allowed
scheme, or a path that resolves (symlinks followed) inside one of the configured roots.
Nor an arbitrary host: unless the operator allows it (`allow_private`, or the networks in
`allow_networks`, e.g. the camera LAN but not the cloud metadata address), a URL whose host is
or resolves to a loopback, private, link-local or otherwise non-public address is refused,
and so is an HTTP redirect to one -- else a client could make the server probe its own
network (SSRF). The check resolves the name once; a DNS answer that changes between the
check and the connection (rebinding) is not caught here: firewall the server for that.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from streamvz.errors import StreamError

NETWORK_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp")


@dataclass
class SourcePolicy:
    roots: list[Path] = field(default_factory=list)  # files a client may open live under these
    schemes: tuple[str, ...] = NETWORK_SCHEMES
    allow_private: bool = False  # allow hosts on loopback/private/link-local networks (--allow-private-sources)
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed although not public (--allow-source-network)

    def check(self, source: str) -> str:
        """Client-given source -> what to open (a URL, or a resolved absolute path)."""
        if "\x00" in source or any(ord(c) < 32 for c in source):
            raise StreamError("source_not_allowed", "source contains control characters")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in source):  # no file system or URL parser takes these
            raise StreamError("source_not_allowed", "source is not valid Unicode (a lone surrogate)")
        parts = urlsplit(source)
        if parts.scheme and len(parts.scheme) > 1:  # len 1: a Windows drive letter, i.e. a path
            scheme = parts.scheme.lower()
            if scheme == "file":
                return self._check_path(parts.path)
            if scheme not in self.schemes:
                raise StreamError("source_not_allowed", f"scheme {scheme!r} is not allowed; allowed: {list(self.schemes)}")
            if not parts.hostname:
                raise StreamError("source_not_allowed", "a source URL needs a host")
            host = parts.hostname.lower()
            if not self.allow_private and not self.allow_networks and (host == "localhost"
                                                                       or host.endswith(".localhost")):
                raise StreamError("source_not_allowed", _PRIVATE)
            if _is_address(host) and not self._allowed(host):
                raise StreamError("source_not_allowed", _PRIVATE)
            return source
        return self._check_path(source)

    def check_network(self, source: str, max_redirects: int = 5, timeout: float = 5.0) -> str:
        """Blocking (the service runs it on a thread, when the source starts, so a slow DNS
        answer holds up no transport): `check`, then resolve the URL's host and refuse
        non-public addresses; for HTTP(S) follow redirects here, checking each hop, and
        return the final URL (the decoder then opens that one)."""
        source = self.check(source)
        if self.allow_private or "://" not in source or urlsplit(source).scheme.lower() == "file":
            return source
        for _ in range(max_redirects + 1):
            parts = urlsplit(source)
            if parts.scheme.lower() not in self.schemes or not parts.hostname:
                raise StreamError("source_not_allowed", "a redirect left the allowed schemes")
            self._check_host(parts.hostname, parts.port)
            if parts.scheme.lower() not in ("http", "https"):
                return source
            target = _redirect_target(source, timeout)
            if target is None:
                return source
            source = target
        raise StreamError("unreachable_url", "the source could not be opened (too many redirects)")

    def _allowed(self, addr: str) -> bool:
        if self.allow_private:
            return True
        try:
            ip = _ip(addr)
        except ValueError:
            ip = ipaddress.IPv4Address(socket.inet_aton(addr))
        return not _non_public(ip) or any(ip in ipaddress.ip_network(n, strict=False) for n in self.allow_networks)

    def _check_host(self, host: str, port: int | None) -> None:
        try:
            infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            # Said the same way as any other failure to open: no hint what the name resolves to.
            raise StreamError("unreachable_url", "the source could not be opened") from None
        if not all(self._allowed(info[4][0]) for info in infos):
            raise StreamError("source_not_allowed", _PRIVATE)

    def _check_path(self, path: str) -> str:
        if not self.roots:
            raise StreamError("source_not_allowed", "this server opens no files (no --media-root configured)")
        p = Path(path)
        candidates = [p] if p.is_absolute() else [root / p for root in self.roots]
        for cand in candidates:
            real = Path(os.path.realpath(cand))  # follows every symlink, collapses ../
            for root in self.roots:
                root_real = Path(os.path.realpath(root))
                if real == root_real or root_real in real.parents:
                    if not real.is_file():
                        raise StreamError("source_not_allowed", f"{path!r} is not a file under the media roots")
                    return str(real)
        raise StreamError("source_not_allowed", f"{path!r} is outside the allowed media roots")

    def list_files(self, exts=(".mp4", ".mkv", ".webm", ".avi", ".mov")) -> list[str]:
        """Relative names of videos under the first root (for the web page's picker)."""
        if not self.roots:
            return []
        root = self.roots[0]
        out = []
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.lower().endswith(exts):
                    out.append(os.path.relpath(os.path.join(dirpath, f), root))
        return sorted(out)[:200]


_PRIVATE = ("the source's host is on a loopback, private or link-local network; "
            "the server opens only public hosts unless started with --allow-private-sources")


def _ip(addr: str):
    ip = ipaddress.ip_address(addr.strip("[]").split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def _non_public(ip) -> bool:
    return not ip.is_global or ip.is_multicast


def _is_address(host: str) -> bool:
    """An address literal, including the legacy IPv4 forms resolvers take (127.1, 2130706433,
    0x7f000001, 017700000001): those are refused at `open`, without any DNS."""
    try:
        _ip(host)
        return True
    except ValueError:  # a name, or a legacy form
        pass
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # surface the 3xx to us instead of following it unchecked


def _http_head(url: str, timeout: float):
    """(status, headers) of a GET at `url`, redirects not followed, body not read; None on failure."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        e.close()
        return e.code, e.headers
    except (OSError, ValueError):
        return None  # the decoder will fail on it too, with the one generic message


def _redirect_target(url: str, timeout: float) -> str | None:
    """The Location of an HTTP redirect at `url`, or None when it answers otherwise."""
    head = _http_head(url, timeout)
    location = head[1].get("Location") if head and 300 <= head[0] < 400 else None
    return urljoin(url, location) if location else None


class TokenBucket:
    """Frames per second cap: `rate` per second with a burst of one second's worth."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()
        self.last_warned = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def should_warn(self) -> bool:
        """At most one rate_limited error a second, so a flood does not echo back as one."""
        now = time.monotonic()
        if now - self.last_warned >= 1.0:
            self.last_warned = now
            return True
        return False


def client_key(address: str) -> str:
    """Who counts as one client for the per-client session cap. An IPv6 host usually holds a
    whole /64 and can switch addresses inside it at will, so the /64 is the client."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def token_ok(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def check_resume(msg: dict, secret: str | None, attached: bool) -> None:
    """A resume (`open` with `session`) must carry its session's owner secret (`secret`: None when no
    such session is held for this transport) and nothing else, and find the session detached.
    Unknown, closed and wrong-secret read alike: a session id alone, seen in a log or guessed,
    opens nothing."""
    if secret is None or not hmac.compare_digest(secret.encode(), str(msg.get("resume", "")).encode()):
        raise StreamError("unknown_session", f"no session {msg['session']!r} to resume (closed, expired, "
                          "or not this `resume` secret)")
    extra = set(msg) - {"op", "v", "session", "resume"}
    if extra:  # a resumed session keeps its source, fps and system prompt
        raise StreamError("bad_field", f"resuming takes only `session` and `resume`, not {sorted(extra)}",
                          field=sorted(extra)[0])
    if attached:
        raise StreamError("session_in_use", "the session is attached to another connection")
