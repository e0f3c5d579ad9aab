"""Region perturbation (lrpscale.engine.faithfulness) against independent references.

A linear model on a 4 x 4 image whose curves are plain arithmetic; Quantus 0.6's
RegionPerturbation on real digits with the bundled demo model and a random narrow VGG16; a
per-image, per-step loop written out here for the random order (Quantus's is not reproducible);
batch invariance; and on the demo model, LRP's MoRF curve against the random order.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lrpscale.demo_data import digits_arrays, digits_split, model_inputs
from lrpscale.engine.faithfulness import copies_per_forward, padding, patch_scores, region_perturbation, removal_counts
from lrpscale.engine.models import IMAGENET_MEAN, IMAGENET_STD, build_vgg, load_model
from lrpscale.engine.randomisation import gradient_x_input, lrp


@pytest.fixture(scope="module")
def demo():
    return load_model("vgg16", weights="demo")


@pytest.fixture(scope="module")
def random_vgg16():
    """VGG16's topology at a quarter of the width, random weights, for 64 px. Convs keep
    torchvision's initialisation; its N(0, 0.01) linear layers would make every logit ~1e-4, too
    flat to compare curves on, so they get He-normal weights (logits of order 1)."""
    torch.manual_seed(3)
    model = build_vgg("vgg16", num_classes=10, width_divisor=4, hidden=128, pooled_size=1).eval()
    with torch.no_grad():
        for module in model.classifier:
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, math.sqrt(2 / module.in_features))
    return model


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


@functools.lru_cache(maxsize=1)
def _digits_data():
    """scikit-learn's digits as uint8 images, labels and the demo model's test indices (loaded once)."""
    return (*digits_arrays(), digits_split()[1])


def _digits(count: int, size: int, mean, std, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, size, size) test-split digits preprocessed as the audit does, and their labels."""
    images, labels, test = _digits_data()
    chosen = test[start:start + count]
    return torch.from_numpy(model_inputs(images[chosen], size, mean, std)), torch.from_numpy(labels[chosen])


class Linear4x4(nn.Module):
    """Logit 0 = sum of w * x over a 1 x 4 x 4 image, logit 1 = 0: every curve is a running sum."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        first = (x * self.weight).flatten(1).sum(1)
        return torch.stack([first, torch.zeros_like(first)], 1)


# patch sums of w (x = 1) for 2 x 2 patches, row-major: TL 16, TR 4, BL -8, BR 12; logit 24
WEIGHT = torch.tensor([[4.0, 4.0, 1.0, 1.0],
                       [4.0, 4.0, 1.0, 1.0],
                       [-2.0, -2.0, 3.0, 3.0],
                       [-2.0, -2.0, 3.0, 3.0]]).reshape(1, 1, 4, 4)


# 1. By hand -------------------------------------------------------------------------------------

def test_removal_counts_rule():
    # T = round(0.5 * 1024) = 512 in 10 steps: round(51.2 k), the last step exactly 512
    assert removal_counts(1024, 10, 0.5).tolist() == [0, 51, 102, 154, 205, 256, 307, 358, 410, 461, 512]
    assert removal_counts(7, 3, 1.0).tolist() == [0, 2, 5, 7]  # 2.33 -> 2, 4.67 -> 5
    assert removal_counts(4, 4, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert removal_counts(5, 2, 1.0).tolist() == [0, 3, 5]  # 2.5 rounds up
    with pytest.raises(ValueError, match="steps"):
        removal_counts(10, 6, 0.5)  # 5 patches cannot fill 6 steps
    with pytest.raises(ValueError, match="fraction"):
        removal_counts(10, 2, 0.0)


def test_grid_and_padding_by_hand():
    assert padding(32, 1) == (0, 0)
    assert padding(32, 5) == (1, 2)  # 3 pixels of padding: the odd one after, as Quantus pads
    assert padding(4, 3) == (1, 1)
    ones = torch.ones(1, 3, 5, 5)
    # 5 x 5 in 2 x 2 patches: padded to 6 x 6 after; the last row and column of patches are 1 px wide
    assert patch_scores(ones, 2).reshape(3, 3).tolist() == [[12, 12, 6], [12, 12, 6], [6, 6, 3]]
    # 4 x 4 in 3 x 3 patches: one pixel of padding on each side, so the cells are the 2 x 2 quarters
    assert patch_scores(WEIGHT, 3).tolist() == [[16, 4, -8, 12]]


def test_linear_model_curves_and_aopc_by_hand():
    model = Linear4x4(WEIGHT).eval()
    x = torch.ones(1, 1, 4, 4)
    curves = region_perturbation(model, x, WEIGHT * x, target=0, patch_size=2, steps=4, fraction=1.0,
                                 orders=("morf", "lerf", "random"), seed=1)
    assert curves.grid == (2, 2) and curves.removed.tolist() == [0, 1, 2, 3, 4]
    assert curves.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # MoRF removes TL 16, BR 12, TR 4, BL -8: 24, 8, -4, -8, 0
    assert curves.patch_order["morf"].tolist() == [[0, 3, 1, 2]]
    assert curves.logits["morf"].tolist() == [[24.0, 8.0, -4.0, -8.0, 0.0]]
    assert float(curves.aopc["morf"]) == pytest.approx((16 + 28 + 32 + 24) / 4)
    # LeRF removes BL -8, TR 4, BR 12, TL 16: 24, 32, 28, 16, 0
    assert curves.logits["lerf"].tolist() == [[24.0, 32.0, 28.0, 16.0, 0.0]]
    assert float(curves.aopc["lerf"]) == pytest.approx((-8 - 4 + 8 + 24) / 4)
    # random: the documented permutation, torch.randperm with a generator seeded by the seed
    permutation = torch.randperm(4, generator=torch.Generator().manual_seed(1)).tolist()
    assert curves.patch_order["random"].tolist() == [permutation]
    sums, remaining, expected = [16.0, 4.0, -8.0, 12.0], 24.0, [24.0]
    for patch in permutation:
        remaining -= sums[patch]
        expected.append(remaining)
    assert curves.logits["random"].tolist() == [expected]
    assert float(curves.aopc["random"]) == pytest.approx(sum(24 - v for v in expected[1:]) / 4)
    # the probability of class 0 against a constant logit 0 is the logistic function of the logit
    for order in ("morf", "lerf", "random"):
        assert torch.allclose(curves.probs[order], torch.sigmoid(curves.logits[order]), atol=1e-6)
        assert torch.allclose(curves.aopc_of(order, "prob"),
                              (curves.probs[order][:, :1] - curves.probs[order][:, 1:]).mean(1))
    # two steps to half the patches: T = 2, one patch per step
    half = region_perturbation(model, x, WEIGHT, target=0, patch_size=2, steps=2, fraction=0.5, orders=("morf",))
    assert half.logits["morf"].tolist() == [[24.0, 8.0, -4.0]]
    assert float(half.aopc["morf"]) == pytest.approx((16 + 28) / 2)
    # a baseline other than 0: each removed pixel contributes w * 1 instead of w * 0
    shifted = region_perturbation(model, x, WEIGHT, target=0, patch_size=2, steps=4, fraction=1.0,
                                  orders=("morf",), baseline=1.0)
    assert shifted.logits["morf"].tolist() == [[24.0] * 5]


def test_equal_scores_go_to_the_lower_patch_index():
    model = Linear4x4(WEIGHT).eval()
    x = torch.ones(1, 1, 4, 4)
    ties = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).reshape(1, 4, 4)  # scores 2, 0, 0, 2
    curves = region_perturbation(model, x, ties, target=0, patch_size=2, steps=4, fraction=1.0, orders=("morf", "lerf"))
    assert curves.patch_order["morf"].tolist() == [[0, 3, 1, 2]]
    assert curves.patch_order["lerf"].tolist() == [[1, 2, 0, 3]]


def test_patch_size_that_does_not_divide_the_image():
    # 4 x 4 with p = 3 pads one pixel on each side: the same four quarters as p = 2
    model = Linear4x4(WEIGHT).eval()
    x = torch.ones(1, 1, 4, 4)
    three = region_perturbation(model, x, WEIGHT, target=0, patch_size=3, steps=4, fraction=1.0, orders=("morf", "lerf"))
    two = region_perturbation(model, x, WEIGHT, target=0, patch_size=2, steps=4, fraction=1.0, orders=("morf", "lerf"))
    for order in ("morf", "lerf"):
        assert torch.equal(three.logits[order], two.logits[order])


def test_bad_arguments_are_refused():
    model = Linear4x4(WEIGHT).eval()
    x = torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="order"):
        region_perturbation(model, x, WEIGHT, target=0, patch_size=2, steps=2, orders=("best",))
    with pytest.raises(ValueError, match="attributions"):
        region_perturbation(model, x, torch.ones(1, 3, 3), target=0, patch_size=2, steps=2)
    with pytest.raises(ValueError, match="seeds"):
        region_perturbation(model, x, WEIGHT, target=0, patch_size=2, steps=2, seed=torch.arange(3))
    with pytest.raises(ValueError, match="eval"):
        region_perturbation(Linear4x4(WEIGHT).train(), x, WEIGHT, target=0, patch_size=2, steps=2)


# 2. The random order and batching, against a loop written out here -------------------------------

def _loop_reference(model, x, order: torch.Tensor, p: int, counts: list[int], target: torch.Tensor, baseline: float):
    """(N, steps+1) target logits: one image, one step, one forward at a time, pixel by pixel."""
    n, _, h, w = x.shape
    top, left = padding(h, p)[0], padding(w, p)[0]
    grid_w = (w + sum(padding(w, p))) // p
    curves = []
    with torch.no_grad():
        for i in range(n):
            row = []
            for count in counts:
                copy = x[i:i + 1].clone()
                for patch in order[i, :count].tolist():
                    r, c = divmod(patch, grid_w)
                    ys = [y for y in range(r * p - top, (r + 1) * p - top) if 0 <= y < h]
                    xs = [v for v in range(c * p - left, (c + 1) * p - left) if 0 <= v < w]
                    for y in ys:
                        for v in xs:
                            copy[0, :, y, v] = baseline
                row.append(float(model(copy)[0, target[i]]))
            curves.append(row)
    return torch.tensor(curves, dtype=torch.float64)


def test_all_orders_equal_a_per_image_loop(demo):
    # in float64, so that batched and one-at-a-time forwards agree to rounding
    model = copy.deepcopy(demo).double()
    x, y = _digits(2, 32, demo.lrpscale_mean, demo.lrpscale_std, start=40)
    x = x.double()
    a = gradient_x_input(model, x, y)
    seeds = torch.tensor([11, 12])
    curves = region_perturbation(model, x, a, y, patch_size=5, steps=3, fraction=0.5, baseline=0.25, seed=seeds)
    assert curves.logits["morf"].dtype == torch.float64
    assert curves.grid == (7, 7)
    for n, seed in enumerate(seeds.tolist()):
        expected = torch.randperm(49, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(curves.patch_order["random"][n], expected)
    for order in ("morf", "lerf", "random"):
        reference = _loop_reference(model, x, curves.patch_order[order], 5, curves.removed.tolist(), y, 0.25)
        scale = float(reference.abs().max())
        assert torch.allclose(curves.logits[order], reference, rtol=0, atol=1e-12 * scale), order


def test_one_image_alone_equals_it_in_a_batch(demo):
    x, y = _digits(4, 32, demo.lrpscale_mean, demo.lrpscale_std, start=80)
    a = lrp(demo, x, y)
    for seed in (5, torch.tensor([3, 1, 4, 1])):
        batch = region_perturbation(demo, x, a, y, patch_size=2, steps=5, seed=seed)
        tiny_chunks = region_perturbation(demo, x, a, y, patch_size=2, steps=5, seed=seed, batch_size=7)
        for n in range(4):
            own_seed = seed if isinstance(seed, int) else seed[n:n + 1]
            alone = region_perturbation(demo, x[n:n + 1], a[n:n + 1], y[n:n + 1], patch_size=2, steps=5, seed=own_seed)
            for order in ("morf", "lerf", "random"):
                assert torch.equal(alone.patch_order[order][0], batch.patch_order[order][n]), (n, order)
                scale = float(batch.logits[order][n].abs().max())
                for other in (alone, tiny_chunks):
                    row = 0 if other is alone else n
                    assert torch.allclose(other.logits[order][row], batch.logits[order][n], rtol=0, atol=1e-5 * scale)
                    assert torch.allclose(other.probs[order][row], batch.probs[order][n], rtol=0, atol=1e-6)
                    assert torch.allclose(other.aopc[order][row], batch.aopc[order][n], rtol=0, atol=1e-5 * scale)
    # an int seed is one permutation for all images; per-image seeds give each its own
    shared = region_perturbation(demo, x, a, y, patch_size=2, steps=5, seed=5, orders=("random",))
    assert all(torch.equal(row, shared.patch_order["random"][0]) for row in shared.patch_order["random"])
    own = region_perturbation(demo, x, a, y, patch_size=2, steps=5, seed=torch.arange(4), orders=("random",))
    assert not torch.equal(own.patch_order["random"][0], own.patch_order["random"][1])


def test_copies_per_forward_by_hand(demo):
    # the demo VGG16 (widths / 8) at 32 px: widest module = features.2, 8 channels in and out at
    # 32 x 32 (2 * 8192 values; features.0 has 3072 + 8192); plus the 3072 of the copy: 77,824 bytes
    image = torch.zeros(1, 3, 32, 32)
    assert copies_per_forward(demo, image, budget_bytes=10 * 77_824) == 10
    assert copies_per_forward(demo, image, budget_bytes=10 * 77_824 - 1) == 9
    assert copies_per_forward(demo, image, budget_bytes=1) == 1
    assert all(not module._forward_hooks for module in demo.modules())  # the probe's hooks are gone


# 3. Quantus 0.6 RegionPerturbation -----------------------------------------------------------------

def _tie_free(attributions: torch.Tensor) -> torch.Tensor:
    """float64 attributions on a grid of 2^-30 after dividing by the max: patch sums are exact in
    float64 whatever the summation order, so numpy and torch rank the patches alike."""
    a = attributions.double() / attributions.abs().amax((1, 2, 3), keepdim=True)
    return torch.round(a * 2.0 ** 30) / 2.0 ** 30


def _quantus_curves(quantus, model, x, y, a, p: int, order: str, regions: int, softmax: bool) -> np.ndarray:
    metric = quantus.RegionPerturbation(patch_size=p, order=order, regions_evaluation=regions, abs=False,
                                        normalise=False, perturb_baseline=0.0, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(),
                                 channel_first=True, softmax=softmax, device="cpu"), dtype=np.float64)


@pytest.mark.parametrize("which,size,p", [("demo", 32, 4), ("demo", 32, 5), ("random_vgg16", 64, 8), ("random_vgg16", 64, 6)])
def test_curves_equal_quantus_region_perturbation(quantus, request, which, size, p):
    model = request.getfixturevalue(which)
    mean, std = (model.lrpscale_mean, model.lrpscale_std) if which == "demo" else (IMAGENET_MEAN, IMAGENET_STD)
    x, y = _digits(3, size, mean, std, start=120)
    a = _tie_free(lrp(model, x, y))
    scores = patch_scores(a, p)
    assert all(len(set(row.tolist())) == len(row) for row in scores), "precondition: no equal patch scores"
    n_patches = scores.shape[1]
    regions = 12  # Quantus removes one patch per step; ours removes 12 in 12 steps, then in 4 steps of 3
    one_each = region_perturbation(model, x, a, y, patch_size=p, steps=regions, fraction=regions / n_patches,
                                   orders=("morf", "lerf"))
    three_each = region_perturbation(model, x, a, y, patch_size=p, steps=4, fraction=regions / n_patches,
                                     orders=("morf", "lerf"))
    assert one_each.removed.tolist() == list(range(13)) and three_each.removed.tolist() == [0, 3, 6, 9, 12]
    for order in ("morf", "lerf"):
        for softmax, on in ((False, "logit"), (True, "prob")):
            theirs = _quantus_curves(quantus, model, x, y, a, p, order, regions, softmax)
            # tolerance: float32 forwards of different batch compositions; logits relative to their size
            scale = 1.0 if softmax else max(1.0, float(one_each.logits[order].abs().max()))
            ours = one_each.drop(order, on).double().numpy()
            assert theirs.shape == ours.shape == (3, regions)
            assert np.abs(ours - theirs).max() <= 1e-5 * scale, (order, on)
            coarse = three_each.drop(order, on).double().numpy()
            assert np.abs(coarse - theirs[:, 2::3]).max() <= 1e-5 * scale, (order, on)
    # the comparison is not vacuous: removing patches moves the target's logit far beyond the tolerance
    assert float(one_each.drop("morf").abs().max()) > 100 * 1e-5 * max(1.0, float(one_each.logits["morf"].abs().max()))


# 4. The demo model: LRP's MoRF against the random order -------------------------------------------

# Measured on the 32 test digits below, patch 1 x 1 (the default at 32 px), 10 steps to half the
# pixels, baseline 0, per-image seeds 0..31: MoRF AOPC 20.7 (mean logit drop), random 4.6, LeRF
# -0.7 (random with seeds 100..131 or 1000..1031: 5.0, 5.1); MoRF beats random on every image, by
# 5.3 logits at the least (mean 16.1). On the probability: MoRF 0.63, random 0.016.
MARGIN_MEAN = 10.0
MARGIN_PER_IMAGE = 2.0


def test_lrp_morf_beats_the_random_order_on_the_demo_model(demo):
    x, y = _digits(32, 32, demo.lrpscale_mean, demo.lrpscale_std)
    assert (demo(x).argmax(1) == y).float().mean() >= 0.95
    curves = region_perturbation(demo, x, lrp(demo, x, y), y, seed=torch.arange(32))
    assert curves.patch_size == 1 and curves.grid == (32, 32)
    morf, lerf, rand = curves.aopc["morf"], curves.aopc["lerf"], curves.aopc["random"]
    print(f"\nAOPC (logit) over {len(x)} digits: MoRF {morf.mean():.2f}, random {rand.mean():.2f}, LeRF {lerf.mean():.2f}; "
          f"MoRF - random: mean {(morf - rand).mean():.2f}, min {(morf - rand).min():.2f}")
    assert float((morf - rand).mean()) > MARGIN_MEAN
    assert float((morf - rand).min()) > MARGIN_PER_IMAGE
    assert float(lerf.mean()) < float(rand.mean())
    # the probability curve says the same: MoRF destroys the prediction far faster
    assert float(curves.aopc_of("morf", "prob").mean()) > float(curves.aopc_of("random", "prob").mean()) + 0.3
