"""SmolVLM2 (SmolVLMForConditionalGeneration: SigLIP without CLS, pixel-shuffle connector, Llama LM).

A video frame is what SmolVLM2's video processor makes of it: the whole frame squared to the
tower's size, no image splitting, one global image of (side / s)^2 tokens (s = the connector's
scale factor: 27x27 patches -> 81 tokens at 384 px, s = 3). VisionZip works in the space the LM
sees: patches are scored by the attention they receive in the last SigLIP layer (no CLS), summed
per s x s shuffle group; the connector's tokens of the top groups are kept and the rest merged
(streamvz.adapters.shuffle). Each frame is written as SmolVLM2's video prompt writes one:
`\\nFrame from MM:SS:<fake_token_around_image><global-img>` + tokens + `<fake_token_around_image>`.
"""
from __future__ import annotations

import torch
from transformers import SmolVLMForConditionalGeneration

from ..compress import QKCapture, VisionZip, received_scores
from .base import ChatFormat
from .shuffle import ShuffleAdapter, group_members, zip_groups


def shuffle_groups(inner) -> torch.Tensor:
    """[G, s*s] patches of each LM token, from the model's own connector shuffle."""
    vc = inner.config.vision_config
    side, s = vc.image_size // vc.patch_size, inner.config.scale_factor
    return group_members(lambda x: inner.connector.pixel_shuffle(x.view(1, side * side, 1), s), side)


@torch.inference_mode()
def smolvlm_visionzip(inner, pixel_values: torch.Tensor, members: torch.Tensor, vz: VisionZip,
                      patch_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, S, S] -> (kept + merged connector tokens [n, budget, D], kept groups [n, dominant])."""
    attn = inner.vision_model.encoder.layers[-1].self_attn
    with QKCapture(attn) as cap:
        hidden = inner.vision_model(pixel_values=pixel_values.to(inner.dtype),
                                    patch_attention_mask=patch_attention_mask).last_hidden_state
    B, N, _ = hidden.shape
    q = cap.q.view(B, N, -1, attn.head_dim).transpose(1, 2)  # [B, H, N, d]
    k = cap.k.view(B, N, -1, attn.head_dim).transpose(1, 2)
    return zip_groups(inner.connector(hidden), received_scores(q, k, attn.scale), k.mean(1), members, vz)


class MinutesSeconds(str):
    """A frame prefix whose format(t) writes t in seconds as SmolVLM2's video prompt does (MM:SS)."""

    def format(self, t: float) -> str:  # noqa: A003 - the engine calls frame_prefix.format(t)
        return str.format(self, f"{int(t // 60):02d}:{int(t % 60):02d}")


SMOLVLM_CHAT = ChatFormat(
    system="<|im_start|>System: {}<end_of_utterance>\n",
    user="User: {}<end_of_utterance>\nAssistant:",
    end_of_turn="<end_of_utterance>\n",
    frame_prefix=MinutesSeconds("\nFrame from {}:<fake_token_around_image><global-img>"),
    frame_suffix="<fake_token_around_image>",
)


class SmolVLMAdapter(ShuffleAdapter):
    model_class = SmolVLMForConditionalGeneration
    chat = SMOLVLM_CHAT
    default_system = "You are a helpful assistant."

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
        super().__init__(model, tokens_per_frame, device, dtype, **kw)
        self.use_groups(self.model.config.vision_config.image_size, shuffle_groups(self.model.model))

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:
        pv = self.pixel_values(frames)
        if self.vz is None:  # the model's own path: each frame one unsplit image
            return torch.stack(self.model.model.get_image_features(pv[:, None]).pooler_output)
        tokens, self.last_indices = smolvlm_visionzip(self.model.model, pv, self.members, self.vz)
        return tokens
