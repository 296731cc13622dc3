"""Protocol v1 validation: every malformed or hostile message maps to its documented code."""
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.protocol import Limits, parse_frame, parse_message
from streamvz.transports.security import SourcePolicy, TokenBucket

LIM = Limits(max_message_bytes=1024, max_frame_bytes=200_000, max_frame_pixels=640 * 480, max_question_chars=50)


def code_of(fn, *a):
    with pytest.raises(StreamError) as ei:
        fn(*a)
    return ei.value.code


@pytest.mark.parametrize("raw,code", [
    ("{not json", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    ('{"op": "ask", "id": "a", "text": NaN}', "bad_json"),
    ("[1, 2]", "bad_message"),
    ('"open"', "bad_message"),
    ('{"op": 7}', "bad_message"),
    ('{"op": "explode"}', "unknown_op"),
    ('{"op": "open", "v": 2}', "unsupported_version"),
    ('{"op": "open", "v": true}', "unsupported_version"),
    ('{"op": "ask", "text": "hi"}', "missing_field"),
    ('{"op": "ask", "id": "a"}', "missing_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "eval": "__import__(\'os\')"}', "unknown_field"),
    ('{"op": "ask", "id": 5, "text": "hi"}', "bad_field"),
    ('{"op": "ask", "id": "a b/c", "text": "hi"}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": ["hi"]}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "   "}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "max_tokens": "10"}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "max_tokens": true}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "max_tokens": 100000}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "max_tokens": 2.5}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "hi", "temperature": -1}', "bad_field"),
    ('{"op": "ask", "id": "a", "text": "' + "x" * 51 + '"}', "question_too_long"),
    ('{"op": "open", "fps": 0}', "bad_field"),
    ('{"op": "open", "session": "../../etc"}', "bad_field"),
    ('{"op": "cancel"}', "missing_field"),
    ("[" * 100000, "message_too_large"),
    ('{"op": "status", "pad": "' + "x" * 2000 + '"}', "message_too_large"),
    ('{"op": "ask", "id": "a", "text": "' + "\u00e9" * 600 + '"}', "message_too_large"),  # 600 chars, 1200 bytes
])
def test_bad_messages(raw, code):
    assert code_of(parse_message, raw, LIM) == code
    assert code in protocol.ERROR_CODES


def test_deep_nesting_is_bad_json_not_a_crash():
    assert code_of(parse_message, "[" * 900 + "]" * 900, Limits()) in ("bad_message", "bad_json")
    assert code_of(parse_message, '{"op":' + "[" * 20000 + "]" * 20000 + "}", Limits()) == "bad_json"


def test_good_messages_are_cleaned():
    m = parse_message('{"op": "ask", "v": 1, "id": "r1", "text": "what?", "max_tokens": 8}', LIM)
    assert m == {"op": "ask", "id": "r1", "text": "what?", "max_tokens": 8}
    assert parse_message(b'{"op": "open", "fps": 2}', LIM) == {"op": "open", "fps": 2}
    assert parse_message('{"op": "status"}', LIM) == {"op": "status"}


def jpeg(w=32, h=24, color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_frames_roundtrip():
    f = parse_frame(jpeg(), LIM)
    assert f.image.shape == (24, 32, 3) and f.image.dtype == np.uint8 and f.t is None
    assert abs(int(f.image[..., 0].mean()) - 200) < 8
    img = np.zeros((10, 12, 3), np.uint8)
    img[..., 1] = 255
    f = parse_frame(protocol.encode_frame(img, t=3.25), LIM)
    assert f.t == 3.25 and f.image.shape == (10, 12, 3) and f.image[..., 1].min() > 240
    hdr = json.dumps({"t": 1.0, "format": "raw", "width": 4, "height": 2}).encode()
    raw = bytes(range(24))
    f = parse_frame(protocol.FRAME_MAGIC + struct.pack(">I", len(hdr)) + hdr + raw, LIM)
    assert f.image.tolist() == np.frombuffer(raw, np.uint8).reshape(2, 4, 3).tolist()


def _with_header(h: dict | bytes, payload=b""):
    hb = h if isinstance(h, bytes) else json.dumps(h).encode()
    return protocol.FRAME_MAGIC + struct.pack(">I", len(hb)) + hb + payload


@pytest.mark.parametrize("data,code", [
    (b"GIF89a" + b"\0" * 100, "bad_frame"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "bad_frame"),
    (b"\xff\xd8\xff\xe0" + b"garbage" * 20, "bad_frame"),
    (b"", "bad_frame"),
    (b"SVZ1\x00", "bad_frame"),
    (b"SVZ1\xff\xff\xff\xff{}", "bad_frame"),
    (_with_header(b"[1]"), "bad_frame"),
    (_with_header(b"{oops"), "bad_frame"),
    (_with_header({"t": "soon"}), "bad_frame"),
    (_with_header({"t": 1, "cmd": "rm"}), "bad_frame"),
    (_with_header({"format": "png"}), "bad_frame"),
    (_with_header({"format": "raw", "width": 4, "height": 2}, b"\0" * 5), "bad_frame"),
    (_with_header({"format": "raw", "width": 5000, "height": 5000}), "frame_too_large"),
    (b"\xff\xd8\xff" + b"\0" * 300_000, "frame_too_large"),
])
def test_bad_frames(data, code):
    assert code_of(parse_frame, data, LIM) == code


def test_decompression_bomb_header_is_rejected_before_decoding():
    big = jpeg(2000, 1000)  # small file, 2 Mpixel > the 640x480 cap
    assert len(big) < LIM.max_frame_bytes
    assert code_of(parse_frame, big, LIM) == "frame_too_large"


def test_source_policy(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "sub" / "clip.mp4").write_bytes(b"x")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"x")
    (media / "link.mp4").symlink_to(secret)
    pol = SourcePolicy(roots=[media])
    assert pol.check("sub/clip.mp4") == str((media / "sub" / "clip.mp4").resolve())
    assert pol.check(str(media / "sub" / "clip.mp4")).endswith("clip.mp4")
    assert pol.check("rtsp://cam.local:554/stream") == "rtsp://cam.local:554/stream"
    assert pol.list_files() == ["link.mp4", "sub/clip.mp4"]
    for bad in ["../secret.mp4", "sub/../../secret.mp4", str(secret), "link.mp4", "/etc/passwd",
                "file:///etc/passwd", "ftp://host/x.mp4", "javascript:alert(1)", "http:///nohost",
                "sub/clip.mp4\x00.txt", "sub", "missing.mp4"]:
        assert code_of(pol.check, bad) == "source_not_allowed", bad
    assert code_of(SourcePolicy().check, "clip.mp4") == "source_not_allowed"


def test_token_bucket_caps_a_flood():
    b = TokenBucket(10)
    taken = sum(b.take() for _ in range(100))
    assert 10 <= taken <= 11
    assert b.should_warn() and not b.should_warn()


def test_error_message_shape():
    e = StreamError("bad_field", "`x` must be a string", field="x")
    m = json.loads(protocol.error_message(e, "r1"))
    assert m == {"op": "error", "v": 1, "code": "bad_field", "message": "`x` must be a string", "field": "x", "id": "r1"}


def test_every_code_the_server_can_send_is_documented():
    """Codes raised anywhere in streamvz (engine, sources, transports) are in ERROR_CODES and the doc."""
    import pathlib
    import re

    from streamvz.sources.frame import CODES

    root = pathlib.Path(protocol.__file__).parent
    raised = set(CODES)
    for path in root.rglob("*.py"):
        raised |= set(re.findall(r'(?:StreamError|SourceError|ProtocolError)\(\s*"([a-z_]+)"', path.read_text()))
    assert raised, "the scan found no codes"
    missing = raised - set(protocol.ERROR_CODES)
    assert not missing, f"codes raised but not in ERROR_CODES: {sorted(missing)}"
    doc = (root.parent / "docs" / "protocol.md").read_text()
    undocumented = [c for c in raised if f"`{c}`" not in doc]
    assert not undocumented, f"codes missing from docs/protocol.md: {undocumented}"
