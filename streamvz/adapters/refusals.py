"""Why a checkpoint cannot be streamed, in words a user can act on.

streamvz's rolling cache evicts whole frames from the middle of the context and rotates the kept
keys back to contiguous positions. That needs every language-model layer to keep one RoPE'd key
and value per token (full attention). Two kinds of layer do not:
  * sliding-window attention (Gemma 3, Gemma 2-based PaliGemma 2, Mistral-style windows): the
    layer keeps only its last W keys, so frames older than W tokens are already gone from it and
    an eviction would have to remove tokens that layer no longer has;
  * linear attention (Qwen3.5's Gated DeltaNet layers, Mamba-style hybrids): the layer keeps one
    recurrent state summing every token it saw; a frame cannot be taken out of a sum of all of them.
The decision reads only config.json, so no weights are loaded to refuse a model.
"""
from __future__ import annotations

from collections import Counter

# model_type -> the family's name as users know it (refused families are named, not just typed)
KNOWN_NAMES = {
    "gemma3": "Gemma 3", "gemma3_text": "Gemma 3", "gemma3n": "Gemma 3n", "paligemma": "PaliGemma",
    "qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE", "qwen3_5_text": "Qwen3.5",
    "qwen3_next": "Qwen3-Next", "llama4": "Llama 4", "mistral3": "Mistral 3", "internvl_chat": "InternVL",
}

_LAYER_WORDS = {
    "sliding_attention": "sliding-window attention",
    "linear_attention": "linear attention",
    "chunked_attention": "chunked (local) attention",
    "mamba": "state-space (Mamba)",
    "conv": "convolution",
}

_WHY = {
    "sliding_attention": "a sliding-window layer keeps only its last {window} keys, so it has already "
                         "dropped older frames and cannot evict a chosen frame or re-rotate what it keeps",
    "linear_attention": "a linear-attention layer keeps one recurrent state summing every token it saw, "
                        "so a frame cannot be evicted from it",
    "chunked_attention": "a chunked-attention layer attends only within fixed chunks of positions, which "
                         "eviction and re-rotation would reshuffle",
}


# model types whose checkpoints have a supported transformers-format twin
HINTS = {
    "internvl_chat": "this is InternVL's remote-code format; its transformers conversions "
                     "(e.g. OpenGVLab/InternVL3-8B-hf, model type 'internvl') are supported",
}


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("llm_config") or config


def non_full_layers(config: dict) -> Counter:
    """Layer kinds of the language model other than full attention, with their counts."""
    text = _text_config(config)
    kinds = Counter(t for t in (text.get("layer_types") or []) if t != "full_attention")
    if not kinds and text.get("use_sliding_window") and text.get("sliding_window"):
        kinds["sliding_attention"] = int(text.get("num_hidden_layers") or 0) or 1
    return kinds


def refusal(config: dict, supported: dict[str, str]) -> str:
    """The message for a checkpoint whose model_type has no adapter. `supported`: model_type -> name."""
    model_type = config.get("model_type", "")
    name = KNOWN_NAMES.get(model_type)
    family = f"{name} (model type {model_type!r})" if name else f"model type {model_type!r}"
    listing = ", ".join(f"{n} ({t})" for t, n in supported.items())
    kinds = non_full_layers(config)
    if not kinds:
        hint = f" ({HINTS[model_type]})" if model_type in HINTS else ""
        return f"{family} is not supported{hint}; supported families: {listing}"
    text = _text_config(config)
    total = text.get("num_hidden_layers") or len(text.get("layer_types") or []) or "?"
    layers = ", ".join(f"{n} of {total} layers use {_LAYER_WORDS.get(k, k)}" for k, n in kinds.items())
    why = "; ".join(_WHY[k].format(window=text.get("sliding_window") or "W") for k in kinds if k in _WHY)
    return (f"{family} cannot be streamed: its language model is not full attention ({layers}). "
            f"streamvz's rolling KV cache evicts old frames and re-rotates the kept keys, which needs "
            f"every layer to keep every token's key and value" + (f"; {why}" if why else "") +
            f". Supported families: {listing}")
