"""The video families beyond LLaVA-1.5 (LLaVA-NeXT-Video, OneVision, Qwen2.5-VL, Qwen3-VL, SmolVLM2,
InternVL3), on tiny random checkpoints of the real classes: the model's own greedy `generate`
reproduced token for token with compression off, exact budgets with VisionZip on, Qwen's M-RoPE
positions, and multi-turn streaming sessions that evict and re-rotate."""
import numpy as np
import pytest
import torch

from streamvz.adapters import load_adapter
from streamvz.engine import Engine
from tiny_families import checkpoint

FAMILIES = ["llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl"]
QWEN = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # frames as images with (t, h, w) M-RoPE ids
SYSTEM = "You are a helpful assistant."
Q1, Q2 = "What is in the video?", "Did anyone enter through the back door?"


def cpu_adapter(path, tokens_per_frame):
    """Through the registry as users load models; on the CPU in fp32 so the references compare
    exactly (the engine's own default picks CUDA + bf16 where there is a GPU)."""
    return load_adapter(path, tokens_per_frame=tokens_per_frame, device="cpu", dtype=torch.float32)


def frames(n, seed=0, h=112, w=112):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


async def feed(session, imgs, t0=0.0):
    for i, f in enumerate(imgs):
        await session.add_frame(f, t=t0 + i)


def model_inputs(ad, family, imgs):
    """What the model's own forward takes for these frames, each frame as a one-frame video
    (LLaVA families) or an image (Qwen, SmolVLM, InternVL), plus the placeholder ids one frame expands to."""
    cfg = ad.model.config
    if family in QWEN:
        pv, grid = ad.pixel_values(imgs)
        n = int(grid[0].prod()) // cfg.vision_config.spatial_merge_size ** 2
        return dict(pixel_values=pv, image_grid_thw=grid), [cfg.image_token_id] * n
    if family == "smolvlm":  # one sample holding one unsplit image per frame
        return dict(pixel_values=ad.pixel_values(imgs)[None]), [cfg.image_token_id] * ad.tokens_per_frame
    if family == "internvl":  # one tile per frame
        return dict(pixel_values=ad.pixel_values(imgs)), [cfg.image_token_id] * ad.tokens_per_frame
    return dict(pixel_values_videos=ad.pixel_values(imgs)[:, None]), [cfg.video_token_id] * ad.tokens_per_frame


def conversation_ids(engine, n_frames, frame_ids, turns):
    ids = engine.prompt.system(SYSTEM)
    for i in range(n_frames):
        before, after = engine.prompt.frame(float(i))
        ids += before + frame_ids + after
    for q, answer in turns:
        ids += engine.prompt.question(q)
        if answer is not None:
            ids += answer + engine.prompt.end_of_turn
    return ids


@pytest.mark.parametrize("family", FAMILIES + ["qwen3_vl_moe"])
async def test_uncompressed_stream_equals_generate(family):
    """Compression off: a two-turn streamed session gives exactly the model's own greedy output."""
    engine = Engine(cpu_adapter(checkpoint(family), None))
    ad = engine.adapter
    assert type(ad.model).__name__ == ad.model_class.__name__
    s = engine.session(system_prompt=SYSTEM)
    imgs = frames(2, seed=1)
    await feed(s, imgs)
    a1 = s.ask(Q1, max_new_tokens=6)
    await a1.result()
    a2 = s.ask(Q2, max_new_tokens=5)
    await a2.result()

    extra, per_frame = model_inputs(ad, family, imgs)
    for turns, got in [([(Q1, None)], a1), ([(Q1, a1.token_ids), (Q2, None)], a2)]:
        ids = torch.tensor([conversation_ids(engine, len(imgs), per_frame, turns)])
        if family in QWEN:
            extra["mm_token_type_ids"] = (ids == ad.model.config.image_token_id).int()
        out = ad.model.generate(ids, **extra, max_new_tokens=got.max_new_tokens, do_sample=False)
        ref = [t for t in out[0, ids.shape[1]:].tolist() if t not in ad.eos_token_ids]
        assert got.token_ids == ref
        assert len(ref) > 0
    await engine.aclose()


@pytest.mark.parametrize("family,budget,rows", [
    ("llava_next_video", 12, 12),  # replaces the 2x2 pooling (16 tokens)
    ("llava_onevision", 12, 13),  # + the model's image_newline row
    ("qwen2_5_vl", 12, 12),  # of 16 merged tokens
    ("qwen3_vl", 12, 12),  # of 16 merged tokens, each with its DeepStack channels
    ("smolvlm", 12, 12),  # of 16 pixel-shuffle groups (3x3 patches each)
    ("internvl", 12, 12),  # of 16 pixel-shuffle groups (2x2 patches each; CLS scores them)
])
def test_visionzip_budget_per_frame(family, budget, rows):
    ad = cpu_adapter(checkpoint(family), budget)
    assert ad.tokens_per_frame == (rows if family not in QWEN else budget)
    embeds = ad.encode_frames(np.stack(frames(3, seed=2)))
    width = ad.model.config.get_text_config().hidden_size
    if family == "qwen3_vl":  # [main | one block per DeepStack level]
        width *= 1 + len(ad.model.config.vision_config.deepstack_visual_indexes)
    assert embeds.shape == (3, rows, width)
    dominant, contextual = ad.vz.dominant, ad.vz.contextual
    assert dominant + contextual == budget and contextual > 0
    assert ad.last_indices.shape == (3, dominant)
    assert bool((ad.last_indices.diff(dim=1) > 0).all())  # original order, no repeats
    if family == "llava_next_video":
        assert bool((ad.last_indices[:, 0] == 0).all())  # CLIP's CLS is a dominant token
    if family == "llava_onevision":
        torch.testing.assert_close(embeds[:, -1], ad.model.model.image_newline.expand(3, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_larger_than_the_frame_is_refused(family):
    with pytest.raises(ValueError, match="exceeds"):
        ad = cpu_adapter(checkpoint(family), 80)
        ad.encode_frames(frames(1)[0])  # Qwen's token count depends on the frame size


@pytest.mark.parametrize("family", QWEN[:2])
def test_qwen_kept_tokens_keep_their_positions(family):
    """Dominant tokens are the model's own merged tokens with their own (t, h, w) M-RoPE ids."""
    path = checkpoint(family)
    full = cpu_adapter(path, None)
    ad = cpu_adapter(path, 8)
    imgs = frames(2, seed=3, h=112, w=168)  # not square: rows and columns differ
    emb_full, off_full = full.encode_frames_positioned(imgs)
    emb, off = ad.encode_frames_positioned(imgs)
    assert emb.shape[1] == 8 and off.shape == (2, 3, 8)

    cfg = ad.model.config
    pv, grid = ad.pixel_values(imgs[:1])
    n = int(grid[0].prod()) // 4
    ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]])
    pos, _ = ad.model.model.get_rope_index(ids, (ids == cfg.image_token_id).int(), image_grid_thw=grid)
    model_offsets = pos[:, 0, 1:1 + n] - 1  # the image starts at position 1
    torch.testing.assert_close(off_full[0], model_offsets)
    assert int(off_full[0, 1].max()) != int(off_full[0, 2].max())

    d = ad.vz.dominant
    for i in range(2):
        idx = ad.last_indices[i]
        torch.testing.assert_close(off[i, :, :d], model_offsets[:, idx] if i == 0 else off_full[i][:, idx])
        torch.testing.assert_close(emb[i, :d], emb_full[i, idx])
        cells = [tuple(c) for c in off[i, 1:].T.tolist()]  # (row, col) per output token
        assert not set(cells[d:]) & set(cells[:d])  # contextual tokens sit at other (target) cells


@pytest.mark.parametrize("family", FAMILIES)
async def test_compressed_session_evicts_and_rerotates(family):
    """VisionZip on, a 2-frame window over 3 frames, two turns. After eviction the kept keys sit
    at contiguous positions: the first layer's keys (which depend only on the token and its
    position) equal those of a session that only ever saw the frames left in the window. For
    Qwen that checks the re-rotation in all three M-RoPE axes."""
    ad = cpu_adapter(checkpoint(family), 12)
    rolling = Engine(ad, window_frames=2)
    s = rolling.session(system_prompt=SYSTEM)
    imgs = frames(3, seed=4)
    await feed(s, imgs)
    st = s.stats()
    assert (st["frames_in_window"], st["frames_evicted"]) == (2, 1)

    fresh = Engine(ad).session(system_prompt=SYSTEM)
    await feed(fresh, imgs[1:], t0=1.0)
    kept, ref = await s.cache_view(), await fresh.cache_view()
    assert [(b.kind, b.start, b.span) for b in kept.blocks] == [(b.kind, b.start, b.span) for b in ref.blocks]
    torch.testing.assert_close(kept.layers[0][0], ref.layers[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept.layers[0][1], ref.layers[0][1])

    a1 = s.ask(Q1, max_new_tokens=6)
    await a1.result()
    a2 = s.ask(Q2, max_new_tokens=4)
    await a2.result()
    assert a1.usage["completion_tokens"] > 0 and a2.usage["completion_tokens"] > 0
    assert [b.kind for b in (await s.cache_view()).blocks] == ["system", "frame", "frame", "turn", "turn"]
    await rolling.aclose()
