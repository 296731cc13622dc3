"""Low-rank adapters on SmolLM2's linear layers (attention and MLP), for training streamvz-tiny.

Training wraps the chosen `nn.Linear`s of one model instance (attributes of its attention
modules, no class is touched); inference merges the learned delta into the weights once
at load time, so the served model is a plain LlamaForCausalLM with no extra cost per token.

    wrapped = attach(lm, rank=8)           # {"model.layers.0.self_attn.q_proj": LoRALinear, ...}
    state = lora_state(wrapped)            # what gets saved
    merge(fresh_lm, state)                 # W += B @ A * scale, in place
    with base_only(wrapped): ...           # the base LM, LoRA bypassed (the distillation teacher)
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the identity change
        self.enabled = True  # False: the frozen base layer alone (base_only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


@contextmanager
def base_only(wrapped: dict[str, LoRALinear]):
    """`with base_only(wrapped):` the model as it was before the LoRA (the frozen base LM), e.g.
    as the teacher of a self-distillation term."""
    for m in wrapped.values():
        m.enabled = False
    try:
        yield
    finally:
        for m in wrapped.values():
            m.enabled = True


def attach(model: nn.Module, rank: int, alpha: float | None = None, targets=TARGETS) -> dict[str, LoRALinear]:
    """Wrap every attention projection named in `targets` with a trainable low-rank update."""
    alpha = float(alpha or rank)
    wrapped = {}
    for name, module in list(model.named_modules()):
        for t in targets:
            child = getattr(module, t, None)
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha).to(child.weight.device)
                setattr(module, t, lora)
                wrapped[f"{name}.{t}"] = lora
    if not wrapped:
        raise ValueError(f"no {targets} linear layers found to adapt")
    return wrapped


def lora_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in wrapped.items():
        out[f"{name}.A"] = m.A.detach().float().contiguous()
        out[f"{name}.B"] = (m.B.detach().float() * m.scale).contiguous()  # scale folded in
    return out


@torch.no_grad()
def merge(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add each saved B @ A to its base weight; returns the number of layers changed."""
    modules = dict(model.named_modules())
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    for name in names:  # check everything before changing anything
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise ValueError(f"LoRA weights for {name!r} do not match this model")
        shape = (state[f"{name}.B"].shape[0], state[f"{name}.A"].shape[-1])
        if shape != tuple(modules[name].weight.shape):
            raise ValueError(f"LoRA weights for {name!r} have shape {shape}, layer has {tuple(modules[name].weight.shape)}")
    for name in names:
        w = modules[name].weight
        delta = state[f"{name}.B"].to(w.device, torch.float32) @ state[f"{name}.A"].to(w.device, torch.float32)
        w.copy_((w.float() + delta).to(w.dtype))
    return len(names)


def beside(projector: str | Path) -> Path:
    """Where the LoRA trained with a projector lives: projector.safetensors -> lora.safetensors."""
    p = Path(projector)
    stem = p.stem.replace("projector", "lora") if "projector" in p.stem else p.stem + ".lora"
    return p.with_name(stem + p.suffix)
