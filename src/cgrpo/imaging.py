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


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, size, size]``: centre crop to a square, then a bicubic (antialiased) resize."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[:, top : top + side, left : left + side]
    if side == size:
        return image.clone()
    resized = torch.nn.functional.interpolate(
        image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].clamp(0.0, 1.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> an RGB PIL image (8-bit; lossless for images read from 8-bit files)."""
    return Image.fromarray(to_uint8(image[None])[0])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def uno_preprocess_ref(image: Image.Image, long_size: int, multiple: int = 16) -> Image.Image:
    """UNO's ``preprocess_ref`` (``uno/flux/pipeline.py`` of bytedance/UNO): scale so the long side is
    ``long_size`` keeping the aspect ratio (LANCZOS; the short side truncated by ``int``), then centre-crop
    each side down to a multiple of ``multiple`` (16 in UNO: VAE /8, then 2x2 patches)."""
    width, height = image.size
    if width >= height:
        new_w, new_h = long_size, int(long_size / width * height)
    else:
        new_w, new_h = int(long_size / height * width), long_size
    image = image.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    target_w, target_h = new_w // multiple * multiple, new_h // multiple * multiple
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h)).convert("RGB")
