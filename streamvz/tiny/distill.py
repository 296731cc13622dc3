"""Self-distillation on plain chat: keep the tuned LM's next-token distribution near the frozen base's.

Training on scene questions only can wear away what SmolLM2-Instruct already knows about
instructions ("answer with a number", "pick one of: ..."). This term asks text-only questions
(no frames) of both the tuned model and the base model (LoRA bypassed, lora.base_only), and
penalises KL(base || tuned) over the base model's own greedy reply. No outside data: the
prompts below are generic instructions written here (not about scenes, and never the held-out
wordings), the replies are the base model's.

    teacher = Teacher.build(adapter, wrapped, rng)     # base replies, generated once
    loss = teacher.loss(adapter, wrapped, rng, n=8)    # KL term for one training step
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .lora import base_only

_FACTS = (  # (question, instruction) pieces combined into plain chat prompts
    "Is the sky blue on a clear day?", "Is ice colder than boiling water?", "Can a fish fly?", "Is a lemon sour?",
    "What is two plus three?", "How many days are in a week?", "How many legs does a dog have?",
    "What colour is grass?", "What colour is snow?", "What is the opposite of hot?", "What is the opposite of up?",
    "Which is larger, an elephant or a mouse?", "Which is heavier, a feather or a brick?",
    "Which animal says moo?", "What do bees make?", "What is frozen water called?",
    "Which is a fruit: a carrot, an apple or a potato?", "Which number is biggest: 4, 9 or 2?",
    "Is Paris in France?", "Which season comes after winter?", "How many wheels does a bicycle have?",
    "What shape is a wheel?", "How many sides does a square have?", "What shape has three corners?",
    "Where does the sun rise, in the east or the west?", "Is a whale a mammal?",
    "Name a colour of the rainbow.", "Name an animal that lives in the sea.", "What do we use to write on paper?",
    "What is the first letter of the alphabet?",
)
_FORMS = ("", " Answer in one word.", " Answer yes or no.", " Be brief.", " Explain briefly.",
          " Answer with a number if you can.", " Please answer in a full sentence.")


def prompts(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct plain chat prompts: a question and, often, an instruction on the answer's form."""
    pairs = [(q, f) for q in _FACTS for f in _FORMS]
    return [pairs[i][0] + pairs[i][1] for i in rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)]


@dataclass
class Teacher:
    """The base model's greedy replies to the prompts, as token ids (system + user turn, reply)."""

    sequences: list[tuple[list[int], list[int]]]  # (prompt ids, reply ids incl. end of turn)

    @classmethod
    @torch.no_grad()
    def build(cls, adapter, wrapped: dict, rng: np.random.Generator, n: int = 96, max_reply: int = 24) -> "Teacher":
        c = adapter.chat
        eot = adapter.ids(c.end_of_turn)[0]
        texts = prompts(rng, n)
        system = adapter.ids(c.system.format(adapter.default_system), special=True)
        out = []
        with base_only(wrapped):
            for i in range(0, len(texts), 16):  # left-padded batches: every prompt ends where generation starts
                batch = [system + adapter.ids(c.user.format(t)) for t in texts[i : i + 16]]
                L = max(map(len, batch))
                ids = torch.tensor([[eot] * (L - len(p)) + p for p in batch])
                att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
                gen = adapter.model.generate(ids, attention_mask=att, max_new_tokens=max_reply, do_sample=False,
                                             eos_token_id=eot, pad_token_id=eot)[:, L:].tolist()
                for prompt, reply in zip(batch, gen):
                    reply = reply[: reply.index(eot) + 1] if eot in reply else reply + [eot]
                    out.append((prompt, reply))
        return cls(out)

    def loss(self, adapter, wrapped: dict, rng: np.random.Generator, n: int = 8) -> torch.Tensor:
        """KL(base || tuned) per predicted reply token, averaged, over n random prompts."""
        picks = [self.sequences[i] for i in rng.choice(len(self.sequences), size=min(n, len(self.sequences)), replace=False)]
        seqs = [p + r[:-1] for p, r in picks]
        L = max(map(len, seqs))
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        att = torch.zeros(len(seqs), L, dtype=torch.long)
        rows, cols = [], []
        for b, ((p, r), s) in enumerate(zip(picks, seqs)):
            ids[b, : len(s)] = torch.tensor(s)
            att[b, : len(s)] = 1
            rows += [b] * len(r)
            cols += range(len(p) - 1, len(p) - 1 + len(r))  # the outputs that predict the reply tokens
        where = (torch.tensor(rows), torch.tensor(cols))

        def logits():
            hidden = adapter.model.model(input_ids=ids, attention_mask=att).last_hidden_state
            return adapter.model.lm_head(hidden[where]).float()

        with torch.no_grad(), base_only(wrapped):
            base = F.log_softmax(logits(), -1)
        tuned = F.log_softmax(logits(), -1)
        return F.kl_div(tuned, base, log_target=True, reduction="batchmean")
