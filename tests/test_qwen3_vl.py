"""Qwen3-VL specifics on the tiny checkpoint: DeepStack under VisionZip (the features the LM
receives are the selected/merged ones, checked against a literal implementation on eager attention
maps), the extra-channel rows being exactly the model's own computation, and interleaved M-RoPE
moving as one rotation per pair (what the rolling cache's re-rotation assumes)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from streamvz.kv import rope_inv_freq
from streamvz.engine import Engine
from test_families import SYSTEM, cpu_adapter, feed, frames
from tiny_families import checkpoint


@torch.no_grad()
def literal_visionzip(ad, imgs, dominant: int, contextual: int):
    """VisionZip on Qwen3-VL step by step, one frame at a time: the full softmax attention map of
    the last ViT block, attention received averaged over heads and queries, summed per 2x2 group;
    top groups kept; every step-th remaining group a target, each other group joining its most
    similar target (cosine of group-mean keys); each feature level (main and every DeepStack level,
    from the model's own mergers) merged as target + mean(assigned). -> [(kept, [levels][k, D])]."""
    visual, block = ad.visual, ad.visual.blocks[-1]
    pv, grid = ad.pixel_values(imgs)
    seen = {}
    hook = block.register_forward_pre_hook(
        lambda _m, args, kw: seen.update(x=args[0], rope=kw["position_embeddings"]), with_kwargs=True)
    try:
        out = ad.model.model.get_image_features(pv, grid)
    finally:
        hook.remove()
    x = block.norm1(seen["x"])
    L, H = x.shape[0], block.attn.num_heads
    q, k, _ = block.attn.qkv(x).view(L, 3, H, -1).unbind(1)
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, *seen["rope"])
    n = L // len(imgs)
    results = []
    for i in range(len(imgs)):
        sl = slice(i * n, (i + 1) * n)
        maps = (torch.einsum("qhd,khd->hqk", q_rot[sl].float(), k_rot[sl].float()) * block.attn.scaling).softmax(-1)
        groups = maps.mean(dim=(0, 1)).view(-1, 4).sum(1)
        keys = F.normalize(k[sl].float().mean(1).view(-1, 4, k.shape[-1]).mean(1), dim=-1)
        M = len(groups)
        kept = sorted(sorted(range(M), key=lambda j: float(groups[j]))[-dominant:])
        rest = [j for j in range(M) if j not in kept]
        targets = rest[::max(1, len(rest) // contextual)][:contextual]
        assigned = {t: [] for t in targets}
        for j in rest:
            if j not in targets:
                sims = [float(keys[j] @ keys[t]) for t in targets]
                assigned[targets[sims.index(max(sims))]].append(j)
        levels = []
        for f in [out.pooler_output[i], *[level[i] for level in out.deepstack_features]]:
            rows = [f[j] for j in kept]
            rows += [f[t] + (torch.stack([f[j] for j in assigned[t]]).mean(0) if assigned[t] else 0) for t in targets]
            levels.append(torch.stack(rows))
        results.append((kept, levels, assigned))
    return results


async def test_lm_receives_the_selected_and_merged_deepstack_features():
    ad = cpu_adapter(checkpoint("qwen3_vl"), 10)  # 8 dominant + 2 contextual of 16 merged tokens
    assert (ad.vz.dominant, ad.vz.contextual) == (8, 2)
    imgs = frames(2, seed=5)
    expected = literal_visionzip(ad, imgs, 8, 2)
    assert any(len(a) > 0 for _, _, assigned in expected for a in assigned.values())  # merging happens

    calls = []
    hook = ad.model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw), with_kwargs=True)
    engine = Engine(ad)
    try:
        await feed(engine.session(system_prompt=SYSTEM), imgs)
    finally:
        hook.remove()
    ad.encode_frames_positioned(imgs)  # both frames in one batch: the kept indices of each
    assert ad.last_indices.tolist() == [kept for kept, _, _ in expected]

    # everything the LM saw, in order: system, then per frame [timestamp, 10 visual rows, suffix]
    D = ad.hidden
    main = torch.cat([c["inputs_embeds"][0] for c in calls])
    deep = [torch.cat([c["deepstack_visual_embeds"][lv] for c in calls]) for lv in range(ad.levels)]
    assert all(bool(c["visual_pos_masks"].all()) for c in calls)
    assert ad.levels == 2 and all(d.shape == (len(main), D) for d in deep)
    ids = engine.prompt.system(SYSTEM)
    visual_rows = []
    for i in range(len(imgs)):
        before, after = engine.prompt.frame(float(i))
        ids += before
        visual_rows.append(range(len(ids), len(ids) + 10))
        ids += [0] * 10 + after
    assert len(ids) == len(main)
    text = torch.ones(len(ids), dtype=torch.bool)
    for i, rows in enumerate(visual_rows):
        rows = list(rows)
        text[rows] = False
        _, levels, _ = expected[i]
        torch.testing.assert_close(main[rows], levels[0])
        for lv in range(ad.levels):
            torch.testing.assert_close(deep[lv][rows], levels[1 + lv])
            assert not torch.allclose(levels[1 + lv], levels[0])  # DeepStack levels are their own features
    embed_tokens = ad.model.get_input_embeddings()
    torch.testing.assert_close(main[text], embed_tokens(torch.tensor(ids))[text], rtol=0, atol=0)
    assert all(bool((d[text] == 0).all()) for d in deep)  # text rows: exact zeros in the DeepStack channels
    await engine.aclose()


@torch.no_grad()
def test_extra_channel_rows_are_the_models_own_forward():
    """[main | DeepStack] rows with DeepStack on every row (zeros at text) give exactly the logits
    of the model's own forward on input ids + pixels; batches of two rows equal single runs, with
    or without a 4-D attention mask; and
    DeepStack matters here (dropping it changes the logits), so the check can fail."""
    ad = cpu_adapter(checkpoint("qwen3_vl"), None)
    cfg, tok = ad.model.config, ad.tokenizer
    head = tok("<|im_start|>user\n<|vision_start|>")["input_ids"]
    tail = tok("<|vision_end|>What is in the video?<|im_end|>\n")["input_ids"]
    runs = []
    for seed in (6, 7):
        img = frames(1, seed=seed)
        emb, _ = ad.encode_frames_positioned(img)
        ids = torch.tensor([head + [cfg.image_token_id] * emb.shape[1] + tail])
        mm = (ids == cfg.image_token_id).int()
        pv, grid = ad.pixel_values(img)
        ref = ad.model(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm, logits_to_keep=0).logits
        pos, _ = ad.model.model.get_rope_index(ids, mm, image_grid_thw=grid)
        x = torch.cat([ad.embed(torch.tensor([head])), emb, ad.embed(torch.tensor([tail]))], dim=1)
        ours = ad.forward(x, DynamicCache(config=cfg), pos, logits_to_keep=0)
        assert torch.equal(ours, ref)
        bare = x.clone()
        bare[..., ad.hidden:] = 0
        assert not torch.allclose(ad.forward(bare, DynamicCache(config=cfg), pos, logits_to_keep=0), ref, atol=1e-4)
        runs.append((x, pos, ref))
    x = torch.cat([r[0] for r in runs])
    pos = torch.cat([r[1] for r in runs], dim=1)
    batched = ad.forward(x, DynamicCache(config=cfg), pos, logits_to_keep=0)
    torch.testing.assert_close(batched, torch.cat([r[2] for r in runs]), rtol=1e-5, atol=1e-5)
    # a 4-D mask [B, 1, L, S] goes to the model as given: causal = no mask; hiding a row of one
    # sample changes that sample only
    L = x.shape[1]
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1)
    assert torch.equal(ad.forward(x, DynamicCache(config=cfg), pos, attention_mask=mask, logits_to_keep=0), batched)
    mask[1, :, 1:, 0] = False
    masked = ad.forward(x, DynamicCache(config=cfg), pos, attention_mask=mask, logits_to_keep=0)
    assert torch.equal(masked[0], batched[0]) and not torch.allclose(masked[1], batched[1], atol=1e-4)


@pytest.mark.parametrize("shift", [1, 7, 40])
def test_interleaved_mrope_shift_is_one_rotation_per_pair(shift):
    """Moving (t, h, w) by the same d turns every rotated pair i by d * inv_freq[i], whichever axis
    the interleaved layout gives that pair: what the store's re-rotation (kv.rope: rope_inv_freq, rotate_back) does."""
    ad = cpu_adapter(checkpoint("qwen3_vl"), None)
    rotary = ad.model.get_decoder().rotary_emb
    pos = torch.tensor([[[3, 9]], [[5, 0]], [[2, 11]]])  # (t, h, w) of two tokens, axes differ
    x = torch.zeros(1, dtype=torch.float32)
    cos0, sin0 = rotary(x, pos)
    cos1, sin1 = rotary(x, pos + shift)
    angle0, angle1 = torch.atan2(sin0, cos0), torch.atan2(sin1, cos1)
    inv = rope_inv_freq(ad.model)
    want = torch.cat([inv, inv]) * shift
    diff = torch.remainder(angle1 - angle0 - want + torch.pi, 2 * torch.pi) - torch.pi
    assert float(diff.abs().max()) < 1e-4
