"""The drop-in (`streamvz.visionzip`) for the pixel-shuffle families, SmolVLM2 and InternVL3.

Both encode every image crop / tile / video frame as one square tower input whose connector emits
a fixed number of tokens, and both processors write that number from one attribute
(`image_seq_len` / `image_seq_length`). So the drop-in compresses each tower input to the budget
(streamvz.adapters.smolvlm / internvl: VisionZip on the shuffle groups) and sets that attribute to
the budget on the processor instance; the processor's own prompt layout (crops, rows, global
image, video frames and timestamps) stays as it is.
"""
from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compress import VisionZip


def smolvlm(inner, processor, vz: VisionZip, patch) -> None:
    from .adapters.smolvlm import shuffle_groups, smolvlm_visionzip

    members = shuffle_groups(inner)
    vz.check(len(members), has_cls=False)
    patch_size = inner.config.vision_config.patch_size

    def get_image_features(pixel_values, pixel_attention_mask=None, **_kw):
        B, N = pixel_values.shape[:2]
        pv = pixel_values.flatten(0, 1)
        real = (pv == 0).flatten(1).sum(1) != pv[0].numel()  # padding images are all zeros (as the model)
        real[0] |= ~real.any()
        mask = None
        if pixel_attention_mask is not None:  # padded pixels -> patches without any real pixel
            pixels = pixel_attention_mask.flatten(0, 1)[real]
            mask = pixels.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size).sum((-1, -2)) > 0
        tokens, _ = smolvlm_visionzip(inner, pv[real].contiguous(), members, vz, mask)
        counts = real.view(B, N).sum(1).tolist()
        return BaseModelOutputWithPooling(pooler_output=[t.clone().flatten(0, 1) for t in tokens.split(counts)])

    patch.put(inner, "get_image_features", get_image_features)
    patch.swap(processor, "image_seq_len", vz.tokens)


def internvl(inner, processor, vz: VisionZip, patch) -> None:
    from .adapters.internvl import internvl_visionzip, shuffle_groups

    members = shuffle_groups(inner)
    vz.check(len(members), has_cls=False)

    def get_image_features(pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **_kw):
        strategy = vision_feature_select_strategy or inner.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"VisionZip on InternVL needs select strategy 'default' (CLS dropped), got {strategy!r}")
        layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        tokens, _ = internvl_visionzip(inner, pixel_values.to(inner.dtype), members, vz, layer)
        return BaseModelOutputWithPooling(pooler_output=tokens.clone())

    patch.put(inner, "get_image_features", get_image_features)
    patch.swap(processor, "image_seq_length", vz.tokens)


__all__ = ["smolvlm", "internvl"]
