"""One forward for many sessions: aggregate decode tokens/s, inter-token latency and frame
ingest with 1..16 concurrent sessions, side by side against a batch cap of 1 (one row per
forward: the engine before batching), in one run.

Stacks: `tiny` (the embedded streamvz-tiny: DINOv2-S + SmolLM2-135M) and `llava` (a random
LLaVA-1.5-shaped checkpoint: `--lm small` on the CPU, `--lm 7b --tower vit-l` in bf16 on a GPU).

  decode   N sessions, one frame each, all ask at once (greedy, ignore_eos, --tokens each):
           aggregate tokens/s, inter-token gaps p50/p95 (per answer, token by token)
  ingest   N sessions, --frames frames each queued at once: frames/s into the caches
  kv       the store's fixed size (max_sessions x budget x bytes/token) and the rows in use
  floor    the LM's own decode step at batch N (a DynamicCache holding one frame's context, no
           engine): how much slower N rows are than one on this machine; no engine can make
           its per-token gap at N sessions lower than this ratio times one session's

    python bench/batch_bench.py                              # CPU: tiny + small LLaVA
    python bench/batch_bench.py --device cuda --lm 7b --tower vit-l --sessions 1 4 16 64
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import machine, machine_name, sync, table, write_json  # noqa: E402
from stream_bench import build_checkpoint, video  # noqa: E402

from streamvz.adapters import load_adapter  # noqa: E402
from streamvz.engine import Engine  # noqa: E402

QUESTION = "Describe the scene."


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


async def decode(adapter, n, cap, tokens, frames, budget):
    async with Engine(adapter, max_sessions=n, max_batch_rows=cap, cache_budget_tokens=budget) as engine:
        ss = [engine.session() for _ in range(n)]
        await asyncio.gather(*(s.add_frame(frames[i % len(frames)], t=0.0) for i, s in enumerate(ss)))
        await ss[0].ask(QUESTION, max_new_tokens=2, ignore_eos=True).result()  # warm up
        gaps: list[float] = []

        async def one(s):
            a = s.ask(QUESTION, max_new_tokens=tokens, ignore_eos=True)
            await a.result()
            t = a.token_times  # per token, as the loop got it (a delta may carry several tokens)
            gaps.extend(b - x for x, b in zip(t, t[1:]))
            return a.usage["completion_tokens"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(s) for s in ss))
        wall = time.perf_counter() - t0
        used = sum(s.stats()["cache_bytes"] for s in ss)
        return dict(tokens=sum(done), tok_s=sum(done) / wall, itl_p50_ms=1e3 * pct(gaps, 50),
                    itl_p95_ms=1e3 * pct(gaps, 95), kv_store_mib=engine.memory()["bytes_total"] / 2**20,
                    kv_used_mib=used / 2**20)


@torch.inference_mode()
def bare_step_s(adapter, n: int, context: int = 100, steps: int = 12) -> float:
    """Median seconds of one decode step of the LM alone at batch n (see `floor` above)."""
    from transformers import DynamicCache

    width = adapter.model.config.get_text_config().hidden_size
    cache = DynamicCache(config=adapter.model.config)
    adapter.forward(torch.randn(n, context, width), cache, torch.arange(context)[None].expand(n, context))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        adapter.forward(torch.randn(n, 1, width), cache, torch.full((n, 1), context + i))
        sync(adapter.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def ingest(adapter, n, cap, per_session, frames, budget):
    async with Engine(adapter, max_sessions=n, max_batch_rows=cap, cache_budget_tokens=budget,
                      max_backlog_frames=per_session) as engine:
        ss = [engine.session() for _ in range(n)]
        await ss[0].add_frame(frames[0], t=0.0)  # warm up
        t0 = time.perf_counter()
        await asyncio.gather(*(s.add_frame(frames[(i + j) % len(frames)], t=1.0 + j)
                               for i, s in enumerate(ss) for j in range(per_session)))
        return dict(frames_s=n * per_session / (time.perf_counter() - t0))


def load(stack, args, tmp):
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if stack == "tiny":
        return load_adapter("streamvz-tiny", tokens_per_frame=64, device=args.device, dtype=dtype)
    path = build_checkpoint(os.path.join(tmp, f"llava-{args.lm}-{args.tower}"), args.lm, args.tower)
    return load_adapter(path, tokens_per_frame=64, device=args.device, dtype=dtype)


async def main_async(args):
    frames = video(8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stack in args.stacks:
            adapter = load(stack, args, tmp)
            for n in args.sessions:
                r = {"stack": stack, "sessions": n}
                for cap, tag in ((1, "cap1"), (None, "batched")):
                    d = await decode(adapter, n, cap, args.tokens, frames, args.budget)
                    f = await ingest(adapter, n, cap, args.frames, frames, args.budget)
                    r.update({f"{tag}_{k}": v for k, v in {**d, **f}.items()})
                r["decode_speedup"] = r["batched_tok_s"] / r["cap1_tok_s"]
                r["bare_step_ms"] = 1e3 * bare_step_s(adapter, n)
                r["ingest_speedup"] = r["batched_frames_s"] / r["cap1_frames_s"]
                rows.append(r)
                print(f"  {stack} x{n}: {r['batched_tok_s']:.1f} vs {r['cap1_tok_s']:.1f} tok/s "
                      f"({r['decode_speedup']:.2f}x), p95 {r['batched_itl_p95_ms']:.0f} ms, "
                      f"frames/s {r['batched_frames_s']:.2f} vs {r['cap1_frames_s']:.2f}", flush=True)
            for r in rows:
                if r["stack"] == stack:
                    one = next(x for x in rows if x["stack"] == stack and x["sessions"] == min(args.sessions))
                    r["p95_vs_one"] = r["batched_itl_p95_ms"] / one["batched_itl_p95_ms"]
                    r["floor_vs_one"] = r["bare_step_ms"] / one["bare_step_ms"]
            del adapter
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stacks", nargs="+", default=["tiny", "llava"], choices=["tiny", "llava"])
    p.add_argument("--lm", default="small", help="LLaVA LM shape: small | 1b | 7b")
    p.add_argument("--tower", default="small", help="LLaVA tower: small | vit-l")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--tokens", type=int, default=24, help="tokens per answer")
    p.add_argument("--frames", type=int, default=2, help="frames per session in the ingest run")
    p.add_argument("--budget", type=int, default=1024, help="cache budget (rows per session)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    rows = asyncio.run(main_async(args))
    cols = ["stack", "sessions", "cap1_tok_s", "batched_tok_s", "decode_speedup", "cap1_itl_p95_ms",
            "batched_itl_p50_ms", "batched_itl_p95_ms", "p95_vs_one", "bare_step_ms", "floor_vs_one", "cap1_frames_s", "batched_frames_s",
            "ingest_speedup", "batched_kv_store_mib", "batched_kv_used_mib"]
    print(table(rows, cols))
    path = write_json(f"batch-{machine_name(args.device)}", {"machine": machine(args.device), "args": vars(args),
                                                             "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
