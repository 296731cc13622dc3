"""What the engine needs from a model family. One adapter per family implements it.

An adapter owns a loaded transformers model and answers four questions:
  * frames -> embeddings:   encode_frames(uint8 [T,H,W,3]) -> [T, k, D]  (k = tokens per frame)
  * token ids -> embeddings: embed(ids [B,L]) -> [B, L, D]
  * one LM step:            forward(inputs_embeds, cache, position_ids, attention_mask) -> logits [B, 1, V]
  * chat text pieces:        ChatFormat (system / user turn / end of turn / frame marker)
Everything is tensors in, tensors out; the engine owns the cache, positions and policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChatFormat:
    """Text pieces the engine concatenates; `{}` is filled with the system prompt / question."""

    system: str  # e.g. "{} " or "<|im_start|>system\n{}<|im_end|>\n"
    user: str  # the question plus the assistant's generation prompt, e.g. "USER: {} ASSISTANT:"
    end_of_turn: str  # appended after an answer, e.g. "</s>" or "<|im_end|>\n"
    frame_prefix: str = "{:.1f}s:"  # timestamp marker before each frame's tokens
    frame_suffix: str = "\n"


class Adapter:
    """Base class; subclasses set the attributes below in __init__."""

    model: torch.nn.Module  # the full transformers model
    tokenizer: object  # a transformers tokenizer
    chat: ChatFormat
    device: torch.device
    dtype: torch.dtype
    tokens_per_frame: int  # rows per frame that encode_frames returns
    eos_token_ids: tuple[int, ...]
    max_position_embeddings: int

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:  # uint8 [T,H,W,3] -> [T, k, D]
        raise NotImplementedError

    rope_dims: int = 1  # 3 for M-RoPE (Qwen2.5-VL): position_ids are then [3, B, L]

    def encode_frames_positioned(self, frames) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings plus each token's position offset from its frame's start position.

        Returns ([T, k, D], None) for plain 1-D RoPE (offsets 0..k-1), or ([T, k, D],
        [T, rope_dims, k]) where a model needs its own layout (Qwen's (t, h, w) ids).
        A frame then spans max(offset) + 1 positions.
        """
        return self.encode_frames(frames), None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D]
        return self.model.get_input_embeddings()(ids.to(self.device))

    @torch.inference_mode()
    def forward(self, inputs_embeds, cache, position_ids, attention_mask=None, logits_to_keep: int = 1):
        """One language-model step over new embeddings [B, L, W], appending to `cache`; returns
        logits [B, logits_to_keep, V].

        Every transformers family we wrap takes inputs_embeds + explicit position ids ([B, L], or
        [3, B, L] for M-RoPE: the engine owns positions, since a slot's length stops matching them
        after eviction) and a prepared 4-D mask [B, 1, L, S] (rows of several sessions, padded),
        which transformers uses as given.
        """
        out = self.model(
            inputs_embeds=inputs_embeds.to(self.device, self.dtype), cache=cache,
            position_ids=position_ids.to(self.device), attention_mask=attention_mask, use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the generation config's (one or a list) plus the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = list(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return tuple(eos)
