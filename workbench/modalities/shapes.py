"""A synthetic image-question-answer set the vision adapter is trained and checked on.

No pretrained vision model or image data set can be downloaded here, so the adapter learns
from pictures we draw ourselves. Everything is decided by one seeded ``random.Random``, so
a seed names a data set exactly: training uses one seed, held-out evaluation another.

Answers are kept unambiguous by construction: colour, shape and position questions are
asked about pictures with exactly one object; count questions about pictures of 1-4
objects that do not overlap; text questions about pictures of one printed word.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CANVAS = 128

# Fill colours far apart in RGB (and from the near-white backgrounds) so that a colour's
# name is never a matter of taste.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (255, 120, 200),
    "brown": (120, 70, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COUNTS = (1, 2, 3, 4)
# Short common words, none of which is also a colour, shape, number or position answer.
WORDS = ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "milk", "hat", "box", "cup")
POSITIONS = ("left", "right", "top", "bottom")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_TYPES = ("colour", "shape", "count", "position", "text")

_BACKGROUNDS = ((255, 255, 255), (245, 245, 245), (250, 248, 240), (240, 244, 250))
_INKS = ((0, 0, 0), (40, 40, 40), (20, 20, 60))

_PHRASINGS = {
    "colour": (
        "What colour is the shape?",
        "What color is the {shape}?",
        "Which colour is the object in the image?",
        "What is the colour of the {shape}?",
    ),
    "shape": (
        "What shape is this?",
        "What shape is in the image?",
        "Which shape do you see?",
        "What is the shape of the {colour} object?",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in the picture.",
        "How many shapes can you see?",
    ),
    "position_x": (
        "Is the {shape} on the left or the right?",
        "Is the shape on the left or on the right of the image?",
        "Which side is the {colour} {shape} on, left or right?",
    ),
    "position_y": (
        "Is the {shape} at the top or the bottom?",
        "Is the shape at the top or at the bottom of the image?",
        "Is the {colour} {shape} near the top or the bottom?",
    ),
    "text": (
        "What word is written in the image?",
        "What does the text say?",
        "Read the word in the picture.",
        "Which word is shown?",
    ),
}


@dataclass(frozen=True)
class Item:
    """One training or evaluation example.

    ``labels`` holds the class indices of everything the picture shows (for the vision
    encoder's supervised stage); attributes a picture does not have are absent.
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    labels: dict[str, int]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled scalable font: no system font needed, same glyphs everywhere.
    return ImageFont.load_default(size=size)


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = 4
        start = math.pi / 4 + turn
        radii = [r] * corners
    elif shape == "diamond":
        corners = 4
        start = turn
        radii = [r * 1.15, r * 0.75] * 2  # a rhombus, so it never reads as a tilted square
    elif shape == "triangle":
        corners = 3
        start = -math.pi / 2 + turn
        radii = [r * 1.1] * corners
    elif shape == "star":
        corners = 10
        start = -math.pi / 2 + turn
        radii = [r * 1.15, r * 0.48] * 5
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [
        (
            cx + radii[i] * math.cos(start + 2 * math.pi * i / corners),
            cy + radii[i] * math.sin(start + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float, turn: float = 0.0
) -> None:
    """Draw one filled shape of radius about ``r`` centred at (cx, cy)."""
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, turn), fill=fill)


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (CANVAS, CANVAS), rng.choice(_BACKGROUNDS))
    return image, ImageDraw.Draw(image)


def _turn(rng: random.Random, shape: str) -> float:
    # Small rotations only: a square turned 45 degrees would be a diamond.
    return rng.uniform(-0.2, 0.2) if shape != "circle" else 0.0


def _single_object(rng: random.Random, qtype: str) -> Item:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    r = rng.uniform(16, 24)
    # 1.2 r bounds every shape (star and diamond points included): the whole object stays
    # inside one half both ways, so left/right and top/bottom are never a matter of degree.
    margin = r * 1.2 + 2
    right, bottom = rng.random() < 0.5, rng.random() < 0.5
    half = CANVAS / 2
    cx = rng.uniform(half + margin, CANVAS - margin) if right else rng.uniform(margin, half - margin)
    cy = rng.uniform(half + margin, CANVAS - margin) if bottom else rng.uniform(margin, half - margin)
    image, draw = _canvas(rng)
    draw_shape(draw, shape, colour, cx, cy, r, _turn(rng, shape))
    labels = {
        "colour": list(COLOURS).index(colour),
        "shape": SHAPES.index(shape),
        "x": int(right),
        "y": int(bottom),
    }
    if qtype == "colour":
        answer = colour
    elif qtype == "shape":
        answer = shape
    else:
        axis = rng.choice(("x", "y"))
        qtype_key = f"position_{axis}"
        answer = ("right" if right else "left") if axis == "x" else ("bottom" if bottom else "top")
        question = rng.choice(_PHRASINGS[qtype_key]).format(shape=shape, colour=colour)
        return Item(image, question, answer, "position", labels)
    question = rng.choice(_PHRASINGS[qtype]).format(shape=shape, colour=colour)
    return Item(image, question, answer, qtype, labels)


def _many_objects(rng: random.Random) -> Item:
    count = rng.choice(COUNTS)
    image, draw = _canvas(rng)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(10, 16)
        margin = r * 1.2 + 2
        cx, cy = rng.uniform(margin, CANVAS - margin), rng.uniform(margin, CANVAS - margin)
        # 1.2 r bounds every shape (star and diamond points included); keep a gap between.
        if all(math.hypot(cx - x, cy - y) > 1.2 * (r + q) + 4 for x, y, q in placed):
            placed.append((cx, cy, r))
    for cx, cy, r in placed:
        shape = rng.choice(SHAPES)
        draw_shape(draw, shape, rng.choice(list(COLOURS)), cx, cy, r, _turn(rng, shape))
    question = rng.choice(_PHRASINGS["count"])
    return Item(image, question, str(count), "count", {"count": COUNTS.index(count)})


def _word(rng: random.Random) -> Item:
    word = rng.choice(WORDS)
    if rng.random() < 0.3:
        word = word.upper()
    image, draw = _canvas(rng)
    font = _font(rng.randint(28, 40))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = rng.uniform(4, max(4, CANVAS - 4 - w)) - left
    y = rng.uniform(4, max(4, CANVAS - 4 - h)) - top
    draw.text((x, y), word, font=font, fill=rng.choice(_INKS))
    question = rng.choice(_PHRASINGS["text"])
    return Item(image, question, word.lower(), "text", {"word": WORDS.index(word.lower())})


def make_item(rng: random.Random, qtype: str) -> Item:
    """One item of question type ``qtype`` drawn from ``rng``."""
    if qtype in ("colour", "shape", "position"):
        return _single_object(rng, qtype)
    if qtype == "count":
        return _many_objects(rng)
    if qtype == "text":
        return _word(rng)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QUESTION_TYPES) -> list[Item]:
    """``n`` items cycling through ``qtypes`` in order, so every type gets an equal share."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_item(rng, qtypes[i % len(qtypes)]) for i in range(n)]


def describe(qtypes: tuple[str, ...] = QUESTION_TYPES) -> str:
    """What the part of the set holding ``qtypes`` shows, in one sentence, for config files and READMEs."""
    words = f"words {', '.join(WORDS)}; " if "text" in qtypes else ""
    return (
        f"generated shapes set ({CANVAS}x{CANVAS} pictures drawn with Pillow): "
        f"shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; counts 1-4; "
        f"positions left/right/top/bottom; {words}"
        f"question types {', '.join(qtypes)}"
    )
