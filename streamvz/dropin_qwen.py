"""The drop-in (`streamvz.visionzip`) for Qwen2.5-VL and Qwen3-VL: images compressed, each image
its own (1, h, w) grid; the kept tokens keep their own (t, h, w) M-RoPE ids through an instance
`get_rope_index`; videos pass through in the model's own layout.

Qwen3-VL also gets DeepStack right: `get_image_features` returns, for every image, the selected and
merged main tokens and each DeepStack level's features for the same tokens (one VisionZip over all
levels, see streamvz.adapters.qwen3_vl), which the model then scatters to the image positions.
"""
from __future__ import annotations

import itertools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compress import VisionZip


def _zipper(inner, vz: VisionZip, deepstack: bool):
    """(pixel_values, grid) -> QwenZipped, memoised: get_rope_index and get_image_features see the
    same images in one generate call."""
    from .adapters.qwen2_5_vl import qwen_visionzip, zip_merged
    from .adapters.qwen3_vl import deepstack_scores

    memo: dict = {}
    merge = inner.config.vision_config.spatial_merge_size

    def zipped(pixel_values, grid):
        key = (pixel_values.data_ptr(), tuple(pixel_values.shape), tuple(grid.flatten().tolist()))
        if memo.get("key") != key:
            z = (zip_merged(*deepstack_scores(inner.visual, pixel_values, grid), grid, merge, vz) if deepstack
                 else qwen_visionzip(inner.visual, pixel_values, grid, vz))
            memo.update(key=key, z=z)
        return memo["z"]

    return zipped, memo


def _image_features(inner, zipped, deepstack: bool):
    def get_image_features(pixel_values, image_grid_thw=None, **_kw):
        z = zipped(pixel_values, image_grid_thw)
        if not deepstack:
            return BaseModelOutputWithPooling(pooler_output=tuple(t.clone() for t in z.tokens))
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        width = inner.config.get_text_config().hidden_size
        per_image = [t.clone().split(width, dim=-1) for t in z.tokens]  # [main, level 1, ...] per image
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(p[0] for p in per_image),
            deepstack_features=[tuple(p[lv] for p in per_image) for lv in range(1, len(per_image[0]))])

    return get_image_features


def _video_layout(inner, deepstack: bool, video_grid_thw, second_per_grid_ts):
    """The model's own positions for each video group in the prompt: a function pos -> (ids, span)."""
    merge = inner.config.vision_config.spatial_merge_size
    grids = video_grid_thw if video_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
    if deepstack:  # Qwen3-VL: every frame is its own group (timestamps between frames)
        grids = torch.repeat_interleave(grids, grids[:, 0], dim=0)
        grids[:, 0] = 1
        grids = iter(grids)
        return lambda pos: _span(inner.get_vision_position_ids(pos, (g := next(grids)), 1, merge), g, merge)
    per_second = inner.config.vision_config.tokens_per_second
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else itertools.repeat(1))
    grids = iter(grids)
    return lambda pos: _span(inner.get_vision_position_ids(pos, (g := next(grids)), 1, merge,
                                                           per_second * next(seconds)), g, merge)


def _span(ids, grid, merge):
    return ids.cpu(), max(int(grid[1]), int(grid[2])) // merge


def qwen(inner, processor, vz: VisionZip, patch, deepstack: bool) -> None:
    zipped, memo = _zipper(inner, vz, deepstack)

    def get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, pixel_values=None, **_kw):
        """The model's 3-D positions with each image replaced by its kept tokens' own (t, h, w)
        offsets; an image then spans max(offset) + 1 positions (as in streamvz's engine)."""
        offsets = []
        if pixel_values is not None:
            offsets = zipped(pixel_values, image_grid_thw).offsets
        elif image_grid_thw is not None:
            if "z" not in memo:
                raise RuntimeError("get_rope_index needs pixel_values before the images are encoded")
            offsets = memo["z"].offsets
        images = iter(offsets)
        video = _video_layout(inner, deepstack, video_grid_thw, second_per_grid_ts)
        position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        deltas = []
        for b in range(input_ids.shape[0]):
            types = mm_token_type_ids[b]
            keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(types, dtype=torch.bool)
            types = types[keep]
            pieces, pos = [], 0
            for kind, group in itertools.groupby(types.tolist()):
                n = len(list(group))
                if kind == 0:  # text
                    pieces.append(torch.arange(n).expand(3, n) + pos)
                    pos += n
                elif kind == 1:  # a compressed image
                    off = next(images).cpu()
                    if off.shape[1] != n:
                        raise ValueError(f"an image has {n} placeholder tokens but VisionZip keeps {off.shape[1]}")
                    pieces.append(off + pos)
                    pos += int(off.max()) + 1
                else:  # a video (a Qwen3-VL frame): the model's own layout, not compressed
                    ids, span = video(pos)
                    pieces.append(ids)
                    pos += span
            flat = torch.cat(pieces, dim=1).to(position_ids)
            position_ids[:, b, keep] = flat
            deltas.append(int(flat.max()) + 1 - len(types))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    patch.put(inner, "get_image_features", _image_features(inner, zipped, deepstack))
    patch.put(inner, "get_rope_index", get_rope_index)
    patch.put(processor, "replace_image_token",
              lambda image_inputs, image_idx, **kw: processor.image_token * vz.tokens)
