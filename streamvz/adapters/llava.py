"""LLaVA-1.5 (LlavaForConditionalGeneration, CLIP tower) as a streamvz adapter.

frames -> CLIPImageProcessor -> CLIP tower -> VisionZip (or LLaVA's own feature selection
when tokens_per_frame is None) -> the model's projector -> [T, k, D] language embeddings.
"""
from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..compress import VisionZip, split
from .base import Adapter, ChatFormat, eos_ids
from .frames import as_frame_list

# LLaVA-1.5's conversation format (vicuna v1): "<system> USER: <image>\n<q> ASSISTANT: <a></s>"
LLAVA_CHAT = ChatFormat(system="{} ", user="USER: {} ASSISTANT:", end_of_turn="</s>")
DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def pick_device(device=None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device, dtype=None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class LlavaAdapter(Adapter):
    model_class = LlavaForConditionalGeneration
    chat = LLAVA_CHAT
    default_system = DEFAULT_SYSTEM

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None,
                 merge: str = "reference", **load_kwargs):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.model = self.model_class.from_pretrained(model, dtype=self.dtype, **load_kwargs).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.tokenizer = self.processor.tokenizer
        cfg = self.model.config
        self.feature_layer = cfg.vision_feature_layer
        self.tower = self.model.model.vision_tower
        self.full_tokens = self._full_tokens()
        self.vz = None
        if tokens_per_frame is not None:
            self.vz = VisionZip(*split(tokens_per_frame), merge=merge)
            self.vz.check(self.full_tokens + 1, has_cls=True)  # the tower's sequence includes CLS
        self.tokens_per_frame = tokens_per_frame or self.full_tokens
        text_cfg = cfg.text_config
        self.max_position_embeddings = text_cfg.max_position_embeddings
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)

    def _full_tokens(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1

    def pixel_values(self, frames) -> torch.Tensor:
        pv = self.processor.image_processor(images=as_frame_list(frames), return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:
        pv = self.pixel_values(frames)
        if self.vz is None:  # the model's own path: LLaVA's feature layer + select strategy
            feats = self.model.model.get_image_features(
                pv, vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            ).pooler_output
            return torch.stack(list(feats))
        zipped = self.vz.compress(self.tower, pv, feature_layer=self.feature_layer)
        return self.model.model.multi_modal_projector(zipped.tokens)

