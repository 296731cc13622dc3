"""Questions and answers about generated scenes and clips, for training and measuring streamvz-tiny.

A `Fact` is one thing that can be asked about a scene (the circle's colour, the shape count, ...)
with its one-word answer and the answers it could be confused with; it is phrased either in its
canonical template ("What color is the circle?", the wording the quality bench's template column
asks) or in a wording drawn from a `Wording` (streamvz/tiny/wording.py): training draws from
wording.TRAIN, the bench's held-out column from bench/heldout_wordings.json.

    rng = np.random.default_rng(0)
    qa = questions(scene, rng, n=4)            # [("Which colour is the star: red or blue?", "red"), ...]
    qa = questions(scene, rng, n=4, wording=None)   # canonical templates only
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .data import BACKGROUNDS, COLOURS, MAX_OBJECTS, SHAPES, SIZE, Scene
from .wording import TRAIN, Wording

CANONICAL_P = 0.3  # share of training questions in the canonical template (the template column; the demo asks them)
CLIP_CANONICAL_P = 0.5  # clip questions: "How many shapes are there now?" is what the demo and a live stream ask
COUNTS = tuple(str(i) for i in range(MAX_OBJECTS + 2))  # a listed count may offer one more than can be there
KINDS = ("colour", "shape", "count", "present", "position", "background")  # single-frame kinds (the bench's order)


class Fact(NamedTuple):
    kind: str  # one of KINDS, or "seen" / "now" for clips
    table: str  # the Wording table that phrases it (position: position_x / position_y)
    slots: dict  # what the question names: shape, colour, name
    answer: str
    choices: tuple  # answers a question may list as options (the answer among them)
    canonical: str

    def ask(self, rng: np.random.Generator, wording: Wording | None = TRAIN, canonical_p: float = CANONICAL_P,
            listed: bool | None = None) -> str:
        if wording is None or (listed is None and rng.random() < canonical_p):
            return self.canonical
        return wording.phrase(self.table, self.slots, self.answer, self.choices, rng, listed=listed, kind=self.kind)


def _absent(rng, scene: Scene) -> tuple[str, str]:
    """A colour/shape pair that is not in the scene (often one word away from one that is)."""
    present = {(o.colour, o.shape) for o in scene.objects}
    while True:
        if scene.objects and rng.random() < 0.7:
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            pair = (o.colour, str(rng.choice(SHAPES))) if rng.random() < 0.5 else (str(rng.choice(list(COLOURS))), o.shape)
        else:
            pair = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if pair not in present:
            return pair


def facts(scene: Scene, rng: np.random.Generator) -> list[Fact]:
    """Everything the single-frame kinds can ask about the scene (distinct questions)."""
    objs = scene.objects
    pool = [Fact("count", "count", {}, str(len(objs)), COUNTS, "How many shapes are there?"),
            Fact("background", "background", {}, BACKGROUNDS[scene.background[0]], tuple(BACKGROUNDS.values()),
                 "What is the background?")]
    for o in objs:
        pool.append(Fact("colour", "colour", {"shape": o.shape}, o.colour, tuple(COLOURS), f"What color is the {o.shape}?"))
        pool.append(Fact("shape", "shape", {"colour": o.colour}, o.shape, SHAPES, f"What shape is the {o.colour} object?"))
        pool.append(Fact("present", "present", {"name": o.name}, "yes", ("yes", "no"), f"Is there a {o.name}?"))
        clear = max(24, o.size / 3)  # most of the shape lies on one side of the middle: no ambiguous answer
        if abs(o.cx - SIZE / 2) > clear:
            pool.append(Fact("position", "position_x", {"name": o.name}, "left" if o.cx < SIZE / 2 else "right",
                             ("left", "right"), f"Is the {o.name} on the left or the right?"))
        if abs(o.cy - SIZE / 2) > clear:
            pool.append(Fact("position", "position_y", {"name": o.name}, "top" if o.cy < SIZE / 2 else "bottom",
                             ("top", "bottom"), f"Is the {o.name} at the top or the bottom?"))
    for _ in range(max(1, len(objs))):  # as many "no" as "yes" questions
        c, s = _absent(rng, scene)
        pool.append(Fact("present", "present", {"name": f"{c} {s}"}, "no", ("yes", "no"), f"Is there a {c} {s}?"))
    return list({f.canonical: f for f in pool}.values())


def asked(scene: Scene, rng: np.random.Generator, n: int = 4, wording: Wording | None = TRAIN,
          canonical_p: float = CANONICAL_P) -> list[tuple[str, Fact]]:
    """Up to n distinct (question, its fact) about one scene, kinds mixed at random."""
    pool = facts(scene, rng)
    return [(f.ask(rng, wording, canonical_p), f) for f in (pool[i] for i in rng.permutation(len(pool))[:n])]


def questions(scene: Scene, rng: np.random.Generator, n: int = 4, wording: Wording | None = TRAIN,
              canonical_p: float = CANONICAL_P) -> list[tuple[str, str]]:
    """Up to n distinct (question, answer) pairs about one scene, kinds mixed at random."""
    return [(q, f.answer) for q, f in asked(scene, rng, n, wording, canonical_p)]


def clip_questions(scenes: list[Scene], rng: np.random.Generator, n: int = 2, wording: Wording | None = TRAIN,
                   canonical_p: float = CLIP_CANONICAL_P) -> list[tuple[str, str]]:
    """Questions over several frames: was an object seen in any of them, and how many shapes
    are in view now (in the last frame; always asked, it is what a live stream is asked most)."""
    seen = {(o.colour, o.shape) for s in scenes for o in s.objects}
    now = Fact("now", "now", {}, str(len(scenes[-1].objects)), COUNTS, "How many shapes are there now?")
    pool = [Fact("seen", "seen", {"name": f"{c} {s}"}, "yes", ("yes", "no"), f"Was there a {c} {s}?") for c, s in seen]
    for _ in range(max(1, len(seen))):  # an empty clip still gets a "no"
        pair = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if pair not in seen:
            pool.append(Fact("seen", "seen", {"name": " ".join(pair)}, "no", ("yes", "no"), f"Was there a {pair[0]} {pair[1]}?"))
    pool = list({f.canonical: f for f in pool}.values())
    picked = [now] + [pool[i] for i in rng.permutation(len(pool))[: n - 1]]
    return [(f.ask(rng, wording, canonical_p), f.answer) for f in picked]


def normalise(answer: str) -> str:
    """What exact match compares: first word, lower case, no punctuation."""
    words = answer.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""
