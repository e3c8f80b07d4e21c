r"""GradTrust: the trust of a prediction from counterfactual gradients (by default those of the
last layer; of an inner layer or of every parameter on request).

:func:`gradtrust` scores a batch; :class:`GradTrust` holds a configuration for scoring many
batches. Higher always means more trusted; the model is left exactly as it was found. On
very confident models use ``log=True``: the score itself exceeds the float range there, its
log does not. The per-example gradients (autograd path) come from the engine,
:func:`captum_ext._utils.batched_grad.per_example_parameter_gradients`.

M. Prabhushankar and G. AlRegib, "Counterfactual Gradients-based Quantification of
Prediction Trust in Neural Networks", IEEE MIPR 2024 (arXiv 2405.13758).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor, nn

from captum_ext._utils.batched_grad import (
    logits_seen_per_example,
    per_example_parameter_gradients,
    run_forward,
)
from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.layers import _FirstParameterUse, root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.precision import at_least_float32, precise, precise_dtype
from captum_ext._utils.validation import (
    check_flag,
    format_additional_forward_args,
    format_inputs,
    single_logit_hint,
)
from captum_ext.metrics._trust_common import (
    _check_choice,
    _check_transform,
    _exactly_the_logits,
    _forward_recording,
    _head_features,
    _log_softmax_of,
    _resolve_head,
    _weight_of,
)

__all__ = ["GradTrust", "gradtrust"]

FORMS = ("topk", "reference")
METHODS = ("auto", "closed_form", "autograd")
DEFAULT_K = 5
#: the ``layer`` value that measures the gradients of every parameter of the model
ALL_PARAMETERS = "all"


def _k_as_int(k: Any) -> int:
    """``k`` as a Python int (numpy integers included, bools refused)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"`k` must be an int or None, got {type(k).__name__}.")
    return int(k)


def _check_k(k: Any, num_classes: int) -> int:
    if k is None:
        if num_classes < 2:
            raise ValueError(
                "gradtrust needs at least 2 classes (a counterfactual class)." + single_logit_hint()
            )
        return min(DEFAULT_K, num_classes - 1)
    k = _k_as_int(k)
    if not 1 <= k <= num_classes - 1:
        raise ValueError(
            f"`k`={k} is out of range: the model has {num_classes} classes, so k must be in "
            f"[1, {num_classes - 1}] (the counterfactuals exclude the predicted class)."
        )
    return k


def _log_complements(log_p: Tensor, classes: Tensor) -> Tensor:
    """log(1 - p_c) = logsumexp_{j != c} log p_j, (N, K) for the (N, K) ``classes``: exact
    also where 1 - p_c rounds to 0."""
    mask = F.one_hot(classes, log_p.shape[1]).bool()  # (N, K, C)
    others = log_p.unsqueeze(1).masked_fill(mask, -math.inf)
    return torch.logsumexp(others, dim=2)


def _scaled_topk_cotangents(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cotangents dCE(z, c)/dz = p - e_c for c = P and the next k most likely classes, each
    divided by its largest entry 1 - p_c, and log(1 - p_c).

    Returns ``(g_hat, log_scale)``: (N, k + 1, C) rows ``(p - e_c) / (1 - p_c)`` (entry -1 at
    c, p_j / (1 - p_c) elsewhere, computed from the log-probabilities so that nothing
    underflows) and (N, k + 1) ``log(1 - p_c)``; ``p - e_c = exp(log_scale) * g_hat``.
    """
    # float64 where the device has it: log(1 - p_P) from the other classes' float32
    # log-probabilities carries their log-sum-exp's rounding (1e-6 at 21,843 classes), as
    # large as the log-score itself for near-uniform predictions
    z = precise(logits)
    log_p = torch.log_softmax(z, dim=1)
    classes = z.topk(k + 1, dim=1).indices
    log_scale = _log_complements(log_p, classes)  # (N, K)
    g_hat = torch.exp(log_p.unsqueeze(1) - log_scale.unsqueeze(2))
    g_hat = g_hat.masked_fill(F.one_hot(classes, z.shape[1]).bool(), -1.0)
    # a row whose 1 - p_c is exactly 0 (only with infinite logits): no gradient
    g_hat = torch.where(torch.isfinite(log_scale).unsqueeze(2), g_hat, torch.zeros_like(g_hat))
    return g_hat.to(logits.dtype), log_scale


def _reference_cotangents(logits: Tensor) -> Tensor:
    """(N, 1, C): dMSE(z, 1/C)/dz = 2 (z - 1/C) / C, divided by its largest magnitude (the
    reference ratio max / mean of the row energies is invariant to that scale)."""
    dev = at_least_float32(logits) - 1.0 / logits.shape[1]
    scale = dev.abs().amax(1, keepdim=True)
    return (dev / scale).unsqueeze(1).to(logits.dtype)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_topk_closed_form(logits: Tensor, h: Tensor, k: int) -> Tensor:
    """log(mean_Q ||p - e_Q||^2 / ||p - e_P||^2), in log space throughout, with (N, C) work:

    ||p - e_c||^2 = (1 - p_c)^2 + sum_{j != c} p_j^2. For the prediction P both terms come
    from the other classes' log-probabilities (logsumexp with P left out); for a
    counterfactual Q (p_Q <= 1/2, p_Q^2 <= half the sum of squares) the complements
    log(1 - p_Q) and log(sum_j p_j^2 - p_Q^2) lose nothing. In float64 where the device
    has it (the float32 log-sum-exp's rounding, 1e-6 at 21,843 classes, is as large as the
    log-score of a near-uniform prediction)."""
    z = precise(logits)
    log_p = torch.log_softmax(z, dim=1)
    classes = z.topk(k + 1, dim=1).indices
    log_top = log_p.gather(1, classes)  # (N, K)
    others = log_p.scatter(1, classes[:, :1], -math.inf)  # the prediction left out
    log_sq = torch.logsumexp(2 * log_p, dim=1, keepdim=True)  # log sum_j p_j^2
    complement = torch.cat(  # log(1 - p_c)
        [torch.logsumexp(others, 1, keepdim=True), _log1mexp(log_top[:, 1:])], dim=1
    )
    rest_sq = torch.cat(  # log sum_{j != c} p_j^2
        [
            torch.logsumexp(2 * others, 1, keepdim=True),
            log_sq + _log1mexp((2 * log_top[:, 1:] - log_sq).clamp(max=0)),
        ],
        dim=1,
    )
    log_dist = torch.logaddexp(2 * complement, rest_sq)
    score = _log_ratio(log_dist)
    # every gradient g h^T vanishes when h = 0: the ratio is undefined (NaN), as with autograd
    vanishing = h.abs().amax(1) == 0
    return torch.where(vanishing, torch.full_like(score, math.nan), score)


def _log_ratio(log_values: Tensor) -> Tensor:
    """log(mean(values[:, 1:]) / values[:, 0]) from (N, K) log-values."""
    counterfactual = torch.logsumexp(log_values[:, 1:], dim=1) - math.log(log_values.shape[1] - 1)
    return counterfactual - log_values[:, 0]


def _reference_closed_form(logits: Tensor, h: Tensor, through_log_softmax: bool = False) -> Tensor:
    """The reference form at the final linear layer, whose weight gradient is ``g h^T``:
    row c is ``g_c h``, its energy ``g_c^4 Var(h^2)``, the ratio ``max_c g_c^4 / mean_c
    g_c^4``. ``g`` is dMSE(z, 1/C)/dz = 2 (z - 1/C) / C where the layer's output is the
    logits z; where z = log_softmax(layer output) (``through_log_softmax``) it is that
    cotangent d carried back through the log-softmax, ``d - p sum(d)`` (p = softmax(z)),
    in float64 where the device has it (the two terms cancel)."""
    if through_log_softmax:
        z = precise(logits)
        dev = z - 1.0 / z.shape[1]
        dev = dev - torch.softmax(z, dim=1) * dev.sum(1, keepdim=True)
    else:
        dev = at_least_float32(logits) - 1.0 / logits.shape[1]
    scale = dev.abs().amax(1, keepdim=True)
    score = 1.0 / (dev / scale).pow(4).mean(1)  # = max_c dev^4 / mean_c dev^4; 0/0 -> NaN
    score = score.to(at_least_float32(logits).dtype)
    # energies g_c^4 Var(h^2): all zero (undefined ratio) when h^2 is constant or d == 1.
    # Tested exactly, |h_j| == |h_0| for every j: Var(h^2) formed in float32 underflows to 0
    # for features of about 1e-11 and below (the pooled features of a random-weight
    # network), where the gradients do not vanish and autograd gives a finite score.
    if h.shape[1] > 1:
        magnitudes = h.abs()
        vanishing = (magnitudes == magnitudes[:, :1]).all(1)
    else:
        vanishing = torch.ones_like(score, dtype=torch.bool)
    return torch.where(vanishing, torch.full_like(score, math.nan), score)


def _accumulation_dtype(g: Tensor) -> torch.dtype:
    """float64 where the device has it (float32 sums of ~1e5 squares lose digits)."""
    return torch.float64 if g.dtype == torch.float64 else precise_dtype(g.device)


#: entries of the gradients (all examples and contrasts together) converted to the
#: accumulation dtype at a time by :func:`_variances`: 4,194,304 float64 entries are 32 MiB
VARIANCE_SLICE_ENTRIES = 1 << 22


def _slices(flat: Tensor) -> Iterator[Tensor]:
    """The (n, K, P) ``flat`` as views (n, K, p) along its last dimension, each holding at
    most :data:`VARIANCE_SLICE_ENTRIES` entries (one column of P at the least)."""
    rows = flat.shape[0] * flat.shape[1]
    width = max(1, VARIANCE_SLICE_ENTRIES // max(rows, 1))
    return iter(flat.split(width, dim=2))


def _variances(grads: dict[str, Tensor]) -> Tensor:
    """(n, K) unbiased variance over all entries of the (n, K, ...) gradients taken together
    (one parameter, or every parameter of the model as one vector), accumulated in float64
    where the device has it. Two passes (the mean, then the squared deviations), so a large
    mean does not cancel digits. Each pass converts slices of at most
    :data:`VARIANCE_SLICE_ENTRIES` entries to the accumulation dtype at a time: a
    float64 copy of a whole parameter's gradients (6 contrasts of VGG-11's first classifier
    weight: 5 GB) is never made."""
    flats = [g.flatten(2) for g in grads.values()]
    dtype = _accumulation_dtype(flats[0])
    count = sum(f.shape[2] for f in flats)
    total = flats[0].new_zeros(flats[0].shape[:2], dtype=dtype)
    for piece in (piece for f in flats for piece in _slices(f)):
        total += piece.to(dtype).sum(2)
    mean = (total / count).unsqueeze(2)
    squares = torch.zeros_like(total)
    for piece in (piece for f in flats for piece in _slices(f)):
        squares += (piece.to(dtype) - mean).square_().sum(2)
    return squares / (count - 1)


def _log_topk_reduce(log_scale: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """The (chunked) reducer of the autograd path: gradients of the scaled cotangents, back to
    the true variances in log space: log Var(grad CE(c)) = log Var(grad g_hat_c) + 2 log(1-p_c)."""
    position = 0

    def reduce(grads: dict[str, Tensor]) -> Tensor:
        nonlocal position
        n = next(iter(grads.values())).shape[0]
        variances = _variances(grads)
        scale = log_scale[position : position + n].to(variances.device, variances.dtype)
        position += n
        return _log_ratio(torch.log(variances) + 2 * scale)

    return reduce


def _reference_reduce(grads: dict[str, Tensor]) -> Tensor:
    """Per example, max_c / mean_c of the row energies Var(g_c^2) of the (n, 1, rows, ...)
    weight gradient, the rows converted to the accumulation dtype
    :data:`VARIANCE_SLICE_ENTRIES` entries (whole rows) at a time."""
    (g,) = grads.values()
    rows = g.flatten(3)[:, 0]  # (n, rows, d)
    dtype = _accumulation_dtype(rows)
    per_slice = max(1, VARIANCE_SLICE_ENTRIES // max(rows.shape[0] * rows.shape[2], 1))
    energies = torch.cat(  # (n, rows): unbiased, over each row
        [piece.to(dtype).square().var(2) for piece in rows.split(per_slice, dim=1)], dim=1
    )
    return energies.amax(1) / energies.mean(1)


class GradTrust:
    r"""GradTrust with a fixed configuration, for scoring many batches.

    Holds ``forward_func``, ``form``, ``k``, ``layer``, ``method``, ``log`` and
    ``output_transform`` (see :func:`gradtrust`, which documents the formulas) and validates
    them once.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        form (str, optional): ``"topk"`` (the paper's definition, default) or ``"reference"``
            (the published demo's definition).
        k (int, optional): number of counterfactual classes for ``form="topk"``.
            Default: min(5, C - 1).
        layer (nn.Module or str, optional): the layer whose weight gradients are measured,
            or ``"all"`` for every parameter of the model. Default: the last ``nn.Linear``
            of the model, which must produce the logits.
        method (str, optional): ``"auto"``, ``"closed_form"`` or ``"autograd"``.
        log (bool, optional): return the natural log of the score (finite on confident
            models, where the score itself overflows). Default: False.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Examples::

        >>> from captum_ext.metrics import GradTrust
        >>> trust = GradTrust(model)
        >>> scores = trust.score(images)  # (N,), higher = more trusted
        >>> log_scores = GradTrust(model, log=True).score(images)  # for confident models
    """

    def __init__(
        self,
        forward_func: Callable,
        form: str = "topk",
        k: int | None = None,
        layer: nn.Module | str | None = None,
        method: str = "auto",
        log: bool = False,
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if not callable(forward_func):
            raise TypeError("`forward_func` must be callable (the model).")
        self.forward_func = forward_func
        self.form = _check_choice(form, FORMS, "form")
        self.method = _check_choice(method, METHODS, "method")
        if k is not None:
            k = _k_as_int(k)
            if k < 1:
                raise ValueError(f"`k`={k} is out of range: expected k >= 1.")
        log = check_flag(log, "log")
        if isinstance(layer, str) and layer == ALL_PARAMETERS:
            _check_all_parameters_options(self.form, self.method)
        self.k = k
        self.layer = layer
        self.log = log
        self.output_transform = _check_transform(output_transform)

    def score(self, inputs: Tensor | tuple[Tensor, ...], additional_forward_args: Any = None):
        """GradTrust of each example of ``inputs`` (N,); higher = more trusted."""
        return gradtrust(
            self.forward_func,
            inputs,
            form=self.form,
            k=self.k,
            layer=self.layer,
            method=self.method,
            log=self.log,
            additional_forward_args=additional_forward_args,
            output_transform=self.output_transform,
        )

    def __repr__(self) -> str:
        return (
            f"GradTrust(form={self.form!r}, k={self.k!r}, layer={self.layer!r}, "
            f"method={self.method!r}, log={self.log!r})"
        )


@log_usage()
def gradtrust(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    form: str = "topk",
    k: int | None = None,
    layer: nn.Module | str | None = None,
    method: str = "auto",
    log: bool = False,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""GradTrust: how much more the weights would have to change for a counterfactual label.

    The gradient of a loss L with respect to the weight W (C x d) of the final linear layer
    (input h, output the logits z) is ``g h^T`` with ``g = dL/dz``. GradTrust compares these
    gradients for the predicted class P and for counterfactual classes. Two definitions are
    in circulation:

    ``form="topk"`` (the paper's definition, default). With p = softmax(z), e_c the one-hot
    vector of class c, Q ranging over the k classes ranked 2..k+1 by the model, and Var the
    variance over all entries of the gradient matrix:

    .. code-block:: text

        r(x)       = Var(grad_W CE(z, P)) / mean_Q Var(grad_W CE(z, Q))     (the paper's ratio)
        gradtrust  = 1 / r(x) = mean_Q ||p - e_Q||^2 / ||p - e_P||^2        (returned)

    The closed form is exact: the entries of ``g h^T`` have mean mean(g) mean(h) and mean
    square mean(g^2) mean(h^2); since g = p - e_Q sums to zero, Var(g h^T) =
    ||g||^2 ||h||^2 / (C d) (times C d / (C d - 1) for the unbiased variance), so h and
    every constant cancel in the ratio. The paper's ratio r(x) is small for predictions whose
    counterfactuals need large weight changes; it is returned inverted so that, like every
    score here, higher means more trusted (the ranking equals that of -r(x)).

    ``form="reference"`` (the published demo script): backpropagate MSE(z, 1/C) (mean over
    the C entries), square the weight gradient element-wise, take the unbiased variance of
    each row over d (one energy per class), and return max / mean of the energies:

    .. code-block:: text

        energy_c  = Var_j((2 (z_c - 1/C) / C)^2 h_j^2) = (2/C)^4 (z_c - 1/C)^4 Var_j(h_j^2)
        gradtrust = max_c energy_c / mean_c energy_c = max_c (z_c - 1/C)^4 / mean_c (z_c - 1/C)^4

    again exact (verified against autograd to 1e-12 in float64). It lies in [1, C]; higher
    means the logits single out one class more. The fourth power is sign-blind: the class
    singled out can be the *most negative* logit rather than the prediction. On the bundled
    digit model that happens for 84 % of held-out digits, and the reference form then ranks
    mispredictions slightly above correct ones (AUROC 0.39;
    ``benchmarks/gradtrust_evidence.py``). Prefer ``"topk"`` for misprediction detection.

    When ``layer`` is an ``nn.Linear`` whose output equals the logits (checked with a forward
    hook), the closed forms need one forward pass and no backward pass. The topk form's
    cross-entropy depends on the softmax alone, so a layer output that differs from the
    logits by a constant per row (a final ``log_softmax``, or a softmax model read through
    :func:`~captum_ext.data.log_probabilities`) takes it too. The reference form's
    MSE(z, 1/C) depends on that constant: its closed form takes the layer's output as it is
    when it equals the logits exactly, and carries the cotangent back through the
    log-softmax (``d - p sum(d)``, d = 2 (z - 1/C) / C, p = softmax(z)) when the logits are
    the log-softmax of the layer's output; any other shift takes the autograd path. For any
    other layer (or ``method="autograd"``), per-example weight gradients are computed with
    torch.func (``functional_call`` and ``vjp`` under ``vmap``) and the same definitions are
    applied to the layer's ``weight`` (rows = first dimension). Where every gradient vanishes
    (h = 0, or for ``"reference"`` h^2 constant over d) the ratio is undefined and NaN is
    returned, as the gradient computation would give. On the autograd path a model in train
    mode runs each example as a batch of one (batch norm uses that example's statistics) on
    its own copy of the buffers; the model's running statistics are never changed. A model
    left in train mode with dropout or stochastic depth active gives random scores (two
    calls differ), with a :class:`~captum_ext.attr.RandomMapsWarning` (once per model).

    **Which parameters** (``layer``). The paper describes the gradients as "the required
    changes in the network parameters"; the authors' published demo takes them at the final
    linear layer's weight only (the first 2-D parameter with C rows). There, as shown above,
    the score is a function of the softmax vector alone. ``layer`` may name any module with a
    ``weight`` (a convolution too: its whole weight tensor is one gradient), and
    ``layer="all"`` takes the gradients of every parameter of the model (frozen ones
    included: the score describes the model's function, not its training set-up) and the
    variance over all their entries as one vector, by per-example autograd:

    .. code-block:: text

        layer="all":  gradtrust = mean_Q Var_t(grad_t CE(z, Q)) / Var_t(grad_t CE(z, P))
                      (t = all parameters of the model as one vector)

    ``layer="all"`` is defined for ``form="topk"`` only and costs one backward pass per
    contrast. Recommended setting: the default (final linear layer, closed form). On the
    bundled digit model's 1,000 held-out digits (``benchmarks/gradtrust_layers.py``) the
    inner layers and ``"all"`` do not beat it in any setting: on a weakly trained model they
    decorrelate from softmax confidence (Spearman 0.24-0.77) but rank mispredictions worse
    (misprediction AUROC 0.58-0.64 against 0.69 at the last layer and 0.68 for softmax
    confidence), and on noisy inputs they are below both. No setting clearly beats softmax
    confidence there: the last layer is ahead by 0.007 AUROC on the weak model and behind by
    0.003 on noisy inputs.

    The per-example autograd path batches the examples with torch.func (``vmap``). Where the
    model carries hooks of the user's (forward or backward hooks on its modules, torch's
    global module hooks, or a hook its ``forward`` registers on a tensor), it runs one
    example at a time with plain autograd instead (the same scores, slower), so that those
    hooks see plain tensors rather than torch.func's wrappers, which cannot be used after
    the call. For ``layer="all"`` the parameters of a pruned layer are ``weight_orig`` (its
    gradient is that of the effective weight, masked).

    **Confident models and** ``log``. The topk score grows like exp(2 (z_P - z_Q)): it
    exceeds the float32 range (3.4e38) once the top-1/top-2 logit gap passes about 44, and
    the float64 range past about 355; ImageNet models are that confident on many images. It
    is therefore always computed in log space, from the log-probabilities l = log_softmax(z):

    .. code-block:: text

        log(1 - p_c)       = logsumexp_{j != c} l_j
        log ||p - e_c||^2  = 2 log(1 - p_c) + log(1 + sum_{j != c} exp(2 (l_j - log(1 - p_c))))
        log gradtrust      = logsumexp_Q log ||p - e_Q||^2 - log k - log ||p - e_P||^2

    which is finite and keeps its order (float32 equal to float64 to about 1e-6 relative)
    for logit gaps up to 1e4 and beyond. ``log=True`` returns this natural log; use it to
    rank or threshold examples (:func:`~captum_ext.metrics.auac`,
    :func:`~captum_ext.metrics.score_dataset` and the report do). ``log=False`` (default,
    backwards compatible) returns ``exp`` of it in the logits' dtype: equal to the raw ratio
    where that is representable, and ``inf`` with a ``RuntimeWarning`` where it is not. The
    autograd path does the same: each cotangent ``p - e_c`` is divided by its largest entry
    ``1 - p_c`` (formed from the log-probabilities, so nothing underflows), the variances of
    the resulting gradients are accumulated in float64 (float32 on MPS), and
    ``2 log(1 - p_c)`` is added back in log space. The reference form lies in [1, C] and
    needs no such care; ``log=True`` returns its log too.

    Args:
        forward_func (Callable): the model, ``forward_func(*inputs, *additional_forward_args)``
            returns (N, C) logits (or an output that ``output_transform`` maps to them).
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        form (str, optional): ``"topk"`` or ``"reference"``. Default: ``"topk"``.
        k (int, optional): counterfactual classes for ``"topk"``, in [1, C - 1].
            Default: min(5, C - 1).
        layer (nn.Module or str, optional): the layer whose ``weight`` gradient is measured,
            as a module or a dotted name, or ``"all"`` for every parameter of the model (see
            "Which parameters"). Default: the last ``nn.Linear`` of the model; its
            output must be the logits, else a ValueError asks for ``layer`` or
            ``method="autograd"``. A layer that computes its weight in each forward pass
            (pruned with ``torch.nn.utils.prune``, or weight-normalised by the legacy
            ``torch.nn.utils.weight_norm`` / ``spectral_norm`` or by
            ``torch.nn.utils.parametrizations``) is measured at the weight its forward pass
            uses: the scores of the same model with that weight folded (``prune.remove``,
            ``remove_parametrizations``), computed one example at a time. A layer that never
            runs itself but whose ``weight`` parameter its parent computes with
            (``nn.MultiheadAttention``'s ``out_proj``, torchvision's Swin ``attn.qkv``:
            ``F.linear(x, self.qkv.weight)``) is measured at that weight (autograd path).
        method (str, optional): ``"auto"`` (closed form when the layer produces the logits,
            autograd for an explicitly given other layer or a shift the reference form's
            closed form does not cover), ``"closed_form"`` (error if it does not apply) or
            ``"autograd"``. Default: ``"auto"``.
        log (bool, optional): return the natural log of the score (finite on confident
            models) instead of the score. Default: False.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``. On the
            autograd path, tensors whose first dimension is N, also inside tuples, lists and
            dicts, are split per example.
        output_transform (Callable, optional): maps the model's output to (N, C) logits (a
            dict's ``"logits"`` entry, a tuple's first element, an (N, C, 1) output squeezed),
            as on the CAM methods. The closed form applies when the layer's output equals the
            transformed output, up to a constant per row for ``"topk"``, exactly or through a
            log-softmax for ``"reference"`` (see above); the gradients always pass through
            the transform. Default: None (the output is the logits).

    Returns:
        Tensor: (N,) scores (or their natural log with ``log=True``), higher = more trusted,
        on the device of the logits, in their dtype (float32 for float16 / bfloat16 logits).

    Examples::

        >>> from captum_ext.metrics import gradtrust
        >>> scores = gradtrust(model, images)                       # paper form, top-5
        >>> log_scores = gradtrust(model, images, log=True)         # confident models
        >>> scores = gradtrust(model, images, form="reference")     # published demo
        >>> scores = gradtrust(model, images, layer="features.6")  # autograd path
        >>> log_all = gradtrust(model, x, layer="all", log=True)   # every parameter
        >>> log_all.shape
        torch.Size([4])
    """
    form = _check_choice(form, FORMS, "form")
    method = _check_choice(method, METHODS, "method")
    log = check_flag(log, "log")
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    _warn_random_scores(forward_func)
    if isinstance(layer, str) and layer == ALL_PARAMETERS:
        score, logits = _all_parameters_score(
            forward_func, inputs, extra, form, k, method, output_transform
        )
        _warn_if_every_score_is_undefined(score, layer)
        dtype = at_least_float32(logits).dtype
        return score.to(dtype) if log else _exp_score(score, dtype)
    head, automatic = _resolve_head(forward_func, layer, inputs, extra, output_transform)
    model = root_module(forward_func)
    with preserved_state([model, head], hidden_model=model is None):
        logits, calls = _forward_recording(forward_func, inputs, extra, head, output_transform)
        num_classes = logits.shape[1]
        if form == "topk":
            k = _check_k(k, num_classes)
        h = _head_features(head, logits, calls)
        if h is None and method == "closed_form" or (h is None and automatic and method == "auto"):
            raise ValueError(
                f"`layer` ({type(head).__name__}"
                f"{', found automatically as the last nn.Linear' if automatic else ''}) does "
                "not produce the logits (its output differs from forward_func's output or it "
                "ran more than once), so the closed form does not apply; pass the final "
                "linear layer as `layer`, or use method='autograd'."
            )
        # the reference form's MSE(z, 1/C) reads the logits' level: a layer output that
        # differs from them by a constant per row takes the closed form only through a
        # log-softmax (its Jacobian is known), any other shift the autograd path
        closed, through_log_softmax = h is not None, False
        if closed and form == "reference" and not _exactly_the_logits(calls[0][1], logits):
            through_log_softmax = _log_softmax_of(calls[0][1], logits)
            closed = through_log_softmax
            if not closed and method == "closed_form":
                raise ValueError(
                    f"`method`='closed_form': the output of `layer` ({type(head).__name__}) "
                    "differs from the logits by a constant per row that is not a "
                    "log-softmax's, and the reference form's loss MSE(z, 1/C) depends on that "
                    "constant, so its gradient is not known in closed form; use "
                    "method='auto' or method='autograd'."
                )
        if closed and method != "autograd":
            if form == "topk":
                score = _log_topk_closed_form(logits, h, k)
            else:
                score = _reference_closed_form(logits, h, through_log_softmax)
        else:
            weight = _weight_of(head)
            if not calls and not _weight_used_by_another_module(
                forward_func, inputs, extra, head, weight, output_transform
            ):
                raise ValueError(
                    f"`layer` ({type(head).__name__}) did not run during the forward pass, and "
                    "no other module computed with its weight either; pick a module that "
                    "forward_func calls (or whose weight its parent uses, as "
                    "nn.MultiheadAttention uses out_proj.weight), or layer='all'."
                )
            # a train-mode batch norm: the logits each example has when run alone
            seen = logits_seen_per_example(forward_func, inputs, extra, logits, output_transform)
            if form == "topk":
                cotangents, log_scale = _scaled_topk_cotangents(seen, k)
                reduce = _log_topk_reduce(log_scale)
            else:
                cotangents, reduce = _reference_cotangents(seen), _reference_reduce
            score = per_example_parameter_gradients(
                forward_func,
                inputs,
                extra,
                {"m": head},
                {"m.weight": weight},
                cotangents,
                reduce,
                output_transform,
            )
    score = score.to(device=logits.device)
    _warn_if_every_score_is_undefined(score, layer)
    dtype = at_least_float32(logits).dtype  # a half-precision model's scores in float32
    if form == "topk":
        return score.to(dtype) if log else _exp_score(score, dtype)
    return torch.log(score).to(dtype) if log else score.to(dtype)


def _warn_random_scores(forward_func: Callable) -> None:
    """The methods' :class:`~captum_ext.attr.RandomMapsWarning` (once per model) for a model
    left in train mode with dropout or stochastic depth active: its logits, and so every
    form's scores, differ from call to call (gradtrust runs the model in the mode it is in:
    a train-mode batch norm is explained as it normalises)."""
    from captum_ext.attr._cam import warn_random_in_train_mode  # (attr is not needed before)

    warn_random_in_train_mode("gradtrust", root_module(forward_func), "scores")


def _weight_used_by_another_module(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    layer: nn.Module,
    weight: Tensor,
    output_transform: Callable[[Any], Tensor] | None,
) -> bool:
    """Whether a forward pass (without gradients) computes with ``weight``, a parameter that
    ``layer`` holds, although ``layer`` itself never runs: its parent reads the weight
    (``F.linear(x, self.qkv.weight, self.qkv.bias)`` in torchvision's Swin attention,
    ``F.multi_head_attention_forward(..., self.out_proj.weight, ...)`` in
    ``nn.MultiheadAttention``). The per-example gradients swap the parameter in the layer's
    table, where the parent reads it, so it is differentiated as used. A weight the layer
    computes in its own forward pass (pruned, weight-normalised) is not computed when the
    layer does not run: False."""
    if not any(weight is parameter for parameter in layer.parameters(recurse=False)):
        return False
    uses: list[tuple[str, bool]] = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # (the scoring pass has warned already)
        with _FirstParameterUse({id(weight): ["weight"]}, uses):
            run_forward(forward_func, inputs, extra, output_transform, check_nan=False)
    return bool(uses)


def _check_all_parameters_options(form: str, method: str) -> None:
    if form != "topk":
        raise ValueError(
            "`layer`='all' is only defined for form='topk': the reference form takes the "
            "variance of each row of one weight matrix (one energy per class), which a "
            "model's parameters as a whole do not have; pass a layer for form='reference'."
        )
    if method == "closed_form":
        raise ValueError(
            "`layer`='all' has no closed form (the gradients of the inner parameters need a "
            "backward pass); use method='auto' or method='autograd'."
        )


def _all_parameters_score(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    form: str,
    k: int | None,
    method: str,
    output_transform: Callable[[Any], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """``layer="all"``: (log-score (N,), logits) of the topk form with the variance taken over
    every entry of every parameter of the model (one vector), by per-example autograd."""
    _check_all_parameters_options(form, method)
    model = root_module(forward_func)
    if model is None:
        raise TypeError(
            "`layer`='all' measures the gradients of every parameter of the model, but "
            "forward_func is not an nn.Module (nor a bound method of one); pass `layer`."
        )
    params = dict(model.named_parameters())
    if not params:
        raise ValueError(f"`layer`='all': the model ({type(model).__name__}) has no parameters.")
    with preserved_state([model]):
        with torch.no_grad():
            logits = run_forward(forward_func, inputs, extra, output_transform)
        k = _check_k(k, logits.shape[1])
        seen = logits_seen_per_example(forward_func, inputs, extra, logits, output_transform)
        cotangents, log_scale = _scaled_topk_cotangents(seen, k)
        score = per_example_parameter_gradients(
            forward_func,
            inputs,
            extra,
            {"m": model},
            {f"m.{name}": p for name, p in params.items()},
            cotangents,
            _log_topk_reduce(log_scale),
            output_transform,
        )
    return score.to(device=logits.device), logits


def _warn_if_every_score_is_undefined(score: Tensor, layer: Any) -> None:
    """Warn where every score is NaN: the gradients vanish for every example (0 / 0)."""
    if score.numel() and bool(torch.isnan(score).all()):
        where = "the final linear layer" if layer is None else f"`layer`={layer!r}"
        warnings.warn(
            f"gradtrust: every score is NaN: the gradients at {where} vanish for every "
            "example, so the ratio of their variances is 0 / 0. A layer that the model runs "
            "under `torch.no_grad()` (a frozen backbone inside `forward`) or whose output it "
            "detaches gets no gradient; a layer whose input features are all zero neither. "
            "Pick a layer after that point.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),  # the user's line, also through GradTrust.score
        )


def _exp_score(log_score: Tensor, dtype: torch.dtype) -> Tensor:
    """exp of the log-score in ``dtype``; warns where it exceeds the dtype's range."""
    score = torch.exp(log_score.to(dtype))
    overflow = torch.isinf(score) & torch.isfinite(log_score)
    if bool(overflow.any()):
        warnings.warn(
            f"gradtrust: the score of {int(overflow.sum())} of {score.numel()} examples exceeds "
            f"the range of {dtype} (a very confident model) and is returned as inf, which ties "
            "them; pass log=True for the natural log of the score, finite and correctly "
            "ordered (what score_dataset and the report use).",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return score


# ---------------------------------------------------------------------------------------------
# baselines from the logits
