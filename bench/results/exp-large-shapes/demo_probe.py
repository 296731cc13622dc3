"""The demo clip's "How many shapes are there now?" through the adapter: top-3 answers for the first
n frames, with 0, 1 or 2 earlier turns (run from the repo root with PYTHONPATH=.)."""
import numpy as np, torch
from streamvz.tiny import data
from streamvz.tiny.adapter import TinyAdapter
from transformers import DynamicCache
rng = np.random.default_rng(0)
scenes = data.moving_clip(rng, 32)
frames = np.stack([data.render(s) for s in scenes[::2]])  # 2 fps of a 4 fps clip
print("objects per frame:", [len(s.objects) for s in scenes[::2]], "bg", scenes[0].background[0])
a = TinyAdapter(tokens_per_frame=64)
emb = list(a.encode_frames(frames))
times = [0.5 * i for i in range(16)]
Q = "How many shapes are there now?"
def ask(n, turns, q=Q):
    x = a.prompt_embeds(emb[:n], times[:n], q, turns=turns)
    logits = a.model(inputs_embeds=x[None], logits_to_keep=1).logits[0, -1]
    top = logits.softmax(-1).topk(3)
    return [(a.tokenizer.decode([int(i)]), round(float(p), 2)) for p, i in zip(top.values, top.indices)]
T1 = (2, "What color is the circle?", "white"); T2 = (2, "Is there a white circle?", "yes")
with torch.inference_mode():
    for n in (4, 6, 8, 12, 16):
        print(n, "no turns", ask(n, []), "| 1 turn", ask(n, [T1]), "| 2 turns", ask(n, [T1, T2]))
    x = a.answer([emb[-1]], [7.5], ["How many shapes are there?", Q, "What color is the circle?"])
    print("last frame alone:", x)
