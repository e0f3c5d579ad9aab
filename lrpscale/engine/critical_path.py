"""Critical paths: how relevance flows between the selected neurons of consecutive path layers.

docs/method.md §10. Nodes are (layer, neuron) for the selected neurons of the path layers and
the output class. Edge (lower i) -> (upper j) carries the relevance neuron i receives when only
neuron j's relevance is propagated down to the lower path layer; all j of a layer pair go down
as one batch of masks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lrpscale.engine import rules
from lrpscale.engine.explainer import Explainer, ForwardRecord
from lrpscale.engine.selection import neuron_totals
from lrpscale.graph import OUTPUT

Tensor = torch.Tensor


def default_path_layers(explainer: Explainer) -> list[str]:
    """The last conv of each block (the conv before a max-pool) and every linear layer but the
    last (fc6, fc7), bottom to top. For VGG16: conv1_2, conv2_2, conv3_3, conv4_3, conv5_3, fc6, fc7."""
    layers, last_conv = [], None
    for step in explainer.steps:
        if step.is_param and isinstance(step.rule.module, nn.Conv2d):
            last_conv = step.name
        elif isinstance(step.rule, rules.WinnerTakesAll) and last_conv is not None:
            layers.append(last_conv)
            last_conv = None
        elif step.is_param:
            layers.append(step.name)
    return layers[:-1]  # the last linear layer is the output, a node of its own


@dataclass
class Selected:
    """Neurons chosen at one layer for N images: the first counts[n] entries of order[n].

    order: (N, C) neurons by relevance; counts: (N,); relevance, activation: (N, C) totals.
    """

    order: Tensor
    counts: Tensor
    relevance: Tensor
    activation: Tensor

    _lists: list[list[int]] | None = field(default=None, init=False, repr=False)

    def neurons(self, image: int) -> list[int]:
        """The selected neurons of one image, most relevant first."""
        if self._lists is None:  # one transfer for all images: per-image reads would sync a GPU each time
            self._lists = [row[:count] for row, count in zip(self.order.tolist(), self.counts.tolist())]
        return self._lists[image]

    def one_hot(self) -> Tensor:
        """(N, K, C) with row j the indicator of the j-th selected neuron (zero past counts[n])."""
        n, c = self.order.shape
        k = int(self.counts.max())
        rows = torch.zeros(n, k, c, device=self.order.device)
        rows.scatter_(2, self.order[:, :k].unsqueeze(2), 1.0)
        valid = torch.arange(k, device=self.order.device).unsqueeze(0) < self.counts.unsqueeze(1)
        return rows * valid.unsqueeze(2)


def edge_relevance(explainer: Explainer, record: ForwardRecord, upper_relevance: Tensor, upper: str,
                   lower: str, upper_selected: Selected) -> Tensor:
    """(N, K, C_lower): neuron totals at ``lower`` from each of the K selected neurons of ``upper`` alone.

    upper_relevance: (N, C_upper, ...) relevance at the upper layer's output (full pass).
    """
    one_hot = upper_selected.one_hot()
    seeds = upper_relevance.unsqueeze(1) * one_hot.reshape(*one_hot.shape, *([1] * (upper_relevance.ndim - 2)))
    lower_relevance, _, _ = explainer.propagate(record, seeds, start=upper, stop=lower)
    return neuron_totals(lower_relevance, lead=2)


def critical_path(explainer: Explainer, record: ForwardRecord, relevance_at: dict[str, Tensor],
                  selected: dict[str, Selected], layers: Sequence[str], target: Tensor,
                  initial: Tensor) -> tuple[list[list[dict]], list[list[dict]]]:
    """Nodes and edges of every image's critical path.

    relevance_at[layer]: (N, C, ...) relevance at each path layer's output from the full pass;
    selected[layer]: its selected neurons; layers: path layers bottom to top; target, initial:
    (N,) class and initial relevance (the output node). Returns per image a list of node records
    (layer, neuron, rank, relevance, activation) and a list of edge records (layer_from,
    neuron_from, layer_to, neuron_to, relevance).
    """
    n = target.shape[0]
    nodes: list[list[dict]] = [[] for _ in range(n)]
    edges: list[list[dict]] = [[] for _ in range(n)]
    # plain lists first: reading GPU tensors element by element would sync the device each time
    relevance = {layer: selected[layer].relevance.tolist() for layer in layers}
    activation = {layer: selected[layer].activation.tolist() for layer in layers}
    chosen = {layer: [selected[layer].neurons(image) for image in range(n)] for layer in layers}
    targets, initials = target.tolist(), initial.tolist()
    logits = record.logits[torch.arange(n, device=target.device), target].tolist()
    for layer in layers:
        for image in range(n):
            for rank, neuron in enumerate(chosen[layer][image]):
                nodes[image].append({"layer": layer, "neuron": neuron, "rank": rank,
                                     "relevance": relevance[layer][image][neuron],
                                     "activation": activation[layer][image][neuron]})
    for image in range(n):
        nodes[image].append({"layer": OUTPUT, "neuron": targets[image], "rank": 0,
                             "relevance": initials[image], "activation": logits[image]})
    for lower, upper in zip(layers[:-1], layers[1:]):
        flows = edge_relevance(explainer, record, relevance_at[upper], upper, lower, selected[upper]).tolist()
        for image in range(n):
            for j, upper_neuron in enumerate(chosen[upper][image]):
                for lower_neuron in chosen[lower][image]:
                    edges[image].append({"layer_from": lower, "neuron_from": lower_neuron, "layer_to": upper,
                                         "neuron_to": upper_neuron, "relevance": flows[image][j][lower_neuron]})
    top = layers[-1]
    for image in range(n):  # only the target's relevance is propagated: the top layer's relevance is its edge
        for neuron in chosen[top][image]:
            edges[image].append({"layer_from": top, "neuron_from": neuron, "layer_to": OUTPUT,
                                 "neuron_to": targets[image], "relevance": relevance[top][image][neuron]})
    return nodes, edges
