"""The demo's small world: procedurally drawn 3×32×32 images whose brightness spans near-black to near-white.

Each image is a flat coloured background, one soft-edged shape in a contrasting shade and a mild texture, in pixel
values −1..1. Its brightness is the mean pixel value. Captions name the shape, the colours and, for most images,
whether the image is dark or bright ("a red circle on a dark blue background"); a fifth of the captions leave the
brightness out, as real captions often do, so the caption fixes the brightness only roughly.

The image size is chosen for the flaw: with N = 3·32·32 values the leaked brightness √ᾱ₉₉₉·b at t = 999 is about
2·(1/√N), the spread of a pure-noise image's mean, so a trained denoiser reads brightness from the leak
(the spread kept is about 1/√(1 + (√ᾱ·σ_b·√N)²)).

Diffusion runs in a latent space, as in SD: the "VAE" is the orthonormal 2-D DCT of each 4×4 pixel cell
(3×32×32 pixels <-> 48×8×8 latents, channel 3·k + colour for DCT coefficient k, scaling factor 1). It is lossless
and orthonormal, so unit Gaussian noise stays unit Gaussian and every pixel's leak is kept, while, as in a VAE's
latents, the low frequencies gather in a few channels (the first three hold each cell's mean colour × 4) and the
networks work on an 8×8 grid, cheap on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SHAPE = (3, 32, 32)
CELL = 4
LATENT_SHAPE = (3 * CELL * CELL, 32 // CELL, 32 // CELL)
LATENT_SPACE = "demo-dct4"

# Full-saturation colours in 0..1 RGB; only their chroma (colour minus its own mean) is used, so a colour never
# changes an image's brightness.
PALETTE = {
    "red": (1.0, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (1.0, 0.95, 0.1),
    "green": (0.1, 0.9, 0.2),
    "cyan": (0.1, 0.9, 0.95),
    "blue": (0.15, 0.25, 1.0),
    "purple": (0.6, 0.1, 0.9),
    "pink": (1.0, 0.4, 0.7),
    "grey": (0.5, 0.5, 0.5),
}
COLOURS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle", "ring")
BRIGHTNESS_WORDS = ("dark", "bright")
# Every word a caption can hold; the text encoder's vocabulary (extra words for prompts users may type).
VOCABULARY = ("a", "an", "on", "background", "image", "of", "black", "white", "light", "very", "and", "with",
              *BRIGHTNESS_WORDS, *COLOURS, *SHAPES)

BRIGHTNESS_RANGE = 0.95      # background brightness L in −0.95..0.95
NO_BRIGHTNESS_WORD = 0.2     # share of captions without "dark"/"bright"
CHROMA = 0.55                # colour strength, reduced near black and white so no pixel clips
TEXTURE = 0.05               # amplitude of the zero-mean gradient
GRAIN = 0.02                 # per-pixel noise


@dataclass
class Batch:
    """Images [n, 3, 32, 32] in −1..1 (float32), captions, background colour names, brightness (mean pixel value)."""

    images: np.ndarray
    captions: list[str]
    backgrounds: list[str]
    brightness: np.ndarray


def _chroma(name: str) -> np.ndarray:
    rgb = np.asarray(PALETTE[name], dtype=np.float64)
    return 2.0 * (rgb - rgb.mean())


def _flat_colour(level: float, name: str, strength: float) -> np.ndarray:
    """An RGB colour of mean ``level`` and hue ``name``, its chroma shrunk near black and white so nothing clips."""
    chroma = _chroma(name)
    peak = float(np.abs(chroma).max()) or 1.0
    strength = min(strength, (1.0 - abs(level)) / peak)
    return level + strength * chroma


def _shape_mask(kind: str, size: float, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    """A soft-edged (one pixel) mask in 0..1 of a shape of half-size ``size`` pixels centred at (cx, cy)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    if kind == "square":
        inside = size - np.maximum(np.abs(dx), np.abs(dy))
    elif kind == "circle":
        inside = size - np.hypot(dx, dy)
    elif kind == "ring":
        inside = 0.3 * size - np.abs(np.hypot(dx, dy) - 0.7 * size)
    else:  # triangle pointing up: above its base and inside both slanted sides
        inside = np.minimum(size - dy, 0.9 * ((dy + size) / 2.0 - np.abs(dx)))
    return np.clip(inside + 0.5, 0.0, 1.0)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _caption(rng: np.random.Generator, shape: str, shape_colour: str, background: str, word: str) -> str:
    """One of three caption forms: full (60 %), without the shape's colour (20 %), a short phrase (20 %)."""
    background_words = f"{word} {background}".strip()
    on_background = f"on {_article(background_words)} {background_words} background"
    form = rng.random()
    if form < 0.6:
        return f"{_article(shape_colour)} {shape_colour} {shape} {on_background}"
    if form < 0.8:
        return f"a {shape} {on_background}"
    short = [background_words, background] + ([word] if word else [])
    return short[int(rng.integers(len(short)))]


def draw_image(rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """One image of the world, its caption and its background colour's name."""
    channels, height, width = IMAGE_SHAPE
    # |u|^0.7 puts more images near black and white than a uniform draw would.
    u = rng.uniform(-1.0, 1.0)
    level = BRIGHTNESS_RANGE * np.sign(u) * abs(u) ** 0.7
    background = COLOURS[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    shape_colour = COLOURS[int(rng.integers(len(COLOURS)))]
    # The shape is a contrasting shade: lighter on dark backgrounds, darker on bright ones.
    shape_level = float(np.clip(level - np.sign(level or 1.0) * rng.uniform(0.3, 0.7), -0.95, 0.95))
    image = np.empty(IMAGE_SHAPE)
    image[:] = _flat_colour(level, background, CHROMA * rng.uniform(0.5, 1.0))[:, None, None]
    size = rng.uniform(5.0, 9.0)
    cx, cy = rng.uniform(size, width - size), rng.uniform(size, height - size)
    mask = _shape_mask(shape, size, cx, cy, height, width)
    shape_rgb = _flat_colour(shape_level, shape_colour, CHROMA * rng.uniform(0.5, 1.0))[:, None, None]
    image = image * (1.0 - mask) + shape_rgb * mask
    y, x = np.mgrid[0:height, 0:width] / (height - 1) - 0.5
    gradient = TEXTURE * (rng.normal() * x + rng.normal() * y)
    image = np.clip(image + gradient + GRAIN * rng.standard_normal(IMAGE_SHAPE), -1.0, 1.0)
    mean = float(image.mean())
    word = "" if rng.random() < NO_BRIGHTNESS_WORD else ("dark" if mean < 0 else "bright")
    return image.astype(np.float32), _caption(rng, shape, shape_colour, background, word), background


def draw_batch(count: int, seed: int) -> Batch:
    """``count`` images and captions, the same for the same seed on every machine (numpy's PCG64)."""
    if count < 1:
        raise ValueError(f"draw at least one image, not {count}")
    rng = np.random.default_rng(seed)
    images, captions, backgrounds = zip(*(draw_image(rng) for _ in range(count)), strict=True)
    stacked = np.stack(images)
    return Batch(stacked, list(captions), list(backgrounds), stacked.reshape(count, -1).mean(axis=1))


def caption_has(caption: str, word: str) -> bool:
    """Whether ``word`` is one of the caption's words."""
    return word in caption.split()


def _cell_dct() -> torch.Tensor:
    """The orthonormal 2-D DCT-II of a 4×4 cell as a 16×16 matrix acting on the cell's pixels in row-major order."""
    n = torch.arange(CELL, dtype=torch.float64)
    basis = torch.cos(torch.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * CELL))
    basis *= torch.where(n == 0, (1 / CELL) ** 0.5, (2 / CELL) ** 0.5)[:, None]
    return torch.kron(basis, basis).float()


CELL_DCT = _cell_dct()


def encode_latents(images: torch.Tensor) -> torch.Tensor:
    """The demo's "VAE" encoder: pixels [n, 3, 32, 32] -> latents [n, 48, 8, 8], the DCT of each 4×4 cell."""
    count, _, height, width = images.shape
    cells = F.pixel_unshuffle(images, CELL).reshape(count, 3, CELL * CELL, height // CELL, width // CELL)
    coefficients = torch.einsum("kp,ncphw->nkchw", CELL_DCT.to(images), cells)
    return coefficients.reshape(count, 3 * CELL * CELL, height // CELL, width // CELL)


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """The demo's "VAE" decoder: latents [n, 48, 8, 8] -> pixels [n, 3, 32, 32] (the inverse, exact to rounding)."""
    count, _, height, width = latents.shape
    coefficients = latents.reshape(count, CELL * CELL, 3, height, width)
    cells = torch.einsum("kp,nkchw->ncphw", CELL_DCT.to(latents), coefficients)
    return F.pixel_shuffle(cells.reshape(count, 3 * CELL * CELL, height, width), CELL)
