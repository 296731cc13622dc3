"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) as a streamvz adapter.

Its ViT differs from CLIP/SigLIP in three ways that VisionZip has to respect:
  * attention is windowed in most blocks, and the sequence inside the ViT is permuted into
    window order, so we score with the last *full-attention* block (the whole frame) and map
    scores back to the natural order with the same window index the ViT uses;
  * the language model sees merged tokens (a 2x2 patch group -> one token), so a merged token's
    score is the sum of its four patches' scores, and its key is their mean;
  * positions are 3-D (t, h, w) M-RoPE: each kept token keeps its original (0, row, col)
    offset in the frame's merged grid; a contextual token takes its target token's offset.
Frames are streamed as images (each its own (1, h, w) grid), all frames of a batch packed into
one ViT call, so batches of frames cost one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from ..compress import VisionZip, received_scores, select, split
from .base import Adapter, eos_ids
from .frames import as_frame_list
from .llava import pick_device, pick_dtype
from .onevision import CHATML


@dataclass
class QwenZipped:
    tokens: list[torch.Tensor]  # per image [k, D] (LM width, after the merger)
    indices: list[torch.Tensor]  # per image [dominant] kept merged-token indices, ascending
    offsets: list[torch.Tensor]  # per image [3, k] (t, h, w) offsets inside the image's grid


def grid_offsets(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(t, h, w) offsets of an image's merged tokens in the order the merger emits them: [3, n]."""
    t, h, w = (int(v) for v in grid_thw)
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()])


def contextual_targets(indices: torch.Tensor, n: int, contextual: int) -> torch.Tensor:
    """Which tokens `visionzip.select` used as contextual targets: every step-th remaining token."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[indices.cpu()] = False
    rest = rest.nonzero().squeeze(1)
    step = max(1, len(rest) // contextual)
    return rest[torch.arange(0, len(rest), step)[:contextual]]


class ScoringHook:
    """Captures, for one ViT block, its qkv projection output and the attention call's
    rotary embeddings and segment boundaries. Hooks are removed on exit; nothing else changes."""

    def __init__(self, attn: torch.nn.Module):
        self.attn, self.handles = attn, []
        self.qkv = self.rope = self.cu_seqlens = None

    def __enter__(self):
        def on_call(_m, _args, kwargs):
            self.rope, self.cu_seqlens = kwargs["position_embeddings"], kwargs["cu_seqlens"]

        def on_qkv(_m, _inputs, output):
            self.qkv = output

        self.handles = [self.attn.register_forward_pre_hook(on_call, with_kwargs=True),
                        self.attn.qkv.register_forward_hook(on_qkv)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def merged_scores(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """One ViT pass over packed images -> (merged tokens [M, D], scores [M], keys [M, d]).

    All three are per merged token in the natural (row-major per image) order the merger emits.
    """
    cfg = visual.config
    merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
    block = visual.blocks[cfg.fullatt_block_indexes[-1] if cfg.fullatt_block_indexes else -1]
    with ScoringHook(block.attn) as hook:
        merged = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw).pooler_output  # natural order
    window_index, _ = get_vision_window_index(grid_thw.cpu(), merge, cfg.window_size, cfg.patch_size)
    restore = torch.argsort(window_index).to(merged.device)  # window order -> natural order

    L = hook.qkv.shape[0]
    H = block.attn.num_heads
    q, k, _ = hook.qkv.view(L, 3, H, -1).unbind(1)  # [L, H, d], window order
    cos, sin = hook.rope
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
    scale = block.attn.scaling

    bounds = hook.cu_seqlens.tolist()  # one segment per image (t = 1 frames)
    scores = torch.empty(L, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        # attention received in the full-attention block, averaged over heads and queries
        qs, ks = q_rot[a:b].transpose(0, 1)[None], k_rot[a:b].transpose(0, 1)[None]  # [1, H, n, d]
        scores[a:b] = received_scores(qs, ks, scale)[0]
    # merged-token level: the 4 patches of a merge group are contiguous in window order
    unit_scores = scores.view(-1, unit).sum(1)[restore]
    # keys for contextual merging: head-averaged, before RoPE (content, not position)
    unit_keys = k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1)[restore]
    return merged, unit_scores, unit_keys


@torch.inference_mode()
def qwen_visionzip(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                   vz: VisionZip) -> QwenZipped:
    """VisionZip on Qwen2.5-VL's ViT for a packed batch of images (one grid row per image)."""
    merge = visual.config.spatial_merge_size
    return zip_merged(*merged_scores(visual, pixel_values, grid_thw), grid_thw, merge, vz)


def zip_merged(merged: torch.Tensor, unit_scores: torch.Tensor, unit_keys: torch.Tensor, grid_thw: torch.Tensor,
               merge: int, vz: VisionZip) -> QwenZipped:
    """Per image of a packed batch: select + merge on merged tokens [M, C] (any channels: each is
    treated alike) from their scores [M] and keys [M, d], with each kept token's (t, h, w) offset."""
    unit = merge * merge
    out = QwenZipped([], [], [])
    start = 0
    for g in grid_thw:
        n = int(g.prod()) // unit
        if int(g[0]) != 1:
            raise ValueError("qwen_visionzip compresses images / single frames (grid t = 1)")
        vz.check(n, has_cls=False)
        sl = slice(start, start + n)
        tokens, idx = select(merged[None, sl], unit_scores[None, sl], unit_keys[None, sl],
                             vz.dominant, vz.contextual, has_cls=False, merge=vz.merge)
        idx = idx[0]
        offsets = grid_offsets(g, merge)
        keep = idx.cpu()
        if vz.contextual:
            keep = torch.cat([keep, contextual_targets(idx, n, vz.contextual)])
        out.tokens.append(tokens[0])
        out.indices.append(idx)
        out.offsets.append(offsets[:, keep])
        start += n
    return out


class Qwen2_5_VLAdapter(Adapter):
    model_class = Qwen2_5_VLForConditionalGeneration
    # each frame's tokens sit between Qwen's own vision markers, as an image in its chat template
    chat = replace(CHATML, frame_prefix="{:.1f}s:<|vision_start|>", frame_suffix="<|vision_end|>\n")
    default_system = "You are a helpful assistant."
    rope_dims = 3

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None,
                 merge: str = "reference", max_frame_pixels: int | None = 448 * 448, **load_kwargs):
        """`max_frame_pixels` caps a frame's resolution before the ViT (Qwen's image default,
        ~12.8 MP, is far too much for a stream): 448x448 = 256 merged tokens before VisionZip."""
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.model = self.model_class.from_pretrained(model, dtype=self.dtype, **load_kwargs).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        self.visual = self.model.model.visual
        self.merge = self.model.config.vision_config.spatial_merge_size
        self.vz = VisionZip(*split(tokens_per_frame), merge=merge) if tokens_per_frame is not None else None
        size = dict(self.image_processor.size)
        if max_frame_pixels is not None:
            size["longest_edge"] = min(size["longest_edge"], max_frame_pixels)
        self.frame_size = size  # Qwen's size dict: min / max pixels per frame
        vc = self.model.config.vision_config
        # uncompressed, a frame's token count follows its aspect ratio; this is the upper bound
        self.tokens_per_frame = tokens_per_frame or size["longest_edge"] // (vc.patch_size * self.merge) ** 2
        text_cfg = self.model.config.get_text_config()
        self.max_position_embeddings = text_cfg.max_position_embeddings
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)
        self.last_indices = None

    def pixel_values(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """Each frame as an image: Qwen's own resize to a multiple of 28 px, patches flattened."""
        out = self.image_processor(images=as_frame_list(frames), size=self.frame_size, return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype), out["image_grid_thw"].to(self.device)

    @torch.inference_mode()
    def encode_frames_positioned(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        pv, grid = self.pixel_values(frames)
        if self.vz is None:  # the model's own path: every merged token, natural grid positions
            feats = self.model.model.get_image_features(pv, grid).pooler_output
            if len({len(f) for f in feats}) != 1:
                raise ValueError("frames of different sizes in one batch give different token counts; "
                                 "resize them to one size or enable VisionZip (tokens_per_frame)")
            offsets = [grid_offsets(g, self.merge) for g in grid]
            return torch.stack(list(feats)), torch.stack(offsets)
        z = qwen_visionzip(self.visual, pv, grid, self.vz)
        self.last_indices = torch.stack(z.indices)
        return torch.stack(z.tokens), torch.stack(z.offsets)

    def encode_frames(self, frames) -> torch.Tensor:
        return self.encode_frames_positioned(frames)[0]

    @torch.inference_mode()
    def forward(self, inputs_embeds, cache, position_ids, attention_mask=None, logits_to_keep: int = 1):
        if position_ids.dim() == 2:  # plain text positions: the same on all three axes
            position_ids = position_ids[None].expand(3, -1, -1)
        return super().forward(inputs_embeds, cache, position_ids, attention_mask, logits_to_keep)
