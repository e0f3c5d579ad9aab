"""One batch in, one batch of results out: the unit of work a Ray actor runs.

``Analyzer(model, config)(x, labels)`` runs the whole per-image method of docs/method.md:
the LRP heatmap with its conservation report, the k sweep with MSE/SMAPE scores and the chosen
k, the selected neurons, the critical path and deconvolutions of the path's top neurons. It
returns tensors plus small Python records; it knows nothing of Ray or Parquet.

Cost, in units of one LRP heatmap (forward + backward), measured by
``benchmarks/selection_throughput.py`` for VGG16 at 224x224 with the defaults: about 4 heatmaps
per image on a 2-core CPU (sweep 1.5, critical-path edges 1.3, deconvolution 0.3) and about 7 on
an H100 at batch 32-64, where the many small batched passes of the edges use the GPU less well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lrpscale.config import AnalysisConfig
from lrpscale.engine.critical_path import Selected, critical_path, default_path_layers
from lrpscale.engine.deconvolution import deconvolve_many
from lrpscale.engine.explainer import Explainer, conservation_error
from lrpscale.engine.faithfulness import ORDERS, PerturbationCurves, region_perturbation
from lrpscale.engine.selection import VARIANTS, Sweep, neuron_totals, rank_neurons, sweep

Tensor = torch.Tensor


@dataclass
class BatchAnalysis:
    """Everything the analysis found for N images.

    heatmap: (N, 3, H, W) input relevance; heatmap_small: (N, s, s) colour-summed, area-resized;
    logits: (N, K); target: (N,); initial: (N,); totals: {layer or "input": (N,)};
    conservation_error: (N,); sweeps: {layer: Sweep}; selected: {layer: Selected}; nodes/edges:
    per-image path records; deconv: {layer: (neurons (N, J), reconstructions (N, J, 3, d, d))}.
    perturbed: (M,) rows of the images whose region perturbation curves ``curves`` holds (M of N,
    in that order; docs/method.md §16), or None when no image of the batch was sampled.
    """

    heatmap: Tensor
    heatmap_small: Tensor
    logits: Tensor
    target: Tensor
    initial: Tensor
    totals: dict[str, Tensor]
    conservation_error: Tensor
    sweeps: dict[str, Sweep]
    selected: dict[str, Selected]
    path_layers: list[str]
    nodes: list[list[dict]]
    edges: list[list[dict]]
    deconv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    perturbed: Tensor | None = None
    curves: PerturbationCurves | None = None

    def records(self) -> list[dict]:
        """One plain-Python record per image: scalars, the small heatmap as a float32 array, the
        channel relevance (C,) float32 of the first swept layer divided by its sum of |values|
        (zeros stay zeros; None without a swept layer), and nested lists of neurons, scores, edges
        and deconvolutions (the shape Parquet rows take)."""
        # every tensor to plain lists once: element-wise reads of GPU tensors would sync each time
        probabilities = self.logits.softmax(1)
        relevance_in = self.heatmap.flatten(1)
        rel_pos = relevance_in.clamp(min=0).sum(1).tolist()
        rel_neg = relevance_in.clamp(max=0).sum(1).tolist()
        targets, preds = self.target.tolist(), self.logits.argmax(1).tolist()
        rows_of = torch.arange(len(targets), device=self.logits.device)
        logits = self.logits[rows_of, self.target].tolist()
        probs = probabilities[rows_of, self.target].tolist()
        totals = {layer: total.tolist() for layer, total in self.totals.items()}
        conservation = self.conservation_error.tolist()
        selected = {layer: (chosen.relevance.tolist(), chosen.activation.tolist(), chosen)
                    for layer, chosen in self.selected.items()}
        small = self.heatmap_small.float().cpu().numpy()
        channel_relevance = self._channel_relevance()  # not `channels`: the deconvolution loop below uses that name
        pictures = {layer: (channels.tolist(), images.float().cpu().numpy(), self.selected[layer].counts.tolist())
                    for layer, (channels, images) in self.deconv.items()}
        score_lists = {layer: {variant: tuple(t.tolist() for t in result.scores[variant]) for variant in VARIANTS}
                       for layer, result in self.sweeps.items()}
        chosen_index = {layer: result.chosen.tolist() for layer, result in self.sweeps.items()}
        curve_points = self._curve_points()
        rows = []
        for n in range(len(targets)):
            neurons = [{"layer": layer, "neuron": neuron, "rank": rank, "relevance": relevance[n][neuron],
                        "activation": activation[n][neuron]}
                       for layer, (relevance, activation, chosen) in selected.items()
                       for rank, neuron in enumerate(chosen.neurons(n))]
            scores = []
            for layer, result in self.sweeps.items():
                for variant in VARIANTS:
                    mse_values, smape_values = (t[n] for t in score_lists[layer][variant])
                    for index, k in enumerate(result.ks):
                        scores.append({"layer": layer, "k": k, "variant": variant, "mse": mse_values[index],
                                       "smape": smape_values[index], "chosen": index == chosen_index[layer][n]})
            deconvs = []
            for layer, (channels, images, counts) in pictures.items():
                own = min(len(channels[n]), counts[n])  # this image's own selected neurons only
                for j, channel in enumerate(channels[n][:own]):
                    deconvs.append({"layer": layer, "neuron": channel, "reconstruction": images[n, j]})
            rows.append({
                "pred": preds[n],
                "target": targets[n],
                "logit": logits[n],
                "prob": probs[n],
                "rel_total": totals["input"][n],
                "rel_pos": rel_pos[n],
                "rel_neg": rel_neg[n],
                "conservation_error": conservation[n],
                "heatmap": small[n],
                "channel_relevance": None if channel_relevance is None else channel_relevance[n],
                "layer_totals": {layer: total[n] for layer, total in totals.items()},
                "neurons": neurons,
                "scores": scores,
                "edges": self.edges[n],
                "deconv": deconvs,
                "faithfulness": curve_points.get(n, []),
            })
        return rows

    def _channel_relevance(self):
        """(N, C) float32 numpy: the per-channel relevance of the first swept layer, each row divided
        by its sum of |values| (SpRAy's channel features, docs/method.md §18), or None."""
        if not self.sweeps:
            return None
        relevance = self.selected[next(iter(self.sweeps))].relevance.float()
        total = relevance.abs().sum(1, keepdim=True)
        return torch.where(total > 0, relevance / total.clamp(min=torch.finfo(torch.float32).tiny),
                           torch.zeros_like(relevance)).cpu().numpy()

    def _curve_points(self) -> dict[int, list[dict]]:
        """{image row: its curve points (order, step, fraction, logit, prob), orders in ``ORDERS``
        order, steps ascending}; only the perturbed images have one."""
        if self.curves is None:
            return {}
        fractions = self.curves.fractions.tolist()
        logits = {order: self.curves.logits[order].tolist() for order in ORDERS}
        probs = {order: self.curves.probs[order].tolist() for order in ORDERS}
        return {n: [{"order": order, "step": step, "fraction": fraction, "logit": logits[order][m][step],
                     "prob": probs[order][m][step]}
                    for order in ORDERS for step, fraction in enumerate(fractions)]
                for m, n in enumerate(self.perturbed.tolist())}


def use_tf32(enabled: bool) -> None:
    """Allow or forbid TF32 in CUDA convolutions and matrix products, process-wide.

    Sets torch's legacy flags, the ``fp32_precision`` ones of newer releases and, for a process
    that has not started CUDA yet, ``NVIDIA_TF32_OVERRIDE``: on an H100 with cuDNN 9.14 the torch
    flags alone still left TF32 convolutions on some machines (heatmaps off by 2e-2 relative L2).
    """
    if not enabled:
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    else:
        os.environ.pop("NVIDIA_TF32_OVERRIDE", None)
    backends = torch.backends
    backends.cudnn.allow_tf32 = enabled
    backends.cuda.matmul.allow_tf32 = enabled
    for holder in (getattr(backends.cudnn, "conv", None), getattr(backends.cuda, "matmul", None)):
        if holder is not None and hasattr(holder, "fp32_precision"):
            holder.fp32_precision = "tf32" if enabled else "ieee"


def area_resize(pictures: Tensor, size: int) -> Tensor:
    """(..., H, W) -> (..., s, s) by area averaging, s = min(size, H): keeps small images as they are."""
    side = min(size, pictures.shape[-1])
    lead = pictures.shape[:-2]
    flat = pictures.reshape(-1, 1, *pictures.shape[-2:])
    return F.adaptive_avg_pool2d(flat, side).reshape(*lead, side, side)


class Analyzer:
    """Holds one model replica and its explainer; call it with a batch of images.

    ``__call__(x (N, 3, H, W), labels=None, perturb=None) -> BatchAnalysis``; ``perturb``: (N,)
    int64 per-image seeds of the random patch order for the images whose region perturbation
    curves are wanted, -1 for the others (the caller draws the sample). Construct once per
    worker: rule weights are prepared here and reused for every batch.
    """

    def __init__(self, model: torch.nn.Module, config: AnalysisConfig | None = None):
        self.config = config or AnalysisConfig()
        self.explainer = Explainer(model, self.config.composite)
        resolve = self.explainer.resolve
        convs = [s.name for s in self.explainer.steps
                 if s.is_param and isinstance(s.rule.module, torch.nn.Conv2d)]
        self.sweep_layers = [resolve(l) for l in (self.config.sweep_layers or [convs[-1]])]
        self.path_layers = [resolve(l) for l in (self.config.path_layers or default_path_layers(self.explainer))]
        self.path_layers.sort(key=self.explainer.layer_names.index)
        self.deconv_layers = [resolve(l) for l in (self.config.deconv_layers or [convs[-1]])]
        missing = [l for l in self.deconv_layers if l not in self.path_layers + self.sweep_layers]
        if missing:
            raise ValueError(f"deconvolution layers {missing} must be path or sweep layers (their selected neurons "
                             "are what gets reconstructed)")

    @torch.no_grad()
    def __call__(self, x: Tensor, labels: Tensor | None = None, perturb: Tensor | None = None) -> BatchAnalysis:
        cfg, explainer = self.config, self.explainer
        record = explainer.forward(x)
        if cfg.target == "label":
            if labels is None:
                raise ValueError("target='label' needs labels for every image")
            target = explainer.targets(record, labels)
        else:
            target = explainer.targets(record, None)
        initial = explainer.initial_relevance(record, target)
        keep = set(self.sweep_layers) | set(self.path_layers)
        heatmap, kept, totals = explainer.propagate(record, initial, keep=keep)
        heatmap = heatmap[:, 0]
        kept = {k: v[:, 0] for k, v in kept.items()}
        totals = {k: v[:, 0] for k, v in totals.items()}
        rows = torch.arange(len(target), device=target.device)
        initial_values = record.logits[rows, target]
        conservation = conservation_error(totals["input"], initial_values)

        sweeps = {layer: sweep(explainer, record, heatmap, kept[layer], layer, cfg.ks, cfg.score_metric,
                               cfg.score_target, cfg.absolute)
                  for layer in self.sweep_layers}
        selected = {}
        for layer in dict.fromkeys(self.path_layers + self.sweep_layers):
            if layer in sweeps:
                result = sweeps[layer]
                counts = result.chosen_k
                selected[layer] = Selected(result.order, counts, result.relevance, result.activation)
            else:
                relevance = neuron_totals(kept[layer])
                order = rank_neurons(relevance, cfg.absolute)
                counts = torch.full_like(target, min(cfg.path_k, relevance.shape[1]))
                selected[layer] = Selected(order, counts, relevance, neuron_totals(record.activations[layer]))
        # the path follows at most path_k neurons per layer: all k* of a swept layer would cost one
        # backward pass per neuron and make the graph unreadable
        path_selected = {layer: Selected(chosen.order, chosen.counts.clamp(max=cfg.path_k), chosen.relevance,
                                         chosen.activation) for layer, chosen in selected.items()}
        nodes, edges = critical_path(explainer, record, kept, path_selected, self.path_layers, target,
                                     initial_values)
        deconv = {}
        for layer in self.deconv_layers:
            # enough for the image with most selected neurons; records() keeps each image's own share
            j = min(cfg.deconv_per_layer, int(selected[layer].counts.max()))
            channels = selected[layer].order[:, :j]
            pictures = deconvolve_many(explainer, record, layer, channels, cfg.deconv_mode)
            deconv[layer] = (channels, area_resize(pictures, cfg.deconv_size))
        perturbed = curves = None
        if perturb is not None and bool((perturb >= 0).any()):
            # the heatmap just computed is the attribution: only forwards of perturbed copies remain
            perturb = perturb.to(heatmap.device)
            perturbed = (perturb >= 0).nonzero()[:, 0]
            curves = region_perturbation(explainer.model, x.to(heatmap.device)[perturbed], heatmap[perturbed],
                                         target[perturbed], patch_size=cfg.faithfulness_patch_size,
                                         steps=cfg.faithfulness_steps, fraction=cfg.faithfulness_fraction,
                                         seed=perturb[perturbed].cpu())
        return BatchAnalysis(
            heatmap=heatmap, heatmap_small=area_resize(heatmap.sum(1), cfg.heatmap_size), logits=record.logits,
            target=target, initial=initial_values, totals=totals, conservation_error=conservation, sweeps=sweeps,
            selected=selected, path_layers=self.path_layers, nodes=nodes, edges=edges, deconv=deconv,
            perturbed=perturbed, curves=curves)
