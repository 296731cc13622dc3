"""What the model sees, for people: the latest frame and thumbnails of the recent frames.

The web page shows them so a user can tell which picture an answer is about. Recording a
frame is cheap (a strided thumbnail copy and a reference to the latest image), because it
happens on the event loop for every frame; the JPEG encoding happens only when a client asks
(`preview` op), in a worker thread.
"""
from __future__ import annotations

import base64
import io
from collections import deque

import numpy as np

STRIP = 32  # thumbnails kept (and sent at most): the most recent frames of the window
THUMB_PX = 96  # longest side of a thumbnail (about: a strided copy, not a resize)
LATEST_PX = 480  # longest side of the latest frame as sent


class Previews:
    def __init__(self, keep: int = STRIP):
        self._thumbs: deque[tuple[float, np.ndarray]] = deque(maxlen=keep)
        self._latest: tuple[float, np.ndarray] | None = None

    def add(self, image: np.ndarray, t: float) -> None:
        """Record a frame the session took in (uint8 [H, W, 3] RGB, `t` seconds)."""
        step = max(1, -(-max(image.shape[:2]) // THUMB_PX))
        self._thumbs.append((float(t), np.ascontiguousarray(image[::step, ::step])))
        self._latest = (float(t), image)

    def pick(self, frames_in_window: int) -> tuple:
        """What to show: (latest, window), taken on the event loop that records frames (a copy of
        the list, so the encoding thread never iterates a deque the loop appends to)."""
        n = min(frames_in_window, len(self._thumbs))
        return self._latest, list(self._thumbs)[len(self._thumbs) - n:] if n else []


def render(latest, window) -> dict:
    """{"latest": {"t", "jpeg"} | None, "window": [{"t", "jpeg"}, ...] oldest first}; JPEG as base64.
    Blocking (PIL): call it in a thread."""
    shown = None
    if latest is not None:
        t, image = latest
        shown = {"t": round(t, 3), "jpeg": _jpeg(image, LATEST_PX, 80)}
    return {"latest": shown, "window": [{"t": round(t, 3), "jpeg": _jpeg(img, THUMB_PX, 70)} for t, img in window]}


def _jpeg(image: np.ndarray, longest: int, quality: int) -> str:
    from PIL import Image

    img = Image.fromarray(image)
    if max(img.size) > longest:
        img.thumbnail((longest, longest))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")
