"""One forward for many sessions: batched steps give exactly the tokens of the same sessions run
one row per forward (greedy), for every family, with different cache lengths, evictions and
M-RoPE; and a row that fails does not disturb its batch-mates."""
import asyncio

import numpy as np
import pytest
import torch

from streamvz.adapters import load_adapter
from streamvz.engine import Engine
from streamvz.errors import StreamError
from tiny_families import checkpoint

SYSTEM = "You are a helpful assistant."
QUESTIONS = ["What is in the video?", "Did anyone enter?", "What colour is the door?"]


def frames(n, seed, size=112):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class Counting:
    """Records the batch size of every LM forward the runner makes."""

    def __init__(self, adapter):
        self.adapter, self.sizes = adapter, []
        self.forward = adapter.forward
        adapter.forward = self

    def __call__(self, x, *a, **k):
        self.sizes.append(x.shape[0])
        return self.forward(x, *a, **k)


async def conversation(engine, temperature=0.0):
    """Three sessions with 1, 3 and 4 frames (window 2: two of them evict), each asked two
    questions at once, so answers of different sessions decode in the same steps."""
    sessions = [engine.session(system_prompt=SYSTEM) for _ in range(3)]
    for i, (s, n) in enumerate(zip(sessions, (1, 3, 4))):
        for j, f in enumerate(frames(n, seed=10 * i)):
            s.submit_frame(f, t=float(j))
    out = []
    for turn in range(2):
        answers = [s.ask(QUESTIONS[(i + turn) % 3], max_new_tokens=5 + i, temperature=temperature, seed=i)
                   for i, s in enumerate(sessions)]
        await asyncio.gather(*(a.result() for a in answers))
        out.append([a.token_ids for a in answers])
    stats = [s.stats() for s in sessions]
    views = [await s.cache_view() for s in sessions]
    return out, stats, views


def family_adapter(family, tiny_llava, tokens):
    path = tiny_llava if family == "llava" else checkpoint(family)
    return load_adapter(path, tokens_per_frame=tokens, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("family", ["llava", "llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen3_vl",
                                    "smolvlm", "internvl"])
async def test_batched_equals_one_row_per_forward(family, tiny_llava):
    ad = family_adapter(family, tiny_llava, 12)
    results = {}
    for cap in (1, None):
        counter = Counting(ad)
        async with Engine(ad, window_frames=2, max_batch_rows=cap) as engine:
            results[cap] = await conversation(engine)
        ad.forward = counter.forward
        assert max(counter.sizes) == (cap or 3)  # the batched run did put sessions together
    (alone, alone_stats, alone_views), (together, stats, views) = results[1], results[None]
    assert together == alone
    assert [s["frames_evicted"] for s in stats] == [0, 1, 2]
    assert stats == alone_stats
    for a, b in zip(views, alone_views):
        assert [(x.kind, x.start, x.tokens, x.span) for x in a.blocks] == \
            [(x.kind, x.start, x.tokens, x.span) for x in b.blocks]
        for (ka, va), (kb, vb) in zip(a.layers, b.layers):
            torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)


async def test_sampled_answers_do_not_depend_on_batch_mates(tiny_llava):
    ad = family_adapter("llava", tiny_llava, 8)
    got = []
    for cap in (1, None):
        async with Engine(ad, window_frames=2, max_batch_rows=cap) as engine:
            got.append((await conversation(engine, temperature=0.9))[0])
    assert got[0] == got[1]


async def test_a_failing_row_fails_alone(tiny_llava):
    """A frame whose forward fails (say, a numerical fault in one row) makes its step fail; the
    runner retries row by row: that frame gets the error, its batch-mates' frames and answers go
    on exactly as in a clean run, and the session itself keeps working."""
    ad = family_adapter("llava", tiny_llava, 8)
    bad = np.full((112, 112, 3), 7, np.uint8)  # the frame the model 'cannot take'
    encode, forward = ad.encode_frames_positioned, ad.forward

    def marked_encode(imgs):
        e, off = encode(imgs)
        for i, img in enumerate(imgs):
            if (img == 7).all():
                e[i, :, 0] = 1234.5  # a mark the forward below refuses
        return e, off

    def refusing_forward(x, *a, **k):
        if (x[..., 0] == 1234.5).any():
            raise RuntimeError("numerical fault (simulated)")
        return forward(x, *a, **k)

    async def run(poison):
        async with Engine(ad, window_frames=3) as engine:
            ss = [engine.session(system_prompt=SYSTEM) for _ in range(3)]
            for i, s in enumerate(ss):
                for j, f in enumerate(frames(2, seed=i)):
                    s.submit_frame(f, t=float(j))
            victim = asyncio.ensure_future(ss[1].add_frame(bad, t=5.0)) if poison else None
            answers = [s.ask(QUESTIONS[0], max_new_tokens=6) for s in ss]
            await asyncio.gather(*(a.result() for a in answers))
            err = None
            if poison:
                with pytest.raises(StreamError) as e:
                    await victim
                err = e.value
                again = ss[1].ask(QUESTIONS[1], max_new_tokens=3)  # the victim's session goes on
                assert again.usage is None and len(await again.result()) > 0
            return [a.token_ids for a in answers], [s.stats()["frames_in_window"] for s in ss], err

    clean = await run(False)
    ad.encode_frames_positioned, ad.forward = marked_encode, refusing_forward
    try:
        poisoned = await run(True)
    finally:
        ad.encode_frames_positioned, ad.forward = encode, forward
    assert poisoned[2].code == "internal_error" and "numerical fault" in poisoned[2].message
    assert poisoned[0][0] == clean[0][0] and poisoned[0][2] == clean[0][2]  # bystanders: same answers
    assert poisoned[1] == clean[1]  # the bad frame is not in the window
