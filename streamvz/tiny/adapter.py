"""streamvz-tiny as a streamvz Adapter: DINOv2-S -> VisionZip -> MLP projector -> SmolLM2-135M (+ merged LoRA).

The engine talks to it like any other family. `prompt_embeds` builds exactly the sequence
the engine builds (system, per frame `frame_prefix` + k embeddings + `frame_suffix`, then
the user turn), each text piece tokenised on its own as the engine does; training uses the
same function, so the projector learns the layout it will see when streaming.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, Dinov2Model, DynamicCache, LlamaForCausalLM

from ..adapters.base import Adapter, ChatFormat
from ..errors import StreamError
from .lora import beside, merge
from .model import FULL_TOKENS, Features, Projector, features, preprocess, reduce
from .weights import model_dir, verify

# SmolLM2-Instruct's chatml template, cut into the pieces the engine concatenates.
TINY_CHAT = ChatFormat(
    system="<|im_start|>system\n{}<|im_end|>\n",
    user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    end_of_turn="<|im_end|>\n",
    frame_prefix="{:.1f}s:",
    frame_suffix="\n",
)
DEFAULT_SYSTEM = "Answer in one word."
PROJECTOR = Path(__file__).parent / "assets" / "projector.safetensors"


def _pick_device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class TinyAdapter(Adapter):
    chat = TINY_CHAT
    default_system = DEFAULT_SYSTEM

    def __init__(self, tokens_per_frame: int | None = 64, device=None, dtype=None, root=None,
                 projector: str | Path | None = PROJECTOR, method: str = "visionzip", check: str = "quick"):
        root = Path(root) if root else model_dir()
        if check != "none":
            verify(root, full=(check == "full"))
        self.device = _pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.vision = Dinov2Model.from_pretrained(root / "vision", dtype=self.dtype).to(self.device).eval()
        self.model = LlamaForCausalLM.from_pretrained(root / "lm", dtype=self.dtype).to(self.device).eval()
        for p in (*self.vision.parameters(), *self.model.parameters()):
            p.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "lm")
        self.projector = Projector(self.vision.config.hidden_size, self.model.config.hidden_size)
        if projector is not None:
            if not Path(projector).exists():
                raise StreamError("weights_missing", f"trained projector {projector} not found; run streamvz.tiny.train")
            from safetensors.torch import load_file

            self.projector.load_state_dict(load_file(str(projector)))
            if beside(projector).exists():  # the LM's LoRA trained with this projector, merged once
                merge(self.model, load_file(str(beside(projector))))
        self.projector.to(self.device, self.dtype).eval().requires_grad_(False)  # train.py turns it back on
        if tokens_per_frame is not None and not 1 <= tokens_per_frame <= FULL_TOKENS:
            raise ValueError(f"tokens_per_frame must be in 1..{FULL_TOKENS} or None, got {tokens_per_frame}")
        self.method = method if tokens_per_frame not in (None, FULL_TOKENS) else "full"
        self.tokens_per_frame = tokens_per_frame or FULL_TOKENS
        self.max_position_embeddings = self.model.config.max_position_embeddings
        self.eos_token_ids = (self.tokenizer.convert_tokens_to_ids("<|im_end|>"),)

    # -- vision ----------------------------------------------------------------------------
    @torch.inference_mode()
    def frame_features(self, frames) -> Features:
        return features(self.vision, preprocess(frames, self.device, self.dtype))

    @torch.inference_mode()
    def encode_frames(self, frames) -> torch.Tensor:  # uint8 [T,H,W,3] -> [T, k, 576]
        feats = self.frame_features(frames)
        return self.projector(*reduce(feats, self.method, self.tokens_per_frame))

    # -- language --------------------------------------------------------------------------
    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []

    def prompt_embeds(self, frame_embeds: list[torch.Tensor], times: list[float], question: str | None,
                      system: str | None = None, turns: list[tuple[int, str, str]] = ()) -> torch.Tensor:
        """[L, D]: system, frames with their timestamp markers, then the user turn (if any).
        turns: (k, question, answer) turns answered before frame k; the engine keeps them in the
        conversation, so later frames follow them."""
        c = self.chat
        parts = [self.embed_ids(self.ids(c.system.format(system or self.default_system), special=True))]
        for i, (e, t) in enumerate(zip(frame_embeds, times)):
            parts += [self.embed_ids(self.ids(c.user.format(q)) + self.ids(a) + self.ids(c.end_of_turn))
                      for k, q, a in turns if k == i]
            parts += [self.embed_ids(self.ids(c.frame_prefix.format(t))), e.to(self.device, self.dtype),
                      self.embed_ids(self.ids(c.frame_suffix))]
        if question is not None:
            parts.append(self.embed_ids(self.ids(c.user.format(question))))
        return torch.cat(parts)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))


    @torch.inference_mode()
    def answer(self, frame_embeds: list[torch.Tensor], times: list[float], questions: list[str],
               max_new_tokens: int = 4, system: str | None = None) -> list[str]:
        """Greedy answers, each question asked on its own after the same frames (prefix computed once)."""
        prefix = self.prompt_embeds(frame_embeds, times, None, system)
        cache = DynamicCache(config=self.model.config)
        self.model(inputs_embeds=prefix[None], cache=cache, use_cache=True, logits_to_keep=1)
        n = prefix.shape[0]
        out = []
        for q in questions:
            x = self.embed_ids(self.ids(self.chat.user.format(q)))[None]
            pos, ids = n, []
            for _ in range(max_new_tokens):
                p = torch.arange(pos, pos + x.shape[1], device=self.device)[None]
                logits = self.model(inputs_embeds=x, cache=cache, position_ids=p,
                                    use_cache=True, logits_to_keep=1).logits
                pos += x.shape[1]
                nxt = int(logits[0, -1].argmax())
                if nxt in self.eos_token_ids:
                    break
                ids.append(nxt)
                x = self.embed_ids([nxt])[None]
            extra = cache.get_seq_length() - n
            if extra:
                cache.crop(-extra)  # forget this question; the next one sees the same frames
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out
