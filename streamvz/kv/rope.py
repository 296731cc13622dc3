"""RoPE re-rotation: kept keys move to contiguous positions after an eviction.

RoPE is a rotation per frequency pair, so R(-d) R(p) k = R(p - d) k: a key cached at position p
is turned into the key at p - d without the token. M-RoPE (Qwen's (t, h, w)) moves all three
components by the same d, which is the same rotation of every pair, so the same code applies.
"""
from __future__ import annotations

import torch


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The language model's RoPE inverse frequencies (one per rotated pair)."""
    return model.get_decoder().rotary_emb.inv_freq.detach().float().cpu()


def rotate_back(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd keys [..., L, D] from position p to p - shift[L] (per row), in fp32."""
    angle = shift.to(keys.device, torch.float32)[:, None] * inv_freq.to(keys.device)[None, :]
    angle = torch.cat((angle, angle), dim=-1)  # the rotate_half layout: pairs (i, i + D/2)
    cos, sin = angle.cos(), angle.sin()
    k = keys.float()
    half = k.shape[-1] // 2
    k_rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos - k_rot * sin).to(keys.dtype)
