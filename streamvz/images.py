"""Checks on frames handed to the engine (the transports decode and bound them first)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import StreamError


def check_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise StreamError("bad_frame", f"a frame must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    return image
