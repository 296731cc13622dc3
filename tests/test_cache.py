"""The KV policy (kv.BlockTable) and store (kv.SlotStore) against a tiny random Llama: incremental
prefill and eviction + re-rotation must reproduce a one-shot forward over the kept tokens at
contiguous positions."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from streamvz.errors import StreamError
from streamvz.kv import BlockTable, SlotStore, rope_inv_freq
from streamvz.kv.store import kv_shape


def make_llama(layers):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return make_llama(2)


@pytest.fixture(scope="module")
def llama1():
    return make_llama(1)


class Slot:
    """One session's cache as the engine keeps it: a block table over one slot of a store."""

    def __init__(self, model, budget, slot=0, **kw):
        self.model, self.slot = model, slot
        self.table = BlockTable(budget, **kw)
        self.store = SlotStore(*kv_shape(model.config), slots=slot + 1, budget=budget, dtype=torch.float32,
                               device="cpu", inv_freq=rope_inv_freq(model))

    def __getattr__(self, name):  # blocks, count, frames, next_position, evicted_*, budget_tokens
        return getattr(self.table, name)

    def append(self, kind, n, span=None):
        (start,), ev = self.table.append_many([(kind, n, span, {})])
        self.store.compact(self.slot, ev) if ev else None
        return start

    def grow(self, n):
        start, ev = self.table.grow(n)
        self.store.compact(self.slot, ev) if ev else None
        return start

    def keys(self, layer):
        return self.store.rows(self.slot)[layer][0]

    def values(self, layer):
        return self.store.rows(self.slot)[layer][1]

    def nbytes(self):
        return self.store.nbytes(self.slot)

    def step(self, model, embeds, positions):
        """Run new rows through the model into this slot (positions [n] or [3, n])."""
        pos = torch.as_tensor(positions)
        batch = self.store.batch([self.slot], [len(embeds)], len(embeds), torch.float32)
        with torch.inference_mode():
            out = model(inputs_embeds=embeds[None], cache=batch, position_ids=pos[..., None, :],
                        attention_mask=batch.mask, use_cache=True)
        self.store.commit(batch)
        assert self.store.length[self.slot] == self.table.count()
        return out


def step(model, cache, embeds, positions):
    return cache.step(model, embeds, positions).logits[0]


def oneshot(model, embeds, positions):
    with torch.inference_mode():
        return model(inputs_embeds=embeds[None], position_ids=torch.as_tensor(positions)[None]).logits[0]


def new_cache(model, budget, **kw):
    return Slot(model, budget, **kw)


def feed(model, cache, kind, embeds, offsets=None):
    """Append one block; `offsets` (per-token position offsets) model a frame spanning fewer positions."""
    n = len(embeds)
    span = None if offsets is None else max(offsets) + 1
    start = cache.append(kind, n, span)
    pos = [start + o for o in (range(n) if offsets is None else offsets)]
    return step(model, cache, embeds, pos)


def test_incremental_prefill_equals_oneshot(llama):
    g = torch.Generator().manual_seed(1)
    parts = [("system", 5), ("frame", 7), ("frame", 7), ("turn", 4)]
    embeds = [torch.randn(n, 64, generator=g) for _, n in parts]
    cache = new_cache(llama, 200)
    for (kind, _), e in zip(parts, embeds):
        last = feed(llama, cache, kind, e)
    full = torch.cat(embeds)
    ref = oneshot(llama, full, range(len(full)))
    torch.testing.assert_close(last, ref[-4:], atol=1e-5, rtol=1e-4)
    # decoding one row at a time into the open turn
    extra = torch.randn(3, 64, generator=g)
    for i in range(3):
        out = step(llama, cache, extra[i:i + 1], [cache.grow(1)])
    ref = oneshot(llama, torch.cat([full, extra]), range(len(full) + 3))
    torch.testing.assert_close(out[-1], ref[-1], atol=1e-5, rtol=1e-4)
    assert [b.kind for b in cache.blocks] == ["system", "frame", "frame", "turn"]
    assert cache.blocks[-1].tokens == 7


@pytest.mark.parametrize("offsets", [None, [0, 0, 1, 1, 2, 2]])
def test_eviction_rerotation_equals_fresh_forward(llama, llama1, offsets):
    """Evict a frame in front of a turn: kept keys are re-rotated to contiguous positions.

    Layer-0 keys/values depend only on a token and its position, so they must equal a fresh
    prefill of the kept tokens, and a one-layer model's next step must equal a fresh forward.
    (Deeper layers' KVs still carry what their tokens saw when computed: StreamingLLM's
    semantics, so only layer 0 and the one-layer model give an exact reference.)
    """
    for model in (llama1, llama):
        g = torch.Generator().manual_seed(2)
        sys_e = torch.randn(4, 64, generator=g)
        frames = [torch.randn(6, 64, generator=g) for _ in range(4)]
        turn = torch.randn(5, 64, generator=g)
        cache = new_cache(model, 4 + 5 + 6 * 3, max_frames=3)
        feed(model, cache, "system", sys_e)
        feed(model, cache, "frame", frames[0], offsets)
        feed(model, cache, "frame", frames[1], offsets)
        feed(model, cache, "turn", turn)
        feed(model, cache, "frame", frames[2], offsets)
        values_before = [cache.values(i)[..., 10:, :].clone() for i in range(len(model.model.layers))]
        out = feed(model, cache, "frame", frames[3], offsets)  # evicts frames[0]
        assert cache.evicted_frames == 1
        assert [b.kind for b in cache.blocks] == ["system", "frame", "turn", "frame", "frame"]
        kept = [(sys_e, None), (frames[1], offsets), (turn, None), (frames[2], offsets), (frames[3], offsets)]
        pos, start = [], 0
        for e, off in kept:
            off = list(range(len(e))) if off is None else off
            pos += [start + o for o in off]
            start += max(off) + 1
        assert cache.next_position == start
        kept_e = torch.cat([e for e, _ in kept])
        fresh = new_cache(model, 256)
        fresh.append("system", len(pos))
        ref = step(model, fresh, kept_e, pos)
        torch.testing.assert_close(cache.keys(0), fresh.keys(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.values(0), fresh.values(0), atol=1e-6, rtol=1e-5)
        for i, before in enumerate(values_before):  # values are moved, never changed
            assert torch.equal(cache.values(i)[..., 4:-6, :], before)
        if model is llama1:
            torch.testing.assert_close(out, ref[-6:], atol=1e-5, rtol=1e-4)


def test_memory_flat_and_positions_bounded(llama):
    g = torch.Generator().manual_seed(3)
    cache = new_cache(llama, 3 + 4 * 5, max_frames=5)
    feed(llama, cache, "system", torch.randn(3, 64, generator=g))
    for _ in range(5):
        feed(llama, cache, "frame", torch.randn(4, 64, generator=g))
    tokens, nbytes = cache.count(), cache.nbytes()
    sys_keys = cache.keys(0)[..., :3, :].clone()
    for _ in range(50):
        feed(llama, cache, "frame", torch.randn(4, 64, generator=g))
        assert cache.count() == tokens and cache.nbytes() == nbytes
        assert cache.next_position <= cache.budget_tokens
    assert cache.evicted_frames == 50
    torch.testing.assert_close(cache.keys(0)[..., :3, :], sys_keys)  # the sink never moves


def test_turns_kept_then_dropped_beyond_share(llama):
    g = torch.Generator().manual_seed(4)
    cache = new_cache(llama, 40, turn_share=0.5)
    feed(llama, cache, "system", torch.randn(4, 64, generator=g))
    feed(llama, cache, "frame", torch.randn(6, 64, generator=g))
    feed(llama, cache, "turn", torch.randn(8, 64, generator=g))
    for _ in range(5):  # frames go, the turn stays
        feed(llama, cache, "frame", torch.randn(6, 64, generator=g))
    kinds = [b.kind for b in cache.blocks]
    assert kinds[:2] == ["system", "turn"] and kinds.count("turn") == 1
    feed(llama, cache, "turn", torch.randn(8, 64, generator=g))  # 16 turn tokens <= 20: kept
    assert [b.kind for b in cache.blocks].count("turn") == 2
    feed(llama, cache, "turn", torch.randn(8, 64, generator=g))  # 24 > 20: the oldest turn goes
    assert [b.kind for b in cache.blocks].count("turn") == 2 and cache.evicted_turns == 1
    assert cache.blocks[0].kind == "system" and cache.count() <= 40


def test_context_full(llama):
    cache = new_cache(llama, 10)
    feed(llama, cache, "system", torch.randn(6, 64))
    cache.append("turn", 3)
    with pytest.raises(StreamError) as e:
        cache.grow(2)
    assert e.value.code == "context_full"


@pytest.mark.parametrize("layers", [1, 2])
def test_mrope_uniform_shift(layers):
    """Qwen2.5-VL's M-RoPE: a frame's tokens carry (t, h, w) positions; evicting moves every kept
    block by the same d in all three components, which the 1-D re-rotation reproduces exactly."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(0)
    cfg = Qwen2_5_VLTextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]})
    model = Qwen2_5_VLTextModel(cfg).eval()
    # a 2x3 grid frame: t stays, h in {0, 1}, w in {0, 1, 2}; it spans 3 positions
    grid = torch.tensor([[0] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]])
    g = torch.Generator().manual_seed(5)
    blocks = [("system", torch.randn(3, 64, generator=g), None)]
    blocks += [("frame", torch.randn(6, 64, generator=g), grid) for _ in range(3)]
    blocks.insert(2, ("turn", torch.randn(4, 64, generator=g), None))

    def run(cache, embeds, start, off):
        n = len(embeds)
        pos = torch.arange(start, start + n).expand(3, n) if off is None else start + off
        return cache.step(model, embeds, pos).last_hidden_state[0]

    cache = Slot(model, 100, max_frames=2)
    for kind, e, off in blocks:
        start = cache.append(kind, len(e), None if off is None else int(off.max()) + 1)
        out = run(cache, e, start, off)
    assert cache.evicted_frames == 1 and [b.kind for b in cache.blocks] == ["system", "turn", "frame", "frame"]
    kept = [blocks[0], blocks[2], blocks[3], blocks[4]]
    fresh = Slot(model, 100)
    start = 0
    for kind, e, off in kept:
        s = fresh.append(kind, len(e), None if off is None else int(off.max()) + 1)
        assert s == start
        ref = run(fresh, e, s, off)
        start = fresh.next_position
    assert cache.next_position == fresh.next_position == 3 + 4 + 3 + 3
    torch.testing.assert_close(cache.keys(0), fresh.keys(0), atol=1e-5, rtol=1e-4)
    if layers == 1:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
