"""Independent references the tests compare lrpscale with: zennit's composites, hooks and canonizers."""
from __future__ import annotations

import torch
from zennit.composites import DeconvNet, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import VGGCanonizer


def zennit_composite(name: str, low: torch.Tensor, high: torch.Tensor, shape, canonize: bool):
    kwargs = {"canonizers": [VGGCanonizer()]} if canonize else {}
    if name == "epsilon-gamma-box":
        return EpsilonGammaBox(low=low.reshape(1, -1, 1, 1).expand(shape), high=high.reshape(1, -1, 1, 1).expand(shape),
                               **kwargs)
    return {"epsilon-plus-flat": EpsilonPlusFlat, "epsilon-alpha2-beta1": EpsilonAlpha2Beta1,
            "epsilon-alpha2-beta1-flat": EpsilonAlpha2Beta1Flat}[name](**kwargs)


def zennit_lrp(model, x, target, composite: str, low, high, canonize=False, masks=None):
    """Input relevance (N,3,H,W) and relevance at every conv/linear output, computed by zennit.

    ``masks``: optional {module name: (N, C) 0/1 mask} multiplying the relevance that flows into
    each named layer's output, as zennit-crp conditions a heatmap: a tensor hook on the gradient.
    """
    model = model.eval()
    composite_obj = zennit_composite(composite, low, high, x.shape, canonize)
    layers: dict[str, torch.Tensor] = {}
    handles = []
    x = x.clone().requires_grad_(True)
    with composite_obj.context(model) as modified:
        for name, module in modified.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                def hook(mod, inputs, output, name=name):
                    def grad_hook(grad):
                        if masks and name in masks:
                            mask = masks[name].to(grad)
                            grad = grad * mask.reshape(*mask.shape, *([1] * (grad.ndim - 2)))
                        layers[name] = grad.detach().clone()
                        return grad
                    output.register_hook(grad_hook)
                handles.append(module.register_forward_hook(hook))
        out = modified(x)
        init = torch.zeros_like(out)
        rows = torch.arange(len(x))
        init[rows, target] = out[rows, target]
        relevance, = torch.autograd.grad(out, x, init)
    for handle in handles:
        handle.remove()
    return relevance.detach(), layers


def zennit_deconv(model, x, layer: str, feature_mask: torch.Tensor):
    """Gradient of zennit's DeconvNet composite from ``feature_mask`` * activation at ``layer``'s ReLU output."""
    composite = DeconvNet()
    x = x.clone().requires_grad_(True)
    captured = {}
    module = dict(model.named_modules())[layer]
    relu = None
    names = [n for n, _ in model.named_modules()]
    # the ReLU right after the layer: its output is the feature map deconvolution starts from
    for name in names[names.index(layer) + 1:]:
        if isinstance(dict(model.named_modules())[name], torch.nn.ReLU):
            relu = dict(model.named_modules())[name]
            break
    with composite.context(model) as modified:
        # registered inside the context, so it sees the output after zennit's own hook wrapped it
        handle = (relu or module).register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        modified(x)
        out = captured["out"]
        grad, = torch.autograd.grad(out, x, feature_mask * out.detach())
    handle.remove()
    return grad.detach()


def normalized(relevance: torch.Tensor) -> torch.Tensor:
    """Each image's relevance divided by its sum of absolute values."""
    return relevance / relevance.abs().flatten(1).sum(1).reshape(-1, *([1] * (relevance.ndim - 1)))


def relative_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
