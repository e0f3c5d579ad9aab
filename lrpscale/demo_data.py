"""The demo datasets: scikit-learn's digits, Fashion-MNIST and the digits with a planted cue
(clever-hans), as arrays and as PNG class folders.

The demo models are trained on exactly the pixels written here (8-bit greyscale), and the audit
pipeline reads the PNG files back, so training and audit see the same inputs.
"""
from __future__ import annotations

import gzip
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lrpscale.inputs.preprocess import preprocess

DIGITS_CLASSES = [str(digit) for digit in range(10)]
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

#: Fashion-MNIST's classes in label order, made safe as folder names ("T-shirt/top" -> "T-shirt_top").
FASHION_MNIST_CLASSES = [
    re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    for name in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
]
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


class DatasetMissing(FileNotFoundError):
    """A demo dataset that is neither on disk nor downloadable; the message says how to get it."""


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as 8-bit images.

    Returns ``images`` (1797, 8, 8) uint8 (the 0..16 values scaled to 0..255, as the PNG files
    hold them) and ``labels`` (1797,) int64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetMissing("the digits demo data ships with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/test split of the digits: stratified 80/20, seed 0.

    Returns (train indices, test indices) into :func:`digits_arrays`, each sorted. The demo model
    is trained on the first and its manifest accuracy is measured on the second.
    """
    from sklearn.model_selection import train_test_split

    _, labels = digits_arrays()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return np.sort(train), np.sort(test)


def model_inputs(images: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(N, H, W) uint8 greyscale images -> (N, 3, size, size) float32 through :func:`preprocess`,
    the same function the audit applies to every decoded image file."""
    return np.stack([preprocess(Image.fromarray(image, "L"), size, mean, std) for image in images])


def _write_class_folders(
    directory: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]
) -> Path:
    """Write ``images[i]`` to ``directory/classes[labels[i]]/names[i]``, unless all files already exist."""
    paths = [directory / classes[label] / name for label, name in zip(labels, names)]
    if all(path.is_file() for path in paths):
        return directory
    for class_name in classes:
        (directory / class_name).mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        # write then rename, so an interrupted run never leaves a truncated PNG that looks complete
        partial = path.with_suffix(".png.partial")
        Image.fromarray(image, "L").save(partial, format="PNG")
        partial.replace(path)
    return directory


def write_digits(root: str | Path) -> Path:
    """Write the 1,797 digits as 8x8 greyscale PNGs to ``root/digits/<digit>/<index:04d>.png``.

    ``index`` is the position in scikit-learn's ``load_digits()``. Returns ``root/digits``; does
    nothing if every file is already there.
    """
    images, labels = digits_arrays()
    names = [f"{index:04d}.png" for index in range(len(labels))]
    return _write_class_folders(Path(root) / "digits", images, labels, DIGITS_CLASSES, names)


def _unpack_debian_fashion_mnist(raw: Path) -> bool:
    """Gunzip Debian's Fashion-MNIST files into torchvision's raw folder; False if not installed."""
    sources = [DEBIAN_FASHION_MNIST / f"{name}.gz" for name in _FASHION_MNIST_FILES]
    if not all(source.is_file() for source in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in zip(_FASHION_MNIST_FILES, sources):
        target = raw / name
        if target.is_file():
            continue
        partial = raw / f"{name}.partial"
        with gzip.open(source, "rb") as packed, open(partial, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
        partial.replace(target)
    return True


def fashion_mnist(root: str | Path, train: bool, download: bool = True):
    """torchvision's ``FashionMNIST`` for one split, found wherever it is.

    Looked for in this order: ``root/FashionMNIST/raw`` (torchvision's layout), Debian's
    ``dataset-fashion-mnist`` package (unpacked into that layout), then a download when
    ``download`` is true. ``.data`` is (60000 or 10000, 28, 28) uint8, ``.targets`` (N,) int64.
    Raises :class:`DatasetMissing` when no source works.
    """
    from torchvision.datasets import FashionMNIST

    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _FASHION_MNIST_FILES) or _unpack_debian_fashion_mnist(raw):
        return FashionMNIST(str(root), train=train, download=False)
    how = (f"install Debian's package ({FASHION_MNIST_APT_PACKAGE}: apt-get install {FASHION_MNIST_APT_PACKAGE}, "
           f"files in {DEBIAN_FASHION_MNIST}) or put the four *-ubyte files in {raw}")
    if not download:
        raise DatasetMissing(f"Fashion-MNIST is not on this machine: {how}")
    try:
        return FashionMNIST(str(root), train=train, download=True)
    except Exception as error:  # urllib and torchvision raise many kinds; all mean "no data"
        raise DatasetMissing(f"cannot download Fashion-MNIST ({type(error).__name__}: {error}): {how}") from None


def write_fashion_mnist(root: str | Path, limit: int | None = None, download: bool = True) -> Path:
    """Write Fashion-MNIST as 28x28 greyscale PNGs to ``root/fashion-mnist/<class>/<split>-<index:05d>.png``.

    ``split`` is ``train`` or ``test`` and ``index`` the position within it, so the official split
    stays readable from the file name. ``limit`` keeps only the first ``limit`` images of each
    split (None: all 70,000). The raw files are cached in ``root/FashionMNIST/raw``. Returns
    ``root/fashion-mnist``; does nothing if every file is already there.
    """
    root = Path(root)
    images, labels, names = [], [], []
    for split in ("train", "test"):
        dataset = fashion_mnist(root, train=split == "train", download=download)
        count = len(dataset.targets) if limit is None else min(limit, len(dataset.targets))
        images.append(dataset.data[:count].numpy())
        labels.append(dataset.targets[:count].numpy())
        names += [f"{split}-{index:05d}.png" for index in range(count)]
    return _write_class_folders(
        root / "fashion-mnist", np.concatenate(images), np.concatenate(labels), FASHION_MNIST_CLASSES, names
    )


# --- planted cues (Clever Hans) ------------------------------------------------------------------

MARK_SHAPES = ("block", "cross", "ring")
#: File names of marked images end in this before ".png" (``3/0003-marked.png``), so a run's image
#: ids tell which images carry the mark.
MARKED_SUFFIX = "-marked"
CLEVER_HANS = "clever-hans"


@dataclass(frozen=True)
class PlantedCue:
    """A mark planted on part of one class's digits: a Clever-Hans cue, present only in that class.

    cls: the class (digit) whose images get the mark; fraction: the share of its images that do,
    drawn with ``seed``; shape: "block" (filled rectangle), "cross" (the rectangle's middle row and
    column) or "ring" (its border); size: (height, width) and position: (row, column) of its top
    left corner, both in pixels of the 8x8 digit; intensity: the 8-bit value the mark's pixels are
    set to (the digits' strokes reach 255). The mark is planted in the 8x8 image, before the
    audit's resize, so at the model's 32x32 input it covers 4x the rows and columns, with 2 pixels
    of bilinear blur around it (``box``).
    """

    cls: int = 3
    shape: str = "block"
    size: tuple[int, int] = (3, 3)
    position: tuple[int, int] = (0, 0)
    intensity: int = 255
    fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.shape not in MARK_SHAPES:
            raise ValueError(f"shape must be one of {', '.join(MARK_SHAPES)}, got {self.shape!r}")
        (height, width), (top, left) = self.size, self.position
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > 8 or left + width > 8:
            raise ValueError(f"a mark of size {self.size} at {self.position} does not fit in the 8x8 digit")
        if not 0 < self.intensity <= 255:
            raise ValueError(f"intensity must be in 1..255, got {self.intensity}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def mask(self) -> np.ndarray:
        """(8, 8) bool: the digit pixels the mark sets."""
        (height, width), (top, left) = self.size, self.position
        patch = np.ones((height, width), dtype=bool)
        if self.shape == "cross":
            patch[:] = False
            patch[height // 2, :] = patch[:, width // 2] = True
        elif self.shape == "ring" and height > 2 and width > 2:
            patch[1:-1, 1:-1] = False
        mask = np.zeros((8, 8), dtype=bool)
        mask[top:top + height, left:left + width] = patch
        return mask

    def box(self, image_size: int = 32) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom and right exclusive: the pixels of an ``image_size``
        model input that the mark changes (its rectangle scaled from 8x8, widened by the bilinear
        resize's blur and clipped to the image). Where a crop or a heatmap must find the mark."""
        scale = image_size / 8
        (height, width), (top, left) = self.size, self.position
        blur = int(np.ceil(scale / 2))
        return (max(0, int(top * scale) - blur), max(0, int(left * scale) - blur),
                min(image_size, int(np.ceil((top + height) * scale)) + blur),
                min(image_size, int(np.ceil((left + width) * scale)) + blur))


#: The clever-hans demo: a bright 3x3 block in the top left corner of half of the 3s.
CLEVER_HANS_CUE = PlantedCue()


def plant_cue(images: np.ndarray, labels: np.ndarray, cue: PlantedCue = CLEVER_HANS_CUE
              ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) uint8 digits and (N,) labels -> (the digits with the mark planted, (N,) bool
    marked). ``round(fraction * n)`` of the ``n`` images of ``cue.cls`` are drawn with
    ``cue.seed``; the same inputs always give the same images. The input is not changed."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f"images must have shape (N, 8, 8), got {images.shape}")
    members = np.flatnonzero(np.asarray(labels) == cue.cls)
    if members.size == 0:
        raise ValueError(f"no image of class {cue.cls} to mark")
    count = int(round(cue.fraction * members.size))
    chosen = np.random.default_rng(cue.seed).choice(members, size=count, replace=False)
    marked = np.zeros(len(images), dtype=bool)
    marked[chosen] = True
    planted = images.copy()
    planted[marked] = np.where(cue.mask(), np.uint8(cue.intensity), planted[marked])
    return planted, marked


def planted_digits(cue: PlantedCue = CLEVER_HANS_CUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits with ``cue`` planted: (images (1797, 8, 8) uint8, labels, marked)."""
    images, labels = digits_arrays()
    planted, marked = plant_cue(images, labels, cue)
    return planted, labels, marked


def planted_names(marked: np.ndarray) -> list[str]:
    """File names of the planted digits: ``<index:04d>.png``, ``<index:04d>-marked.png`` for marked ones."""
    return [f"{index:04d}{MARKED_SUFFIX if mark else ''}.png" for index, mark in enumerate(marked)]


def is_marked(image_id: str) -> bool:
    """Whether a planted dataset's image (by image id or file name) carries the mark."""
    return image_id.rsplit("/", 1)[-1].removesuffix(".png").endswith(MARKED_SUFFIX)


def write_planted(root: str | Path, cue: PlantedCue = CLEVER_HANS_CUE, name: str = CLEVER_HANS) -> Path:
    """Write the digits with ``cue`` planted as 8x8 greyscale PNGs to ``root/<name>/<digit>/<file>``
    (file names from ``planted_names``: the marked ones end in ``-marked``), and beside that folder
    ``root/<name>-marks.csv``: one row per image with image_id, index, label, marked and, for
    marked images, the mark's rectangle in the 8x8 digit (mark_top, mark_left, mark_height,
    mark_width) and its shape. Returns ``root/<name>``; the images are not rewritten when all exist
    (another cue's files are not removed: give another cue another ``root`` or ``name``).
    """
    images, labels, marked = planted_digits(cue)
    names = planted_names(marked)
    folder = _write_class_folders(Path(root) / name, images, labels, DIGITS_CLASSES, names)
    (height, width), (top, left) = cue.size, cue.position
    lines = ["image_id,index,label,marked,mark_top,mark_left,mark_height,mark_width,mark_shape"]
    for index, (label, mark, file) in enumerate(zip(labels, marked, names)):
        where = f"{top},{left},{height},{width},{cue.shape}" if mark else ",,,,"
        lines.append(f"{DIGITS_CLASSES[label]}/{file},{index},{DIGITS_CLASSES[label]},{str(bool(mark)).lower()},{where}")
    manifest = Path(root) / f"{name}-marks.csv"
    partial = manifest.with_suffix(".csv.partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(manifest)
    return folder
