"""VisionZip for towers whose connector pixel-shuffles patches into LM tokens (SmolVLM, InternVL).

The language model sees one token per s x s group of patches, so that is what VisionZip selects:
a group's score is the sum of its patches' scores, its key the mean of their keys (as for Qwen's
2x2 merge groups), and the tokens kept and merged are the connector's outputs. Which patches form
a group is read from the model's own shuffle, applied to patch indices, so it cannot drift from the
layout the connector really uses.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..compress import VisionZip, select
from .llava_next_video import FrameAdapter


def group_members(shuffle: Callable[[torch.Tensor], torch.Tensor], side: int) -> torch.Tensor:
    """[G, s*s] patch indices (row-major over the side x side grid) in each shuffled token, tokens
    in the order the connector emits them. `shuffle`: [1, side, side, 1] float -> [1, G, s*s]."""
    index = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    out = shuffle(index)
    return out.reshape(-1, out.shape[-1]).round().long()


def zip_groups(tokens: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, members: torch.Tensor,
               vz: VisionZip) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, G, D] (connector outputs), per-patch scores [B, N] and keys [B, N, d] ->
    (kept + merged tokens [B, budget, D], kept group indices [B, dominant])."""
    members = members.to(scores.device)
    group_scores = scores[:, members].sum(-1)  # [B, G]
    group_keys = keys[:, members].float().mean(-2)  # [B, G, d]
    vz.check(members.shape[0], has_cls=False)
    return select(tokens, group_scores, group_keys, vz.dominant, vz.contextual, has_cls=False, merge=vz.merge)


class ShuffleAdapter(FrameAdapter):
    """What the pixel-shuffle families (SmolVLM2, InternVL3) share: one square tile per frame, and
    VisionZip over the shuffle's groups (`members`: the patches each LM token is made of)."""

    def use_groups(self, size: int, members: torch.Tensor) -> None:
        self.size, self.members = size, members
        self.full_tokens = len(members)  # LM tokens per frame after the shuffle
        if self.vz is not None:
            self.vz.check(self.full_tokens, has_cls=False)  # groups are scored; CLS is never one of them
        self.tokens_per_frame = self.budget or self.full_tokens
        self.last_indices = None

    def pixel_values(self, frames) -> torch.Tensor:
        """As the families' video processors: the frame resized to the tower's square, normalised."""
        return self._normalise(self._resize(self._tower_input(frames), self.size, self.size))
