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
from tiny_models import make_tokenizer

INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
SMOLVLM_SPECIALS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
# SmolVLM2's chat template (as transformers' SmolVLMProcessor ships it)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


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


def make_tiny_smolvlm(path: str | os.PathLike) -> Path:
    """SmolVLMForConditionalGeneration: SigLIP-style tower (no CLS) on 168 px = 12x12 patches,
    pixel shuffle s = 3 (SmolVLM2-2.2B's factor) -> 16 tokens per frame, Llama LM."""
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(0)
    base = make_tokenizer(SMOLVLM_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base._tokenizer, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        unk_token="<unk>", pad_token="<pad>", chat_template=SMOLVLM_TEMPLATE,
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    config = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=168, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        scale_factor=3, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    image_processor = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": 168},
                                               max_image_size={"longest_edge": 168},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _save(model, tok, image_processor, Path(path))


def make_tiny_internvl(path: str | os.PathLike) -> Path:
    """InternVLForConditionalGeneration: InternViT-style tower with CLS on 112 px = 8x8 patches,
    pixel shuffle 0.5 -> 16 tokens per frame, Qwen2 LM, <img><IMG_CONTEXT>...</img> prompts."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    tok = _tokenizer(chatml_template("<IMG_CONTEXT>\n", "<video>\n"), chatml=True, extra=INTERNVL_SPECIALS)
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=[112, 112], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=16, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, crop_to_patches=False,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(model, tok, image_processor, Path(path))


BUILDERS = {
    "qwen3_vl": make_tiny_qwen3_vl,
    "qwen3_vl_moe": lambda path: make_tiny_qwen3_vl(path, moe=True),
    "smolvlm": make_tiny_smolvlm,
    "internvl": make_tiny_internvl,
}
