"""The two types every source shares: a decoded `Frame` and `SourceError`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamvz.errors import StreamError

# Stable codes (documented in streamvz/sources/__init__.py; transports send them verbatim).
CODES = (
    "file_not_found", "not_a_video", "corrupt_video", "unsupported_codec", "empty_video",
    "resolution_too_large", "unreachable_url", "source_stalled", "decode_failed",
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: `t` seconds from the start of the source, `image` uint8 [H,W,3] RGB."""

    t: float
    image: np.ndarray


class SourceError(StreamError):
    """A video source failed; `code` is one of CODES, `details` may hold e.g. `last_good_t`."""

    def __init__(self, code: str, message: str, **details):
        if code not in CODES:
            raise ValueError(f"unknown source error code {code!r}")
        super().__init__(code, message, **details)
