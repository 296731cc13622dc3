"""streamvz-tiny's vision side: DINOv2-S features, token reduction, and the MLP projector.

    pixels = preprocess(frames)                       # uint8 [T,H,W,3] -> [T,3,224,224]
    feats = features(vision, pixels)                  # feature-layer states + CLS scores + keys
    tokens, pos = reduce(feats, "visionzip", 64)      # [T, 64, 384] + where each token sits [T, 64, 2]
    embeds = projector(tokens, pos)                   # [T, 64, 576], SmolLM2's embedding space

`features` runs the tower once and keeps what every reduction needs, so training and the
benchmark compute DINOv2 once per image and compare VisionZip with the baselines (random
drop, uniform pooling, top-CLS without merging) on identical features.

Every kept token carries its place in the image: (x, y) of its patch centre in [0, 1], the
mean place of the patches merged into it, or (-1, -1) for CLS. After 11 encoder layers a
patch state says little about where it was, and a 135M LM cannot recover left/right from a
token's index, so the projector is given the place explicitly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..compress import cls_scores, scoring_layer_index, select, split
from .weights import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD

FEATURE_LAYER = -2  # LLaVA's choice: the second-to-last encoder layer's output
FULL_TOKENS = (IMAGE_SIZE // 14) ** 2 + 1  # 16x16 patches + CLS = 257
METHODS = ("full", "visionzip", "random", "pool", "topcls")


POS_FREQS = 4  # sin/cos of pi * 2^i * coordinate, i < POS_FREQS


def place_features(pos: torch.Tensor) -> torch.Tensor:
    """[..., 2] places (CLS: negative) -> [..., 4 * POS_FREQS + 1] Fourier features + is-CLS flag."""
    freqs = math.pi * 2.0 ** torch.arange(POS_FREQS, device=pos.device, dtype=pos.dtype)
    angles = (pos[..., None] * freqs).flatten(-2)
    is_cls = (pos[..., :1] < 0).to(pos.dtype)
    return torch.cat([torch.cat([angles.sin(), angles.cos()], dim=-1) * (1 - is_cls), is_cls], dim=-1)


class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP, with a LayerNorm in front (DINOv2's un-normalised
    feature-layer states have a few very large channels) and each token's place in the
    image added to the hidden layer."""

    def __init__(self, vision_dim: int = 384, lm_dim: int = 576):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim)
        self.fc1 = nn.Linear(vision_dim, lm_dim)
        self.place = nn.Linear(4 * POS_FREQS + 1, lm_dim)
        self.fc2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x)) + self.place(place_features(pos.to(x.dtype)))
        return self.fc2(F.gelu(h))


def places(n_tokens: int, device=None) -> torch.Tensor:
    """[N, 2] place of each token of a CLS + square patch grid sequence (raster order)."""
    side = int(round((n_tokens - 1) ** 0.5))
    c = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1).reshape(-1, 2)  # (x, y), row by row
    return torch.cat([torch.full((1, 2), -1.0, device=device), grid])


def preprocess(frames, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [T,H,W,3] (array, tensor or list of [H,W,3]) -> normalised [T,3,224,224]."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim == 3:
        x = x[None]
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3] RGB, got {x.dtype} {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


@dataclass
class Features:
    hidden: torch.Tensor  # [B, 257, 384] feature-layer states (CLS first)
    scores: torch.Tensor  # [B, 257] CLS attention summed over heads (VisionZip's score)
    keys: torch.Tensor  # [B, 257, 64] the scoring layer's keys averaged over heads

    def __getitem__(self, i) -> "Features":
        return Features(self.hidden[i], self.scores[i], self.keys[i])

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        return Features(*(torch.cat([getattr(p, n) for p in parts]) for n in ("hidden", "scores", "keys")))


@torch.inference_mode()
def features(vision: nn.Module, pixels: torch.Tensor, feature_layer: int = FEATURE_LAYER) -> Features:
    """One tower pass; forward hooks on the scoring layer's q/k projections (no attention maps)."""
    layers = vision.encoder.layer
    attn = layers[scoring_layer_index(len(layers), feature_layer)].attention
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
    try:
        out = vision(pixel_values=pixels, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hidden = out.hidden_states[feature_layer]
    B, N, _ = hidden.shape
    heads = vision.config.num_attention_heads
    q = got["q"].view(B, N, heads, -1).transpose(1, 2)
    k = got["k"].view(B, N, heads, -1).transpose(1, 2)
    scores = cls_scores(q[:, :, 0], k, q.shape[-1] ** -0.5)
    return Features(hidden, scores, k.mean(dim=1))


def reduce(feats: Features, method: str, tokens: int | None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-layer states -> ([B, tokens, D], their places [B, tokens, 2]) by one of METHODS
    (tokens None or 257 = all)."""
    h = feats.hidden
    B, N, D = h.shape
    pos = places(N, h.device).to(h.dtype).expand(B, N, 2)
    if method == "full" or tokens is None or tokens >= N:
        return h, pos
    if method in ("visionzip", "topcls"):  # topcls: VisionZip's dominant selection alone, no merge
        dom, ctx = split(tokens) if method == "visionzip" else (tokens, 0)
        kept = select(h, feats.scores, feats.keys, dom, ctx, has_cls=True)[0]
        # A merged token's place is the mean place of its patches (same assignment: it comes from the keys).
        return kept, select(pos, feats.scores, feats.keys, dom, ctx, has_cls=True, merge="average")[0]
    if method == "random":  # CLS + a random subset of patches, original order
        noise = torch.rand(B, N - 1, generator=generator).to(h.device)
        idx = noise.topk(tokens - 1, dim=1).indices.sort(dim=1).values + 1
        idx = torch.cat([torch.zeros(B, 1, dtype=idx.dtype, device=h.device), idx], dim=1).unsqueeze(-1)
        return h.gather(1, idx.expand(B, tokens, D)), pos.gather(1, idx.expand(B, tokens, 2))
    if method == "pool":  # uniform spatial average pooling of the patch grid to `tokens` cells
        side = int(round((N - 1) ** 0.5))
        rows = 2 ** int(np.floor(np.log2(tokens) / 2))
        hp = torch.cat([h, pos], dim=-1)[:, 1:]
        grid = hp.transpose(1, 2).reshape(B, D + 2, side, side)
        pooled = F.adaptive_avg_pool2d(grid, (rows, tokens // rows)).flatten(2).transpose(1, 2)
        return pooled[..., :D], pooled[..., D:]
    raise ValueError(f"unknown reduction {method!r}; one of {METHODS}")
