"""Static cameras: temporal drop keeps only the tokens that changed since the previous frame."""
import numpy as np
import pytest
import torch

from streamvz.engine import Engine
from streamvz.temporal import TemporalConfig, TemporalFilter
from test_batching import family_adapter


PICTURE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def noisy(picture, rng, sigma=2.0):
    return np.clip(picture + rng.normal(0, sigma, picture.shape), 0, 255).astype(np.uint8)


def test_still_frames_cost_nothing_after_the_key_frame_and_changes_are_kept():
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(1)
    scene = torch.randn(16, 32, generator=g)
    f = TemporalFilter(TemporalConfig("drop", threshold=0.05, key_every=6, scene_change=0.3))
    assert f.keep(scene, PICTURE) is None  # the first frame is a key frame
    still = scene + 0.01 * torch.randn(16, 32, generator=g)  # sensor noise: not a change
    assert len(f.keep(still, noisy(PICTURE, rng))) == 0
    moved = still.clone()
    moved[5] = torch.randn(32, generator=g)  # one token shows something new
    small = noisy(PICTURE, rng)
    small[:8, :8] = 255 - small[:8, :8]  # in one corner of the picture
    assert f.keep(moved, small).tolist() == [5]
    assert len(f.keep(moved, small)) == 0  # it stays: nothing new any more
    assert len(f.keep(still, noisy(PICTURE, rng))) == 1  # it leaves: token 5 differs from the frame before again
    assert len(f.keep(still, noisy(PICTURE, rng))) == 0
    assert f.keep(still, noisy(PICTURE, rng)) is None  # frame 6: key frames are frames 0, 6, 12, ...
    assert len(f.keep(still, noisy(PICTURE, rng))) == 0
    cut = np.random.default_rng(9).integers(0, 256, PICTURE.shape, dtype=np.uint8)
    assert f.keep(still, cut) is None  # a cut: the picture changed everywhere, a key frame


def test_a_moving_camera_gets_key_frames_although_its_tokens_find_twins():
    """A pan shows the same things shifted: every token still has a near twin in the previous
    frame, but the picture changed at most places, so every frame is a key frame (all tokens)."""
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)
    tokens = torch.randn(16, 32)
    f = TemporalFilter(TemporalConfig("drop", key_every=100))
    assert all(f.keep(tokens, noisy(wide[:, 8 * t:8 * t + 64], rng)) is None for t in range(10))
    still = TemporalFilter(TemporalConfig("drop", key_every=100))
    kept = [still.keep(tokens, noisy(wide[:, :64], rng)) for _ in range(10)]
    assert kept[0] is None and all(k is not None and len(k) == 0 for k in kept[1:])


def test_min_tokens_keeps_the_least_similar():
    f = TemporalFilter(TemporalConfig("drop", min_tokens=3))
    x = torch.randn(10, 8)
    f.keep(x, PICTURE)
    y = x.clone()
    y[7] = -x[7]
    assert f.keep(y, PICTURE).tolist().count(7) == 1 and len(f.keep(y, PICTURE)) == 3


def test_bad_settings_are_refused():
    for bad in (dict(mode="sometimes"), dict(threshold=0), dict(key_every=0), dict(scene_change=2)):
        with pytest.raises(ValueError):
            TemporalConfig(**bad)


def frame(seed, size=112):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", ["llava", "llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen3_vl",
                                    "smolvlm", "internvl"])
async def test_every_family_streams_with_temporal_drop(family, tiny_llava):
    """Varying frame sizes through the cache: still frames are skipped, a changed frame is written
    with only its new tokens (M-RoPE offsets of the kept tokens included), the window evicts and
    re-rotates, positions stay contiguous, and the session answers."""
    ad = family_adapter(family, tiny_llava, 12)
    still, other = frame(1), frame(2)
    half = still.copy()
    half[:, :56] = other[:, :56]  # part of the picture changes
    async with Engine(ad, window_frames=3, temporal="drop", temporal_threshold=0.02, scene_change=0.99,
                      key_frame_every=100) as engine:
        s = engine.session()
        for t, f in enumerate([still, still, still, half, half, other, other, still]):
            await s.add_frame(f, t=float(t))
        st = s.stats()
        view = await s.cache_view()
        sizes = [b.tokens for b in view.frames()]
        a = s.ask("What changed?", max_new_tokens=3)
        await a.result()
    assert st["frames_skipped"] >= 3  # the repeats of a frame
    assert st["frames_seen"] == 8 and st["frames_in_window"] == 3 and st["frames_evicted"] >= 1
    assert len(set(sizes)) > 1 or st["frame_tokens_mean"] < ad.tokens_per_frame  # frames of different sizes
    assert view.next_position == sum(b.span for b in view.blocks)  # contiguous after evictions
    assert view.count() == view.layers[0][0].shape[-2]
    assert a.usage["completion_tokens"] >= 1


@pytest.mark.tiny
async def test_embedded_model_keeps_an_object_that_appears_and_skips_the_still_scene():
    from streamvz.tiny import data, questions

    rng = np.random.default_rng(3)
    bg = data.random_background(rng, "test")
    obj = data.Obj("circle", "red", 160.0, 70.0, 80.0)
    empty, shown = data.render(data.Scene(bg)), data.render(data.Scene(bg, (obj,)))
    async with Engine("streamvz-tiny", tokens_per_frame=64, temporal="drop") as engine:
        s = engine.session()
        for t in range(4):
            await s.add_frame(empty, t=float(t))
        before = s.stats()
        await s.add_frame(shown, t=4.0)
        after = s.stats()
        await s.add_frame(shown, t=5.0)
        yes = await s.ask("Is there a red circle?", max_new_tokens=2).result()
        no = await s.ask("Is there a blue star?", max_new_tokens=2).result()
        view = await s.cache_view()
    assert before["frames_skipped"] == 3 and before["frames_in_window"] == 1  # the still scene costs nothing
    assert 0 < after["frame_tokens_last"] < 64  # the object's tokens, not a whole key frame
    assert [b.meta["t"] for b in view.frames()] == [0.0, 4.0]  # the repeat of the object frame is skipped too
    assert questions.normalise(yes) == "yes" and questions.normalise(no) == "no"
