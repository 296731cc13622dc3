"""Causal inter-frame token drop: a still camera spends tokens only on what changed.

VisionZip removes the redundancy inside a frame; a static camera's larger redundancy is between
frames. After the tower (and VisionZip), each token of a frame is compared with the tokens of the
previous frame: a token that has a near twin there (cosine similarity >= 1 - threshold) is
dropped; what changed is kept. No future frames and no question are needed, so it runs as frames
arrive (EVS, TimeChat-Online's differential drop and StreamingTOM do the same, training-free).

Tokens are matched to their nearest token of the previous frame rather than to "the same patch":
every family's tokens then work alike (a VisionZip token is a selected patch or a merged group,
in LM space), and a ViT's features carry their position, so in a still scene the nearest token is
the same place. An object that enters brings tokens with no twin; when it leaves, VisionZip's
salient tokens move to what is behind it, which had no twin either.

A key frame keeps every token: the first frame, every `key_every`-th frame, and any frame whose
picture changed in more than `scene_change` of its places since the last key frame (a cut, a
camera that pans or moves, a light switched on), so the window never loses its reference picture
and the drop backs off when everything moves. That test compares the same place, not the nearest
token: the picture is cut into a GRID x GRID grid of cell means and a cell changed when a channel's
mean moved by more than PIXEL_CHANGE (out of 255; a cell averages hundreds of pixels, so sensor
noise stays far below it). Nearest-twin matching alone cannot tell a pan from a still scene: a
panning camera shows mostly the same things, shifted, and most tokens find a twin. A frame where nothing changed is not written at all (the next written
frame's timestamp says how much time passed); `min_tokens` > 0 keeps that many per frame instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("off", "drop")
GRID = 8  # picture cells per side for the scene-change test
PIXEL_CHANGE = 4.0  # a cell changed: some channel's mean moved by more than this (0-255)


@dataclass(frozen=True)
class TemporalConfig:
    mode: str = "off"  # "off" | "drop"
    threshold: float = 0.08  # a token changed when its best cosine similarity is below 1 - threshold
    key_every: int = 30  # frames between key frames (each keeps all its tokens)
    scene_change: float = 0.3  # more than this share of the picture's cells changed since the key frame: a key frame
    min_tokens: int = 0  # tokens kept from every non-key frame at least (0: still frames are skipped)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"temporal mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.threshold < 2 or self.key_every < 1 or not 0 < self.scene_change <= 1 or self.min_tokens < 0:
            raise ValueError("temporal: need 0 < threshold < 2, key_every >= 1, 0 < scene_change <= 1, min_tokens >= 0")


def best_similarity(tokens: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """tokens [k, W], previous [m, W] -> [k]: each token's cosine similarity to its nearest
    token of `previous` (-1 when there is none)."""
    if previous is None or len(previous) == 0:
        return torch.full((len(tokens),), -1.0, device=tokens.device)
    a = F.normalize(tokens.float(), dim=-1)
    b = F.normalize(previous.float().to(tokens.device), dim=-1)
    return (a @ b.T).max(dim=1).values


def picture_cells(picture) -> torch.Tensor:
    """uint8 [H, W, 3] (array or tensor, any size) -> [3, GRID, GRID] cell means (0-255)."""
    x = torch.as_tensor(picture).permute(2, 0, 1).float()
    return F.adaptive_avg_pool2d(x, GRID)


def changed_share(cells: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the grid's places whose picture changed between two `picture_cells`."""
    return float(((cells - reference).abs().amax(0) > PIXEL_CHANGE).float().mean())


class TemporalFilter:
    """One session's state: the previous frame's tokens, the last key frame's picture cells and
    the frames since that key frame."""

    def __init__(self, config: TemporalConfig):
        self.config = config
        self.previous: torch.Tensor | None = None
        self.key_cells: torch.Tensor | None = None
        self.since_key = 0

    def keep(self, tokens: torch.Tensor, picture) -> torch.Tensor | None:
        """Indices of the rows of `tokens` [k, W] (the frame `picture`, uint8 [H, W, 3]) to write,
        in order (None: all of them, a key frame)."""
        cfg = self.config
        cells, previous = picture_cells(picture), self.previous
        self.previous = tokens.detach()
        if (self.key_cells is None or self.since_key + 1 >= cfg.key_every
                or changed_share(cells, self.key_cells) > cfg.scene_change):
            self.key_cells, self.since_key = cells, 0
            return None
        best = best_similarity(tokens, previous)
        changed = best < 1.0 - cfg.threshold
        self.since_key += 1
        if int(changed.sum()) < cfg.min_tokens:  # top up with the least similar of the rest
            changed[best.argsort()[:cfg.min_tokens]] = True
        return changed.nonzero().squeeze(1)
