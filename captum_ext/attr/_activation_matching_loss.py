r"""The activation-matching objective, term by term (private).

With f the frozen classifier, x the image, y the class kept (the model's own top-1 by
default), p = sigmoid(mask logits), m = straight-through 1[p > 0.5], b the baseline and
e = m * x + (1 - m) * b (= m * x for the default b = 0)::

    loss = L_AM + L_MIN + L_ROB (+ L_NEC + L_CONF)
    L_AM  = l_act * sum_l a_l * d(phi_l(x), phi_l(e)) + l_ce * CE(f(e), y)
            + l_kl * KL(softmax f(x) || softmax f(e))
    L_MIN = l_area * mean(p) + l_bin * mean(p * (1 - p)) + l_tv * TV(p)
    L_ROB = l_rob * CE(f(m * x + (1 - m) * r), y),      r ~ N(0, 1) in normalised space
    (the "paper" preset: KL at temperature T = 2 scaled by T^2, eight-neighbour TV, and
    L_ROB through the hard mask without a gradient, as in the co-authors' notebook)
    L_NEC = l_nec * max(0, margin - (z_y(x) - z_y((1 - m) * x + m * b)))
    L_CONF = l_conf * max(0, lo_y(x) - lo_y(e)),  lo_y = log(p_y / (1 - p_y)), p = softmax f

d is the mean squared error for maps (activations with more than 2 dimensions) and the
cosine distance 1 - cos for vectors (N, D); TV(p) is the mean of the absolute differences
between vertical and horizontal neighbours (all of them pooled). Every term is computed per
example; the loss of a batch is the mean over its examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils.batched_grad import call_model
from .._utils.hooks import call_hook, registered_hooks
from .._utils.precision import at_least_float32
from ._mask_net import straight_through_mask

__all__ = [
    "TERMS",
    "activation_distance",
    "area",
    "binarisation",
    "cross_entropy",
    "kl_divergence",
    "log_odds",
    "mask_objective",
    "confidence_hinge",
    "necessity_hinge",
    "total_variation",
    "total_variation_8",
]

#: Names of the per-example loss terms, in the order of the formula (before weighting).
TERMS = ("act", "ce", "kl", "area", "bin", "tv", "rob", "nec", "conf")


def activation_distance(reference: Tensor, explained: Tensor) -> Tensor:
    """Per-example d(phi(x), phi(e)): mean squared error for maps (dim > 2), cosine distance
    ``1 - cos`` for vectors (N, D)."""
    if reference.dim() <= 2:
        reference = reference.reshape(reference.shape[0], -1)
        explained = explained.reshape(explained.shape[0], -1)
        return 1.0 - F.cosine_similarity(explained, reference, dim=1, eps=1e-8)
    return (explained - reference).square().flatten(1).mean(1)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example CE(logits, target) = -log softmax(logits)[target]."""
    return F.cross_entropy(logits, target, reduction="none")


def kl_divergence(reference_logits: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-example T^2 * KL(softmax(reference / T) || softmax(logits / T))
    = T^2 * sum_c q_c (log q_c - log p_c) (T = 1: the plain KL)."""
    log_q = F.log_softmax(reference_logits / temperature, dim=1)
    log_p = F.log_softmax(logits / temperature, dim=1)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(1)


def area(probabilities: Tensor) -> Tensor:
    """Per-example mean(p)."""
    return probabilities.flatten(1).mean(1)


def binarisation(probabilities: Tensor) -> Tensor:
    """Per-example mean(p * (1 - p)), zero exactly when p is binary."""
    return (probabilities * (1 - probabilities)).flatten(1).mean(1)


def total_variation(probabilities: Tensor) -> Tensor:
    """Per-example mean over all vertical and horizontal neighbour pairs of |p_i - p_j|."""
    vertical = (probabilities[..., 1:, :] - probabilities[..., :-1, :]).abs().flatten(1)
    horizontal = (probabilities[..., :, 1:] - probabilities[..., :, :-1]).abs().flatten(1)
    both = torch.cat([vertical, horizontal], dim=1)
    if both.shape[1] == 0:  # a 1 x 1 image has no neighbours
        return probabilities.new_zeros(probabilities.shape[0])
    return both.mean(1)


def total_variation_8(probabilities: Tensor) -> Tensor:
    """Per-example eight-neighbour TV: the mean |p_i - p_j| along each of the four
    directions (vertical, horizontal, both diagonals), the diagonal ones weighted
    1 / sqrt(2), summed (the form of the co-authors' notebook)."""
    p = probabilities
    n = p.shape[0]
    pairs = [
        (p[..., 1:, :], p[..., :-1, :], 1.0),
        (p[..., :, 1:], p[..., :, :-1], 1.0),
        (p[..., 1:, 1:], p[..., :-1, :-1], 2**-0.5),
        (p[..., 1:, :-1], p[..., :-1, 1:], 2**-0.5),
    ]
    total = p.new_zeros(n)
    for a, b, weight in pairs:
        if a.numel():
            total = total + weight * (a - b).abs().reshape(n, -1).mean(1)
    return total


def necessity_hinge(reference_logit: Tensor, complement_logit: Tensor, margin: float) -> Tensor:
    """Per-example max(0, margin - (z_y(x) - z_y(complement)))."""
    return F.relu(margin - (reference_logit - complement_logit))


def log_odds(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example log(p_y / (1 - p_y)) = z_y - logsumexp_{c != y} z_c with p = softmax(z):
    a monotone function of p_y that does not saturate where p_y is close to 1."""
    own = F.one_hot(target, logits.shape[1]).to(torch.bool)
    others = logits.masked_fill(own, float("-inf")).logsumexp(1)
    return logits.gather(1, target[:, None])[:, 0] - others


def confidence_hinge(reference_logits: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """Per-example max(0, log-odds_y(x) - log-odds_y(e)), log-odds_y = log(p_y / (1 - p_y)):
    zero exactly when the explanation is at least as confident in y as the image
    (p_y(e) >= p_y(x)), and measured in log-odds so that it still pulls when both
    confidences are close to 1 (the bundled model's median p_y(x) is 0.9997, where
    p_y(x) - p_y(e) and its gradient are about 1e-4)."""
    return F.relu(log_odds(reference_logits, target) - log_odds(logits, target))


@dataclass
class Reference:
    """What the frozen classifier says about the clean inputs (computed once, no gradient)."""

    logits: Tensor
    activations: list[Tensor]


def _flatten_output(output, module: nn.Module) -> Tensor:
    if isinstance(output, Tensor):
        return output
    raise TypeError(
        f"`layers`: {type(module).__name__} returns {type(output).__name__}, not a tensor; "
        "activation matching needs layers whose output is a tensor."
    )


def run_with_activations(
    forward_func: Callable, layers: Sequence[nn.Module], inputs: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Logits of ``forward_func(inputs)`` and the outputs of ``layers`` (keeping their graph).

    The model continues with a clone of each captured output, so in-place operations after
    a layer (``ReLU(inplace=True)``) leave the captured activation intact. Hooks are removed
    on exit, also when the forward pass raises.
    """
    captured: list[list[Tensor]] = [[] for _ in layers]

    def make_hook(slot: list[Tensor]):
        def hook(module, args, output):
            output = _flatten_output(output, module)
            slot.append(output)
            return output.clone()

        return hook

    registrations = [call_hook(layer, make_hook(slot)) for layer, slot in zip(layers, captured)]
    with registered_hooks(*registrations):
        logits = call_model(forward_func, (inputs,))  # a dtype or layout mistake is named
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            "`forward_func` must return (N, classes) logits, got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}."
        )
    activations = []
    for layer, slot in zip(layers, captured):
        if len(slot) != 1:
            raise ValueError(
                f"`layers`: {type(layer).__name__} ran {len(slot)} times in one forward pass; "
                "pick modules that run exactly once."
            )
        activations.append(at_least_float32(slot[0]))  # a half-precision model's, in float32
    return logits, activations


def mask_objective(
    forward_func: Callable,
    layers: Sequence[nn.Module],
    layer_weights: Sequence[float],
    weights,
    inputs: Tensor,
    probabilities: Tensor,
    target: Tensor,
    reference: Reference,
    baseline: Tensor,
    noise: Tensor | None,
    necessity_margin: float,
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Tensor | None]]:
    """The loss of a batch (mean over examples), the unweighted per-example terms and the
    hard mask and logits f(e) of this step (detached; logits None when no term needed them).

    ``weights`` has attributes act, ce, kl, area, bin, tv, rob, nec (and optionally conf).
    Terms whose weight is 0 are not computed (their forward pass is skipped) and reported as zeros.
    """
    n = inputs.shape[0]
    zeros = inputs.new_zeros(n)
    mask = straight_through_mask(probabilities)
    explanation = mask * inputs + (1 - mask) * baseline
    terms: dict[str, Tensor] = {}
    if len(layer_weights) != len(layers):  # zip would drop the layers without a weight
        raise ValueError(
            f"`layers` has {len(layers)} entries but `layer_weights` has {len(layer_weights)}; "
            "give one weight per layer."
        )
    need_act = weights.act != 0 and len(layers) > 0
    conf_weight = getattr(weights, "conf", 0.0)
    if need_act or weights.ce != 0 or weights.kl != 0 or conf_weight != 0:
        if need_act:
            logits, acts = run_with_activations(forward_func, layers, explanation)
            distance = zeros
            for a_l, ref, act in zip(layer_weights, reference.activations, acts):
                distance = distance + a_l * activation_distance(ref, act)
            terms["act"] = distance
        else:
            logits = forward_func(explanation)
            terms["act"] = zeros
        terms["ce"] = cross_entropy(logits, target)
        terms["kl"] = kl_divergence(
            reference.logits, logits, getattr(weights, "kl_temperature", 1.0)
        )
        terms["conf"] = confidence_hinge(reference.logits, logits, target)
    else:
        terms.update(act=zeros, ce=zeros, kl=zeros, conf=zeros)
        logits = None
    terms["area"] = area(probabilities)
    terms["bin"] = binarisation(probabilities)
    tv = total_variation_8 if getattr(weights, "tv_diagonal", False) else total_variation
    terms["tv"] = tv(probabilities)
    if weights.rob != 0 and noise is not None:
        rob_mask = mask if getattr(weights, "rob_gradient", True) else mask.detach()
        terms["rob"] = cross_entropy(
            forward_func(rob_mask * inputs + (1 - rob_mask) * noise), target
        )
    else:
        terms["rob"] = zeros
    if weights.nec != 0:
        complement = (1 - mask) * inputs + mask * baseline
        ref_logit = reference.logits.gather(1, target[:, None])[:, 0]
        comp_logit = forward_func(complement).gather(1, target[:, None])[:, 0]
        terms["nec"] = necessity_hinge(ref_logit, comp_logit, necessity_margin)
    else:
        terms["nec"] = zeros
    per_example = sum(getattr(weights, name, 0.0) * terms[name] for name in TERMS)
    step = (mask.detach(), None if logits is None else logits.detach())
    return per_example.mean(), terms, step
