"""What one frame may cost: checks on pixel arrays and on encoded image bytes, before any resize.

A frame's bytes say little about its cost. A 17 kB JPEG of 1x65500 pixels passes every size
limit, and a CLIP processor, which scales the short side to 336, turns it into a 336x22-million
pixel image: gigabytes and seconds of the model thread, while every other session waits. So a
frame is refused on its shape before anything decodes or resizes it:
  - pixels (width x height) over the limit -> `frame_too_large`, read from the header of
    encoded bytes; PIL's own decompression-bomb guard means the same thing here;
  - long side over MAX_ASPECT times the short side -> `bad_aspect_ratio` (after the processor's
    short-side resize, work per frame then stays within MAX_ASPECT frames' worth);
  - frames 1-4 pixels high are enlarged by whole-pixel repetition: image processors guess the
    channel axis from the shape, and read a [1|3|4, W, 3] array as channels-first (grey, RGB,
    RGBA), i.e. as a 3-pixel-wide image of W rows.
"""
from __future__ import annotations

import io

import numpy as np

from .errors import StreamError

MAX_ASPECT = 16.0  # long side / short side; 32:9 panoramas are 3.6
MAX_PIXELS = 7680 * 4320  # the sources' default ceiling (8K); the transports set their own, lower
MIN_HEIGHT = 5  # lower frames are repeated up to this (heights 1, 3, 4 read as a channel count)
_MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}


def check_shape(width: int, height: int, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> None:
    if width < 1 or height < 1:
        raise StreamError("bad_frame", f"a frame needs at least one pixel, got {width}x{height}")
    if width * height > max_pixels:
        raise StreamError("frame_too_large", f"{width}x{height} is over {max_pixels} pixels")
    if max(width, height) > max_aspect * min(width, height):
        raise StreamError("bad_aspect_ratio", f"{width}x{height}: the long side may be at most {max_aspect:g} "
                          "times the short side")


def check_image(image, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """A frame as the engine takes it: uint8 [H, W, 3] RGB (numpy or torch) -> a checked numpy array."""
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise StreamError("bad_frame", f"a frame must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    check_shape(w, h, max_pixels, max_aspect)
    if h < MIN_HEIGHT:
        k = -(-MIN_HEIGHT // h)  # same factor on both axes: the aspect ratio stays
        image = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    return image


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] = ("JPEG",),
                 max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """Encoded bytes of one of `formats` -> checked RGB array. The size comes from the header;
    nothing is decoded before it passed."""
    from PIL import Image  # pillow: the only image decoder we trust with client bytes

    if not any(data.startswith(_MAGIC[f]) for f in formats):
        raise StreamError("bad_frame", f"binary frames must be {'/'.join(formats)} "
                          f"(start with {' or '.join(_MAGIC[f][:3].hex(' ').upper() for f in formats)})")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling: oversized, like ours
        raise StreamError("frame_too_large", f"over the decoder's pixel limit: {str(e)[:100]}") from None
    except Exception as e:  # PIL raises many types for corrupt data; all mean the same here
        raise StreamError("bad_frame", f"cannot decode {'/'.join(formats)}: {str(e)[:100]}") from None
    check_shape(*img.size, max_pixels=max_pixels, max_aspect=max_aspect)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)  # as sent; check_image enlarges short frames
    except Exception as e:
        raise StreamError("bad_frame", f"cannot decode {'/'.join(formats)}: {str(e)[:100]}") from None
