"""Frames cost what their pixels say (issue 23.3): shape checks before any decode or resize."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from streamvz import protocol
from streamvz.errors import StreamError
from streamvz.images import MAX_ASPECT, check_image, decode_image
from streamvz.protocol import Limits


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def claims(width: int, height: int) -> bytes:
    """A tiny real JPEG whose header claims width x height (what a decompression bomb looks like)."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (200, 10, 10))))
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def code_of(fn, *a, **kw) -> str:
    with pytest.raises(StreamError) as ei:
        fn(*a, **kw)
    return ei.value.code


def test_long_thin_frames_are_refused_before_decoding():
    thin = encode(Image.new("RGB", (65500, 1), (255, 0, 0)))
    assert len(thin) < 40_000  # it passes every byte limit...
    assert code_of(protocol.parse_frame, thin) == "bad_aspect_ratio"  # ...and its shape still refuses it
    assert code_of(protocol.parse_frame, encode(Image.new("RGB", (1, 2000)))) == "bad_aspect_ratio"
    header = b'{"format":"raw","width":4000,"height":2,"t":0}'
    raw = protocol.FRAME_MAGIC + struct.pack(">I", len(header)) + header
    assert code_of(protocol.parse_frame, raw + bytes(4000 * 2 * 3)) == "bad_aspect_ratio"
    assert code_of(check_image, np.zeros((1, 2000, 3), np.uint8)) == "bad_aspect_ratio"
    ok = protocol.parse_frame(encode(Image.new("RGB", (int(64 * MAX_ASPECT), 64))))  # at the bound: fine
    assert ok.image.shape == (64, int(64 * MAX_ASPECT), 3)


def test_every_oversized_frame_is_frame_too_large():
    limits = Limits(max_frame_pixels=10**10)  # past PIL's own guard (about 179 M pixels), ours allows it
    assert code_of(protocol.parse_frame, claims(20000, 20000), limits) == "frame_too_large"
    assert code_of(protocol.parse_frame, claims(20000, 20000)) == "frame_too_large"
    assert code_of(protocol.parse_frame, claims(5000, 5000)) == "frame_too_large"  # ours: 16.7 M pixels
    assert code_of(decode_image, encode(Image.new("RGB", (300, 300)), "PNG"), 300 * 299, ("PNG",)) == "frame_too_large"
    assert code_of(check_image, np.zeros((8000, 8000, 3), np.uint8), 4096 * 4096) == "frame_too_large"


def test_png_decodes_only_when_asked_for():
    png = encode(Image.new("RGB", (40, 30), (0, 0, 255)), "PNG")
    assert decode_image(png, formats=("PNG",)).shape == (30, 40, 3)
    assert code_of(decode_image, png) == "bad_frame"  # the wire takes JPEG only


@pytest.mark.parametrize("height", [1, 2, 3, 4])
def test_short_frames_read_as_height_by_width_by_3(tiny_llava, height):
    """A [3, W, 3] array looks channels-first to an image processor (1, 3 and 4 are channel
    counts); the engine must see a red image of that height, as it sees it at a normal size."""
    from transformers import AutoProcessor

    red = np.zeros((height, 9, 3), np.uint8)
    red[..., 0] = 255
    frame = check_image(torch.from_numpy(red))
    assert frame.shape[2] == 3 and frame.shape[1] / frame.shape[0] == 9 / height
    assert (frame == red[:1, :1]).all()
    processor = AutoProcessor.from_pretrained(tiny_llava).image_processor
    pv = processor(images=[frame], return_tensors="pt")["pixel_values"][0]
    big = np.zeros((height * 10, 90, 3), np.uint8)
    big[..., 0] = 255
    ref = processor(images=[big], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(pv, ref, atol=1e-4)
    assert pv[0].min() > pv[1].max()  # red channel high everywhere, green low


async def test_engine_refuses_amplifying_arrays(tiny_llava):
    from streamvz.engine import Engine

    engine = Engine(model=tiny_llava, tokens_per_frame=8)
    try:
        session = engine.session()
        with pytest.raises(StreamError) as ei:
            await session.add_frame(np.zeros((1, 2000, 3), np.uint8), t=0.0)
        assert ei.value.code == "bad_aspect_ratio"
        with pytest.raises(StreamError) as ei:
            session.submit_frame(np.zeros((2000, 2, 3), np.uint8), t=0.0)
        assert ei.value.code == "bad_aspect_ratio"
        await session.add_frame(np.full((3, 12, 3), 128, np.uint8), t=1.0)  # short but sane: taken
        assert session.stats()["frames_in_window"] == 1
    finally:
        await engine.aclose()
