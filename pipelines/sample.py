"""A generated sample clip for the demo: coloured shapes drifting over a background, one leaves.

Made from streamvz.tiny's scene generator (the data the embedded model was trained on), so
the demo's questions are ones the tiny model can answer.
"""
from __future__ import annotations

import av
import numpy as np


def write_sample(path: str, seconds: float = 8.0, fps: int = 4, seed: int = 0) -> list[tuple[str, str]]:
    """Write an H.264 mp4 to `path`; return (question, expected answer) pairs for it, phrased
    as the embedded model was trained. Two shapes drift; the first leaves half way through."""
    from streamvz.tiny.data import moving_clip, render

    rng = np.random.default_rng(seed)
    scenes = moving_clip(rng, int(seconds * fps))
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = 224, 224
        stream.pix_fmt = "yuv420p"
        for scene in scenes:
            for packet in stream.encode(av.VideoFrame.from_ndarray(render(scene), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    stays = scenes[-1].objects[0]
    return [(f"What color is the {stays.shape}?", stays.colour),
            (f"Is there a {stays.name}?", "yes"),
            ("How many shapes are there now?", str(len(scenes[-1].objects)))]
