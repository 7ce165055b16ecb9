"""The images of a study: checked when the study is created, re-encoded to one format and size.

Why: annotators must not be able to tell which method made an image from anything but its pixels, and
the app must never serve a file that is not an image. So when pairs are registered every image is

1. resolved (symlinks included) and required to lie inside one of the directories named on the command
   line (the eval runs, and the reference images' folder);
2. required to start with a PNG, JPEG or WebP signature and to decode completely with PIL (restricted
   to that format, so that no other PIL plugin ever parses the file);
3. re-encoded: EXIF orientation applied, colour profile converted to sRGB, alpha flattened on white,
   resized and padded to ``size`` x ``size`` (LANCZOS), saved as PNG with no metadata.

The PNG bytes are a function of the decoded pixels and ``size`` only: no file date, name, format, size or
metadata of the original survives. The app serves them from the study database as ``image/png``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageCms, ImageOps

DEFAULT_IMAGE_SIZE = 512
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048
# Far above any generator's output (FLUX: 1-4 MP); refused before decoding, against decompression bombs.
MAX_SOURCE_PIXELS = 50_000_000
SERVED_MEDIA_TYPE = "image/png"
_SIGNATURES = (
    ("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
    ("JPEG", lambda head: head.startswith(b"\xff\xd8\xff")),
    ("WEBP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
)


class ImageError(ValueError):
    """An image cannot be part of a study; the message names the file and says why."""

    def __init__(self, message: str, path: str | Path) -> None:
        super().__init__(message)
        self.path = str(path)


def raster_format(head: bytes) -> str | None:
    """PIL's name of the format whose signature starts ``head`` (PNG, JPEG, WEBP), else None."""
    return next((name for name, matches in _SIGNATURES if matches(head)), None)


def resolve_inside(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """``path`` with symlinks resolved, if that lies inside one of ``roots`` (also resolved)."""
    given = Path(path)
    try:
        resolved = given.resolve(strict=True)
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise ImageError(f"image {given} cannot be opened: {error}.", given) from None
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        via = f" (a link to {resolved})" if resolved != given.absolute() else ""
        named = ", ".join(str(root) for root in roots) or "none"
        raise ImageError(
            f"image {given}{via} is outside the eval runs named on the command line ({named}).", given
        )
    return resolved


def open_raster(path: Path) -> Image.Image:
    """Decode ``path`` completely, as the format its signature names; the image is loaded, the file closed."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise ImageError(f"image {path} cannot be read: {error.strerror or error}.", path) from None
    kind = raster_format(head)
    if kind is None:
        raise ImageError(f"{path} is not a PNG, JPEG or WebP image (by its first bytes).", path)
    try:
        with Image.open(path, formats=[kind]) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                raise ImageError(
                    f"image {path} has {image.width}x{image.height} pixels, over {MAX_SOURCE_PIXELS:,}.", path
                )
            image.load()  # decodes every pixel: a truncated or corrupt file fails here
            return image.copy()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"image {path} does not decode as {kind}: {error}.", path) from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    """Convert to sRGB with the embedded colour profile, so that dropping the profile keeps the colours."""
    mode = "RGBA" if _has_alpha(image) else "RGB"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if image.mode not in ("RGB", "RGBA", "CMYK", "L"):
            image = image.convert(mode)
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # an unusable profile: keep the pixels as they are, as a browser would


def normalise(image: Image.Image, size: int) -> bytes:
    """PNG bytes of ``image`` upright, in sRGB RGB, fitted and padded to ``size`` x ``size``, no metadata."""
    icc_profile = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if icc_profile:
        image = _to_srgb(image, icc_profile)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(flat, rgba)
    rgb = image.convert("RGB")
    fitted = ImageOps.pad(rgb, (size, size), method=Image.Resampling.LANCZOS, color=(255, 255, 255))
    out = io.BytesIO()
    # A fresh image carries no info, so save() writes no text, EXIF, ICC or time chunk.
    fitted.save(out, format="PNG", compress_level=6)
    return out.getvalue()


@dataclass(frozen=True)
class ImagePolicy:
    """Where a study's images may come from (``roots``) and the one size they are served at."""

    roots: tuple[Path, ...]
    size: int = DEFAULT_IMAGE_SIZE

    def __post_init__(self) -> None:
        if not MIN_IMAGE_SIZE <= self.size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image size {self.size} must be {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} pixels.")

    def check(self, path: str | Path) -> Path:
        """Raise ``ImageError`` unless ``path`` is a decodable raster image inside the roots."""
        resolved = resolve_inside(path, self.roots)
        open_raster(resolved).close()
        return resolved

    def encode(self, path: str | Path) -> bytes:
        """The bytes served for ``path``: checked, then re-encoded (see the module docstring)."""
        image = open_raster(resolve_inside(path, self.roots))
        try:
            return normalise(image, self.size)
        finally:
            image.close()
