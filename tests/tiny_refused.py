"""Tiny random checkpoints of VLMs streamvz refuses, shaped like the real ones: Gemma 3
(5 sliding-window layers to 1 global, as Gemma3's default pattern) and Qwen3.5 (3 Gated DeltaNet
linear-attention layers to 1 full). Saved with save_pretrained, as a user's checkpoint would be."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tiny_models import make_tokenizer


def _save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_tiny_gemma3(path: str | os.PathLike) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=64,
                         max_position_embeddings=1024),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        mm_tokens_per_image=4,
    )
    return _save(Gemma3ForConditionalGeneration(config).eval(), Path(path))


def make_tiny_qwen3_5(path: str | os.PathLike) -> Path:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3_5Config(
        text_config=dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32),
    )
    return _save(Qwen3_5ForConditionalGeneration(config).eval(), Path(path))
