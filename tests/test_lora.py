"""LoRA for streamvz-tiny: the wrapped model trains, the merged model computes the same function."""
import pytest
import torch
from transformers import LlamaForCausalLM

from streamvz.tiny.lora import TARGETS, attach, base_only, beside, lora_state, merge
from tiny_models import tiny_llama_config


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def test_merged_weights_compute_what_the_wrapped_model_computes():
    wrapped_lm, plain_lm = tiny_lm(), tiny_lm()
    wrapped = attach(wrapped_lm, rank=4)
    assert len(wrapped) == len(TARGETS) * wrapped_lm.config.num_hidden_layers
    ids = torch.randint(0, 100, (2, 12))
    before = wrapped_lm(ids).logits
    torch.testing.assert_close(before, plain_lm(ids).logits)  # B starts at zero: no change yet
    for m in wrapped.values():  # stand-in for training: any non-zero update
        torch.nn.init.normal_(m.B, std=0.05)
    after = wrapped_lm(ids).logits
    assert not torch.allclose(after, before, atol=1e-3)
    assert merge(plain_lm, lora_state(wrapped)) == len(wrapped)
    torch.testing.assert_close(plain_lm(ids).logits, after, atol=1e-5, rtol=1e-5)


def test_only_the_low_rank_factors_train():
    lm = tiny_lm()
    wrapped = attach(lm, rank=2)
    for p in lm.parameters():
        p.requires_grad_(False)
    for m in wrapped.values():
        m.A.requires_grad_(True), m.B.requires_grad_(True)
    lm(torch.randint(0, 100, (1, 5))).logits.sum().backward()
    assert all(m.B.grad is not None and m.base.weight.grad is None for m in wrapped.values())


def test_merge_rejects_weights_of_another_model():
    state = lora_state(attach(tiny_lm(), rank=2))
    other = LlamaForCausalLM(tiny_llama_config(vocab_size=100, hidden=32)).eval()
    with pytest.raises(ValueError, match="shape"):
        merge(other, state)
    with pytest.raises(ValueError, match="do not match"):
        merge(other, {"model.nowhere.q_proj.A": torch.zeros(1, 1), "model.nowhere.q_proj.B": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="no .* linear layers"):
        attach(torch.nn.Sequential(torch.nn.ReLU()), rank=2)


def test_lora_file_sits_beside_its_projector(tmp_path):
    assert beside(tmp_path / "projector.safetensors") == tmp_path / "lora.safetensors"
    assert beside("run3/projector-best.safetensors").name == "lora-best.safetensors"
    assert beside("run3/model.safetensors").name == "model.lora.safetensors"  # never the projector itself


def test_a_fine_tune_starts_from_the_saved_lora(tmp_path):
    """train --init: saved factors (scale folded into B, stored in half precision) loaded into a
    freshly attached LoRA compute what the saved model computed; a mismatched file is refused."""
    from safetensors.torch import save_file

    from streamvz.tiny.train import load_lora

    trained_lm, fresh_lm = tiny_lm(), tiny_lm()
    trained = attach(trained_lm, rank=4, alpha=8)  # scale 2: loading must undo the folding
    for m in trained.values():
        torch.nn.init.normal_(m.B, std=0.05)
    save_file({k: v.half() for k, v in lora_state(trained).items()}, str(tmp_path / "lora.safetensors"))
    fresh = attach(fresh_lm, rank=4, alpha=8)
    ids = torch.randint(0, 100, (2, 9))
    assert not torch.allclose(fresh_lm(ids).logits, trained_lm(ids).logits, atol=1e-3)
    load_lora(fresh, tmp_path / "lora.safetensors")
    torch.testing.assert_close(fresh_lm(ids).logits, trained_lm(ids).logits, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="does not match"):
        load_lora(attach(tiny_lm(), rank=4, targets=("q_proj",)), tmp_path / "lora.safetensors")


def test_base_only_is_the_model_before_its_lora():
    wrapped_lm, plain_lm = tiny_lm(), tiny_lm()
    wrapped = attach(wrapped_lm, rank=4)
    for m in wrapped.values():
        torch.nn.init.normal_(m.B, std=0.05)
    ids = torch.randint(0, 100, (2, 10))
    tuned = wrapped_lm(ids).logits
    with base_only(wrapped):
        torch.testing.assert_close(wrapped_lm(ids).logits, plain_lm(ids).logits)
    torch.testing.assert_close(wrapped_lm(ids).logits, tuned)  # back on afterwards
    with pytest.raises(RuntimeError), base_only(wrapped):
        raise RuntimeError("a failing step")
    assert all(m.enabled for m in wrapped.values())  # ... also after an error inside


@pytest.mark.tiny
def test_self_distillation_is_zero_at_the_base_and_pulls_a_drifted_lora_back():
    """distill.Teacher on the embedded model: replies are the base model's greedy ones; the KL
    term is 0 while the LoRA changes nothing, positive once it does, and its gradient lowers it."""
    import numpy as np

    from streamvz.tiny.adapter import TinyAdapter
    from streamvz.tiny.distill import Teacher, prompts

    adapter = TinyAdapter(tokens_per_frame=None, device="cpu", dtype=torch.float32, projector=None)
    wrapped = attach(adapter.model, rank=4)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    lora = [p for m in wrapped.values() for p in (m.A, m.B)]
    for p in lora:
        p.requires_grad_(True)
    teacher = Teacher.build(adapter, wrapped, np.random.default_rng(0), n=6, max_reply=5)
    eot = adapter.ids(adapter.chat.end_of_turn)[0]
    assert len(teacher.sequences) == 6 and all(r[-1] == eot and len(r) <= 6 for _, r in teacher.sequences)
    assert len(set(prompts(np.random.default_rng(0), 50))) == 50
    assert teacher.loss(adapter, wrapped, np.random.default_rng(1), n=4).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    for m in wrapped.values():  # a LoRA that drifted
        torch.nn.init.normal_(m.B, std=0.05)
    opt = torch.optim.SGD(lora, lr=0.5)
    losses = []
    for _ in range(3):
        loss = teacher.loss(adapter, wrapped, np.random.default_rng(1), n=4)  # the same prompts each time
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-3 and losses[-1] < losses[0], losses
