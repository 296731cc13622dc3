"""The streaming engine on a tiny random LLaVA: exact equivalence with one-shot inference,
bounded memory, eviction policy, concurrency, cancel and limits."""
import asyncio

import numpy as np
import pytest
import torch

from streamvz.engine import Engine
from streamvz.errors import StreamError

SYSTEM = "A chat between a curious human and an artificial intelligence assistant."
Q1, Q2 = "What is in the video?", "What colour is the square?"


def frames(n, seed=0, size=84):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


async def feed(session, imgs, t0=0.0):
    for i, f in enumerate(imgs):
        await session.add_frame(f, t=t0 + i)


def prompt_ids(engine, imgs, turns, frame_tokens, t0=0.0):
    """Token ids of the whole conversation built in one shot; frames as `frame_tokens(i)` lists."""
    ids = engine.system_ids(SYSTEM)
    for i in range(len(imgs)):
        before, after = engine.frame_ids(t0 + i)
        ids += before + frame_tokens(i) + after
    for q, answer in turns:
        ids += engine.question_ids(q)
        if answer is not None:
            ids += answer + engine.end_of_turn_ids
    return ids


async def test_full_tokens_equal_generate(tiny_llava):
    """Compression off, window larger than the stream: exactly LLaVA's own greedy `generate`."""
    engine = Engine(tiny_llava, tokens_per_frame=None)
    ad = engine.adapter
    s = engine.session(system_prompt=SYSTEM)
    imgs = frames(3)
    await feed(s, imgs)
    a1 = s.ask(Q1, max_new_tokens=8)
    text1 = await a1.result()
    a2 = s.ask(Q2, max_new_tokens=6)
    await a2.result()

    image_tokens = [ad.model.config.image_token_id] * ad.tokens_per_frame
    pv = ad.pixel_values(imgs)
    for turns, got in [([(Q1, None)], a1), ([(Q1, a1.token_ids), (Q2, None)], a2)]:
        ids = prompt_ids(engine, imgs, turns, lambda i: image_tokens)
        out = ad.model.generate(torch.tensor([ids]), pixel_values=pv, max_new_tokens=got.max_new_tokens,
                                do_sample=False)
        ref = [t for t in out[0, len(ids):].tolist() if t not in ad.eos_token_ids]
        assert got.token_ids == ref
    assert text1 == ad.tokenizer.decode(a1.token_ids, skip_special_tokens=True)
    assert a1.usage["finish_reason"] == "length" and a1.usage["completion_tokens"] == 8
    assert a1.usage["prompt_tokens"] == len(engine.question_ids(Q1))
    await engine.aclose()


@torch.inference_mode()
def greedy_oneshot(ad, embeds, n):
    """Greedy decoding by re-running the whole sequence every step: no cache involved."""
    out = []
    for _ in range(n):
        logits = ad.model(inputs_embeds=embeds[None], position_ids=torch.arange(len(embeds))[None]).logits[0, -1]
        tok = int(logits.argmax())
        if tok in ad.eos_token_ids:
            break
        out.append(tok)
        embeds = torch.cat([embeds, ad.embed(torch.tensor([[tok]]))[0]])
    return out


async def test_visionzip_equals_oneshot_forward(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16)
    ad = engine.adapter
    assert ad.tokens_per_frame == 16
    s = engine.session(system_prompt=SYSTEM)
    imgs = frames(4, seed=1)
    await feed(s, imgs)
    a1 = s.ask(Q1, max_new_tokens=6)
    await a1.result()
    a2 = s.ask(Q2, max_new_tokens=5)
    await a2.result()
    assert s.stats()["frames_in_window"] == 4

    visual = [ad.encode_frames(f[None])[0] for f in imgs]  # [16, D] each
    marker = -1
    for turns, got in [([(Q1, None)], a1), ([(Q1, a1.token_ids), (Q2, None)], a2)]:
        ids = prompt_ids(engine, imgs, turns, lambda i: [marker] * 16)
        embeds = []
        it = iter(visual)
        i = 0
        while i < len(ids):
            if ids[i] == marker:
                embeds.append(next(it))
                i += 16
            else:
                j = i
                while j < len(ids) and ids[j] != marker:
                    j += 1
                embeds.append(ad.embed(torch.tensor([ids[i:j]]))[0])
                i = j
        ref = greedy_oneshot(ad, torch.cat(embeds), got.max_new_tokens)
        assert got.token_ids == ref
    await engine.aclose()
