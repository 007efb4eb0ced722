"""Synthetic shapes scenes: a few coloured shapes on a textured background, and texts that are true to the picture.

A `Scene` is sampled from a numpy Generator, rendered with PIL + numpy, and described by captions (every
object's colour and shape plus the background), region phrases that name one object uniquely (optionally
with a left/right/above/below relation checked against the boxes) and object labels with attributes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far from each other and from the low-saturation backgrounds, so that the colour at a
# shape's box centre is recoverable after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 20),
    "purple": (130, 40, 170),
    "orange": (245, 135, 20),
    "pink": (245, 110, 190),
    "cyan": (20, 195, 210),
}
COLOURS_LIST = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = ("small", "large")
TEXTURES = ("striped", "checkered", "noisy", "gradient")
TONES = ("light", "dark")
# Size of a shape as a fraction of the image's shorter side; the gap between the ranges keeps "small" and
# "large" visibly different.
SIZE_RANGES = {"small": (0.12, 0.18), "large": (0.27, 0.36)}
# Chance that a shape takes a colour already used in its scene. Were colours unique, every text could be matched
# by colour alone and a model would never need to learn shapes (docs/quickstart.md measured exactly that).
REPEAT_COLOUR = 0.5
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
RELATIONS = ("left of", "right of", "above", "below")

# Every word any template below can write (besides colours, shapes, sizes, textures, tones, count words):
# the tokenizer's vocabulary is built from this list, and a test checks that no text uses another word.
TEMPLATE_WORDS = (
    "a", "an", "the", "and", "on", "with", "of", "to", "from", "left", "right", "above", "below", "background",
    "shapes", "shape", "there", "is", "are", "picture", "photo", "image", "illustration", "drawing", "showing",
    "in", "front", "object", "objects", "next", "it", "its", "colorful", "simple", "geometric",
)


@dataclass
class SceneObject:
    """One drawn shape: what it is and where (box in pixels, polygon outline for segmentation)."""
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]            # x, y, w, h: the tight box of the drawn outline
    polygon: list[tuple[float, float]] = field(default_factory=list)

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    def noun(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    texture: str
    tone: str
    background: tuple[tuple[int, int, int], tuple[int, int, int]]   # the texture's two colours
    objects: list[SceneObject]
    texture_seed: int = 0

    def background_words(self) -> str:
        return f"{self.tone} {self.texture} background"


def relation(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations that hold between a and b in image coordinates: boxes must be wholly apart on that axis, so
    a horizontal flip with left<->right swapped in the text stays true."""
    ax, ay, aw, ah = a.box
    bx, by, bw, bh = b.box
    found = []
    if ax + aw <= bx:
        found.append("left of")
    if bx + bw <= ax:
        found.append("right of")
    if ay + ah <= by:
        found.append("above")
    if by + bh <= ay:
        found.append("below")
    return found


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(text: str) -> str:
    return f"{article(text)} {text}"


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------- sampling


def _outline(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    """The outline of `shape` inscribed in the square (x, y, s, s)."""
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32)) for k in range(32)]
    if shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if shape == "triangle":
        return [(cx, y), (x + s, y + s), (x, y + s)]
    if shape == "diamond":
        return [(cx, y), (cx + 0.7 * r, cy), (cx, y + s), (cx - 0.7 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi * k / 3), cy + r * math.sin(math.pi * k / 3)) for k in range(6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _tight_box(polygon: list[tuple[float, float]], width: int, height: int) -> tuple[int, int, int, int]:
    xs = [p[0] for p in polygon]
    ys = [p[1] for p in polygon]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(width, math.ceil(max(xs)) + 1), min(height, math.ceil(max(ys)) + 1)
    return x0, y0, x1 - x0, y1 - y0


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(320, 1025))
    short_side = int(rng.integers(200, long_side + 1)) if rng.random() < 0.8 else long_side
    short_side = max(200, min(short_side, long_side))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


def _background_colours(rng: np.random.Generator, tone: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    # Low-saturation greys with a slight tint: never confusable with the saturated shape colours.
    lo, hi = (165, 235) if tone == "light" else (35, 95)
    colours = []
    for _ in range(2):
        base = int(rng.integers(lo, hi))
        tint = rng.integers(-12, 13, size=3)
        colours.append(tuple(int(np.clip(base + t, 0, 255)) for t in tint))
    return colours[0], colours[1]


def _scene_colours(rng: np.random.Generator, count: int) -> list[str]:
    """`count` shape colours; each after the first repeats an earlier one with probability REPEAT_COLOUR."""
    fresh = [COLOURS_LIST[i] for i in rng.permutation(len(COLOURS_LIST))]
    colours = [fresh.pop(0)]
    while len(colours) < count:
        repeat = rng.random() < REPEAT_COLOUR
        colours.append(colours[int(rng.integers(len(colours)))] if repeat else fresh.pop(0))
    return colours


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: size, background, and 2-5 non-overlapping shapes with distinct shapes; colours repeat
    (REPEAT_COLOUR), so "the circle" and "the red circle" each name one object but "the red shape" only when
    red is unique, and a text names an object's shape, not only its colour, to single it out."""
    width, height = _image_size(rng)
    tone = TONES[int(rng.integers(len(TONES)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    wanted = int(rng.integers(2, 6))
    colours = _scene_colours(rng, wanted)
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:wanted]]
    short = min(width, height)
    gap = max(4, short // 50)
    objects: list[SceneObject] = []
    for colour, shape in zip(colours, shapes):
        placed = None
        for size in (SIZES[int(rng.integers(2))], "small"):  # fall back to small when a large one does not fit
            lo, hi = SIZE_RANGES[size]
            side = float(rng.uniform(lo, hi)) * short
            for _ in range(60):
                x = float(rng.uniform(gap, width - side - gap))
                y = float(rng.uniform(gap, height - side - gap))
                polygon = _outline(shape, x, y, side)
                box = _tight_box(polygon, width, height)
                if all(_apart(box, other.box, gap) for other in objects):
                    placed = SceneObject(shape, colour, size, box, [(round(px, 2), round(py, 2)) for px, py in polygon])
                    break
            if placed:
                break
        if placed:
            objects.append(placed)
    if len(objects) < 2:  # cannot happen for >= 200 px images with two small shapes, but never emit a 1-shape scene
        raise RuntimeError("could not place two shapes")
    return Scene(width, height, texture, tone, _background_colours(rng, tone), objects,
                 texture_seed=int(rng.integers(2**31)))



def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax + aw + gap <= bx or bx + bw + gap <= ax or ay + ah + gap <= by or by + bh + gap <= ay


# ---------------------------------------------------------------- rendering


def _texture(scene: Scene) -> np.ndarray:
    """The background as an HxWx3 uint8 array; cheap numpy so 1,000 scenes render in seconds."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    c0 = np.array(scene.background[0], dtype=np.float32)
    c1 = np.array(scene.background[1], dtype=np.float32)
    if scene.texture == "striped":
        period = int(rng.integers(12, 40))
        axis = np.arange(w) if rng.random() < 0.5 else np.arange(h)
        stripes = ((axis // (period // 2)) % 2).astype(np.float32)
        mix = np.broadcast_to(stripes[None, :] if axis.size == w else stripes[:, None], (h, w))
    elif scene.texture == "checkered":
        cell = int(rng.integers(16, 48))
        mix = (((np.arange(h)[:, None] // cell) + (np.arange(w)[None, :] // cell)) % 2).astype(np.float32)
    elif scene.texture == "noisy":
        cell = int(rng.integers(4, 10))  # blocky noise, upsampled: cheaper and less JPEG-hostile than per-pixel
        small = rng.random((h // cell + 1, w // cell + 1), dtype=np.float32)
        mix = np.repeat(np.repeat(small, cell, axis=0), cell, axis=1)[:h, :w]
    else:  # gradient
        angle = float(rng.uniform(0, 2 * math.pi))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        mix = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    pixels = c0[None, None, :] * (1 - mix[..., None]) + c1[None, None, :] * mix[..., None]
    return pixels.astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    image = Image.fromarray(_texture(scene), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            x, y, w, h = obj.box
            draw.ellipse((x, y, x + w - 1, y + h - 1), fill=colour)
        else:
            draw.polygon(obj.polygon, fill=colour)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Fixed encoder settings (no EXIF, no timestamps, fixed subsampling): same pixels -> same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()


def nearest_colour(rgb: tuple[int, int, int] | np.ndarray) -> str:
    """The palette colour closest to a pixel (used by tests to check that texts match pixels)."""
    pixel = np.asarray(rgb, dtype=np.float32)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name], dtype=np.float32) - pixel) ** 2)))


# ---------------------------------------------------------------- texts


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: o.centre[0])


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """`count` different captions, each naming every object's colour and shape and the background."""
    objs = list(scene.objects)
    n = len(objs)
    bg = scene.background_words()
    shuffled = [objs[i] for i in rng.permutation(n)]
    ordered = _left_to_right(scene)
    templates = [
        lambda: f"{join_list([with_article(o.noun()) for o in shuffled])} on {with_article(bg)}",
        lambda: f"{COUNT_WORDS[n]} shapes on {with_article(bg)}: "
                f"{join_list([with_article(o.noun(with_size=True)) for o in objs])}",
        lambda: f"{with_article(bg)} with {join_list([with_article(o.noun()) for o in reversed(shuffled)])}",
        lambda: f"from left to right {join_list([with_article(o.noun()) for o in ordered])} on {with_article(bg)}",
        lambda: f"there are {COUNT_WORDS[n]} shapes: "
                f"{join_list([with_article(o.noun(with_size=True)) for o in shuffled])} on {with_article(bg)}",
        lambda: f"a picture of {join_list([with_article(o.noun()) for o in ordered])} in front of {with_article(bg)}",
    ]
    order = rng.permutation(len(templates))[:count]
    return [templates[i]() for i in sorted(order)]


def short_caption(scene: Scene, rng: np.random.Generator, style: str) -> str:
    """One caption in the voice of a web dataset: SBU (user captions) or CC (hypernymized alt-text)."""
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    listed = join_list([with_article(o.noun()) for o in objs])
    bg = with_article(scene.background_words())
    if style == "sbu":
        return f"{listed} on {bg}" if rng.random() < 0.5 else f"my photo of {listed} on {bg}"
    prefix = ("illustration of", "drawing of", "geometric shapes:", "simple image with")[int(rng.integers(4))]
    return f"{prefix} {listed} on {bg}"


@dataclass
class RegionPhrase:
    phrase: str
    object_index: int   # the object whose box the phrase grounds (the subject)


def region_phrases(scene: Scene, rng: np.random.Generator) -> list[RegionPhrase]:
    """Per object: one naming phrase and up to two relation phrases with it as the subject. Each names its
    subject uniquely (shapes are distinct within a scene; "the red shape" only when red is); relations are
    checked on the boxes."""
    result = []
    colour_counts = {c: sum(o.colour == c for o in scene.objects) for c in {o.colour for o in scene.objects}}
    for i, obj in enumerate(scene.objects):
        naming = [f"the {obj.noun()}", f"{with_article(obj.noun(with_size=True))}", f"the {obj.colour} shape",
                  f"the {obj.size} {obj.colour} {obj.shape}"]
        if colour_counts[obj.colour] > 1:
            naming.remove(f"the {obj.colour} shape")
        result.append(RegionPhrase(naming[int(rng.integers(len(naming)))], i))
        pairs = [(j, rel) for j, other in enumerate(scene.objects) if j != i for rel in relation(obj, other)]
        for k in rng.permutation(len(pairs))[:2]:
            j, rel = pairs[k]
            other = scene.objects[j]
            sized = rng.random() < 0.3
            rel_words = "to the left of" if rel == "left of" and rng.random() < 0.3 else rel
            rel_words = "to the right of" if rel == "right of" and rng.random() < 0.3 else rel_words
            result.append(RegionPhrase(
                f"the {obj.noun(with_size=sized)} {rel_words} {with_article(other.noun(with_size=sized))}", i))
    return result


def vocabulary_words() -> list[str]:
    """Every word the generator can write, in a fixed order (the tokenizer's word list)."""
    words: list[str] = []
    for group in (TEMPLATE_WORDS, tuple(COLOURS), SHAPES, SIZES, TEXTURES, TONES, tuple(COUNT_WORDS.values()),
                  ("my",)):
        for word in group:
            if word not in words:
                words.append(word)
    return words
