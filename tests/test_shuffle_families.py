"""SmolVLM2 and InternVL3 VisionZip against a literal implementation: the eager attention map of
the scoring layer, scores summed over each s x s block of the patch grid (the geometry of the
pixel shuffle, written out), the top blocks kept; kept rows are the model's own tokens."""
import pytest
import torch

from test_families import cpu_adapter, frames
from tiny_families import checkpoint

GEOMETRY = {"smolvlm": (12, 3), "internvl": (8, 2)}  # patches per side, shuffle factor


@torch.no_grad()
def literal_kept(ad, family, imgs, dominant):
    pv = ad.pixel_values(imgs)
    inner = ad.model.model
    if family == "smolvlm":
        layer = inner.vision_model.encoder.layers[-1]
        run = lambda: inner.get_image_features(pv[:, None])  # noqa: E731
    else:
        layer = inner.vision_tower.encoder.layer[-1]
        run = lambda: inner.get_image_features(pv, vision_feature_layer=-1, vision_feature_select_strategy="default")  # noqa: E731
    seen = {}
    hook = layer.register_forward_pre_hook(
        lambda _m, args, kw: seen.update(x=args[0] if args else kw["hidden_states"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    if family == "smolvlm":
        attn = layer.self_attn
        x = layer.layer_norm1(seen["x"])
        q, k = attn.q_proj(x), attn.k_proj(x)
    else:
        attn = layer.attention
        x = layer.layernorm_before(seen["x"])
        q, k = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x))
    B, L, _ = q.shape
    q = q.view(B, L, attn.num_heads, -1).transpose(1, 2)
    k = k.view(B, L, attn.num_heads, -1).transpose(1, 2)
    maps = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # [B, H, L, L]
    if family == "smolvlm":  # no CLS: attention received, averaged over heads and queries
        patch = maps.mean(dim=(1, 2))
    else:  # CLS row, summed over heads; CLS's own column dropped (the LM never sees CLS)
        patch = maps[:, :, 0, 1:].sum(1)
    side, s = GEOMETRY[family]
    grid = patch.view(B, side, side)
    g = side // s
    blocks = torch.stack([grid[:, r * s:(r + 1) * s, c * s:(c + 1) * s].sum((1, 2))
                          for r in range(g) for c in range(g)], dim=1)
    return [sorted(sorted(range(g * g), key=lambda j: float(row[j]))[-dominant:]) for row in blocks]


@pytest.mark.parametrize("family", list(GEOMETRY))
def test_shuffle_group_selection_matches_literal(family):
    path = checkpoint(family)
    ad = cpu_adapter(path, 10)
    full = cpu_adapter(path, None)
    imgs = frames(3, seed=11, h=96, w=140)
    tokens = ad.encode_frames(imgs)
    assert tokens.shape[1] == 10
    want = literal_kept(ad, family, imgs, ad.vz.dominant)
    assert ad.last_indices.tolist() == want
    own = full.encode_frames(imgs)
    for i, kept in enumerate(want):
        torch.testing.assert_close(tokens[i, :ad.vz.dominant], own[i, kept])
