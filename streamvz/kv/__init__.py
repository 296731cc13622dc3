"""KV memory: the eviction policy (policy.py, no tensors), RoPE re-rotation (rope.py) and the
slot store every session's rows live in (store.py)."""
from .policy import Block, BlockTable
from .rope import rope_inv_freq, rotate_back
from .store import SlotStore

__all__ = ["Block", "BlockTable", "SlotStore", "rope_inv_freq", "rotate_back"]
