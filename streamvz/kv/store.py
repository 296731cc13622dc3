"""The KV store: every session's rows in one preallocated buffer per layer, a slot per session.

    K[layer], V[layer]: [slots, kv_heads, budget, head_dim]

gpt-fast's static cache, with the batch dimension made of sessions: a session owns a slot for
its life, a forward writes each row's new keys at that slot's own length (`index_put`), and
attention reads the slots of the batch under a 4-D mask (`SlotBatch`, a transformers `Cache`).
Slots rather than pages: a live session fills its budget within minutes and stays full, so a
fixed slot wastes little and eviction stays a per-slot compaction plus re-rotation.

Memory is stated up front: slots x budget x `bytes_per_token` (layers x 2 x kv_heads x head_dim x
dtype size). The buffers are allocated uninitialised; rows are zeroed only when a batch first
reads them (`clean`), so on the CPU pages are touched as sessions fill, and masked-out rows are
always finite (a NaN behind a zero attention weight would still poison the sum).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import StreamError
from .policy import Eviction
from .rope import rotate_back


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers model's language model."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class SlotStore:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, budget: int,
                 dtype: torch.dtype, device, inv_freq: torch.Tensor):
        shape = (slots, kv_heads, budget, head_dim)
        self.bytes_per_token = self.per_token(layers, kv_heads, head_dim, dtype)
        try:
            self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        # A GPU says OutOfMemoryError; the CPU allocator says RuntimeError ("can't allocate memory").
        except (torch.OutOfMemoryError, RuntimeError) as e:
            need = slots * budget * self.bytes_per_token
            raise StreamError("kv_store_too_large", f"the KV store needs {slots} sessions x {budget} tokens x "
                              f"{self.bytes_per_token} bytes = {need / 2**30:.1f} GiB, "
                              f"which {device} cannot allocate; lower max_sessions or cache_budget_tokens") from e
        self.slots, self.budget, self.inv_freq = slots, budget, inv_freq.float()
        self.length = [0] * slots  # rows held by each slot
        self.clean = [0] * slots  # rows [0, clean) hold finite values

    @staticmethod
    def per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes_total(self) -> int:
        return self.slots * self.budget * self.bytes_per_token

    def nbytes(self, slot: int) -> int:
        return self.length[slot] * self.bytes_per_token

    def reset(self, slot: int) -> None:
        self.length[slot] = 0

    def rows(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one slot's keys and values per layer, [1, kv_heads, rows, head_dim]."""
        n = self.length[slot]
        return [(k[slot, :, :n].clone()[None], v[slot, :, :n].clone()[None]) for k, v in zip(self.k, self.v)]

    def compact(self, slot: int, ev: Eviction) -> None:
        """Apply an eviction: kept rows move to the front; keys re-rotated by their shift."""
        keep = torch.tensor(ev.keep, dtype=torch.long, device=self.k[0].device)
        shift = torch.tensor(ev.shift, dtype=torch.long)
        moved = int((shift != 0).nonzero()[0, 0]) if bool((shift != 0).any()) else len(shift)
        n = len(keep)
        for k, v in zip(self.k, self.v):
            keys = k[slot].index_select(1, keep)  # a copy: safe to write back over the source
            if moved < n:  # rows before the first gap keep their positions
                keys[:, moved:] = rotate_back(keys[:, moved:], shift[moved:], self.inv_freq)
            k[slot, :, :n] = keys
            v[slot, :, :n] = v[slot].index_select(1, keep)
        self.length[slot] = n

    def batch(self, slots: list[int], new: list[int], width: int, dtype: torch.dtype,
              hide: list[list[tuple[int, int]]] | None = None) -> "SlotBatch":
        """A cache view for one forward: row b appends `new[b]` rows (left-padded to `width`) to slot
        `slots[b]` and does not attend to its slot rows in `hide[b]` ([lo, hi) ranges); the 4-D
        mask is `.mask`."""
        return SlotBatch(self, slots, new, width, dtype, hide or [[] for _ in slots])

    def commit(self, batch: "SlotBatch") -> None:
        """The forward succeeded: the rows it wrote become part of their slots."""
        for s, n in zip(batch.slots, batch.new):
            self.length[s] += n


class _SlotLayer(CacheLayerMixin):
    """One layer's view for `Cache.update`: writes the new rows, returns the batch's rows."""

    def __init__(self, batch: "SlotBatch", layer: int):
        super().__init__()
        self.batch, self.layer = batch, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.batch.write(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch.width_kv, 0

    def get_max_length(self) -> int:
        return self.batch.store.budget


class SlotBatch(Cache):
    def __init__(self, store: SlotStore, slots: list[int], new: list[int], width: int, dtype: torch.dtype,
                 hide: list[list[tuple[int, int]]]):
        self.store, self.slots, self.new, self.width = store, list(slots), list(new), width
        dev = store.k[0].device
        lens = torch.tensor([store.length[s] for s in slots])
        n = torch.tensor(new)
        self.width_kv = int((lens + n).max())  # attention reads this many rows of every slot
        for s in slots:
            if store.clean[s] < self.width_kv:
                for k, v in zip(store.k, store.v):
                    k[s, :, store.clean[s]:self.width_kv] = 0
                    v[s, :, store.clean[s]:self.width_kv] = 0
                store.clean[s] = self.width_kv
        # Rows are left-padded: row b's new tokens are its last n[b] positions, so logits_to_keep=1
        # reads every row's last token. Where each valid new token goes: (slot, row in the slot).
        pad = width - n
        b = torch.repeat_interleave(torch.arange(len(slots)), n)
        first = torch.cumsum(n, 0) - n
        r = torch.arange(int(n.sum())) - torch.repeat_interleave(first, n)  # index among the row's new tokens
        self._src = (b.to(dev), (pad[b] + r).to(dev))
        self._dst = (torch.tensor(slots)[b].to(dev), (lens[b] + r).to(dev))
        # Query i of row b is new token i - pad[b] (padding queries act as the first one, so no row is
        # empty); it sees the slot's old rows and the new ones up to itself.
        q = (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0)
        allowed = torch.arange(self.width_kv)[None, None, :] < (lens[:, None] + q + 1)[:, :, None]
        for b, ranges in enumerate(hide):
            for lo, hi in ranges:
                allowed[b, :, lo:hi] = False
        self.mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        self.mask = self.mask.to(dev)
        lo = slots[0]
        self._contiguous = slots == list(range(lo, lo + len(slots)))
        self._index = torch.tensor(slots, device=dev)
        super().__init__(layers=[_SlotLayer(self, i) for i in range(len(store.k))])

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """keys/values [B, kv_heads, width, head_dim] of the new rows -> the batch's rows [B, kv_heads, S, D]."""
        K, V = self.store.k[layer], self.store.v[layer]
        K[self._dst[0], :, self._dst[1]] = keys[self._src[0], :, self._src[1]].to(K.dtype)
        V[self._dst[0], :, self._dst[1]] = values[self._src[0], :, self._src[1]].to(V.dtype)
        if self._contiguous:  # active slots packed together: a view, no copy
            lo = self.slots[0]
            return K[lo:lo + len(self.slots), :, :self.width_kv], V[lo:lo + len(self.slots), :, :self.width_kv]
        return K[self._index, :, :self.width_kv], V[self._index, :, :self.width_kv]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
