"""Turning a decoded image into the model's input: as displayed (EXIF orientation), RGB, resize,
centre crop, normalise."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps


def as_displayed(image: Image.Image) -> Image.Image:
    """A PIL image -> the image as viewers show it: turned or mirrored by its EXIF Orientation tag
    (cameras store portrait photos sideways and set the tag), with the tag removed, so applying
    this twice changes nothing. Without a tag other than 1, the same image object comes back."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF: viewers cannot read the tag either and show the image as stored
        return image
    if orientation not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, I;16, P, RGBA, CMYK, ...) as 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bits by the type's range, not by clipping
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (3, size, size) uint8: turned as displayed (``as_displayed``), shorter side
    resized to ``size`` (bilinear), centre-cropped to a square. What crosses Ray's object store:
    a quarter of the bytes of the normalised float32 input (``normalise`` makes that)."""
    image = to_rgb(as_displayed(image))
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1)


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(..., 3, S, S) uint8 -> float32 scaled to [0, 1] and normalised per channel, in float32
    throughout (the actor does the same on its device, to the bit on a CPU)."""
    array = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    mean_ = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (array - mean_) / std_


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """PIL image -> (3, size, size) float32 model input: ``model_pixels`` then ``normalise``."""
    return normalise(model_pixels(image, size), mean, std)
