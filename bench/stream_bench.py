"""Streaming cost on a LLaVA-1.5-shaped model: ingest per frame, time to first token over
an hour of 1 fps video, KV cache bytes over time, against re-running `generate` per question.

The model is a random LlavaForConditionalGeneration saved and loaded like a user's checkpoint:
a CLIP tower on 336 px frames (576 patch tokens, LLaVA-1.5's grid) + projector + Llama LM.
`--tower vit-l --lm 7b` is LLaVA-1.5-7B's exact shape (the GPU default); on CPU the default is a
narrow tower and a small LM, because ViT-L/14-336 alone takes ~13 s per frame on 2 CPU cores.
What it measures:

  ingest     median `await session.add_frame` (vision + VisionZip + projector + LM prefill),
             576 tokens per frame (compression off) vs `--tokens` (VisionZip), with the vision
             and LM parts timed inside the engine's worker
  ttft       time to first token of a question after 1, 10, 60 minutes of 1 fps video,
             with a rolling window of `--window` frames (median of `--asks` questions)
  baseline   what a user does without streamvz at the same moment: encode every frame in the
             window and run `generate` over the whole prompt, with VisionZip tokens so the
             prompt is as long as our cache (576-token frames: 50 of them would be 28.8K
             tokens, far past LLaVA-1.5's 4K positions)
  memory     KV cache tokens / bytes / positions every simulated minute

To reach 60 minutes in reasonable time, `--pool` distinct frames run the vision tower once and
are reused (cycled) afterwards: every frame still goes through LM prefill, eviction and
re-rotation in the engine, which is what changes over the hour.

    python bench/stream_bench.py                                   # CPU defaults
    python bench/stream_bench.py --device cuda                     # ViT-L + 7B shape, bf16
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import machine, machine_name, sync, table, write_json  # noqa: E402

from streamvz.adapters import load_adapter  # noqa: E402
from streamvz.engine import Engine  # noqa: E402

TOWERS = {  # both see 336 px frames as a 24x24 grid: 576 patch tokens, as LLaVA-1.5's tower does
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                  image_size=336, patch_size=14, projection_dim=256),
}
LMS = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}
QUESTION = "What is the person holding?"


def build_checkpoint(path: str, lm: str, tower: str) -> str:
    """A random LLaVA-1.5-shaped checkpoint (saved once, reused)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from tiny_models import LLAVA_TEMPLATE, make_tokenizer
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(0)
    tok = make_tokenizer()
    text = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                       pad_token_id=3, **LMS[lm])
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**TOWERS[tower]), text_config=text,
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                             crop_size={"height": 336, "width": 336}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """Frames of a moving square on noise: cheap, varied, 480x640 like a webcam."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = rng.integers(0, 60, (480, 640, 3), dtype=np.uint8)
        x = (37 * i) % 560
        f[200:280, x:x + 80] = (200, 40, 40)
        out.append(f)
    return out


class Probe:
    """Wraps an adapter to time its vision and LM calls on the worker thread. With `pool`, a
    frame tagged by `tagged()` is encoded once and its embeddings reused afterwards."""

    def __init__(self, adapter, pool: bool = False):
        self._a, self.pool, self.cache = adapter, pool, {}
        self.vision_s, self.lm_s = [], []

    def __getattr__(self, name):
        return getattr(self._a, name)

    def _timed(self, out: list, fn, *args):
        sync(self._a.device)
        t0 = time.perf_counter()
        result = fn(*args)
        sync(self._a.device)
        out.append(time.perf_counter() - t0)
        return result

    def encode_frames_positioned(self, frames):
        if not self.pool:
            return self._timed(self.vision_s, self._a.encode_frames_positioned, frames)
        out = []
        for f in frames:
            key = int(f[0, 0, 0]) + 256 * int(f[0, 1, 0])  # the pool index, written by tagged()
            if key not in self.cache:
                self.cache[key] = self._timed(self.vision_s, self._a.encode_frames, f[None])[0]
            out.append(self.cache[key])
        return torch.stack(out), None

    def forward(self, inputs_embeds, cache, position_ids, attention_mask=None):
        return self._timed(self.lm_s, self._a.forward, inputs_embeds, cache, position_ids, attention_mask)


def tagged(frames: list[np.ndarray], i: int) -> np.ndarray:
    f = frames[i % len(frames)].copy()
    f[0, 0, 0], f[0, 1, 0] = (i % len(frames)) % 256, (i % len(frames)) // 256
    return f


async def bench_ingest(path, args, frames):
    rows = []
    for tokens in (None, args.tokens):
        probe = Probe(load_adapter(path, tokens_per_frame=tokens, device=args.device, dtype=args.dtype))
        engine = Engine(probe, tokens_per_frame=tokens)
        s = engine.session()
        for i in range(2):  # warm up (and the system prompt)
            await s.add_frame(frames[i], t=float(i))
        probe.vision_s.clear()
        probe.lm_s.clear()
        times = []
        for i in range(2, args.repeats + 2):
            t0 = time.perf_counter()
            await s.add_frame(frames[i], t=float(i))
            times.append(time.perf_counter() - t0)
        rows.append(dict(tokens_per_frame=probe.tokens_per_frame, block_tokens=(await s.cache_view()).blocks[-1].tokens,
                         ingest_ms=1e3 * statistics.median(times), vision_ms=1e3 * statistics.median(probe.vision_s),
                         prefill_ms=1e3 * statistics.median(probe.lm_s)))
        print(f"  ingest {rows[-1]}", flush=True)
        await engine.aclose()
    return rows


async def baseline_ttft(adapter, engine, session, window, question):
    """Without streamvz: encode every frame in the window, build the prompt, `generate` one token.

    `window`: (t, frame) pairs, the frames our session still holds."""
    sync(adapter.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        vis = adapter.encode_frames(np.stack([f for _, f in window]))
        pieces = [adapter.embed(torch.tensor([engine.prompt.system(session.system_prompt)]))[0]]
        for (t, _), v in zip(window, vis):
            before, after = engine.prompt.frame(t)
            pieces += [adapter.embed(torch.tensor([before]))[0], v, adapter.embed(torch.tensor([after]))[0]]
        pieces.append(adapter.embed(torch.tensor([engine.prompt.question(question)]))[0])
        embeds = torch.cat(pieces)[None]
        adapter.model.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False)
    sync(adapter.device)
    return time.perf_counter() - t0, embeds.shape[1]


async def bench_stream(path, args, frames):
    real = load_adapter(path, tokens_per_frame=args.tokens, device=args.device, dtype=args.dtype)
    engine = Engine(Probe(real, pool=True), tokens_per_frame=args.tokens, window_frames=args.window)
    s = engine.session()
    await s.ask(QUESTION, max_new_tokens=2).result()  # warm up the question path (first-call kernel setup)
    checkpoints = sorted(int(m * 60) for m in args.minutes)
    rows, memory = [], []
    t_wall = time.perf_counter()
    for i in range(checkpoints[-1]):
        await s.add_frame(tagged(frames, i), t=float(i))
        n = i + 1
        if n % 60 == 0:
            st = s.stats()
            memory.append(dict(minute=n / 60, cache_tokens=st["cache_tokens"], cache_bytes=st["cache_bytes"],
                               positions=st["cache_positions"], frames_in_window=st["frames_in_window"]))
        if n in checkpoints:
            ttfts = []
            for _ in range(args.asks):
                a = s.ask(QUESTION, max_new_tokens=4)
                await a.result()
                ttfts.append(a.usage["ttft_s"])
            window = [(b.meta["t"], tagged(frames, int(b.meta["t"]))) for b in (await s.cache_view()).frames()]
            base, base_tokens = await baseline_ttft(real, engine, s, window, QUESTION)
            st = s.stats()
            rows.append(dict(minutes=n / 60, frames_in_window=st["frames_in_window"], cache_tokens=st["cache_tokens"],
                             cache_mib=st["cache_bytes"] / 2**20, positions=st["cache_positions"],
                             ttft_ms=1e3 * statistics.median(ttfts), baseline_ms=1e3 * base,
                             baseline_prompt_tokens=base_tokens,
                             speedup=base / statistics.median(ttfts)))
            print(f"  {rows[-1]}  (wall {time.perf_counter() - t_wall:.0f}s)", flush=True)
    await engine.aclose()
    return rows, memory


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default)")
    p.add_argument("--lm", choices=sorted(LMS), default=None, help="LM shape (default: small on CPU, 7b on GPU)")
    p.add_argument("--tower", choices=sorted(TOWERS), default=None,
                   help="CLIP tower shape (default: small on CPU, vit-l on GPU)")
    p.add_argument("--tokens", type=int, default=64, help="VisionZip tokens per frame")
    p.add_argument("--window", type=int, default=50, help="frames kept in the rolling window")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    p.add_argument("--asks", type=int, default=3, help="questions per checkpoint (median TTFT)")
    p.add_argument("--pool", type=int, default=8, help="distinct frames encoded for real in the long run")
    p.add_argument("--repeats", type=int, default=9, help="frames timed per ingest setting (median)")
    p.add_argument("--checkpoint", default=None, help="where the random checkpoint is saved (reused)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gpu = torch.device(args.device).type == "cuda"
    lm = args.lm or ("7b" if gpu else "small")
    tower = args.tower or ("vit-l" if gpu else "small")
    path = build_checkpoint(args.checkpoint or f"/tmp/streamvz_bench_llava_{tower}_{lm}", lm, tower)
    frames = video(max(args.pool, args.repeats + 2))
    print(f"Stream bench on {args.device}: {tower} CLIP tower (336 px, 576 patches) + {lm} Llama ({LMS[lm]}), "
          f"window {args.window} frames", flush=True)
    ingest = asyncio.run(bench_ingest(path, args, frames))
    stream, memory = asyncio.run(bench_stream(path, args, frames[:args.pool]))
    print("\nStream: per-frame ingest (ms):\n" + table(ingest, ["tokens_per_frame", "block_tokens", "ingest_ms", "vision_ms",
                                                 "prefill_ms"]))
    print("\nStream: time to first token, rolling window vs re-running generate over the window:\n" + table(
        stream, ["minutes", "frames_in_window", "cache_tokens", "cache_mib", "positions", "ttft_ms", "baseline_ms",
                 "baseline_prompt_tokens", "speedup"]))
    print("\nStream: KV cache over time:\n" + table(memory[:: max(1, len(memory) // 12)] + memory[-1:],
                                           ["minute", "cache_tokens", "cache_bytes", "positions", "frames_in_window"]))
    if len(stream) >= 2:
        print(f"\nStream: TTFT at {stream[-1]['minutes']:g} min / at {stream[0]['minutes']:g} min: "
              f"{stream[-1]['ttft_ms'] / stream[0]['ttft_ms']:.2f}x")
    out = write_json(f"stream_bench-{machine_name(args.device)}-{tower}-{lm}",
                     dict(machine=machine(args.device), args=vars(args), tower=TOWERS[tower], lm=LMS[lm],
                          ingest=ingest, stream=stream,
                          memory=memory), args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
