"""LLaVA-OneVision / LLaVA-Video (LlavaOnevisionForConditionalGeneration: SigLIP, Qwen2 LM).

Each streamed frame is what the model calls a one-frame video: SigLIP at the feature layer
(all tokens: SigLIP has no CLS), projector, 2x2 bilinear pooling (27x27 -> 14x14 = 196 at
384 px), then the model's learned `image_newline` row that closes every video. With VisionZip,
SigLIP -> VisionZip (attention-received scores, no CLS) -> projector -> the same newline row,
so a frame block is `budget` visual rows + 1 newline row (`tokens_per_frame = budget + 1`).
"""
from __future__ import annotations

import math

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from .base import ChatFormat
from .llava_next_video import FrameAdapter

CHATML = ChatFormat(
    system="<|im_start|>system\n{}<|im_end|>\n",
    user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    end_of_turn="<|im_end|>\n",
)


class OnevisionAdapter(FrameAdapter):
    model_class = LlavaOnevisionForConditionalGeneration
    chat = CHATML
    default_system = "You are a helpful assistant."

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
        super().__init__(model, tokens_per_frame, device, dtype, **kw)
        vc = self.model.config.vision_config
        self.size = vc.image_size
        grid = vc.image_size // vc.patch_size
        self.full_tokens = math.ceil(grid / 2) ** 2  # after the 2x2 bilinear pooling
        if self.vz is not None:
            self.vz.check(grid * grid, has_cls=False)
        self.tokens_per_frame = (self.budget or self.full_tokens) + 1  # + image_newline

    def pixel_values(self, frames) -> torch.Tensor:
        """As OneVision's video processor does: resize to the tower's square, normalise."""
        return self._normalise(self._resize(self._tower_input(frames), self.size, self.size))

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:
        pv = self.pixel_values(frames)
        if self.vz is None:  # the model's own video path (pooling + newline), one-frame videos
            return self.model.model.get_video_features(pv[:, None]).pooler_output
        tokens = self._zip(pv)
        newline = self.model.model.image_newline.to(tokens.dtype).expand(len(tokens), 1, -1)
        return torch.cat([tokens, newline], dim=1)
