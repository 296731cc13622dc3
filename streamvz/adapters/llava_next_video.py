"""LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration, CLIP tower) as a streamvz adapter.

Each streamed frame is what the model calls a one-frame video: CLIP at the feature layer,
CLS dropped, 2x2 average pooling (24x24 -> 12x12 = 144 tokens at 336 px), projector.
With VisionZip the pooling is replaced: CLIP -> VisionZip (dominant incl. CLS + contextual)
-> projector, so a frame costs exactly the budget.

`FrameAdapter` here is the shared loading/preprocessing for the LLaVA-style video families
(OneVision subclasses it). It loads the tokenizer and image processor, not AutoProcessor:
these families' processors carry a video processor that transformers builds only with
torchvision, which streamvz does not need.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextVideoForConditionalGeneration

from ..compress import VisionZip, split
from .base import Adapter, ChatFormat, eos_ids
from .frames import as_frame_list
from .llava import DEFAULT_SYSTEM, LLAVA_CHAT, pick_device, pick_dtype


def _video_normalisation(model: str, image_processor) -> tuple[list, list, float]:
    """(mean, std, rescale) of the checkpoint's video processor, read from its JSON (building
    the video processor itself would need torchvision); the image processor's otherwise."""
    from transformers.utils import cached_file

    mean, std = image_processor.image_mean, image_processor.image_std
    rescale = getattr(image_processor, "rescale_factor", 1 / 255)
    path = cached_file(model, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path:
        with open(path) as f:
            cfg = json.load(f)
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        rescale = cfg.get("rescale_factor", rescale)
    return list(mean), list(std), float(rescale)


class FrameAdapter(Adapter):
    """Common parts: load, frame preprocessing, eos, positions, the LM step."""

    model_class: type
    chat: ChatFormat
    default_system: str = ""

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None,
                 merge: str = "reference", **load_kwargs):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.model = self.model_class.from_pretrained(model, dtype=self.dtype, **load_kwargs).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        self.norm = _video_normalisation(model, self.image_processor)
        cfg = self.model.config
        self.budget = tokens_per_frame
        self.vz = None
        if tokens_per_frame is not None:
            self.vz = VisionZip(*split(tokens_per_frame), merge=merge)
        text_cfg = cfg.get_text_config()
        self.max_position_embeddings = text_cfg.max_position_embeddings
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)

    # -- preprocessing: uint8 frames -> normalised [T, 3, S, S] on the device -------------------
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, rescale = self.norm
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x * rescale - mean) / std).to(self.device, self.dtype)

    @staticmethod
    def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)

    def pixel_values(self, frames) -> torch.Tensor:  # -> [T, 3, S, S]
        raise NotImplementedError

    def _tower_input(self, frames) -> torch.Tensor:
        return torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() for f in as_frame_list(frames)])

    def _feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"VisionZip needs one vision feature layer; this checkpoint concatenates {layer}")
        return layer

    def _zip(self, pv: torch.Tensor) -> torch.Tensor:
        """VisionZip on the tower, then the projector: [T, budget, D]."""
        zipped = self.vz.compress(self.model.model.vision_tower, pv, feature_layer=self._feature_layer())
        self.last_indices = zipped.indices
        return self.model.model.multi_modal_projector(zipped.tokens)



class LlavaNextVideoAdapter(FrameAdapter):
    model_class = LlavaNextVideoForConditionalGeneration
    chat = LLAVA_CHAT  # LLaVA-NeXT-Video-7B speaks vicuna v1 like LLaVA-1.5
    default_system = DEFAULT_SYSTEM

    def __init__(self, model: str, tokens_per_frame: int | None = 64, device=None, dtype=None, **kw):
        super().__init__(model, tokens_per_frame, device, dtype, **kw)
        vc = self.model.config.vision_config
        self.size = vc.image_size
        grid = vc.image_size // vc.patch_size
        stride = self.model.config.spatial_pool_stride
        self.full_tokens = (grid // stride) ** 2  # what the pooler leaves per frame
        if self.vz is not None:
            self.vz.check(grid * grid + 1, has_cls=True)  # CLIP's sequence includes CLS
        self.tokens_per_frame = self.budget or self.full_tokens

    def pixel_values(self, frames) -> torch.Tensor:
        """As the video processor does: shortest edge to the tower size, centre crop, normalise."""
        x = self._tower_input(frames)
        h, w = x.shape[-2:]
        s = self.size
        nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
        x = self._resize(x, nh, nw)
        top, left = (nh - s) // 2, (nw - s) // 2
        return self._normalise(x[..., top:top + s, left:left + s])

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:
        pv = self.pixel_values(frames)
        if self.vz is None:  # the model's own video path, each frame a one-frame video
            return self.model.model.get_video_features(pv[:, None]).pooler_output
        return self._zip(pv)
