"""Synthetic scenes and clips for training and measuring streamvz-tiny (questions about them: questions.py).

A scene is a few coloured shapes on a background (flat colour, gradient, stripes, or one
of scikit-image's photos). Every object in a scene has its own shape and its own colour,
so "what color is the circle?" has exactly one answer. Shapes are large (a quarter to a half
of the frame across), so the objects alone fill a 64-token budget, and "What is the background?"
asks about what lies outside them: the part of a frame that VisionZip's merged contextual
tokens carry and top-CLS selection drops. Answers are one word or digit, so
exact match is a fair score. The `split` decides which photos and which seed stream are
used: "train" and "test" never share a photo, and callers use disjoint seeds.

    rng = np.random.default_rng(0)
    scene = random_scene(rng, "train")
    frame = render(scene)                    # uint8 [224, 224, 3]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "coffee", "coins", "grass", "gravel", "moon",
                "page", "rocket", "immunohistochemistry", "chelsea")
TEST_PHOTOS = ("cat", "hubble_deep_field", "retina", "text")
MAX_OBJECTS = 3
OBJECT_SIZE = (60, 120)  # bounding box side, pixels
BACKGROUNDS = {"flat": "plain", "gradient": "gradient", "stripes": "striped", "photo": "photo"}  # kind -> answer
ANSWERS = (*COLOURS, *SHAPES, "yes", "no", "left", "right", "top", "bottom", *BACKGROUNDS.values(),
           *(str(i) for i in range(MAX_OBJECTS + 1)))
VERSION = 2  # of scene sampling and rendering; part of every cached-features name, so old caches are not reused


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, pixels in the SIZE x SIZE canvas
    cy: float
    size: float  # bounding box side, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: tuple  # ("flat", rgb) | ("gradient", rgb, rgb) | ("stripes", rgb, rgb, period) | ("photo", name, x, y, crop)
    objects: tuple[Obj, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _background(bg: tuple) -> Image.Image:
    kind = bg[0]
    if kind == "flat":
        return Image.new("RGB", (SIZE, SIZE), bg[1])
    if kind == "gradient":
        t = np.linspace(0, 1, SIZE)[:, None, None]
        arr = (1 - t) * np.array(bg[1]) + t * np.array(bg[2])
        return Image.fromarray(np.broadcast_to(arr, (SIZE, SIZE, 3)).astype(np.uint8))
    if kind == "stripes":
        rows = (np.arange(SIZE) // bg[3]) % 2
        arr = np.where(rows[:, None, None] == 0, np.array(bg[1]), np.array(bg[2]))
        return Image.fromarray(np.broadcast_to(arr, (SIZE, SIZE, 3)).astype(np.uint8))
    if kind == "photo":
        _, name, x, y, crop = bg
        img = _photo(name)[y : y + crop, x : x + crop]
        # Dimmed a little so that saturated shapes stay the most salient thing in view.
        return Image.fromarray((img * 0.75).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    raise ValueError(f"unknown background {kind!r}")


def _polygon(o: Obj) -> list[tuple[float, float]]:
    r = o.size / 2
    if o.shape == "triangle":
        return [(o.cx, o.cy - r), (o.cx + r, o.cy + r * 0.8), (o.cx - r, o.cy + r * 0.8)]
    if o.shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((o.cx + rad * math.cos(a), o.cy + rad * math.sin(a)))
        return pts
    raise ValueError(o.shape)


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill, outline) -> None:
    r = o.size / 2
    box = (o.cx - r, o.cy - r, o.cx + r, o.cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif o.shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
        draw.polygon(_polygon(o), fill=fill, outline=outline, width=2)


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 [SIZE, SIZE, 3]."""
    img = _background(scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, COLOURS[o.colour], (0, 0, 0) if o.colour != "white" else (60, 60, 60))
    return np.asarray(img, dtype=np.uint8).copy()


def patch_labels(scene: Scene, patch: int = 14, min_cover: float = 0.3) -> np.ndarray:
    """[patches] object index covering each patch (raster order), -1 for background."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i + 1, i + 1)
    m = np.asarray(mask)
    g = SIZE // patch
    cells = m.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    out = np.full(g * g, -1)
    for i in range(len(scene.objects)):
        out[(cells == i + 1).mean(axis=1) >= min_cover] = i
    return out


# ---------------------------------------------------------------------------------------
# Sampling


def random_background(rng: np.random.Generator, split: str) -> tuple:
    photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    kind = rng.choice(["flat", "gradient", "stripes", "photo", "photo"])

    def dull():  # muted colours, so a background is never mistaken for an object
        return tuple(int(v) for v in rng.integers(40, 150, size=3))

    def apart():  # two dull colours far enough apart that a gradient or stripes never look plain
        while True:
            a, b = dull(), dull()
            if max(abs(x - y) for x, y in zip(a, b)) >= 60:
                return a, b

    if kind == "flat":
        return ("flat", dull())
    if kind == "gradient":
        return ("gradient", *apart())
    if kind == "stripes":
        return ("stripes", *apart(), int(rng.integers(8, 40)))
    name = str(rng.choice(photos))
    h, w = _photo(name).shape[:2]
    crop = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    return ("photo", name, int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1)), crop)


def _place(rng, n: int, placed: list[Obj], tries: int = 200) -> list[tuple[float, float, float]]:
    out = []
    for _ in range(tries):
        if len(out) == n:
            break
        size = float(rng.uniform(*OBJECT_SIZE))
        m = size / 2 + 4
        cx, cy = float(rng.uniform(m, SIZE - m)), float(rng.uniform(m, SIZE - m))
        others = [(o.cx, o.cy, o.size) for o in placed] + out
        if all(abs(cx - x) > (size + s) / 2 + 6 or abs(cy - y) > (size + s) / 2 + 6 for x, y, s in others):
            out.append((cx, cy, size))
    return out


def random_objects(rng: np.random.Generator, n: int) -> tuple[Obj, ...]:
    shapes = rng.permutation(SHAPES)[:n]
    colours = rng.permutation(list(COLOURS))[:n]
    spots = _place(rng, n, [])
    return tuple(Obj(str(s), str(c), *spot) for s, c, spot in zip(shapes, colours, spots))


def random_scene(rng: np.random.Generator, split: str = "train", n: int | None = None) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n is None else n
    return Scene(random_background(rng, split), random_objects(rng, n))


# ---------------------------------------------------------------------------------------
# Clips


def moving_clip(rng: np.random.Generator, frames: int, split: str = "test", objects: int = 2) -> list[Scene]:
    """One background, objects that drift; the first of them leaves half way."""
    bg = random_background(rng, split)
    objs = list(random_objects(rng, objects))
    velocity = [tuple(rng.uniform(-3, 3, size=2)) for _ in objs]
    out = []
    for t in range(frames):
        moved = []
        for o, (vx, vy) in zip(objs, velocity):
            r = o.size / 2 + 2
            moved.append(replace(o, cx=float(np.clip(o.cx + vx * t, r, SIZE - r)), cy=float(np.clip(o.cy + vy * t, r, SIZE - r))))
        out.append(Scene(bg, tuple(moved[1:] if t >= frames // 2 else moved)))
    return out


@dataclass
class LongVideo:
    """A long clip of mostly empty frames with one-object events at known times."""

    scenes: list[Scene]
    fps: float
    events: list[tuple[float, Obj]]  # (time in s, the object shown)
    absent: list[tuple[str, str]]  # colour/shape pairs never shown (negative questions)


def long_video(rng: np.random.Generator, minutes: float = 10.0, fps: float = 0.2, events: int = 8,
               split: str = "test") -> LongVideo:
    """Events spread evenly over the clip, each a distinct colour+shape, one frame each."""
    n = int(round(minutes * 60 * fps))
    bg = random_background(rng, split)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(pairs))
    shown = [pairs[i] for i in order[:events]]
    absent = [pairs[i] for i in order[events : 2 * events]]
    slots = np.linspace(0, n - 1, events + 2)[1:-1].round().astype(int)
    scenes = [Scene(bg) for _ in range(n)]
    ev = []
    for (c, s), i in zip(shown, slots):
        (cx, cy, size), = _place(rng, 1, [])
        o = Obj(s, c, cx, cy, size)
        scenes[i] = Scene(bg, (o,))
        ev.append((i / fps, o))
    return LongVideo(scenes, fps, ev, absent)
