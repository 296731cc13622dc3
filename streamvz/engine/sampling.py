"""Next tokens for a batch of rows, each with its own temperature, top_p and generator."""
from __future__ import annotations

import torch

from .step import SampleSpec


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    """logits [B, V] -> B token ids. Greedy rows (temperature 0) take the argmax; the others draw
    from softmax(logits / T) cut to the smallest prefix reaching top_p, with their own generator
    (so a seeded answer draws the same tokens whatever it is batched with)."""
    logits = logits.float().cpu()
    out = logits.argmax(-1).tolist()
    hot = [i for i, s in enumerate(specs) if s.temperature > 0]
    if not hot:
        return out
    temps = torch.tensor([specs[i].temperature for i in hot])[:, None]
    top_p = torch.tensor([specs[i].top_p for i in hot])[:, None]
    probs = (logits[hot] / temps).softmax(-1)
    p, idx = probs.sort(-1, descending=True)
    keep = (p.cumsum(-1) - p < top_p) | (top_p >= 1.0)
    probs = torch.zeros_like(probs).scatter(-1, idx, p * keep)
    for row, i in enumerate(hot):
        out[i] = int(torch.multinomial(probs[row], 1, generator=specs[i].generator))
    return out
