"""Tiny random checkpoints of the video families streamvz supports beyond LLaVA-1.5.

Each builder makes a config of the real class (a few layers, tiny widths), a random model and
the tokenizer of tests/tiny_models.py (trained here, no hub) with the family's special tokens
and chat template, saves them with `save_pretrained` and returns the directory, so tests load
them back with `from_pretrained` as users would.

Every vision tower sees 8x8 = 64 patches per 112 px frame (patch 14): room for VisionZip to
choose, as on the real 24x24 / 27x27 / 16x16-merged grids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tiny_models import make_tokenizer

IMAGE, VIDEO = "<image>", "<video>"
QWEN_SPECIALS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Chat templates in the shape the real checkpoints ship (content may be a string or a list
# of {"type": "image"|"video"|"text"} parts).
VICUNA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chatml_template(image: str, video: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'video' %}" + video +
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(chat_template: str, chatml: bool, image: str = IMAGE, video: str = VIDEO, extra: dict | None = None):
    """The shared tiny BPE (tests/tiny_models.py) with this family's specials and template.
    `extra`: more named special tokens (attribute -> token), e.g. InternVL's <img>."""
    from transformers import PreTrainedTokenizerFast

    extra = extra or {}
    base = make_tokenizer((QWEN_SPECIALS if chatml else []) + list(extra.values()))
    kw = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chatml:  # Qwen-style LMs: no BOS, turns end with <|im_end|>
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", chat_template=chat_template,
                                   extra_special_tokens={"image_token": image, "video_token": video, **extra}, **kw)


def _vision(cls, **kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=112, patch_size=14)
    base.update(kw)
    return cls(**base)


def _text(cls, vocab_size: int, **kw):
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    base.update(kw)
    return cls(**base)


def _save(model, tokenizer, image_processor, path: Path) -> Path:
    # The processors of these families carry a video processor, which transformers can only
    # build with torchvision (no CPU wheel for our torch here): save the parts instead, as the
    # checkpoints on the hub hold them (tokenizer files + preprocessor_config.json).
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def make_tiny_llava_next_video(path: str | os.PathLike) -> Path:
    """LlavaNextVideoForConditionalGeneration: CLIP tower (CLS), 2x2 average pooling per frame
    (64 patches -> 16 tokens)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessorPil,
                              LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration)

    torch.manual_seed(0)
    tok = _tokenizer(VICUNA_TEMPLATE, chatml=False)
    config = LlavaNextVideoConfig(
        vision_config=_vision(CLIPVisionConfig, projection_dim=32),
        text_config=_text(LlamaConfig, len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids(IMAGE), video_token_id=tok.convert_tokens_to_ids(VIDEO),
        image_grid_pinpoints=[[112, 112], [112, 224], [224, 112], [224, 224]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        spatial_pool_mode="average", spatial_pool_stride=2, image_seq_length=64, video_seq_length=16,
    )
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
        image_grid_pinpoints=config.image_grid_pinpoints)
    return _save(model, tok, image_processor, Path(path))


def make_tiny_onevision(path: str | os.PathLike) -> Path:
    """LlavaOnevisionForConditionalGeneration: SigLIP tower (no CLS), Qwen2 LM, 2x2 bilinear
    pooling (64 patches -> 16 tokens) and one image_newline row per video."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    torch.manual_seed(0)
    tok = _tokenizer(chatml_template("<image>\n", "<video>\n"), chatml=True)
    config = LlavaOnevisionConfig(
        vision_config=_vision(SiglipVisionConfig),
        text_config=_text(Qwen2Config, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids(IMAGE), video_token_id=tok.convert_tokens_to_ids(VIDEO),
        image_grid_pinpoints=[[112, 112], [112, 224], [224, 112], [224, 224]],
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 112, "width": 112}, image_grid_pinpoints=config.image_grid_pinpoints)
    return _save(model, tok, image_processor, Path(path))


def make_tiny_qwen2_5_vl(path: str | os.PathLike) -> Path:
    """Qwen2_5_VLForConditionalGeneration: windowed ViT (blocks 0, 2 windowed; 1, 3 full), 2x2
    patch merger, 3-D M-RoPE. A 112 px frame is an 8x8 patch grid = 16 merged tokens in 4 windows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tok = _tokenizer(chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                     "<|vision_start|><|video_pad|><|vision_end|>"), chatml=True,
                     image="<|image_pad|>", video="<|video_pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], tokens_per_second=2),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return _save(model, tok, image_processor, Path(path))


def load_processor(path: str | os.PathLike):
    """The checkpoint's transformers processor, image-only.

    transformers cannot construct these processor classes without torchvision (they hold a
    video processor; the check for its class fails at import level), and torchvision has no
    wheel for this CPU torch. An image-only subclass skips the check for the absent video
    processor; everything the drop-in touches (`replace_image_token`, `__call__`) is the real class's.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers import (InternVLProcessor, LlavaNextVideoProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor,
                              Qwen3VLProcessor, SmolVLMProcessor)

    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ip = AutoImageProcessor.from_pretrained(path)
    cls, kw = {
        "llava_next_video": (LlavaNextVideoProcessor, dict(patch_size=cfg.vision_config.patch_size,
                                                           vision_feature_select_strategy="default",
                                                           num_additional_image_tokens=1)),
        "llava_onevision": (LlavaOnevisionProcessor, dict(num_image_tokens=64, vision_feature_select_strategy="full",
                                                          vision_aspect_ratio=getattr(cfg, "vision_aspect_ratio", None))),
        "qwen2_5_vl": (Qwen2_5_VLProcessor, {}),
        "qwen3_vl": (Qwen3VLProcessor, {}),
        "smolvlm": (SmolVLMProcessor, dict(image_seq_len=16)),
        "internvl": (InternVLProcessor, dict(image_seq_length=16)),
    }[cfg.model_type]

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template, **kw)


BUILDERS = {
    "llava_next_video": make_tiny_llava_next_video,
    "llava_onevision": make_tiny_onevision,
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
}


_BUILT: dict[str, Path] = {}


def checkpoint(family: str) -> str:
    """Build a family's tiny checkpoint once per process (a temp dir) and return its path."""
    import atexit
    import shutil
    import tempfile

    from tiny_current import BUILDERS as CURRENT  # Qwen3-VL, SmolVLM2, InternVL3

    if family not in _BUILT:
        path = tempfile.mkdtemp(prefix=f"tiny_{family}_")
        atexit.register(shutil.rmtree, path, True)
        _BUILT[family] = {**BUILDERS, **CURRENT}[family](Path(path))
    return str(_BUILT[family])


if __name__ == "__main__":  # build all three into a folder, to poke at them by hand
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_families")
    for name, build in BUILDERS.items():
        print(name, build(out / name), json.loads((out / name / "config.json").read_text())["architectures"])

