"""Tiny random checkpoints of the current video families: Qwen3-VL (DeepStack), SmolVLM2 and
InternVL3, built like tests/tiny_families.py (real classes from configs, the shared tiny BPE with
the family's specials and chat template, save_pretrained), so tests load them as users would.

Grids are kept small but leave VisionZip room to choose: Qwen3-VL sees 8x8 patches of 16 px
(16 merged tokens) per 128 px frame, SmolVLM 12x12 patches (16 groups after the 3x3 shuffle) per
168 px frame, InternVL 8x8 patches + CLS (16 groups after the 2x2 shuffle) per 112 px frame.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tiny_families import QWEN_SPECIALS, _save, _tokenizer, chatml_template


def make_tiny_qwen3_vl(path: str | os.PathLike, moe: bool = False) -> Path:
    """Qwen3VLForConditionalGeneration: 4-block ViT with learned + 2-D rotary positions, 2x2 merger,
    DeepStack from blocks 1 and 2 into LM layers 0 and 1 (of 3), interleaved M-RoPE. `moe`: the
    Qwen3VLMoeForConditionalGeneration variant (4 experts, 2 per token), same vision path."""
    from transformers import (Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

    torch.manual_seed(0)
    tok = _tokenizer(chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                     "<|vision_start|><|video_pad|><|vision_end|>"), chatml=True,
                     image="<|image_pad|>", video="<|video_pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}
    config = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1, 2]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **experts),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16,
                                               merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _save(model, tok, image_processor, Path(path))


BUILDERS = {
    "qwen3_vl": make_tiny_qwen3_vl,
    "qwen3_vl_moe": lambda path: make_tiny_qwen3_vl(path, moe=True),
}
