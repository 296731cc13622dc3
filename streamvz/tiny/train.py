"""Train streamvz-tiny: the MLP projector and a small LoRA on SmolLM2 (DINOv2-S frozen, LM base frozen).

    python -m streamvz.tiny.train          # the committed weights: streamvz/tiny/assets/{projector,lora}.*

Cheap enough for a 2-core CPU (about 60 minutes from nothing, 57 with cached features) because:
  * DINOv2 runs once per training image; its feature-layer states, CLS scores and keys
    are cached (in the streamvz cache dir), and every token budget is cut from them.
  * Stage 1 needs no LM: patch tokens are pulled towards the word embeddings of what covers
    them, so stage 2 starts from tokens that already read like the scene's words.
  * One frame carries several question/answer turns, so the frame's tokens go through
    the language model once for several supervised answers; logits are computed only
    where an answer token is predicted; the LM runs under bf16 autocast. An attention mask
    keeps the turns apart: each sees the frames and itself at the positions it would have
    if asked alone, exactly as the engine asks it (no answer can be read off an earlier turn).
  * Questions come in many wordings (questions.py, wording.TRAIN): 30% in the canonical template,
    the rest plain, listing the options (inline or enumerated, in random order), polite, terse,
    with an answer-form instruction; the answer is always the one word asked for. The held-out
    wordings the quality bench also asks are never read here.
  * Budgets are mixed per batch (all 257 tokens, VisionZip 64, 32 and 16), so one set of
    weights serves every tokens_per_frame. Some batches are clips with "was there ...?" and
    "how many ... now?" questions, the kind a stream gets: unrelated scenes (2-6 frames, up to 24
    at 16 tokens), mostly-empty streams, and ordered windows of up to 16 frames of continuous
    moving clips.
  * `--distill W` adds a self-distillation term (distill.py: KL to the base LM on plain chat).
    Measured on the wording fine-tune it lowered both columns (README), so it is off by default.
The LoRA (rank 8 on every attention and MLP projection) is merged into the LM's weights when
TinyAdapter loads, so serving costs nothing extra. The sequence layout is the engine's
(TinyAdapter.prompt_embeds + chat pieces). Progress lines report accuracy on held-out scenes
per question kind and for canonical ("template") vs other training wordings ("worded"); the
quality bench (bench/quality_bench.py, with its held-out wordings) is the real measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .adapter import PROJECTOR, TinyAdapter
from .model import FULL_TOKENS, Features, Projector, places, reduce
from .distill import Teacher
from .lora import attach, beside, lora_state
from .questions import asked, clip_questions, questions
from .weights import cache_dir

BUDGETS = (None, 64, 32, 16)  # None = all 257 tokens
BUDGET_WEIGHTS = (0.25, 0.35, 0.25, 0.15)
SPARSE_P = 0.5  # share of clips that are mostly empty frames
LAST_EMPTY_P = 0.25  # in those, the chance that the last frame (what "now" asks about) is empty too
TURN_P = 0.5  # share of clips with earlier answered turns between their frames (a live session's layout)
MOVING_P = 0.5  # share of clips cut from one continuous moving clip (one background, the same shapes drifting)
MOVING_WINDOW = 16  # such windows run to 16 frames at any budget: a live question comes after many frames


def cached_features(adapter: TinyAdapter, scenes: list[data.Scene], tag: str, batch: int = 16,
                    log=print) -> Features:
    """DINOv2 features of the rendered scenes, computed once and kept in the cache dir (the
    name carries data.VERSION: scenes drawn by an older generator are never reused)."""
    path = cache_dir() / "features" / f"{tag}-v{data.VERSION}.pt"
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
    patch token towards the word embeddings of what covers it (" red" + " circle", or the
    background's answer word, " striped"), so the LM starts from tokens that already read like the
    scene's words. (Aligning background patches to "." instead left the background unlearnt: run E.)"""
    E = adapter.model.get_input_embeddings().weight.detach()
    scale = E.norm(dim=-1).mean()

    def word(*ws):
        v = sum(E[adapter.ids(w)].mean(0) for w in ws)
        return v / v.norm() * scale

    labels = np.stack([data.patch_labels(s) for s in scenes])  # [N, 256], object index or -1
    pairs = [(c, s) for c in data.COLOURS for s in data.SHAPES]
    grounds = list(data.BACKGROUNDS)  # rows 0..3: the background's word; then one row per object
    table = torch.stack([word(" " + data.BACKGROUNDS[g]) for g in grounds] + [word(" " + c, " " + s) for c, s in pairs])
    rows = np.zeros_like(labels)
    for i, sc in enumerate(scenes):
        ids = np.array([len(grounds) + pairs.index((o.colour, o.shape)) for o in sc.objects] or [0])
        rows[i] = np.where(labels[i] >= 0, ids[np.maximum(labels[i], 0)], grounds.index(sc.background[0]))
    targets = table[torch.from_numpy(rows)]
    is_obj = torch.from_numpy(labels >= 0).flatten()
    patches = feats.hidden[:, 1:].reshape(-1, feats.hidden.shape[-1])
    where = places(feats.hidden.shape[1])[1:].repeat(len(scenes), 1)
    targets = targets.flatten(0, 1)
    obj_idx, bg_idx = is_obj.nonzero().squeeze(1), (~is_obj).nonzero().squeeze(1)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):  # half object patches, half background per step
        pick = torch.cat([obj_idx[torch.from_numpy(rng.integers(len(obj_idx), size=tokens // 2))],
                          bg_idx[torch.from_numpy(rng.integers(len(bg_idx), size=tokens // 2))]])
        loss = F.mse_loss(projector(patches[pick], where[pick]), targets[pick]) / scale**2 * E.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"align {step}/{steps} relative mse {loss.item():.3f}")


class Batch(NamedTuple):
    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    positions: torch.Tensor  # [B, L]
    where: torch.Tensor  # [n, 2] (row, position) whose output predicts each target
    targets: torch.Tensor  # [n]
    first: torch.Tensor  # [n] bool, an answer's first token


def build_batch(adapter: TinyAdapter, projector: Projector, feats: Features, samples: list) -> Batch:
    """samples: [(image indices, budget, times, [(q, a), ...], earlier turns)] -> Batch.

    Each sample is system + frames (with the earlier turns, answered, between them as the engine
    keeps them: see TinyAdapter.prompt_embeds), then one branch per QA pair (user turn + answer). A branch
    attends to the frames and to itself only, and its positions continue from the frames, so
    every answer is predicted from exactly the sequence the engine builds for that question
    alone. Targets are every answer token plus the end-of-turn token (the model learns to stop).
    """
    eot = adapter.ids(adapter.chat.end_of_turn)[:1]
    seqs, pos, owner, where, targets, first = [], [], [], [], [], []
    for b, (idx, budget, times, qas, earlier) in enumerate(samples):
        vis = projector(*reduce(feats[list(idx)], "visionzip" if budget else "full", budget))
        x = [adapter.prompt_embeds(list(vis), times, None, turns=earlier)]
        n = L = x[0].shape[0]
        p, o = list(range(n)), [0] * n  # owner 0: the shared frames; i: the i-th QA branch
        for i, (q, a) in enumerate(qas, 1):
            user, ans = adapter.ids(adapter.chat.user.format(q)), adapter.ids(a) + eot
            turn = user + ans[:-1]
            x.append(adapter.embed_ids(turn))
            start = L + len(user) - 1  # the output here predicts the first answer token
            where += [(b, start + j) for j in range(len(ans))]
            targets += ans
            first += [True] + [False] * (len(ans) - 1)
            p += range(n, n + len(turn))
            o += [i] * len(turn)
            L += len(turn)
        seqs.append(torch.cat(x))
        pos.append(p)
        owner.append(o)
    L = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), L, seqs[0].shape[1])
    positions = torch.zeros(len(seqs), L, dtype=torch.long)
    own = torch.full((len(seqs), L), -1)  # -1: padding
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        positions[b, : s.shape[0]] = torch.tensor(pos[b])
        own[b, : s.shape[0]] = torch.tensor(owner[b])
    q, k = own[:, :, None], own[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax row)
    return Batch(embeds, mask[:, None], positions, torch.tensor(where), torch.tensor(targets), torch.tensor(first))


def earlier_turns(rng: np.random.Generator, clip: list[data.Scene]) -> list[tuple[int, str, str]]:
    """One or two questions asked, and answered rightly, while the clip streamed: (k, q, a) sits
    before frame k and is about the frames before it (the latest one, or all of them)."""
    out = []
    for k in sorted(rng.integers(1, len(clip), size=int(rng.integers(1, 3)))):
        pool = questions(clip[k - 1], rng, n=2) + clip_questions(clip[:k], rng, n=2)
        out.append((int(k), *pool[int(rng.integers(len(pool)))]))
    return out


def sample_batch(rng: np.random.Generator, scenes: list[data.Scene], batch: int, qas: int, clip_p: float,
                 empty: list[int] = (), moving: list[list[int]] = ()):
    """[(image indices, budget, times, [(q, a), ...], earlier turns)]. empty: indices of frames with no
    object; moving: index lists of continuous clips (consecutive frames of data.moving_clip)."""
    budget = BUDGETS[rng.choice(len(BUDGETS), p=BUDGET_WEIGHTS)]
    clip = budget is not None and rng.random() < clip_p
    out = []
    for _ in range(batch):
        if clip:
            # 2-6 frames some seconds apart; up to 12/24 at 32/16 tokens (the same few hundred
            # tokens), so long windows are seen in training too.
            n = int(rng.integers(2, max(6, 384 // budget) + 1))
            idx = [int(i) for i in rng.choice(len(scenes), size=n, replace=False)]
            if len(moving) and rng.random() < MOVING_P:
                # frames of one continuous clip, in order: a live camera's "now" is its latest frame of
                # the same scene, which unrelated frames, or windows of at most 6 frames at 64 tokens,
                # never taught (runs G-I answered the demo clip's one-shape last frame "0").
                # The unrelated-scene draw above is kept: it fixes the rng stream the committed weights came from.
                c = moving[int(rng.integers(len(moving)))]
                n = min(len(c), int(rng.integers(2, max(MOVING_WINDOW, 384 // budget) + 1)))
                idx = [c[i] for i in sorted(rng.choice(len(c), size=n, replace=False))]
            elif len(empty) and rng.random() < SPARSE_P:
                # a stream that mostly shows nothing (a quiet camera, the long video): most
                # frames are empty, so "was there ...?" must come from the few that are not
                # The last frame is emptied less often: "how many ... now?" reads it, and emptying
                # it 80% of the time taught "now" to lean to 0 (run G answered a one-shape frame "0").
                idx = [int(rng.choice(empty)) if rng.random() < (0.8 if j < n - 1 else LAST_EMPTY_P) else i
                       for j, i in enumerate(idx)]
            t0, gap = float(rng.integers(0, 600)), float(rng.integers(1, 30))
            times = [t0 + gap * j for j in range(n)]
            pairs = clip_questions([scenes[i] for i in idx], rng, n=qas)
            earlier = earlier_turns(rng, [scenes[i] for i in idx]) if rng.random() < TURN_P else []
        else:
            idx = [int(rng.integers(len(scenes)))]
            times = [float(rng.integers(0, 1200)) / 2]
            pairs = questions(scenes[idx[0]], rng, n=qas)
            earlier = []
        out.append((idx, budget, times, pairs, earlier))
    return out


def loss_on(adapter: TinyAdapter, batch, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the answer tokens, and which of them the model already gets right.
    bf16 autocast roughly halves a step on CPUs with AVX512-BF16 (and on GPUs)."""
    with torch.autocast(batch.embeds.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = adapter.model.model(inputs_embeds=batch.embeds, attention_mask=batch.mask,
                                     position_ids=batch.positions).last_hidden_state
        logits = adapter.model.lm_head(hidden[batch.where[:, 0], batch.where[:, 1]]).float()
    loss = F.cross_entropy(logits, batch.targets)
    return loss, logits.argmax(-1) == batch.targets


@torch.no_grad()
def evaluate(adapter: TinyAdapter, projector: Projector, feats: Features, qas: list, bf16: bool,
             budgets=(None, 64, 32), batch: int = 8) -> dict:
    """Teacher-forced accuracy of each answer's first token on held-out scenes (one-word answers,
    so this tracks the quality bench's exact match at a fraction of its cost), per question kind
    and split into questions in the canonical template and in other training wordings.
    qas: per scene, [(question, Fact)] (questions.asked)."""
    facts = [(q, f) for qa in qas for q, f in qa]
    groups = {"template": np.array([q == f.canonical for q, f in facts])}
    groups["worded"] = ~groups["template"]
    groups.update({k: np.array([f.kind == k for _, f in facts]) for k in sorted({f.kind for _, f in facts})})
    out = {}
    for budget in budgets:
        right = []
        for i in range(0, len(qas), batch):
            samples = [([j], budget, [0.0], [(q, f.answer) for q, f in qas[j]], []) for j in range(i, min(i + batch, len(qas)))]
            b = build_batch(adapter, projector, feats, samples)
            _, ok = loss_on(adapter, b, bf16)
            right.append(ok[b.first])
        right = torch.cat(right).numpy()
        out[budget or FULL_TOKENS] = {"all": float(right.mean()), **{k: float(right[m].mean()) for k, m in groups.items() if m.any()}}
    return out


def save(args, argv, projector: Projector, lora: dict, hist: list, evals: list, timings: tuple, final: bool,
         init: dict | None = None) -> None:
    """Projector, LoRA beside it, and projector.json (command, args, held-out progress)."""
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(args.out))
    lora_path = beside(args.out)
    if lora:
        save_file({k: v.half() for k, v in lora_state(lora).items()}, str(lora_path))
    elif lora_path.exists():
        lora_path.unlink()  # a stale LoRA must not be merged into a projector trained without it
    meta = {
        "command": "python -m streamvz.tiny.train " + " ".join(argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "finished": final,
        "lora": lora_path.name if lora else None,
        "init": init,  # a fine-tune: the weights it started from
        "final_loss": float(np.mean([h[0] for h in hist[-20:]])),
        "final_answer_acc": float(np.mean([h[1] for h in hist[-20:]])),
        "final_distill_kl": float(np.mean([h[2] for h in hist[-20:]])) if args.distill else None,
        "held_out": evals,
        "feature_seconds": round(timings[0]),
        "align_seconds": round(timings[1]),
        "train_seconds": round(timings[2]),
        "steps_done": len(hist),
        "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"saved {args.out} ({'final' if final else 'checkpoint'}, step {len(hist)})", flush=True)


def load_init(projector: Projector, path: Path) -> dict:
    """Projector weights to start from; returns where they came from (kept in projector.json)."""
    import hashlib

    from safetensors.torch import load_file

    projector.load_state_dict(load_file(str(path)))
    meta = path.with_suffix(".json")
    came = json.loads(meta.read_text()) if meta.exists() else {}
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "its_command": came.get("command"), "its_steps": came.get("steps_done")}


@torch.no_grad()
def load_lora(wrapped: dict, path: Path) -> None:
    """Saved LoRA factors (scale folded into B) into freshly attached LoRALinears."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if {k.rsplit(".", 1)[0] for k in state} != set(wrapped):
        raise ValueError(f"{path} does not match the attached LoRA layers")
    for name, m in wrapped.items():
        m.A.copy_(state[f"{name}.A"].float())
        m.B.copy_(state[f"{name}.B"].float() / m.scale)


EVAL_SEED = 5_000  # held-out scenes for the progress line ("test" photos; the quality bench uses other seeds)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=1536, help="distinct training scenes")
    ap.add_argument("--align-steps", type=int, default=300, help="stage 1 (no LM) steps")
    ap.add_argument("--steps", type=int, default=380, help="stage 2 (LM loss) steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--qas", type=int, default=8, help="question/answer turns per sample")
    ap.add_argument("--clip-p", type=float, default=0.2, help="share of compressed batches that are clips")
    ap.add_argument("--empty", type=int, default=128, help="extra training frames with no object")
    ap.add_argument("--moving", type=int, default=32, help="continuous moving training clips")
    ap.add_argument("--moving-frames", type=int, default=24, help="frames per moving clip")
    ap.add_argument("--lr", type=float, default=2e-3, help="projector learning rate")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on the LM's attention (0: projector only)")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower; for CPUs without BF16)")
    ap.add_argument("--eval-every", type=int, default=190, help="held-out check every N steps (0: only at the end)")
    ap.add_argument("--eval-scenes", type=int, default=48)
    ap.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the held-out checks)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of the self-distillation term (distill.py: KL to the base LM on plain chat; 0: off)")
    ap.add_argument("--distill-batch", type=int, default=8, help="plain chat prompts per step for that term")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", type=Path, default=PROJECTOR, help="projector weights; the LoRA goes beside it")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these projector weights and the LoRA beside them (a fine-tune: no alignment stage)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    bf16 = not args.fp32

    adapter = TinyAdapter(tokens_per_frame=None, device="cpu", dtype=torch.float32, projector=None)
    scenes = [data.random_scene(rng, "train") for _ in range(args.images)]
    empty_rng = np.random.default_rng([args.seed, 1])  # its own stream: the scenes above stay the same
    empties = [data.Scene(data.random_background(empty_rng, "train")) for _ in range(args.empty)]
    mov_rng = np.random.default_rng([args.seed, 2])
    clips = [data.moving_clip(mov_rng, args.moving_frames, "train", objects=int(mov_rng.integers(1, data.MAX_OBJECTS + 1)))
             for _ in range(args.moving)]
    ev_rng = np.random.default_rng(EVAL_SEED)
    ev_scenes = [data.random_scene(ev_rng, "test") for _ in range(args.eval_scenes)]
    ev_qas = [asked(sc, ev_rng, n=args.qas) for sc in ev_scenes]
    t0 = time.time()
    feats = cached_features(adapter, scenes, f"train-seed{args.seed}-n{args.images}")
    if empties:
        feats = Features.cat([feats, cached_features(adapter, empties, f"empty-seed{args.seed}-n{args.empty}")])
    empty, scenes = list(range(len(scenes), len(scenes) + len(empties))), scenes + empties
    moving = [list(range(len(scenes) + i * args.moving_frames, len(scenes) + (i + 1) * args.moving_frames))
              for i in range(len(clips))]
    if clips:
        flat = [sc for c in clips for sc in c]
        feats = Features.cat([feats, cached_features(adapter, flat, f"moving-seed{args.seed}-n{args.moving}x{args.moving_frames}")])
        scenes = scenes + flat
    ev_feats = cached_features(adapter, ev_scenes, f"eval-seed{EVAL_SEED}-n{args.eval_scenes}")
    print(f"features ready: {tuple(feats.hidden.shape)} in {time.time() - t0:.0f}s", flush=True)

    projector = adapter.projector.float().train()
    for p in projector.parameters():
        p.requires_grad_(True)
    t_align = time.time()
    init = None
    if args.init:
        init = load_init(projector, args.init)
    elif args.align_steps:
        align(adapter, projector, feats, scenes, args.align_steps, rng)
    print(f"stage 1 done in {time.time() - t_align:.0f}s", flush=True)
    groups = [{"params": list(projector.parameters()), "lr": args.lr}]
    lora = attach(adapter.model, args.lora_rank) if args.lora_rank else {}
    if args.init and lora:
        load_lora(lora, beside(args.init))
    if lora:
        groups.append({"params": [p for m in lora.values() for p in (m.A, m.B)], "lr": args.lora_lr})
    teacher = None
    if args.distill and lora:
        distill_rng = np.random.default_rng([args.seed, 3])  # its own stream: the training batches stay the same
        t_teacher = time.time()
        teacher = Teacher.build(adapter, lora, distill_rng)
        print(f"self-distillation: {len(teacher.sequences)} base replies in {time.time() - t_teacher:.0f}s", flush=True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    t1, hist, evals = time.time(), [], []
    timings = (t_align - t0, t1 - t_align)
    params = [p for g in groups for p in g["params"]]
    for step in range(1, args.steps + 1):
        batch = build_batch(adapter, projector, feats, sample_batch(rng, scenes, args.batch, args.qas, args.clip_p, empty, moving))
        loss, ok = loss_on(adapter, batch, bf16)
        kl = teacher.loss(adapter, lora, distill_rng, args.distill_batch) if teacher else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.distill * kl).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append((loss.item(), ok[batch.first].float().mean().item(), kl.item()))
        if step % 10 == 0 or step == args.steps:
            l, a, d = np.mean(hist[-10:], axis=0)
            print(f"step {step}/{args.steps} loss {l:.3f} answer acc {a:.2f}" + (f" kl {d:.4f}" if teacher else "") + " "
                  f"({time.time() - t1:.0f}s, {(time.time() - t1) / step:.1f}s/step)", flush=True)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            projector.eval()
            acc = evaluate(adapter, projector, ev_feats, ev_qas, bf16)
            projector.train()
            evals.append({"step": step, **{str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in acc.items()}})
            for k, v in acc.items():
                print(f"held-out answer acc at step {step}, {k} tokens: " + " ".join(f"{kk} {vv:.2f}" for kk, vv in v.items()),
                      flush=True)
            if step < args.steps:  # a checkpoint: a run cut short keeps its latest weights
                save(args, argv, projector, lora, hist, evals, timings + (time.time() - t1,), final=False, init=init)
        elif args.save_every and step % args.save_every == 0 and step < args.steps:
            save(args, argv, projector, lora, hist, evals, timings + (time.time() - t1,), final=False, init=init)

    save(args, argv, projector, lora, hist, evals, timings + (time.time() - t1,), final=True, init=init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
