"""How a question is worded: templates per question kind, answer-form instructions, option lists.

A user types "Which colour is the circle: red, blue or green? One word." rather than the one
template a model was trained on, so training phrases every question in many ways (plain,
listing the options in several styles, polite, terse, with an instruction on the answer's form)
while the answer stays the one word the question asks for. A `Wording` is pure data, so the
quality bench can load a second one (bench/heldout_wordings.json) that training never reads and
measure how well the model handles wordings it has never seen.

Template syntax: `{shape}`, `{colour}`, `{name}` ("red circle") are filled from the question's
fact; `{options}` is the answer's alternatives written inline ("red, blue or green"), `{list}`
as an enumerated list ("1) red 2) blue"); "(a|b|)" expands to one template per alternative.

    w = TRAIN
    q = w.phrase("colour", {"shape": "circle"}, "red", ("red", "blue", "green"), rng)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ALT = re.compile(r"\(([^()]*\|[^()]*)\)")


def expand(template: str) -> list[str]:
    """Every wording an "(a|b)" template stands for, in order."""
    m = _ALT.search(template)
    if not m:
        return [template]
    return [w for alt in m.group(1).split("|") for w in expand(template[: m.start()] + alt + template[m.end():])]


def skeleton(text: str) -> str:
    """The fixed words of a wording (no slots, case or punctuation): what two wordings share if
    they are the same wording."""
    text = re.sub(r"\{[a-z]+\}", " ", text.lower())
    return " ".join(re.sub(r"[^a-z' ]", " ", text).split())


@dataclass(frozen=True)
class Style:
    """How a list of options is written: each item, the separator, and the one before the last."""

    item: str  # "{x}" the option, "{a}" its article ("a " for shapes), "{i}" 1.., "{L}" A.., "{l}" a..
    sep: str
    last: str

    def join(self, words: list[str], article: bool) -> str:
        items = [self.item.format(x=w, a=("a " if article else ""), i=k + 1, L="ABCDEFGH"[k], l="abcdefgh"[k])
                 for k, w in enumerate(words)]
        return self.sep.join(items[:-1]) + self.last + items[-1] if len(items) > 1 else items[0]


@dataclass(frozen=True)
class Wording:
    templates: dict[str, tuple[str, ...]]  # table (kind, or position_x / position_y) -> templates
    forms: dict[str, tuple[str, ...]]  # kind or "any" -> answer-form instructions
    inline: tuple[Style, ...]  # styles for {options}
    lists: tuple[Style, ...]  # styles for {list}
    form_p: float = 0.3  # chance of an answer-form instruction after the question
    lower_p: float = 0.1  # chance the question is typed all lower case
    bare_p: float = 0.1  # chance its closing "?" or "." is left off

    @staticmethod
    def from_json(path: str | Path) -> "Wording":
        d = json.loads(Path(path).read_text())
        return Wording({k: tuple(v) for k, v in d["templates"].items()}, {k: tuple(v) for k, v in d["forms"].items()},
                       tuple(Style(**s) for s in d["inline"]), tuple(Style(**s) for s in d["lists"]),
                       **{k: d[k] for k in ("form_p", "lower_p", "bare_p") if k in d})

    def expanded(self, table: str, listed: bool | None = None) -> list[str]:
        """The table's wordings; listed True/False keeps only those that do / do not list options."""
        out = [w for t in self.templates.get(table, ()) for w in expand(t)]
        return out if listed is None else [w for w in out if ("{options}" in w or "{list}" in w) == listed]

    def phrase(self, table: str, slots: dict, answer: str, choices: tuple, rng: np.random.Generator,
               listed: bool | None = None, kind: str | None = None) -> str:
        """One question for the fact, its wording drawn at random (listed: as in `expanded`)."""
        wordings = self.expanded(table, listed)
        text = wordings[int(rng.integers(len(wordings)))]
        if "{options}" in text or "{list}" in text:
            others = [c for c in choices if c != answer]
            k = int(rng.integers(1, min(len(others), 3) + 1))
            words = [answer] + [others[i] for i in rng.choice(len(others), size=k, replace=False)]
            words = [words[i] for i in rng.permutation(len(words))]
            styles = self.inline if "{options}" in text else self.lists
            opts = styles[int(rng.integers(len(styles)))].join(words, article=table == "shape")
            text = text.replace("{options}", opts).replace("{list}", opts)
        text = text.format(**slots)
        forms = [w for f in self.forms.get(kind or table, ()) + self.forms.get("any", ()) for w in expand(f)]
        if forms and rng.random() < self.form_p:
            text = text + " " + forms[int(rng.integers(len(forms)))]
        if rng.random() < self.lower_p:
            text = text.lower()
        if rng.random() < self.bare_p and text[-1] in "?.":
            text = text[:-1]
        return text[0].upper() + text[1:] if text[0].isalpha() and rng.random() < 0.9 else text

    def strings(self) -> list[str]:
        """Every fixed wording (templates and forms, expanded): what the held-out test compares."""
        return [w for table in self.templates for w in self.expanded(table)] + \
               [w for forms in self.forms.values() for f in forms for w in expand(f)]


_COLOR = "(colour|color)"
_THING = "(object|one|shape|thing)"
_SHAPES = "(shapes|objects)"

TRAIN = Wording(
    templates={
        "colour": (
            f"What {_COLOR} is the {{shape}}?", f"Which {_COLOR} is the {{shape}}?", "What hue is the {shape}?",
            f"What is the {_COLOR} of the {{shape}}?", f"The {{shape}} is what {_COLOR}?",
            f"(Can|Could) you tell me what {_COLOR} the {{shape}} is?", f"(Please tell|Tell) me the {_COLOR} of the {{shape}}.",
            f"{{shape}} {_COLOR}?", f"{_COLOR} of the {{shape}}?", f"Please, what {_COLOR} is the {{shape}}?",
            f"What {_COLOR} is the {{shape}}: {{options}}?", "Is the {shape} {options}?",
            f"Which {_COLOR} is the {{shape}}, {{options}}?", f"What {_COLOR} is the {{shape}}? (Options|Choices): {{list}}.",
            f"Pick the {_COLOR} of the {{shape}}: {{list}}.",
            f"What's the {_COLOR} of the {{shape}}?", f"Tell me what {_COLOR} the {{shape}} is.", f"Do you know the {_COLOR} of the {{shape}}?",
            f"Say which {_COLOR} the {{shape}} has.", f"What {_COLOR} does the {{shape}} have: {{options}}?",
            f"Among {{options}}: what {_COLOR} is the {{shape}}?", "{options}? The {shape}.", "Does the {shape} look {options}?",
            f"Would you say the {{shape}} is {{options}}?", f"The {{shape}}'s {_COLOR}? {{list}}",
        ),
        "shape": (
            f"What shape is the {{colour}} {_THING}?", "Which shape is {colour}?", "What is the {colour} (shape|object)?",
            "What is the shape of the {colour} (object|one)?", "(Can|Could) you tell me what shape the {colour} (object|one) is?",
            "(Please tell|Tell) me the shape of the {colour} object.", "{colour} (object|one) shape?",
            "shape of the {colour} (one|object)?", f"Is the {{colour}} {_THING} {{options}}?",
            "What shape is the {colour} (object|one): {options}?", "Which is {colour}: {options}?",
            "What shape is the {colour} (object|one)? (Options|Choices): {list}.", "Pick the {colour} shape: {list}.",
            "What's the {colour} (object|one|thing)?", "Tell me the shape of the {colour} (one|thing).",
            "Do you know what shape the {colour} (object|one) is?", "The {colour} (object|one): what shape?",
            "Which shape does the {colour} (object|thing) have: {options}?",
            "Among {options}: which is the {colour} (one|shape)?", "{options}? The {colour} (one|shape).",
            "Does the {colour} (figure|piece) look like {options}?", "Would you say the {colour} (figure|piece) is {options}?",
            "Is the {colour} (figure|piece) {options}?", "The {colour} (one|shape) is which? {list}",
        ),
        "count": (
            f"How many {_SHAPES} are there?", "How many (shapes|objects|things) (do you see|can you see|are in the (picture|image))?",
            f"Count the {_SHAPES}.", f"What is the number of {_SHAPES}?", f"(Number|Count) of {_SHAPES}?",
            f"How many {_SHAPES}?", f"(Can|Could) you count the {_SHAPES}?", f"Please count the {_SHAPES} in the (picture|image).",
            f"How many {_SHAPES} are there: {{options}}?", f"Are there {{options}} {_SHAPES}?",
            f"How many {_SHAPES} (are there|do you see)? (Options|Choices): {{list}}.",
            "What's the number of (shapes|objects|figures)?", "How many (figures|items) are there?",
            f"Tell me the number of {_SHAPES}.", f"Do you know how many {_SHAPES} there are?",
            f"How many {_SHAPES} are (shown|visible|depicted)?", f"Say how many {_SHAPES} you see.",
            f"The number of {_SHAPES}: {{options}}?", f"How many {_SHAPES} are visible? {{list}}.",
            f"Among {{options}}: how many {_SHAPES} are there?", f"{{options}}? The number of {_SHAPES}.",
            f"Is the (count|total) of {_SHAPES} {{options}}?", f"Give me the (count|total) of {_SHAPES}.",
            f"Would you say there are {{options}} {_SHAPES}?", f"How many {_SHAPES} in total? {{list}}",
        ),
        "present": (
            "Is there (a|any) {name}( in the (picture|image)|)?", "(Do|Can) you see a {name}?",
            "Is a {name} (visible|shown|present)?", "Does the (picture|image) (contain|show|have) a {name}?",
            "Any {name}?", "(Can|Could) you tell me if there is a {name}?", "Please check: is there a {name}?",
            "{name} present?", "Is there a {name} or not?",
        ),
        "position_x": (
            "Is the {name} on the (left or the right|right or the left)( side|)?", "Which side is the {name} on, (left or right|right or left)?",
            "Is the {name} (left or right|right or left)?", "Where is the {name}, (left or right|right or left)?",
            "(Can|Could) you tell me if the {name} is on the left or the right?", "{name}: left or right?",
            "Is the {name} in the (left or right|right or left) half?",
            "Tell me if the {name} is on the (left or the right|right or the left).", "What side is the {name} on: left or right?",
            "Is the {name} towards the (left or the right|right or the left)?",
            "Which side of the (picture|image) is the {name} on, left or right?", "Left side or right side, the {name}?",
            "(Left or right|Right or left)? The {name}.", "(Left or right|Right or left), where is the {name}?",
            "Would you say the {name} is on the left or on the right?",
        ),
        "position_y": (
            "Is the {name} (at the top or the bottom|at the bottom or the top)?", "Is the {name} (top or bottom|bottom or top)?",
            "Is the {name} in the (top or bottom|bottom or top) half?", "Where is the {name}, (top or bottom|bottom or top)?",
            "(Can|Could) you tell me if the {name} is at the top or the bottom?", "{name}: top or bottom?",
            "Is the {name} near the (top or the bottom|bottom or the top)?", "Tell me if the {name} is at the top or at the bottom.",
            "Which part of the (picture|image) is the {name} in, top or bottom?", "Is the {name} up (at the top|top) or down (at the bottom|bottom)?",
            "(Top or bottom|Bottom or top)? The {name}.", "(Top or bottom|Bottom or top), where is the {name}?",
            "Would you say the {name} is at the top or at the bottom?",
        ),
        "background": (
            "What is the background?", "What (kind|type|sort) of background is (it|this|there)?",
            "What does the background look like?", "Describe the background in one word.",
            "(Can|Could) you describe the background?", "background?", "Background type?",
            "Is the background {options}?", "What is the background: {options}?",
            "What kind of background is it? (Options|Choices): {list}.",
            "What's the background like?", "Tell me what the background is.", "Which background is (it|this): {options}?",
            "What pattern does the background have?", "The background: {options}?",
            "What (kind|type) of background does the (picture|image) have?",
            "What is (in|at) the back of the (picture|image)?", "What lies behind the (objects|figures)?",
            "Among {options}: which is the background?", "{options}? The background.", "Does the background look {options}?",
            "Would you say the background is {options}?", "The background is which? {list}",
        ),
        "seen": (
            "Was there (a|any) {name}( at any point|)?", "Did you see a {name}( at any point| earlier|)?",
            "Has a {name} (appeared|been shown)?", "Did a {name} (appear|show up)?",
        ),
        "now": (
            f"How many {_SHAPES} are there (now|right now)?", f"How many {_SHAPES} (do you see|can you see|are in view) (now|right now)?",
            f"Count the {_SHAPES} (now|in the latest frame).", f"How many {_SHAPES} are there now: {{options}}?",
        ),
    },
    forms={
        "any": ("Answer in one word.", "One word.", "One word only.", "(Reply|Respond) with one word.", "Answer briefly.",
                "Be brief.", "Short answer, please.", "Keep the answer short.", "Just one word.", "In one word, please.",
                "Reply briefly."),
        "colour": (f"Just the {_COLOR}.", f"Name the {_COLOR} only."),
        "shape": ("Just the shape.", "Name the shape only."),
        "count": ("Answer with a number.", "Just the number.", "Give a digit.", "Only the number.", "A number, please."),
        "now": ("Answer with a number.", "Just the number."),
        "present": ("Answer yes or no.", "Yes or no?", "Just yes or no.", "(Reply|Respond) with yes or no."),
        "seen": ("Answer yes or no.", "Yes or no?"),
    },
    inline=(Style("{x}", ", ", " or "), Style("{a}{x}", ", ", " or "), Style("{x}", ", ", ", "), Style("{x}", ", ", ", or "),
            Style("{x}", " / ", " / ")),
    lists=(Style("{i}) {x}", " ", " "), Style("{i}. {x}", ", ", ", "), Style("{L}) {x}", " ", " "), Style("({l}) {x}", " ", " "),
           Style("\n* {x}", "", ""), Style("\n{i}. {x}", "", "")),
)
