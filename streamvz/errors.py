"""One exception type for everything a caller (and through the transports, a client) can be told.

`code` is a stable, lower_snake_case string that transports send verbatim in `error`
messages; `message` says what is wrong in words. Library code raises `StreamError`
(or plain ValueError for programming errors in arguments); transports catch
StreamError and forward `code`/`message`.
"""
from __future__ import annotations


class StreamError(Exception):
    """An error with a stable code that can be sent to a client."""

    def __init__(self, code: str, message: str, **details):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **self.details}
