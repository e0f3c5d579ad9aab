"""Shared fixtures: random-weight VGG models saved to files and loaded the way users load weights."""
from __future__ import annotations

import pytest
import torch

from lrpscale.engine.models import build_vgg, load_model
from tests.helpers.demo_runs import build_demo_runs
from tests.helpers.models import randomize_batchnorm
from tests.helpers.s3 import s3_server  # noqa: F401  (a fixture: a real S3 endpoint on loopback)


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

    from lrpscale.run.session import ensure_ray

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
    from tests.helpers.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, range(120))
    return root


@pytest.fixture(scope="session")
def demo_runs(ray_session, tmp_path_factory):
    """The runs of ``build_demo_runs``, once per test session: {"images", "run", "other"} paths.
    Tests must not change them (copy a run to alter it)."""
    return build_demo_runs(tmp_path_factory.mktemp("demo-runs"))


@pytest.fixture
def child_run():
    """``start_child_audit`` (tests/helpers/audits.py) with clean-up: every child driver still
    running at the end of the test is killed, so a failing test leaves no driver behind."""
    import os
    import signal

    from tests.helpers.audits import start_child_audit

    children = []

    def start(output, source, weights, address: str):
        children.append(start_child_audit(source, output, weights, address))
        return children[-1]

    yield start
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
