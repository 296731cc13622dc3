"""Quality of streamvz-tiny under token compression, on a held-out generated set.

    python bench/quality_bench.py                  # table + JSON + plot under bench/results/
    python bench/quality_bench.py --scenes 32 --skip-long
    python bench/quality_bench.py --heldout bench/heldout_wordings_fresh.json --budgets "" \
        --baseline-budgets "" --skip-long --out bench/results/quality-fresh   # the second held-out set

1. Exact match on held-out scenes (scikit-image photos and seeds never used in training), each
   asked one question of every kind (colour, shape, count, present, position, background),
   twice: in its training template ("What color is the circle?", the template column) and in a
   held-out wording that training never saw (bench/heldout_wordings.json), and once more in a
   held-out wording that lists the options for the kinds that have them; the held-out column
   scores both held-out questions, "listed" the second alone:
   all 257 tokens vs VisionZip at 64/32/16 vs the same budgets by random token drop, uniform
   spatial pooling and top-CLS selection without contextual merging. One DINOv2 pass per
   scene; every method is cut from the same features and goes through the same projector.
2. Long-video recall: a 10-minute clip (one frame per 5 s) with single-frame events at known
   times. The KV cache holds a fixed number of tokens; each setting keeps the newest frames
   that fit (what the rolling cache does), then answers "was there a <colour> <shape>?" for
   every event and for as many never-shown objects.
Answers are greedy, up to 3 tokens; exact match compares the first word, lower-cased.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import DynamicCache  # noqa: E402

from streamvz.tiny import data, load_tiny  # noqa: E402
from streamvz.tiny.model import FULL_TOKENS, reduce  # noqa: E402
from streamvz.tiny.questions import KINDS, Fact, facts, normalise  # noqa: E402
from streamvz.tiny.train import cached_features  # noqa: E402
from streamvz.tiny.wording import Wording  # noqa: E402

TEST_SEED = 1000  # training uses seed 0 and TRAIN_PHOTOS; these scenes use TEST_PHOTOS
HELDOUT_SEED = 1002  # which held-out wording each question gets (its own stream: the template questions stay those of earlier runs)
HELDOUT = Path(__file__).parent / "heldout_wordings.json"  # wordings training never reads
BASELINES = ("random", "pool", "topcls")
LISTED = ("colour", "shape", "count", "background")  # kinds whose held-out wordings can list the options


@torch.inference_mode()
def batch_answers(adapter, vis: list[torch.Tensor], questions: list[list[str]], max_new_tokens: int = 3,
                  t: float = 0.0) -> list[list[str]]:
    """Greedy answers for B frames and each frame's questions (lists may differ in length); the
    frames' prefix is computed once per batch and every question is asked on its own after it
    (right-padded, masked). A frame with fewer questions re-asks its first, and that answer is dropped."""
    m, dev = adapter.model, adapter.device
    B, n = len(vis), max(map(len, questions))
    prefix = torch.stack([adapter.prompt_embeds([v], [t], None) for v in vis])
    P = prefix.shape[1]
    cache = DynamicCache(config=m.config)
    m(inputs_embeds=prefix, cache=cache, use_cache=True, logits_to_keep=1)
    eos = set(adapter.eos_token_ids)
    out = [[""] * len(q) for q in questions]
    for j in range(n):
        ids = [adapter.ids(adapter.chat.user.format(q[j] if j < len(q) else q[0])) for q in questions]
        lens = torch.tensor([len(i) for i in ids], device=dev)
        L = int(lens.max())
        x = adapter.embed_ids(sum((i + [0] * (L - len(i)) for i in ids), [])).view(B, L, -1)
        mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=dev),
                          (torch.arange(L, device=dev)[None] < lens[:, None]).long()], dim=1)
        pos = (P + torch.arange(L, device=dev))[None].expand(B, L)
        logits = m(inputs_embeds=x, attention_mask=mask, cache=cache, position_ids=pos,
                   use_cache=True).logits
        nxt = logits[torch.arange(B), lens - 1].argmax(-1)
        gen, done, cur = [[] for _ in range(B)], [False] * B, P + lens
        for step in range(max_new_tokens):
            for b in range(B):
                done[b] = done[b] or int(nxt[b]) in eos
                if not done[b]:
                    gen[b].append(int(nxt[b]))
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
            logits = m(inputs_embeds=adapter.embed_ids(nxt.tolist())[:, None], attention_mask=mask,
                       cache=cache, position_ids=cur[:, None], use_cache=True).logits
            nxt, cur = logits[:, -1].argmax(-1), cur + 1
        if cache.get_seq_length() > P:
            cache.crop(P - cache.get_seq_length())  # drop this question; the next sees the same prefix
        for b in range(B):
            if j < len(out[b]):
                out[b][j] = adapter.tokenizer.decode(gen[b], skip_special_tokens=True).strip()
    return out


def one_of_each_kind(scene: data.Scene, rng: np.random.Generator) -> list[Fact]:
    """One fact of every kind the scene allows (KINDS order), so each kind is asked about
    as often and the overall score is not dominated by the kinds the pool has most of."""
    pool, first = facts(scene, rng), {}
    for i in rng.permutation(len(pool)):  # the whole pool, in a random order
        first.setdefault(pool[i].kind, pool[i])
    return [first[k] for k in KINDS if k in first]


def asks(scene: data.Scene, rng: np.random.Generator, held: Wording, hrng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, column) for one scene: each kind once in its template wording
    ("template/<kind>"), then the same facts in a held-out wording ("heldout/<kind>"), and, for
    kinds whose held-out wordings list the options, once more listing them ("listed/<kind>")."""
    kinds = one_of_each_kind(scene, rng)
    out = [(f.canonical, f.answer, f"template/{f.kind}") for f in kinds]
    for f in kinds:
        out.append((f.ask(hrng, held, listed=False), f.answer, f"heldout/{f.kind}"))
        if held.expanded(f.table, listed=True):
            out.append((f.ask(hrng, held, listed=True), f.answer, f"listed/{f.kind}"))
    return out


def score(marks: dict[str, list[bool]], *columns: str) -> dict:
    """Accuracy of the questions in these columns (template / heldout / listed), all kinds
    together and per kind."""
    cols = {}
    for key, v in marks.items():
        column, kind = key.split("/")
        if column in columns:
            cols.setdefault(kind, []).extend(v)
    every = [x for v in cols.values() for x in v]
    return {"accuracy": float(np.mean(every)) if every else float("nan"), "n": len(every),
            "by_kind": {k: float(np.mean(v)) for k, v in cols.items()}}


def held_out(adapter, scenes: int, settings: list[tuple[str, int | None]], batch: int, log, held: Wording):
    rng, hrng = np.random.default_rng(TEST_SEED), np.random.default_rng(HELDOUT_SEED)
    sc = [data.random_scene(rng, "test") for _ in range(scenes)]
    qas = [asks(s, rng, held, hrng) for s in sc]
    feats = cached_features(adapter, sc, f"test-seed{TEST_SEED}-n{scenes}", log=log)
    results = {}
    for method, k in settings:
        t0, marks = time.time(), {}
        gen = torch.Generator().manual_seed(TEST_SEED)
        for i in range(0, scenes, batch):
            f = feats[slice(i, i + batch)]
            vis = adapter.projector(*(t.to(adapter.dtype) for t in reduce(f, method, k, generator=gen)))
            answers = batch_answers(adapter, list(vis), [[q for q, _, _ in qa] for qa in qas[i : i + batch]])
            for qa, ans in zip(qas[i : i + batch], answers):
                for (q, a, col), p in zip(qa, ans):
                    marks.setdefault(col, []).append(normalise(p) == a)
        name = f"{method}@{k or FULL_TOKENS}"
        results[name] = {"method": method, "tokens": k or FULL_TOKENS, **score(marks, "template"),
                         "heldout": score(marks, "heldout", "listed"), "listed": score(marks, "listed"),
                         "seconds": round(time.time() - t0, 1)}
        r = results[name]
        log(f"{name:16s} exact match: template {r['accuracy']:.3f}, held-out wordings {r['heldout']['accuracy']:.3f} "
            f"(of which listing the options {r['listed']['accuracy']:.3f})  ({time.time() - t0:.0f}s)")
    return results


def long_recall(adapter, cache_budget: int, settings: list[tuple[str, int | None]], log, minutes: float = 10.0,
                fps: float = 0.2, events: int = 8):
    rng = np.random.default_rng(TEST_SEED + 1)
    video = data.long_video(rng, minutes=minutes, fps=fps, events=events)
    feats = cached_features(adapter, video.scenes, f"long-seed{TEST_SEED + 1}-m{minutes}-f{fps}-e{events}", log=log)
    times = [i / fps for i in range(len(video.scenes))]
    qs = [f"Was there a {o.name}?" for _, o in video.events] + [f"Was there a {c} {s}?" for c, s in video.absent]
    truth = ["yes"] * len(video.events) + ["no"] * len(video.absent)
    system = len(adapter.ids(adapter.chat.system.format(adapter.default_system), special=True))
    reserve = max(len(adapter.ids(adapter.chat.user.format(q))) for q in qs) + 4
    out = {}
    for method, k in settings:
        per_frame = [len(adapter.ids(adapter.chat.frame_prefix.format(t))) + (k or FULL_TOKENS)
                     + len(adapter.ids(adapter.chat.frame_suffix)) for t in times]
        room, first = cache_budget - system - reserve, len(times)
        while first > 0 and room - per_frame[first - 1] >= 0:  # newest frames that fit, as eviction leaves them
            room -= per_frame[first - 1]
            first -= 1
        window = list(range(first, len(times)))
        t0 = time.time()
        vis = adapter.projector(*(t.to(adapter.dtype) for t in reduce(feats[window], method, k)))
        answers = adapter.answer(list(vis), [times[i] for i in window], qs, max_new_tokens=3)
        said = [normalise(a) for a in answers]
        seen = [t >= times[first] for t, _ in video.events]
        name = f"{method}@{k or FULL_TOKENS}"
        ev = len(video.events)
        out[name] = {
            "frames_in_window": len(window), "window_seconds": len(window) / fps,
            "events_in_window": int(sum(seen)),
            "event_recall": float(np.mean([s == "yes" for s in said[:ev]])),
            "absent_correct": float(np.mean([s == "no" for s in said[ev:]])),
            "accuracy": float(np.mean([s == t for s, t in zip(said, truth)])),
            "seconds": round(time.time() - t0, 1),
        }
        log(f"long {name:14s} window {len(window)} frames, events in window {sum(seen)}/{ev}, "
            f"recall {out[name]['event_recall']:.2f}, absent correct {out[name]['absent_correct']:.2f}")
    return {"cache_budget_tokens": cache_budget, "minutes": minutes, "fps": fps,
            "event_times_s": [round(float(t), 1) for t, _ in video.events], "settings": out}


def table(results: dict) -> str:
    """Per setting: template and held-out-wording exact match, overall and per kind (template /
    held-out, the latter over both held-out questions), then the held-out questions that list
    their options, per kind."""
    head = ["method", "tokens/frame", "template", "held-out wording", *KINDS, *(f"{k} listed" for k in LISTED)]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results.values():
        t, h, lst = r["by_kind"], r["heldout"]["by_kind"], r["listed"]["by_kind"]
        cells = [f"{t.get(x, float('nan')):.2f} / {h.get(x, float('nan')):.2f}" for x in KINDS]
        cells += [f"{lst.get(x, float('nan')):.2f}" for x in LISTED]
        rows.append(f"| {r['method']} | {r['tokens']} | {r['accuracy']:.3f} | {r['heldout']['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    full = [r for r in results.values() if r["method"] == "full"]
    for ax, title, acc in ((axes[0], "template wordings", lambda r: r["accuracy"]),
                           (axes[1], "held-out wordings", lambda r: r["heldout"]["accuracy"])):
        for method, style in (("visionzip", "o-"), ("random", "s--"), ("pool", "^--"), ("topcls", "v--")):
            pts = sorted((r["tokens"], acc(r)) for r in results.values() if r["method"] == method)
            if method == "visionzip":
                pts += [(f["tokens"], acc(f)) for f in full]
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per frame")
        ax.set_title(f"streamvz-tiny: {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (held-out scenes)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--budgets", default="64,32,16", help="VisionZip budgets; baselines run at 64 and 32")
    ap.add_argument("--baseline-budgets", default="64,32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache-budget", type=int, default=2048, help="KV tokens for the long-video test")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--projector", default=None, help="projector weights (default: the committed ones)")
    ap.add_argument("--heldout", type=Path, default=HELDOUT, help="held-out wordings (JSON, as streamvz/tiny/wording.py)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    kw = {"projector": args.projector} if args.projector else {}
    adapter = load_tiny(tokens_per_frame=None, device="cpu", **kw)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    settings = [("full", None)] + [("visionzip", k) for k in budgets]
    settings += [(m, int(k)) for k in args.baseline_budgets.split(",") if k for m in BASELINES]
    t0 = time.time()
    res = {"held_out": held_out(adapter, args.scenes, settings, args.batch, log, Wording.from_json(args.heldout))}
    if not args.skip_long:
        long_settings = [("full", None)] + [("visionzip", k) for k in budgets]
        res["long_video"] = long_recall(adapter, args.cache_budget, long_settings, log)
    res["command"] = "python bench/quality_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["seconds"] = round(time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(res, indent=1))
    md = table(res["held_out"])
    full = res["held_out"]["full@257"]["accuracy"]
    if "visionzip@64" in res["held_out"] and full:
        vz, hfull = res["held_out"]["visionzip@64"], res["held_out"]["full@257"]["heldout"]["accuracy"]
        md += (f"\n\nVisionZip@64 keeps {vz['accuracy'] / full:.1%} of full-token accuracy on the template wordings"
               f" and {vz['heldout']['accuracy'] / hfull:.1%} on the held-out wordings.")
    if "long_video" in res:
        lv = res["long_video"]
        md += (f"\n\nLong video ({lv['minutes']} min, {lv['fps']} fps, events at {lv['event_times_s']} s; "
               f"KV budget {lv['cache_budget_tokens']} tokens):\n\n| setting | frames in window | events in window "
               "| event recall | absent correct |\n|---|---|---|---|---|\n")
        md += "\n".join(f"| {n} | {r['frames_in_window']} | {r['events_in_window']} | {r['event_recall']:.2f} "
                        f"| {r['absent_correct']:.2f} |" for n, r in lv["settings"].items())
    (args.out / "quality.md").write_text(md + "\n")
    print(md)
    if plot(res["held_out"], args.out / "quality.png"):
        print(f"plot: {args.out / 'quality.png'}")
    else:
        print("matplotlib is not installed; no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
