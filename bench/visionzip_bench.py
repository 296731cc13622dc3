"""VisionZip cost on a LLaVA-1.5-shaped tower, and what it buys in LM prefill.

Side by side, same weights, same batch:
  tower      CLIP ViT-L/14-336 (random weights), SDPA, hidden states out (what LLaVA runs)
  streamvz   our VisionZip: the same tower + hooked q/k scoring + selection
  reference  the published approach: eager attention with output_attentions in all layers
  prefill    a 7B-shaped Llama layer stack (4096 hidden, 32 heads, 11008 MLP; --lm-layers of
             them) over 1 and 4 frames at 576/196/144 (full tokens of LLaVA-1.5 and smaller
             towers) vs 64/32 visual tokens per frame

    python bench/visionzip_bench.py                 # CPU defaults
    python bench/visionzip_bench.py --device cuda --batch 1 8 32 --lm-layers 32 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import copy
import sys
import os

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

sys.path.insert(0, os.path.dirname(__file__))
from common import compare, machine, machine_name, table, write_json  # noqa: E402

from streamvz.compress import VisionZip, cls_scores, select  # noqa: E402

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)


def reference_compress(eager_tower, pv, dominant=54, contextual=10, feature_layer=-2):
    """The published recipe: every layer materialises its attention matrix, we read one."""
    out = eager_tower(pixel_values=pv, output_hidden_states=True, output_attentions=True)
    attn = out.attentions[feature_layer]
    hidden = out.hidden_states[feature_layer]
    layer = eager_tower.encoder.layers[len(eager_tower.encoder.layers) + feature_layer]
    B, N, _ = hidden.shape
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[feature_layer - 1]))
    keys = keys.view(B, N, -1, layer.self_attn.head_dim).mean(2)
    return select(hidden, attn[:, :, 0].sum(1), keys, dominant, contextual, True)


def bench_tower(args, device, dtype):
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**VIT_L_336)).to(device, dtype).eval()
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    vz = VisionZip(54, 10)
    rows = []
    for b in args.batch:
        pv = torch.randn(b, 3, 336, 336, device=device, dtype=dtype)
        with torch.inference_mode():
            # captured scoring-layer tensors, to time our added work in isolation
            hid = tower(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
            H, d = 16, 64
            q = torch.randn(b, H, d, device=device, dtype=dtype)
            k = torch.randn(b, H, hid.shape[1], d, device=device, dtype=dtype)
            t = compare({
                "tower": lambda: tower(pixel_values=pv, output_hidden_states=True),
                "streamvz": lambda: vz.compress(tower, pv),
                "reference": lambda: reference_compress(eager, pv),
                "ops": lambda: select(hid, cls_scores(q, k, d**-0.5), k.mean(1), 54, 10, True),
            }, device, args.repeats)
            t_tower, t_vz, t_ref, t_ops = t["tower"], t["streamvz"], t["reference"], t["ops"]
        rows.append({
            "batch": b, "tower_ms": 1e3 * t_tower, "streamvz_ms": 1e3 * t_vz, "reference_ms": 1e3 * t_ref,
            "overhead_pct": 100 * (t_vz - t_tower) / t_tower, "scoring_ops_pct": 100 * t_ops / t_tower,
            "speedup_vs_reference": t_ref / t_vz, "per_frame_ms": 1e3 * t_vz / b,
        })
        print(f"  batch {b}: done", flush=True)
    return rows


def bench_prefill(args, device, dtype):
    """Prefill of `frames` frames at each per-frame token count, all in one interleaved comparison.
    One frame is bound by reading the weights (the same bytes for 64 or 576 tokens); a clip of
    several frames, which is what a video prefill is, is bound by compute."""
    torch.manual_seed(0)
    lm = LlamaModel(LlamaConfig(num_hidden_layers=args.lm_layers, **LLAMA_7B)).to(device, dtype).eval()
    cases = {(f, n): torch.randn(1, f * n, 4096, device=device, dtype=dtype) for f in args.frames for n in args.tokens}
    with torch.inference_mode():
        t = compare({key: (lambda x=x: lm(inputs_embeds=x, use_cache=False)) for key, x in cases.items()},
                    device, args.repeats)
    rows = []
    for f, n in cases:
        full = t[(f, args.tokens[0])]
        rows.append({"frames": f, "tokens_per_frame": n, "prefill_ms": 1e3 * t[(f, n)],
                     "per_frame_ms": 1e3 * t[(f, n)] / f, f"speedup_vs_{args.tokens[0]}": full / t[(f, n)]})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default) | float16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 196, 144, 64, 32],
                   help="visual tokens per frame; the first is the full-token reference")
    p.add_argument("--frames", type=int, nargs="+", default=[1, 4], help="frames per prefill")
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    print(f"VisionZip bench on {device} ({dtype}); CLIP ViT-L/14-336 tower, 54+10 tokens", flush=True)
    tower_rows = bench_tower(args, device, dtype)
    print(table(tower_rows, ["batch", "tower_ms", "streamvz_ms", "reference_ms", "overhead_pct",
                             "scoring_ops_pct", "speedup_vs_reference", "per_frame_ms"]))
    print(f"\nPrefill: Llama-7B-shaped layers x{args.lm_layers} (4096 hidden, 32 heads, 11008 MLP), batch 1")
    prefill_rows = bench_prefill(args, device, dtype)
    print(table(prefill_rows, ["frames", "tokens_per_frame", "prefill_ms", "per_frame_ms", f"speedup_vs_{args.tokens[0]}"]))
    path = write_json(f"visionzip-{machine_name(device)}", {
        "machine": machine(device), "dtype": str(dtype), "tower": "CLIP ViT-L/14-336 (random weights)",
        "lm": f"Llama-7B-shaped x{args.lm_layers} layers", "tower_rows": tower_rows, "prefill_rows": prefill_rows,
    }, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
