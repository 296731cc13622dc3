"""Model families. `load_adapter` picks the adapter from the checkpoint's config."""
from __future__ import annotations

import json
import os

from ..errors import StreamError
from .base import Adapter, ChatFormat
from .refusals import refusal

# config.model_type -> "module:Class" (imported lazily so one family's imports never slow another)
FAMILIES = {
    "llava": "streamvz.adapters.llava:LlavaAdapter",
    "llava_next_video": "streamvz.adapters.llava_next_video:LlavaNextVideoAdapter",
    "llava_onevision": "streamvz.adapters.onevision:OnevisionAdapter",
    "qwen2_5_vl": "streamvz.adapters.qwen2_5_vl:Qwen2_5_VLAdapter",
    "qwen3_vl": "streamvz.adapters.qwen3_vl:Qwen3VLAdapter",
    "qwen3_vl_moe": "streamvz.adapters.qwen3_vl:Qwen3VLMoeAdapter",
    "smolvlm": "streamvz.adapters.smolvlm:SmolVLMAdapter",
    "internvl": "streamvz.adapters.internvl:InternVLAdapter",
}
NAMES = {  # model_type -> the family's name, for messages and docs
    "llava": "LLaVA-1.5",
    "llava_next_video": "LLaVA-NeXT-Video",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "smolvlm": "SmolVLM2",
    "internvl": "InternVL3",
}
EMBEDDED = {"streamvz-tiny": "streamvz.tiny:load_tiny"}


def _config(model: str) -> dict:
    """The checkpoint's config.json as a dict (no weights read)."""
    cfg = os.path.join(model, "config.json")
    if os.path.isdir(model):
        if not os.path.exists(cfg):
            raise StreamError("model_not_found", f"{model} has no config.json")
        with open(cfg) as f:
            return json.load(f)
    from transformers import AutoConfig  # a hub id: works only where a hub or its cache is reachable

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as e:  # noqa: BLE001 - any failure to resolve means the same thing to the caller
        raise StreamError("model_not_found", f"cannot load model {model!r}: {e}") from None


def _resolve(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def load_adapter(model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw) -> Adapter:
    """Load a model by local path, hub id or embedded name, wrapped in its family's adapter."""
    if model in EMBEDDED:
        return _resolve(EMBEDDED[model])(tokens_per_frame=tokens_per_frame, device=device, dtype=dtype, **kw)
    config = _config(model)
    model_type = config.get("model_type", "")
    if model_type not in FAMILIES:
        raise StreamError("unsupported_model", refusal(config, NAMES))
    return _resolve(FAMILIES[model_type])(model, tokens_per_frame=tokens_per_frame, device=device, dtype=dtype, **kw)


__all__ = ["Adapter", "ChatFormat", "load_adapter", "FAMILIES", "NAMES"]
