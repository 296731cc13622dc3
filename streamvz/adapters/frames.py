"""Frames as adapters receive them: uint8 [T,H,W,3] array/tensor or a list of [H,W,3]."""
from __future__ import annotations

import numpy as np
import torch


def as_frame_list(frames) -> list[np.ndarray]:
    """Normalise to a list of contiguous uint8 HWC RGB arrays; clear errors for anything else."""
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4:
            raise ValueError(f"frames must be [T,H,W,3] or [H,W,3], got shape {frames.shape}")
        frames = list(frames)
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"each frame must be uint8 [H,W,3] RGB, got {f.dtype} {f.shape}")
        out.append(np.ascontiguousarray(f))
    if not out:
        raise ValueError("no frames given")
    return out
