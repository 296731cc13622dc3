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
    ids = engine.prompt.system(SYSTEM)
    for i in range(len(imgs)):
        before, after = engine.prompt.frame(t0 + i)
        ids += before + frame_tokens(i) + after
    for q, answer in turns:
        ids += engine.prompt.question(q)
        if answer is not None:
            ids += answer + engine.prompt.end_of_turn
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
    assert a1.usage["prompt_tokens"] == len(engine.prompt.question(Q1))
    assert a1.usage["tokens_per_s"] > 0
    one = s.ask(Q1, max_new_tokens=1)
    await one.result()
    assert one.usage["completion_tokens"] <= 1 and one.usage["tokens_per_s"] is None  # no rate from one token
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


async def test_memory_flat_after_window_fills(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, window_frames=3, cache_budget_tokens=512)
    s = engine.session(system_prompt=SYSTEM)
    for f in frames(3, seed=2):
        await s.add_frame(f, t=5.0)  # one timestamp: every frame block has the same length
    full = s.stats()
    assert full["frames_in_window"] == 3
    for f in frames(30, seed=3):
        await s.add_frame(f, t=5.0)
        st = s.stats()
        assert (st["cache_tokens"], st["cache_bytes"]) == (full["cache_tokens"], full["cache_bytes"])
        assert st["cache_positions"] <= st["cache_tokens"] <= 512
    assert st["frames_seen"] == 33 and st["frames_evicted"] == 30 and st["frames_in_window"] == 3
    await engine.aclose()


async def test_token_budget_evicts_frames_keeps_system_and_turns(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, cache_budget_tokens=160)
    s = engine.session(system_prompt=SYSTEM)
    await feed(s, frames(2, seed=4))
    a = s.ask(Q1, max_new_tokens=4)
    await a.result()
    await feed(s, frames(12, seed=5), t0=100.0)
    cache = await s.cache_view()
    kinds = [b.kind for b in cache.blocks]
    assert kinds[0] == "system" and kinds.count("turn") == 1
    assert cache.blocks[1].kind == "turn" and cache.blocks[1].meta["question"] == Q1  # older frames gone
    kept_t = [b.meta["t"] for b in cache.frames()]
    assert kept_t == sorted(kept_t) and kept_t[-1] == 111.0 and min(kept_t) > 100.0
    assert cache.layers[0][0].shape[-2] == cache.count() <= 160 and cache.next_position == cache.count()
    # the system prompt and turn rows are exactly what they were before the frames went
    sys_rows = cache.blocks[0].tokens
    ref = Engine(engine.adapter, cache_budget_tokens=160).session(system_prompt=SYSTEM)
    await ref.add_frame(frames(1)[0], t=0.0)
    torch.testing.assert_close(cache.layers[0][0][..., :sys_rows, :],
                               (await ref.cache_view()).layers[0][0][..., :sys_rows, :])
    b = s.ask(Q2, max_new_tokens=3)  # still answers after eviction
    assert len(await b.result()) > 0 and b.usage["completion_tokens"] == 3
    await engine.aclose()


async def run_alone(engine, imgs, q, seed):
    s = engine.session(system_prompt=SYSTEM)
    await feed(s, imgs)
    a = s.ask(q, max_new_tokens=6, temperature=0.8 if seed else 0.0, seed=seed)
    await a.result()
    await s.close()
    return a.token_ids


async def test_concurrent_sessions_match_alone(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, max_batch_frames=4, decode_steps_per_frame_step=2)
    jobs = [(frames(3, seed=10 + i), q, seed) for i, (q, seed) in enumerate([(Q1, None), (Q2, None), (Q1, 7)])]
    alone = [await run_alone(engine, *j) for j in jobs]
    together = await asyncio.gather(*(run_alone(engine, *j) for j in jobs))
    assert list(together) == alone
    assert engine.sessions == {}
    await engine.aclose()


async def test_long_answer_does_not_starve_other_frames(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, decode_steps_per_frame_step=2)
    a_s, b_s = engine.session(), engine.session()
    await a_s.add_frame(frames(1)[0], t=0.0)
    long = a_s.ask(Q1, max_new_tokens=200)
    it = long.__aiter__()
    await it.__anext__()  # the answer is running
    for f in frames(3, seed=20):
        await b_s.add_frame(f)  # gets in between decode rounds
    assert not long.done
    assert b_s.stats()["frames_in_window"] == 3
    long.cancel()
    await engine.aclose()


async def test_cancel_stops_and_conversation_continues(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16)
    s = engine.session()
    await s.add_frame(frames(1)[0], t=0.0)
    a = s.ask(Q1, max_new_tokens=300)
    n = 0
    async for _ in a:
        n += 1
        if n == 3:
            a.cancel()
    assert a.usage["finish_reason"] == "cancelled"
    assert a.usage["completion_tokens"] < 300
    turn = (await s.cache_view()).blocks[-1]
    assert turn.kind == "turn"
    # the partial answer and the end-of-turn marker are in the conversation
    assert turn.tokens == a.usage["prompt_tokens"] + len(a.token_ids) + len(engine.prompt.end_of_turn)
    b = s.ask(Q2, max_new_tokens=2)
    await b.result()
    assert b.usage["finish_reason"] == "length"
    queued = s.ask(Q1, max_new_tokens=2)
    queued.cancel()
    assert await queued.result() == "" and queued.usage["finish_reason"] == "cancelled"
    await engine.aclose()


async def test_submit_frame_backlog_drops_oldest(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, max_backlog_frames=2)
    s = engine.session()
    for i, f in enumerate(frames(6, seed=30)):  # no await in between: the scheduler cannot run
        s.submit_frame(f, t=float(i))
    assert s.stats()["frames_dropped"] == 4 and s.stats()["frames_seen"] == 6
    a = s.ask(Q1, max_new_tokens=2)  # sees the frames submitted before it
    await a.result()
    assert [b.meta["t"] for b in (await s.cache_view()).frames()] == [4.0, 5.0]
    await engine.aclose()


async def test_limits_raise_stream_errors(tiny_llava):
    engine = Engine(tiny_llava, tokens_per_frame=16, max_sessions=2, max_question_chars=20,
                    max_new_tokens_limit=16, cache_budget_tokens=256)

    def code(fn, *args, **kw):
        with pytest.raises(StreamError) as e:
            fn(*args, **kw)
        return e.value.code

    assert code(engine.session, system_prompt="time " * 100) == "system_prompt_too_long"
    s = engine.session(session_id="a", system_prompt=SYSTEM)
    assert code(engine.session, session_id="a") == "session_exists"
    engine.session(session_id="b", system_prompt="")
    assert code(engine.session) == "too_many_sessions"
    assert engine.get_session("a") is s
    assert code(engine.get_session, "nope") == "unknown_session"
    assert code(s.ask, "x" * 21) == "question_too_long"
    assert code(s.ask, "hi", max_new_tokens=17) == "max_new_tokens_too_large"
    assert code(s.ask, "hi", max_new_tokens=0) == "bad_argument"
    assert code(s.ask, "hi", top_p=0.0) == "bad_argument"
    assert code(s.ask, "  ") == "bad_question"
    assert code(s.submit_frame, np.zeros((4, 4), np.uint8)) == "bad_frame"
    assert code(s.submit_frame, np.zeros((4, 4, 3), np.float32)) == "bad_frame"
    with pytest.raises(StreamError) as e:
        await s.add_frame(np.zeros((8, 8, 4), np.uint8))
    assert e.value.code == "bad_frame"
    await s.close()
    assert code(s.ask, "hi") == "session_closed"
    assert code(engine.get_session, "a") == "unknown_session"
    with pytest.raises(StreamError) as e:
        await s.add_frame(frames(1)[0])
    assert e.value.code == "session_closed"
    engine.session(session_id="c", system_prompt="")  # a slot is free again
    await engine.aclose()
    assert code(engine.session) == "engine_closed"


async def test_burst_of_frames_is_prefilled_in_one_call_with_the_same_result(tiny_llava):
    """Frames that queue up in one session go through the LM together (fewer, larger forward
    passes) and leave the cache a frame-by-frame feed leaves: same blocks, same answer."""
    imgs = frames(5, seed=30)
    engine = Engine(tiny_llava, tokens_per_frame=16, window_frames=4)
    one = engine.session(system_prompt=SYSTEM)
    await feed(one, imgs)  # one frame per round
    want = one.ask(Q1, max_new_tokens=6)
    await want.result()

    calls = []
    forward = engine.adapter.forward
    engine.adapter.forward = lambda x, *a, **k: calls.append(x.shape[1]) or forward(x, *a, **k)
    burst = engine.session(system_prompt=SYSTEM)
    for i, f in enumerate(imgs):
        burst.submit_frame(f, t=float(i))  # all queued before the scheduler's next round
    got = burst.ask(Q1, max_new_tokens=6)
    await got.result()
    del engine.adapter.forward
    one_view, burst_view = await one.cache_view(), await burst.cache_view()
    sys_rows, per_frame = one_view.blocks[0].tokens, one_view.frames()[0].tokens
    # the system prompt goes in with the first frames; the 5 frames in window-sized groups (4 + 1)
    assert calls[:2] == [sys_rows + 4 * per_frame, per_frame]
    assert [b.meta["t"] for b in burst_view.frames()] == [1.0, 2.0, 3.0, 4.0]
    assert [(b.kind, b.start, b.tokens) for b in burst_view.blocks] == \
        [(b.kind, b.start, b.tokens) for b in one_view.blocks]
    assert got.token_ids == want.token_ids
    await engine.aclose()


async def test_failed_frame_prefill_is_undone_and_the_session_goes_on(tiny_llava):
    """A model call that fails half-way (say, out of memory) reports an error for its frames and
    leaves the cache exactly as before, so later frames and questions work."""
    engine = Engine(tiny_llava, tokens_per_frame=16)
    s = engine.session(system_prompt=SYSTEM)
    await s.add_frame(frames(1)[0], t=0.0)
    view = await s.cache_view()
    before = (view.count(), view.layers[0][0].shape[-2], len(view.blocks))
    forward = engine.adapter.forward

    def fails_after_writing(x, cache, *a, **k):
        forward(x, cache, *a, **k)  # rows land in the cache, then the call dies
        raise RuntimeError("CUDA out of memory (simulated)")

    engine.adapter.forward = fails_after_writing
    imgs = frames(3, seed=40)
    for i, f in enumerate(imgs):
        s.submit_frame(f, t=1.0 + i)
    with pytest.raises(StreamError) as err:
        await s.add_frame(frames(1, seed=41)[0], t=9.0)
    assert err.value.code == "internal_error" and "out of memory" in err.value.message
    view = await s.cache_view()
    assert (view.count(), view.layers[0][0].shape[-2], len(view.blocks)) == before
    del engine.adapter.forward
    await s.add_frame(imgs[0], t=10.0)
    a = s.ask(Q1, max_new_tokens=3)
    assert len(await a.result()) > 0
    assert s.stats()["frames_in_window"] == 2
    await engine.aclose()


async def test_burst_after_an_answer_evicts_frames_not_the_turn(tiny_llava):
    """Frames queued during an answer go in together right after it; like single frames they
    push out older frames only, so the question just answered stays in the cache."""
    engine = Engine(tiny_llava, tokens_per_frame=16, cache_budget_tokens=150)
    s = engine.session(system_prompt=SYSTEM)
    await feed(s, frames(3, seed=50))
    a = s.ask(Q1, max_new_tokens=4)
    for i, f in enumerate(frames(4, seed=51)):
        s.submit_frame(f, t=100.0 + i)  # held until the answer's turn closes
    await a.result()
    await s.add_frame(frames(1, seed=52)[0], t=200.0)
    view = await s.cache_view()
    kinds = [b.kind for b in view.blocks]
    assert kinds.count("turn") == 1 and view.count() <= 150
    assert view.frames()[-1].meta["t"] == 200.0
    await engine.aclose()


async def test_since_scopes_a_question_to_recent_frames(tiny_llava):
    """`ask(since=s)`: the question and its answer attend to the system prompt and the frames of
    the last s seconds only (older frames stay in the cache, masked): exactly a one-shot greedy
    run whose mask hides those frames' columns from the question's rows on."""
    engine = Engine(tiny_llava, tokens_per_frame=16)
    ad = engine.adapter
    s = engine.session(system_prompt=SYSTEM)
    imgs = frames(5, seed=6)
    await feed(s, imgs)  # t = 0..4
    scoped = s.ask(Q1, max_new_tokens=6, since=1.5)  # newest frame t=4: frames 3 and 4 only
    await scoped.result()
    view = await s.cache_view()
    assert [b.meta["t"] for b in view.frames()] == [0.0, 1.0, 2.0, 3.0, 4.0]  # nothing evicted

    visual = [ad.encode_frames(f[None])[0] for f in imgs]
    sys_ids = engine.prompt.system(SYSTEM)
    pieces, hidden, row = [ad.embed(torch.tensor([sys_ids]))[0]], [], len(sys_ids)
    for t, v in enumerate(visual):
        before, after = engine.prompt.frame(float(t))
        block = [ad.embed(torch.tensor([before]))[0], v, ad.embed(torch.tensor([after]))[0]]
        n = sum(len(b) for b in block)
        if t < 3:
            hidden.append((row, row + n))
        pieces += block
        row += n
    question_start = row
    embeds = torch.cat(pieces + [ad.embed(torch.tensor([engine.prompt.question(Q1)]))[0]])
    out = []
    with torch.inference_mode():
        for _ in range(scoped.max_new_tokens):
            n = len(embeds)
            allowed = torch.ones(n, n).tril().bool()
            for lo, hi in hidden:
                allowed[question_start:, lo:hi] = False
            mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            logits = ad.model(inputs_embeds=embeds[None], attention_mask=mask,
                              position_ids=torch.arange(n)[None]).logits[0, -1]
            tok = int(logits.argmax())
            if tok in ad.eos_token_ids:
                break
            out.append(tok)
            embeds = torch.cat([embeds, ad.embed(torch.tensor([[tok]]))[0]])
    assert scoped.token_ids == out
    other = engine.session(system_prompt=SYSTEM)
    await feed(other, imgs)
    whole = other.ask(Q1, max_new_tokens=6)  # the same question over the whole window answers otherwise
    await whole.result()
    assert whole.token_ids != scoped.token_ids
    with pytest.raises(StreamError) as e:
        s.ask(Q1, since=-1)
    assert e.value.code == "bad_argument"
    await engine.aclose()


def test_an_unknown_engine_setting_is_refused(tiny_llava):
    with pytest.raises(TypeError) as e:
        Engine(tiny_llava, tokens_per_frme=8)  # a typo must not pass silently
    assert "tokens_per_frme" in str(e.value)


def test_a_kv_store_that_cannot_fit_is_refused_with_its_size(tiny_llava):
    """The store is allocated at start (max_sessions x budget): one the device cannot hold is a
    clear, documented error that says how much and what to lower."""
    with pytest.raises(StreamError) as e:
        Engine(tiny_llava, tokens_per_frame=8, max_sessions=10**9, cache_budget_tokens=256)
    assert e.value.code == "kv_store_too_large"
    assert "1000000000 sessions x 256 tokens" in e.value.message and "lower max_sessions" in e.value.message
