"""What a client may make the server do: which sources it may open, how fast it may push.

A client never names an arbitrary file: a server-side source is a URL with an allowed
scheme, or a path that resolves (symlinks followed) inside one of the configured roots.
"""
from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from streamvz.errors import StreamError

NETWORK_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp")


@dataclass
class SourcePolicy:
    roots: list[Path] = field(default_factory=list)  # files a client may open live under these
    schemes: tuple[str, ...] = NETWORK_SCHEMES

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
            return source
        return self._check_path(source)

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


def token_ok(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
