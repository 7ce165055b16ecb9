"""Small image helpers (PIL/torch; torchvision is not usable beside torch 2.13 here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cgrpo.io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    return (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )


def grid(columns: Sequence[torch.Tensor], scale: int = 4, pad: int = 2, background: int = 255) -> Image.Image:
    """One row per sample, one column per tensor: each tensor ``[N, 3, H, W]`` in [0, 1], same N, H, W."""
    arrays = [to_uint8(c) for c in columns]
    n, h, w, _ = arrays[0].shape
    cell_h, cell_w = h * scale, w * scale
    canvas = np.full((n * (cell_h + pad) + pad, len(arrays) * (cell_w + pad) + pad, 3), background, np.uint8)
    for col, array in enumerate(arrays):
        for row in range(n):
            tile = array[row].repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + row * (cell_h + pad), pad + col * (cell_w + pad)
            canvas[y : y + cell_h, x : x + cell_w] = tile
    return Image.fromarray(canvas)


def save_png(image: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
