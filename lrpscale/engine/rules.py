"""LRP rules: one small class per rule, each bound to one layer of the model.

A rule runs its layer's forward pass, keeping what its backward pass needs (``ctx``), and maps
the relevance at the layer's output to relevance at its input. Relevance tensors carry a
condition axis after the batch axis, ``(N, M, *shape)``: M masked variants of the same images
share one forward pass, which is what makes restricted propagation and k sweeps cheap.

Every rule is equal to zennit's rule of the same name (zennit/rules.py, version 0.5.1), but
computed directly: rule-modified weights are cached once per explainer, inputs known to be
non-negative (after a ReLU) skip the terms that vanish, and the transposed convolution is called
once per term instead of re-running the layer's forward through autograd.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """z + epsilon * sign(z), with sign(0) = +1 (zennit's default stabiliser)."""
    return z + torch.where(z >= 0, epsilon, -epsilon)


def _conditions_first(relevance: Tensor) -> tuple[Tensor, int, int]:
    """(N, M, *s) -> (N*M, *s), returning N and M to undo it."""
    n, m = relevance.shape[:2]
    return relevance.reshape(n * m, *relevance.shape[2:]), n, m


class Rule:
    """Base class. ``forward(x) -> (y, ctx)``; ``backward(relevance (N,M,*out), ctx) -> (N,M,*in)``.

    ``owned=True`` tells ``backward`` that nothing else holds ``relevance``, so it may divide it
    in place: one tensor of the layer's output size less to allocate (on a CPU, every fresh
    large tensor costs a page fault per 4 KB).
    """

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def backward(self, relevance: Tensor, ctx: dict, owned: bool = False) -> Tensor:
        raise NotImplementedError


def _divided(relevance: Tensor, denominator: Tensor, owned: bool) -> Tensor:
    """relevance / denominator (broadcast over the condition axis), in place when owned."""
    return relevance.div_(denominator) if owned else relevance / denominator


class Pass(Rule):
    """ReLU, dropout (eval) and identity layers hand relevance through unchanged."""

    def __init__(self, module: nn.Module):
        self.relu = isinstance(module, nn.ReLU)

    def forward(self, x):
        # never in place: the input of the previous layer's output is kept for its backward pass
        return (F.relu(x) if self.relu else x), {}

    def backward(self, relevance, ctx, owned=False):
        return relevance


class Flatten(Rule):
    """The flatten between the pooled features and the classifier."""

    def forward(self, x):
        return x.flatten(1), {"shape": x.shape[1:]}

    def backward(self, relevance, ctx, owned=False):
        return relevance.reshape(*relevance.shape[:2], *ctx["shape"])


class WinnerTakesAll(Rule):
    """Max-pooling: all relevance of a window goes to the position that won the forward max."""

    def __init__(self, module: nn.MaxPool2d):
        self.module = module

    def forward(self, x):
        m = self.module
        y, indices = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        return y, {"indices": indices, "in_shape": x.shape}

    def backward(self, relevance, ctx, owned=False):
        flat, n, m = _conditions_first(relevance)
        c, h, w = ctx["in_shape"][1:]
        indices = ctx["indices"].unsqueeze(1).expand(n, m, *ctx["indices"].shape[1:]).reshape(n * m, c, -1)
        out = flat.new_zeros(n * m, c, h * w)
        # scatter_add, not max_unpool: overlapping windows must add up, as the gradient does
        out.scatter_add_(2, indices, flat.reshape(n * m, c, -1))
        return out.view(n, m, c, h, w)


class Norm(Rule):
    """Average pooling: relevance is shared in proportion to each input's contribution."""

    def __init__(self, module: nn.Module, stabilizer: float = 1e-6):
        self.module = module
        self.stabilizer = stabilizer

    def forward(self, x):
        y = self.module(x)
        return y, {"x": x, "y": y}

    def backward(self, relevance, ctx, owned=False):
        x, y = ctx["x"], ctx["y"]
        if x.shape == y.shape:  # VGG's adaptive pool at the native size is the identity
            return x.unsqueeze(1) * relevance / stabilize(y, self.stabilizer).unsqueeze(1)
        scaled, n, m = _conditions_first(relevance / stabilize(y, self.stabilizer).unsqueeze(1))
        shaped = x.unsqueeze(1).expand(n, m, *x.shape[1:]).reshape(n * m, *x.shape[1:])
        if isinstance(self.module, nn.AdaptiveAvgPool2d):
            spread = torch.ops.aten._adaptive_avg_pool2d_backward(scaled, shaped)
        else:
            mod = self.module
            spread = torch.ops.aten.avg_pool2d_backward(
                scaled, shaped, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                mod.divisor_override,
            )
        return x.unsqueeze(1) * spread.view(n, m, *x.shape[1:])


def _parameters(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a conv/linear layer, detached; a missing bias is zeros."""
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


class AffineRule(Rule):
    """Base for rules of conv and linear layers: the layer's forward and its transpose.

    ``modified`` lists rule-modified (weight, bias) pairs whose outputs the backward pass divides
    by. When the input is known to be non-negative they are computed in the forward pass, stacked
    with the layer's own weights into one convolution: one call with 2-3x the output channels
    costs far less than separate calls (the input is read once).
    """

    def __init__(self, module: nn.Module, nonneg_input: bool, modified: Sequence[tuple[Tensor, Tensor]] = ()):
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{type(self).__name__} needs a Conv2d or Linear layer, got {type(module).__name__}")
        self.module = module
        self.nonneg_input = nonneg_input
        self.weight, self.bias = _parameters(module)
        self.stacked = None
        if nonneg_input and modified:
            self.stacked = (torch.cat([self.weight] + [w for w, _ in modified]),
                            torch.cat([self.bias] + [b for _, b in modified]))

    def affine(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's own map with other parameters: (N, *in) -> (N, *out)."""
        if isinstance(self.module, nn.Linear):
            return F.linear(x, weight, bias)
        m = self.module
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def transpose(self, scaled: Tensor, weight: Tensor, in_shape: torch.Size) -> Tensor:
        """The transpose of the linear part: (N, M, *out) -> (N, M, *in)."""
        if isinstance(self.module, nn.Linear):
            return scaled @ weight
        flat, n, m = _conditions_first(scaled)
        mod = self.module
        # conv_transpose2d is the same map as the input gradient (conv2d_input) but runs faster
        natural = [(size - 1) * stride - 2 * pad + dil * (k - 1) + 1 for size, stride, pad, dil, k in zip(
            flat.shape[2:], mod.stride, mod.padding, mod.dilation, weight.shape[2:])]
        padding_out = [want - got for want, got in zip(in_shape[1:], natural)]
        out = F.conv_transpose2d(flat, weight, None, mod.stride, mod.padding, padding_out, mod.groups, mod.dilation)
        return out.view(n, m, *in_shape)

    def signed_outputs(self, ctx: dict) -> tuple[Tensor, Tensor | None]:
        """(z_pos, z_neg): the outputs of the positive and negative parts, (N, *out) each.

        z_pos = W_pos x+ + W_neg x- + b_pos and z_neg the other way round, with the rule's own
        ``w_pos``/``w_neg``. Stacked into the forward when the input is non-negative (then with
        any stabiliser the rule folded into the stacked biases); for a signed input computed here
        once per forward, unstabilised, and shared by later backward passes.
        z_neg is None when the rule stacked only the positive part.
        """
        if "z_mod" not in ctx:
            xp, xn = _split_sign(ctx["x"])
            ctx["z_mod"] = (self.affine(xp, self.w_pos, self.b_pos) + self.affine(xn, self.w_neg),
                            self.affine(xp, self.w_neg, self.b_neg) + self.affine(xn, self.w_pos))
        return ctx["z_mod"][0], (ctx["z_mod"][1] if len(ctx["z_mod"]) > 1 else None)

    def forward(self, x):
        if self.stacked is None:
            z = self.affine(x, self.weight, self.bias)
            return z, {"x": x, "z": z}
        outputs = self.affine(x, *self.stacked).split(self.weight.shape[0], dim=1)
        return outputs[0], {"x": x, "z": outputs[0], "z_mod": outputs[1:]}


class Epsilon(AffineRule):
    """R_in = x * W^T (R / stab(z)) with z = Wx + b."""

    def __init__(self, module, nonneg_input, epsilon: float = 1e-6):
        super().__init__(module, nonneg_input)
        self.epsilon = epsilon

    def backward(self, relevance, ctx, owned=False):
        x, z = ctx["x"], ctx["z"]
        scaled = _divided(relevance, stabilize(z, self.epsilon).unsqueeze(1), owned)
        return self.transpose(scaled, self.weight, x.shape[1:]).mul_(x.unsqueeze(1))


def _split_sign(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.clamp(min=0), x.clamp(max=0)


class Gamma(AffineRule):
    """Generalised gamma rule (zennit ``Gamma``).

    Outputs with z > 0 are explained with W + gamma W+ (on positive inputs) and W + gamma W- (on
    negative inputs); outputs with z < 0 the other way round. ``nonneg_input`` drops the terms of
    negative inputs; ``relu_after`` drops the z < 0 branch because relevance reaching a ReLU'd
    output is zero wherever the ReLU output is zero (every rule above multiplies by its input).
    That leaves one modified forward (stacked with the layer's own) and one transposed
    convolution per layer.
    """

    def __init__(self, module, nonneg_input, relu_after: bool, gamma: float = 0.25, stabilizer: float = 1e-6):
        w, b = _parameters(module)
        pos = (w + gamma * w.clamp(min=0), b + gamma * b.clamp(min=0))
        neg = (w + gamma * w.clamp(max=0), b + gamma * b.clamp(max=0))
        self.fast = nonneg_input and relu_after
        # on the fast path the stabiliser rides in the stacked bias: the forward convolution
        # returns z_pos + eps directly, which saves a pass over the layer's output
        stacked = [(pos[0], pos[1] + stabilizer)] if self.fast else [pos, neg]
        super().__init__(module, nonneg_input, stacked)
        self.relu_after = relu_after
        self.stabilizer = stabilizer
        (self.w_pos, self.b_pos), (self.w_neg, self.b_neg) = pos, neg

    def backward(self, relevance, ctx, owned=False):
        x, z = ctx["x"], ctx["z"]
        in_shape = x.shape[1:]
        if self.fast:
            # relevance is non-zero only where z > 0, and there z_pos >= z > 0: the stabiliser
            # is +eps, already added by the forward. Clamping (once per forward, in place) keeps
            # the unused entries away from 0/0 and leaves the used ones (> eps) unchanged.
            if not ctx.get("clamped"):
                ctx["z_mod"][0].clamp_(min=self.stabilizer)
                ctx["clamped"] = True
            scaled = _divided(relevance, ctx["z_mod"][0].unsqueeze(1), owned)
            return self.transpose(scaled, self.w_pos, in_shape).mul_(x.unsqueeze(1))
        z_pos, z_neg = self.signed_outputs(ctx)
        s_pos = relevance * ((z > 0).to(z) / stabilize(z_pos, self.stabilizer)).unsqueeze(1)
        s_neg = relevance * ((z < 0).to(z) / stabilize(z_neg, self.stabilizer)).unsqueeze(1)
        if self.nonneg_input:
            spread = self.transpose(s_pos, self.w_pos, in_shape) + self.transpose(s_neg, self.w_neg, in_shape)
            return spread.mul_(x.unsqueeze(1))
        xp, xn = (t.unsqueeze(1) for t in _split_sign(x))
        return (xp * (self.transpose(s_pos, self.w_pos, in_shape) + self.transpose(s_neg, self.w_neg, in_shape))
                + xn * (self.transpose(s_pos, self.w_neg, in_shape) + self.transpose(s_neg, self.w_pos, in_shape)))


class AlphaBeta(AffineRule):
    """alpha * (positive contributions) - beta * (negative contributions), zennit ``AlphaBeta``.

    ZPlus is AlphaBeta with alpha=1, beta=0 (zennit computes it the same way).
    """

    def __init__(self, module, nonneg_input, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0 or alpha - beta != 1:
            raise ValueError(f"alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        w, b = _parameters(module)
        pos, neg = (w.clamp(min=0), b.clamp(min=0)), (w.clamp(max=0), b.clamp(max=0))
        # with x >= 0, z_pos >= 0 and z_neg <= 0: their stabilisers are +eps and -eps (where
        # z_neg == 0 every contribution is 0, so the sign of eps there does not matter). They
        # ride in the stacked biases, so the forward returns the stabilised denominators.
        stacked = [(pos[0], pos[1] + stabilizer), (neg[0], neg[1] - stabilizer)]
        super().__init__(module, nonneg_input, stacked if beta else stacked[:1])
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer
        (self.w_pos, self.b_pos), (self.w_neg, self.b_neg) = pos, neg

    def backward(self, relevance, ctx, owned=False):
        x = ctx["x"]
        in_shape = x.shape[1:]
        z_pos, z_neg = self.signed_outputs(ctx)
        if self.nonneg_input:
            scaled = relevance / z_pos.unsqueeze(1)
            spread = self.transpose(scaled, self.w_pos, in_shape).mul_(self.alpha)
            if self.beta:
                scaled = relevance / z_neg.unsqueeze(1)
                spread.sub_(self.transpose(scaled, self.w_neg, in_shape).mul_(self.beta))
            return spread.mul_(x.unsqueeze(1))
        s_pos = relevance / stabilize(z_pos, self.stabilizer).unsqueeze(1)
        s_neg = relevance / stabilize(z_neg, self.stabilizer).unsqueeze(1)
        xp, xn = (t.unsqueeze(1) for t in _split_sign(x))
        positive = xp * self.transpose(s_pos, self.w_pos, in_shape) + xn * self.transpose(s_pos, self.w_neg, in_shape)
        negative = xp * self.transpose(s_neg, self.w_neg, in_shape) + xn * self.transpose(s_neg, self.w_pos, in_shape)
        return self.alpha * positive - self.beta * negative


class ZBox(AffineRule):
    """z^B rule for the first layer, with pixel bounds ``low``/``high`` (zennit ``ZBox``).

    R_in = x W^T s - low W+^T s - high W-^T s with s = R / stab(z - z_low - z_high). The bound
    terms z_low = W+ low + b+ and z_high = W- high + b- do not depend on the image: they are
    computed once per input size.
    """

    def __init__(self, module, nonneg_input, low: Tensor, high: Tensor, stabilizer: float = 1e-6):
        super().__init__(module, nonneg_input)
        device, dtype = self.weight.device, self.weight.dtype
        self.low = torch.as_tensor(low, device=device, dtype=dtype).reshape(1, -1, 1, 1)
        self.high = torch.as_tensor(high, device=device, dtype=dtype).reshape(1, -1, 1, 1)
        self.stabilizer = stabilizer
        w, b = self.weight, self.bias
        self.w_pos, self.b_pos = w.clamp(min=0), b.clamp(min=0)
        self.w_neg, self.b_neg = w.clamp(max=0), b.clamp(max=0)
        self.w_box = torch.cat([w, self.w_pos, self.w_neg], dim=1)
        self._bounds: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def _bound_images(self, in_shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """(low image, high image, z_low + z_high) for one input size, cached."""
        key = tuple(in_shape)
        if key not in self._bounds:
            low = self.low.expand(1, *in_shape).contiguous()
            high = self.high.expand(1, *in_shape).contiguous()
            offset = self.affine(low, self.w_pos, self.b_pos) + self.affine(high, self.w_neg, self.b_neg)
            self._bounds[key] = (low, high, offset)
        return self._bounds[key]

    def backward(self, relevance, ctx, owned=False):
        x, z = ctx["x"], ctx["z"]
        in_shape = x.shape[1:]
        low, high, offset = self._bound_images(in_shape)
        shifted = z - offset
        # stabilised in place: this is the largest tensor of the pass (64 channels at full size)
        shifted.add_(torch.where(shifted >= 0, self.stabilizer, -self.stabilizer))
        scaled = _divided(relevance, shifted.unsqueeze(1), owned)
        c = in_shape[0]
        # the three transposes in one call: weights stacked along the input channels
        spread = self.transpose(scaled, self.w_box, (3 * c, *in_shape[1:]))
        return (spread[:, :, :c].mul_(x.unsqueeze(1))
                - low.unsqueeze(1) * spread[:, :, c:2 * c] - high.unsqueeze(1) * spread[:, :, 2 * c:])


class Flat(AffineRule):
    """Flat rule (zennit ``Flat``): relevance spread uniformly over each output's receptive field."""

    def __init__(self, module, nonneg_input, stabilizer: float = 1e-6):
        super().__init__(module, nonneg_input)
        self.ones = torch.ones_like(self.weight)
        self.stabilizer = stabilizer
        self._counts: dict[tuple, Tensor] = {}

    def backward(self, relevance, ctx, owned=False):
        in_shape = ctx["x"].shape[1:]
        key = tuple(in_shape)
        if key not in self._counts:  # receptive-field sizes depend only on the input size
            self._counts[key] = self.affine(torch.ones(1, *in_shape, device=self.ones.device, dtype=self.ones.dtype),
                                            self.ones)
        scaled = _divided(relevance, stabilize(self._counts[key], self.stabilizer).unsqueeze(1), owned)
        return self.transpose(scaled, self.ones, in_shape)
