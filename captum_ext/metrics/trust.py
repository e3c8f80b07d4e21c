r"""Per-example trust scores: GradTrust and the baselines it is compared with.

Every function takes ``forward_func`` (a model returning (N, C) logits, or any output with
``output_transform`` mapping it to them), ``inputs`` (a tensor or a tuple of tensors, batch
first) and keyword options, and returns an (N,) tensor on the device of the logits. **Higher
always means more trusted.** The model is left exactly as it was found: parameters,
``requires_grad`` flags, ``.grad`` buffers, batch norm running statistics (also in train
mode), train/eval flags and hooks. On very confident models use ``gradtrust(..., log=True)``:
the score itself exceeds the float range there, its log does not.

GradTrust: M. Prabhushankar and G. AlRegib, "Counterfactual Gradients-based Quantification of
Prediction Trust in Neural Networks", IEEE MIPR 2024 (arXiv 2405.13758).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from captum_ext._utils.batched_grad import run_forward
from captum_ext._utils.hooks import registered_hooks
from captum_ext._utils.layers import resolve_layer, root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.validation import format_additional_forward_args, format_inputs

__all__ = [
    "GradTrust",
    "energy",
    "gradnorm",
    "gradtrust",
    "log_likelihood",
    "margin",
    "mc_dropout",
    "negative_entropy",
    "odin",
    "purview",
    "softmax_confidence",
]

FORMS = ("topk", "reference")
METHODS = ("auto", "closed_form", "autograd")
DEFAULT_K = 5
DEFAULT_ODIN_TEMPERATURE = 100.0
DEFAULT_ODIN_EPSILON = 0.0014
DEFAULT_MC_PASSES = 20
# bytes of per-example gradients held at once on the autograd path
_GRAD_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_choice(value: Any, choices: Sequence[str], argument: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}`={value!r}: expected one of {', '.join(choices)}.")
    return value


def _check_k(k: Any, num_classes: int) -> int:
    if k is None:
        if num_classes < 2:
            raise ValueError("gradtrust needs at least 2 classes (a counterfactual class).")
        return min(DEFAULT_K, num_classes - 1)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"`k` must be an int or None, got {type(k).__name__}.")
    if not 1 <= k <= num_classes - 1:
        raise ValueError(
            f"`k`={k} is out of range: the model has {num_classes} classes, so k must be in "
            f"[1, {num_classes - 1}] (the counterfactuals exclude the predicted class)."
        )
    return k


def _check_positive(value: Any, argument: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argument}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{argument}`={value!r}: expected a finite number {bound}.")
    return float(value)


# ---------------------------------------------------------------------------------------------
# the final linear layer and the per-example gradient engine


def _last_linear(forward_func: Callable) -> nn.Linear:
    model = root_module(forward_func)
    if model is None:
        raise TypeError(
            "`layer` is None, so the final nn.Linear is looked up in the model, but "
            "forward_func is not an nn.Module (nor a bound method of one); pass `layer`."
        )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"`layer` is None and {type(model).__name__} has no nn.Linear to take as the final "
            "layer; pass `layer` (a module with a `weight`)."
        )
    return linears[-1]


def _check_transform(output_transform: Any) -> Callable[[Any], Tensor] | None:
    if output_transform is not None and not callable(output_transform):
        raise TypeError(
            "`output_transform` must be callable (model output -> (N, classes) logits), got "
            f"{type(output_transform).__name__}."
        )
    return output_transform


def _forward_recording(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: Any,
    layer: nn.Module,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> tuple[Tensor, list[tuple[Tensor | None, Tensor | None]]]:
    """One forward pass without gradients; record ``layer``'s first input and its output."""
    calls: list[tuple[Tensor | None, Tensor | None]] = []

    def hook(module, args, output):
        first = args[0] if args and isinstance(args[0], Tensor) else None
        out = output if isinstance(output, Tensor) else None
        calls.append((first, out))

    with registered_hooks(lambda: layer.register_forward_hook(hook)), torch.no_grad():
        logits = run_forward(forward_func, inputs, extra, output_transform)
    return logits, calls


def _head_features(layer: nn.Module, logits: Tensor, calls: list) -> Tensor | None:
    """The features h (N, d) when ``layer`` is an nn.Linear whose output IS the logits."""
    if not isinstance(layer, nn.Linear) or len(calls) != 1:
        return None
    h, out = calls[0]
    if h is None or out is None or h.dim() != 2 or out.shape != logits.shape:
        return None
    if not torch.equal(out, logits):
        return None
    return h


def _weight_of(layer: nn.Module) -> Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(
            f"`layer` ({type(layer).__name__}) has no weight matrix (a `weight` parameter with "
            "at least 2 dimensions) to differentiate."
        )
    return weight


class _Holder(nn.Module):
    """Holds modules as children so that ``functional_call`` can swap their parameters while
    the user's ``forward_func`` (which calls those modules) runs."""

    def __init__(self, forward_func: Callable, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.__dict__["_call"] = forward_func  # not registered: forward_func may be a Module
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args):
        return self.__dict__["_call"](*args)


def _per_example_grads(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    extra: tuple,
    modules: dict[str, nn.Module],
    names: dict[str, Tensor],
    cotangents: Tensor,
    reduce: Callable[[dict[str, Tensor]], Tensor],
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """``reduce`` of per-example vector-Jacobian products of the logits, chunked over examples.

    For example n and row j of ``cotangents`` (N, K, C), the gradient of
    ``<cotangents[n, j], logits(x_n)>`` with respect to the named parameters ``names`` (keys
    ``"child.param"`` of ``_Holder(forward_func, modules)``), computed with torch.func
    (``functional_call`` + ``vjp`` under ``vmap``): shape (n, K, *parameter.shape) per name.
    ``reduce`` maps those to (n,) scores. Extra forward args whose first dimension equals N are
    split per example; the others are passed to every example unchanged.

    The buffers of the model (batch norm running statistics) are given to every example as
    its own copy: a model in train mode updates those copies, never the user's buffers (and
    each example is normalised with its own statistics, as a batch of one).
    """
    model = root_module(forward_func)
    paths = {id(m): p for p, m in model.named_modules()} if model is not None else {}
    if all(id(module) in paths for module in modules.values()):
        # the modules belong to the model: reach every parameter and buffer through it once
        # (a module reached by two paths would be swapped twice and not restored)
        prefix = {key: ("_root." + paths[id(m)]).rstrip(".") for key, m in modules.items()}
        renamed, original = {}, {}
        for name, tensor in names.items():
            key, _, rest = name.partition(".")
            renamed[f"{prefix[key]}.{rest}"] = tensor
            original[f"{prefix[key]}.{rest}"] = name
        names, modules = renamed, {"_root": model}
    else:
        original = {name: name for name in names}
    holder = _Holder(forward_func, modules)
    params = {name: tensor.detach() for name, tensor in names.items()}
    buffers = {name: b.detach() for name, b in holder.named_buffers()}
    n, k = cotangents.shape[:2]
    per_example_bytes = k * sum(t.numel() * t.element_size() for t in params.values())
    chunk = max(1, min(n, _GRAD_CHUNK_BYTES // max(per_example_bytes, 1)))
    batched = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in extra]

    def one(xs: tuple, extras_b: tuple, cot: Tensor, bufs: dict[str, Tensor]):
        args = [x.unsqueeze(0) if isinstance(x, Tensor) else x for x in xs]
        it = iter(extras_b)
        more = [next(it).unsqueeze(0) if b else a for a, b in zip(extra, batched)]

        def logits_of(p):
            # fresh copies made inside the transform: train-mode updates touch only these
            own = {name: b.clone() for name, b in bufs.items()}
            out = functional_call(holder, {**own, **p}, tuple(args) + tuple(more))
            return output_transform(out) if output_transform is not None else out

        _, pullback = vjp(logits_of, params)
        grads = vmap(pullback)(cot.unsqueeze(1))[0]
        return {original[name]: g for name, g in grads.items()}

    x_dims = tuple(0 if isinstance(x, Tensor) else None for x in inputs)
    scores = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        xs = tuple(x[start:stop] if isinstance(x, Tensor) else x for x in inputs)
        extras_b = tuple(a[start:stop] for a, b in zip(extra, batched) if b)
        bufs = {name: b.expand(stop - start, *b.shape) for name, b in buffers.items()}
        grads = vmap(one, in_dims=(x_dims, 0, 0, 0), randomness="different")(
            xs, extras_b, cotangents[start:stop], bufs
        )
        scores.append(reduce(grads).detach())
    return torch.cat(scores)


# ---------------------------------------------------------------------------------------------
# GradTrust


def _compute_dtype(logits: Tensor) -> Tensor:
    """The logits in at least float32 (half-precision logits lose the small probabilities)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


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
    z = _compute_dtype(logits)
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
    dev = _compute_dtype(logits) - 1.0 / logits.shape[1]
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
    log(1 - p_Q) and log(sum_j p_j^2 - p_Q^2) lose nothing."""
    z = _compute_dtype(logits)
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


def _reference_closed_form(logits: Tensor, h: Tensor) -> Tensor:
    dev = _compute_dtype(logits) - 1.0 / logits.shape[1]
    scale = dev.abs().amax(1, keepdim=True)
    score = 1.0 / (dev / scale).pow(4).mean(1)  # = max_c dev^4 / mean_c dev^4; 0/0 -> NaN
    # energies g_c^4 Var(h^2): all zero (undefined ratio) when h^2 is constant or d == 1
    vanishing = h.pow(2).var(1) == 0 if h.shape[1] > 1 else torch.ones_like(score, dtype=bool)
    return torch.where(vanishing, torch.full_like(score, math.nan), score)


def _variances(g: Tensor) -> Tensor:
    """(n, K) unbiased variance over all entries of each (n, K, ...) gradient, accumulated in
    float64 where the device has it (float32 sums of ~1e5 squares lose digits)."""
    flat = g.flatten(2)
    if flat.dtype in (torch.float16, torch.bfloat16, torch.float32) and flat.device.type != "mps":
        return flat.double().var(2)
    return flat.float().var(2) if flat.dtype != torch.float64 else flat.var(2)


def _log_topk_reduce(log_scale: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """The (chunked) reducer of the autograd path: gradients of the scaled cotangents, back to
    the true variances in log space: log Var(grad CE(c)) = log Var(grad g_hat_c) + 2 log(1-p_c)."""
    position = 0

    def reduce(grads: dict[str, Tensor]) -> Tensor:
        nonlocal position
        (g,) = grads.values()
        n = g.shape[0]
        variances = _variances(g)
        scale = log_scale[position : position + n].to(variances.device, variances.dtype)
        position += n
        return _log_ratio(torch.log(variances) + 2 * scale)

    return reduce


def _reference_reduce(grads: dict[str, Tensor]) -> Tensor:
    (g,) = grads.values()
    rows = g.flatten(3)[:, 0]  # (n, rows, d)
    if rows.dtype != torch.float64 and rows.device.type != "mps":
        rows = rows.double()
    energies = rows.pow(2).var(2)  # (n, rows): unbiased, over each row
    return energies.amax(1) / energies.mean(1)


def _resolve_head(forward_func, layer):
    if layer is None:
        return _last_linear(forward_func), True
    return resolve_layer(forward_func, layer), False


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
        layer (nn.Module or str, optional): the layer whose weight gradients are measured.
            Default: the last ``nn.Linear`` of the model, which must produce the logits.
        method (str, optional): ``"auto"``, ``"closed_form"`` or ``"autograd"``.
        log (bool, optional): return the natural log of the score (finite on confident
            models, where the score itself overflows). Default: False.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Examples::

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
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"`k` must be an int or None, got {type(k).__name__}.")
            if k < 1:
                raise ValueError(f"`k`={k} is out of range: expected k >= 1.")
        if not isinstance(log, bool):
            raise TypeError(f"`log` must be True or False, got {type(log).__name__}.")
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
    hook), the closed forms need one forward pass and no backward pass. For any other layer
    (or ``method="autograd"``), per-example weight gradients are computed with torch.func
    (``functional_call`` and ``vjp`` under ``vmap``) and the same definitions are applied to
    the layer's ``weight`` (rows = first dimension). Where every gradient vanishes (h = 0, or
    for ``"reference"`` h^2 constant over d) the ratio is undefined and NaN is returned, as
    the gradient computation would give. On the autograd path a model in train mode runs
    each example as a batch of one (batch norm uses that example's statistics) on its own
    copy of the buffers; the model's running statistics are never changed.

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
            as a module or a dotted name. Default: the last ``nn.Linear`` of the model; its
            output must be the logits, else a ValueError asks for ``layer`` or
            ``method="autograd"``.
        method (str, optional): ``"auto"`` (closed form when the layer produces the logits,
            autograd for an explicitly given other layer), ``"closed_form"`` (error if it does
            not apply) or ``"autograd"``. Default: ``"auto"``.
        log (bool, optional): return the natural log of the score (finite on confident
            models) instead of the score. Default: False.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``. On the
            autograd path, tensors whose first dimension is N are split per example.
        output_transform (Callable, optional): maps the model's output to (N, C) logits (a
            dict's ``"logits"`` entry, a tuple's first element, an (N, C, 1) output squeezed),
            as on the CAM methods. The closed form applies when the layer's output equals the
            transformed output. Default: None (the output is the logits).

    Returns:
        Tensor: (N,) scores (or their natural log with ``log=True``), higher = more trusted,
        in the dtype and device of the logits.

    Examples::

        >>> scores = gradtrust(model, images)                       # paper form, top-5
        >>> log_scores = gradtrust(model, images, log=True)         # confident models
        >>> scores = gradtrust(model, images, form="reference")     # published demo
        >>> scores = gradtrust(model, images, layer="layer4.1.conv2")  # autograd path
    """
    form = _check_choice(form, FORMS, "form")
    method = _check_choice(method, METHODS, "method")
    if not isinstance(log, bool):
        raise TypeError(f"`log` must be True or False, got {type(log).__name__}.")
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    head, automatic = _resolve_head(forward_func, layer)
    model = root_module(forward_func)
    with preserved_state([model, head]):
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
        if h is not None and method != "autograd":
            if form == "topk":
                score = _log_topk_closed_form(logits, h, k)
            else:
                score = _reference_closed_form(logits, h)
        else:
            if not calls:
                raise ValueError(
                    f"`layer` ({type(head).__name__}) did not run during the forward pass; pick "
                    "a module that forward_func calls."
                )
            weight = _weight_of(head)
            if form == "topk":
                cotangents, log_scale = _scaled_topk_cotangents(logits, k)
                reduce = _log_topk_reduce(log_scale)
            else:
                cotangents, reduce = _reference_cotangents(logits), _reference_reduce
            score = _per_example_grads(
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
    if form == "topk":
        return score.to(logits.dtype) if log else _exp_score(score, logits.dtype)
    return torch.log(score).to(logits.dtype) if log else score.to(logits.dtype)


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
            stacklevel=4,
        )
    return score


# ---------------------------------------------------------------------------------------------
# baselines from the logits


def _logits(forward_func, inputs, additional_forward_args, output_transform=None) -> Tensor:
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    with preserved_state([model]), torch.no_grad():
        return run_forward(forward_func, inputs, additional_forward_args, output_transform)


@log_usage()
def softmax_confidence(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Maximum softmax probability (Hendrycks and Gimpel, ICLR 2017).

    .. code-block:: text

        score = max_c softmax(z)_c

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [1/C, 1], higher = more trusted.

    Examples::

        >>> scores = softmax_confidence(model, images)
    """
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    return torch.softmax(logits, 1).amax(1)


@log_usage()
def energy(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    temperature: float = 1.0,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Negative free energy of the logits (Liu et al., "Energy-based Out-of-distribution
    Detection", NeurIPS 2020).

    .. code-block:: text

        score = T log sum_c exp(z_c / T)      (= -E(x; f), higher = more in-distribution)

    Unlike the maximum softmax probability it keeps the logits' scale, which is what makes
    it a stronger out-of-distribution score.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        temperature (float, optional): T > 0. Default: 1.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores, higher = more trusted (more in-distribution).

    Examples::

        >>> scores = energy(model, images)
    """
    t = _check_positive(temperature, "temperature")
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    return t * torch.logsumexp(logits / t, dim=1)


@log_usage()
def negative_entropy(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Negative entropy of the softmax distribution.

    .. code-block:: text

        score = sum_c p_c log p_c,   p = softmax(z)   (0 log 0 = 0)

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [-log C, 0], higher = more trusted.

    Examples::

        >>> scores = negative_entropy(model, images)
    """
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    log_p = torch.log_softmax(logits, 1)
    return (log_p.exp() * log_p).sum(1)


@log_usage()
def margin(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Margin between the two most likely classes.

    .. code-block:: text

        score = p_(1) - p_(2),   p = softmax(z) sorted in decreasing order

    Args:
        forward_func (Callable): the model, returning (N, C >= 2) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [0, 1], higher = more trusted.

    Examples::

        >>> scores = margin(model, images)
    """
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    if logits.shape[1] < 2:
        raise ValueError("margin needs a model with at least 2 classes.")
    top = torch.softmax(logits, 1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@log_usage()
def log_likelihood(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Log-likelihood of the predicted class (minus the NLL of the prediction).

    .. code-block:: text

        score = max_c log softmax(z)_c

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores <= 0, higher = more trusted.

    Examples::

        >>> scores = log_likelihood(model, images)
    """
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    return torch.log_softmax(logits, 1).amax(1)


@log_usage()
def odin(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    temperature: float = DEFAULT_ODIN_TEMPERATURE,
    epsilon: float = DEFAULT_ODIN_EPSILON,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""ODIN: temperature scaling and input perturbation (Liang, Li and Srikant, ICLR 2018).

    .. code-block:: text

        S_T(x)  = max_c softmax(z(x) / T)_c
        x~      = x - epsilon * sign(-grad_x log S_T(x))
        score   = S_T(x~)

    Every floating-point input tensor is perturbed. Gradients are taken for the whole batch
    at once, so examples must be independent (a model in eval mode).

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        temperature (float, optional): T > 0. Default: 100 (as in the GradTrust paper).
        epsilon (float, optional): perturbation size >= 0. Default: 0.0014.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [1/C, 1], higher = more trusted.

    Examples::

        >>> scores = odin(model, images, temperature=100.0, epsilon=0.0014)
    """
    temperature = _check_positive(temperature, "temperature")
    epsilon = _check_positive(epsilon, "epsilon", allow_zero=True)
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    with preserved_state([model]):
        with torch.enable_grad():
            leaves = tuple(
                x.detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs
            )
            wrt = [x for x in leaves if x.requires_grad]
            if not wrt:
                raise TypeError("`inputs` holds no floating-point tensor to perturb.")
            logits = run_forward(forward_func, leaves, additional_forward_args, output_transform)
            objective = torch.log_softmax(logits / temperature, 1).amax(1).sum()
            grads = iter(torch.autograd.grad(objective, wrt))
        perturbed = tuple(
            x.detach() - epsilon * torch.sign(-next(grads)) if x.is_floating_point() else x
            for x in inputs
        )
        with torch.no_grad():
            logits = run_forward(forward_func, perturbed, additional_forward_args, output_transform)
    return torch.softmax(logits / temperature, 1).amax(1)


def _seed_from(generator: Any) -> int | None:
    if generator is None:
        return None
    if isinstance(generator, bool):
        raise TypeError("`generator` must be a torch.Generator, an int seed or None.")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, an int seed or None, got "
            f"{type(generator).__name__}."
        )
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


@log_usage()
def mc_dropout(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    n_passes: int = DEFAULT_MC_PASSES,
    generator: torch.Generator | int | None = None,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Monte-Carlo dropout (Gal and Ghahramani, ICML 2016): negative entropy of the mean
    softmax over ``n_passes`` forward passes with dropout active.

    .. code-block:: text

        p_bar = (1/T) sum_t softmax(z_t),   z_t = logits with dropout masks t
        score = sum_c p_bar_c log p_bar_c

    Only the dropout modules (subclasses of ``nn.modules.dropout._DropoutNd``) are switched
    to train mode; batch norm and everything else keep their mode, and all flags are restored.
    Reproducibility: with a ``generator`` (or an int seed), a seed ``s`` is drawn as
    ``torch.randint(0, 2**62, (), generator=generator)`` and the passes run inside
    ``torch.random.fork_rng`` with torch's RNG (CPU and the inputs' CUDA device) seeded with
    ``s``, so the global RNG state is left untouched. With ``generator=None`` the global RNG is
    used (and advanced).

    Args:
        forward_func (Callable): the model (an ``nn.Module`` or a bound method of one) with at
            least one dropout module.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        n_passes (int, optional): T >= 1. Default: 20.
        generator (torch.Generator or int, optional): source of the dropout randomness.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [-log C, 0], higher = more trusted.

    Examples::

        >>> scores = mc_dropout(model, images, n_passes=20, generator=0)
    """
    if isinstance(n_passes, bool) or not isinstance(n_passes, int) or n_passes < 1:
        raise ValueError(f"`n_passes` must be a positive int, got {n_passes!r}.")
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    if model is None:
        raise TypeError(
            "mc_dropout needs forward_func to be an nn.Module (or a bound method of one) to "
            "find its dropout modules."
        )
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError(
            f"{type(model).__name__} has no dropout module, so MC-dropout would equal "
            "negative_entropy; use that instead."
        )
    seed = _seed_from(generator)
    device = inputs[0].device
    cuda = [device] if device.type == "cuda" else []
    with preserved_state([model]), torch.no_grad():
        for module in dropouts:
            module.training = True
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
                if cuda:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            mean = None
            for _ in range(n_passes):
                logits = run_forward(
                    forward_func, inputs, additional_forward_args, output_transform
                )
                probs = torch.softmax(logits, 1)
                mean = probs if mean is None else mean + probs
    mean = mean / n_passes
    return torch.special.xlogy(mean, mean).sum(1)


# ---------------------------------------------------------------------------------------------
# gradient-based baselines


@log_usage()
def gradnorm(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    layer: nn.Module | str | None = None,
    p: float = 2.0,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""GradNorm (Huang, Geng and Li, NeurIPS 2021): norm of the last-layer weight gradient of
    the KL divergence from the uniform distribution to the softmax.

    .. code-block:: text

        L     = KL(u || softmax(z)),   u = (1/C, ..., 1/C),   dL/dz = softmax(z) - u
        score = ||grad_W L||_p = ||softmax(z) - u||_p ||h||_p     (entry-wise p-norm of g h^T)

    The score is the norm itself, as in the GradNorm paper: a peaked softmax and large
    features give large gradients, and these are the trusted (in-distribution) predictions,
    so higher = more trusted. The GradNorm paper uses p = 1; the default here is the L2 norm.
    Closed form (one forward pass) when ``layer`` is the final ``nn.Linear``; otherwise the
    per-example weight gradients are computed with torch.func.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        layer (nn.Module or str, optional): default the last ``nn.Linear`` (must produce the
            logits).
        p (float, optional): the entry-wise norm, >= 1. Default: 2.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores >= 0, higher = more trusted.

    Examples::

        >>> scores = gradnorm(model, images)
    """
    p = _check_positive(p, "p")
    if p < 1:
        raise ValueError(f"`p`={p}: expected a norm order >= 1.")
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    head, automatic = _resolve_head(forward_func, layer)
    model = root_module(forward_func)
    with preserved_state([model, head]):
        logits, calls = _forward_recording(forward_func, inputs, extra, head, output_transform)
        g = torch.softmax(logits, 1) - 1.0 / logits.shape[1]
        h = _head_features(head, logits, calls)
        if h is not None:
            return torch.linalg.vector_norm(g, p, dim=1) * torch.linalg.vector_norm(h, p, dim=1)
        if automatic:
            raise ValueError(
                "`layer` is None and the last nn.Linear does not produce the logits; pass `layer`."
            )
        weight = _weight_of(head)

        def reduce(grads: dict[str, Tensor]) -> Tensor:
            (grad,) = grads.values()
            return torch.linalg.vector_norm(grad.flatten(1), p, dim=1)

        return _per_example_grads(
            forward_func,
            inputs,
            extra,
            {"m": head},
            {"m.weight": weight},
            g.unsqueeze(1),
            reduce,
            output_transform,
        )


def _default_groups(model: nn.Module) -> list[list[nn.Module]]:
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no parameters; purview needs some.")
    return [[layers[0]], [layers[-1]]]


def _group_parameters(model: nn.Module, groups: Any) -> list[list[str]]:
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError(
            "`groups` must be a non-empty list of groups, each a module, a dotted module name "
            "or a list of those."
        )
    names = {id(t): name for name, t in model.named_parameters()}
    result = []
    for i, group in enumerate(groups):
        members = group if isinstance(group, (list, tuple)) else [group]
        params: list[str] = []
        for member in members:
            module = resolve_layer(model, member, argument=f"groups[{i}]")
            for t in module.parameters():
                if id(t) not in names:
                    raise ValueError(f"`groups[{i}]` holds parameters outside the model.")
                if names[id(t)] not in params:
                    params.append(names[id(t)])
        if not params:
            raise ValueError(f"`groups[{i}]` has no parameters.")
        result.append(params)
    return result


@log_usage()
def purview(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    groups: Sequence[Any] | None = None,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Purview (Lee and AlRegib, 2023): minus the mean squared gradient norm of parameter
    groups under binary cross-entropy against an all-ones label.

    .. code-block:: text

        L     = mean_c BCEWithLogits(z_c, 1) = mean_c log(1 + exp(-z_c))
        score = - (1/G) sum_groups sum_{theta in group} ||dL/dtheta||^2

    Gradients are per example (torch.func ``functional_call`` + ``vjp`` under ``vmap``).
    Large gradients mean the model would have to change to fit the input: less trusted.
    For a last linear layer the gradient is ``g h^T``, so the score follows the feature norm
    ``||h||^2``. Where correct predictions have the larger features, as on the bundled digit
    model, it ranks them *below* errors (AUROC 0.42; ``benchmarks/gradtrust_evidence.py``).

    Args:
        forward_func (Callable): the model (an ``nn.Module`` or a bound method of one).
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        groups (list, optional): parameter groups, each a module, a dotted module name or a
            list of those (all their parameters, biases included). Default: the first and the
            last module that owns parameters (the "early" and "late" groups).
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores <= 0, higher = more trusted.

    Examples::

        >>> scores = purview(model, images, groups=["conv1", "fc"])
    """
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    model = root_module(forward_func)
    if model is None:
        raise TypeError("purview needs forward_func to be an nn.Module or a bound method of one.")
    group_names = _group_parameters(model, _default_groups(model) if groups is None else groups)
    named = dict(model.named_parameters())
    wanted = {f"m.{name}": named[name] for group in group_names for name in group}
    with preserved_state([model]):
        logits = _logits(forward_func, inputs, extra, output_transform)
        cotangent = (torch.sigmoid(logits) - 1) / logits.shape[1]

        def reduce(grads: dict[str, Tensor]) -> Tensor:
            per_group = [
                sum(grads[f"m.{name}"].flatten(1).pow(2).sum(1) for name in group)
                for group in group_names
            ]
            return -torch.stack(per_group).mean(0)

        return _per_example_grads(
            forward_func,
            inputs,
            extra,
            {"m": model},
            wanted,
            cotangent.unsqueeze(1),
            reduce,
            output_transform,
        )
