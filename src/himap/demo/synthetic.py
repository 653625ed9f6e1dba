"""Seeded synthetic visual multiple-choice questions in the himap question format, with generated images.

Every question needs its image: the options are shuffled, the answer letter is uniform over them, and nothing in
the text tells which option is right. Tasks (all on a white canvas of flat-coloured shapes or bars):

- ``color``    "What color is the {shape}?"                       one shape; options: colours
- ``shape``    "Which shape is in the image?"                     one shape; options: shapes
- ``position`` "Where is the {color} {shape}?"                    one shape in a region; options: regions
- ``count``    "How many {shape}s are in the image?"              1-5 of one shape, maybe other shapes too
- ``relation`` "Is the {color} shape to the left of the {color} shape?"   two shapes; options: yes / no
- ``bars``     "Which bar is the tallest / shortest?"             a bar chart; options: the bars' colours

A split and a seed fix the whole stream (``random.Random`` seeded with a string, stable across runs and
platforms), so ``split="train"`` and ``split="test"`` are independent draws and ids never collide. The text
vocabulary is deliberately small: :func:`corpus` is what the demo tokenizer is trained on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..io import write_question_file

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
REGIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
           "center": (0.5, 0.5)}
NUMBERS = ("one", "two", "three", "four", "five", "six")
TASKS = ("color", "shape", "position", "count", "relation", "bars")
CONTEXTS = {
    "shapes": ("The image shows shapes on a white background.", "Look at the shapes in the image.",
               "Each shape has one color."),
    "bars": ("The image shows a bar chart.", "Each bar in the chart has a different color.",
             "Look at the height of each bar."),
}
CONTEXT_RATE = 0.35
LETTERS = "ABCDE"


@dataclass(frozen=True)
class Mark:
    """One thing drawn on the canvas: a shape centred at (x, y) with radius r, or a bar (``kind="bar"``) of
    height h (fractions of the image size; bars stand on the bottom edge)."""

    kind: str
    color: str
    x: float
    y: float = 0.0
    r: float = 0.0
    w: float = 0.0
    h: float = 0.0


@dataclass(frozen=True)
class Item:
    id: str
    task: str
    question: str
    choices: tuple[str, ...]
    answer: int                      # index into choices
    marks: tuple[Mark, ...]
    context: str | None = None

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    def human_turn(self) -> str:
        """The human turn exactly as ScienceQA's himap question files write it: ``<image>``, an optional
        ``Context:`` line, the question, then one ``A. choice`` line per option (see :mod:`himap.data.scienceqa`)."""
        lines = ["<image>"] + ([f"Context: {self.context}"] if self.context else []) + [self.question]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices)]
        return "\n".join(lines)

    def record(self) -> dict:
        return {"id": self.id, "image": f"{self.id}/image.png",
                "conversations": [{"from": "human", "value": self.human_turn()},
                                  {"from": "gpt", "value": self.letter}]}

    def render(self, size: int = 168) -> Image.Image:
        img = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for m in self.marks:
            _draw(draw, m, size)
        return img


def _draw(draw: ImageDraw.ImageDraw, m: Mark, size: int) -> None:
    fill = COLORS[m.color]
    if m.kind == "bar":
        x0, x1 = (m.x - m.w / 2) * size, (m.x + m.w / 2) * size
        draw.rectangle([x0, size * (1 - m.h), x1, size - 1], fill=fill)
        return
    cx, cy, r = m.x * size, m.y * size, m.r * size
    if m.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif m.kind == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif m.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif m.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif m.kind == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown mark kind {m.kind!r}")


# -- question makers: rng -> (question, choices, answer index, marks, context family) -------------------------
def _options(rng: random.Random, correct: str, pool: Sequence[str], n: int) -> tuple[tuple[str, ...], int]:
    """``n`` options drawn from ``pool`` (in random order), one of them ``correct``; returns (options, index)."""
    others = rng.sample([p for p in pool if p != correct], n - 1)
    opts = others + [correct]
    rng.shuffle(opts)
    return tuple(opts), opts.index(correct)


def _n_options(rng: random.Random, pool_size: int) -> int:
    return rng.randint(2, min(5, pool_size))


def _shape(rng: random.Random, kind: str, color: str, x: float, y: float, r: float) -> Mark:
    j = 0.03  # jitter, so no two images are pixel-identical
    return Mark(kind, color, x + rng.uniform(-j, j), y + rng.uniform(-j, j), r * rng.uniform(0.9, 1.1))


def _color(rng):
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    opts, ans = _options(rng, color, list(COLORS), _n_options(rng, len(COLORS)))
    return f"What color is the {kind}?", opts, ans, (_shape(rng, kind, color, 0.5, 0.5, 0.25),), "shapes"


def _shape_task(rng):
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    opts, ans = _options(rng, kind, SHAPES, _n_options(rng, len(SHAPES)))
    return "Which shape is in the image?", opts, ans, (_shape(rng, kind, color, 0.5, 0.5, 0.25),), "shapes"


def _position(rng):
    kind, color, region = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(REGIONS))
    x, y = REGIONS[region]
    opts, ans = _options(rng, region, list(REGIONS), _n_options(rng, len(REGIONS)))
    return f"Where is the {color} {kind}?", opts, ans, (_shape(rng, kind, color, x, y, 0.14),), "shapes"


def _count(rng):
    kind = rng.choice(SHAPES)
    count = rng.randint(1, 5)
    n_other = rng.randint(0, min(2, 9 - count))
    cells = rng.sample(range(9), count + n_other)           # a 3 x 3 grid, one object per cell
    kinds = [kind] * count + [rng.choice([s for s in SHAPES if s != kind]) for _ in range(n_other)]
    marks = tuple(_shape(rng, k, rng.choice(list(COLORS)), (c % 3 + 0.5) / 3, (c // 3 + 0.5) / 3, 0.11)
                  for k, c in zip(kinds, cells))
    opts, ans = _options(rng, NUMBERS[count - 1], NUMBERS, _n_options(rng, len(NUMBERS)))
    return f"How many {kind}s are in the image?", opts, ans, marks, "shapes"


def _relation(rng):
    c1, c2 = rng.sample(list(COLORS), 2)
    k1, k2 = rng.choice(SHAPES), rng.choice(SHAPES)
    left = rng.random() < 0.5                              # is c1 left of c2?
    (x1, x2), (y1, y2) = ((0.25, 0.75) if left else (0.75, 0.25)), (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    marks = (_shape(rng, k1, c1, x1, y1, 0.15), _shape(rng, k2, c2, x2, y2, 0.15))
    opts = ["yes", "no"]
    rng.shuffle(opts)
    return (f"Is the {c1} shape to the left of the {c2} shape?", tuple(opts),
            opts.index("yes" if left else "no"), marks, "shapes")


def _bars(rng):
    n = rng.randint(2, 5)
    colors = rng.sample(list(COLORS), n)
    heights = sorted(rng.sample(range(2, 10), n))          # distinct: a unique tallest and shortest
    rng.shuffle(heights)
    width = 0.8 / n
    marks = tuple(Mark("bar", c, 0.1 + width * (i + 0.5), w=width * 0.7, h=h / 10)
                  for i, (c, h) in enumerate(zip(colors, heights)))
    tallest = rng.random() < 0.5
    pick = colors[heights.index(max(heights) if tallest else min(heights))]
    opts, ans = _options(rng, pick, colors, rng.randint(2, n))
    return f"Which bar is the {'tallest' if tallest else 'shortest'}?", opts, ans, marks, "bars"


# ``fixed_options``: every question of a task lists the same options in the same order (at most five)
FIXED_OPTIONS = {"color": tuple(COLORS)[:5], "shape": SHAPES, "position": tuple(REGIONS), "count": NUMBERS[:5]}


def _fixed(rng: random.Random, task: str):
    """A question of ``task`` re-listed with :data:`FIXED_OPTIONS` (redrawn until its answer is among them)."""
    while True:
        question, choices, answer, marks, family = _MAKERS[task](rng)
        if choices[answer] in FIXED_OPTIONS[task]:
            pool = FIXED_OPTIONS[task]
            return question, pool, pool.index(choices[answer]), marks, family


_MAKERS = {"color": _color, "shape": _shape_task, "position": _position, "count": _count,
           "relation": _relation, "bars": _bars}


def generate(n: int, split: str = "test", seed: int = 0, tasks: Sequence[str] = TASKS, *,
             fixed_options: bool = False) -> Iterator[Item]:
    """``n`` items of ``split`` drawn with ``seed``; tasks cycle in the given order, so every task is covered.

    ``fixed_options``: each task always lists the same options in the same order (:data:`FIXED_OPTIONS`), so the
    letter is a function of the image alone (the easier setting the model organism is trained on)."""
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    if fixed_options and (bad := [t for t in tasks if t not in FIXED_OPTIONS]):
        raise ValueError(f"tasks {bad} have no fixed option list; choose from {', '.join(FIXED_OPTIONS)}")
    rng = random.Random(f"himap-synthetic/{split}/{seed}")
    for i in range(n):
        task = tasks[i % len(tasks)]
        make = (lambda r, t=task: _fixed(r, t)) if fixed_options else _MAKERS[task]
        question, choices, answer, marks, family = make(rng)
        context = rng.choice(CONTEXTS[family]) if rng.random() < CONTEXT_RATE else None
        yield Item(f"{split}-{seed}-{i:05d}", task, question, choices, answer, marks, context)


def write_questions(out_dir: str | Path, n: int, split: str = "test", seed: int = 0, *,
                    image_size: int = 168, tasks: Sequence[str] = TASKS, fixed_options: bool = False) -> Path:
    """Write ``n`` questions to ``out_dir/{split}.json`` (the himap question format) and their images to
    ``out_dir/images/<id>/image.png``; returns the question file. The image folder is ``out_dir / "images"``."""
    out_dir = Path(out_dir)
    records = []
    for item in generate(n, split, seed, tasks, fixed_options=fixed_options):
        path = out_dir / "images" / item.id / "image.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        item.render(image_size).save(path)
        records.append(item.record())
    question_file = out_dir / f"{split}.json"
    return write_question_file(records, question_file)


def corpus() -> list[str]:
    """Every word and sentence the generator can write (plus the option lines), for training a tokenizer."""
    words = [*COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *REGIONS, *NUMBERS, "yes", "no", "tallest", "shortest"]
    lines = [s for family in CONTEXTS.values() for s in family]
    lines += [f"Context: {s}" for s in lines]
    lines += ["Which shape is in the image?", "Which bar is the tallest?", "Which bar is the shortest?"]
    lines += [f"What color is the {k}?" for k in SHAPES]
    lines += [f"Where is the {c} {k}?" for c in COLORS for k in SHAPES]
    lines += [f"How many {k}s are in the image?" for k in SHAPES]
    lines += [f"Is the {a} shape to the left of the {b} shape?" for a in COLORS for b in COLORS if a != b]
    lines += [f"{letter}. {w}" for letter in LETTERS for w in words]
    return lines
