r"""Introspective features: "Why P, rather than Q?" for every Q, measured as weight gradients.

Prabhushankar & AlRegib, "Introspective Learning: A Two-Stage Approach for Inference in Neural
Networks", NeurIPS 2022. For the final linear layer ``z = W h + b`` (W: C x d) and the
cross-entropy with label Q,

.. code-block:: text

    d CE(z, Q) / d W = (p - e_Q) h^T          p = softmax(z), e_Q one-hot

so every feature is known in closed form from one forward pass (no backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_ext._utils.batched_grad import logits_seen_per_example, per_example_parameter_gradients
from captum_ext._utils.layers import root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.precision import precise
from captum_ext._utils.validation import (
    check_int,
    format_additional_forward_args,
    format_inputs,
    select_examples,
)
from captum_ext.metrics._trust_common import (
    _check_choice,
    _check_transform,
    _forward_recording,
    _head_features,
    _resolve_head,
    _weight_of,
)

#: the feature forms: every class Q, the slides' single all-ones label, the k most likely Q
FORMS = ("per_class", "all_ones", "topk")
#: how the gradients are scaled: each by its own Frobenius norm, each example as a whole
NORMALIZATIONS = ("per_class", "global")


def introspective_features(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    layer: Any = None,
    form: str = "per_class",
    k: int | None = None,
    normalize: str | None = "per_class",
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""The introspective features r_x of each example, ``(N, F)``.

    For each contrast class Q, the gradient of the cross-entropy with label Q with respect to
    the weight of ``layer`` ("how would the network have to change if Q were the label?"):

    .. code-block:: text

        per_class  r_x = [ (p - e_Q) h^T ]_{Q = 0..C-1}        K = C rows
        topk       the rows of the k most probable Q, most probable first (P itself first)
        all_ones   r_x = sum_Q (p - e_Q) h^T = (C p - 1) h^T     K = 1 row (the slides' form)

    Each row is divided by its Frobenius norm (``normalize="per_class"``; a zero row stays
    zero) or each example's K rows by their joint norm (``"global"``), or left as is (None).
    On the final ``nn.Linear`` whose output is the logits (found automatically, checked with
    a forward hook as in :func:`~captum_ext.metrics.gradtrust`) the closed form needs one
    forward pass and no backward pass; for any other ``layer`` the per-example gradients of
    its ``weight`` come from torch.func (vmap of vector-Jacobian products, the shared engine).

    Memory per example, float32, with F = K x (C x d) for a C x d weight:

    ============  ==============================  ===================================
    form          10 classes, d = 64 (digits)      1000 classes, d = 512 (ImageNet)
    ============  ==============================  ===================================
    per_class     100 x 64 = 6,400 (25.6 kB)       1000 x 1000 x 512 = 512 M (2 GB)
    topk, k = 5   5 x 10 x 64 = 3,200 (12.8 kB)    5 x 1000 x 512 = 2.56 M (10 MB)
    all_ones      10 x 64 = 640 (2.6 kB)           1000 x 512 = 512 k (2 MB)
    ============  ==============================  ===================================

    so ``"topk"`` (or ``"all_ones"``) is the form that keeps ImageNet-sized models practical.
    ``"per_class"`` also holds its ``C x C`` cotangents ``p - e_Q`` in float64 while it
    works, ``8 C^2`` bytes per example whatever the layer: 8 MB at 1,000 classes, 800 MB at
    10,000, 3.8 GB at 21,843 (ImageNet-21k).

    Paper: M. Prabhushankar and G. AlRegib, "Introspective Learning: A Two-Stage Approach for
    Inference in Neural Networks", NeurIPS 2022.

    Args:
        forward_func (Callable): the classifier, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        layer (nn.Module or str, optional): the layer whose weight gradient is the feature.
            Default: the last ``nn.Linear``, which must produce the logits.
        form (str, optional): ``"per_class"``, ``"topk"`` or ``"all_ones"``.
            Default: "per_class".
        k (int, optional): classes kept by ``"topk"``, in [1, C]; only with
            ``form="topk"`` (the other forms keep every class). Default: min(5, C).
        normalize (str or None, optional): ``"per_class"``, ``"global"`` or None.
            Default: "per_class".
        additional_forward_args (Any, optional): extra arguments of the model.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: ``(N, F)`` features in the dtype and on the device of the logits.

    Examples::

        >>> from captum_ext.introspection import introspective_features
        >>> introspective_features(model, images[:4]).shape     # 10 classes x 10 x 64
        torch.Size([4, 6400])
        >>> introspective_features(model, images[:4], form="topk", k=3).shape
        torch.Size([4, 1920])
    """
    return _features_and_classes(
        forward_func,
        inputs,
        layer=layer,
        form=form,
        k=k,
        normalize=normalize,
        additional_forward_args=additional_forward_args,
        output_transform=output_transform,
    )[0]


def _features_and_classes(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    layer: Any = None,
    form: str = "per_class",
    k: int | None = None,
    normalize: str | None = "per_class",
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """:func:`introspective_features` and the number of classes C of the logits it computed
    (so that a caller needs no forward pass of its own to count them)."""
    form, k, normalize = check_feature_options(form, k, normalize)
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    for x in inputs:
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("`inputs` contain NaN or infinite values.")
    extra = format_additional_forward_args(additional_forward_args)
    # the last nn.Linear is looked up on the first two examples only: a forward pass of one
    # fails on a train-mode batch norm that the batch passes (BatchNorm1d on (1, C))
    n = inputs[0].shape[0]
    first = tuple(x[:2] for x in inputs)
    first_extra = select_examples(extra, n, slice(0, 2))
    head, automatic = _resolve_head(forward_func, layer, first, first_extra, output_transform)
    model = root_module(forward_func)
    with preserved_state([model, head]):
        logits, calls = _forward_recording(forward_func, inputs, extra, head, output_transform)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"the model must return (N, C) logits with C >= 2 classes (a contrast class "
                f"needs a second class); got shape {tuple(logits.shape)}."
            )
        cotangents = _cotangents(logits, form, k)
        h = _head_features(head, logits, calls)
        if h is not None:
            # ||(p - e_Q) h^T||_F = ||p - e_Q|| ||h||: normalise the two factors, then form
            # the outer products once (one pass over the large tensor)
            a, b = _normalised_factors(cotangents, h.to(cotangents.dtype), normalize)
            a, b = a.to(logits.dtype), b.to(logits.dtype)
            return (a[..., None] * b[:, None, None, :]).flatten(1), logits.shape[1]
        if automatic:
            raise ValueError(
                "`layer` is None and the last nn.Linear of the model does not produce the "
                "logits (its output differs from the model's, or it ran more than once); pass "
                "the layer to differentiate as `layer`."
            )
        # any other layer: per-example gradients through torch.func
        if not calls:
            raise ValueError(
                f"`layer` ({type(head).__name__}) did not run during the forward pass; pick "
                "a module the model calls."
            )
        weight = _weight_of(head)
        seen = logits_seen_per_example(forward_func, inputs, extra, logits, output_transform)
        if seen is not logits:  # a train-mode batch norm: each example's own logits
            cotangents = _cotangents(seen, form, k)
        if normalize is not None:
            # the gradient is linear in the cotangent and is normalised over the same dims
            # below: scaling the (float64) cotangents first keeps a confident prediction's
            # own row (entries about exp(-gap)) from underflowing in the model's float32
            dims = (2,) if normalize == "per_class" else (1, 2)
            largest = cotangents.abs().amax(dim=dims, keepdim=True)
            cotangents = torch.where(
                largest > 0, cotangents / torch.where(largest > 0, largest, 1), 0
            )
        grads = per_example_parameter_gradients(
            forward_func,
            inputs,
            extra,
            {"m": head},
            {"m.weight": weight},
            cotangents.to(logits.dtype),
            lambda g: g["m.weight"].flatten(2),
            output_transform,
        )
    grads = grads.to(device=logits.device, dtype=logits.dtype)
    if normalize == "per_class":
        grads = _unit(grads, (2,))
    elif normalize == "global":
        grads = _unit(grads, (1, 2))
    return grads.flatten(1), logits.shape[1]


def _unit(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``values`` divided by their norm over ``dims`` (zero stays zero). Scaled by the largest
    magnitude first, so that tiny entries (the gradient of a confident prediction) neither
    underflow in the squares of the norm nor blow up when divided by it."""
    largest = values.abs().amax(dim=dims, keepdim=True)
    scaled = torch.where(largest > 0, values / torch.where(largest > 0, largest, 1), 0)
    return scaled / scaled.square().sum(dim=dims, keepdim=True).sqrt().clamp_min(1)


def _normalised_factors(
    cotangents: Tensor, h: Tensor, normalize: str | None
) -> tuple[Tensor, Tensor]:
    """The factors a (N, K, C) and b (N, d) with a_K b^T the normalised rows
    (||(p - e_Q) h^T||_F = ||p - e_Q|| ||h||)."""
    if normalize is None:
        return cotangents, h
    b = _unit(h, (1,))
    return (_unit(cotangents, (2,)) if normalize == "per_class" else _unit(cotangents, (1, 2))), b


def check_feature_options(form: Any, k: Any, normalize: Any) -> tuple[str, int | None, str | None]:
    """``form``, ``k`` and ``normalize`` of :func:`introspective_features`, checked: ``k`` is
    a positive int, and only with ``form="topk"`` (the other forms keep every class, so a
    ``k`` given with them would be silently ignored)."""
    form = _check_choice(form, FORMS, "form")
    if k is not None:
        k = check_int(k, "k", minimum=1)
        if form != "topk":
            raise ValueError(
                f"`k` selects the classes of form='topk'; form={form!r} keeps "
                f"{'every class' if form == 'per_class' else 'one summed row'}, so leave `k` "
                "unset or pass form='topk'."
            )
    if normalize is not None:
        normalize = _check_choice(normalize, NORMALIZATIONS, "normalize")
    return form, k, normalize


def _cotangents(logits: Tensor, form: str, k: Any) -> Tensor:
    """dCE(z, Q)/dz = p - e_Q for the form's classes Q: (N, K, C)."""
    n, classes = logits.shape
    detached = logits.detach()
    # float64 where the device has it: the probabilities of a confident prediction's other
    # classes (exp of minus the logit gap) stay representable far longer than in float32
    p = torch.softmax(precise(detached), dim=1)
    if form == "all_ones":
        return (classes * p - 1)[:, None, :]
    if form == "topk":
        k = min(5, classes) if k is None else k
        if k > classes:
            raise ValueError(f"`k`={k} exceeds the model's {classes} classes.")
        chosen = p.topk(k, dim=1).indices
    else:
        chosen = torch.arange(classes, device=p.device).expand(n, classes)
    # entry Q of row Q is p_Q - 1: for the most likely class summed from the others, since
    # 1 - p_Q cancels to 0 when p_Q rounds to 1 (a confident prediction's own row); for the
    # rest (p_Q <= 1/2) 1 - p_Q loses nothing. Written into a copy of p: one (N, K, C)
    # tensor, not several (per_class at 21,843 classes: 3.8 GB each in float64)
    top = p.argmax(dim=1, keepdim=True)
    others_of_top = p.scatter(1, top, 0.0).sum(dim=1, keepdim=True)
    complement = torch.where(chosen == top, others_of_top, 1 - p.gather(1, chosen))
    rows = p[:, None, :].expand(n, chosen.shape[1], classes).clone()
    return rows.scatter_(2, chosen[..., None], -complement[..., None])
