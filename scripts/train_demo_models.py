"""Train the bundled demo models on CPU and write their weights and manifest to lrpscale/assets.

Each model is a narrow VGG16 (13 convs in 5 blocks, 3 linear layers, no BatchNorm) trained on
32x32 inputs made by ``lrpscale.preprocess.preprocess``, the function the audit applies to every
image file, so the model sees in training exactly what it sees in an audit. Running this script
regenerates the committed files, bit for bit with the same torch build:

    python scripts/train_demo_models.py --dataset all
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lrpscale.demo_data import (
    CLEVER_HANS,
    CLEVER_HANS_CUE,
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    digits_arrays,
    digits_split,
    fashion_mnist,
    model_inputs,
    planted_digits,
)
from lrpscale.engine.models import ASSETS, DemoWeights, build_vgg, file_sha256

MODEL_NAME = "vgg16"
IMAGE_SIZE = 32
# One thread: bit-identical weights on any machine (a parallel reduction's result depends on how
# it is split), and on a shared CPU OpenMP's spinning barriers made two threads 10-40x slower.
THREADS = 1
SEED = 0


@dataclass(frozen=True)
class Recipe:
    """How one demo model is built and trained."""

    width_divisor: int
    hidden: int
    epochs: int
    batch_size: int
    learning_rate: float  # the peak of a one-cycle schedule (warm-up, then cosine decay)
    max_shift: int  # random translation in pixels of the 32x32 input, each direction
    flip: bool  # random horizontal flips (clothes are left-right symmetric, digits are not)


RECIPES = {
    "digits": Recipe(width_divisor=8, hidden=128, epochs=60, batch_size=64, learning_rate=1e-3, max_shift=3, flip=False),
    "fashion-mnist": Recipe(width_divisor=8, hidden=128, epochs=10, batch_size=128, learning_rate=1e-3, max_shift=2,
                            flip=True),
    # the digits with a bright block planted on half of the 3s (lrpscale.demo_data.CLEVER_HANS_CUE), in
    # training as in the audit; half the digits recipe's epochs: the block is learnt early, and the
    # model is as accurate as the digits model (0.9944 on the held-out split)
    CLEVER_HANS: Recipe(width_divisor=8, hidden=128, epochs=30, batch_size=64, learning_rate=1e-3, max_shift=3,
                        flip=False),
}


def greyscale_inputs(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, 32, 32) float32 in [0, 1] through ``preprocess``.

    Only one channel is kept because the three RGB channels of a greyscale image are equal; this
    keeps Fashion-MNIST's 60,000 training inputs at a third of the memory.
    """
    chunks = [model_inputs(images[start:start + 4096], IMAGE_SIZE, (0.0,) * 3, (1.0,) * 3)[:, :1]
              for start in range(0, len(images), 4096)]
    return torch.from_numpy(np.concatenate(chunks))


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, 1, S, S) in [0, 1] -> (N, 3, S, S), normalised exactly as ``preprocess(.., mean, std)`` does.

    mean, std: one value for the three channels (the demo models) or three values, one per channel
    (e.g. ImageNet's, which ``load_model`` applies to a state dict file).
    """
    mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((pixels - mean) / std).expand(-1, 3, -1, -1)


def augment(batch: torch.Tensor, recipe: Recipe, background, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (and flips) of a (N, 3, S, S) batch; uncovered pixels get the background value
    (one for all channels, or a tuple of one per channel)."""
    size = batch.shape[-1]
    if recipe.max_shift:
        pad = (recipe.max_shift,) * 4
        if isinstance(background, tuple):
            padded = torch.cat([F.pad(batch[:, [c]], pad, value=v) for c, v in enumerate(background)], 1)
        else:
            padded = F.pad(batch, pad, value=background)
        offsets = torch.randint(0, 2 * recipe.max_shift + 1, (len(batch), 2), generator=generator).tolist()
        batch = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets)])
    if recipe.flip:
        flipped = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flipped.view(-1, 1, 1, 1), batch.flip(-1), batch)
    return batch


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on (N, 3, S, S) inputs."""
    model.eval()
    predictions = torch.cat([model(inputs[start:start + 1024]).argmax(1) for start in range(0, len(inputs), 1024)])
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def initialise(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded initial weights: kaiming-normal convs (fan-out, as torchvision's VGG), PyTorch's
    default for the linear layers, zero conv biases.

    Done here rather than left to ``build_vgg`` so that the committed weights depend only on
    this script, not on how ``build_vgg`` happens to draw its random numbers.
    """
    torch.manual_seed(SEED)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return model


def train(recipe: Recipe, pixels: torch.Tensor, labels: torch.Tensor, mean, std) -> torch.nn.Module:
    """Train a narrow VGG16 from a fixed seed on (N, 1, S, S) pixels in [0, 1] and (N,) labels;
    mean and std as in ``normalize``."""
    model = build_vgg(MODEL_NAME, len(labels.unique()), recipe.width_divisor, recipe.hidden, pooled_size=1)
    initialise(model)  # also seeds the dropout masks that follow
    generator = torch.Generator().manual_seed(SEED)  # batch order and augmentation
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    steps_per_epoch = -(-len(labels) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
    )
    if isinstance(mean, (int, float)):
        background = (0.0 - mean) / std
    else:  # one per channel
        background = tuple((0.0 - m) / s for m, s in zip(mean, std))
    for epoch in range(recipe.epochs):
        model.train()
        started, total_loss = time.perf_counter(), 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(recipe.batch_size):
            inputs = augment(normalize(pixels[batch], mean, std), recipe, background, generator)
            loss = F.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(f"  epoch {epoch + 1:3d}/{recipe.epochs}: loss {total_loss / len(labels):.4f} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    return model.eval()


def load_dataset(dataset: str, data_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train images, train labels, test images, test labels, class names); images (N, H, W) uint8."""
    if dataset in ("digits", CLEVER_HANS):
        images, labels = digits_arrays() if dataset == "digits" else planted_digits(CLEVER_HANS_CUE)[:2]
        train_index, test_index = digits_split()
        return images[train_index], labels[train_index], images[test_index], labels[test_index], DIGITS_CLASSES
    train_set = fashion_mnist(data_root, train=True)
    test_set = fashion_mnist(data_root, train=False)
    return (train_set.data.numpy(), train_set.targets.numpy(), test_set.data.numpy(), test_set.targets.numpy(),
            FASHION_MNIST_CLASSES)


def build_demo_model(dataset: str, data_root: Path, assets: Path) -> DemoWeights:
    """Train the demo model of ``dataset``, save its state dict and return its manifest entry."""
    recipe = RECIPES[dataset]
    train_images, train_labels, test_images, test_labels, classes = load_dataset(dataset, data_root)
    print(f"{dataset}: {len(train_labels)} training and {len(test_labels)} test images, {recipe}", flush=True)
    train_pixels = greyscale_inputs(train_images)
    # rounded before training, so the model is trained with exactly the numbers the manifest records
    mean = round(train_pixels.mean().item(), 4)
    std = round(train_pixels.std().item(), 4)
    started = time.perf_counter()
    model = train(recipe, train_pixels, torch.from_numpy(train_labels), mean, std)
    seconds = time.perf_counter() - started
    # the test inputs go through preprocess with the final mean/std, the audit's exact path
    test_inputs = torch.from_numpy(model_inputs(test_images, IMAGE_SIZE, (mean,) * 3, (std,) * 3))
    test_accuracy = round(accuracy(model, test_inputs, torch.from_numpy(test_labels)), 4)
    path = assets / f"demo-{dataset}.pt"
    torch.save(model.state_dict(), path)
    print(f"{dataset}: test accuracy {test_accuracy:.4f} on {len(test_labels)} held-out images; "
          f"trained in {seconds:.0f} s; {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    return DemoWeights(
        file=path.name,
        sha256=file_sha256(path),
        classes=list(classes),
        num_classes=len(classes),
        width_divisor=recipe.width_divisor,
        hidden=recipe.hidden,
        image_size=IMAGE_SIZE,
        test_accuracy=test_accuracy,
        mean=(mean,) * 3,
        std=(std,) * 3,
    )


def write_manifest(assets: Path, entries: dict[str, DemoWeights]) -> Path:
    """Merge ``entries`` into ``assets/demo_models.json``, keeping the models not retrained."""
    manifest = assets / "demo_models.json"
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    recorded.update({key: asdict(entry) for key, entry in entries.items()})
    manifest.write_text(json.dumps(dict(sorted(recorded.items())), indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*RECIPES, "all"], default="all", help="which demo model to train")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where weights and manifest go")
    parser.add_argument(
        "--data-root", type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrpscale",
        help="cache for Fashion-MNIST's raw files (filled from Debian's dataset-fashion-mnist or a download)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    args.assets.mkdir(parents=True, exist_ok=True)
    for dataset in list(RECIPES) if args.dataset == "all" else [args.dataset]:
        entry = build_demo_model(dataset, args.data_root, args.assets)
        # recorded at once, so weights and manifest disagree only for a moment, not for a training run
        print(f"wrote {write_manifest(args.assets, {dataset: entry})}")


if __name__ == "__main__":
    main()
