"""VisionZip: exact against a plain implementation on eager attention maps; fast path; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import CLIPVisionModel, Dinov2Model, LlavaForConditionalGeneration, SiglipVisionModel

from streamvz import VisionZip
from streamvz.compress import split
from tiny_models import tiny_clip_config, tiny_dinov2_config, tiny_siglip_config

TOWERS = {
    "clip": (CLIPVisionModel, tiny_clip_config),
    "siglip": (SiglipVisionModel, tiny_siglip_config),
    "dinov2": (Dinov2Model, tiny_dinov2_config),
}


def saved_tower(kind, tmp_path, attn="sdpa"):
    cls, cfg = TOWERS[kind]
    torch.manual_seed(0)
    path = tmp_path / kind
    if not path.exists():
        cls(cfg(image_size=112, hidden=64, layers=4)).save_pretrained(path)
    return cls.from_pretrained(path, attn_implementation=attn).eval()


def plain_visionzip(tower, pixel_values, dominant, contextual, has_cls, feature_layer=-2, merge="reference"):
    """Independent, literal implementation on the eager attention weights of every layer."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
    attn = out.attentions[feature_layer]  # [B, H, N, N]: the feature layer's own attention
    hidden = out.hidden_states[feature_layer]
    layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer
    layer = layers[len(layers) + feature_layer]
    norm = layer.layer_norm1 if hasattr(layer, "layer_norm1") else layer.norm1
    mod = layer.self_attn if hasattr(layer, "self_attn") else layer.attention
    x = norm(out.hidden_states[feature_layer - 1])
    B, N, D = hidden.shape
    metric = mod.k_proj(x).view(B, N, -1, mod.head_dim).mean(2)  # keys averaged over heads

    if has_cls:
        score = attn[:, :, 0, 1:].sum(dim=1)
        top = score.topk(dominant - 1, dim=1).indices + 1
        keep = torch.cat([torch.zeros(B, 1, dtype=top.dtype), top], dim=1)
    else:
        keep = attn.mean(dim=1).mean(dim=1).topk(dominant, dim=1).indices
    mask = torch.ones(B, N, dtype=torch.bool).scatter_(1, keep, False)
    dom = hidden.masked_select(~mask.unsqueeze(-1)).view(B, dominant, D)
    if contextual == 0:
        return dom, keep.sort(1).values
    R = N - dominant
    m = metric[mask].view(B, R, -1)
    m = m / m.norm(dim=-1, keepdim=True)
    h = hidden.masked_select(mask.unsqueeze(-1)).view(B, R, D)
    step = max(1, R // contextual)
    tgt = torch.arange(0, R, step)[:contextual]
    other = ~torch.isin(torch.arange(R), tgt)
    sim = torch.bmm(m[:, other], m[:, tgt].transpose(1, 2))
    onehot = torch.zeros(B, int(other.sum()), contextual).scatter_(2, sim.argmax(2, keepdim=True), 1)
    counts = onehot.sum(1).unsqueeze(-1)
    agg = torch.bmm(onehot.transpose(1, 2), h[:, other])
    if merge == "reference":
        ctx = h[:, tgt] + agg / counts.clamp(min=1)
    else:
        ctx = (h[:, tgt] + agg) / (counts + 1)
    return torch.cat([dom, ctx], dim=1), keep.sort(1).values


@pytest.mark.parametrize("kind,has_cls", [("clip", True), ("siglip", False), ("dinov2", True)])
@pytest.mark.parametrize("dominant,contextual,merge", [(54, 10, "reference"), (20, 5, "average"), (7, 0, "reference")])
def test_exact_against_plain_eager(tmp_path, kind, has_cls, dominant, contextual, merge):
    torch.manual_seed(1)
    pv = torch.randn(3, 3, 112, 112)
    fast = saved_tower(kind, tmp_path)
    eager = saved_tower(kind, tmp_path, attn="eager")
    with torch.no_grad():
        want_tokens, want_idx = plain_visionzip(eager, pv, dominant, contextual, has_cls, merge=merge)
    out = VisionZip(dominant, contextual, merge=merge).compress(fast, pv, feature_layer=-2)
    assert out.tokens.shape == (3, dominant + contextual, fast.config.hidden_size)
    assert torch.equal(out.indices, want_idx)
    torch.testing.assert_close(out.tokens, want_tokens, atol=1e-5, rtol=1e-5)
    if has_cls:
        assert (out.indices[:, 0] == 0).all()
    assert (out.indices.diff(dim=1) > 0).all()  # original order


class OpCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sdpa, self.softmax_shapes = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.sdpa += 1
        if getattr(func, "__name__", "") == "softmax":
            self.softmax_shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_fast_path_keeps_sdpa_and_computes_no_attention_matrix(tmp_path, kind):
    tower = saved_tower(kind, tmp_path)
    n_layers = tower.config.num_hidden_layers
    pv = torch.randn(2, 3, 112, 112)
    with OpCounter() as ops:
        VisionZip(54, 10).compress(tower, pv)
    assert tower.config._attn_implementation == "sdpa"
    assert ops.sdpa == n_layers  # every layer, the scoring one included, ran fused attention
    N = (112 // 14) ** 2 + 1
    assert not any(len(s) == 4 and s[-1] == N and s[-2] == N for s in ops.softmax_shapes)
    assert ops.softmax_shapes == [(2, tower.config.num_attention_heads, N)]  # one CLS row per head
    projections = [m for n, m in tower.named_modules() if n.endswith(("q_proj", "k_proj"))]
    assert projections and all(not m._forward_hooks for m in projections)  # our hooks removed again


def test_bf16_runs_and_agrees_on_most_tokens(tmp_path):
    tower = saved_tower("clip", tmp_path)
    pv = torch.randn(2, 3, 112, 112)
    ref = VisionZip(54, 10).compress(tower, pv)
    low = VisionZip(54, 10).compress(tower.to(torch.bfloat16), pv.to(torch.bfloat16))
    assert low.tokens.dtype == torch.bfloat16 and low.tokens.shape == ref.tokens.shape
    same = (low.indices.unsqueeze(-1) == ref.indices.unsqueeze(1)).any(-1).float().mean()
    assert same > 0.8


def test_bad_arguments_raise_value_errors(tmp_path):
    tower = saved_tower("clip", tmp_path)  # 65 tokens
    pv = torch.randn(1, 3, 112, 112)
    with pytest.raises(ValueError, match="exceeds the 65 tokens"):
        VisionZip(60, 10).compress(tower, pv)
    with pytest.raises(ValueError, match="CLS"):
        VisionZip(0, 10).compress(tower, pv)
    with pytest.raises(ValueError, match="does not support vision tower LlavaForConditionalGeneration"):
        VisionZip(54, 10).compress(torch.nn.Module.__new__(LlavaForConditionalGeneration), pv)
    with pytest.raises(ValueError, match="merge"):
        VisionZip(54, 10, merge="max")
    with pytest.raises(ValueError, match="at least one token"):
        VisionZip(0, 0)
    with pytest.raises(ValueError, match="feature_layer"):
        VisionZip(54, 10).compress(tower, pv, feature_layer=-9)


def test_standard_splits():
    assert split(64) == (54, 10) and split(128) == (108, 20) and split(192) == (162, 30)


# ---- LLaVA-1.5 adapter -------------------------------------------------------------------


def test_llava_adapter_full_tokens_match_generate(tiny_llava):
    from transformers import AutoProcessor

    from streamvz.adapters import load_adapter

    adapter = load_adapter(tiny_llava, tokens_per_frame=None)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    prompt = "USER: <image>\nWhat is in the video? ASSISTANT:"
    inputs = processor(images=[frame], text=prompt, return_tensors="pt")
    want = model.generate(**inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    want = want[0, inputs["input_ids"].shape[1]:]

    tok = adapter.tokenizer
    before = tok("USER: ", add_special_tokens=False, return_tensors="pt").input_ids
    after = tok("\nWhat is in the video? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    image = adapter.encode_frames(frame[None])
    assert image.shape == (1, 36, model.config.text_config.hidden_size)
    embeds = torch.cat([adapter.embed(before), image, adapter.embed(after)], dim=1)
    got = model.generate(inputs_embeds=embeds, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0]
    assert got.tolist() == want.tolist()


def test_llava_adapter_compressed(tiny_llava):
    from streamvz.adapters import load_adapter

    adapter = load_adapter(tiny_llava, tokens_per_frame=16)
    frames = np.random.default_rng(1).integers(0, 255, (4, 64, 80, 3), dtype=np.uint8)
    emb = adapter.encode_frames(frames)
    assert emb.shape == (4, 16, adapter.model.config.text_config.hidden_size)
    assert adapter.tokens_per_frame == 16
    with pytest.raises(ValueError, match="exceeds"):
        load_adapter(tiny_llava, tokens_per_frame=64)  # the tiny tower has 37 tokens
    with pytest.raises(ValueError, match="uint8"):
        adapter.encode_frames(frames.astype(np.float32))


def test_load_adapter_errors(tmp_path, tiny_llava):
    import json

    from streamvz.adapters import load_adapter
    from streamvz.errors import StreamError

    with pytest.raises(StreamError) as e:
        load_adapter(str(tmp_path))  # a directory without config.json
    assert e.value.code == "model_not_found" and "config.json" in e.value.message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(StreamError) as e:
        load_adapter(str(tmp_path))
    assert e.value.code == "unsupported_model" and "'bert'" in e.value.message and "llava" in e.value.message


def test_adapter_rejects_badly_shaped_frames(tiny_llava):
    from streamvz.adapters import load_adapter

    adapter = load_adapter(tiny_llava, tokens_per_frame=16)
    with pytest.raises(ValueError, match=r"\[T,H,W,3\]"):
        adapter.encode_frames(np.zeros((2, 2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[H,W,3\]"):
        adapter.encode_frames(np.zeros((2, 8, 8, 4), dtype=np.uint8))  # RGBA
    with pytest.raises(ValueError, match="no frames"):
        adapter.encode_frames([])
    with pytest.raises(ValueError, match="dominant >= 0"):
        VisionZip(-1, 10)
