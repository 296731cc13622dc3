"""Qwen3-VL (Qwen3VLForConditionalGeneration, and the MoE variant) as a streamvz adapter.

Qwen3-VL's ViT has no windows and no CLS: tokens are scored by the attention they receive in the
last block (the one whose output the merger reads), pooled per 2x2 merge group, as for Qwen2.5-VL.

DeepStack: the ViT also merges the hidden states of a few blocks (`deepstack_visual_indexes`) into
LM-width features that the first LM layers add to their outputs at the visual positions. VisionZip
has to treat them as part of each visual token: a kept token keeps its DeepStack features, a
contextual token's DeepStack features merge the same assigned tokens the same way. We do that by
running `select` once on the concatenation [main | level 1 | level 2 | ...] along channels: select
gathers, sums and averages every channel alike, so the indices and the assignment are shared.

To keep the engine family-agnostic, frames are carried as rows of width D * (1 + levels), text rows
(`embed`) as the same width with zeros in the DeepStack channels. `forward` splits the width back
and passes the DeepStack channels for every row (`visual_pos_masks` all True): the model adds them
to its hidden states, and adding exact zeros at text rows leaves those rows as they were, so this is
the model's own computation.

Frames are timestamped as Qwen3-VL's processor writes video frames: `<1.5 seconds><|vision_start|>
...<|vision_end|>`; each frame is encoded as an image, its own (1, h, w) grid, positions (0, h, w).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from ..compress import received_scores
from .onevision import CHATML
from .qwen2_5_vl import Qwen2_5_VLAdapter, ScoringHook, grid_offsets, zip_merged


@torch.inference_mode()
def deepstack_scores(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """One ViT pass over packed images -> (features [M, D * (1 + levels)], scores [M], keys [M, d]).

    Per merged token, in the order the merger emits them: the main features, then each DeepStack
    level's, along channels; the attention the token's 2x2 patches receive in the last block; the
    mean of their head-averaged keys (before rotary: content, not position).
    """
    unit = visual.config.spatial_merge_size ** 2
    block = visual.blocks[-1]
    with ScoringHook(block.attn) as hook:
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    features = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)

    L, H = hook.qkv.shape[0], block.attn.num_heads
    q, k, _ = hook.qkv.view(L, 3, H, -1).unbind(1)  # [L, H, d]; patches of a merge group are contiguous
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, *hook.rope)
    bounds = hook.cu_seqlens.tolist()  # one segment per image
    scores = torch.empty(L, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks = q_rot[a:b].transpose(0, 1)[None], k_rot[a:b].transpose(0, 1)[None]  # [1, H, n, d]
        scores[a:b] = received_scores(qs, ks, block.attn.scaling)[0]
    keys = k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1)
    return features, scores.view(-1, unit).sum(1), keys


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_class = Qwen3VLForConditionalGeneration
    chat = replace(CHATML, frame_prefix="<{:.1f} seconds><|vision_start|>", frame_suffix="<|vision_end|>")
    rope_dims = 3  # interleaved M-RoPE: each rotated pair takes t, h or w; a shift of all three rotates all pairs

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
        super().__init__(model, tokens_per_frame, device, dtype, **kw)
        self.hidden = self.model.config.get_text_config().hidden_size
        self.levels = len(self.model.config.vision_config.deepstack_visual_indexes)
        self.embed_width = self.hidden * (1 + self.levels)  # rows carry [main | DeepStack levels]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D * (1 + levels)]
        e = self.model.get_input_embeddings()(ids.to(self.device))
        return torch.cat([e, e.new_zeros(*e.shape[:-1], self.hidden * self.levels)], dim=-1)

    @torch.inference_mode()
    def encode_frames_positioned(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        pv, grid = self.pixel_values(frames)
        if self.vz is None:  # the model's own path: every merged token and its DeepStack features
            out = self.model.model.get_image_features(pv, grid)
            feats = [torch.cat(per_image, dim=-1) for per_image in zip(out.pooler_output, *out.deepstack_features)]
            if len({len(f) for f in feats}) != 1:
                raise ValueError("frames of different sizes in one batch give different token counts; "
                                 "resize them to one size or enable VisionZip (tokens_per_frame)")
            return torch.stack(feats), torch.stack([grid_offsets(g, self.merge) for g in grid])
        z = zip_merged(*deepstack_scores(self.visual, pv, grid), grid, self.merge, self.vz)
        self.last_indices = torch.stack(z.indices)
        return torch.stack(z.tokens), torch.stack(z.offsets)

    @torch.inference_mode()
    def forward(self, inputs_embeds, cache, position_ids, attention_mask=None, logits_to_keep: int = 1):
        x = inputs_embeds.to(self.device, self.dtype)
        B, L, _ = x.shape
        main, *levels = x.split(self.hidden, dim=-1)
        position_ids = position_ids.to(self.device)
        if position_ids.dim() == 2:  # plain text positions: the same on all three axes
            position_ids = position_ids[None].expand(3, -1, -1)
        out = self.model.model.language_model(
            inputs_embeds=main, position_ids=position_ids, attention_mask=attention_mask,
            cache=cache, use_cache=True,
            visual_pos_masks=torch.ones(B, L, dtype=torch.bool, device=self.device),
            deepstack_visual_embeds=[level.reshape(B * L, self.hidden) for level in levels],
        )
        hidden = out.last_hidden_state
        return self.model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_class = Qwen3VLMoeForConditionalGeneration


__all__ = ["Qwen3VLAdapter", "Qwen3VLMoeAdapter", "deepstack_scores"]
