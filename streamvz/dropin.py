"""VisionZip for plain transformers users: one call, one model instance, undoable.

    model, processor = streamvz.visionzip(model, processor, dominant=54, contextual=10)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    streamvz.dropin.remove_visionzip(model, processor)      # back to the original behaviour

What it changes, and only on the objects passed in (the classes stay untouched, so other
instances in the process are unaffected):
  * the model's feature method (an instance attribute shadowing the class's method on the inner
    `model.model`): vision tower -> VisionZip -> the model's projector, `dominant + contextual`
    tokens per image or frame;
  * the processor's placeholder expansion (`replace_image_token` / `replace_video_token`), so the
    prompt holds exactly as many image/video tokens as there are compressed features;
  * for Qwen2.5-VL / Qwen3-VL also `get_rope_index`, so kept tokens keep their own (t, h, w) positions.
The vision tower runs without gradients (VisionZip is inference-only); the projector and the
language model run as usual.

Supported (what is compressed):
  LlavaForConditionalGeneration            images (CLIP: CLS + top patches)
  LlavaNextVideoForConditionalGeneration   videos, per frame (replaces the 2x2 pooling);
                                           images: each anyres crop, + one newline row per image
  LlavaOnevisionForConditionalGeneration   videos, per frame, + the model's newline row per video;
                                           images: each anyres crop, + one newline row per image
  Qwen2_5_VLForConditionalGeneration       images (each its own (1, h, w) grid); videos pass
                                           through unchanged
  Qwen3VLForConditionalGeneration (+ MoE)  images, with their DeepStack features selected and merged
                                           alike; videos pass through unchanged
  SmolVLMForConditionalGeneration          images, each split crop and the global view, and videos
                                           (SmolVLM2 encodes video frames as images)
  InternVLForConditionalGeneration         images (each tile) and videos (each frame)
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compress import VisionZip, tower_info
from .dropin_qwen import qwen
from .dropin_shuffle import internvl, smolvlm

_ATTR = "_streamvz_visionzip"
SUPPORTED = (
    "LlavaForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
    "InternVLForConditionalGeneration",
)


def _family(model) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls.__name__
    raise ValueError(
        f"streamvz.visionzip does not support {type(model).__name__}; supported classes: {', '.join(SUPPORTED)}"
    )


def _feature_layer(config, given) -> int:
    layer = config.vision_feature_layer if given is None else given
    if not isinstance(layer, int):
        raise ValueError(f"VisionZip needs one vision feature layer; this model concatenates layers {layer}")
    return layer


class _Patch:
    """The instance attributes set on the model and processor, so they can be taken off again."""

    def __init__(self):
        self.set: list[tuple[object, str]] = []
        self.swapped: list[tuple[object, str, object]] = []

    def put(self, obj, name: str, fn) -> None:
        if obj is None:
            return
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance")
        setattr(obj, name, fn)
        self.set.append((obj, name))

    def swap(self, obj, name: str, value) -> None:
        """Change an existing instance value (e.g. a processor's tokens per image); undo restores it."""
        if obj is None:
            return
        self.swapped.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name in reversed(self.set):
            if name in vars(obj):
                delattr(obj, name)
        for obj, name, value in reversed(self.swapped):
            setattr(obj, name, value)
        self.set.clear()
        self.swapped.clear()


# -- LLaVA family ----------------------------------------------------------------------------


def _check_budget(inner, vz: VisionZip) -> None:
    """Fail at setup, not mid-generate, when the budget is more than the tower produces."""
    _, has_cls = tower_info(inner.vision_tower)
    vc = inner.config.vision_config
    vz.check((vc.image_size // vc.patch_size) ** 2 + int(has_cls), has_cls)


def _llava(inner, processor, vz: VisionZip, patch: _Patch) -> None:
    _check_budget(inner, vz)
    def get_image_features(pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **_kw):
        # VisionZip keeps CLS as a dominant token, as the reference does, whatever the select strategy
        z = vz.compress(inner.vision_tower, pixel_values, _feature_layer(inner.config, vision_feature_layer))
        feats = inner.multi_modal_projector(z.tokens.clone())  # clone: out of inference mode
        return BaseModelOutputWithPooling(pooler_output=list(feats))

    patch.put(inner, "get_image_features", get_image_features)
    patch.put(processor, "replace_image_token",
              lambda image_inputs, image_idx, **kw: processor.image_token * vz.tokens)


def _num_frames(video_inputs, video_idx) -> int:
    video = video_inputs["pixel_values_videos"][video_idx]
    return len(video) if isinstance(video, (list, tuple)) else int(video.shape[0])


def _video_llava(inner, processor, vz: VisionZip, patch: _Patch, newline: bool) -> None:
    _check_budget(inner, vz)
    def get_video_features(pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **_kw):
        B, T = pixel_values_videos.shape[:2]
        pv = pixel_values_videos.flatten(0, 1)
        z = vz.compress(inner.vision_tower, pv, _feature_layer(inner.config, vision_feature_layer))
        feats = inner.multi_modal_projector(z.tokens.clone()).reshape(B, T * vz.tokens, -1)  # frames in order
        if newline:  # OneVision closes every video with its learned newline row
            feats = torch.cat([feats, inner.image_newline.to(feats.dtype).expand(B, 1, -1)], dim=1)
        return BaseModelOutputWithPooling(pooler_output=feats)

    patch.put(inner, "get_video_features", get_video_features)
    patch.put(processor, "replace_video_token",
              lambda video_inputs, video_idx, **kw:
              processor.video_token * (_num_frames(video_inputs, video_idx) * vz.tokens + int(newline)))


def _anyres_images(inner, processor, vz: VisionZip, patch: _Patch, multi_image_rule: bool) -> None:
    """LLaVA-NeXT-style images (a base view + high-res crops): every crop -> VisionZip, the crops
    of an image in order, then the model's newline row once per image. The spatial unpadding and
    per-row newlines of the original layout have no meaning for selected tokens, so they go.
    `multi_image_rule`: OneVision's convention that images in a multi-image prompt get no crops."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    pinpoints = inner.config.image_grid_pinpoints
    side = inner.config.vision_config.image_size

    def crops(size, patching: bool) -> int:
        size = size.tolist() if hasattr(size, "tolist") else list(size)
        return image_size_to_num_patches(size, pinpoints, side) if patching else 1

    def patching_flags(n_images, batch_num_images):
        if not multi_image_rule or batch_num_images is None:
            return [True] * n_images
        return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]

    def get_image_features(pixel_values, image_sizes, vision_feature_layer=None, vision_feature_select_strategy=None,
                           batch_num_images=None, **_kw):
        counts = [crops(s, p) for s, p in zip(image_sizes, patching_flags(len(image_sizes), batch_num_images))]
        if pixel_values.dim() == 5:  # padded [images, max_crops, 3, S, S]
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])
        z = vz.compress(inner.vision_tower, pixel_values, _feature_layer(inner.config, vision_feature_layer))
        feats = inner.multi_modal_projector(z.tokens.clone())  # [all crops, k, D]
        newline = inner.image_newline.to(feats.dtype)[None]
        per_image = [torch.cat([f.flatten(0, 1), newline]) for f in torch.split(feats, counts)]
        return BaseModelOutputWithPooling(pooler_output=per_image)

    def replace_image_token(image_inputs, image_idx, **_kw):
        nums = image_inputs.get("batch_num_images")
        flags = patching_flags(len(image_inputs["image_sizes"]), nums)
        n = crops(image_inputs["image_sizes"][image_idx], flags[image_idx])
        return processor.image_token * (n * vz.tokens + 1)

    patch.put(inner, "get_image_features", get_image_features)
    patch.put(processor, "replace_image_token", replace_image_token)


# -- public ------------------------------------------------------------------------------------


def visionzip(model, processor=None, dominant: int = 54, contextual: int = 10, merge: str = "reference"):
    """Set up `model` (and `processor`) so generate() sees VisionZip-compressed visual tokens.

    Returns (model, processor): the same objects. Call again to change the budget; undo with
    `remove_visionzip`. Raises ValueError for model classes that are not supported.
    """
    family = _family(model)
    vz = VisionZip(dominant, contextual, merge)
    remove_visionzip(model, processor)
    patch = _Patch()
    inner = model.model
    try:
        if family == "LlavaForConditionalGeneration":
            _llava(inner, processor, vz, patch)
        elif family == "LlavaNextVideoForConditionalGeneration":
            _video_llava(inner, processor, vz, patch, newline=False)
            _anyres_images(inner, processor, vz, patch, multi_image_rule=False)
        elif family == "LlavaOnevisionForConditionalGeneration":
            _video_llava(inner, processor, vz, patch, newline=True)
            _anyres_images(inner, processor, vz, patch, multi_image_rule=True)
        elif family == "SmolVLMForConditionalGeneration":
            smolvlm(inner, processor, vz, patch)
        elif family == "InternVLForConditionalGeneration":
            internvl(inner, processor, vz, patch)
        else:  # the Qwen families
            qwen(inner, processor, vz, patch, deepstack=family != "Qwen2_5_VLForConditionalGeneration")
    except Exception:
        patch.undo()
        raise
    patch.vz = vz
    object.__setattr__(model, _ATTR, patch)  # plain attribute: not a submodule, not saved
    return model, processor


def remove_visionzip(model, processor=None) -> None:
    """Take the drop-in off `model` (and its processor); a no-op where it is not on."""
    patch = vars(model).get(_ATTR)
    if patch is not None:
        patch.undo()
        del model.__dict__[_ATTR]
