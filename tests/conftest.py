"""Shared fixtures: random-weight VGG models saved to files and loaded the way users load weights."""
from __future__ import annotations

import pytest
import torch

from lrpscale.models import build_vgg, load_model


def randomize_batchnorm(model: torch.nn.Module, eps: float = 0.0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised.

    eps = 0 because zennit's canonizer leaves the BatchNorm computing x / sqrt(1 + eps) after
    merging; with eps = 0 that is exactly the identity and both sides compute the same function.
    """
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_((torch.rand(c, generator=generator) - 0.5) * 0.4)
            module.eps = eps
    return model


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """Write random weights for a model name and seed to a file; returns the path."""
    root = tmp_path_factory.mktemp("weights")

    def write(name: str, seed: int = 0, num_classes: int = 1000):
        path = root / f"{name}-{seed}-{num_classes}.pth"
        if not path.exists():
            torch.manual_seed(seed)
            model = randomize_batchnorm(build_vgg(name, num_classes)) if name.endswith("_bn") else build_vgg(
                name, num_classes)
            torch.save(model.state_dict(), path)
        return path

    return write


@pytest.fixture(scope="session")
def vgg16(weights_file):
    return load_model("vgg16", weights_file("vgg16"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: 6 logical CPUs (a resume with an actor stage
    hangs with 2), a small object store, no dashboard; shut down at the end."""
    import ray
    from ray.data import DataContext

    from lrpscale.pipeline import ensure_ray

    ensure_ray(num_cpus=6, object_store_memory=256 * 1024 ** 2)
    context = DataContext.get_current()
    context.target_max_block_size = 4 * 1024 ** 2
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A narrow random VGG11 for 32 px images, 10 classes: cheap enough for pipeline tests."""
    path = tmp_path_factory.mktemp("tiny") / "vgg11-tiny.pth"
    torch.manual_seed(0)
    torch.save(build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """120 of scikit-learn's digits as PNG files in class folders."""
    from digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, range(120))
    return root


DEMO_RUN_IMAGES = 200  # the first 200 digits of the demo model's test split, about 20 per class
DEMO_RUN_BAD = {"0/empty.png": b"", "1/text.png": b"this is not an image"}


def build_demo_runs(root):
    """Two audits of the same digits with the bundled demo model, each reduced (tables only).

    ``root/images``: the first ``DEMO_RUN_IMAGES`` digits the demo model was not trained on (so
    some are misclassified) as PNG files in class folders, plus the ``DEMO_RUN_BAD`` files (an
    empty file and a text file named .png, which become error rows);
    ``root/run``: composite epsilon-gamma-box (the default); ``root/run-plus-flat``:
    epsilon-plus-flat. Needs a running Ray. Returns {"images", "run", "other"} as paths.
    """
    from pathlib import Path

    from PIL import Image

    from lrpscale.analyze import AnalysisConfig
    from lrpscale.demo_data import digits_arrays, digits_split
    from lrpscale.pipeline import RunConfig, run_audit
    from lrpscale.reduce import reduce_run

    root = Path(root)
    images, labels = digits_arrays()
    folder = root / "images"
    for index in digits_split()[1][:DEMO_RUN_IMAGES]:
        (folder / str(labels[index])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], "L").save(folder / str(labels[index]) / f"{index:04d}.png")
    for name, content in DEMO_RUN_BAD.items():
        (folder / name).write_bytes(content)
    runs = {"images": folder}
    for key, name, composite in (("run", "run", "epsilon-gamma-box"), ("other", "run-plus-flat", "epsilon-plus-flat")):
        output = root / name
        run_audit(RunConfig(input=str(folder), output=str(output), weights="demo", batch_size=32, shard_size=64,
                            analysis=AnalysisConfig(composite=composite)), progress=False)
        reduce_run(output, pictures=False)
        runs[key] = output
    return runs


@pytest.fixture(scope="session")
def demo_runs(ray_session, tmp_path_factory):
    """The runs of ``build_demo_runs``, once per test session: {"images", "run", "other"} paths.
    Tests must not change them (copy a run to alter it)."""
    return build_demo_runs(tmp_path_factory.mktemp("demo-runs"))
