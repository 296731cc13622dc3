"""Tiny random checkpoints of the real model classes, saved and loaded like users' models.

No model hub here: the tokenizer is a byte-level BPE trained on a few sentences in memory,
wrapped in PreTrainedTokenizerFast, so every string encodes; configs are shrunk copies of the
real families. Everything goes through save_pretrained / from_pretrained.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the video? ASSISTANT: A red circle moves to the left.",
    "What colour is the square? Blue. How many objects are there? Three.",
    "The person is holding a cup. Did anyone enter through the back door? No.",
    "0.0s: 0.5s: 1.0s: 12.5s: 60.0s: frame time seconds describe summary",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(extra_specials: list[str] = (), vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_clip_config(image_size: int = 84, hidden: int = 32, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=hidden,
    )


def tiny_siglip_config(image_size: int = 84, hidden: int = 32, layers: int = 3) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, image_size=image_size, patch_size=14,
    )


def tiny_dinov2_config(image_size: int = 84, hidden: int = 32, layers: int = 3) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, mlp_ratio=2,
        image_size=image_size, patch_size=14,
    )


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw,
    )


LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] if m['content'] is not string else m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tiny_llava(path: str, image_size: int = 84, seed: int = 0) -> str:
    """A random LlavaForConditionalGeneration + LlavaProcessor saved at `path` (CLIP tower)."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vision = tiny_clip_config(image_size)
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
