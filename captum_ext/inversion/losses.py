r"""Loss terms of network inversion, training-like reconstruction and counterfeits.

Notation: ``q`` are the classifier's logits of generated images (``N x K``), ``c`` the
conditioning vectors (``N x K``, rows summing to 1), ``phi`` the penultimate features
(``N x D``), ``x`` images ``N x C x H x W``. Every loss returns a scalar tensor through
which gradients flow to its tensor inputs (to the generator during training). A batch of
no examples (``N = 0``) gives 0 for the losses that average over examples (the sum over no
terms: in the inputs' dtype, on their device and graph, not torch's NaN mean); the
diversity terms, which compare pairs, need ``N >= 2`` (ValueError naming ``features``).

Sources: Suhail, Sethi et al., "Network Inversion of Convolutional Neural Nets" (arXiv
2407.18002) for the KL, CE, cosine and orthogonality terms; "Network Inversion for
Training-Like Data Reconstruction" (TLDR, arXiv 2410.16884) for the priors (total variation,
pixel range, weight-gradient norm, perturbed KL/CE).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext._utils.batched_grad import call_model, in_model_precision
from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.model_state import gradients_on, preserved_state
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.seeding import as_generator
from captum_ext._utils.validation import check_number

__all__ = [
    "class_cosine_diversity",
    "cosine_diversity",
    "cross_entropy_to_labels",
    "feature_orthogonality",
    "kl_to_conditioning",
    "perturbed_kl_ce",
    "pixel_range",
    "total_variation",
    "weight_gradient_norm",
]


def _mean_or_zero(values: Tensor) -> Tensor:
    """The mean of ``values``; for no entries (an empty batch) their sum, 0, which keeps
    the inputs' dtype, device and graph instead of torch's NaN mean over nothing."""
    return values.mean() if values.numel() else values.sum()


def _check_tensor(value, argument: str, dims: tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{argument}` must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"`{argument}` must be a floating point tensor, got {value.dtype}.")
    if dims is not None and value.dim() not in dims:
        raise ValueError(
            f"`{argument}` must have {' or '.join(map(str, dims))} dimensions, got shape "
            f"{tuple(value.shape)}."
        )
    return value


def _check_logits_targets(logits: Tensor, conditioning: Tensor) -> None:
    _check_tensor(logits, "logits", (2,))
    _check_tensor(conditioning, "conditioning", (2,))
    if conditioning.shape != logits.shape:
        raise ValueError(
            f"`conditioning` must have the shape of `logits` {tuple(logits.shape)}, got "
            f"{tuple(conditioning.shape)}."
        )


def _check_model_logits(output, n: int | None, *, module_only: bool) -> Tensor:
    """The model's output if it is (N, classes) logits for the ``n`` examples given, else a
    ValueError naming ``model`` (a tuple such as ``(logits, features)`` gets the hint to keep
    its first element)."""
    if (
        isinstance(output, Tensor)
        and output.dim() == 2
        and output.is_floating_point()
        and (n is None or output.shape[0] == n)
    ):
        return output
    if isinstance(output, Tensor):
        got = f"a {output.dtype} tensor of shape {tuple(output.shape)}"
    else:
        got = type(output).__name__
    if isinstance(output, (tuple, list)):
        got += " of " + ", ".join(
            f"{tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
            for item in output
        )
        remedy = (
            " If its first element holds the logits, wrap the model in an nn.Module whose "
            "forward returns model(x)[0]."
            if module_only
            else " If its first element holds the logits, pass lambda *args: model(*args)[0]."
        )
    else:
        remedy = ""
    examples = "" if n is None else f" for N={n} examples"
    raise ValueError(f"`model` must return (N, classes) logits{examples}, got {got}.{remedy}")


def _as_labels(labels, logits: Tensor) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"`labels` given as vectors must have the shape of `logits` "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
        labels = labels.argmax(dim=1)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`labels` must be {logits.shape[0]} class indices (one per row of `logits`), got "
            f"shape {tuple(labels.shape)}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"`labels` must lie in 0..{logits.shape[1] - 1}.")
    return labels.long()


def kl_to_conditioning(logits: Tensor, conditioning: Tensor) -> Tensor:
    r"""KL divergence from the conditioning vector to the classifier's prediction.

    ``KL(c || softmax q) = mean_i sum_k c_ik (log c_ik - log softmax(q_i)_k)``, with
    ``0 log 0 = 0`` (so that one-hot ``c`` gives the cross-entropy). Batch mean.

    Args:
        logits (Tensor): ``N x K`` logits ``q``.
        conditioning (Tensor): ``N x K`` probability vectors ``c``.

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``).

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import kl_to_conditioning
        >>> q = torch.tensor([[2.0, 0.0]])
        >>> abs(float(kl_to_conditioning(q, torch.softmax(q, 1)))) < 1e-6
        True
    """
    _check_logits_targets(logits, conditioning)
    log_p = F.log_softmax(logits, dim=1)
    c = conditioning.to(log_p.dtype)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    return _mean_or_zero((c * (torch.log(safe) - log_p)).sum(dim=1))


def cross_entropy_to_labels(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Cross-entropy of the logits with the conditioning labels.

    ``CE = mean_i -log softmax(q_i)_{y_i}``, with ``y_i = argmax c_i`` when conditioning
    vectors are given instead of labels.

    Args:
        logits (Tensor): ``N x K`` logits.
        labels (Tensor): ``N`` int class indices, or ``N x K`` conditioning vectors.

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``).

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import cross_entropy_to_labels
        >>> float(cross_entropy_to_labels(torch.zeros(1, 4), torch.tensor([2])))  # log 4
        1.3862943649291992
    """
    _check_tensor(logits, "logits", (2,))
    labels = _as_labels(labels, logits)
    if not labels.numel():  # torch's mean over no examples is NaN
        return F.cross_entropy(logits, labels, reduction="sum")
    return F.cross_entropy(logits, labels)


def _flat_features(features, eps: float) -> Tensor:
    check_number(eps, "eps")
    features = _check_tensor(features, "features")
    if features.dim() < 2:
        raise ValueError(
            f"`features` must be N x D (or N x ...), got shape {tuple(features.shape)}."
        )
    if features.shape[0] < 2:
        raise ValueError(
            f"`features` needs at least 2 examples to compare, got {features.shape[0]}."
        )
    return features.flatten(1)


def cosine_diversity(features: Tensor, *, eps: float = 1e-8) -> Tensor:
    r"""Mean pairwise cosine similarity of features (lower is more diverse).

    ``L_cos = 1 / (N (N - 1)) * sum_{i != j} cos(phi_i, phi_j)``, with
    ``cos(a, b) = a . b / (max(|a|, eps) max(|b|, eps))`` (each norm floored, so tiny
    features keep their direction); signed, in ``[-1, 1]``. Minimising it spreads the
    generated images apart in feature space.

    Args:
        features (Tensor): ``N x D`` features (``N >= 2``; more dimensions are flattened).
        eps (float, optional): Floor of the norms, > 0 (0 would divide an all-zero
            feature vector by 0). Default: 1e-8

    Returns:
        Tensor: Scalar.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import cosine_diversity
        >>> float(cosine_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])))
        -1.0
    """
    phi = _flat_features(features, eps)
    n = phi.shape[0]
    unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(eps)
    sims = unit @ unit.T
    return (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))


def class_cosine_diversity(features: Tensor, labels: Tensor, *, eps: float = 1e-8) -> Tensor:
    r"""Mean pairwise cosine similarity of features *within each class* (lower is more
    diverse).

    ``L_cls = sum_{i != j, y_i = y_j} cos(phi_i, phi_j) / #{(i, j): i != j, y_i = y_j}``
    (0 when no two examples share a label). :func:`cosine_diversity` averages over every
    pair of a mixed batch, where pairs of different classes are the great majority (with
    ``K`` classes drawn uniformly, about ``1 - 1/K`` of them) and are already dissimilar;
    this term pushes apart only the images of the same class, which is where a
    conditioned generator collapses. Our addition to the papers' cosine / orthogonality
    terms (Suhail, Sethi et al., arXiv 2407.18002), aimed at the within-class diversity
    they measure.

    Args:
        features (Tensor): ``N x D`` features (``N >= 2``; more dimensions are flattened).
        labels (Tensor): ``(N,)`` integer labels.
        eps (float, optional): Floor of the norms, > 0 (0 would divide an all-zero
            feature vector by 0). Default: 1e-8

    Returns:
        Tensor: Scalar.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import class_cosine_diversity
        >>> phi = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> float(class_cosine_diversity(phi, torch.tensor([0, 0, 1, 2])))
        1.0
    """
    phi = _flat_features(features, eps)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != phi.shape[0]:
        raise ValueError(
            f"`labels` must be a 1-D tensor with one label per row of `features` "
            f"({phi.shape[0]}), got {getattr(labels, 'shape', type(labels).__name__)}."
        )
    unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(eps)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    pairs = same.sum()
    if int(pairs) == 0:
        return phi.sum() * 0.0
    sims = unit @ unit.T
    return (sims * same.to(sims.dtype)).sum() / pairs.to(sims.dtype)


def feature_orthogonality(features: Tensor, *, eps: float = 1e-8) -> Tensor:
    r"""Distance of the normalised Gram matrix of the features from the identity.

    ``L_orth = || G - I ||_F^2 / N^2`` with ``G_ij = cos(phi_i, phi_j)`` (the Gram matrix of
    the L2-normalised features). Zero when the features are mutually orthogonal.

    Args:
        features (Tensor): ``N x D`` features (``N >= 2``; more dimensions are flattened).
        eps (float, optional): Floor of the norms, > 0 (0 would divide an all-zero
            feature vector by 0). Default: 1e-8

    Returns:
        Tensor: Scalar, >= 0.

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import feature_orthogonality
        >>> float(feature_orthogonality(torch.eye(3)))
        0.0
    """
    phi = _flat_features(features, eps)
    n = phi.shape[0]
    unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(eps)
    gram = unit @ unit.T
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    return ((gram - eye) ** 2).sum() / n**2


def _check_images(images, argument: str = "images") -> Tensor:
    images = _check_tensor(images, argument)
    if images.dim() != 4:
        raise ValueError(f"`{argument}` must be N x C x H x W, got shape {tuple(images.shape)}.")
    return images


def _check_bound(value, argument: str) -> float | Tensor:
    """``value`` (a real number, numpy's included, as a float; or a one-element real
    tensor, as given), after refusing anything else and NaN by name; an infinite bound
    leaves that side unbounded."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"`{argument}` must be a real number, got a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}."
            )
        bound = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = bound = float(value)
    else:
        raise TypeError(
            f"`{argument}` must be a real number, got {type(value).__name__} {value!r}."
        )
    if math.isnan(bound):
        raise ValueError(f"`{argument}` is NaN; give a real number (or +-inf for no bound).")
    return value


def total_variation(images: Tensor) -> Tensor:
    r"""Squared total variation: mean squared difference of neighbouring pixels.

    ``TV(x) = mean_{n,c,h,w} (x[h+1, w] - x[h, w])^2 + mean_{n,c,h,w} (x[h, w+1] - x[h, w])^2``
    (each mean over the ``N C (H-1) W`` vertical resp. ``N C H (W-1)`` horizontal pairs;
    a direction without pairs, such as every direction of an empty batch ``N = 0``,
    contributes 0). A smoothness prior of training-like reconstruction (TLDR).

    Args:
        images (Tensor): ``N x C x H x W`` (pixels in [0, 1] in the trainers).

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``).

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import total_variation
        >>> float(total_variation(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])))
        1.0
    """
    x = _check_images(images)
    zero = x.sum() * 0
    vertical = _mean_or_zero((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2) if x.shape[2] > 1 else zero
    horizontal = _mean_or_zero((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2) if x.shape[3] > 1 else zero
    return vertical + horizontal


def pixel_range(images: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    r"""Penalty for pixels outside the valid range ``[low, high]``.

    ``L_pix = mean (relu(low - x)^2 + relu(x - high)^2)`` over all pixels; zero when every
    pixel is in range. (A :class:`ConditionedGenerator` with ``bounded=True`` produces
    in-range pixels by construction; the prior matters for ``bounded=False``.)

    Args:
        images (Tensor): ``N x C x H x W`` pixels.
        low (float, optional): Default: 0.0
        high (float, optional): Default: 1.0

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``).

    Examples::

        >>> import torch
        >>> from captum_ext.inversion import pixel_range
        >>> float(pixel_range(torch.tensor([[[[-0.5, 0.5, 1.5, 1.0]]]])))
        0.125
    """
    x = _check_images(images)
    low = _check_bound(low, "low")
    high = _check_bound(high, "high")
    if not low < high:
        raise ValueError(f"`low` must be smaller than `high`, got {low} and {high}.")
    return _mean_or_zero(F.relu(low - x) ** 2 + F.relu(x - high) ** 2)


@renamed_arguments(classifier="model")
def weight_gradient_norm(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    squared: bool = True,
    create_graph: bool = True,
) -> Tensor:
    r"""Norm of the gradient of the model's CE with respect to its own weights.

    ``L_grad = sum_w || d CE(f(x), y) / d w ||^2`` over all parameters ``w`` of ``f`` (the
    square root of it with ``squared=False``). Training examples sit near a minimum of the
    training loss, so training-like reconstructions should have small weight gradients
    (TLDR). Computed by double backpropagation (``create_graph=True``), so the result can
    be differentiated with respect to ``inputs`` (and the generator producing them).

    The model stays frozen: it runs in eval mode; its parameters temporarily require
    gradients (``torch.autograd.grad``, nothing is written to ``.grad``), and its train/eval
    flags and ``requires_grad`` flags are restored afterwards, also on error. When the
    result is backpropagated further, pass ``inputs=`` to ``backward`` (the trainers pass
    the generator's parameters) so that nothing accumulates into the model's ``.grad``.

    Args:
        model (nn.Module): The model ``f``; it must return ``N x K`` logits (else a
            ValueError naming ``model``).
        inputs (Tensor): ``N x ...`` inputs in the model's input space (float32 inputs of
            a float16 or bfloat16 model are cast to its dtype, differentiably).
        labels (Tensor): ``N`` class indices, or ``N x K`` conditioning vectors (argmax).
        squared (bool, optional): Return the squared norm. Default: True
        create_graph (bool, optional): Keep the graph for differentiating the result.
            Default: True

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``: no example, no gradient).

    Examples::

        >>> import torch
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import load_sample_digits
        >>> from captum_ext.inversion import weight_gradient_norm
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> value = weight_gradient_norm(model, images, labels)
        >>> bool(value >= 0)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    _check_tensor(inputs, "inputs")
    params = list(model.parameters())
    if not params:
        raise ValueError("`model` has no parameters to take the gradient of.")
    with preserved_state([model]):
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with gradients_on():
            logits = _check_model_logits(
                call_model(model, in_model_precision(model, (inputs,))),
                inputs.shape[0] if inputs.dim() else None,
                module_only=True,
            )
            labels = _as_labels(labels, logits)
            loss = F.cross_entropy(at_least_float32(logits), labels)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    total = sum((at_least_float32(g) ** 2).sum() for g in grads if g is not None)
    if not isinstance(total, Tensor):
        total = loss * 0
    return total if squared else total.sqrt()


@renamed_arguments(classifier="model", normalize="preprocess")
def perturbed_kl_ce(
    model: nn.Module,
    pixels: Tensor,
    conditioning: Tensor,
    *,
    eps: float = 0.1,
    preprocess=None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""KL and CE again, on a randomly perturbed copy of the images.

    ``x' = preprocess(p + eps * s)`` with ``s`` uniform random signs (``sign`` of Gaussian
    noise) on the pixels ``p``; returns ``KL(c || softmax f(x')) + CE(f(x'), argmax c)``.
    Training examples are classified robustly in a neighbourhood, so training-like
    reconstructions should keep their label under small perturbations (TLDR).

    Args:
        model (nn.Module or callable): The model (used as it is; the trainers run
            it frozen in eval mode); it must return ``N x K`` logits (else a ValueError
            naming ``model``).
        pixels (Tensor): ``N x C x H x W`` pixels (in [0, 1] in the trainers); the
            perturbed (and preprocessed) float32 images reach a float16 or bfloat16 model
            in its dtype.
        conditioning (Tensor): ``N x K`` conditioning vectors (one-hot for labels).
        eps (float, optional): Perturbation size in pixel units, finite and >= 0.
            Default: 0.1
        preprocess (callable, optional): Maps pixels to the model's input space, e.g.
            :meth:`ConditionedGenerator.preprocess_pixels`. Default: None (identity)
        generator (torch.Generator or int, optional): Source of the signs, on the pixels' device.
            Default: None

    Returns:
        Tensor: Scalar, >= 0 (0 for ``N = 0``).

    Examples::

        >>> import torch
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import normalize_digits
        >>> from captum_ext.inversion import one_hot_vectors, perturbed_kl_ce
        >>> model = load_bundled_model()
        >>> pixels = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        >>> c = one_hot_vectors(torch.tensor([0, 1, 2, 3]), 10)
        >>> value = perturbed_kl_ce(
        ...     model, pixels, c, preprocess=lambda p: normalize_digits(255 * p),
        ...     generator=torch.Generator().manual_seed(1))
    """
    generator = as_generator(generator)
    _check_images(pixels, "pixels")
    if (
        isinstance(eps, bool)
        or not isinstance(eps, int | float)
        or not math.isfinite(eps)
        or eps < 0
    ):
        raise ValueError(f"`eps` must be a finite non-negative float, got {eps!r}.")
    signs = torch.randint(0, 2, pixels.shape, generator=generator, device=pixels.device)
    perturbed = pixels + eps * (2 * signs.to(pixels.dtype) - 1)
    inputs = perturbed if preprocess is None else preprocess(perturbed)
    # float32 pixels of a half-precision model's generator: cast to the model's dtype
    inputs = in_model_precision(model, (inputs,)) if isinstance(inputs, Tensor) else (inputs,)
    logits = at_least_float32(
        _check_model_logits(model(*inputs), pixels.shape[0], module_only=False)
    )
    conditioning = conditioning.to(logits.dtype)
    return kl_to_conditioning(logits, conditioning) + cross_entropy_to_labels(logits, conditioning)
