"""The paper's method (docs/method.md §7-§11) against independent references.

Restricted propagation is checked against zennit conditioned with tensor hooks, selection and
scores against numbers worked out by hand, the critical path against a tiny network whose
relevance is plain arithmetic, deconvolution against zennit's DeconvNet. Models are narrow VGGs
(the module names and topology of torchvision's, fewer channels) so the file runs in seconds.
"""
from __future__ import annotations

import copy
import dataclasses

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import lrpscale
from lrpscale.config import AnalysisConfig
from lrpscale.engine.analyzer import Analyzer
from lrpscale.engine.critical_path import Selected, critical_path, default_path_layers, edge_relevance
from lrpscale.engine.deconvolution import deconvolve, deconvolve_many
from lrpscale.engine.models import build_vgg
from lrpscale.engine.selection import (
    choose_k,
    fidelity_scores,
    forward_backward_scores,
    mse,
    neuron_totals,
    rank_neurons,
    smape,
    sweep,
    top_k_masks,
)
from lrpscale.graph import OUTPUT, path_graph
from tests.helpers.oracles import normalized, relative_max_diff, zennit_deconv, zennit_lrp


def _images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _narrow(name: str, seed: int, width_divisor: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_vgg(name, num_classes=10, width_divisor=width_divisor, hidden=128).eval()


@pytest.fixture(scope="module")
def small_vgg11():
    """VGG11 at a quarter of the width: conv widths 16, 32, 64, 64, 128, 128, 128, 128."""
    return _narrow("vgg11", 0, 4)


@pytest.fixture(scope="module")
def explainer11(small_vgg11):
    return lrpscale.Explainer(small_vgg11)


@pytest.fixture(scope="module")
def small_vgg16():
    """VGG16 at an eighth of the width: conv widths 8 to 64."""
    return _narrow("vgg16", 1, 8)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """All entries within ``rel`` of the larger tensor's largest magnitude."""
    return float((a - b).abs().max()) <= rel * max(float(a.abs().max()), float(b.abs().max()))


def _top(relevance: torch.Tensor, count: int) -> list[list[int]]:
    """Per image, the ``count`` neurons with the largest |relevance| (N, C) -> N lists."""
    return relevance.abs().argsort(1, descending=True)[:, :count].tolist()


def _mask(lists: list[list[int]], channels: int) -> torch.Tensor:
    mask = torch.zeros(len(lists), channels)
    for row, chosen in enumerate(lists):
        mask[row, chosen] = 1.0
    return mask


# 1. Restricted propagation ------------------------------------------------------------------------

def test_restricting_to_all_neurons_gives_the_full_heatmap(explainer11):
    x = _images(0)
    full = explainer11.explain(x)
    channels = {layer: full.layers[layer].shape[1] for layer in ("features.0", "features.13", "classifier.3")}
    everything = explainer11.explain(x, restrict={"features.13": list(range(channels["features.13"]))})
    assert _close(everything.relevance, full.relevance, 1e-6)
    conditions = [{"features.0": list(range(channels["features.0"]))},
                  {"classifier.3": torch.ones(channels["classifier.3"])}, {}]
    variants = explainer11.explain(x, restrict=conditions).relevance
    for m, condition in enumerate(conditions):
        assert _close(variants[:, m], full.relevance, 1e-6), condition


@pytest.mark.parametrize("layer", ["features.8", "classifier.0"])
def test_restriction_is_the_sum_of_single_neuron_heatmaps(explainer11, layer):
    x = _images(1)
    neurons = [0, 3, 5, 6, 11]
    together = explainer11.explain(x, restrict={layer: neurons})
    singles = explainer11.explain(x, restrict=[{layer: [c]} for c in neurons])
    assert singles.relevance.shape == (2, len(neurons), 3, 32, 32)
    assert _close(singles.relevance.sum(1), together.relevance, 1e-5)
    # the restricted layer itself holds exactly the chosen neurons' relevance
    full = explainer11.explain(x).layers[layer]
    expected = full * _mask([neurons] * 2, full.shape[1]).reshape(2, -1, *([1] * (full.ndim - 2)))
    assert torch.equal(together.layers[layer], expected)


@pytest.mark.parametrize("layer,count", [("features.0", 1), ("features.8", 3), ("features.18", 1),
                                         ("classifier.0", 2)])
def test_conditional_heatmap_equals_zennit_with_a_gradient_mask(small_vgg11, explainer11, layer, count):
    x = _images(2)
    full = explainer11.explain(x)
    ranking = _top(neuron_totals(full.layers[layer]), count + 1)
    chosen = [ranking[0][:count], ranking[1][1:]]  # image 1 skips its top neuron: the sets differ
    assert chosen[0] != chosen[1]
    ours = explainer11.explain(x, restrict={layer: chosen})
    theirs, _ = zennit_lrp(small_vgg11, x, full.target, "epsilon-gamma-box", explainer11.low, explainer11.high,
                           masks={layer: _mask(chosen, full.layers[layer].shape[1])})
    assert relative_max_diff(normalized(ours.relevance), normalized(theirs)) < 1e-5


def test_two_layer_path_equals_both_masks(small_vgg11, explainer11):
    x = _images(3)
    upper, lower = "classifier.0", "features.11"
    full = explainer11.explain(x)
    upper_set = _top(neuron_totals(full.layers[upper]), 8)
    below_upper = explainer11.explain(x, restrict={upper: upper_set}).layers[lower]
    lower_set = _top(neuron_totals(below_upper), 3)
    upper_mask = _mask(upper_set, full.layers[upper].shape[1])
    lower_mask = _mask(lower_set, full.layers[lower].shape[1])
    ours = explainer11.explain(x, restrict={upper: upper_set, lower: lower_set}).relevance

    theirs, _ = zennit_lrp(small_vgg11, x, full.target, "epsilon-gamma-box", explainer11.low, explainer11.high,
                           masks={upper: upper_mask, lower: lower_mask})
    assert relative_max_diff(normalized(ours), normalized(theirs)) < 1e-5

    # the same path in three legs: down to the upper layer, mask, down to the lower one, mask, down
    record = explainer11.forward(x)
    relevance = explainer11.propagate(record, explainer11.initial_relevance(record, full.target), stop=upper)[0]
    relevance = relevance * upper_mask.unsqueeze(1)
    relevance = explainer11.propagate(record, relevance, start=upper, stop=lower)[0]
    relevance = relevance * lower_mask.reshape(2, 1, -1, 1, 1)
    stepwise = explainer11.propagate(record, relevance, start=lower)[0][:, 0]
    assert _close(ours, stepwise, 1e-5)


def test_restriction_does_not_depend_on_the_batch(explainer11):
    batch = _images(4, n=4)
    layer = "features.13"
    lists = [[0], [5, 9], [1, 2, 3], [127]]
    together = explainer11.explain(batch, restrict={layer: lists})
    for n, chosen in enumerate(lists):
        alone = explainer11.explain(batch[n:n + 1], restrict={layer: [chosen]})
        assert torch.allclose(alone.relevance[0], together.relevance[n], rtol=1e-4,
                              atol=1e-6 * float(together.relevance[n].abs().max())), n
        # the same neurons for every image: the plain list means exactly that
        shared = explainer11.explain(batch[n:n + 1], restrict={layer: chosen})
        assert torch.equal(shared.relevance, alone.relevance)


def test_masks_and_per_image_lists_agree(explainer11):
    x = _images(5, n=3)
    layer = "features.16"
    c = explainer11.explain(x).layers[layer].shape[1]
    lists = [[1, 4], [7], [0, 2, 100]]
    from_lists = explainer11.explain(x, restrict={layer: lists}).relevance
    from_mask = explainer11.explain(x, restrict={layer: _mask(lists, c)}).relevance
    assert torch.equal(from_lists, from_mask)
    shared = [3, 8, 64]
    from_list = explainer11.explain(x, restrict={layer: shared}).relevance
    from_vector = explainer11.explain(x, restrict={layer: _mask([shared], c)[0]}).relevance
    from_rows = explainer11.explain(x, restrict={layer: [shared] * 3}).relevance
    assert torch.equal(from_list, from_vector)
    assert torch.equal(from_list, from_rows)
    assert not torch.equal(from_list, from_lists)


def test_a_list_of_restrictions_adds_a_condition_axis(explainer11):
    x = _images(6, n=2)
    conditions = [{"features.3": [0]}, {"classifier.3": [1, 2]}, {}, {"conv4_2": [5], "fc6": [7, 9]}]
    result = explainer11.explain(x, restrict=conditions)
    assert result.relevance.shape == (2, 4, 3, 32, 32)
    assert result.layers["features.8"].shape[:2] == (2, 4)
    assert result.totals["input"].shape == (2, 4)
    for m, condition in enumerate(conditions):  # each condition is its own restriction, nothing more
        single = explainer11.explain(x, restrict=condition) if condition else explainer11.explain(x)
        assert single.relevance.shape == (2, 3, 32, 32)
        assert _close(result.relevance[:, m], single.relevance, 1e-5), condition
    assert explainer11.explain(x[:1], restrict=conditions[:1]).relevance.shape == (1, 1, 3, 32, 32)


def test_out_of_range_neurons_are_refused(explainer11):
    x = _images(7, n=2)
    c = 16  # features.0 of the narrow VGG11
    with pytest.raises(ValueError, match="features.0"):
        explainer11.explain(x, restrict={"features.0": [c]})
    record = explainer11.forward(x)
    for neurons in ([-1], [[0], [c]], torch.ones(c + 1)):
        with pytest.raises(ValueError, match="features.0"):
            explainer11.restriction_masks(record, {"features.0": neurons})


def test_malformed_restrictions_are_refused(explainer11):
    # restriction_masks documents: a list of ints, a list of N lists, or a 0/1 tensor (C,) or (N, C)
    record = explainer11.forward(_images(7, n=2))
    malformed = {
        "three lists for two images": [[0], [1], [2]],
        "ints and lists mixed": [0, [1]],
        "an index tensor, not a 0/1 mask (2 x 8 = 16 entries, as many as the channels)":
            torch.arange(16).reshape(2, 8),
    }
    for what, neurons in malformed.items():
        with pytest.raises(ValueError, match="features.0"):
            explainer11.restriction_masks(record, {"features.0": neurons})
            pytest.fail(f"accepted {what}")


# 2. Selection and scores ----------------------------------------------------------------------------

def test_smape_by_hand():
    a = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 1.0])
    b = torch.tensor([-1.0, 0.0, 2.0, 1.0, 3.0, 1.0])
    # terms 2|a-b|/(|a|+|b|): sign change 4/2, both zero 0, zero in one only 4/2, 2|1|/3, equal 0, equal 0
    expected = 100 * (4 / 2 + 0 + 4 / 2 + 2 / 3 + 0 + 0) / 6
    assert float(smape(a, b)) == pytest.approx(expected, rel=1e-6)
    assert float(smape(b, a)) == pytest.approx(expected, rel=1e-6)
    assert float(smape(torch.tensor([1.0]), torch.tensor([-1.0]))) == pytest.approx(200.0)
    assert float(smape(torch.tensor([0.0]), torch.tensor([5.0]))) == pytest.approx(200.0)
    assert float(smape(a, a)) == 0.0
    assert float(smape(torch.zeros(4), torch.zeros(4))) == 0.0
    rows = smape(torch.stack([a, a]), torch.stack([b, a]))
    assert rows.shape == (2,)
    assert rows.tolist() == pytest.approx([expected, 0.0], rel=1e-6)


def test_mse_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    b = torch.tensor([[2.0, 2.0, 5.0], [0.0, 1.0, 4.0]])
    assert mse(a, b).tolist() == pytest.approx([(1 + 0 + 4) / 3, (0 + 4 + 0) / 3])


def test_fidelity_scores_by_hand():
    full = torch.tensor([[1.0, -1.0], [0.5, -0.5], [0.5, -0.5]]).reshape(1, 3, 1, 2)
    restricted = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).reshape(3, 1, 2),
                              full[0]]).unsqueeze(0)
    # colour sums: full [2, -2], sum |H| = 4 -> [0.5, -0.5]; restricted [1, 0] -> [0.25, 0]
    mses, smapes = fidelity_scores(full, restricted)
    assert mses.shape == smapes.shape == (1, 2)
    assert mses[0].tolist() == pytest.approx([((0.5 - 0.25) ** 2 + 0.5 ** 2) / 2, 0.0])
    assert smapes[0].tolist() == pytest.approx([100 * (2 * 0.25 / 0.75 + 2 * 0.5 / 0.5) / 2, 0.0])


def test_neuron_totals():
    values = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert neuron_totals(values)[1, 2].item() == 20 + 21 + 22 + 23  # image 1 starts at 12, channel 2 at 12 + 8
    assert torch.equal(neuron_totals(values.reshape(1, 2, 3, 2, 2), lead=2)[0], neuron_totals(values))
    units = torch.randn(2, 5)
    assert neuron_totals(units) is units


def test_ranking_signed_absolute_and_ties():
    relevance = torch.tensor([[0.5, -2.0, 1.0, -0.1], [1.0, 3.0, 3.0, 0.0]])
    assert rank_neurons(relevance).tolist() == [[2, 0, 3, 1], [1, 2, 0, 3]]
    assert rank_neurons(relevance, absolute=True).tolist() == [[1, 2, 0, 3], [1, 2, 0, 3]]
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, -3.0]])
    assert rank_neurons(ties).tolist() == [[1, 2, 4, 0, 3, 5]]  # equal relevance: lower index first
    assert rank_neurons(ties, absolute=True).tolist() == [[1, 2, 4, 5, 0, 3]]


def test_top_k_masks_on_a_known_ranking():
    order = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])
    masks = top_k_masks(order, [1, 2, 4, 9])
    assert masks.shape == (2, 4, 4)
    assert masks[0].tolist() == [[0, 0, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert masks[1].tolist() == [[0, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_choose_k_rule():
    ks = [1, 2, 4, 8]
    scores = torch.tensor([[80.0, 60.0, 40.0, 30.0],   # first reaching 50: k=4
                           [90.0, 80.0, 70.0, 60.0],   # none: the largest k
                           [10.0, 60.0, 20.0, 5.0],    # already k=1
                           [70.0, 40.0, 60.0, 30.0],   # not monotone: the first one counts
                           [70.0, 50.0, 60.0, 30.0]])  # equal to the target reaches it
    assert choose_k(ks, scores, 50.0).tolist() == [2, 3, 0, 1, 1]


def test_forward_backward_scores_by_hand():
    activation = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    relevance = torch.tensor([[1.0, 2.0, 0.5, -0.5]])
    order = rank_neurons(relevance)
    assert order.tolist() == [[1, 0, 2, 3]]
    mses, smapes = forward_backward_scores(activation, relevance, order, [1, 2, 4])
    # k=1: f=[3]/3, r=[2]/2 -> equal. k=2: f=[3,4]/7, r=[2,1]/3. k=4: f=[3,4,2,1]/10, r=[2,1,.5,-.5]/4
    f2, r2 = [3 / 7, 4 / 7], [2 / 3, 1 / 3]
    assert mses[0].tolist() == pytest.approx([
        0.0,
        ((f2[0] - r2[0]) ** 2 + (f2[1] - r2[1]) ** 2) / 2,
        ((0.3 - 0.5) ** 2 + (0.4 - 0.25) ** 2 + (0.2 - 0.125) ** 2 + (0.1 + 0.125) ** 2) / 4], rel=1e-5)
    assert smapes[0].tolist() == pytest.approx([
        0.0,
        100 * (2 * abs(f2[0] - r2[0]) / (f2[0] + r2[0]) + 2 * abs(f2[1] - r2[1]) / (f2[1] + r2[1])) / 2,
        100 * (2 * 0.2 / 0.8 + 2 * 0.15 / 0.65 + 2 * 0.075 / 0.325 + 2 * 0.225 / 0.225) / 4], rel=1e-5)


def _smape_np(a: np.ndarray, b: np.ndarray) -> float:
    denominator = np.abs(a) + np.abs(b)
    terms = np.divide(2 * np.abs(a - b), denominator, out=np.zeros_like(a), where=denominator > 0)
    return 100 * float(terms.mean())


def _rule(scores: list[float], ks: list[int], target: float) -> int:
    """The k* rule written out: the first index whose score reaches the target, else the last."""
    for index, score in enumerate(scores):
        if score <= target:
            return index
    return len(ks) - 1


def test_sweep_heatmaps_and_scores(explainer11):
    x = _images(8, n=2)
    layer = "features.3"  # 32 channels: the sweep's 64 is more than the layer has
    full = explainer11.explain(x)
    record = explainer11.forward(x)
    result = sweep(explainer11, record, full.relevance, full.layers[layer], layer, (1, 2, 4, 8, 16, 32, 64))
    assert result.ks == [1, 2, 4, 8, 16, 32]

    relevance = full.layers[layer].sum((2, 3)).numpy().astype(np.float64)
    activation = full.activations[layer].sum((2, 3)).numpy().astype(np.float64)
    order = np.stack([np.argsort(-r, kind="stable") for r in relevance])
    assert result.order.tolist() == order.tolist()

    # each k's heatmap equals the full pass restricted to the same top-k sets
    conditions = [{layer: [row[:k].tolist() for row in order]} for k in result.ks]
    restricted = explainer11.explain(x, restrict=conditions).relevance
    assert result.heatmaps.shape == (2, 6, 3, 32, 32)
    for n in range(2):
        for index, k in enumerate(result.ks):
            assert _close(result.heatmaps[n, index], restricted[n, index], 1e-5), (n, k)

    # scores recomputed from the heatmaps with numpy
    heatmaps = result.heatmaps.sum(2).flatten(2).numpy().astype(np.float64)
    for n in range(2):
        h = full.relevance[n].sum(0).flatten().numpy().astype(np.float64)
        scale = np.abs(h).sum()
        for index, k in enumerate(result.ks):
            a, b = h / scale, heatmaps[n, index] / scale
            assert float(result.scores["fidelity"][0][n, index]) == pytest.approx(np.mean((a - b) ** 2),
                                                                                   rel=1e-4, abs=1e-12)
            assert float(result.scores["fidelity"][1][n, index]) == pytest.approx(_smape_np(a, b), abs=1e-3)
            top = order[n, :k]
            f = activation[n, top] / np.abs(activation[n, top]).sum()
            r = relevance[n, top] / np.abs(relevance[n, top]).sum()
            assert float(result.scores["forward_backward"][0][n, index]) == pytest.approx(np.mean((f - r) ** 2),
                                                                                          rel=1e-4, abs=1e-12)
            assert float(result.scores["forward_backward"][1][n, index]) == pytest.approx(_smape_np(f, r),
                                                                                          abs=1e-3)
    # all neurons reproduce the heatmap exactly
    assert result.scores["fidelity"][0][:, -1].tolist() == [0.0, 0.0]
    assert result.scores["fidelity"][1][:, -1].tolist() == [0.0, 0.0]
    assert torch.equal(result.heatmaps[:, -1], full.relevance)


def test_sweep_chooses_k_by_the_rule(explainer11):
    x = _images(9, n=2)
    layer = "features.18"
    full = explainer11.explain(x)
    record = explainer11.forward(x)
    ks = [1, 2, 4, 8, 16, 32, 64]
    first = sweep(explainer11, record, full.relevance, full.layers[layer], layer, ks)
    for metric, scores in zip(("mse", "smape"), first.scores["fidelity"]):
        # a target between the scores of image 0, so that k* is neither the first nor forced to the last
        target = float(scores[0, 3])
        result = sweep(explainer11, record, full.relevance, full.layers[layer], layer, ks, metric=metric,
                       target=target)
        expected = [_rule(scores[n].tolist(), ks, target) for n in range(2)]
        assert result.chosen.tolist() == expected, metric
        assert 0 < expected[0] <= 3, metric
        assert result.chosen_k.tolist() == [ks[i] for i in expected], metric
    impossible = sweep(explainer11, record, full.relevance, full.layers[layer], layer, ks, metric="mse", target=-1.0)
    assert impossible.chosen_k.tolist() == [64, 64]
    with pytest.raises(ValueError, match="metric"):
        sweep(explainer11, record, full.relevance, full.layers[layer], layer, ks, metric="mae")


def test_sweep_absolute_ranking(explainer11):
    x = _images(10, n=2)
    layer = "features.6"
    full = explainer11.explain(x)
    result = sweep(explainer11, explainer11.forward(x), full.relevance, full.layers[layer], layer, [64],
                   absolute=True)
    relevance = full.layers[layer].sum((2, 3)).numpy()
    assert result.order.tolist() == [np.argsort(-np.abs(r), kind="stable").tolist() for r in relevance]
    assert result.order.tolist() != rank_neurons(torch.as_tensor(relevance)).tolist()


# 3. Critical paths ------------------------------------------------------------------------------

EPS = 1e-6  # the epsilon / gamma stabiliser of epsilon-gamma-box


class TinyVGG(nn.Module):
    """A VGG-shaped network small enough to explain by hand: 2x2 images, 1x1 convolutions."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]).reshape(2, 3, 1, 1))
            self.features[0].bias.zero_()
            self.features[3].weight.copy_(torch.tensor([[1.0, 1], [2, -0.5], [-1, 1]]).reshape(3, 2, 1, 1))
            self.features[3].bias.zero_()
            self.classifier[0].weight.copy_(torch.tensor([[1.0, 0, 3], [0, 1, -0.5]]))
            self.classifier[0].bias.copy_(torch.tensor([1.0, 0.5]))
            self.classifier[2].weight.copy_(torch.tensor([[1.0, 3], [-1, 1]]))
            self.classifier[2].bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


TINY_INPUT = torch.tensor([[[1.0, 2.0], [0.5, -1.0]],    # channel 0: max 2 at (0, 1)
                           [[3.0, -1.0], [1.0, 0.0]],    # channel 1: max 3 at (0, 0)
                           [[-2.0, 4.0], [0.0, 1.0]]]).unsqueeze(0)


def test_critical_path_of_a_hand_computed_network():
    model = TinyVGG().eval()
    explainer = lrpscale.Explainer(model)
    path = ["features.0", "features.3", "classifier.0"]
    assert default_path_layers(explainer) == ["features.0", "classifier.0"]

    # forward by hand
    pooled = [2.0, 3.0]                                   # max-pooled ReLU of channels 0 and 1
    w1 = [[1.0, 1.0], [2.0, -0.5], [-1.0, 1.0]]
    a3 = [sum(pooled[i] * w1[j][i] for i in range(2)) for j in range(3)]          # [5, 2.5, 1]
    w2, b2 = [[1.0, 0.0, 3.0], [0.0, 1.0, -0.5]], [1.0, 0.5]
    z2 = [sum(a3[i] * w2[j][i] for i in range(3)) + b2[j] for j in range(2)]     # [9, 2.5]
    w3, b3 = [[1.0, 3.0], [-1.0, 1.0]], [0.5, 0.0]
    logits = [sum(z2[i] * w3[j][i] for i in range(2)) + b3[j] for j in range(2)]  # [17, -6.5]
    assert a3 == [5.0, 2.5, 1.0] and z2 == [9.0, 2.5] and logits == [17.0, -6.5]

    # backward by hand. epsilon rule: R_i <- x_i w_ji / (z_j + eps) R_j
    r_out = logits[0]                                                             # target: class 0
    r_fc6 = [z2[i] * w3[0][i] / (logits[0] + EPS) * r_out for i in range(2)]     # ~[9, 7.5]
    # fc6 unit j alone, down to the (1x1) average pool: R_i^j = a3_i w2_ji / (z2_j + eps) R_j,
    # then the pool's proportional rule at 1x1: R * a3 / (a3 + eps)
    fc6_to_conv = [[a3[i] * w2[j][i] / (z2[j] + EPS) * r_fc6[j] * a3[i] / (a3[i] + EPS) for i in range(3)]
                   for j in range(2)]                                             # ~[[5, 0, 3], [0, 7.5, -1.5]]
    r_conv = [fc6_to_conv[0][i] + fc6_to_conv[1][i] for i in range(3)]           # ~[5, 7.5, 1.5]
    # gamma rule on non-negative input, z > 0: w+ = w + 0.25 max(w, 0), R_i^j = x_i w+_ji / (z+_j + eps) R_j
    w1p = [[w + 0.25 * max(w, 0.0) for w in row] for row in w1]
    z1p = [sum(pooled[i] * w1p[j][i] for i in range(2)) for j in range(3)]        # [6.25, 3.5, 1.75]
    conv_to_first = [[pooled[i] * w1p[j][i] / (z1p[j] + EPS) * r_conv[j] for i in range(2)] for j in range(3)]
    r_first = [sum(conv_to_first[j][i] for j in range(3)) for i in range(2)]     # ~[11, 3]
    paper = dict(rel=1e-5)  # the numbers on paper leave out the stabilisers
    assert r_fc6 == pytest.approx([9.0, 7.5], **paper) and r_conv == pytest.approx([5.0, 7.5, 1.5], **paper)
    assert conv_to_first[1] == pytest.approx([75 / 7, -22.5 / 7], **paper)
    assert r_first == pytest.approx([11.0, 3.0], **paper)

    result = explainer.explain(TINY_INPUT)
    assert result.logits[0].tolist() == pytest.approx(logits) and model(TINY_INPUT)[0].tolist() == pytest.approx(logits)
    # max-pooling hands the relevance to the winners: (0, 1) in channel 0, (0, 0) in channel 1
    assert result.layers["features.0"][0].flatten().tolist() == pytest.approx(
        [0.0, r_first[0], 0.0, 0.0, r_first[1], 0.0, 0.0, 0.0], rel=1e-5)

    record = explainer.forward(TINY_INPUT)
    totals = {layer: neuron_totals(result.layers[layer]) for layer in path}
    activations = {layer: neuron_totals(record.activations[layer]) for layer in path}
    hand_totals = {"features.0": r_first, "features.3": r_conv, "classifier.0": r_fc6}
    hand_activations = {"features.0": [1 + 2 + 0.5, 3 + 1.0], "features.3": a3, "classifier.0": z2}
    hand_order = {"features.0": [0, 1], "features.3": [1, 0, 2], "classifier.0": [0, 1]}
    counts = {"features.0": 1, "features.3": 2, "classifier.0": 2}
    selected = {}
    for layer in path:
        assert totals[layer][0].tolist() == pytest.approx(hand_totals[layer], rel=1e-5), layer
        assert activations[layer][0].tolist() == pytest.approx(hand_activations[layer]), layer
        order = rank_neurons(totals[layer])
        assert order[0].tolist() == hand_order[layer], layer
        selected[layer] = Selected(order, torch.tensor([counts[layer]]), totals[layer], activations[layer])

    nodes, edges = critical_path(explainer, record, result.layers, selected, path, result.target, result.initial)
    graph = path_graph(nodes[0], edges[0])
    expected_nodes = {
        ("features.0", 0): (r_first[0], 3.5, 0),
        ("features.3", 1): (r_conv[1], 2.5, 0), ("features.3", 0): (r_conv[0], 5.0, 1),
        ("classifier.0", 0): (r_fc6[0], 9.0, 0), ("classifier.0", 1): (r_fc6[1], 2.5, 1),
        (OUTPUT, 0): (r_out, 17.0, 0),
    }
    assert set(graph.nodes) == set(expected_nodes)
    for node, (relevance, activation, rank) in expected_nodes.items():
        attributes = graph.nodes[node]
        assert attributes["relevance"] == pytest.approx(relevance, rel=1e-5), node
        assert attributes["activation"] == pytest.approx(activation), node
        assert attributes["rank"] == rank and attributes["layer"] == node[0], node
    expected_edges = {  # (lower, upper): relevance lower receives from upper alone
        (("features.0", 0), ("features.3", 1)): conv_to_first[1][0],
        (("features.0", 0), ("features.3", 0)): conv_to_first[0][0],
        (("features.3", 1), ("classifier.0", 0)): fc6_to_conv[0][1],
        (("features.3", 0), ("classifier.0", 0)): fc6_to_conv[0][0],
        (("features.3", 1), ("classifier.0", 1)): fc6_to_conv[1][1],
        (("features.3", 0), ("classifier.0", 1)): fc6_to_conv[1][0],
        (("classifier.0", 0), (OUTPUT, 0)): r_fc6[0],  # into the output: the top layer's relevance
        (("classifier.0", 1), (OUTPUT, 0)): r_fc6[1],
    }
    assert set(graph.edges) == set(expected_edges)
    for edge, relevance in expected_edges.items():
        assert graph.edges[edge]["relevance"] == pytest.approx(relevance, rel=1e-5, abs=1e-9), edge
    assert nx.is_directed_acyclic_graph(graph)
    assert list(nx.topological_sort(graph))[-1] == (OUTPUT, 0)


def _zero_biases(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
    return model


def test_edges_conserve_each_upper_neurons_relevance(small_vgg16):
    explainer = lrpscale.Explainer(_zero_biases(small_vgg16))
    layers = default_path_layers(explainer)
    assert layers == [explainer.resolve(a) for a in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3",
                                                      "fc6", "fc7")]
    x = _images(11, n=2)
    result = explainer.explain(x)
    record = explainer.forward(x)
    for lower, upper in zip(layers[:-1], layers[1:]):
        totals = neuron_totals(result.layers[upper])
        order = rank_neurons(totals)
        upper_selected = Selected(order, torch.tensor([4, 3]), totals, neuron_totals(record.activations[upper]))
        flows = edge_relevance(explainer, record, result.layers[upper], upper, lower, upper_selected)
        assert flows.shape == (2, 4, result.layers[lower].shape[1])
        received = flows.sum(2)
        sent = totals.gather(1, order[:, :4]) * torch.tensor([[1.0] * 4, [1.0] * 3 + [0.0]])
        assert torch.allclose(received, sent, rtol=1e-4, atol=1e-4 * float(sent.abs().max())), (lower, upper)


def test_path_graph_round_trips_the_records(small_vgg16):
    explainer = lrpscale.Explainer(small_vgg16)
    layers = default_path_layers(explainer)
    x = _images(12, n=2)
    result = explainer.explain(x)
    record = explainer.forward(x)
    counts = torch.tensor([3, 2])
    selected = {}
    for layer in layers:
        totals = neuron_totals(result.layers[layer])
        selected[layer] = Selected(rank_neurons(totals), counts, totals, neuron_totals(record.activations[layer]))
    nodes, edges = critical_path(explainer, record, result.layers, selected, layers, result.target, result.initial)
    for n in range(2):
        k = int(counts[n])
        assert len(nodes[n]) == k * len(layers) + 1
        assert len(edges[n]) == k * k * (len(layers) - 1) + k
        graph = path_graph(nodes[n], edges[n])
        back_nodes = [{"layer": attributes["layer"], "neuron": neuron, "rank": attributes["rank"],
                       "relevance": attributes["relevance"], "activation": attributes["activation"]}
                      for (_, neuron), attributes in graph.nodes(data=True)]
        back_edges = [{"layer_from": a[0], "neuron_from": a[1], "layer_to": b[0], "neuron_to": b[1],
                       "relevance": data["relevance"]} for a, b, data in graph.edges(data=True)]
        key = lambda record: sorted(record.items())  # noqa: E731
        assert sorted(map(key, back_nodes)) == sorted(map(key, nodes[n]))
        assert sorted(map(key, back_edges)) == sorted(map(key, edges[n]))
        position = {layer: index for index, layer in enumerate(layers + [OUTPUT])}
        assert all(position[a[0]] + 1 == position[b[0]] for a, b in graph.edges)  # lower -> the next one up
        assert graph.nodes[(OUTPUT, int(result.target[n]))]["relevance"] == pytest.approx(float(result.initial[n]))

    # an edge is the relevance the lower neuron gets when only the upper one is propagated:
    # the same number from a full pass restricted to that single upper neuron
    lower, upper = layers[3], layers[4]
    conditions = [{upper: [selected[upper].neurons(n)[j:j + 1] for n in range(2)]} for j in range(3)]
    restricted = explainer.explain(x, restrict=conditions).layers[lower]
    for n in range(2):
        weights = {(e["neuron_from"], e["neuron_to"]): e["relevance"] for e in edges[n]
                   if e["layer_from"] == lower and e["layer_to"] == upper}
        scale = float(neuron_totals(restricted[n], lead=1).abs().max())
        for j, upper_neuron in enumerate(selected[upper].neurons(n)):
            for lower_neuron in selected[lower].neurons(n):
                expected = float(restricted[n, j, lower_neuron].sum())
                assert weights[(lower_neuron, upper_neuron)] == pytest.approx(expected, abs=1e-5 * scale)


# 4. Deconvolution -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["features.0", "features.8", "features.18"])
def test_deconvolution_equals_zennit_deconvnet(small_vgg11, explainer11, layer):
    x = _images(13, n=2)
    activation = explainer11.forward(x).activations[layer]
    channel = int(activation.sum((2, 3)).min(0).values.argmax())  # active in both images
    for mode in ("all", "max"):
        mask = torch.zeros_like(activation)
        if mode == "all":
            mask[:, channel] = 1.0
        else:
            for n in range(2):
                position = int(activation[n, channel].flatten().argmax())
                mask[n, channel].view(-1)[position] = 1.0
        ours = deconvolve(small_vgg11, x, layer, channel, mode)
        theirs = zennit_deconv(small_vgg11, x, layer, mask)
        assert ours.shape == x.shape
        assert float(theirs.abs().max()) > 0
        assert relative_max_diff(ours, theirs) < 1e-5, mode


def test_deconvolve_many_equals_separate_calls(explainer11):
    x = _images(14, n=2)
    layer = "features.13"
    channels = torch.tensor([[3, 0, 70], [5, 127, 3]])
    record = explainer11.forward(x)
    for mode in ("all", "max"):
        together = deconvolve_many(explainer11, record, layer, channels, mode)
        assert together.shape == (2, 3, 3, 32, 32)
        for n in range(2):
            for j in range(3):
                alone = deconvolve(explainer11, x[n:n + 1], layer, int(channels[n, j]), mode)[0]
                assert torch.allclose(together[n, j], alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max())), (
                    mode, n, j)


def test_deconvolution_refuses_linear_layers_and_unknown_modes(small_vgg11):
    x = _images(15, n=1)
    with pytest.raises(ValueError, match="linear"):
        deconvolve(small_vgg11, x, "fc6", 0)
    with pytest.raises(ValueError, match="mode"):
        deconvolve(small_vgg11, x, "features.0", 0, "mean")


# 5. The Analyzer ---------------------------------------------------------------------------------

RECORD_KEYS = {"pred", "target", "logit", "prob", "rel_total", "rel_pos", "rel_neg", "conservation_error",
               "heatmap", "layer_totals", "neurons", "scores", "edges", "deconv", "faithfulness",
               "channel_relevance"}


@pytest.fixture(scope="module")
def analysis_config():
    return AnalysisConfig(sweep_layers=("conv5_3", "conv4_2"), ks=(1, 4, 16, 64), path_k=3, heatmap_size=16,
                          deconv_size=8, deconv_layers=("conv5_3",), deconv_per_layer=2)


def test_analyzer_perturbs_the_rows_asked_with_their_heatmaps(small_vgg16, analysis_config):
    """perturb: rows 0 and 2 with seeds 5 and 9; their curve points are region_perturbation's of the
    batch's own heatmaps (same seeds), row 1 has none."""
    from lrpscale.engine.faithfulness import ORDERS, region_perturbation

    x = _images(16, n=3)
    config = dataclasses.replace(analysis_config, faithfulness_steps=4, faithfulness_fraction=0.25)
    batch = Analyzer(small_vgg16, config)(x, perturb=torch.tensor([5, -1, 9]))
    records = batch.records()
    assert records[1]["faithfulness"] == []
    expected = region_perturbation(small_vgg16, x[[0, 2]], batch.heatmap[[0, 2]], batch.target[[0, 2]], steps=4,
                                   fraction=0.25, seed=torch.tensor([5, 9]))
    for m, n in enumerate((0, 2)):
        points = records[n]["faithfulness"]
        assert [(p["order"], p["step"]) for p in points] == [(o, k) for o in ORDERS for k in range(5)]
        for order in ORDERS:
            logits = [p["logit"] for p in points if p["order"] == order]
            np.testing.assert_allclose(logits, expected.logits[order][m].numpy(), rtol=1e-5, atol=1e-5)
        assert points[0]["logit"] == pytest.approx(float(batch.logits[n, batch.target[n]]), rel=1e-5)


def test_analyzer_records(small_vgg16, analysis_config):
    x = _images(16, n=3)
    analyzer = Analyzer(small_vgg16, analysis_config)
    batch = analyzer(x)
    records = batch.records()
    assert len(records) == 3
    swept = {"features.28", "features.19"}
    path = set(default_path_layers(analyzer.explainer))
    top_conv = []  # per image, its selected neurons of conv5_3 in rank order
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["heatmap"].shape == (16, 16)
        by_layer: dict[str, list[dict]] = {}
        for neuron in record["neurons"]:
            by_layer.setdefault(neuron["layer"], []).append(neuron)
        assert set(by_layer) == swept | path
        groups: dict[tuple, list[dict]] = {}
        for score in record["scores"]:
            groups.setdefault((score["layer"], score["variant"]), []).append(score)
        assert set(groups) == {(layer, variant) for layer in swept for variant in ("fidelity", "forward_backward")}
        for (layer, variant), rows in groups.items():
            assert sum(row["chosen"] for row in rows) == 1, (layer, variant)
        for layer in swept:
            fidelity = sorted(groups[(layer, "fidelity")], key=lambda row: row["k"])
            ks = [row["k"] for row in fidelity]
            assert ks == [1, 4, 16, 64]  # both swept layers have 64 channels
            k_star = ks[_rule([row["smape"] for row in fidelity], ks, analysis_config.score_target)]
            chosen = {variant: next(row["k"] for row in groups[(layer, variant)] if row["chosen"])
                      for variant in ("fidelity", "forward_backward")}
            assert chosen == {"fidelity": k_star, "forward_backward": k_star}
            assert len(by_layer[layer]) == k_star
            assert [n["rank"] for n in by_layer[layer]] == list(range(k_star))
            relevances = [n["relevance"] for n in by_layer[layer]]
            assert relevances == sorted(relevances, reverse=True)
        for layer in path - swept:
            assert len(by_layer[layer]) == analysis_config.path_k
        selected = {(n["layer"], n["neuron"]) for n in record["neurons"]} | {(OUTPUT, record["target"])}
        assert record["edges"]
        for edge in record["edges"]:
            assert (edge["layer_from"], edge["neuron_from"]) in selected
            assert (edge["layer_to"], edge["neuron_to"]) in selected
            assert edge["layer_from"] in path and (edge["layer_to"] in path or edge["layer_to"] == OUTPUT)
        assert all(d["reconstruction"].shape == (3, 8, 8) for d in record["deconv"])
        assert record["target"] == record["pred"]
        top_conv.append([n["neuron"] for n in by_layer["features.28"]])
    # deconvolutions: each image's top selected neurons of conv5_3, at most deconv_per_layer of them
    j = analysis_config.deconv_per_layer
    assert [[d["neuron"] for d in record["deconv"]] for record in records] == [neurons[:j] for neurons in top_conv]


def test_analyzer_swept_selection_with_mse(small_vgg16):
    x = _images(17, n=2)
    config = AnalysisConfig(sweep_layers=("conv5_3", "fc7"), ks=(1, 2, 4, 8, 16), score_metric="mse",
                            score_target=5e-7, path_k=2)
    records = Analyzer(small_vgg16, config)(x).records()
    for record in records:
        for layer in ("features.28", "classifier.3"):
            fidelity = sorted((s for s in record["scores"] if s["variant"] == "fidelity" and s["layer"] == layer),
                              key=lambda s: s["k"])
            ks = [s["k"] for s in fidelity]
            assert ks == [1, 2, 4, 8, 16]
            k_star = ks[_rule([s["mse"] for s in fidelity], ks, 5e-7)]
            assert next(s["k"] for s in fidelity if s["chosen"]) == k_star, layer
            assert sum(n["layer"] == layer for n in record["neurons"]) == k_star, layer


@pytest.fixture(scope="module")
def alone_and_together(small_vgg16, analysis_config):
    """One image analysed alone and inside a batch of 3 whose other images choose fewer neurons.

    The SMAPE target is set between the images' scores at k=1: the image with the worst k=1 score
    needs k* >= 4 at conv5_3 (k = all neurons always scores 0), the one with the best stops at k=1.
    """
    x = _images(16, n=3)
    explainer = lrpscale.Explainer(small_vgg16)
    full = explainer.explain(x)
    first = sweep(explainer, explainer.forward(x), full.relevance, full.layers["features.28"], "features.28", [1])
    at_one = first.scores["fidelity"][1][:, 0]
    assert float(at_one.max() - at_one.min()) > 1.0
    config = dataclasses.replace(analysis_config, score_target=float(at_one.max() + at_one.min()) / 2)
    analyzer = Analyzer(small_vgg16, config)
    image = int(at_one.argmax())
    together = analyzer(x)
    alone = analyzer(x[image:image + 1])
    assert int(together.sweeps["features.28"].chosen_k[image]) >= 2
    assert int(together.sweeps["features.28"].chosen_k.min()) == 1
    return alone, together, image


def test_analysis_does_not_depend_on_the_batch(alone_and_together):
    alone, together, image = alone_and_together
    assert torch.allclose(alone.heatmap[0], together.heatmap[image], rtol=1e-4,
                          atol=1e-6 * float(together.heatmap[image].abs().max()))
    one, many = alone.records()[0], together.records()[image]
    assert one["neurons"] and [(n["layer"], n["neuron"], n["rank"]) for n in one["neurons"]] == [
        (n["layer"], n["neuron"], n["rank"]) for n in many["neurons"]]
    assert [(e["layer_from"], e["neuron_from"], e["layer_to"], e["neuron_to"]) for e in one["edges"]] == [
        (e["layer_from"], e["neuron_from"], e["layer_to"], e["neuron_to"]) for e in many["edges"]]
    assert [e["relevance"] for e in one["edges"]] == pytest.approx(
        [e["relevance"] for e in many["edges"]], rel=1e-4, abs=1e-6 * max(abs(e["relevance"]) for e in many["edges"]))
    assert [(s["layer"], s["k"], s["variant"], s["chosen"]) for s in one["scores"]] == [
        (s["layer"], s["k"], s["variant"], s["chosen"]) for s in many["scores"]]
    assert [s["smape"] for s in one["scores"]] == pytest.approx([s["smape"] for s in many["scores"]], abs=1e-3)
    assert [s["mse"] for s in one["scores"]] == pytest.approx([s["mse"] for s in many["scores"]], rel=1e-3,
                                                              abs=1e-12)


def test_deconvolutions_do_not_depend_on_the_batch(alone_and_together):
    # deconv_per_layer = 2 and this image selects at least 2 neurons of conv5_3: it gets 2
    # reconstructions whatever the other images of its batch selected
    alone, together, image = alone_and_together
    one, many = alone.records()[0], together.records()[image]
    assert [d["neuron"] for d in one["deconv"]] == [n["neuron"] for n in one["neurons"]
                                                    if n["layer"] == "features.28"][:2]
    assert [(d["layer"], d["neuron"]) for d in many["deconv"]] == [(d["layer"], d["neuron"]) for d in one["deconv"]]
    for a, b in zip(one["deconv"], many["deconv"]):
        assert np.allclose(a["reconstruction"], b["reconstruction"], rtol=1e-4,
                           atol=1e-6 * float(np.abs(b["reconstruction"]).max()))


def test_analyzer_explains_the_label(small_vgg16):
    x = _images(19, n=3)
    analyzer = Analyzer(small_vgg16, AnalysisConfig(target="label", path_k=2, ks=(1, 64)))
    logits = analyzer.explainer.forward(x).logits
    labels = (logits.argmax(1) + torch.tensor([1, 2, 3])) % 10  # never the prediction
    batch = analyzer(x, labels)
    assert batch.target.tolist() == labels.tolist()
    records = batch.records()
    assert [r["target"] for r in records] == labels.tolist()
    assert all(r["target"] != r["pred"] for r in records)
    assert [r["logit"] for r in records] == pytest.approx(logits[torch.arange(3), labels].tolist())
    expected = analyzer.explainer.explain(x, target=labels).relevance
    assert _close(batch.heatmap, expected, 1e-6)
    assert all(any(e["layer_to"] == OUTPUT and e["neuron_to"] == r["target"] for e in r["edges"]) for r in records)
    with pytest.raises(ValueError, match="labels"):
        analyzer(x)
