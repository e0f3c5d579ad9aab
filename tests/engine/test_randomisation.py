"""Randomisation tests (lrpscale.engine.randomisation) against independent references.

Spearman and the histogram entropy against scipy and numpy; ``randomised_copy`` against the
original weights and torchvision's initialisation; the cascade on the bundled demo model; eMPRT
against Quantus 0.6's EfficientMPRT fed the same explanations and Quantus's own randomised model.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from lrpscale.demo_data import digits_arrays, digits_split, model_inputs
from lrpscale.engine.models import build_vgg, demo_models, load_model
from lrpscale.engine.randomisation import (
    average_ranks,
    cascade,
    efficient_mprt,
    gradient,
    gradient_x_input,
    histogram_entropy,
    lrp,
    parameter_layers,
    randomised_copy,
    spearman,
)


@pytest.fixture(scope="module")
def demo():
    return load_model("vgg16", weights="demo")


@pytest.fixture(scope="module")
def narrow_vgg11():
    torch.manual_seed(0)
    return build_vgg("vgg11", num_classes=10, width_divisor=8, hidden=64, pooled_size=1).eval()


@functools.lru_cache(maxsize=4)
def _digits(count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, 32, 32) demo test-split digits, normalised for the demo model, and their labels."""
    images, labels = digits_arrays()
    chosen = digits_split()[1][start:start + count]
    spec = demo_models()["digits"]
    return torch.from_numpy(model_inputs(images[chosen], 32, spec.mean, spec.std)), torch.from_numpy(labels[chosen])


# 1. Statistics against scipy and numpy ---------------------------------------------------------

def test_average_ranks_and_spearman_equal_scipy():
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 6, size=(4, 60)).astype(np.float64)  # many ties
    smooth = rng.normal(size=(4, 60))
    for a, b in ((ties, smooth), (smooth, ties), (ties, ties[::-1].copy()), (smooth, smooth ** 3)):
        ranks = average_ranks(torch.from_numpy(a)).numpy()
        assert np.array_equal(ranks, np.stack([stats.rankdata(row) for row in a]))
        ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        theirs = np.array([stats.spearmanr(x, y).statistic for x, y in zip(a, b)])
        assert np.abs(ours - theirs).max() < 1e-12
    # images (N, H, W) are flattened per image; float32 in, float64 out
    a = torch.from_numpy(rng.normal(size=(2, 5, 7)).astype(np.float32))
    b = a + 0.5 * torch.from_numpy(rng.normal(size=(2, 5, 7)).astype(np.float32))
    expected = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic for i in range(2)]
    assert spearman(a, b).tolist() == pytest.approx(expected, abs=1e-12)
    assert spearman(a, a).tolist() == [1.0, 1.0]
    # a constant row has no rank correlation: NaN, as scipy says
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.spearmanr(np.ones(5), np.arange(5.0)).statistic)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None])).all()


def test_histogram_entropy_equals_numpy_and_scipy():
    rng = np.random.default_rng(1)
    rows = np.concatenate([
        rng.integers(0, 11, size=(2, 300)).astype(np.float64),  # many values exactly on bin edges
        np.abs(rng.normal(size=(2, 300))) ** 3,                # skewed, like |heatmaps|
        np.full((1, 300), 2.5),                                # constant: numpy's +-0.5 range
    ])
    for bins in (5, 10, 100):
        ours = histogram_entropy(torch.from_numpy(rows), bins).numpy()
        theirs = [stats.entropy(np.histogram(row, bins=bins)[0]) for row in rows]
        assert np.abs(ours - theirs).max() < 1e-12, bins
    assert histogram_entropy(torch.from_numpy(rows[-1:]), 100).item() == 0.0
    # uniform over 4 bins: log 4; scaled rows give the same entropy
    four = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 5])
    assert histogram_entropy(four, 4).item() == pytest.approx(math.log(4))
    assert histogram_entropy(7.0 * four, 4).item() == pytest.approx(math.log(4))


# 2. randomised_copy ------------------------------------------------------------------------------

def test_randomised_copy_changes_only_the_chosen_layers(narrow_vgg11):
    model = narrow_vgg11
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = ["features.3", "fc8"]  # a module name and an alias (classifier.6)
    result = randomised_copy(model, chosen, seed=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the original changed"
    changed = {k.rsplit(".", 1)[0] for k, v in result.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"features.3", "classifier.6"}
    assert result.features[3].weight.data_ptr() != model.features[3].weight.data_ptr()
    # reproducible; another seed gives other weights; a layer's weights do not depend on the others chosen
    again = randomised_copy(model, chosen, seed=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in result.state_dict().items())
    assert not torch.equal(randomised_copy(model, chosen, seed=5).features[3].weight, result.features[3].weight)
    assert torch.equal(randomised_copy(model, ["features.3"], seed=4).features[3].weight, result.features[3].weight)
    with pytest.raises(KeyError, match="features.1"):
        randomised_copy(model, ["features.1"])  # a ReLU has no weights
    nothing = randomised_copy(model, [])
    assert all(torch.equal(v, before[k]) for k, v in nothing.state_dict().items())


def test_randomised_weights_follow_torchvision_initialisation():
    torch.manual_seed(0)
    model = build_vgg("vgg11", num_classes=10, width_divisor=2, hidden=512, pooled_size=1).eval()
    result = randomised_copy(model, seed=0)
    assert parameter_layers(result) == [f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)] + [
        "classifier.0", "classifier.3", "classifier.6"]
    conv = result.features[16].weight  # 256 x 256 x 3 x 3: kaiming normal, fan_out = 256 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert abs(conv.mean().item()) < 0.05 * conv.std().item()
    linear = result.classifier[3].weight  # 512 x 512: N(0, 0.01)
    assert linear.std().item() == pytest.approx(0.01, rel=0.02)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in result.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_cascade_steps_are_randomised_copies(narrow_vgg11):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []

    def recording_gradient(model, inputs, target):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return gradient(model, inputs, target)

    steps = cascade(narrow_vgg11, x, 3, recording_gradient, seed=7)
    top_down = parameter_layers(narrow_vgg11)[::-1]
    assert [name for name, _ in steps] == top_down
    assert all(corr.shape == (2,) for _, corr in steps)
    for k in (1, 4, len(top_down)):  # seen[0] is the original model
        expected = randomised_copy(narrow_vgg11, top_down[:k], seed=7).state_dict()
        assert all(torch.equal(v, expected[name]) for name, v in seen[k].items()), k
    assert all(torch.equal(v, narrow_vgg11.state_dict()[name]) for name, v in seen[0].items())


# 3. The cascade on the demo model -----------------------------------------------------------------

# Measured, 8 test digits, seed 0 (mean |Spearman| of |colour sum| against the original):
#   plain gradient: 0.90 after fc8, 0.24 with every layer random (32 digits: 0.23; seeds 1, 2: 0.06, 0.20)
#   LRP epsilon-gamma-box: 1.00 after fc8, 0.69 with every layer random (32 digits: 0.67; seeds 1, 2:
#   0.40, 0.65). |LRP| keeps the digit's outline under random weights (z^B first layer, gamma rules
#   that favour positive contributions): the input dependence Binder et al. (CVPR 2023) describe.
#   The signed colour sums correlate as strongly, with the sign of the (random) target logit.

def test_step_zero_copy_correlates_exactly(demo):
    x, y = _digits(8)
    for explain in (lrp, gradient):
        original = explain(demo, x, y).sum(1).abs()
        copy_zero = explain(randomised_copy(demo, []), x, y).sum(1).abs()
        assert spearman(copy_zero, original).tolist() == pytest.approx([1.0] * 8, abs=1e-12)


def test_gradient_cascade_falls_toward_zero(demo):
    x, y = _digits(8)
    steps = cascade(demo, x, y, gradient)
    means = [float(corr.abs().mean()) for _, corr in steps]
    print("\ngradient cascade, mean |corr|: " + " ".join(f"{name}:{m:.2f}" for (name, _), m in zip(steps, means)))
    assert steps[0][0] == "classifier.6" and steps[-1][0] == "features.0"
    assert means[0] > 0.7
    assert means[-1] < 0.3
    assert np.mean(means[8:]) < np.mean(means[:8])  # the lower half of the cascade is further from the original


def test_lrp_cascade_falls_but_keeps_the_outline(demo):
    x, y = _digits(8)
    steps = cascade(demo, x, y, lrp)
    means = [float(corr.abs().mean()) for _, corr in steps]
    print("\nLRP epsilon-gamma-box cascade, mean |corr|: "
          + " ".join(f"{name}:{m:.2f}" for (name, _), m in zip(steps, means)))
    assert means[0] > 0.95
    assert means[-1] < 0.8 and means[-1] < means[0] - 0.2
    assert np.mean(means[8:]) < np.mean(means[:8])


def test_explain_functions(demo):
    x, y = _digits(2)
    model64 = copy.deepcopy(demo).double()
    # the gradient against central differences of the target logit, in float64, at random inputs:
    # a digit's flat background ties max-pool windows, where the network has kinks
    x64 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = gradient(model64, x64, y)
    direction = torch.randn(x64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        plus, minus = model64(x64 + h * direction), model64(x64 - h * direction)
    rows = torch.arange(2)
    numeric = (plus[rows, y] - minus[rows, y]) / (2 * h)
    assert torch.allclose((grad * direction).flatten(1).sum(1), numeric, rtol=1e-6)
    assert torch.equal(gradient_x_input(model64, x64, y), grad * x64)
    heatmap = lrp(demo, x, y)
    assert heatmap.shape == x.shape
    assert not torch.equal(heatmap, lrp(demo, x, y, composite="epsilon-plus-flat"))


# 4. eMPRT --------------------------------------------------------------------------------------

def test_efficient_mprt_by_its_definition(demo):
    x, y = _digits(4)
    fully = randomised_copy(demo, seed=0)
    expected = (histogram_entropy(gradient(fully, x, y).sum(1).abs(), 100)
                / histogram_entropy(gradient(demo, x, y).sum(1).abs(), 100))
    assert torch.equal(efficient_mprt(demo, x, y, gradient, seed=0), expected)
    assert torch.equal(efficient_mprt(demo, x, y, gradient, randomised=fully), expected)


@pytest.mark.parametrize("explain", [lrp, gradient], ids=["lrp", "gradient"])
def test_efficient_mprt_equals_quantus(demo, explain):
    quantus = pytest.importorskip("quantus")
    from quantus.helpers.model.pytorch_model import PyTorchModel

    x, y = _digits(4, start=50)
    # Quantus randomises the model itself (reset_parameters, bottom up, seed 42); its last model is
    # the fully randomised one, handed to ours so that both histogram the same heatmaps
    wrapped = PyTorchModel(demo, channel_first=True, softmax=False)
    quantus_random = list(wrapped.get_random_layer_generator(order="bottom_up", seed=42))[-1][1]
    assert not torch.equal(quantus_random.features[0].weight, demo.features[0].weight)

    def explain_func(model, inputs, targets, **kwargs):
        return explain(model, torch.as_tensor(inputs), torch.as_tensor(targets)).sum(1, keepdim=True).double().numpy()

    metric = quantus.EfficientMPRT(abs=True, normalise=False, complexity_func_kwargs={"n_bins": 100},
                                   layer_order="bottom_up", seed=42, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.asarray(metric(model=demo, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                                   explain_func=explain_func, channel_first=True, device="cpu"))
    ours = efficient_mprt(demo, x, y, explain, randomised=quantus_random).numpy()
    # Quantus reports the relative rise (H_rand - H) / H: our ratio minus 1
    assert np.abs((ours - 1) - theirs).max() < 1e-12
    assert np.abs(theirs).max() > 1e-3  # not a trivial zero
