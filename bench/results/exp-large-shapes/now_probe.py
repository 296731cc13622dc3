""""How many shapes are there now?" on 12 test-split moving clips of 8 and 16 frames at 64 tokens
(run from the repo root with PYTHONPATH=.)."""
import sys, numpy as np, torch
from streamvz.tiny import data
from streamvz.tiny.adapter import TinyAdapter
a = TinyAdapter(tokens_per_frame=64)
Q = "How many shapes are there now?"
res = {}
with torch.inference_mode():
    for n in (8, 16):
        right, ans = 0, []
        for seed in range(12):
            sc = data.moving_clip(np.random.default_rng(100 + seed), n)
            emb = list(a.encode_frames(np.stack([data.render(s) for s in sc])))
            (got,) = a.answer(emb, [0.5 * i for i in range(n)], [Q])
            truth = str(len(sc[-1].objects)); right += data.normalise(got) == truth; ans.append(f"{got}/{truth}")
        print(n, "frames:", right, "/ 12", ans, flush=True)
