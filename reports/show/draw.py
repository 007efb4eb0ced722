"""Drawing a sample: the image (small ones enlarged) with every box outlined in its own colour and numbered, and a
text panel of captions and box texts underneath."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours; box i gets PALETTE[i % len(PALETTE)] (tests check pixels against it).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 225, 25)]
LINE_WIDTH = 3            # box outline, drawn inside the box's pixels
MIN_SIDE = 320            # smaller images are enlarged (nearest neighbour, integer factor) to stay readable
PANEL_WIDTH = 560         # minimum width of the text panel under the image


def box_colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


@dataclass
class DrawnBox:
    bbox: tuple[float, float, float, float]    # x, y, w, h in the pixels of the image given to draw_sample
    text: str


def scale_factor(width: int, height: int) -> int:
    """Integer enlargement for small images (1 for images of MIN_SIDE px or more on the long side)."""
    return max(1, math.ceil(MIN_SIDE / max(1, max(width, height))))


def draw_sample(image: Image.Image, boxes: list[DrawnBox], lines: list[str]) -> Image.Image:
    """The image (enlarged by scale_factor, at the top-left corner) with box i outlined in box_colour(i) and
    numbered, and a text panel below: `lines`, then each box's number and text in its colour."""
    image = image.convert("RGB")
    k = scale_factor(*image.size)
    if k > 1:
        image = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    font = _font(13)
    width = max(image.width, PANEL_WIDTH)
    text_lines: list[tuple[str, tuple[int, int, int]]] = []
    for line in lines:
        text_lines += [(part, (20, 20, 20)) for part in _wrap(line, font, width - 16)]
    for i, box in enumerate(boxes):
        wrapped = _wrap(f"[{i}] {box.text}", font, width - 34)
        text_lines += [(part, box_colour(i)) for part in wrapped]
    line_h = 17
    canvas = Image.new("RGB", (width, image.height + 10 + line_h * len(text_lines) + 6), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    rects = []
    for i, box in enumerate(boxes):
        x, y, w, h = (v * k for v in box.bbox)
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = max(x0 + 1, int(round(x + w)) - 1), max(y0 + 1, int(round(y + h)) - 1)
        rects.append((x0, y0, x1, y1))
    # number tags first, outlines on top: an outline is never hidden by another box's tag
    for i, (x0, y0, x1, y1) in enumerate(rects):
        tag = str(i)
        tw = int(font.getlength(tag)) + 6
        ty = y0 - 16 if y0 >= 16 else y0 + LINE_WIDTH
        tx = min(x0 + LINE_WIDTH, image.width - tw)
        draw.rectangle([tx, ty, tx + tw, ty + 15], fill=box_colour(i))
        draw.text((tx + 3, ty + 1), tag, fill=(0, 0, 0) if sum(box_colour(i)) > 400 else (255, 255, 255), font=font)
    for i, rect in enumerate(rects):
        draw.rectangle(rect, outline=box_colour(i), width=LINE_WIDTH)
    y = image.height + 8
    for text, colour in text_lines:
        if colour != (20, 20, 20):
            draw.rectangle([8, y + 3, 18, y + 13], fill=colour)
            draw.text((24, y), text, fill=(20, 20, 20), font=font)
        else:
            draw.text((8, y), text, fill=colour, font=font)
        y += line_h
    return canvas
