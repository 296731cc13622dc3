"""InternVL3 / 3.5 (InternVLForConditionalGeneration: InternViT with a CLS token, pixel shuffle
0.5, MLP projector, Qwen2/Qwen3 LM).

A video frame is what InternVL's video processor makes of it: one tile, the frame resized to the
tower's square (448 px: 32x32 patches -> 16x16 = 256 tokens). VisionZip: the CLS query's attention
to every patch in the feature layer (the published CLS scoring), summed per 2x2 shuffle group; the
model's own projected tokens of the top groups are kept and the rest merged
(streamvz.adapters.shuffle). CLS itself is not a token the LM sees here, so it is not kept.
Frames are written as InternVL's video prompt writes them, with the time instead of the index:
`Frame at 1.5s: <img>` + tokens + `</img>\\n`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from transformers import InternVLForConditionalGeneration

from ..compress import QKCapture, VisionZip, cls_scores, scoring_layer_index
from .onevision import CHATML
from .shuffle import ShuffleAdapter, group_members, zip_groups


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def shuffle_groups(inner) -> torch.Tensor:
    """[G, 4] patches of each LM token, from the model's own pixel shuffle."""
    vc = inner.config.vision_config
    side = _side(vc.image_size) // _side(vc.patch_size)
    return group_members(lambda x: inner.pixel_shuffle(x, scale_factor=inner.config.downsample_ratio), side)


@torch.inference_mode()
def internvl_visionzip(inner, pixel_values: torch.Tensor, members: torch.Tensor, vz: VisionZip,
                       feature_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles [n, 3, S, S] -> (kept + merged projected tokens [n, budget, D], kept groups [n, dominant])."""
    layer = inner.config.vision_feature_layer if feature_layer is None else feature_layer
    layers = inner.vision_tower.encoder.layer
    attn = layers[scoring_layer_index(len(layers), layer)].attention
    # the model's own tokens (the class's method: the drop-in shadows the instance's with this
    # function); hooks on the scoring layer's (normalised) queries and keys
    with QKCapture(attn, q="q_norm", k="k_norm") as cap:
        tokens = type(inner).get_image_features(inner, pixel_values, vision_feature_layer=layer,
                                                vision_feature_select_strategy="default").pooler_output  # [n, G, D]
    B = len(pixel_values)
    q = cap.q.view(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1 + N, d]
    k = cap.k.view(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    scores = cls_scores(q[:, :, 0], k, attn.scale)[:, 1:]  # CLS -> each patch
    return zip_groups(tokens, scores, k[:, :, 1:].mean(1), members, vz)


class InternVLAdapter(ShuffleAdapter):
    model_class = InternVLForConditionalGeneration
    chat = replace(CHATML, frame_prefix="Frame at {:.1f}s: <img>", frame_suffix="</img>\n")
    default_system = "You are a helpful assistant."

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
        super().__init__(model, tokens_per_frame, device, dtype, **kw)
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError("InternVL checkpoints drop CLS before the pixel shuffle (select strategy 'default'); "
                             f"this one uses {cfg.vision_feature_select_strategy!r}")
        self.use_groups(_side(cfg.vision_config.image_size), shuffle_groups(self.model.model))  # 256 at 448 px
        self._feature_layer()  # one feature layer, or a clear error now

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:
        pv = self.pixel_values(frames)
        if self.vz is None:  # the model's own path, one tile per frame
            return self.model.model.get_image_features(
                pv, vision_feature_layer=self.model.config.vision_feature_layer,
                vision_feature_select_strategy="default").pooler_output
        tokens, self.last_indices = internvl_visionzip(self.model.model, pv, self.members, self.vz)
        return tokens
