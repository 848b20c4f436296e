"""Pictures of the demo drawn with Pillow only: image grids with labels, brightness histograms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
COLOURS = {"data": (90, 90, 90), "without OMS": (214, 96, 77), "with OMS": (67, 147, 195)}


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """One image [3, h, w] in −1..1 as an RGB picture enlarged ``scale`` times (nearest neighbour)."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array, "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def image_grid(rows: Sequence[tuple[str, torch.Tensor]], *, scale: int = 3, captions: Sequence[str] | None = None,
               title: str = "") -> Image.Image:
    """Rows of images [n, 3, h, w] with a label on the left; below each image its mean brightness."""
    font = ImageFont.load_default()
    count = max(len(images) for _, images in rows)
    size = rows[0][1].shape[-1] * scale
    label_width, gap, text_height = 110, 4, 12
    top = 18 if title else 4
    cell_height = size + text_height + gap
    extra = 14 if captions else 0
    picture = Image.new("RGB", (label_width + count * (size + gap), top + len(rows) * cell_height + extra), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((4, 3), title, fill=INK, font=font)
    for row, (label, images) in enumerate(rows):
        y = top + row * cell_height
        draw.text((4, y + size // 2 - 5), label, fill=INK, font=font)
        for column, image in enumerate(images):
            x = label_width + column * (size + gap)
            picture.paste(to_pil(image, scale), (x, y))
            draw.text((x + 2, y + size + 1), f"{float(image.mean()):+.2f}", fill=INK, font=font)
    if captions:
        for column, caption in enumerate(captions):
            x = label_width + column * (size + gap)
            draw.text((x + 2, top + len(rows) * cell_height), caption[: max(4, size // 6)], fill=INK, font=font)
    return picture


def brightness_histograms(sets: dict[str, np.ndarray], *, bins: int = 24, width: int = 560,
                          panel_height: int = 110) -> Image.Image:
    """One histogram panel per set of per-image mean brightness (−1..1), the same axes for all, as shares."""
    font = ImageFont.load_default()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    shares = {name: np.histogram(np.clip(values, -1, 1), edges)[0] / max(1, len(values))
              for name, values in sets.items()}
    peak = max(float(share.max()) for share in shares.values()) or 1.0
    left, right, top, bottom = 84, 12, 22, 30
    plot_width = width - left - right
    picture = Image.new("RGB", (width, top + len(sets) * (panel_height + 8) + bottom), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    draw.text((left, 4), "per-image mean brightness (-1 = black, +1 = white); bars: share of images", fill=INK,
              font=font)
    for row, (name, share) in enumerate(shares.items()):
        y0 = top + row * (panel_height + 8)
        base = y0 + panel_height
        colour = COLOURS.get(name, INK)
        draw.line([(left, base), (left + plot_width, base)], fill=INK)
        draw.text((4, y0 + panel_height // 2 - 5), name, fill=colour, font=font)
        values = sets[name]
        draw.text((left + 4, y0), f"{name}: mean {np.mean(values):+.2f}, std {np.std(values):.2f}, n={len(values)}",
                  fill=colour, font=font)
        for index, value in enumerate(share):
            x0 = left + index * plot_width / bins
            x1 = left + (index + 1) * plot_width / bins - 1
            height = (panel_height - 14) * value / peak
            if height > 0:
                draw.rectangle([x0, base - height, x1, base], fill=colour)
    axis_y = top + len(sets) * (panel_height + 8)
    for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
        x = left + (tick + 1.0) / 2.0 * plot_width
        draw.line([(x, axis_y - 8), (x, axis_y - 4)], fill=INK)
        draw.text((x - 10, axis_y - 2), f"{tick:+.1f}", fill=INK, font=font)
    return picture
