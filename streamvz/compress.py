"""VisionZip: keep the visual tokens the encoder attends to most, merge the rest.

Exactly the published algorithm (see docs in README "VisionZip"), computed without
touching the tower's attention implementation: forward hooks on the one scoring
layer's q/k projections capture what we need, every layer keeps SDPA/flash attention,
and the score is one CLS query row per head (O(N)) instead of full attention maps.

    vz = VisionZip(dominant=54, contextual=10)
    out = vz.compress(vision_model, pixel_values, feature_layer=-2)
    out.tokens   # [B, dominant + contextual, D]
    out.indices  # [B, dominant] kept token indices in the encoder sequence (CLS = 0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MERGES = ("reference", "average")


@dataclass
class Compressed:
    tokens: torch.Tensor  # [B, dominant + contextual, D]
    indices: torch.Tensor  # [B, dominant], ascending; CLS (0) first where the tower has one


# ---------------------------------------------------------------------------------------
# Pure tensor pieces (shared with towers that need their own hooks, e.g. Qwen's ViT).


def cls_scores(q_cls: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention from the CLS query to every token, summed over heads.

    q_cls [B, H, d], keys [B, H, N, d] -> [B, N] (index 0 is CLS itself).
    """
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.float(), keys.float()) * scale
    return logits.softmax(dim=-1).sum(dim=1)


def received_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each token receives, averaged over heads and all queries (CLS-less towers).

    queries, keys [B, H, N, d] -> [B, N]. One head at a time keeps memory at B*N*N.
    """
    B, H, N, _ = queries.shape
    total = torch.zeros(B, N, dtype=torch.float32, device=queries.device)
    for h in range(H):
        attn = (queries[:, h].float() @ keys[:, h].float().transpose(1, 2) * scale).softmax(-1)
        total += attn.mean(dim=1)
    return total / H


def select(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    has_cls: bool,
    merge: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant tokens by score, contextual tokens by merging the rest.

    hidden [B, N, D] (feature-layer states), scores [B, N], keys [B, N, Dk] (head-averaged
    keys of the scoring layer). Returns tokens [B, dominant + contextual, D], indices [B, dominant].
    """
    B, N, D = hidden.shape
    if has_cls:  # CLS is one of the dominant tokens; candidates exclude it
        top = scores[:, 1:].topk(dominant - 1, dim=1).indices + 1
        idx = torch.cat([torch.zeros(B, 1, dtype=top.dtype, device=top.device), top], dim=1)
    else:
        idx = scores.topk(dominant, dim=1).indices
    idx = idx.sort(dim=1).values  # original order
    kept = hidden.gather(1, idx.unsqueeze(-1).expand(B, dominant, D))
    if contextual == 0:
        return kept, idx

    rest = torch.ones(B, N, dtype=torch.bool, device=hidden.device)
    rest.scatter_(1, idx, False)
    R = N - dominant
    rest_h = hidden[rest].view(B, R, D)
    rest_k = F.normalize(keys[rest].view(B, R, -1).float(), dim=-1)

    step = max(1, R // contextual)
    targets = torch.arange(0, R, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(R, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)

    sim = rest_k[:, others] @ rest_k[:, targets].transpose(1, 2)  # [B, R - c, c]
    assign = F.one_hot(sim.argmax(dim=2), contextual).to(hidden.dtype)  # [B, R - c, c]
    sums = assign.transpose(1, 2) @ rest_h[:, others]  # [B, c, D]
    counts = assign.sum(dim=1).unsqueeze(-1)  # [B, c, 1]
    target_h = rest_h[:, targets]
    if merge == "reference":  # what the published code does: target + mean(assigned)
        ctx = target_h + sums / counts.clamp(min=1)
    else:  # the paper's wording: average over the target and its assigned tokens
        ctx = (target_h + sums) / (counts + 1)
    return torch.cat([kept, ctx], dim=1), idx


# ---------------------------------------------------------------------------------------
# Towers: where the layers are, which attention module scores, whether there is a CLS.

_HAS_CLS = {  # supported tower classes -> whether the sequence starts with a CLS token
    "CLIPVisionModel": True,
    "CLIPVisionTransformer": True,
    "Dinov2Model": True,
    "SiglipVisionModel": False,
    "SiglipVisionTransformer": False,
}
_LAYER_PATHS = ("encoder.layers", "encoder.layer", "vision_model.encoder.layers")  # across transformers versions


def tower_info(vision_model: torch.nn.Module) -> tuple[torch.nn.ModuleList, bool]:
    """The tower's encoder layers and whether it has a CLS token; ValueError for other towers."""
    name = type(vision_model).__name__
    if name not in _HAS_CLS:
        raise ValueError(
            f"VisionZip does not support vision tower {name}; supported: {', '.join(sorted(_HAS_CLS))}"
        )
    for path in _LAYER_PATHS:
        layers = vision_model
        for part in path.split("."):
            layers = getattr(layers, part, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers, _HAS_CLS[name]
    raise ValueError(f"cannot find the encoder layers of {name}")


def _attention(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def scoring_layer_index(n_layers: int, feature_layer: int) -> int:
    """hidden_states[f] is the output of layer f-1 (f > 0) or of layer n+f (f < 0)."""
    idx = feature_layer - 1 if feature_layer > 0 else n_layers + feature_layer
    if not 0 <= idx < n_layers:
        raise ValueError(f"feature_layer={feature_layer} is outside a tower of {n_layers} layers")
    return idx


class QKCapture:
    """Forward hooks on one attention module's q/k projections; removed on exit. `q`/`k` name the
    submodules whose outputs are the queries/keys the attention uses (e.g. InternViT's q_norm)."""

    def __init__(self, attn: torch.nn.Module, q: str = "q_proj", k: str = "k_proj"):
        self.attn, self.q, self.k, self.handles = attn, None, None, []
        self.names = (q, k)

    def __enter__(self):
        def keep(name):
            def hook(_module, _inputs, output):
                setattr(self, name, output)

            return hook

        q, k = (getattr(self.attn, name) for name in self.names)
        self.handles = [q.register_forward_hook(keep("q")), k.register_forward_hook(keep("k"))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class VisionZip:
    """Compress a vision tower's output to `dominant + contextual` tokens per image."""

    def __init__(self, dominant: int = 54, contextual: int = 10, merge: str = "reference"):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if dominant < 0 or contextual < 0 or dominant + contextual < 1:
            raise ValueError(f"need dominant >= 0, contextual >= 0 and at least one token, got {dominant}+{contextual}")
        self.dominant, self.contextual, self.merge = dominant, contextual, merge

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def check(self, n_tokens: int, has_cls: bool) -> None:
        if has_cls and self.dominant < 1:
            raise ValueError("dominant counts the CLS token, so it must be >= 1 for towers with a CLS token")
        if self.tokens > n_tokens:
            raise ValueError(
                f"dominant + contextual = {self.tokens} exceeds the {n_tokens} tokens the tower produces"
            )

    @torch.inference_mode()
    def compress(self, vision_model, pixel_values: torch.Tensor, feature_layer: int = -2) -> Compressed:
        layers, has_cls = tower_info(vision_model)
        attn = _attention(layers[scoring_layer_index(len(layers), feature_layer)])
        with QKCapture(attn) as cap:
            out = vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[feature_layer]
        B, N, _ = hidden.shape
        self.check(N, has_cls)

        head_dim = attn.head_dim
        scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
        q = cap.q.view(B, N, -1, head_dim).transpose(1, 2)  # [B, H, N, d]
        k = cap.k.view(B, N, -1, head_dim).transpose(1, 2)
        if has_cls:
            scores = cls_scores(q[:, :, 0], k, scale)
        else:
            scores = received_scores(q, k, scale)
        tokens, indices = select(
            hidden, scores, k.mean(dim=1), self.dominant, self.contextual, has_cls, self.merge
        )
        return Compressed(tokens=tokens, indices=indices)

    def __repr__(self) -> str:
        return f"VisionZip(dominant={self.dominant}, contextual={self.contextual}, merge={self.merge!r})"


def split(tokens: int) -> tuple[int, int]:
    """The paper's dominant/contextual split for a budget: 64 -> 54+10, 128 -> 108+20, 192 -> 162+30."""
    contextual = max(1, round(tokens * 10 / 64)) if tokens > 1 else 0
    return tokens - contextual, contextual
