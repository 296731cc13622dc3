"""Probe: per-shape colour-or-absent (4 heads x 7) + count, on DINOv2 features of a scene variant."""
import sys, time, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from streamvz.tiny import data
from streamvz.tiny.model import reduce, place_features, Features
variant = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
size_lo, size_hi, maxobj, dim = 44, 70, 3, 0.75
for kv in variant.split(","):
    k, v = kv.split("=") if "=" in kv else (kv, "")
    if k == "size": size_lo, size_hi = map(float, v.split("-"))
    if k == "maxobj": maxobj = int(v)
    if k == "dim": dim = float(v)
def _place(rng, n, placed, tries=400):
    out = []
    for _ in range(tries):
        if len(out) == n: break
        size = float(rng.uniform(size_lo, size_hi)); m = size / 2 + 4
        cx, cy = float(rng.uniform(m, data.SIZE - m)), float(rng.uniform(m, data.SIZE - m))
        others = [(o.cx, o.cy, o.size) for o in placed] + out
        if all(abs(cx - x) > (size + s) / 2 + 6 or abs(cy - y) > (size + s) / 2 + 6 for x, y, s in others):
            out.append((cx, cy, size))
    return out
data._place = _place
_bgorig = data._background
def _bg(bg):
    if bg[0] == 'photo' and dim != 0.75:
        from PIL import Image
        _, name, x, y, crop = bg
        img = data._photo(name)[y:y+crop, x:x+crop]
        return Image.fromarray((img*dim).astype(np.uint8)).resize((data.SIZE, data.SIZE), Image.BILINEAR)
    return _bgorig(bg)
data._background = _bg
rng = np.random.default_rng(123)
scenes = [data.random_scene(rng, "train", n=int(rng.integers(1, maxobj + 1))) for _ in range(N)]
if variant == "base":
    rng = np.random.default_rng(0); scenes = [data.random_scene(rng, "train") for _ in range(1536)]
    d = torch.load("/root/.cache/streamvz/features/train-seed0-n1536-v1.pt")
    feats = Features(d["hidden"].float(), d["scores"].float(), d["keys"].float())
else:
    from streamvz.tiny.adapter import TinyAdapter
    ad = TinyAdapter(tokens_per_frame=None, device="cpu", dtype=torch.float32, projector=None)
    parts = []; t0 = time.time()
    for i in range(0, len(scenes), 16):
        f = ad.frame_features(np.stack([data.render(s) for s in scenes[i:i+16]]))
        parts.append(Features(f.hidden.float(), f.scores.float(), f.keys.float()))
    feats = Features.cat(parts); print("features", time.time() - t0, flush=True)
cols = list(data.COLOURS)
lab = []
for s in scenes:
    row = [len(cols)] * 4
    for o in s.objects: row[data.SHAPES.index(o.shape)] = cols.index(o.colour)
    lab.append(row + [len(s.objects), ['flat','gradient','stripes','photo'].index(s.background[0])])
y = torch.tensor(lab)
ntr = int(len(scenes) * 0.78)
class Probe(nn.Module):
    def __init__(s):
        super().__init__(); s.norm = nn.LayerNorm(384); s.fc = nn.Linear(384 + 17, 128); s.att = nn.Linear(128, 6)
        s.heads = nn.ModuleList([nn.Linear(128, 7) for _ in range(4)] + [nn.Linear(128, 8), nn.Linear(128, 4)])
    def forward(s, x, p):
        h = F.gelu(s.fc(torch.cat([s.norm(x), place_features(p)], -1)))
        a = s.att(h).softmax(1)
        z = torch.einsum("bkh,bkd->bhd", a, h)
        return [hd(z[:, i]) for i, hd in enumerate(s.heads)]
for method, k in [("full", None), ("visionzip", 64), ("topcls", 64), ("visionzip", 32), ("topcls", 32)]:
    x, p = reduce(feats, method, k)
    res = []
    for seed in range(2):
        torch.manual_seed(seed)
        m = Probe(); opt = torch.optim.AdamW(m.parameters(), 2e-3, weight_decay=0.01)
        for step in range(600):
            i = torch.randint(0, ntr, (64,))
            out = m(x[i], p[i]); loss = sum(F.cross_entropy(o, y[i, j]) for j, o in enumerate(out))
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            out = m(x[ntr:], p[ntr:])
            hit = torch.stack([o.argmax(-1) == y[ntr:, j] for j, o in enumerate(out)], 1).float()
        res.append((hit[:, :4].mean().item(), hit[:, 4].mean().item(), hit[:, 5].mean().item()))
    r = np.array(res).mean(0)
    print(f"{variant:24s} {method:9s} {str(k):4s} parse {r[0]:.3f} count {r[1]:.3f} bg {r[2]:.3f}", flush=True)
