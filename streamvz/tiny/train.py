"""Train streamvz-tiny's projector (DINOv2-S and SmolLM2 frozen) on generated scenes.

    python -m streamvz.tiny.train recipe            # the committed projector, all rounds (RECIPE)
    python -m streamvz.tiny.train --seed 0 --steps 60   # one round; writes streamvz/tiny/assets/projector.*

Cheap enough for a 2-core CPU because nothing but the 0.55M-parameter MLP learns:
  * DINOv2 runs once per training image; its feature-layer states, CLS scores and keys
    are cached (in the streamvz cache dir), and every token budget is cut from them.
  * One frame carries several question/answer turns, so the frame's tokens go through
    the language model once for several supervised answers; logits are computed only
    where an answer token is predicted.
  * Budgets are mixed per batch (all 257 tokens, VisionZip 64 and 32), so one projector
    serves every tokens_per_frame. Some batches are 3-frame clips with "was there ...?"
    questions, the kind of question a long stream gets.
The sequence layout is the engine's (TinyAdapter.prompt_embeds + chat pieces).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .adapter import PROJECTOR, TinyAdapter
from .model import Features, Projector, reduce
from .weights import cache_dir

BUDGETS = (None, 64, 32, 16)  # None = all 257 tokens
BUDGET_WEIGHTS = (0.15, 0.35, 0.35, 0.15)


def cached_features(adapter: TinyAdapter, scenes: list[data.Scene], tag: str, batch: int = 16,
                    log=print) -> Features:
    """DINOv2 features of the rendered scenes, computed once and kept in the cache dir."""
    path = cache_dir() / "features" / f"{tag}.pt"
    if path.exists():
        d = torch.load(path)
        return Features(d["hidden"].float(), d["scores"].float(), d["keys"].float())
    parts, t0 = [], time.time()
    for i in range(0, len(scenes), batch):
        frames = np.stack([data.render(s) for s in scenes[i : i + batch]])
        f = adapter.frame_features(frames)
        parts.append(Features(f.hidden.half(), f.scores.half(), f.keys.half()))
        if (i // batch) % 10 == 0:
            log(f"features {i + len(frames)}/{len(scenes)} ({time.time() - t0:.0f}s)")
    feats = Features.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hidden": feats.hidden, "scores": feats.scores, "keys": feats.keys}, path)
    return Features(feats.hidden.float(), feats.scores.float(), feats.keys.float())


def align(adapter: TinyAdapter, projector: Projector, feats: Features, scenes: list[data.Scene],
          steps: int, rng: np.random.Generator, tokens: int = 2048, lr: float = 3e-3, log=print) -> None:
    """Stage 1, no language model in the loop (seconds per step instead of a minute): pull each
    patch token towards the word embeddings of what covers it (" red" + " circle", or "." for
    background), so the LM starts from tokens that already read like the scene's words."""
    E = adapter.model.get_input_embeddings().weight.detach()
    scale = E.norm(dim=-1).mean()

    def word(*ws):
        v = sum(E[adapter.ids(w)].mean(0) for w in ws)
        return v / v.norm() * scale

    labels = np.stack([data.patch_labels(s) for s in scenes])  # [N, 256]
    obj_tab = {(c, s): word(" " + c, " " + s) for c in data.COLOURS for s in data.SHAPES}
    background = word(".")
    targets = torch.empty(len(scenes), labels.shape[1], E.shape[1])
    for i, s in enumerate(scenes):
        objs = [obj_tab[(o.colour, o.shape)] for o in s.objects]
        for j, l in enumerate(labels[i]):
            targets[i, j] = objs[l] if l >= 0 else background
    is_obj = torch.from_numpy(labels >= 0).flatten()
    patches = feats.hidden[:, 1:].reshape(-1, feats.hidden.shape[-1])
    targets = targets.flatten(0, 1)
    obj_idx, bg_idx = is_obj.nonzero().squeeze(1), (~is_obj).nonzero().squeeze(1)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):  # half object patches, half background per step
        pick = torch.cat([obj_idx[torch.from_numpy(rng.integers(len(obj_idx), size=tokens // 2))],
                          bg_idx[torch.from_numpy(rng.integers(len(bg_idx), size=tokens // 2))]])
        loss = F.mse_loss(projector(patches[pick]), targets[pick]) / scale**2 * E.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"align {step}/{steps} relative mse {loss.item():.3f}")


def build_batch(adapter: TinyAdapter, projector: Projector, feats: Features, samples: list) -> tuple:
    """samples: [(image indices, budget, times, [(q, a), ...])] -> (embeds, mask, positions, targets).

    Each sample is system + frames + (user turn + answer + end of turn) per QA pair; a target
    is every answer token plus the first end-of-turn token (so the model learns to stop).
    """
    eot = adapter.ids(adapter.chat.end_of_turn)[:1]
    seqs, where, targets = [], [], []
    for b, (idx, budget, times, qas) in enumerate(samples):
        vis = projector(reduce(feats[list(idx)], "visionzip" if budget else "full", budget))
        x = [adapter.prompt_embeds(list(vis), times, None)]
        n = x[0].shape[0]
        for q, a in qas:
            user = adapter.ids(adapter.chat.user.format(q))
            ans = adapter.ids(a) + eot
            x.append(adapter.embed_ids(user + ans[:-1]))
            start = n + len(user) - 1  # the position whose output predicts the first answer token
            where += [(b, start + j) for j in range(len(ans))]
            targets += ans
            n += len(user) + len(ans) - 1
            x.append(adapter.embed_ids(adapter.ids(adapter.chat.end_of_turn)))
            n += len(adapter.ids(adapter.chat.end_of_turn))
        seqs.append(torch.cat(x))
    L = max(s.shape[0] for s in seqs)
    D = seqs[0].shape[1]
    embeds = torch.zeros(len(seqs), L, D)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    where_t = torch.tensor(where)
    return embeds, mask, where_t, torch.tensor(targets)


def sample_batch(rng: np.random.Generator, scenes: list[data.Scene], batch: int, qas: int, clip_p: float):
    budget = BUDGETS[rng.choice(len(BUDGETS), p=BUDGET_WEIGHTS)]
    clip = budget is not None and rng.random() < clip_p
    out = []
    for _ in range(batch):
        if clip:
            idx = [int(i) for i in rng.choice(len(scenes), size=3, replace=False)]
            t0 = float(rng.integers(0, 600))
            times = [t0 + 5.0 * j for j in range(3)]
            pairs = data.clip_questions([scenes[i] for i in idx], rng, n=qas)
        else:
            idx = [int(rng.integers(len(scenes)))]
            times = [float(rng.integers(0, 1200)) / 2]
            pairs = data.questions(scenes[idx[0]], rng, n=qas)
        out.append((idx, budget, times, pairs))
    return out


def loss_on(adapter: TinyAdapter, batch) -> tuple[torch.Tensor, float]:
    embeds, mask, where, targets = batch
    hidden = adapter.model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = adapter.model.lm_head(hidden[where[:, 0], where[:, 1]]).float()
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(-1) == targets).float().mean().item()
    return loss, acc


# How the committed projector was made (python -m streamvz.tiny.train recipe): stage 1 + 60 LM
# steps, then two resumed rounds on fresh scenes (new seeds), as CPU time allowed on the day.
RECIPE = (
    "--seed 0 --images 384 --align-steps 300 --steps 60 --out {tmp}/round1.safetensors",
    "--seed 1 --images 384 --align-steps 0 --steps 80 --resume {tmp}/round1.safetensors --out {tmp}/round2.safetensors",
    "--seed 2 --images 256 --align-steps 0 --steps 120 --resume {tmp}/round2.safetensors --out {out}",
)


def recipe(out: Path = PROJECTOR) -> int:
    tmp = cache_dir() / "train"
    tmp.mkdir(parents=True, exist_ok=True)
    for line in RECIPE:
        code = main(line.format(tmp=tmp, out=out).split())
        if code:
            return code
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recipe"]:
        return recipe()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=1024, help="distinct training scenes")
    ap.add_argument("--align-steps", type=int, default=300, help="stage 1 (no LM) steps")
    ap.add_argument("--steps", type=int, default=45, help="stage 2 (LM loss) steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--qas", type=int, default=5, help="question/answer turns per sample")
    ap.add_argument("--clip-p", type=float, default=0.15, help="share of compressed batches that are 3-frame clips")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", type=Path, default=PROJECTOR)
    ap.add_argument("--resume", type=Path, default=None, help="start from these projector weights")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    adapter = TinyAdapter(tokens_per_frame=None, device="cpu", dtype=torch.float32, projector=args.resume)
    scenes = [data.random_scene(rng, "train") for _ in range(args.images)]
    t0 = time.time()
    feats = cached_features(adapter, scenes, f"train-seed{args.seed}-n{args.images}")
    print(f"features ready: {tuple(feats.hidden.shape)} in {time.time() - t0:.0f}s", flush=True)

    projector = adapter.projector.float().train()
    for p in projector.parameters():
        p.requires_grad_(True)
    t_align = time.time()
    if args.align_steps:
        align(adapter, projector, feats, scenes, args.align_steps, rng)
    print(f"stage 1 done in {time.time() - t_align:.0f}s", flush=True)
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    t1, hist = time.time(), []
    for step in range(1, args.steps + 1):
        batch = build_batch(adapter, projector, feats, sample_batch(rng, scenes, args.batch, args.qas, args.clip_p))
        loss, acc = loss_on(adapter, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        sched.step()
        hist.append((loss.item(), acc))
        if step % 10 == 0 or step == args.steps:
            l, a = np.mean(hist[-10:], axis=0)
            print(f"step {step}/{args.steps} loss {l:.3f} answer-token acc {a:.2f} "
                  f"({time.time() - t1:.0f}s, {(time.time() - t1) / step:.1f}s/step)", flush=True)

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(args.out))
    meta = {
        "command": "python -m streamvz.tiny.train " + " ".join(argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "final_loss": float(np.mean([h[0] for h in hist[-20:]])),
        "final_answer_token_acc": float(np.mean([h[1] for h in hist[-20:]])),
        "train_seconds": round(time.time() - t1),
        "feature_seconds": round(t_align - t0),
        "align_seconds": round(t1 - t_align),
        "torch": torch.__version__,
    }
    if args.resume and args.resume.with_suffix(".json").exists():  # keep the whole recipe reproducible
        meta["resumed_from"] = json.loads(args.resume.with_suffix(".json").read_text())
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"saved {args.out} ({meta})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
